"""`mpm chat`: talk to an image-to-text model, one message or an interactive session."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from mpm.cli.options import Flag, add_command


@dataclass
class ChatCommand:
    model: str = ""  # a checkpoint folder: MPM, or LLaVA (exported or native)
    prompt: str | None = None  # the message (with interactive: the first one, optional)
    image: list[str] = field(default_factory=list)  # image files, in order
    interactive: bool = False
    raw: bool = False  # the message as a raw prompt, without the chat template
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 0.9
    device: str = "auto"  # auto | cpu | cuda
    quantize: str | None = None  # int8 | int4: the LLM's weights quantised (weight-only, mpm.quantize)
    best_of: int = 1  # sample N answers, keep the one with the highest DPO implicit reward (needs `reference`)
    reference: str | None = None  # the model the aligned one started from (best-of-N's reward)
    beta: float = 0.1  # the reward's scale (it does not change which answer wins; shown with the candidates)
    seed: int = 0


FLAGS = [
    Flag("--model", "model", str, "checkpoint folder (MPM, or LLaVA / exported)"),
    Flag("--image", "image", "append", "an image file; repeat for several"),
    Flag("--interactive", "interactive", "flag", "multi-turn session (--image and the message, if given, start it)"),
    Flag("--raw", "raw", "flag", "send the message as a raw prompt, without the chat template"),
    Flag("--max-new-tokens", "max_new_tokens", int, "tokens to generate at most (default: 256)"),
    Flag("--temperature", "temperature", float, "0 = greedy (default)"),
    Flag("--top-p", "top_p", float, "nucleus sampling mass when sampling (default: 0.9)"),
    Flag("--device", "device", str, "auto|cpu|cuda (default: auto)"),
    Flag("--quantize", "quantize", str, "int8|int4: the LLM's weights quantised (weight-only, for CPUs)"),
    Flag(
        "--best-of",
        "best_of",
        int,
        "sample N answers and keep the best by beta*(log pi - log ref) (needs "
        "--reference; samples at --temperature, 0.7 when not given)",
    ),
    Flag(
        "--reference", "reference", str, "the reference model of --best-of: the checkpoint the aligned one started from"
    ),
    Flag("--beta", "beta", float, "the implicit reward's scale, printed with the candidates (default: 0.1)"),
    Flag("--seed", "seed", int, "the seed of the sampled answers (default: 0)"),
]


def chat_command(cfg: ChatCommand, args) -> int:
    from mpm.core.errors import ConfigError

    if not cfg.model:
        raise ConfigError("give the checkpoint to talk to: --model DIR")
    if not cfg.interactive and not cfg.prompt:
        raise ConfigError("give a message to answer, or --interactive")
    from mpm.chat import interactive, one_shot, shown
    from mpm.core.images import open_image
    from mpm.inference import load_model

    for path in cfg.image:
        open_image(path)  # a missing or unreadable image is an error before the model loads
    if cfg.best_of > 1:
        return _best_of(cfg)
    model, processor = load_model(cfg.model, device=cfg.device, quantize=cfg.quantize)
    generation = {"max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.temperature > 0}
    if cfg.temperature > 0:
        generation.update(temperature=cfg.temperature, top_p=cfg.top_p)
    if cfg.interactive:  # --image and the message, if given, are the first turn's
        interactive(model, processor, images=cfg.image, first=cfg.prompt, **generation)
    else:
        print(shown(one_shot(model, processor, cfg.prompt, cfg.image, raw=cfg.raw, **generation)))
    return 0


def _best_of(cfg: ChatCommand) -> int:
    from mpm.align.best_of import best_of_n
    from mpm.chat import shown
    from mpm.core.errors import ConfigError

    if not cfg.reference:
        raise ConfigError("--best-of scores answers against the reference model: give --reference DIR (the "
                          "checkpoint the aligned one started from)")  # fmt: skip
    if cfg.interactive:
        raise ConfigError("--best-of answers one message: drop --interactive")
    from mpm.export import load_as_mpm  # a LLaVA checkpoint is scored as the MPM model it equals

    model, processor = load_as_mpm(cfg.model, cfg.device, cfg.quantize)
    reference, _ = load_as_mpm(cfg.reference, cfg.device, cfg.quantize)
    best, candidates = best_of_n(
        model, reference, processor, cfg.prompt, cfg.image, cfg.best_of, cfg.beta, cfg.seed,
        raw_prompt="{question}" if cfg.raw else None, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature or 0.7, top_p=cfg.top_p,
    )  # fmt: skip
    for i, c in enumerate(candidates):
        kept = "  <- kept" if c is best else ""
        print(f"[{i}] reward {c.reward:+.3f}{kept}: {shown(c.answer)}", file=sys.stderr)  # stdout: the answer
    print(shown(best.answer))
    return 0


def register(groups) -> None:
    add_command(
        groups,
        "chat",
        chat_command,
        ChatCommand,
        FLAGS,
        positional=("prompt", "the message (with --interactive: the first one, optional)"),
        help="talk to an image-to-text model (one message, or --interactive)",
        description=(
            "Answer a message about one or more images with an MPM checkpoint (or a LLaVA one). Without <image> "
            "markers in the message, the images go first. --interactive starts a multi-turn session: /image PATH "
            "adds an image to the next message, /reset forgets, /quit ends."
        ),
        epilog='example: mpm chat --model runs/sft --image cat.jpg "用中文描述这张图片"',
    )
