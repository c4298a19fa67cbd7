"""`mpm chat`: one-shot or interactive multi-turn chat with an image-to-text model."""

from __future__ import annotations

from collections.abc import Callable

from mpm.core.images import ImageError, open_image
from mpm.inference import Request, generate
from mpm.processor import MPMProcessor

HELP = """commands: /image PATH (add an image to your next message), /reset (forget the conversation), /quit"""


def image_marker(processor) -> str:
    """The marker a message uses for an image: this model's image token (LLaVA processors name theirs too)."""
    if isinstance(processor, MPMProcessor):
        return processor.config.image_token
    return getattr(processor, "image_token", "<image>")


def with_markers(processor, text: str, images: int) -> str:
    """A message without image markers gets one per image at its start."""
    marker = image_marker(processor)
    if images and marker not in text:
        return marker * images + "\n" + text
    return text


def one_shot(model, processor, prompt: str, images: list[str], raw: bool = False, **generation) -> str:
    """Answer one message (see `with_markers`)."""
    loaded = [open_image(i) for i in images]  # a missing or corrupt image is a clear error, before any work
    prompt = with_markers(processor, prompt, len(loaded))
    request = Request(loaded, prompt=prompt) if raw else Request(loaded, messages=[{"role": "user", "content": prompt}])
    return generate(model, processor, [request], **generation)[0]


def interactive(
    model,
    processor,
    read: Callable[[str], str] | None = None,
    write: Callable[[str], None] = print,
    images: list[str] = (),
    first: str | None = None,
    **generation,
) -> None:
    """A multi-turn session. Images are added with /image PATH before the message that refers to them; `images`
    and `first` (from the command line) are the first message's images and text."""
    read = read or input  # looked up when called (tests replace builtins.input)
    messages: list[dict] = []
    seen, pending = [], []
    write(HELP)
    for path in images:
        _add_image(path, pending, write)
    while True:
        if first is not None:
            line, first = first.strip(), None
            write(f"you> {line}")
        else:
            try:
                line = read("you> ").strip()
            except EOFError:
                return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            messages, seen, pending = [], [], []
            write("(conversation reset)")
            continue
        if line.startswith("/image "):
            _add_image(line[len("/image ") :].strip(), pending, write)
            continue
        turn = {"role": "user", "content": with_markers(processor, line, len(pending))}
        try:
            request = Request(seen + pending, messages=[*messages, turn])
            answer = generate(model, processor, [request], **generation)[0]
        except ValueError as exc:  # e.g. markers that do not match the images: this turn is dropped, with its images
            write(f"error: {exc} (the message and its images were not kept)")
            pending = []
            continue
        messages += [turn, {"role": "assistant", "content": answer}]
        seen, pending = seen + pending, []
        write(f"model> {answer}")


def _add_image(path: str, pending: list, write: Callable[[str], None]) -> None:
    try:
        pending.append(open_image(path))
        write(f"(image {path} added to your next message)")
    except ImageError as exc:
        write(f"error: {exc}")
