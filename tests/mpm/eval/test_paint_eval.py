"""`mpm eval paint`'s library function on a tiny pixel-space MPMPaintPipeline (Qwen2 LLM, the UNet of
configs/t2i/unet_tiny_32px.json) and a tiny random CLIP as scorer and feature model; the Fréchet distance against
numpy; a DINOv2 feature model; a custom image judge loaded by its import path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    BitImageProcessor,
    Dinov2Config,
    Dinov2Model,
    Qwen2ForCausalLM,
)

from mpm.core.errors import ConfigError, DataError
from mpm.eval.paint import evaluate_paint, frechet_distance, image_features, read_parallel_prompts
from mpm.eval.scorers import ImageJudge, Scores, scorer_class
from t2i import MPMPaintPipeline
from t2i.paint import Prompt
from t2i.scoring import ImageTextScorer
from tests.mpm.conftest import make_tokenizer, text_config
from tests.t2i.test_scoring import save_tiny_clip

UNET_CONFIG = "configs/t2i/unet_tiny_32px.json"
SIZE, STEPS = 16, 2
PROMPTS = [  # two parallel prompts in English and Chinese, and a Chinese one with no English line
    Prompt("0", "A red circle on a white table", "en"),
    Prompt("0", "白色桌子上的红色圆圈", "zh"),
    Prompt("1", "A blue square and a green square", "en"),
    Prompt("1", "一个蓝色方块和一个绿色方块", "zh"),
    Prompt("2", "一只红色的猫坐在垫子上", "zh"),
    Prompt("0", "Ein roter Kreis auf einem weißen Tisch", "de"),  # not asked for: ignored
]


class MeanBrightness(ImageJudge):
    """A judge as a user would write one: the mean pixel value of each image, in [0, 1]."""

    name = "brightness"
    calls: list[tuple[str, list[dict]]] = []

    def score(self, images, items, lang):
        MeanBrightness.calls.append((lang, items))
        values = [float(np.asarray(im, dtype=np.float64).mean() / 255) for im in images]
        return Scores({"brightness": float(np.mean(values))}, per_item=values, details={"images": len(values)})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: one thread is faster, and several spin-wait badly on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> MPMPaintPipeline:
    """A pixel-space pipeline: a tiny Qwen2 LLM (64 wide, random) and the tiny UNet config's random weights."""
    llm = tmp_path_factory.mktemp("llm")
    tok = make_tokenizer()
    torch.manual_seed(0)
    config = text_config("qwen2", len(tok))
    config.hidden_size, config.intermediate_size = 64, 128
    Qwen2ForCausalLM(config).save_pretrained(llm)
    tok.save_pretrained(llm)
    pipe = MPMPaintPipeline.from_parts(llm, unet=UNET_CONFIG)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> Path:
    """Three reference images (smooth random colour fields), one in a subfolder."""
    folder = tmp_path_factory.mktemp("refs")
    (folder / "more").mkdir()
    for i, name in enumerate(["a.png", "b.jpg", "more/c.png"]):
        field = np.random.default_rng(i).integers(0, 256, (4, 4, 3)).astype(np.uint8)
        Image.fromarray(field).resize((24, 24), Image.Resampling.BICUBIC).save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    return folder


