"""`mpm chat`: one-shot or interactive multi-turn chat with an image-to-text model."""

from __future__ import annotations

from collections.abc import Callable

from mpm.inference import Request, generate, open_image

HELP = """commands: /image PATH (add an image to your next message), /reset (forget the conversation), /quit"""


def one_shot(model, processor, prompt: str, images: list[str], raw: bool = False, **generation) -> str:
    """Answer one message; a message without <image> markers gets one per image at its start."""
    loaded = [open_image(i) for i in images]  # a missing or corrupt image is a clear error, before any work
    marker = "<image>"
    if loaded and marker not in prompt:
        prompt = marker * len(loaded) + "\n" + prompt
    request = Request(loaded, prompt=prompt) if raw else Request(loaded, messages=[{"role": "user", "content": prompt}])
    return generate(model, processor, [request], **generation)[0]


def interactive(
    model, processor, read: Callable[[str], str] = input, write: Callable[[str], None] = print, **generation
) -> None:
    """A multi-turn session; images are added with /image PATH before the message that refers to them."""
    messages: list[dict] = []
    images, pending = [], []
    write(HELP)
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            messages, images, pending = [], [], []
            write("(conversation reset)")
            continue
        if line.startswith("/image "):
            path = line[len("/image ") :].strip()
            try:
                pending.append(open_image(path))
                write(f"(image {path} added to your next message)")
            except (FileNotFoundError, ValueError) as exc:
                write(f"error: {exc}")
            continue
        content = "<image>" * len(pending) + ("\n" if pending else "") + line
        messages.append({"role": "user", "content": content})
        images += pending
        pending = []
        try:
            answer = generate(model, processor, [Request(list(images), messages=list(messages))], **generation)[0]
        except ValueError as exc:  # e.g. a chat template that refuses the conversation
            messages.pop()
            write(f"error: {exc}")
            continue
        messages.append({"role": "assistant", "content": answer})
        write(f"model> {answer}")
