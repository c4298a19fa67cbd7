"""Synthetic image-text pairs for smoke runs, the quickstart and benchmarks (`mpm data synth`).

Images are procedural (a colour gradient, a few shapes, photographic-level sensor noise so JPEG sizes and decode
costs resemble real photos) at mixed sizes, with English captions that describe them. With `bad_samples`, a
few rows of every kind the sharder must survive are mixed in (empty and non-English captions, duplicates,
truncated and zero-byte files, HTML instead of an image, tiny images, a missing file), so a run's summary shows
each reason counted.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (200, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 200),
    "yellow": (230, 200, 40),
    "purple": (130, 50, 160),
    "orange": (240, 140, 30),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = [(400, 300), (640, 480), (800, 600), (1024, 768), (1280, 960), (1600, 1200), (2000, 1500), (1500, 2000)]


@dataclass
class SyntheticPair:
    image: Image.Image
    caption: str


def render_pair(rng: random.Random, size: tuple[int, int], noise: float = 10.0) -> SyntheticPair:
    """One picture of 1-3 coloured shapes on a gradient, and an English caption naming them."""
    width, height = size
    background, other = rng.sample(list(COLOURS), 2)
    top, bottom = np.array(COLOURS[background], np.float32), np.array(COLOURS[other], np.float32)
    t = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    pixels = np.broadcast_to(top * (1 - t) + bottom * t, (height, width, 3)).copy()
    nprng = np.random.default_rng(rng.getrandbits(32))
    pixels += nprng.normal(0, noise, pixels.shape).astype(np.float32)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    things = []
    for _ in range(rng.randint(1, 3)):
        colour, shape = rng.choice([c for c in COLOURS if c != background]), rng.choice(SHAPES)
        r = rng.randint(min(size) // 10, min(size) // 4)
        x, y = rng.randint(r, width - r), rng.randint(r, height - r)
        if shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=COLOURS[colour])
        elif shape == "square":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=COLOURS[colour])
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLOURS[colour])
        things.append(f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}")
    listing = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
    opener = rng.choice(["A picture of", "An image showing", "A drawing of", "Illustration with"])
    article = "an" if background[0] in "aeiou" else "a"
    return SyntheticPair(image, f"{opener} {listing} on {article} {background} and {other} background.")


def write_pairs(
    folder: str | Path,
    num_samples: int,
    seed: int = 0,
    sizes: list[tuple[int, int]] | None = None,
    bad_samples: bool = True,
    quality: int = 90,
    noise: float = 10.0,
) -> Path:
    """Write `{folder}/images/*.jpg` and `{folder}/pairs.jsonl` (url = relative image path, caption). Returns the jsonl.

    With `bad_samples`, about one row in ten is one of the problem kinds above (the rest are clean).
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sizes = sizes or SIZES
    rows = []
    bad_kinds = [
        "empty_caption",
        "german_caption",
        "duplicate",
        "truncated",
        "zero_bytes",
        "html",
        "tiny",
        "missing_file",
        "boilerplate",
    ]
    for i in range(num_samples):
        name = f"images/{i:06d}.jpg"
        kind = bad_kinds[(i // 10) % len(bad_kinds)] if bad_samples and i % 10 == 9 else "clean"
        size = (24, 18) if kind == "tiny" else rng.choice(sizes)
        pair = render_pair(rng, size, noise)
        caption = pair.caption
        path = folder / name
        if kind == "duplicate" and rows:
            previous = next(r for r in reversed(rows) if r["kind"] == "clean")
            path.write_bytes((folder / previous["url"]).read_bytes())
            caption = previous["caption"]
        elif kind == "missing_file":
            pass  # the row points at a file that does not exist
        elif kind == "zero_bytes":
            path.write_bytes(b"")
        elif kind == "html":
            path.write_bytes(b"<!DOCTYPE html><html><body>Not found</body></html>")
        else:
            pair.image.save(path, "JPEG", quality=quality)
            if kind == "truncated":
                data = path.read_bytes()
                path.write_bytes(data[: len(data) // 2])
        if kind == "empty_caption":
            caption = ""
        elif kind == "german_caption":
            caption = "Ein Bild mit bunten Formen auf einem farbigen Hintergrund."
        elif kind == "boilerplate":
            caption = f"IMG_{4000 + i}.JPG"
        rows.append({"url": name, "caption": caption, "kind": kind})
    jsonl = folder / "pairs.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return jsonl