def load(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def run(pipe, out, clip_folder=None, **kwargs):
    settings = {"langs": "en,zh", "num_images": 2, "steps": STEPS, "height": SIZE, "width": SIZE, "seed": 3,
                "show_progress": False, "scorer_path": str(clip_folder) if clip_folder else None}  # fmt: skip
    return evaluate_paint(pipe, PROMPTS, out_dir=out, **{**settings, **kwargs})


@pytest.fixture(scope="module")
def evaluated(pipe, clip_folder, references, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    judge = scorer_class("tests.mpm.eval.test_paint_eval:MeanBrightness", kind="image")()
    results, rows = run(pipe, out, clip_folder, feature_model=str(clip_folder), reference_images=references,
                        judges=[judge])  # fmt: skip
    return results, rows, out


# -- the Fréchet distance ------------------------------------------------------------------------------------------------
def test_frechet_distance_by_hand_and_against_numpy():
    # 1-D: a = {0, 2}: mean 1, variance 2; b = {3, 7}: mean 5, variance 8.
    # d^2 = (5 - 1)^2 + 2 + 8 - 2 sqrt(2 * 8) = 16 + 10 - 8 = 18
    assert frechet_distance(np.array([[0.0], [2.0]]), np.array([[3.0], [7.0]])) == pytest.approx(18.0)
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, (400, 3))
    b = rng.normal(0.5, 2.0, (300, 3)) @ np.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.2], [0.0, 0.0, 1.0]])
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # Tr sqrt(S_a S_b) = sum of sqrt(eigenvalues of S_a^(1/2) S_b S_a^(1/2)), a symmetric PSD matrix
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = v @ np.diag(np.sqrt(w)) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)  # symmetric


def test_frechet_distance_few_samples_is_noted_and_needs_two():
    rng = np.random.default_rng(1)
    notes: list[str] = []
    value = frechet_distance(rng.normal(size=(3, 8)), rng.normal(size=(4, 8)), notes=notes)
    assert np.isfinite(value) and value > 0
    assert any("singular" in note and "3 and 4 images for 8-dimensional" in note for note in notes)
    with pytest.raises(ValueError, match="at least 2 feature vectors per set"):
        frechet_distance(rng.normal(size=(1, 4)), rng.normal(size=(5, 4)))
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(rng.normal(size=(3, 4)), rng.normal(size=(3, 5)))


def test_dinov2_features_are_the_cls_pooler_output(tmp_path, references):
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          image_size=32, patch_size=8)  # fmt: skip
    torch.manual_seed(0)
    model = Dinov2Model(config).eval()
    model.save_pretrained(tmp_path)
    processor = BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path)
    paths = sorted(references.rglob("*.png"))
    features = image_features(str(tmp_path), paths, batch_size=1)
    assert features.shape == (2, 32) and features.dtype == np.float64
    with torch.no_grad():
        pixels = processor(images=[load(p) for p in paths], return_tensors="pt").pixel_values
        expected = model(pixel_values=pixels).pooler_output
    np.testing.assert_allclose(features, expected.double().numpy(), rtol=1e-4, atol=1e-5)


# -- end to end ----------------------------------------------------------------------------------------------------------
def test_aggregates_are_the_means_of_the_rows(evaluated):
    results, rows, out = evaluated
    assert results["task"] == "paint" and list(results["languages"]) == ["en", "zh"]
    assert [(r["lang"], r["id"], r["index"]) for r in rows] == [
        ("en", "0", 0), ("en", "0", 1), ("en", "1", 0), ("en", "1", 1),
        ("zh", "0", 0), ("zh", "0", 1), ("zh", "1", 0), ("zh", "1", 1), ("zh", "2", 0), ("zh", "2", 1),
    ]  # fmt: skip
    for row in rows:
        assert load(out / row["image"]).size == (SIZE, SIZE)
        assert row["image"] == f"images/{row['lang']}/{row['id']}-{row['index']}.png"
    for lang, metrics in results["languages"].items():
        mine = [r for r in rows if r["lang"] == lang]
        assert metrics["images"] == len(mine) and metrics["prompts"] == len(mine) // 2
        for name in ("clip_score", "clip_score_en", "consistency", "brightness"):
            values = [r[name] for r in mine if r[name] is not None]
            if values:
                assert metrics[name] == pytest.approx(np.mean(values), rel=1e-6), (lang, name)
            else:
                assert name not in metrics
    en, zh = results["languages"]["en"], results["languages"]["zh"]
    assert "consistency" not in en and -1 <= zh["consistency"] <= 1
    assert en["clip_score_en"] == pytest.approx(en["clip_score"])  # the same prompts
    for name, ratio in results["transfer_ratio"]["zh"].items():
        assert ratio == pytest.approx(zh[name] / en[name]), name
    assert set(results["transfer_ratio"]["zh"]) == {"clip_score", "clip_score_en", "frechet", "brightness"}
    assert results["settings"]["num_images"] == 2 and results["settings"]["steps"] == STEPS
    assert results["settings"]["reference_count"] == 3 and results["settings"]["consistency_from"] == "scorer"


