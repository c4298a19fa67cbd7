"""Pair encoding, response log-probs and the reference log-prob cache, on a tiny saved MPM model."""

import json
import shutil

import pytest
import torch
from PIL import Image

from mpm.align.batches import collate_pairs, encode_pair, pair_weights, response_logps, unpadded
from mpm.align.data import read_preferences
from mpm.align.losses import place_weights, sequence_logps
from mpm.align.reference import ReferenceCache, default_folder, expected_manifest, fill
from mpm.core.errors import ConfigError
from mpm.inference import load_model
from mpm.processor import ProcessingError


@pytest.fixture
def saved_model(save_tiny):
    return save_tiny("reference")


@pytest.fixture
def pairs_file(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i, colour in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (32, 32), colour).save(images / f"{i}.png")
        rows.append({"id": f"p{i}", "image": f"images/{i}.png", "question": "What is shown?", "lang": "en",
                     "chosen": f"a {colour} square on a white ground", "rejected": "a cat sitting on a sofa"})  # fmt: skip
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _items(path):
    return [(str(i), pair) for i, pair in enumerate(read_preferences(path))]


def test_only_the_answers_are_scored_and_batched_equals_alone(saved_model, pairs_file):
    model, processor = load_model(saved_model, device="cpu")
    pairs = [encode_pair(processor, p, 512) for p in read_preferences(pairs_file)]
    chosen_ids, rejected_ids = pairs[0].response_ids()
    text = processor.tokenizer.decode(chosen_ids)
    assert "red square" in text and "What is shown" not in text  # the answer (and its turn's end), not the prompt
    assert "cat" in processor.tokenizer.decode(rejected_ids)

    batch = collate_pairs(processor, pairs)
    logps, mask = response_logps(model, batch)
    assert logps.shape[0] == 6 and bool((logps[mask] < 0).all())
    rows = unpadded(logps, mask)
    assert [len(r) for r in rows[:3]] == [len(p.response_ids()[0]) for p in pairs]
    alone = unpadded(*response_logps(model, collate_pairs(processor, pairs[1:2])))
    torch.testing.assert_close(alone[0], rows[1], atol=1e-5, rtol=1e-5)  # padding changes nothing
    torch.testing.assert_close(alone[1], rows[4], atol=1e-5, rtol=1e-5)

    weights = place_weights(pair_weights(pairs, gamma=5.0, min_match=3), mask)
    plain = sequence_logps(logps, mask)
    weighted = sequence_logps(logps, mask, weights)
    assert bool((weighted < plain).all())  # corrected tokens weigh 5x: every answer here has some


def test_a_pair_longer_than_max_length_is_refused(saved_model, pairs_file):
    _, processor = load_model(saved_model, device="cpu")
    pair = next(iter(read_preferences(pairs_file)))
    with pytest.raises(ProcessingError, match="max_length=8"):
        encode_pair(processor, pair, 8)


