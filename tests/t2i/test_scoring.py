"""ImageTextScorer and pick_best on a tiny random CLIP saved to a folder, and ClipScoreFilter through the real
sharder."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionModel, PreTrainedTokenizerFast

from dataproc.sharder import shard
from dataproc.sharder.config import ShardConfig
from dataproc.sharder.filters import FilterError, Sample, apply_filters, build_filters
from mpm.core.config import load_config
from mpm.core.errors import ConfigError, ModelLoadError
from t2i.filters import ClipScoreFilter
from t2i.scoring import ImageTextScorer, pick_best
from tests.conftest import distinct_jpeg

CAPTIONS = [
    "A red circle on a white table", "一只红色的猫坐在垫子上", "Собака играет в снегу", "قطة على الطاولة",
    "एक लाल गेंद", "แมวสีดำนอนบนโซฟา", "Der Hund spielt im Schnee", "A blue square and a green square",
]  # fmt: skip
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def make_clip_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained in memory, wrapped as CLIP's: <|startoftext|> text <|endoftext|>, padded with
    <|endoftext|> (CLIP pools the first end-of-text token, so padding must come after it)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        CAPTIONS * 20,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=[BOS, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    bos, eos = bpe.token_to_id(BOS), bpe.token_to_id(EOS)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, bos), (EOS, eos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=EOS)


def save_tiny_clip(folder: Path) -> Path:
    """A tiny random CLIP (hidden 32, 2 layers, 32 px, patch 8, projection 16) saved as a model folder (shared by
    the scorer, paint and eval tests)."""
    tokenizer = make_clip_tokenizer()
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = CLIPConfig(
        text_config={**tower, **ids, "pad_token_id": tokenizer.pad_token_id, "vocab_size": len(tokenizer)},
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def scorer(clip_folder) -> ImageTextScorer:
    return ImageTextScorer(str(clip_folder))


def pictures(n: int) -> list[Image.Image]:
    """Distinct smooth colour fields, 96x72 (the processor resizes and crops them to 32x32)."""
    return [Image.open(io.BytesIO(distinct_jpeg(i))).convert("RGB") for i in range(n)]


def test_scores_are_the_models_own_cosine_similarities(clip_folder, scorer):
    images, texts = pictures(len(CAPTIONS)), CAPTIONS
    scores = scorer.score(images, texts)
    assert scores.shape == (len(texts),) and scores.dtype == torch.float32 and scores.device.type == "cpu"

    # CLIPModel.forward: logits_per_image = exp(logit_scale) * cosine of the normalised projections
    model = CLIPModel.from_pretrained(clip_folder).eval()
    tokens = scorer.tokenizer(texts, padding=True, return_tensors="pt")
    pixels = CLIPImageProcessor.from_pretrained(clip_folder)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
    expected = out.logits_per_image.diagonal() / model.logit_scale.exp()
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)
    assert scores.abs().max() <= 1 and len(set(scores.tolist())) == len(texts)

    # Batches pad texts to different lengths: the attention mask and the end-of-text pooling make that invisible.
    torch.testing.assert_close(scorer.score(images, texts, batch_size=3), scores, atol=1e-5, rtol=0)
    one = scorer.score_one_text(images, texts[1])
    torch.testing.assert_close(one, scorer.score(images, [texts[1]] * len(images)), atol=1e-5, rtol=0)
    assert scorer.score([], []).shape == (0,)
    with pytest.raises(ValueError, match="pair up one to one, but there are 2 and 1"):
        scorer.score(images[:2], texts[:1])


def test_long_texts_are_cut_at_the_text_towers_positions(scorer):
    assert scorer.max_length == 77  # CLIP's positions; the tiny tokenizer itself has no limit
    long = " ".join(CAPTIONS * 10)
    assert len(scorer.tokenizer(long)["input_ids"]) > 77
    image = pictures(1)
    # Both are cut to the same first 75 tokens (+ start and end): the same score, and no position overflow.
    torch.testing.assert_close(scorer.score(image, [long]), scorer.score(image, [long + " and more words"]))


def test_pick_best_returns_the_highest_score_and_every_score(scorer):
    images, prompt = pictures(5), CAPTIONS[0]
    best, scores = pick_best(images, prompt, scorer)
    direct = scorer.score(images, [prompt] * len(images))
    assert scores == pytest.approx(direct.tolist(), abs=1e-5)
    assert best == int(direct.argmax()) and scores[best] == max(scores)
    assert pick_best([images[2]] * 3, prompt, scorer)[0] == 0  # equal scores: the first
    with pytest.raises(ValueError, match="`images` is empty"):
        pick_best([], prompt, scorer)


def test_what_cannot_be_loaded_is_a_model_load_error(tmp_path, clip_folder):
    with pytest.raises(ModelLoadError, match=r"rank_with=.*nowhere.*: no such folder"):
        ImageTextScorer(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"cannot load eval.model=.*empty"):
        ImageTextScorer(str(tmp_path / "empty"), key="eval.model")
    # a model with an image tower only
    vision = tmp_path / "vision"
    CLIPVisionModel(CLIPConfig.from_pretrained(clip_folder).vision_config).save_pretrained(vision)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (vision / name).write_bytes((clip_folder / name).read_bytes())
    with pytest.raises(ModelLoadError, match="is a CLIPVisionModel, not an image-text dual encoder"):
        ImageTextScorer(str(vision))


FILTER = "t2i.filters:ClipScoreFilter"


def test_the_filter_options_are_checked_when_the_config_loads(tmp_path, clip_folder):
    path = tmp_path / "shard.yaml"
    path.write_text(f"filters:\n  extra:\n    - {{name: '{FILTER}', model: {clip_folder}, min_score: 0.2}}\n")
    block = build_filters(load_config(ShardConfig, path).filters)[-1]
    assert isinstance(block, ClipScoreFilter) and block.min_score == 0.2 and block.device == "cpu"
    assert block.scorer is None  # loaded by the first check, in the worker

    def extra(**options):
        return load_config(ShardConfig, None, {"filters.extra": [{"name": FILTER, **options}]})

    with pytest.raises(ConfigError, match=r"`filters.extra\[0\]` \(t2i.filters:ClipScoreFilter\) .*min_scor"):
        extra(model=str(clip_folder), min_scor=0.2)
    with pytest.raises(ConfigError, match="missing a required argument: 'min_score'"):
        extra(model=str(clip_folder))
    with pytest.raises(ConfigError, match=r"`clip_score.min_score` is a cosine similarity in \[-1, 1\], got 20"):
        ClipScoreFilter(str(clip_folder), 20)


def write_pairs(folder: Path, captions: list[str]) -> Path:
    """PNG files (decoded exactly as written, so the scores seen here are the filter's) and a jsonl of pairs."""
    folder.mkdir()
    rows = []
    for i, (image, caption) in enumerate(zip(pictures(len(captions)), captions)):
        image.save(folder / f"{i}.png")
        rows.append({"url": str(folder / f"{i}.png"), "caption": caption})
    src = folder / "pairs.jsonl"
    src.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return src


def test_the_filter_drops_low_scoring_pairs_in_a_sharder_run(tmp_path, clip_folder, scorer, make_config):
    src = write_pairs(tmp_path / "pairs", CAPTIONS)
    images = [Image.open(tmp_path / "pairs" / f"{i}.png").convert("RGB") for i in range(len(CAPTIONS))]
    scores = scorer.score(images, CAPTIONS).tolist()
    low, high = sorted(scores)[3:5]
    min_score = round((low + high) / 2, 6)  # between the 4th and 5th: half pass
    assert high - low > 1e-4
    extra = [{"name": FILTER, "model": str(clip_folder), "min_score": min_score}]
    # languages [] tags only: the captions are in eight languages
    cfg = make_config(src, output__samples_per_shard=3, filters__languages=[], filters__extra=extra)
    totals = shard(cfg, show_progress=False)
    out = Path(cfg.output.path)

    records = [r for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert [r["caption"] for r in records] == CAPTIONS
    for record, score in zip(records, scores):
        if score >= min_score:
            assert record["status"] == "success"
        else:
            assert record["status"] == "filtered_clip_score"
            assert record["error_message"] == f"CLIP score {score:.3f} below the minimum {min_score}"
    assert totals["filtered_clip_score"] == 4 and totals["successes"] == 4
    in_tars = []
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as t:
            in_tars += [m.name.split(".")[0] for m in t.getmembers() if m.name.endswith(".txt")]
    assert in_tars == [r["key"] for r in records if r["status"] == "success"]


def test_the_model_loads_at_the_first_check_and_a_missing_one_names_itself(tmp_path, clip_folder, scorer):
    image = pictures(1)
    score = scorer.score(image, CAPTIONS[:1]).item()
    keep, drop = ClipScoreFilter(str(clip_folder), score - 0.01), ClipScoreFilter(str(clip_folder), score + 0.01)
    assert keep.check(Sample(caption=CAPTIONS[0], image=image[0])) is None
    first = keep.scorer
    assert keep.check(Sample(caption=CAPTIONS[0], image=image[0])) is None and keep.scorer is first  # loaded once
    assert drop.check(Sample(caption=CAPTIONS[0], image=image[0])) == (
        f"CLIP score {score:.3f} below the minimum {score + 0.01}"
    )
    # A folder that is not there fails when the worker first checks a sample: a filter error, which fails the shard
    # (the sharder's rule for a block that raises) and names the folder, not a rejection of that sample.
    missing = ClipScoreFilter(str(tmp_path / "no-model"), 0.2)
    with pytest.raises(FilterError, match=r"ClipScoreFilter raised ModelLoadError: clip_score.model=.*no-model"):
        apply_filters([missing], "image", Sample(caption=CAPTIONS[0], image=image[0]))
