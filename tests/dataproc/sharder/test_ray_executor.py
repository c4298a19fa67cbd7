"""The Ray executor end to end on a real 2-CPU local cluster (one test: a Ray start costs seconds)."""

import json

import pytest

from dataproc.sharder import shard
from tests.conftest import distinct_jpeg

ray = pytest.importorskip("ray", reason="the Ray executor needs `pip install ray` (the `ray` extra)")


def test_ray_executor_matches_local_processes(tmp_path, web, make_config):
    rows = [
        {"url": web.add(f"/{i}.jpg", body=distinct_jpeg(i)), "caption": f"A photo of a pattern {i}"} for i in range(18)
    ]
    rows += [{"url": web.base + "/404.jpg", "caption": "A photo of nothing"}, rows[3]]  # a failure and a duplicate
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    local = shard(make_config(src, tmp_path / "local", output__samples_per_shard=5), show_progress=False)
    remote = shard(
        make_config(src, tmp_path / "ray", output__samples_per_shard=5, executor__kind="ray", executor__processes=2),
        show_progress=False,
    )
    assert not ray.is_initialized()  # the executor shuts down the cluster it started
    for key in ["count", "successes", "failed_to_download", "filtered_duplicate"]:
        assert remote[key] == local[key]
    assert remote["successes"] == 18 and remote["shards"] == 4
    assert sorted(p.name for p in (tmp_path / "ray").glob("*.tar")) == sorted(
        p.name for p in (tmp_path / "local").glob("*.tar")
    )
