"""Scoring `mpm demo` outputs against the miniature world, and writing the demo's held-out evaluation set.

    world_attributes   a TextScorer for `mpm eval caption --metric world_attributes`: each output is parsed with the
                       requested language's lexicon (`World.parse`, strict: a word of another language names nothing)
                       and compared with the item's `colour`, `shape`, `size`, `position` fields. Values per language:
                       world_all (all four correct), world_colour, world_shape, world_size, world_position (each
                       attribute correct) and world_purity (mean `World.purity`: the share of the output's world words
                       that are in the language). Per item: 1.0 when all four are correct, else 0.0. An attribute counts
                       as correct when its FIRST mention is the right value (the rule of `mpm.demo.lm.oracle_accuracy`).
                       Option `world`: a folder of world files (default: the shipped configs/world).

    write_eval_set     the held-out set `mpm demo` evaluates on (its DIR/eval/), readable by `mpm eval caption`
                       (captions.jsonl + images/ + prompts.yaml) and `mpm eval paint` (paint_prompts.jsonl):

        images/{i:05d}.png      world.render(world.scene(i, seed)), i in range(n); seed = EVAL_SEED by default
        captions.jsonl          one line per (image, language):
                                {"image": "00000.png", "lang": "zh", "references": [caption in the language],
                                 "colour": "red", "shape": "circle", "size": "big", "position": "left"}
        prompts.yaml            {lang: "<ctx><image></ctx> " + world.instruction(lang)}: raw prompts (the image marker
                                inside, no chat template), the form the demo model was trained on
        paint_prompts.jsonl     parallel text-to-image prompts for the first `paint_prompts` scenes, one line per
                                (scene, language), the same id in every language:
                                {"id": "00000", "lang": "zh", "prompt": caption, "colour": ..., "shape": ...,
                                 "size": ..., "position": ...}
        eval_set.json           the manifest, written last: the settings the set was written with (a complete set
                                with the same settings is not written again)

    world = load_world(["en", "zh"])
    files = write_eval_set(world, ["en", "zh"], "out/demo/eval")
    # mpm eval caption --model M --data out/demo/eval/captions.jsonl --images out/demo/eval/images \
    #     --prompts out/demo/eval/prompts.yaml --langs en,zh --metric world_attributes -o out/demo/results
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import yaml

from mpm.core.errors import ConfigError, DataError
from mpm.demo.lm import image_prompt
from mpm.demo.world import ATTRIBUTES, DEFAULT_FOLDER, World, load_world
from mpm.eval.scorers import Scores, TextScorer, register_scorer

# The scene stream of the held-out set: `world.scene(i, EVAL_SEED)`. Training draws its scenes from other streams
# (mpm.demo.lm.TRAIN_SEED = 0 and generators seeded from it; the text oracle's seed 1234), so no evaluation image
# is ever a training render. The world has only 240 attribute combinations, so combinations do recur: what is held
# out is the render (jitter, size, tint, noise) and the caption template draw, not the combination.
EVAL_SEED = 7_919_131
MANIFEST = "eval_set.json"
EVAL_SET_VERSION = 2  # bump when the layout or content of a written set changes


def _world_languages(world: World) -> str:
    return ", ".join(world.languages) or "none"


@register_scorer
class WorldAttributes(TextScorer):
    """Attribute accuracy and language purity of outputs describing miniature-world scenes (see the module doc)."""

    name = "world_attributes"
    mean_of_items = True

    def __init__(self, world: str | Path | None = None):
        self.folder = Path(world) if world not in (None, "") else DEFAULT_FOLDER
        if not self.folder.is_dir():
            raise ConfigError(f"world_attributes: option world={str(self.folder)!r} is not a folder of world files")
        self.world = load_world(None, self.folder)  # every <lang>.yaml of the folder, once per scorer

    def check(self, items: list[dict], lang: str) -> None:
        if lang not in self.world.langs:
            raise ConfigError(
                f"world_attributes: {lang!r} is not a language of the world in {self.folder} (loaded: "
                f"{_world_languages(self.world)}); add {self.folder / (lang + '.yaml')} (configs/world/<lang>.yaml) "
                "to score it"
            )
        for item in items:
            for attr, values in ATTRIBUTES.items():
                if attr not in item:
                    raise DataError(
                        f"world_attributes: item {item.get('image', item.get('id'))!r} ({lang}) has no {attr!r} "
                        f"field; the data must come from `mpm demo`'s eval set (DIR/eval/captions.jsonl, which "
                        f"carries colour, shape, size and position)"
                    )
                if item[attr] not in values:
                    raise DataError(
                        f"world_attributes: item {item.get('image', item.get('id'))!r} ({lang}) has {attr}="
                        f"{item[attr]!r}, not one of {list(values)}; the data must come from `mpm demo`'s eval set"
                    )

    def score(self, items: list[dict], lang: str) -> Scores:
        self.check(items, lang)
        correct = {attr: 0 for attr in ATTRIBUTES}
        purity, per_item = 0.0, []
        for item in items:
            output = item.get("output") or ""
            parsed = self.world.parse(output, lang)
            ok = [parsed[attr] == item[attr] for attr in ATTRIBUTES]
            for attr, good in zip(ATTRIBUTES, ok, strict=True):
                correct[attr] += good
            per_item.append(1.0 if all(ok) else 0.0)
            purity += self.world.purity(output, lang)
        n = max(len(items), 1)
        values = {"world_all": sum(per_item) / n}
        values.update({f"world_{attr}": correct[attr] / n for attr in ATTRIBUTES})
        values["world_purity"] = purity / n
        details = {"world": str(self.folder), "languages": self.world.languages, "items": len(items),
                   "rule": "first mention of each attribute, parsed with the language's lexicon"}  # fmt: skip
        return Scores(values, per_item=per_item, details=details)


# ---- the held-out evaluation set ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSet:
    folder: Path
    images: Path  # images/{i:05d}.png
    captions: Path  # captions.jsonl
    prompts: Path  # prompts.yaml
    paint_prompts: Path  # paint_prompts.jsonl
    manifest: Path  # eval_set.json
    written: bool  # False: a complete set with the same settings was already there


def eval_prompt(world: World, lang: str) -> str:
    """The raw caption prompt of `lang`: the one the demo's i2t model is trained with (`lm.image_prompt`)."""
    return image_prompt(world, lang)


