"""The judge of the `mpm demo` text-to-image model: a small CNN that reads a scene's attributes off an image.

The demo's t2i model draws one-object scenes of the miniature world (`mpm.demo.world`) from prompts written in
several languages. Whether a drawing shows what its prompt says (the right colour, shape, size and position) is a
question a CLIP score answers badly for shapes this simple and not at all for languages CLIP does not read; the
world, though, knows every prompt's attributes. So the judge is a classifier with four heads (colour, shape, size,
position) trained on rendered scenes, and `mpm eval paint --metric world_judge` compares its reading of each image
with the attributes of the image's prompt: the attribute accuracy of the t2i model per prompt language.

A judge is only as good as its own accuracy, so training measures it on held-out renders (a scene stream of another
seed than the training one) and the judge carries it along: `judge.json` records it, and every score of
`WorldJudge` reports it in its details, so a reader can tell the model's errors from the judge's.

    world = load_world(["en"])
    result = train_judge(world, "out/judge")            # cached: a second call with the same settings loads it
    model, info = load_judge("out/judge")
    predict(model, [world.render(world.scene(0), size=32)])   # [{"colour": ..., "shape": ..., ...}]

and `mpm eval paint ... --metric world_judge metric_options.world_judge.model=out/judge`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from mpm.core.errors import ConfigError, DataError, ModelLoadError
from mpm.core.files import atomic_write_json
from mpm.demo.world import ATTRIBUTES, World
from mpm.eval.scorers import ImageJudge, Scores, register_scorer

WEIGHTS_FILE = "judge.safetensors"
INFO_FILE = "judge.json"
FORMAT = 1
CHANNELS = (8, 16, 32)  # conv widths; each block halves the side
GRID = 4  # the last feature map is pooled to GRID x GRID: position needs where, not only what
HIDDEN = 64
TRAIN_SEED_BASE = 7_000  # scene streams: training world.scene(i, 7000 + seed), held out world.scene(i, 9000 + seed)
HELDOUT_SEED_BASE = 9_000
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4
WHAT_TO_DO = "train one with `mpm demo judge` (mpm.demo.judge.train_judge)"


class JudgeNet(nn.Module):
    """Three conv blocks, a GRID x GRID adaptive pool (any input side works) and one linear head per attribute.
    `resolution` is the side images are resized to; `values[attr]` names the classes of head `attr`."""

    def __init__(
        self,
        values: dict[str, Sequence[str]],
        resolution: int = 32,
        channels: Sequence[int] = CHANNELS,
        grid: int = GRID,
        hidden: int = HIDDEN,
    ):
        super().__init__()
        self.values = {a: tuple(v) for a, v in values.items()}
        self.resolution = int(resolution)
        layers: list[nn.Module] = []
        width = 3
        for c in channels:
            layers += [nn.Conv2d(width, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            width = c
        layers += [nn.AdaptiveAvgPool2d(grid), nn.Flatten(), nn.Linear(width * grid * grid, hidden), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({a: nn.Linear(hidden, len(v)) for a, v in self.values.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(x)
        return {a: head(h) for a, head in self.heads.items()}


@dataclass
class JudgeResult:
    folder: Path
    accuracy: dict[str, float]  # held-out accuracy per attribute, plus "all" (every attribute right)
    seconds: float  # training time (of the run that made the judge, when cached)
    cached: bool = False  # True when read from `folder/judge.json` without training
    info: dict[str, Any] = field(default_factory=dict)  # the judge.json record


def _settings(resolution: int, train_scenes: int, steps: int, seed: int, heldout_scenes: int) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "resolution": resolution,
        "train_scenes": train_scenes,
        "heldout_scenes": heldout_scenes,
        "steps": steps,
        "seed": seed,
        "train_scene_seed": TRAIN_SEED_BASE + seed,
        "heldout_scene_seed": HELDOUT_SEED_BASE + seed,
        "batch_size": BATCH_SIZE,
        "lr": LEARNING_RATE,
        "weight_decay": WEIGHT_DECAY,
        "architecture": {"channels": list(CHANNELS), "grid": GRID, "hidden": HIDDEN},
        "values": {a: list(v) for a, v in ATTRIBUTES.items()},
    }


def to_tensor(images: Sequence[Image.Image], resolution: int) -> torch.Tensor:
    """(N, 3, R, R) float tensor of `images` resized to R = `resolution` (PIL Lanczos, as the renderer downsamples),
    normalised to x / 127.5 - 1."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (resolution, resolution):
            image = image.resize((resolution, resolution), Image.Resampling.LANCZOS)
        arrays.append(np.asarray(image, dtype=np.uint8))
    if not arrays:
        return torch.zeros((0, 3, resolution, resolution))
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()
    return batch / 127.5 - 1.0


