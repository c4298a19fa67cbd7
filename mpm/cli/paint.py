"""`mpm paint`: draw images from prompts in any language the model's LLM knows."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mpm.cli.options import Flag, add_command


@dataclass
class PaintCommand:
    model: str = ""  # an MPMPaintPipeline folder (the final/ of `mpm train t2i`)
    prompt: str | None = None  # one prompt; or prompts
    prompts: str | None = None  # a jsonl file: {"id", "lang", "prompt"} per line
    output: str = ""  # the folder the PNGs go to
    negative: str | None = None  # negative prompt (default: the empty prompt)
    num_images: int = 1  # images per prompt
    steps: int = 50
    guidance: float = 7.5  # <= 1: no classifier-free guidance
    size: str | None = None  # 512 or WIDTHxHEIGHT (default: the model's)
    seed: int = 0
    scheduler: str | None = None  # a diffusers scheduler class, e.g. DPMSolverMultistepScheduler
    rank_with: str | None = None  # a CLIP / SigLIP-style model: keep the best of num_candidates per image
    num_candidates: int = 4
    batch_size: int = 4  # prompts drawn together
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on a GPU, fp32 on a CPU) | fp32 | bf16 | fp16


FLAGS = [
    Flag("--model", "model", str, "MPMPaintPipeline folder (final/ of mpm train t2i)"),
    Flag("--output", "output", str, "output folder for the PNGs", short="-o"),
    Flag("--prompts", "prompts", str, 'jsonl file of {"id", "lang", "prompt"} lines'),
    Flag("--negative", "negative", str, "negative prompt"),
    Flag("--num-images", "num_images", int, "images per prompt (default: 1; a grid when several)"),
    Flag("--steps", "steps", int, "sampling steps (default: 50)"),
    Flag("--guidance", "guidance", float, "classifier-free guidance scale (default: 7.5; <= 1: none)"),
    Flag("--size", "size", str, "512 or WIDTHxHEIGHT (default: the model's)"),
    Flag("--seed", "seed", int, "image k of a prompt uses seed + k (default: 0)"),
    Flag("--scheduler", "scheduler", str, "a diffusers scheduler class, e.g. DPMSolverMultistepScheduler"),
    Flag("--rank-with", "rank_with", str, "image-text model (CLIP / SigLIP / Chinese-CLIP folder or hub id)"),
    Flag("--num-candidates", "num_candidates", int, "with --rank-with: candidates per kept image (default: 4)"),
    Flag("--batch-size", "batch_size", int, "prompts drawn together (default: 4)"),
    Flag("--device", "device", str, "auto|cpu|cuda (default: auto)"),
    Flag("--dtype", "dtype", str, "auto|fp32|bf16|fp16 (default: auto)"),
]
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def paint_command(cfg: PaintCommand, args) -> int:
    from mpm.core.errors import ConfigError

    if not cfg.model:
        raise ConfigError("give the pipeline to draw with: --model DIR (the final/ folder of mpm train t2i)")
    if not cfg.output:
        raise ConfigError("give the folder the images go to: -o DIR")
    if (cfg.prompt is None) == (cfg.prompts is None):
        raise ConfigError('give one prompt ("一只戴着红帽子的猫") or --prompts FILE.jsonl, not both')
    if cfg.prompt is not None and not cfg.prompt.strip():
        raise ConfigError("the prompt is empty: give some text (the empty prompt is what guidance compares against)")
    for name in ("num_images", "steps", "num_candidates", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.dtype not in ("auto", *DTYPES):
        raise ConfigError(f"--dtype must be auto, fp32, bf16 or fp16, got {cfg.dtype!r}")
    width, height = parse_size(cfg.size)

    from t2i.paint import Prompt, paint, read_prompts

    prompts = read_prompts(cfg.prompts) if cfg.prompts else [Prompt("0", cfg.prompt)]
    if args.no_progress:  # also the loading bars of diffusers and transformers
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    pipe = load_pipeline(cfg)
    scorer = None
    if cfg.rank_with:
        from t2i.scoring import ImageTextScorer

        scorer = ImageTextScorer(cfg.rank_with, device=pipe.device.type, key="rank_with")
    rows = paint(pipe, prompts, cfg.output, cfg.num_images, cfg.seed, cfg.steps, cfg.guidance, height, width,
                 cfg.negative, scorer, cfg.num_candidates, cfg.batch_size, show_progress=not args.no_progress)  # fmt: skip
    print(f"{sum(len(r['images']) for r in rows)} image(s) of {len(rows)} prompt(s) in {cfg.output}")
    return 0


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """ "512" -> (512, 512); "768x512" -> (768, 512) as width x height; None -> the model's."""
    from mpm.core.errors import ConfigError

    if size is None:
        return None, None
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", size.strip())
    if not match:
        raise ConfigError(f"--size must be a number (512) or WIDTHxHEIGHT (768x512), got {size!r}")
    width = int(match.group(1))
    return width, int(match.group(2) or width)


def load_pipeline(cfg: PaintCommand):
    from pathlib import Path

    import torch

    from mpm.core.errors import ConfigError, ModelLoadError
    from t2i import MPMPaintPipeline

    folder = Path(cfg.model)
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"--model {folder} is not a saved MPMPaintPipeline (no model_index.json)")
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    try:
        pipe = MPMPaintPipeline.from_pretrained(folder, dtype=getattr(torch, DTYPES[dtype]))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load --model {folder}: {str(exc).strip().splitlines()[0]}") from None
    if cfg.scheduler:
        import diffusers

        scheduler_class = getattr(diffusers, cfg.scheduler, None)
        if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, diffusers.SchedulerMixin)):
            raise ConfigError(
                f"--scheduler {cfg.scheduler!r} is not a diffusers scheduler class (e.g. DPMSolverMultistepScheduler)"
            )
        compatible = sorted(c.__name__ for c in pipe.scheduler.compatibles)
        if scheduler_class is not None and scheduler_class.__name__ not in compatible:
            raise ConfigError(
                f"--scheduler {cfg.scheduler} cannot sample this model (trained with {type(pipe.scheduler).__name__}); "
                f"compatible: {', '.join(compatible)}"
            )
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    return pipe.to(device)


def register(groups) -> None:
    p = add_command(
        groups,
        "paint",
        paint_command,
        PaintCommand,
        FLAGS,
        positional=("prompt", "the prompt, in any language the model's LLM knows"),
        help="draw images from a prompt (or a prompts file) with a text-to-image MPM pipeline",
        description=(
            "Draw PNGs into a folder with an MPMPaintPipeline: PROMPT, or --prompts FILE.jsonl for many (a rerun "
            "skips prompts already drawn). Image k of a prompt is seeded with --seed + k. --rank-with MODEL keeps the "
            "best of --num-candidates by an image-text model's score, saved beside the images (VisCPM-Paint's ranker)."
        ),
        epilog='example: mpm paint --model runs/t2i/final "一只戴着红帽子的猫" -o out/ --num-images 4',
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
