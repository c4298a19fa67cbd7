"""`mpm export`: checkpoints in other formats (llava: a plain transformers LlavaForConditionalGeneration)."""

from __future__ import annotations

from dataclasses import dataclass

from mpm.cli.options import Flag, add_command


@dataclass
class ExportCommand:
    model: str = ""  # an MPM checkpoint folder
    out: str = ""  # the folder to write


FLAGS = [
    Flag("--model", "model", str, "MPM checkpoint folder"),
    Flag("--out", "out", str, "output folder"),
]


def llava_command(cfg: ExportCommand, args) -> int:
    from mpm.core.errors import ConfigError

    if not cfg.model or not cfg.out:
        raise ConfigError("give the checkpoint to export (--model DIR) and where to write it (--out DIR)")
    from mpm.export import export_llava

    out = export_llava(cfg.model, cfg.out)
    print(f"wrote a LlavaForConditionalGeneration checkpoint to {out}")
    return 0


def register(groups) -> None:
    export = groups.add_parser("export", help="convert checkpoints to other formats")
    commands = export.add_subparsers(dest="command", required=True, metavar="{llava}")
    add_command(
        commands,
        "llava",
        llava_command,
        ExportCommand,
        FLAGS,
        help="an mlp checkpoint without slicing as a plain transformers LlavaForConditionalGeneration",
        description=(
            "Write a LLaVA checkpoint (weights, config, LlavaProcessor) that loads with transformers alone and gives "
            "the same logits. Only checkpoints whose connector exports to LLaVA (mlp), without slicing and with a "
            "ViT tower, can be LLaVA."
        ),
        epilog="example: mpm export llava --model runs/llava/stage1/final --out runs/llava/hf",
    )
