"""`mpm demo`: the miniature world end to end (mpm/demo/run.py), or one of its stages no other command covers."""

from __future__ import annotations

from mpm.cli.options import Flag, add_command

FLAGS = [
    Flag("--output", "output", str, "the demo folder: every stage caches under it", short="-o"),
    Flag("--quick", "quick", "flag", "en, zh, de and fewer steps: a few minutes (tests, CI)"),
    Flag("--langs", "langs", "list", "world languages, comma-separated (default: all; with --quick: en,zh,de)"),
    Flag("--seeds", "seeds", int, "runs with seeds SEED..SEED+N-1; the table shows mean and spread (default: 1)"),
    Flag("--seed", "seed", int, "the first seed (default: 0)"),
    Flag("--native", "native", "list", "languages with a native upper bound (trained on their pairs): 'all', "
         "'none' or codes (default: none; the README's table runs --native zh)"),
    Flag("--no-control", "control", "const", "skip the English-only-LM control", const=False),
    Flag("--no-t2i", "t2i", "const", "skip text-to-image", const=False),
    Flag("--align", "align", "flag", "also align the i2t model on English feedback (DDPO, DDPO + LoRA, one RLAIF-V "
         "iteration) and report hallucination per language before and after"),
    Flag("--world", "world", str, "a folder of world files (default: configs/world)"),
    Flag("--lm-steps", "lm_steps", int, "the most text-pretraining steps (it stops at the gate)"),
    Flag("--i2t-steps", "i2t_steps", int, "image-to-text training steps"),
    Flag("--t2i-steps", "t2i_steps", int, "text-to-image training steps"),
    Flag("--train-images", "train_images", int, "rendered training scenes per seed"),
    Flag("--eval-images", "eval_images", int, "held-out scenes (each asked in every language)"),
    Flag("--paint-prompts", "paint_prompts", int, "held-out scenes drawn from their prompt in every language"),
    Flag("--threads", "threads", int, "torch threads"),
]  # fmt: skip


def demo_command(cfg, args) -> int:
    from mpm.cli import main
    from mpm.demo.run import run_demo

    run_demo(cfg, show_progress=not args.no_progress, runner=main)  # each stage's command runs in this process
    return 0


def register(groups) -> None:
    p = add_command(
        groups,
        "demo",
        demo_command,
        "mpm.demo.run:DemoConfig",
        FLAGS,
        positional=("stage", "all (default) | render | pretrain-lm | judge: run only that stage"),
        help="the miniature world: MPM's zero-shot transfer reproduced on a CPU, through the real commands",
        description=(
            "Render a procedural world of shapes with captions in every world language (configs/world/), pretrain a "
            "tiny multilingual LM on text only (gated by a text oracle), then train image-to-text and text-to-image "
            "on ENGLISH pairs only with the LM frozen, through `mpm data shard`, `mpm train i2t`, `mpm train t2i` "
            "and `mpm eval`, and print per-language accuracy beside an English-only-LM control and a native upper "
            "bound. Every stage is cached under --output: rerun the same command to continue. Each `mpm` command "
            "run is printed with its config file, so any stage can be rerun by hand."
        ),
        epilog="examples: mpm demo --output runs/demo   |   mpm demo --quick -o runs/quick   |   "
        "mpm demo --seeds 3 -o runs/demo3   |   mpm demo pretrain-lm -o runs/demo",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars inside the stages")
