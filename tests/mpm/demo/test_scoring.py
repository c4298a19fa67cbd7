"""The `world_attributes` scorer and the demo's held-out eval set (mpm/demo/scoring.py): scores of right, wrong and
mixed-language captions, the registry, check() errors, the files write_eval_set writes, and `mpm eval caption`
scoring predictions against the set end to end (no model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mpm.core.config import parse_yaml
from mpm.core.errors import ConfigError, DataError, UserError
from mpm.demo.scoring import EVAL_SEED, MANIFEST, WorldAttributes, eval_prompt, write_eval_set
from mpm.demo.world import ATTRIBUTES, load_world

LANGS = ("en", "zh", "de")


@pytest.fixture(scope="module")
def world():
    return load_world()


@pytest.fixture(scope="module")
def scorer():
    return WorldAttributes()


def items_for(world, lang: str, n: int = 12, seed: int = 5, wrong: bool = False) -> list[dict]:
    """Items whose outputs are captions of their scene (or, with `wrong`, of another colour and shape)."""
    items = []
    for i in range(n):
        scene = world.scene(i, seed)
        attributes = scene.attributes()
        described = scene
        if wrong:
            obj = scene.objects[0]
            colours, shapes = ATTRIBUTES["colour"], ATTRIBUTES["shape"]
            other = type(obj)(
                colour=colours[(colours.index(obj.colour) + 1) % len(colours)],
                shape=shapes[(shapes.index(obj.shape) + 1) % len(shapes)],
                size=obj.size,
                position=obj.position,
            )
            described = type(scene)(objects=(other,), seed=scene.seed)
        output = world.caption(described, lang, np.random.default_rng(i))
        items.append({"image": f"{i:05d}.png", "lang": lang, "output": output, "references": [], **attributes})
    return items


@pytest.mark.parametrize("lang", LANGS)
def test_correct_captions_score_one_and_wrong_ones_zero(world, scorer, lang):
    right = scorer.score(items_for(world, lang), lang)
    assert right.values["world_all"] == 1.0 and right.per_item == [1.0] * 12
    for attr in ATTRIBUTES:
        assert right.values[f"world_{attr}"] == 1.0
    assert right.values["world_purity"] == 1.0
    assert right.details["world"].endswith("world") and lang in right.details["languages"]

    wrong = scorer.score(items_for(world, lang, wrong=True), lang)
    assert wrong.values["world_all"] == 0.0 and wrong.per_item == [0.0] * 12
    assert wrong.values["world_colour"] == 0.0 and wrong.values["world_shape"] == 0.0
    assert wrong.values["world_size"] == 1.0 and wrong.values["world_position"] == 1.0


def test_outputs_in_another_language_or_code_switched_score_lower(world, scorer):
    items = items_for(world, "en")
    # a German caption parsed with the English lexicon names nothing (strict parsing), and is not English
    german = [{**it, "output": world.caption(world.scene(i, 5), "de", np.random.default_rng(i))}
              for i, it in enumerate(items)]  # fmt: skip
    scores = scorer.score(german, "en")
    assert scores.values["world_purity"] < 0.5 and scores.values["world_all"] < 1.0
    # code-switched: English templates with Chinese attribute words
    mixed = [{**it, "output": world.caption(world.scene(i, 5), "en", np.random.default_rng(i), switch_to="zh", p=0.9)}
             for i, it in enumerate(items)]  # fmt: skip
    switched = scorer.score(mixed, "en")
    assert 0.0 < switched.values["world_purity"] < 1.0
    assert switched.values["world_purity"] < scorer.score(items, "en").values["world_purity"]
    assert scorer.score([{**items[0], "output": ""}], "en").values == {
        "world_all": 0.0, "world_colour": 0.0, "world_shape": 0.0, "world_size": 0.0, "world_position": 0.0,
        "world_purity": 0.0}  # fmt: skip


def test_registered_name_and_world_option(world, tmp_path):
    from mpm.eval.scorers import build_scorer

    scorer = build_scorer("world_attributes", "text")
    assert isinstance(scorer, WorldAttributes) and scorer.mean_of_items
    assert scorer.score(items_for(world, "zh", 3), "zh").values["world_all"] == 1.0
    # a world folder with English only: Chinese is not scorable
    folder = tmp_path / "world"
    folder.mkdir()
    (folder / "en.yaml").write_text(Path(world.langs["en"].path).read_text(encoding="utf-8"), encoding="utf-8")
    only_en = build_scorer("world_attributes", "text", world=str(folder))
    assert only_en.world.languages == ["en"]
    only_en.check(items_for(world, "en", 2), "en")
    with pytest.raises(ConfigError, match=r"'zh'.*loaded: en.*zh\.yaml"):
        only_en.check(items_for(world, "zh", 2), "zh")
    with pytest.raises(ConfigError, match="not a folder"):
        build_scorer("world_attributes", "text", world=str(tmp_path / "nowhere"))


def test_check_names_the_unknown_language_and_the_missing_field(world, scorer):
    with pytest.raises(UserError, match=r"'ko'.*loaded: de, en, es, fr, ja, zh.*ko\.yaml"):
        scorer.check([], "ko")
    items = items_for(world, "en", 3)
    del items[1]["size"]
    with pytest.raises(DataError, match=r"'00001\.png'.*'size'.*mpm demo"):
        scorer.check(items, "en")
    with pytest.raises(DataError, match=r"colour='pink'.*mpm demo"):
        scorer.check([{**items[0], "colour": "pink"}], "en")


def test_write_eval_set_files_formats_and_idempotence(world, tmp_path):
    from mpm.eval.data import read_captions
    from mpm.eval.languages import is_raw, prompt_table
    from mpm.eval.paint import read_parallel_prompts

    folder = tmp_path / "eval"
    files = write_eval_set(world, ["en", "zh"], folder, n=6, image_size=32, paint_prompts=2)
    assert files.written and files.folder == folder
    assert sorted(p.name for p in files.images.iterdir()) == [f"{i:05d}.png" for i in range(6)]
    with Image.open(files.images / "00003.png") as image:
        assert image.size == (32, 32) and image.mode == "RGB"
        assert np.array_equal(np.asarray(image), np.asarray(world.render(world.scene(3, EVAL_SEED), size=32)))

    lines = [json.loads(line) for line in files.captions.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 12 and {(r["image"], r["lang"]) for r in lines} == {
        (f"{i:05d}.png", lang) for i in range(6) for lang in ("en", "zh")}  # fmt: skip
    for row in lines:
        scene = world.scene(int(row["image"][:5]), EVAL_SEED)
        assert {k: row[k] for k in ATTRIBUTES} == scene.attributes()
        assert len(row["references"]) == 1
        parsed = world.parse(row["references"][0], row["lang"])
        assert {k: parsed[k] for k in ATTRIBUTES} == scene.attributes()
    assert "\\u" not in files.captions.read_text(encoding="utf-8")

    items = read_captions(files.captions, ["en", "zh"])
    assert len(items["en"]) == len(items["zh"]) == 6
    assert {k: items["zh"][2][k] for k in ATTRIBUTES} == world.scene(2, EVAL_SEED).attributes()

    prompts = parse_yaml(files.prompts.read_text(encoding="utf-8"))
    assert prompts == {"en": eval_prompt(world, "en"), "zh": eval_prompt(world, "zh")}
    assert prompts["zh"] == "<ctx><image> </ctx> " + world.instruction("zh")
    from mpm.demo.run import i2t_config

    trained = i2t_config(tmp_path, tmp_path, tmp_path, tmp_path, "zh", 10, 0, world)["data"]["caption_prompts"]
    assert trained == [prompts["zh"]]  # asked exactly as the i2t model was trained
    table = prompt_table(str(files.prompts))
    assert table["zh"] == prompts["zh"] and is_raw(table["en"])

    paint_rows = [json.loads(line) for line in files.paint_prompts.read_text(encoding="utf-8").splitlines()]
    assert [(r["id"], r["lang"]) for r in paint_rows] == [("00000", "en"), ("00000", "zh"), ("00001", "en"),
                                                         ("00001", "zh")]  # fmt: skip
    assert all({k: r[k] for k in ATTRIBUTES} == world.scene(int(r["id"]), EVAL_SEED).attributes() for r in paint_rows)
    assert len(read_parallel_prompts(files.paint_prompts)) == 4
    assert files.manifest == folder / MANIFEST
    manifest = json.loads(files.manifest.read_text(encoding="utf-8"))
    assert manifest["n"] == 6 and manifest["seed"] == EVAL_SEED and manifest["langs"] == ["en", "zh"]

    # the same settings: nothing is written again
    stamp = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    again = write_eval_set(world, ["en", "zh"], folder, n=6, image_size=32, paint_prompts=2)
    assert not again.written and again.captions == files.captions
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == stamp
    # an incomplete set (an image gone) or other settings: written again
    (files.images / "00004.png").unlink()
    assert write_eval_set(world, ["en", "zh"], folder, n=6, image_size=32, paint_prompts=2).written
    assert (files.images / "00004.png").is_file()
    assert write_eval_set(world, ["en", "zh"], folder, n=4, image_size=32, paint_prompts=2).written
    assert sorted(p.name for p in files.images.iterdir()) == [f"{i:05d}.png" for i in range(4)]
    assert len(files.captions.read_text(encoding="utf-8").splitlines()) == 8
    with pytest.raises(ConfigError, match="ko"):
        write_eval_set(world, ["ko"], tmp_path / "other", n=2)


def test_eval_caption_scores_predictions_on_the_eval_set(world, tmp_path, capsys):
    from mpm.cli import main

    files = write_eval_set(world, ["en", "zh"], tmp_path / "eval", n=8, image_size=32, paint_prompts=0)
    rows = [json.loads(line) for line in files.captions.read_text(encoding="utf-8").splitlines()]
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text("".join(json.dumps({"image": r["image"], "lang": r["lang"], "output": r["references"][0]},
                                              ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")  # fmt: skip
    out = tmp_path / "out"
    status = main(["eval", "caption", "--predictions", str(predictions), "--data", str(files.captions),
                   "--images", str(files.images), "--prompts", str(files.prompts), "--langs", "en,zh",
                   "--metric", "world_attributes", "--output", str(out)])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["metrics"] == ["world_attributes"]
    for lang in ("en", "zh"):
        summary = results["languages"][lang]
        assert summary["items"] == 8
        assert summary["world_all"] == 1.0 and summary["world_purity"] == 1.0
        assert results["prompts"][lang] == eval_prompt(world, lang)
    items = [json.loads(line) for line in (out / "items.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(items) == 16 and all(item["world_attributes"] == 1.0 for item in items)
    assert all(item["colour"] in ATTRIBUTES["colour"] for item in items)
