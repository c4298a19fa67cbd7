import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mpm.cli import main

REPO = Path(__file__).parents[2]
EXPECTED = {
    "clean": {"success", "filtered_near_duplicate"},  # procedural scenes share layouts: pHash sometimes agrees
    "empty_caption": {"filtered_empty_caption"},
    "german_caption": {"filtered_language"},
    "duplicate": {"filtered_duplicate"},
    "truncated": {"failed_to_decode"},
    "zero_bytes": {"failed_to_decode"},
    "html": {"failed_to_decode"},
    "tiny": {"filtered_image_size"},
    "missing_file": {"failed_to_download"},
    "boilerplate": {"filtered_boilerplate"},
}


def run_synthetic(tmp_path: Path, n: int) -> dict[str, set[str]]:
    """`mpm data synth` + `mpm data shard` with the shipped quickstart config: kind of row -> statuses seen."""
    pairs = tmp_path / "pairs"
    assert main(["data", "synth", "--output", str(pairs), "--num-samples", str(n)]) == 0
    out = tmp_path / "shards"
    args = ["data", "shard", "--config", str(REPO / "configs/data/quickstart.yaml"), "--no-progress"]
    assert main([*args, f"input.path={pairs / 'pairs.jsonl'}", f"output.path={out}"]) == 0
    kinds = [json.loads(line)["kind"] for line in (pairs / "pairs.jsonl").read_text().splitlines()]
    statuses = [r["status"] for p in sorted(out.glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(statuses) == len(kinds) == n
    seen: dict[str, set[str]] = {}
    for kind, status in zip(kinds, statuses):
        seen.setdefault(kind, set()).add(status)
    return seen


def test_each_kind_of_bad_row_gets_its_status(tmp_path):
    seen = run_synthetic(tmp_path, 100)
    for kind, statuses in seen.items():
        assert statuses <= EXPECTED[kind], kind
    assert "success" in seen["clean"]


@pytest.mark.slow
def test_each_kind_of_bad_row_gets_its_status_at_scale(tmp_path):
    seen = run_synthetic(tmp_path, 900)  # every bad kind appears at least nine times
    assert set(seen) == set(EXPECTED)
    for kind, statuses in seen.items():
        assert statuses <= EXPECTED[kind], kind