def test_scores_match_the_scorer_called_directly(evaluated, clip_folder):
    results, rows, out = evaluated
    scorer = ImageTextScorer(str(clip_folder))
    english = {p.id: p.prompt for p in PROMPTS if p.lang == "en"}
    zh = [r for r in rows if r["lang"] == "zh" and r["id"] in english]
    images = [load(out / r["image"]) for r in zh]
    direct = scorer.score(images, [english[r["id"]] for r in zh])
    np.testing.assert_allclose([r["clip_score_en"] for r in zh], direct.numpy(), rtol=1e-5, atol=1e-6)
    own = scorer.score(images, [r["prompt"] for r in zh])
    np.testing.assert_allclose([r["clip_score"] for r in zh], own.numpy(), rtol=1e-5, atol=1e-6)
    # consistency: the zh image against the English image of the same id and index (the same seed)
    en_images = [load(out / f"images/en/{r['id']}-{r['index']}.png") for r in zh]
    cosine = (scorer.encode_images(images) * scorer.encode_images(en_images)).sum(-1)
    np.testing.assert_allclose([r["consistency"] for r in zh], cosine.numpy(), rtol=1e-5, atol=1e-6)


def test_frechet_is_the_feature_models_distance_to_the_references(evaluated, clip_folder, references):
    results, rows, out = evaluated
    reference_files = sorted([references / "a.png", references / "b.jpg", references / "more" / "c.png"])
    reference = image_features(str(clip_folder), reference_files)
    for lang in ("en", "zh"):
        generated = image_features(str(clip_folder), [out / r["image"] for r in rows if r["lang"] == lang])
        assert results["languages"][lang]["frechet"] == pytest.approx(frechet_distance(generated, reference), rel=1e-6)
    assert any("frechet" in note and "singular" in note for note in results["notes"])  # 4-6 images, 16 dimensions


def test_missing_english_prompts_are_counted_and_listed(evaluated):
    results, rows, _ = evaluated
    assert results["missing_en"] == {"zh": ["2"]}
    assert results["languages"]["zh"]["missing_en"] == 1 and results["languages"]["en"]["missing_en"] == 0
    for row in rows:
        if row["id"] == "2":
            assert row["clip_score_en"] is None and row["consistency"] is None and row["clip_score"] is not None


def test_a_custom_judge_receives_each_languages_images_and_prompts(evaluated):
    results, rows, _ = evaluated
    (en_lang, en_items), (zh_lang, zh_items) = MeanBrightness.calls[-2:]
    assert (en_lang, zh_lang) == ("en", "zh") and len(en_items) == 4 and len(zh_items) == 6
    assert (
        zh_items[0]["prompt"] == "白色桌子上的红色圆圈" and zh_items[0]["prompt_en"] == "A red circle on a white table"
    )
    assert "prompt_en" not in zh_items[-1]  # id 2 has no English prompt
    assert all(0 <= r["brightness"] <= 1 for r in rows)
    assert results["judges"]["brightness"]["class"] == "tests.mpm.eval.test_paint_eval:MeanBrightness"
    assert results["judges"]["brightness"]["details"]["zh"] == {"images": 6}