def _render_set(world: World, count: int, stream_seed: int, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Renders of scenes 0..count-1 of the stream `stream_seed` (uint8, N x 3 x R x R) and their labels (N x 4)."""
    pixels = np.empty((count, resolution, resolution, 3), dtype=np.uint8)
    labels = np.empty((count, len(ATTRIBUTES)), dtype=np.int64)
    for i in range(count):
        scene = world.scene(i, seed=stream_seed)
        pixels[i] = np.asarray(world.render(scene, size=resolution), dtype=np.uint8)
        attrs = scene.attributes()
        labels[i] = [values.index(attrs[a]) for a, values in ATTRIBUTES.items()]
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


@torch.no_grad()
def _accuracy(model: JudgeNet, pixels: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    model.eval()
    right = torch.zeros(len(labels), len(ATTRIBUTES), dtype=torch.bool)
    for start in range(0, len(labels), 256):
        logits = model(pixels[start : start + 256].float() / 127.5 - 1.0)
        for j, a in enumerate(ATTRIBUTES):
            right[start : start + 256, j] = logits[a].argmax(-1) == labels[start : start + 256, j]
    out = {a: float(right[:, j].float().mean()) for j, a in enumerate(ATTRIBUTES)}
    out["all"] = float(right.all(dim=1).float().mean())
    return out


def _read_cache(folder: Path, settings: dict[str, Any]) -> JudgeResult | None:
    path = folder / INFO_FILE
    if not path.is_file() or not (folder / WEIGHTS_FILE).is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("settings") != settings:
        return None
    return JudgeResult(folder, dict(info["heldout"]["accuracy"]), float(info["seconds"]), cached=True, info=info)


def train_judge(
    world: World,
    folder: str | Path,
    resolution: int = 32,
    train_scenes: int = 6000,
    steps: int = 400,
    seed: int = 0,
    heldout_scenes: int = 1000,
    log: Callable[[str], Any] = print,
) -> JudgeResult:
    """Train a judge on `train_scenes` renders at `resolution` px and measure it on `heldout_scenes` renders of
    another scene stream; save `judge.safetensors` and `judge.json` into `folder`.

    A `folder/judge.json` made with the same settings is returned as is (`cached=True`), without training.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if resolution < 8 or train_scenes < 1 or steps < 1 or heldout_scenes < 1:
        raise ConfigError(
            f"judge: resolution >= 8, train_scenes, steps and heldout_scenes >= 1 are needed; got resolution="
            f"{resolution}, train_scenes={train_scenes}, steps={steps}, heldout_scenes={heldout_scenes}"
        )
    settings = _settings(resolution, train_scenes, steps, seed, heldout_scenes)
    cached = _read_cache(folder, settings)
    if cached is not None:
        log(
            f"judge: {folder} already holds a judge with these settings ({_accuracy_line(cached.accuracy)}); reusing it"
        )
        return cached

    start = time.perf_counter()
    x_train, y_train = _render_set(world, train_scenes, settings["train_scene_seed"], resolution)
    x_held, y_held = _render_set(world, heldout_scenes, settings["heldout_scene_seed"], resolution)
    render_seconds = time.perf_counter() - start
    log(f"judge: rendered {train_scenes} training and {heldout_scenes} held-out scenes at {resolution} px "
        f"in {render_seconds:.1f}s")  # fmt: skip

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a net this small trains faster on one thread than on contended cores
    try:
        model, loss = _fit(x_train, y_train, resolution, steps, seed, log)
        accuracy = _accuracy(model, x_held, y_held)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    log(f"judge: held-out ({heldout_scenes} renders) {_accuracy_line(accuracy)}; {seconds:.1f}s")

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_FILE))
    info = {
        "what": "mpm demo t2i judge: a CNN reading colour, shape, size and position off a rendered scene",
        "resolution": resolution,
        "accuracy": accuracy,  # held-out, as in heldout.accuracy (mpm.demo.results reads it here)
        "architecture": settings["architecture"],
        "values": settings["values"],
        "heldout": {"scenes": heldout_scenes, "scene_seed": settings["heldout_scene_seed"], "accuracy": accuracy},
        "train": {"scenes": train_scenes, "scene_seed": settings["train_scene_seed"], "final_loss": loss.item()},
        "seconds": round(seconds, 2),
        "render_seconds": round(render_seconds, 2),
        "settings": settings,
    }
    atomic_write_json(folder / INFO_FILE, info)
    return JudgeResult(folder, accuracy, seconds, cached=False, info=info)