def test_cached_log_probs_equal_live_ones_and_survive_the_model(saved_model, pairs_file, tmp_path):
    model, processor = load_model(saved_model, device="cpu")
    items = _items(pairs_file)
    pairs = [encode_pair(processor, pair, 512, key=key) for key, pair in items]
    live = unpadded(*response_logps(model, collate_pairs(processor, pairs)))
    settings = {"max_length": 512}
    folder = default_folder(pairs_file)
    cache = ReferenceCache.open(folder, expected_manifest(saved_model, pairs_file, settings))
    loads = []

    def load():
        loads.append(1)
        return load_model(saved_model, device="cpu")[0]

    assert fill(cache, load, processor, items, 512, batch_size=2, part_size=2, show_progress=False) == 3
    assert len(list(folder.glob("part-*.pt"))) == 2  # written every 2 pairs: a kill keeps finished parts
    chosen, rejected = cache.get(pairs)
    for got, want in zip(chosen + rejected, live, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    # a new process: everything cached, the reference model is never loaded, even once its folder is gone
    shutil.rmtree(saved_model)
    again = ReferenceCache.open(folder, expected_manifest(saved_model, pairs_file, settings))
    assert again.missing(["0", "1", "2"]) == []
    assert fill(again, load, processor, items, 512, batch_size=2, show_progress=False) == 0 and len(loads) == 1


def test_an_interrupted_cache_computes_only_what_is_missing(saved_model, pairs_file):
    model, processor = load_model(saved_model, device="cpu")
    items = _items(pairs_file)
    folder = default_folder(pairs_file)
    cache = ReferenceCache.open(folder, expected_manifest(saved_model, pairs_file, {}))
    fill(cache, lambda: model, processor, items[:2], 512, batch_size=2, show_progress=False)  # "killed" after two
    (folder / ".part-0-00001-7.pt.123.tmp").write_bytes(b"half a part")  # what the kill left behind: ignored
    resumed = ReferenceCache.open(folder, expected_manifest(saved_model, pairs_file, {}))
    assert resumed.missing(["0", "1", "2"]) == ["2"]
    assert fill(resumed, lambda: model, processor, items, 512, batch_size=2, show_progress=False) == 1
    assert len(ReferenceCache.open(folder, expected_manifest(saved_model, pairs_file, {})).entries) == 3


def test_a_pair_that_now_encodes_otherwise_is_refused(saved_model, pairs_file):
    model, processor = load_model(saved_model, device="cpu")
    items = _items(pairs_file)
    cache = ReferenceCache.open(default_folder(pairs_file), expected_manifest(saved_model, pairs_file, {}))
    fill(cache, lambda: model, processor, items, 512, batch_size=4, show_progress=False)
    items[1][1].chosen = "a different answer now"  # e.g. another tokenizer, or the row edited in place
    changed = encode_pair(processor, items[1][1], 512, key="1")
    with pytest.raises(ConfigError, match="pair 1 of the data now encodes otherwise.*--no-cache"):
        cache.get([changed])


def test_unusable_pairs_are_recorded_with_their_reason(saved_model, pairs_file):
    model, processor = load_model(saved_model, device="cpu")
    items = _items(pairs_file)
    (pairs_file.parent / "images" / "1.png").write_bytes(b"not a png")
    items[2][1].rejected = items[2][1].chosen  # (the reader skips such rows; one got through)
    cache = ReferenceCache.open(default_folder(pairs_file), expected_manifest(saved_model, pairs_file, {}))
    assert fill(cache, lambda: model, processor, items, 512, batch_size=4, show_progress=False) == 3
    assert list(cache.entries) == ["0"]
    assert "ImageError" in cache.skipped["1"] and cache.skipped["2"].startswith("identical")
    again = ReferenceCache.open(default_folder(pairs_file), expected_manifest(saved_model, pairs_file, {}))
    assert again.missing(["0", "1", "2"]) == [] and again.skipped == cache.skipped


def test_a_cache_from_other_data_or_another_model_is_refused(saved_model, pairs_file, save_tiny):
    folder = default_folder(pairs_file)
    ReferenceCache.open(folder, expected_manifest(saved_model, pairs_file, {"max_length": 512}))
    with pytest.raises(ConfigError, match="other data.*--no-cache"):
        ReferenceCache.open(folder, expected_manifest(saved_model, pairs_file, {"max_length": 256}))
    original = pairs_file.read_text(encoding="utf-8")
    pairs_file.write_text(original + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="other data"):
        ReferenceCache.open(folder, expected_manifest(saved_model, pairs_file, {"max_length": 512}))
    pairs_file.write_text(original, encoding="utf-8")

    other_folder = save_tiny("other", seed=1)
    with pytest.raises(ConfigError, match=f"another reference model.*{other_folder.name}"):
        ReferenceCache.open(folder, expected_manifest(other_folder, pairs_file, {"max_length": 512}))
    recomputed = ReferenceCache.open(
        folder, expected_manifest(other_folder, pairs_file, {"max_length": 512}), recompute=True
    )
    assert recomputed.entries == {}


def test_no_model_and_no_cache_is_a_clear_error(pairs_file, tmp_path):
    with pytest.raises(ConfigError, match="no saved model there"):
        ReferenceCache.open(default_folder(pairs_file), expected_manifest(tmp_path / "gone", pairs_file, {}))
