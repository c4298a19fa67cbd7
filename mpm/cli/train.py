"""`mpm train`: the training recipes (i2t: image-to-text, stage pretrain or sft; t2i: text-to-image)."""

from __future__ import annotations

from mpm.cli.options import Flag, add_command

I2T_FLAGS = [
    Flag("--output-dir", "train.output_dir", str, "run folder: checkpoints, metrics.jsonl, final/"),
    Flag("--max-steps", "train.max_steps", int, "optimizer steps"),
]


def i2t_command(cfg, args) -> int:
    from mpm.recipes.i2t import train

    result = train(cfg, show_progress=not args.no_progress)
    print(f"final model in {result.final}")
    return 0


T2I_FLAGS = [
    Flag("--output-dir", "train.output_dir", str, "run folder: checkpoints, metrics.jsonl, validation/, final/"),
    Flag("--max-steps", "train.max_steps", int, "optimizer steps"),
    Flag("--stage", "train.stage", str, "align (text_proj + cross-attention k/v) or full (the whole UNet)"),
]


def t2i_command(cfg, args) -> int:
    from t2i.recipe import train

    result = train(cfg, show_progress=not args.no_progress)
    print(f'final pipeline in {result.final} (try: mpm paint --model {result.final} "一只戴着红帽子的猫" -o out/)')
    return 0


ALIGN_FLAGS = [
    Flag("--output-dir", "train.output_dir", str, "run folder: checkpoints, metrics.jsonl, final/"),
    Flag("--max-steps", "train.max_steps", int, "optimizer steps"),
    Flag("--preset", "loss.preset", str, "dpo | rlhfv_paper (gamma 5, beta 0.5, normalised) | rlhfv_released"),
    Flag(
        "--no-cache",
        "reference.recompute",
        "const",
        "compute the reference log-probs again, replacing the cache",
        const=True,
    ),
]


def align_command(cfg, args) -> int:
    from mpm.recipes.align import train

    result = train(cfg, show_progress=not args.no_progress)
    print(f"final model in {result.final} ({result.pairs} pairs used, {len(result.skipped)} unusable)")
    return 0


def register(groups) -> None:
    train = groups.add_parser("train", help="train models (i2t: image-to-text, t2i: text-to-image, align: DPO)")
    commands = train.add_subparsers(dest="command", required=True, metavar="{i2t,t2i,align}")
    p = add_command(
        commands,
        "i2t",
        i2t_command,
        "mpm.train_config:TrainConfig",
        I2T_FLAGS,
        config_required=True,
        help="MPM image-to-text training: stage pretrain (English pairs, LLM frozen) or sft (conversations)",
        description=(
            "Train an image-to-text MPM model with accelerate. stage: pretrain reads pair shards (mpm data shard) "
            "with the LLM frozen; stage: sft reads conversations (LLaVA JSON, UniMM-Chat jsonl, ShareGPT) and trains "
            "the LLM (full or LoRA). Rerunning the same command resumes exactly from the last checkpoint. Multi-GPU: "
            "accelerate launch --config_file configs/accelerate/ddp.yaml -m mpm.cli train i2t --config ..."
        ),
        epilog="example: mpm train i2t --config configs/i2t/qwen2.5-0.5b_siglip_resampler_pretrain.yaml train.max_steps=2000",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = add_command(
        commands,
        "t2i",
        t2i_command,
        "t2i.config:T2IConfig",
        T2I_FLAGS,
        config_required=True,
        help="MPM text-to-image training (VisCPM-Paint): English pairs, the multilingual LLM frozen",
        description=(
            "Train an MPMPaintPipeline with accelerate on pair shards (mpm data shard): the UNet learns to read a frozen "
            "multilingual LLM's hidden states through text_proj, from English captions only; prompts in the LLM's "
            "other languages then work zero-shot. stage: align trains text_proj and the cross-attention k/v, full the "
            "whole UNet (or LoRA). Validation grids in several languages go to OUTPUT_DIR/validation/. Rerunning the "
            "same command resumes exactly from the last checkpoint."
        ),
        epilog="example: mpm train t2i --config configs/t2i/sd2.1-base_qwen2.5-1.5b_align.yaml train.max_steps=20000",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = add_command(
        commands,
        "align",
        align_command,
        "mpm.align.config:AlignConfig",
        ALIGN_FLAGS,
        config_required=True,
        help="preference alignment of an i2t model: DPO, or RLHF-V's dense DPO from corrected answers",
        description=(
            "Align an MPM checkpoint on preference pairs (the DESIGN.md jsonl, RLHF-V-Dataset or RLAIF-V-Dataset "
            "parquet, LLaMA-Factory or TRL preference files) with DPO or dense DPO (corrected segments weighted by "
            "gamma, found by a token diff of chosen and rejected). The reference model's log-probs are computed once "
            "and cached beside the data (--no-cache recomputes them). Full, LoRA, or the LLM frozen "
            "(train.train_llm: false). Rerunning the same command resumes exactly from the last checkpoint."
        ),
        epilog="example: mpm train align --config configs/align/rlhfv_paper.yaml model.init_from=runs/sft/final",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
