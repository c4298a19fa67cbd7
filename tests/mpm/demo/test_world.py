"""The miniature world: language files, captions, the strict parser, code-switching and the renderer."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest

from mpm.core.errors import ConfigError
from mpm.demo.world import ATTRIBUTES, DEFAULT_FOLDER, Scene, SceneObject, load_world, segmentation_words

LANGS = ["de", "en", "es", "fr", "ja", "zh"]
KEYS = tuple(ATTRIBUTES)


@pytest.fixture(scope="module")
def world():
    return load_world()


def attrs(parsed: dict) -> dict:
    return {k: parsed[k] for k in KEYS}


def one(colour="red", shape="circle", size="small", position="left", seed=0) -> Scene:
    return Scene((SceneObject(colour=colour, shape=shape, size=size, position=position),), seed=seed)


def test_every_language_file_loads(world):
    assert sorted(world.languages) == LANGS
    for lang in LANGS:
        assert len(world.langs[lang].templates) >= 2
        assert world.instruction(lang)
    assert world.instruction("zh") == "用中文描述:"
    assert world.instruction("de") == "Beschreibe auf Deutsch:"
    assert world.instruction("en") == "Describe in English:"


@pytest.mark.parametrize("lang", LANGS)
def test_round_trip_every_template(world, lang):
    rng = random.Random(lang)
    for index in range(500):
        scene = world.scene(index, seed=1)
        for t in range(len(world.langs[lang].templates)):
            text = world.caption(scene, lang, rng, template=t)
            parsed = world.parse(text, lang)
            assert attrs(parsed) == scene.attributes(), (text, parsed)
            assert parsed["conflicts"] == []
            assert world.purity(text, lang) == 1.0, text


def test_all_attribute_combinations_round_trip(world):
    for lang in LANGS:
        for c in ATTRIBUTES["colour"]:
            for s in ATTRIBUTES["shape"]:
                for z in ATTRIBUTES["size"]:
                    for p in ATTRIBUTES["position"]:
                        scene = one(c, s, z, p)
                        for t in range(len(world.langs[lang].templates)):
                            text = world.caption(scene, lang, template=t)
                            assert attrs(world.parse(text, lang)) == scene.attributes(), text


@pytest.mark.parametrize(
    ("lang", "scene", "template", "text"),
    [
        ("de", one("red", "circle", "small", "left"), 0, "ein kleiner roter Kreis links"),
        ("de", one("red", "cross", "small", "top"), 0, "ein kleines rotes Kreuz oben"),
        ("de", one("red", "circle", "small", "left"), 1, "der kleine rote Kreis ist links"),
        ("de", one("blue", "square", "big", "right"), 1, "das große blaue Quadrat ist rechts"),
        ("fr", one("red", "circle", "small", "left"), 0, "un petit cercle rouge à gauche"),
        ("fr", one("red", "star", "small", "top"), 0, "une petite étoile rouge en haut"),
        ("fr", one("green", "cross", "big", "bottom"), 1, "il y a une grande croix verte en bas"),
        ("es", one("red", "circle", "small", "left"), 0, "un círculo rojo pequeño a la izquierda"),
        ("es", one("red", "star", "small", "top"), 0, "una estrella roja pequeña arriba"),
        ("ja", one("red", "circle", "small", "left"), 0, "左に小さい赤い円がある"),
        ("zh", one("red", "circle", "small", "left"), 0, "左边有一个小的红色圆形"),
        ("zh", one("red", "circle", "small", "left"), 1, "一个小的红色圆形在左边"),
        ("en", one("yellow", "cross", "small", "top"), 1, "there is a small yellow cross at the top"),
    ],
)
def test_agreement_examples(world, lang, scene, template, text):
    assert world.caption(scene, lang, template=template) == text
    assert attrs(world.parse(text, lang)) == scene.attributes()


@pytest.mark.parametrize(
    ("lang", "text", "expected"),
    [
        ("de", "eine kleine rote Scheibe", {"colour": "red", "size": "small", "shape": None, "position": None}),
        ("de", "GROSSES Quadrat rechts", {"colour": None, "size": "big", "shape": "square", "position": "right"}),
        ("fr", "une petite étoile violette", {"colour": "purple", "size": "small", "shape": "star", "position": None}),
        ("es", "estrella morada grande", {"colour": "purple", "size": "big", "shape": "star", "position": None}),
        ("en", "a bluegreen thing", {"colour": None, "size": None, "shape": None, "position": None}),
    ],
)
def test_parser_agreement_forms_and_missing(world, lang, text, expected):
    # matching is case-insensitive (casefold: "GROSSES" is "großes")
    assert attrs(world.parse(text, lang)) == expected


def test_parser_flags_conflicts_and_ignores_other_languages(world):
    parsed = world.parse("a red circle, no, a blue circle on the left", "en")
    assert parsed["colour"] == "red" and parsed["conflicts"] == ["colour"]
    assert parsed["mentions"]["colour"] == ["red", "blue"]
    assert attrs(world.parse("左边有一个小的红色圆形", "en")) == dict.fromkeys(KEYS)
    # a word of another script is not a whole word of a space-separated language
    assert world.parse("redundant starling", "en")["colour"] is None


def test_code_switching_parses_with_union_lexicon(world):
    rng = np.random.default_rng(0)
    switched_any = 0
    for base in LANGS:
        for other in LANGS:
            if other == base:
                continue
            for index in range(40):
                scene = world.scene(index, seed=7)
                text = world.caption(scene, base, rng, switch_to=other, p=0.4)
                assert attrs(world.parse(text, None)) == scene.attributes(), (base, other, text)
                assert attrs(world.parse(text, [base, other])) == scene.attributes(), (base, other, text)
                pure = world.caption(scene, base, rng, template=0)
                if world.purity(text, base) < 1.0:
                    switched_any += 1
                assert world.purity(pure, base) == 1.0
    assert switched_any > 200
    scene = one("yellow", "cross", "small", "top")
    fully = world.caption(scene, "en", template=0, switch_to="zh", p=1.0)
    assert fully == "a 小的 黄色 十字形 上边"
    assert world.purity(fully, "en") == pytest.approx(1 / 5)
    assert attrs(world.parse(fully, ["en", "zh"])) == scene.attributes()
    # switching into a gendered language uses that language's agreement for the shape's noun
    de = world.caption(one("red", "cross", "small", "top"), "en", template=0, switch_to="de", p=1.0)
    assert de == "a kleines rotes Kreuz oben"


def test_segmentation_words(world):
    zh = segmentation_words("zh")
    for w in ["有", "一个", "在", "红色", "圆形", "左边", "小的"]:
        assert w in zh
    assert len(zh) == len(set(zh)) and all(zh)
    assert "\x00" not in world.segmentation_words("de") and "ist" in world.segmentation_words("de")
    assert {"がある", "小さい", "オレンジの"} <= set(world.segmentation_words("ja"))


def test_multi_object_scenes(world):
    rng = random.Random(3)
    for index in range(50):
        scene = world.scene(index, seed=2, objects=3)
        assert len({o.position for o in scene.objects}) == 3
        for lang in LANGS:
            text = world.caption(scene, lang, rng)
            mentions = world.parse(text, lang)["mentions"]
            for key in KEYS:
                assert mentions[key] == [getattr(o, key) for o in scene.objects], (lang, text)
    with pytest.raises(ValueError):
        world.sample_scene(rng, objects=5)


def test_render_deterministic_and_sized(world):
    scene = world.scene(3, seed=0)
    a, b = world.render(scene), world.render(scene)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert world.render(scene, size=32).size == (32, 32)
    assert world.scene(3, seed=0) == scene and world.scene(4, seed=0) != scene
    assert not np.array_equal(np.asarray(a), np.asarray(world.render(world.scene(4, seed=0))))


def _object_mask(img) -> np.ndarray:
    arr = np.asarray(img, dtype=np.float32)
    saturation = arr.max(axis=2) - arr.min(axis=2)
    return saturation > 60


def test_render_attributes_are_visible(world):
    for seed in range(5):
        red = np.asarray(world.render(one("red", seed=seed)), dtype=np.float32)
        blue = np.asarray(world.render(one("blue", seed=seed)), dtype=np.float32)
        m = _object_mask(world.render(one("red", seed=seed)))
        assert m.sum() > 20
        assert red[m, 0].mean() > red[m, 2].mean() + 80
        mb = _object_mask(world.render(one("blue", seed=seed)))
        assert blue[mb, 2].mean() > blue[mb, 0].mean() + 80
        left = _object_mask(world.render(one(position="left", seed=seed)))
        right = _object_mask(world.render(one(position="right", seed=seed)))
        top = _object_mask(world.render(one(position="top", seed=seed)))
        bottom = _object_mask(world.render(one(position="bottom", seed=seed)))
        assert np.nonzero(left)[1].mean() + 15 < np.nonzero(right)[1].mean()
        assert np.nonzero(top)[0].mean() + 15 < np.nonzero(bottom)[0].mean()
        big = _object_mask(world.render(one(size="big", seed=seed))).sum()
        small = _object_mask(world.render(one(size="small", seed=seed))).sum()
        assert big > 2 * small
    masks = {s: _object_mask(world.render(one(shape=s, size="big"))) for s in ATTRIBUTES["shape"]}
    shapes = list(masks)
    for i, s in enumerate(shapes):
        for t in shapes[i + 1 :]:
            assert (masks[s] != masks[t]).sum() > 30, (s, t)


def test_adding_a_language_is_only_a_file(tmp_path):
    shutil.copy(DEFAULT_FOLDER / "en.yaml", tmp_path / "en.yaml")
    text = (DEFAULT_FOLDER / "es.yaml").read_text(encoding="utf-8")
    swaps = {
        "language: es": "language: xx",
        "Describe en español:": "Deskribu en xx:",
        "círculo": "cirklo",
        "estrella": "stelo",
        "rojo": "ruĝo",
        "roja": "ruĝa",
        "verde": "verdo",
        "azul": "bluo",
        "amarillo": "flavo",
        "amarilla": "flava",
        "morado": "violo",
        "morada": "viola",
        "naranja": "oranĝo",
        "grande": "granda",
        "pequeño": "malgrando",
        "pequeña": "malgranda",
        "cuadrado": "kvadrato",
        "triángulo": "triangulo",
        "cruz": "kruco",
        "a la izquierda": "maldekstre",
        "a la derecha": "dekstre",
        "arriba": "supre",
        "abajo": "malsupre",
        "hay ": "estas ",
    }
    for old, new in swaps.items():
        assert old in text, old
        text = text.replace(old, new)
    (tmp_path / "xx.yaml").write_text(text, encoding="utf-8")
    world = load_world(folder=tmp_path)
    assert sorted(world.languages) == ["en", "xx"]
    assert world.instruction("xx") == "Deskribu en xx:"
    scene = one("red", "star", "small", "top")
    assert world.caption(scene, "xx", template=0) == "una stelo ruĝa malgranda supre"
    rng = random.Random(0)
    for index in range(100):
        scene = world.scene(index)
        text = world.caption(scene, "xx", rng)
        assert attrs(world.parse(text, "xx")) == scene.attributes()
        mixed = world.caption(scene, "en", rng, switch_to="xx")
        assert attrs(world.parse(mixed, None)) == scene.attributes()


def _broken(tmp_path, source: str, old: str, new: str):
    text = (DEFAULT_FOLDER / f"{source}.yaml").read_text(encoding="utf-8")
    assert old in text
    (tmp_path / f"{source}.yaml").write_text(text.replace(old, new, 1), encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize(
    ("source", "old", "new", "message"),
    [
        ("en", "red: red, ", "", "colour.red"),
        ("de", "{word: Kreis, gender: m}", "{word: Kreis, gender: x}", "shape.circle.gender"),
        ("de", "{m: roter, f: rote, n: rotes, def: rote}", "{m: roter, f: rote, n: rotes}", "colour.red"),
        ("fr", "{m: vert, f: verte}", "{m: vert}", "colour.green"),
        ("en", '"{article} {size} {colour} {shape} {position}"', '"{article} {size} {hue} {shape}"', "{hue}"),
        ("es", "instruction:", "instructions:", "instruction"),
        ("zh", "language: zh", "language: ko", "language"),
        ("fr", "red: rouge", "red: vert", "colour.red"),
    ],
)
def test_broken_file_names_the_key(tmp_path, source, old, new, message):
    folder = _broken(tmp_path, source, old, new)
    with pytest.raises(ConfigError) as info:
        load_world(folder=folder)
    assert message in str(info.value)
    assert f"{source}.yaml" in str(info.value)
    assert "templates[0]" in str(info.value) or message != "{hue}"


def test_unknown_language(world):
    with pytest.raises(ConfigError, match="unknown world language"):
        world.caption(one(), "ko")


def test_template_must_name_every_attribute(tmp_path):
    folder = _broken(tmp_path, "en", '"{article} {size} {colour} {shape} {position}"', '"{article} {colour} {shape}"')
    with pytest.raises(ConfigError, match=r"templates\[0\]\.object.*size"):
        load_world(folder=folder)


def test_a_word_with_two_meanings_across_languages_is_refused(tmp_path):
    shutil.copy(DEFAULT_FOLDER / "en.yaml", tmp_path / "en.yaml")
    text = (DEFAULT_FOLDER / "es.yaml").read_text(encoding="utf-8").replace("language: es", "language: xx")
    (tmp_path / "xx.yaml").write_text(text.replace("azul", "red"), encoding="utf-8")  # "red" meaning blue
    with pytest.raises(ConfigError, match=r"xx\.yaml.*'red'.*colour=blue.*colour=red|en\.yaml.*'red'"):
        load_world(folder=tmp_path)


def test_lexicon_purity_alias(world):
    assert world.lexicon_purity("a small red circle on the left", "en") == 1.0
    assert world.lexicon_purity("a small red circle on the left", "zh") == 0.0
    assert world.lexicon_purity("nothing here", "en") == 0.0
