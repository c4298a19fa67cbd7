"""Training data of the i2t recipe: the pair stream resumes at a batch position without decoding what it passes."""

import io
import tarfile
from functools import partial

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mpm.data import PairCaptions, Skipped, collate
from mpm.train_config import CAPTION_PROMPTS


def loader(processor, shards, skip: int, weights=None, batches: int | None = None):
    """The batches of a 2-worker DataLoader over the caption stream, as the recipe builds it."""
    stream = PairCaptions(
        shards, weights, processor, CAPTION_PROMPTS, 256, shuffle_buffer=16, seed=3, batch_size=4, skip_batches=skip
    )
    out = []
    for batch in DataLoader(stream, batch_size=4, num_workers=2, collate_fn=partial(collate, processor)):
        out.append(batch)
        if batches is not None and len(out) == batches:
            break
    return out


@pytest.mark.parametrize("weights", [None, [0.7, 0.3]], ids=["one-pass", "weighted-mix"])
def test_resuming_passes_over_samples_undecoded_and_continues_exactly(tiny, colour_shards, weights):
    _, processor = tiny()
    shards = [str(colour_shards)] if weights is None else [str(colour_shards), str(colour_shards)]
    limit = None if weights is None else 12  # the mix is endless
    straight = loader(processor, shards, 0, weights, limit)
    skip = 5  # odd: the next batch comes from the second worker
    resumed = loader(processor, shards, skip, weights, limit)
    assert len(resumed) == len(straight) and len(straight) >= 12
    for batch in resumed[:skip]:  # read, not decoded or encoded
        assert batch["passed"] == 4 and "input_ids" not in batch
    for a, b in zip(straight[skip:], resumed[skip:], strict=True):
        assert b["passed"] == 0 and torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["pixel_values"], b["pixel_values"])


def test_an_undecodable_shard_sample_is_a_counted_skip(tiny, tmp_path, caplog):
    _, processor = tiny()
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for key, image in [("000000000", Image.new("RGB", (32, 32), "red")), ("000000001", None)]:
            data = b"not a png"
            if image is not None:
                buffer = io.BytesIO()
                image.save(buffer, "PNG")
                data = buffer.getvalue()
            for ext, payload in [("png", data), ("txt", b"A red picture.")]:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    items = list(PairCaptions([str(tmp_path)], None, processor, CAPTION_PROMPTS, 256, shuffle_buffer=0, seed=0))
    assert len(items) == 2 and not isinstance(items[0], Skipped)
    assert items[1] == Skipped("undecodable sample", "000000001")
    assert "skipping bad sample 000000001" in caplog.text


def test_a_dirty_shard_is_counted_exactly_and_logged_sparingly(tiny, tmp_path, caplog):
    _, processor = tiny()
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for i in range(40):  # 40 undecodable samples
            for ext, payload in [("png", b"not a png"), ("txt", b"A red picture.")]:
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    with caplog.at_level("WARNING"):
        items = list(PairCaptions([str(tmp_path)], None, processor, CAPTION_PROMPTS, 256, shuffle_buffer=0, seed=0))
    assert sum(isinstance(x, Skipped) for x in items) == 40  # every skip counted (the metrics add these)
    lines = [r for r in caplog.records if "bad sample" in r.getMessage()]
    assert len(lines) == 10 and "later skips are logged every 1000" in lines[-1].getMessage()


def test_a_micro_batch_is_packed_into_one_row_only_when_it_fits(tiny):
    _, processor = tiny()
    items = [processor.encode_conversation([{"role": "user", "content": "<image>\nHi"},
             {"role": "assistant", "content": "Red " * n}], [Image.new("RGB", (32, 32))]) for n in (1, 5)]  # fmt: skip
    total = sum(len(x.input_ids) for x in items)
    assert collate(processor, items, pack=total)["input_ids"].shape[0] == 1  # position ids restart per sample
    assert "position_ids" not in collate(processor, items, pack=total - 1)  # padded rows with an attention mask
    assert "position_ids" not in collate(processor, items, pack=None)
