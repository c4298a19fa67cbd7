"""The shard reader trainers use: rank/worker splitting, weights, the bad-sample policy."""

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

from dataproc.sharder import shard
from dataproc.shards import BadSampleCounter, iter_pairs
from tests.conftest import distinct_jpeg


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """Two shard sets written by the real sharder: A with 24 samples in 6 shards, B with 8 in 2."""
    from dataproc.sharder import ShardConfig
    from mpm.core.config import load_config

    root = tmp_path_factory.mktemp("sets")
    for name, n, offset in [("A", 24, 0), ("B", 8, 100)]:
        (root / f"{name}_img").mkdir()
        with open(root / f"{name}.jsonl", "w") as f:
            for i in range(n):
                (root / f"{name}_img" / f"{i}.jpg").write_bytes(distinct_jpeg(offset + i))
                f.write(
                    json.dumps({"url": str(root / f"{name}_img" / f"{i}.jpg"), "caption": f"set {name} photo {i}"})
                    + "\n"
                )
        flags = {
            "input.path": str(root / f"{name}.jsonl"),
            "output.path": str(root / name),
            "output.samples_per_shard": 4,
            "executor.processes": 1,
            "resize.image_size": 24,
            "filters.languages": [],
            "filters.near_duplicate_max_distance": None,
        }
        assert shard(load_config(ShardConfig, None, flags), show_progress=False)["successes"] == n
    return root / "A", root / "B"


def test_streams_every_pair_once_in_order_without_shuffle(two_sets):
    a, _ = two_sets
    pairs = list(iter_pairs(str(a), shuffle_buffer=0))
    assert [p.caption for p in pairs] == [f"set A photo {i}" for i in range(24)]
    assert pairs[0].image.mode == "RGB" and min(pairs[0].image.size) == 24
    assert pairs[5].meta["__key__"] == "000010001" and pairs[5].meta["lang"] is not None


def test_shuffle_is_seeded_and_keeps_every_sample(two_sets):
    a, _ = two_sets
    first = [p.caption for p in iter_pairs(str(a / "{00000..00005}.tar"), shuffle_buffer=8, seed=1)]
    again = [p.caption for p in iter_pairs(str(a / "{00000..00005}.tar"), shuffle_buffer=8, seed=1)]
    assert first == again and sorted(first) == sorted(f"set A photo {i}" for i in range(24))
    assert first != [f"set A photo {i}" for i in range(24)]


def test_ranks_get_disjoint_shards(two_sets, monkeypatch):
    a, _ = two_sets
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append({p.meta["__key__"] for p in iter_pairs(str(a), shuffle_buffer=0)})
    assert len(seen[0]) == len(seen[1]) == 12 and not seen[0] & seen[1]


def test_dataloader_workers_split_shards(two_sets):
    a, _ = two_sets
    loader = torch.utils.data.DataLoader(
        iter_pairs(str(a), shuffle_buffer=4), batch_size=None, num_workers=2, collate_fn=lambda x: x
    )
    keys = [p.meta["__key__"] for p in loader]
    assert len(keys) == 24 == len(set(keys))


def test_weights_set_the_mixing_proportions(two_sets):
    a, b = two_sets
    stream = iter(iter_pairs([str(a), str(b)], weights=[3, 1], shuffle_buffer=0, seed=0))
    captions = [next(stream).caption for _ in range(600)]
    share_a = sum(c.startswith("set A") for c in captions) / len(captions)
    assert 0.70 < share_a < 0.80
    with pytest.raises(ValueError, match="`weights` has 1 values but `patterns` has 2"):
        iter_pairs([str(a), str(b)], weights=[1])


def test_resampled_stream_does_not_end(two_sets):
    _, b = two_sets
    stream = iter(iter_pairs(str(b), resampled=True, shuffle_buffer=0))
    assert len({next(stream).caption for _ in range(100)}) == 8


def test_bad_samples_are_counted_logged_and_skipped(tmp_path, caplog):
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for key, image in [
            ("000000000", distinct_jpeg(1)),
            ("000000001", b"not a jpeg"),
            ("000000002", distinct_jpeg(2)),
        ]:
            for ext, data in [("jpg", image), ("txt", f"caption {key}".encode()), ("json", b"{}")]:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    bad = BadSampleCounter()
    pairs = list(iter_pairs(str(tmp_path), shuffle_buffer=0, bad_samples=bad))
    assert [p.caption for p in pairs] == ["caption 000000000", "caption 000000002"]
    assert bad.count == 1 and bad.keys == ["000000001"]
    assert "skipping bad sample 000000001" in caplog.text
    with pytest.raises(FileNotFoundError, match="did you run `mpm data shard`"):
        iter_pairs(str(Path(tmp_path) / "nothing-*.tar"))


def test_ranks_reading_the_same_shard_shuffle_it_differently(tmp_path, monkeypatch):
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:  # one shard: both ranks resample it
        for i in range(24):
            for ext, data in [("jpg", distinct_jpeg(i)), ("txt", f"photo {i}".encode())]:
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    a = tmp_path
    orders = []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        stream = iter(iter_pairs(str(a), shuffle_buffer=16, seed=0, resampled=True))
        orders.append([next(stream).meta["__key__"] for _ in range(24)])
    assert orders[0] != orders[1]
