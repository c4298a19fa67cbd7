"""`mpm chat`: one-shot or interactive multi-turn chat with an image-to-text model."""

from __future__ import annotations

import re
from collections.abc import Callable

from mpm.core.errors import UserError
from mpm.core.images import ImageError, open_image
from mpm.inference import Request, generate, with_markers

COMMANDS = {
    "/image PATH": "add an image to your next message",
    "/reset": "forget the conversation",
    "/help": "show these commands",
    "/quit": "end the session",
}
HELP = "commands: " + ", ".join(f"{c} ({what})" for c, what in COMMANDS.items())
EMPTY = "(empty answer: the model produced only whitespace or stopped at once)"


def shown(answer: str) -> str:
    """An answer as printed: an empty one says so instead of printing nothing."""
    return answer if answer.strip() else EMPTY


def one_shot(model, processor, prompt: str, images: list[str], raw: bool = False, **generation) -> str:
    """Answer one message; without image markers the images go first (as `generate` places them)."""
    loaded = [open_image(i) for i in images]  # a missing or corrupt image is a clear error, before any work
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
        if line == "/help":
            write(HELP)
            continue
        if line == "/reset":
            messages, seen, pending = [], [], []
            write("(conversation reset)")
            continue
        if line.startswith("/image "):
            _add_image(line[len("/image ") :].strip(), pending, write)
            continue
        if line == "/image":
            write("give the image's path: /image PATH")
            continue
        if re.fullmatch(r"/[a-z]+", line):  # a mistyped command (not "/r/aww" or "/ hello") would go to the model
            write(f"unknown command {line}: {HELP}")
            continue
        turn = {"role": "user", "content": with_markers(processor, line, len(pending))}
        try:
            request = Request(seen + pending, messages=[*messages, turn])
            answer = generate(model, processor, [request], **generation)[0]
        except (UserError, ValueError) as exc:  # e.g. markers that do not match the images: the turn is dropped
            write(f"error: {exc} (the message and its images were not kept)")
            pending = []
            continue
        messages += [turn, {"role": "assistant", "content": answer}]
        seen, pending = seen + pending, []
        write(f"model> {shown(answer)}")


def _add_image(path: str, pending: list, write: Callable[[str], None]) -> None:
    try:
        pending.append(open_image(path))
        write(f"(image {path} added to your next message)")
    except ImageError as exc:
        write(f"error: {exc}")
