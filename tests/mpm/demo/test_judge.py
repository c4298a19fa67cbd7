"""The t2i judge of `mpm demo`: training, held-out accuracy, caching, loading, prediction and the `world_judge` scorer."""

from __future__ import annotations

import json

import pytest

from mpm.core.errors import ConfigError, DataError, ModelLoadError, UserError
from mpm.demo.judge import INFO_FILE, WEIGHTS_FILE, WorldJudge, load_judge, predict, train_judge
from mpm.demo.world import ATTRIBUTES, Scene, SceneObject, load_world
from mpm.eval.scorers import build_scorer

HELDOUT_SEED = 12_345  # a scene stream neither training nor the judge's own held-out set uses


@pytest.fixture(scope="module")
def world():
    return load_world(["en"])


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """A judge trained with the default settings (32 px, 6000 scenes): about 10 s on 2 CPU cores."""
    folder = tmp_path_factory.mktemp("judge")
    lines: list[str] = []
    result = train_judge(world, folder, log=lines.append)
    return folder, result, lines


def test_training_writes_files_and_reaches_the_gate(trained):
    folder, result, lines = trained
    assert (folder / WEIGHTS_FILE).is_file() and (folder / INFO_FILE).is_file()
    assert not result.cached
    assert set(result.accuracy) == {*ATTRIBUTES, "all"}
    assert result.accuracy["all"] >= 0.95, result.accuracy
    info = json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))
    assert info["resolution"] == 32
    assert info["heldout"]["accuracy"] == info["accuracy"] == result.accuracy
    assert info["heldout"]["scene_seed"] != info["train"]["scene_seed"]
    assert info["values"] == {a: list(v) for a, v in ATTRIBUTES.items()}
    assert info["seconds"] > 0 and info["architecture"]["channels"]
    assert any("held-out" in line for line in lines)


def test_second_call_is_cached_and_other_settings_retrain(world, trained, tmp_path):
    folder, result, _ = trained
    lines: list[str] = []
    again = train_judge(world, folder, log=lines.append)
    assert again.cached and again.accuracy == result.accuracy
    assert len(lines) == 1 and "reusing" in lines[0]
    # a different setting is not a cache hit (a small run in another folder, so the module judge stays)
    small = tmp_path / "small"
    first = train_judge(world, small, train_scenes=64, steps=2, heldout_scenes=16, log=lambda _: None)
    assert not first.cached
    other = train_judge(world, small, train_scenes=64, steps=3, heldout_scenes=16, log=lambda _: None)
    assert not other.cached


def test_works_at_64_px(world, tmp_path):
    result = train_judge(
        world, tmp_path, resolution=64, train_scenes=64, steps=2, heldout_scenes=16, log=lambda _: None
    )
    model, info = load_judge(tmp_path)
    assert info["resolution"] == 64 and model.resolution == 64
    images = [world.render(world.scene(i, seed=HELDOUT_SEED), size=64) for i in range(3)]
    assert len(predict(model, images)) == 3 and result.accuracy.keys() >= {"all"}


def test_load_round_trip_and_predictions(world, trained):
    folder, _, _ = trained
    model, info = load_judge(folder)
    assert not model.training
    scenes = [world.scene(i, seed=HELDOUT_SEED) for i in range(60)]
    images = [world.render(s, size=32) for s in scenes]
    first = predict(model, images)
    again = predict(load_judge(folder)[0], images)
    assert first == again
    right = sum(p == s.attributes() for p, s in zip(first, scenes, strict=True))
    assert right >= 56, right
    # images of other sizes are resized to the judge's resolution
    big = predict(model, [world.render(s, size=64) for s in scenes[:20]])
    assert sum(p == s.attributes() for p, s in zip(big, scenes[:20], strict=True)) >= 18


def test_predict_known_scenes(world, trained):
    model, _ = load_judge(trained[0])
    objects = [
        SceneObject("red", "circle", "big", "left"),
        SceneObject("blue", "square", "small", "right"),
        SceneObject("yellow", "triangle", "big", "top"),
        SceneObject("green", "cross", "big", "bottom"),
        SceneObject("purple", "star", "big", "right"),
        SceneObject("orange", "circle", "small", "top"),
    ]
    images = [world.render(Scene((o,), seed=3 + i), size=32) for i, o in enumerate(objects)]
    assert predict(model, images) == [o.attributes() for o in objects]


def _items(scenes, lang="en"):
    return [{"id": str(i), "lang": lang, "prompt": "p", **s.attributes()} for i, s in enumerate(scenes)]


def test_world_judge_scores_right_and_wrong_images(world, trained):
    import mpm.demo.judge  # noqa: F401  (registers world_judge)

    judge = build_scorer("world_judge", "image", model=str(trained[0]))
    assert isinstance(judge, WorldJudge)
    scenes = [world.scene(i, seed=HELDOUT_SEED) for i in range(20)]
    # scenes of another stream whose attributes differ in at least one attribute from the prompt's
    pool = [world.scene(i, seed=HELDOUT_SEED + 1) for i in range(200)]
    wrong = [next(o for o in pool if o.attributes() != s.attributes()) for s in scenes]
    right_scores = judge.score([world.render(s, size=32) for s in scenes], _items(scenes), "en")
    assert set(right_scores.values) == {"world_all", "world_colour", "world_shape", "world_size", "world_position"}
    assert right_scores.values["world_all"] >= 0.95
    assert len(right_scores.per_item) == 20 and set(right_scores.per_item) <= {0.0, 1.0}
    assert right_scores.details["judge_heldout_accuracy"]["all"] >= 0.95
    wrong_scores = judge.score([world.render(s, size=64) for s in wrong], _items(scenes), "en")
    assert wrong_scores.values["world_all"] <= 0.1
    assert sum(wrong_scores.per_item) <= 2


def test_world_judge_errors(world, trained, tmp_path):
    import mpm.demo.judge  # noqa: F401

    with pytest.raises(ConfigError, match="model"):
        build_scorer("world_judge", "image")
    with pytest.raises(ConfigError, match="only"):
        build_scorer("world_judge", "image", model=str(trained[0]), extra=1)
    missing = tmp_path / "nothing"
    with pytest.raises(ModelLoadError, match="mpm demo judge") as info:
        build_scorer("world_judge", "image", model=str(missing))
    assert str(missing) in str(info.value)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / INFO_FILE).write_text("{not json", encoding="utf-8")
    (corrupt / WEIGHTS_FILE).write_bytes(b"garbage")
    with pytest.raises(UserError, match="mpm demo judge") as info:
        load_judge(corrupt)
    assert str(corrupt) in str(info.value)

    judge = build_scorer("world_judge", "image", model=str(trained[0]))
    scene = world.scene(0, seed=HELDOUT_SEED)
    item = {"id": "p7", "lang": "en", "prompt": "a red circle", **scene.attributes()}
    del item["size"]
    with pytest.raises(DataError, match=r"'p7'.*'size'"):
        judge.score([world.render(scene, size=32)], [item], "en")
    with pytest.raises(DataError, match="pink"):
        judge.score([world.render(scene, size=32)], [{**scene.attributes(), "id": "p8", "colour": "pink"}], "en")