def test_a_rerun_draws_nothing_again_and_the_clip_score_judge_stands_in_for_the_scorer(evaluated, pipe, clip_folder):
    results, rows, out = evaluated
    before = {p: p.read_bytes() for p in (out / "images").rglob("*.png")}
    judge = scorer_class("clip_score", kind="image")(model=str(clip_folder))
    # No scorer_path: the registered judge scores the images, the feature model's features give consistency.
    again, again_rows = run(pipe, out, judges=[judge], feature_model=str(clip_folder))
    assert {p: p.read_bytes() for p in (out / "images").rglob("*.png")} == before
    assert len((out / "images" / "zh" / "index.jsonl").read_text().splitlines()) == 3
    np.testing.assert_allclose([r["clip_score"] for r in again_rows], [r["clip_score"] for r in rows], rtol=1e-5)
    assert again["languages"]["zh"]["clip_score"] == pytest.approx(results["languages"]["zh"]["clip_score"], rel=1e-5)
    assert all(r["clip_score_en"] is None for r in again_rows) and again["scorer"] is None
    assert "frechet" not in again["languages"]["zh"] and again["settings"]["consistency_from"] == "feature_model"
    zh = [r for r in again_rows if r["lang"] == "zh" and r["id"] != "2"]
    mine = image_features(str(clip_folder), [out / r["image"] for r in zh])
    english = image_features(str(clip_folder), [out / f"images/en/{r['id']}-{r['index']}.png" for r in zh])
    cosine = (mine * english).sum(1) / np.linalg.norm(mine, axis=1) / np.linalg.norm(english, axis=1)
    np.testing.assert_allclose([r["consistency"] for r in zh], cosine, rtol=1e-6)


# -- bad input -----------------------------------------------------------------------------------------------------------
def test_a_language_without_prompts_is_named(pipe, tmp_path):
    with pytest.raises(DataError, match=r"language 'ja' has no prompt; the prompts hold de, en, zh"):
        run(pipe, tmp_path, langs="en,ja")
    assert not (tmp_path / "images").exists()  # checked before anything is drawn


def test_no_english_prompts_at_all(pipe, tmp_path):
    with pytest.raises(DataError, match=r'no English one \(lang "en"\)'):
        evaluate_paint(pipe, [p for p in PROMPTS if p.lang != "en"], "zh", tmp_path, show_progress=False)


def test_bad_settings_fail_before_drawing(pipe, tmp_path, references, clip_folder):
    with pytest.raises(ConfigError, match="reference_images is given without feature_model"):
        run(pipe, tmp_path, reference_images=references)
    with pytest.raises(ConfigError, match="at least 2 images per set"):
        evaluate_paint(pipe, PROMPTS[:2], "en,zh", tmp_path, feature_model="x", reference_images=references)
    with pytest.raises(DataError, match="holds 0 image"):
        run(pipe, tmp_path, feature_model="x", reference_images=tmp_path)
    clip = scorer_class("clip_score", kind="image")(model=str(clip_folder))
    with pytest.raises(ConfigError, match="computed with scorer already"):
        run(pipe, tmp_path, clip_folder, judges=[clip])
    with pytest.raises(DataError, match="appears twice in 'zh'"):
        evaluate_paint(pipe, PROMPTS + PROMPTS[1:2], "en,zh", tmp_path)
    assert not (tmp_path / "images").exists()


def test_read_parallel_prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [{"id": 1, "lang": "en", "prompt": "A cat"}, {"id": 1, "lang": "th", "prompt": "แมวสีดำ"},
             {"id": "b", "lang": "ar", "prompt": "قطة على الطاولة"}]  # fmt: skip
    path.write_text("\n".join(json.dumps(line, ensure_ascii=False) for line in lines) + "\n", encoding="utf-8")
    assert read_parallel_prompts(path) == [Prompt("1", "A cat", "en"), Prompt("1", "แมวสีดำ", "th"),
                                           Prompt("b", "قطة على الطاولة", "ar")]  # fmt: skip
    path.write_text(json.dumps(lines[0]) + "\n" + json.dumps(lines[0]) + "\n")
    with pytest.raises(DataError, match=r"prompts.jsonl:2: id '1' in 'en' also appears on line 1"):
        read_parallel_prompts(path)
    path.write_text(json.dumps({"id": 1, "prompt": "A cat"}) + "\n")
    with pytest.raises(DataError, match=r":1: `lang` must name the prompt's language"):
        read_parallel_prompts(path)