def _fit(
    x_train: torch.Tensor, y_train: torch.Tensor, resolution: int, steps: int, seed: int, log: Callable[[str], Any]
) -> tuple[JudgeNet, torch.Tensor]:
    """AdamW on the summed cross-entropies of the four heads, warmup then cosine decay."""
    train_scenes = len(y_train)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = JudgeNet(ATTRIBUTES, resolution)
    optimiser = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    model.train()
    order = torch.randperm(train_scenes, generator=generator)
    cursor = 0
    for step in range(steps):
        if cursor + BATCH_SIZE > train_scenes:
            order, cursor = torch.randperm(train_scenes, generator=generator), 0
        idx = order[cursor : cursor + BATCH_SIZE]
        cursor += BATCH_SIZE
        x = x_train[idx].float() / 127.5 - 1.0
        logits = model(x)
        loss = sum(nn.functional.cross_entropy(logits[a], y_train[idx, j]) for j, a in enumerate(ATTRIBUTES))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if (step + 1) % max(1, steps // 4) == 0 or step + 1 == steps:
            log(f"judge: step {step + 1}/{steps} loss {loss.item():.4f}")
    return model, loss.detach()


def _accuracy_line(accuracy: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items())


def load_judge(folder: str | Path) -> tuple[JudgeNet, dict[str, Any]]:
    """The judge saved in `folder` (eval mode) and its judge.json record; a ModelLoadError when there is none."""
    from safetensors.torch import load_file

    folder = Path(folder)
    info_path, weights_path = folder / INFO_FILE, folder / WEIGHTS_FILE
    if not info_path.is_file() or not weights_path.is_file():
        missing = info_path if not info_path.is_file() else weights_path
        raise ModelLoadError(f"{folder}: not a world judge folder ({missing.name} is missing): {WHAT_TO_DO}")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        arch = info["architecture"]
        model = JudgeNet(
            {a: tuple(v) for a, v in info["values"].items()},
            int(info["resolution"]),
            channels=tuple(arch["channels"]),
            grid=int(arch["grid"]),
            hidden=int(arch["hidden"]),
        )
        model.load_state_dict(load_file(str(weights_path)))
    except Exception as exc:  # unreadable json, missing keys, weights of another shape, a corrupt safetensors file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{folder}: the world judge cannot be loaded ({first}); {WHAT_TO_DO} again") from None
    model.eval()
    return model, info


@torch.no_grad()
def predict(judge: JudgeNet, images: Sequence[Image.Image], batch_size: int = 256) -> list[dict[str, str]]:
    """The judge's reading of each image ({colour, shape, size, position}); images of any size are resized to the
    judge's resolution."""
    judge.eval()
    out: list[dict[str, str]] = []
    for start in range(0, len(images), batch_size):
        logits = judge(to_tensor(images[start : start + batch_size], judge.resolution))
        picks = {a: logits[a].argmax(-1).tolist() for a in judge.values}
        for i in range(len(picks[next(iter(picks))])):
            out.append({a: judge.values[a][picks[a][i]] for a in judge.values})
    return out


@register_scorer
class WorldJudge(ImageJudge):
    """`--metric world_judge metric_options.world_judge.model=FOLDER`: share of images whose every attribute (and
    each attribute) the judge reads as the prompt's `colour`, `shape`, `size`, `position` fields say."""

    name = "world_judge"

    def __init__(self, model: str | Path | None = None, **options):
        if options:
            raise ConfigError(f"scorer {self.name!r} takes the option 'model' only, got {sorted(options)}")
        if model is None or not str(model).strip():
            raise ConfigError(
                f"scorer {self.name!r} needs the judge folder: metric_options.{self.name}.model=FOLDER ({WHAT_TO_DO})"
            )
        self.folder = Path(model)
        self.model, self.info = load_judge(self.folder)

    def score(self, images: list, items: list[dict], lang: str) -> Scores:
        if len(images) != len(items):
            raise ValueError(f"{self.name}: {len(images)} images for {len(items)} items")
        values = self.model.values
        for item in items:
            for a in values:
                value = item.get(a)
                if value is None:
                    raise DataError(
                        f"{self.name}: prompt {item.get('id')!r} ({lang}) has no {a!r} field; the world judge compares "
                        f"the image with the prompt's attributes, so every prompt line needs {', '.join(values)}"
                    )
                if value not in values[a]:
                    raise DataError(
                        f"{self.name}: prompt {item.get('id')!r} ({lang}) has {a}={value!r}, not one of {list(values[a])}"
                    )
        readings = predict(self.model, images)
        right = {a: [float(r[a] == item[a]) for r, item in zip(readings, items, strict=True)] for a in values}
        per_item = [float(all(right[a][i] for a in values)) for i in range(len(items))]
        n = max(len(items), 1)
        scores = {"world_all": sum(per_item) / n}
        scores.update({f"world_{a}": sum(v) / n for a, v in right.items()})
        details = {
            "judge": str(self.folder),
            "resolution": self.model.resolution,
            "judge_heldout_accuracy": self.info.get("heldout", {}).get("accuracy"),
            "judge_heldout_scenes": self.info.get("heldout", {}).get("scenes"),
            "images": len(items),
        }
        return Scores(scores, per_item=per_item, details=details)