def _world_digest(world: World, langs: Sequence[str]) -> str:
    h = hashlib.sha256()
    for lang in langs:
        h.update(lang.encode() + b"\0" + Path(world.langs[lang].path).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _caption_rng(seed: int, index: int, lang: str) -> np.random.Generator:
    """The template draw of scene `index`'s caption in `lang`: independent of which other languages are written."""
    return np.random.default_rng([seed, index, *lang.encode("utf-8")])


def write_eval_set(
    world: World,
    langs: Sequence[str],
    folder: str | Path,
    n: int = 300,
    seed: int = EVAL_SEED,
    image_size: int = 64,
    paint_prompts: int = 50,
) -> EvalSet:
    """Write the held-out set of `n` one-object scenes in `langs` into `folder` (see the module doc for the files).
    Does nothing when `folder` already holds a complete set written with the same settings and world files."""
    langs = list(dict.fromkeys(langs))
    if not langs:
        raise ConfigError("write_eval_set: no language given")
    for lang in langs:
        if lang not in world.langs:
            raise ConfigError(f"write_eval_set: {lang!r} is not a loaded world language (loaded: "
                              f"{_world_languages(world)}); add configs/world/{lang}.yaml")  # fmt: skip
    if n < 1 or image_size < 8 or paint_prompts < 0:
        raise ConfigError(f"write_eval_set: need n >= 1, image_size >= 8, paint_prompts >= 0 (got {n}, {image_size}, "
                          f"{paint_prompts})")  # fmt: skip
    folder = Path(folder)
    files = EvalSet(folder, folder / "images", folder / "captions.jsonl", folder / "prompts.yaml",
                    folder / "paint_prompts.jsonl", folder / MANIFEST, True)  # fmt: skip
    settings = {"version": EVAL_SET_VERSION, "langs": langs, "n": n, "seed": seed, "image_size": image_size,
                "paint_prompts": min(paint_prompts, n), "world": _world_digest(world, langs)}  # fmt: skip
    if _complete(files, settings):
        return replace(files, written=False)

    files.manifest.unlink(missing_ok=True)  # an interrupted rewrite must not look complete
    files.images.mkdir(parents=True, exist_ok=True)
    wanted = {f"{i:05d}.png" for i in range(n)}
    for stale in files.images.glob("*.png"):
        if stale.name not in wanted:
            stale.unlink()
    captions, paint = [], []
    for i in range(n):
        scene = world.scene(i, seed)
        world.render(scene, size=image_size).save(files.images / f"{i:05d}.png")
        attributes = scene.attributes()
        for lang in langs:
            caption = world.caption(scene, lang, _caption_rng(seed, i, lang))
            captions.append({"image": f"{i:05d}.png", "lang": lang, "references": [caption], **attributes})
            if i < paint_prompts:
                paint.append({"id": f"{i:05d}", "lang": lang, "prompt": caption, **attributes})
    _write_jsonl(files.captions, captions)
    _write_jsonl(files.paint_prompts, paint)
    table = {lang: eval_prompt(world, lang) for lang in langs}
    files.prompts.write_text(yaml.safe_dump(table, allow_unicode=True, sort_keys=False), encoding="utf-8")
    files.manifest.write_text(json.dumps(settings, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return files


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _complete(files: EvalSet, settings: dict) -> bool:
    try:
        found = json.loads(files.manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if found != settings:
        return False
    if not all(p.is_file() for p in (files.captions, files.prompts, files.paint_prompts)):
        return False
    return all((files.images / f"{i:05d}.png").is_file() for i in range(settings["n"]))
