"""`mpm align`: the alignment loops built on `mpm train align` (rlaifv: RLAIF-V's AI-feedback loop)."""

from __future__ import annotations

from mpm.cli.options import Flag, add_command

RLAIFV_FLAGS = [
    Flag("--output-dir", "output_dir", str, "run folder: iter-K/ per iteration, summary.json, summary.md"),
    Flag("--policy", "policy", str, "the MPM checkpoint to start from"),
    Flag("--iterations", "iterations", int, "RLAIF-V iterations (default: 4)"),
]


def rlaifv_command(cfg, args) -> int:
    from mpm.align.rlaifv import run

    result = run(cfg, show_progress=not args.no_progress)
    last = result.iterations[-1]
    rate = (last["heldout_next"] or {}).get("all", {}).get("claim_rate")
    shown = "-" if rate is None else f"{100 * rate:.1f}%"
    print(f"policy after {len(result.iterations)} iterations: {result.policy} (held-out claim hallucination {shown}; "
          f"table in {cfg.output_dir}/summary.md)")  # fmt: skip
    return 0


def register(groups) -> None:
    align = groups.add_parser("align", help="alignment loops (rlaifv: RLAIF-V's AI-feedback loop)")
    commands = align.add_subparsers(dest="command", required=True, metavar="{rlaifv}")
    p = add_command(
        commands,
        "rlaifv",
        rlaifv_command,
        "mpm.align.rlaifv_config:RlaifvConfig",
        RLAIFV_FLAGS,
        config_required=True,
        help="RLAIF-V: sample, split into claims, label, pair, DPO; K iterations, the best held-out model kept",
        description=(
            "Iterate RLAIF-V's loop on an MPM checkpoint: sample N answers per instruction, split them into claims "
            "with yes/no questions (the offline rule splitter, a local LM or an OpenAI-compatible endpoint), score "
            "each question with a labeler MLLM (P(yes) against P(no)), build preference pairs (score gap, at most 2 "
            "per instruction, length-balanced), train DPO, and keep the model with the lower held-out "
            "hallucination rate as the next policy. Every stage writes its file under OUTPUT_DIR/iter-K/; "
            "rerunning the same command continues where it stopped."
        ),
        epilog="example: mpm align rlaifv --config configs/align/rlaifv_rule.yaml policy=runs/sft/final",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
