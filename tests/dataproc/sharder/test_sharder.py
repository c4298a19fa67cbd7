"""End to end: the sharder on real inputs (HTTP server on 127.0.0.1, local files), checked against the contract."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from dataproc.shard_layout import STATUSES, completed_shards, total_stats
from dataproc.sharder import ShardRunError, shard
from dataproc.sharder.filters import Filter
from mpm.core.errors import ConfigError
from tests.conftest import distinct_jpeg, image_bytes
from tests.dataproc.sharder.test_images import png_header_only
from tests.dataproc.sharder.test_readers import write_tar

REPO = Path(__file__).parents[3]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "wb") as f:
        for row in rows:
            if isinstance(row, bytes):
                f.write(row + b"\n")
            else:
                f.write(json.dumps(row, ensure_ascii=False).encode() + b"\n")
    return path


def records(out: Path) -> dict[str, dict]:
    """key -> parquet row, over the shards that are not retry shards."""
    rows = {}
    for shard_id, stats in completed_shards(out).items():
        if not stats.get("retry_of"):
            for r in pq.read_table(out / f"{shard_id:05d}.parquet").to_pylist():
                rows[r["key"]] = r
    return rows


def tar_keys(out: Path) -> list[str]:
    keys = []
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as t:
            keys += [m.name.split(".", 1)[0] for m in t.getmembers() if m.name.endswith(".json")]
    return keys


def counts(totals: dict) -> dict:
    return {k: v for k, v in totals.items() if k == "count" or k == "successes" or k in STATUSES}


CAPTION = "A photo of a colourful pattern on a table"


def test_every_bad_input_is_recorded_and_the_output_follows_the_contract(tmp_path, web, make_config):
    cmyk = io.BytesIO()
    Image.new("CMYK", (80, 60), (0, 255, 255, 0)).save(cmyk, "JPEG")
    gif = io.BytesIO()
    frames = [Image.open(io.BytesIO(distinct_jpeg(80 + i))).convert("P") for i in range(3)]
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    tiff_f = io.BytesIO()
    Image.new("F", (40, 40), 0.5).save(tiff_f, "TIFF")
    truncated = distinct_jpeg(99, (200, 150))
    expected = {}  # url or marker -> status
    rows = []

    def add(path, expected_status, caption=CAPTION, **route):
        url = web.add(path, **route) if route else web.base + path
        rows.append({"url": url, "caption": caption, "source_id": len(rows)})
        expected[len(rows) - 1] = expected_status

    for i in range(6):
        add(f"/good{i}.jpg", "success", body=distinct_jpeg(i))
    add("/cmyk.jpg", "success", body=cmyk.getvalue())
    add("/anim.gif", "success", body=gif.getvalue())
    add("/missing.jpg", "failed_to_download")  # 404
    add("/error.jpg", "failed_to_download", status=500, body=b"boom")
    add("/slow.jpg", "failed_to_download", body=distinct_jpeg(50), delay_s=2.0)
    add("/loop", "failed_to_download", status=302, headers={"Location": "/loop"})
    add("/huge.jpg", "failed_to_download", body=b"\xff" * 400_000)
    add("/page.jpg", "failed_to_decode", body=b"<html><body>sorry</body></html>", headers={"Content-Type": "text/html"})
    add("/truncated.jpg", "failed_to_decode", body=truncated[: len(truncated) // 2])
    add("/empty.jpg", "failed_to_decode", body=b"")
    add("/bomb.png", "failed_to_decode", body=png_header_only(40_000, 40_000))
    add("/float.tiff", "failed_to_decode", body=tiff_f.getvalue())
    add("/noai.jpg", "filtered_opt_out", body=distinct_jpeg(60), headers={"X-Robots-Tag": "noai"})
    add("/good0.jpg", "filtered_duplicate")  # the same URL again
    add("/copy.jpg", "filtered_duplicate", body=distinct_jpeg(1))  # same bytes, another URL
    big = Image.open(io.BytesIO(distinct_jpeg(2))).resize((192, 144))
    resized = io.BytesIO()
    big.save(resized, "JPEG", quality=90)
    add("/bigger-copy.jpg", "filtered_near_duplicate", body=resized.getvalue())
    add("/nocaption.jpg", "filtered_empty_caption", caption="", body=distinct_jpeg(70))
    add("/nullcaption.jpg", "filtered_empty_caption", caption=None, body=distinct_jpeg(71))
    add(
        "/german.jpg",
        "filtered_language",
        caption="Ein buntes Muster auf einem Holztisch im Garten",
        body=distinct_jpeg(72),
    )
    add("/tiny.jpg", "filtered_image_size", body=image_bytes((10, 8)))
    rows.append({"url": "http://127.0.0.1:1/unreachable.jpg", "caption": CAPTION, "source_id": len(rows)})
    expected[len(rows) - 1] = "failed_to_download"
    lines = [*rows, b'{"url": "' + web.base.encode() + b'/x.jpg", "caption": "caf\xe9 cr\xe8me", "source_id": 99}']
    expected[len(lines) - 1] = "failed_to_read"
    src = write_jsonl(tmp_path / "pairs.jsonl", lines)

    cfg = make_config(
        src,
        output__samples_per_shard=7,
        fetch__timeout_s=0.5,
        fetch__max_bytes=300_000,
        filters__min_image_size=16,
        filters__near_duplicate_max_distance=6,
        input__save_additional_columns=["source_id"],
    )
    totals = shard(cfg, show_progress=False)
    out = Path(cfg.output.path)

    # Every input row is in exactly one parquet, with the expected status.
    rows_out = records(out)
    assert len(rows_out) == len(lines) == totals["count"]
    by_position = {i: rows_out[key] for i, key in enumerate(sorted(rows_out))}
    got = {i: r["status"] for i, r in by_position.items()}
    assert got == expected, {
        i: (got[i], expected[i], by_position[i]["error_message"]) for i in got if got[i] != expected[i]
    }
    assert all(r["error_message"] for r in rows_out.values() if r["status"] != "success")
    assert by_position[8]["error_message"] == "HTTP 404"
    assert "redirect loop" in by_position[11]["error_message"]

    # Stats: per shard and run totals agree with the parquets; every reason is counted.
    assert totals["successes"] == 8 and totals["filtered_duplicate"] == 2 and totals["failed_to_download"] == 6
    assert json.loads((out / "stats.json").read_text())["count"] == len(lines)
    assert (out / "config.yaml").exists()
    assert sum(s["count"] for s in completed_shards(out).values()) == len(lines)

    # Tars: keys are digits, only successes, contiguous members with the contract's json fields.
    keys = tar_keys(out)
    assert sorted(keys) == sorted(k for k, r in rows_out.items() if r["status"] == "success")
    assert all(k.isdigit() and len(k) == 9 for k in keys)
    with tarfile.open(out / "00000.tar") as t:
        names = t.getnames()
        meta = json.load(t.extractfile(names[1]))
    assert names[:3] == ["000000000.jpg", "000000000.json", "000000000.txt"]
    for field in [
        "key",
        "url",
        "caption",
        "status",
        "error_message",
        "width",
        "height",
        "original_width",
        "original_height",
        "sha256",
        "lang",
        "lang_score",
        "source_id",
    ]:
        assert field in meta
    assert meta["status"] == "success" and meta["lang"] == "en" and meta["source_id"] == 0
    assert meta["sha256"] == hashlib.sha256(distinct_jpeg(0)).hexdigest()
    assert not list(out.glob(".*.tmp")) and not (out / "_tmp").exists()


def test_output_is_readable_by_webdataset_and_datasets(tmp_path, web, make_config):
    rows = [{"url": web.add(f"/{i}.jpg", body=distinct_jpeg(i)), "caption": f"{CAPTION} number {i}"} for i in range(12)]
    cfg = make_config(write_jsonl(tmp_path / "in.jsonl", rows), output__samples_per_shard=5)
    shard(cfg, show_progress=False)
    tars = sorted(str(p) for p in Path(cfg.output.path).glob("*.tar"))
    import webdataset as wds

    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("pil"))
    assert len(samples) == 12
    assert samples[0]["jpg"].size == (43, 32) and samples[0]["txt"] == f"{CAPTION} number 0"
    assert samples[0]["json"]["url"] == rows[0]["url"]
    import datasets

    ds = datasets.load_dataset("webdataset", data_files={"train": tars}, split="train")
    assert len(ds) == 12 and ds[3]["jpg"].size == (43, 32) and ds[3]["__key__"] == "000000003"


def local_pairs(tmp_path: Path, n: int, duplicate_every: int = 4) -> Path:
    """Local files where every few rows repeats an earlier image (exact) or a resized copy (near)."""
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(n):
        path = tmp_path / "img" / f"{i}.jpg"
        if i % duplicate_every == duplicate_every - 1 and (i // duplicate_every) % 2 == 0:
            path.write_bytes((tmp_path / "img" / f"{i - 3}.jpg").read_bytes())  # exact copy
        elif i % duplicate_every == duplicate_every - 1:
            Image.open(tmp_path / "img" / f"{i - 2}.jpg").resize((120, 90)).save(path, "JPEG", quality=92)  # near copy
        else:
            path.write_bytes(distinct_jpeg(i))
        rows.append({"url": str(path), "caption": f"{CAPTION} {i}"})
    return write_jsonl(tmp_path / "local.jsonl", rows)


def test_dedup_is_deterministic_across_processes(tmp_path, make_config):
    src = local_pairs(tmp_path, 40)
    one = make_config(src, tmp_path / "p1", output__samples_per_shard=6, filters__near_duplicate_max_distance=6)
    two = make_config(
        src, tmp_path / "p2", output__samples_per_shard=6, filters__near_duplicate_max_distance=6, executor__processes=2
    )
    t1, t2 = shard(one, show_progress=False), shard(two, show_progress=False)
    r1, r2 = records(tmp_path / "p1"), records(tmp_path / "p2")
    assert {k: r["status"] for k, r in r1.items()} == {k: r["status"] for k, r in r2.items()}
    assert t1["filtered_duplicate"] == 5 and t1["filtered_near_duplicate"] == 5
    assert counts(t1) == counts(t2)
    # the copy kept is the first in input order
    for key, r in r1.items():
        if r["status"] in ("filtered_duplicate", "filtered_near_duplicate"):
            original = r["error_message"].split()[-1]
            assert original < key and r1[original]["status"] == "success"


def test_resume_skips_complete_shards_and_leaves_them_byte_identical(tmp_path, make_config):
    src = local_pairs(tmp_path, 30)
    cfg = make_config(src, output__samples_per_shard=8)
    first = shard(cfg, show_progress=False)
    out = Path(cfg.output.path)
    snapshot = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("0000*")}
    again = shard(cfg, show_progress=False)
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("0000*")} == snapshot
    assert counts(again) == counts(first)
    # a shard whose stats file is missing (killed during finalization) is redone; the others are untouched
    (out / "00002_stats.json").unlink()
    with open(out / "00002.tar", "r+b") as f:
        f.truncate(1000)
    (out / ".00003.parquet.abc.tmp").write_bytes(b"junk")
    third = shard(cfg, show_progress=False)
    assert counts(third) == counts(first)
    for name, (data, mtime) in snapshot.items():
        if not name.startswith("00002"):
            assert (out / name).read_bytes() == data and (out / name).stat().st_mtime_ns == mtime
    assert not list(out.glob(".*.tmp"))


def test_changed_settings_are_refused_and_overwrite_starts_over(tmp_path, make_config):
    src = local_pairs(tmp_path, 6)
    shard(make_config(src), show_progress=False)
    with pytest.raises(ConfigError, match=r"resize.image_size: 32 -> 48.*--overwrite"):
        shard(make_config(src, resize__image_size=48), show_progress=False)
    shard(make_config(src, fetch__threads=2, executor__processes=2), show_progress=False)  # speed settings may change
    totals = shard(make_config(src, resize__image_size=48, output__mode="overwrite"), show_progress=False)
    assert totals["count"] == 6
    (tmp_path / "img" / "0.jpg").write_bytes(distinct_jpeg(1000))  # same size? no: the input file list changed size
    with open(src, "a") as f:
        f.write(json.dumps({"url": str(tmp_path / "img" / "0.jpg"), "caption": CAPTION}) + "\n")
    with pytest.raises(ConfigError, match="the input changed"):
        shard(make_config(src, resize__image_size=48), show_progress=False)


def test_retry_failed_reattempts_only_failures_and_totals_match_a_fresh_run(tmp_path, web, make_config):
    rows = []
    for i in range(14):
        fail = 10**6 if i in (2, 5, 6, 11) else 0  # these answer 503 until the site recovers
        rows.append({"url": web.add(f"/{i}.jpg", body=distinct_jpeg(i), fail_first=fail), "caption": f"{CAPTION} {i}"})
    rows.append({"url": web.base + "/gone.jpg", "caption": CAPTION})  # 404: fails again on retry
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    cfg = make_config(src, output__samples_per_shard=4)
    first = shard(cfg, show_progress=False)
    out = Path(cfg.output.path)
    assert first["failed_to_download"] == 5
    failed_keys = sorted(k for k, r in records(out).items() if r["status"] == "failed_to_download")
    originals = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    before_retry = {p.name: p.read_bytes() for p in out.glob("0000[0-3]*") if not p.name.endswith(".tar")}

    for route in web.routes.values():
        route.fail_first = 0  # the site is back
    retried = shard(make_config(src, output__samples_per_shard=4, retry_failed=True), show_progress=False)
    assert retried["failed_to_download"] == 1 and retried["successes"] == 14 and retried["retry_shards"] == 2
    # retried samples keep their keys, live in new shards, and the original parquet rows were updated
    retry_ids = sorted(i for i, s in completed_shards(out).items() if s.get("retry_of"))
    assert retry_ids == [4, 5]
    assert sorted(tar_keys(out)) == sorted(k for k, r in records(out).items() if r["status"] == "success")
    new_keys = [k for tar in ("00004.tar", "00005.tar") for k in tar_keys_of(out / tar)]
    assert sorted(new_keys) == [k for k in failed_keys if k != "000030002"]
    assert {p: (out / p).read_bytes() for p in originals} == originals  # original tars untouched
    assert completed_shards(out)[0]["retried_into"] == [4]

    # A run killed after writing the retry shards but before writing their results back finishes the write-back.
    retried_state = {p.name: p.read_bytes() for p in out.glob("0000[0-3]*")}
    for name, data in before_retry.items():
        (out / name).write_bytes(data)
    assert counts(total_stats(out)) == counts(first)
    assert counts(shard(cfg, show_progress=False)) == counts(retried)
    assert {p.name: p.read_bytes() for p in out.glob("0000[0-3].parquet")} == {
        k: v for k, v in retried_state.items() if k.endswith(".parquet")
    }

    fresh_cfg = make_config(src, tmp_path / "fresh", output__samples_per_shard=4)
    fresh = shard(fresh_cfg, show_progress=False)
    assert counts(retried) == counts(fresh) == counts(total_stats(out))
    # nothing is left to retry but the 404: a second retry makes one more retry shard for it and changes no total
    again = shard(make_config(src, output__samples_per_shard=4, retry_failed=True), show_progress=False)
    assert counts(again) == counts(fresh)


def tar_keys_of(path: Path) -> list[str]:
    with tarfile.open(path) as t:
        return [m.name.split(".", 1)[0] for m in t.getmembers() if m.name.endswith(".json")]


def test_sigkill_while_a_tar_is_half_written_then_resume(tmp_path, web, make_config):
    rows = [
        {"url": web.add(f"/{i}.jpg", body=distinct_jpeg(i % 25, (160, 120)), delay_s=0.03), "caption": f"{CAPTION} {i}"}
        for i in range(60)
    ]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "killed"
    cmd = [
        sys.executable, "-m", "mpm.cli", "data", "shard", "--input", str(src), "--output", str(out),
        "--samples-per-shard", "20", "--processes", "1", "--threads", "1", "--no-progress",
        "--image-size", "32", "--resize-mode", "keep_ratio",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    partial = out / "_tmp" / "00001.staged.tar.tmp"
    while time.monotonic() < deadline and not (partial.exists() and partial.stat().st_size > 0):
        time.sleep(0.01)
    assert partial.exists(), proc.stderr.read() if proc.poll() is not None else "no partial tar appeared"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "00001_stats.json").exists()

    resumed = shard(make_config(src, out, output__samples_per_shard=20), show_progress=False)
    clean = shard(make_config(src, tmp_path / "clean", output__samples_per_shard=20), show_progress=False)
    assert counts(resumed) == counts(clean)
    keys = tar_keys(out)
    assert len(keys) == len(set(keys))  # no duplicates
    assert sorted(keys) == sorted(tar_keys(tmp_path / "clean"))
    assert len(records(out)) == 60  # nothing lost


def test_folder_and_reshard_of_existing_shards(tmp_path, make_config):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.png").write_bytes(_png(i))
        (folder / f"{i}.txt").write_text(f"{CAPTION} {i}")
    first = shard(make_config(folder, tmp_path / "a", filters__languages=[]), show_progress=False)
    assert first["successes"] == 5
    inside = shard(make_config(folder, folder / "shards", filters__languages=[]), show_progress=False)
    assert inside["successes"] == 5
    assert shard(make_config(folder, folder / "shards", filters__languages=[]), show_progress=False)["count"] == 5
    # re-shard our own output at another size: same samples, captions and original URLs kept
    second = shard(
        make_config(tmp_path / "a", tmp_path / "b", resize__image_size=16, filters__near_duplicate_max_distance=None),
        show_progress=False,
    )
    assert second["successes"] == 5
    rows = sorted(records(tmp_path / "b").values(), key=lambda r: r["key"])
    assert rows[0]["url"] == str(folder / "0.png") and rows[0]["caption"] == f"{CAPTION} 0" and rows[0]["height"] == 16


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(distinct_jpeg(i))).save(buf, "PNG")
    return buf.getvalue()


def test_a_shard_that_cannot_be_written_fails_the_run_and_a_rerun_resumes(tmp_path, make_config):
    src = local_pairs(tmp_path, 18)
    cfg = make_config(src, output__samples_per_shard=6)
    out = Path(cfg.output.path)
    blocker = out / "_tmp" / "00001.staged.tar.tmp"
    blocker.mkdir(parents=True)  # the worker cannot create shard 1's tar: the whole task fails, twice
    with pytest.raises(ShardRunError, match=r"1 shard\(s\) could not be completed \(00001: IsADirectoryError"):
        shard(cfg, show_progress=False)
    assert sorted(completed_shards(out)) == [0]  # shard 2 is staged, not finalized: dedup needs shard 1 first
    assert (out / "_tmp" / "00002.staged.parquet").exists()
    blocker.rmdir()
    totals = shard(cfg, show_progress=False)
    assert totals["count"] == 18 and sorted(completed_shards(out)) == [0, 1, 2]
    assert counts(totals) == counts(
        shard(make_config(src, tmp_path / "clean", output__samples_per_shard=6), show_progress=False)
    )


# ---------------------------------------------------------------------------------------------------------------
# Saved datasets and tar shards as input: images read from the input, not downloaded


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_dataset(path: Path, n: int, num_shards: int = 1) -> list[bytes]:
    """A Hugging Face dataset saved with save_to_disk: an `image` column and a caption. Returns the images."""
    datasets = pytest.importorskip("datasets")
    images = [distinct_jpeg(i) for i in range(n)]
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in images], "caption": [f"{CAPTION} {i}" for i in range(n)]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )
    ds.save_to_disk(str(path), num_shards=num_shards)
    return images


def test_a_saved_dataset_read_from_many_fetch_threads_loses_no_sample(tmp_path, make_config):
    # Every fetch thread of a fresh worker process opened the dataset at once, and datasets' load_from_disk is not
    # thread-safe: 1-3 samples in 48 ended as failed_to_download "'tqdm' object has no attribute '_lock'". A
    # dataset of many files widens the window; each run starts new worker processes.
    images = save_dataset(tmp_path / "ds", 48, num_shards=48)
    for run in range(2):
        out = tmp_path / f"out{run}"
        cfg = make_config(tmp_path / "ds", out, output__samples_per_shard=16, fetch__threads=16, executor__processes=2)
        totals = shard(cfg, show_progress=False)
        rows = records(out)
        assert totals["successes"] == 48, {k: r["error_message"] for k, r in rows.items() if r["status"] != "success"}
        assert [rows[k]["sha256"] for k in sorted(rows)] == [sha(image) for image in images]


class FailReadsWhileMarked(Filter):
    """Test hook for a transient read failure. A `filters.extra` block is built in every worker process whatever
    the start method (fork, spawn, Ray), so its `__init__` can make reading the listed images from the input
    (a saved dataset's image, a tar member) fail there while the file `marker` exists. It keeps every sample."""

    name, reason, stage = "fail_reads", "never", "caption"

    def __init__(self, marker: str, sha256: list[str]):
        from dataproc.sharder import worker

        read = worker.read_source_bytes

        def flaky(source, cache):
            data = read(source, cache)
            if os.path.exists(marker) and sha(data) in sha256:
                raise OSError("simulated: the disk went away")
            return data

        worker.read_source_bytes = flaky

    def check(self, sample):
        return None


@pytest.mark.parametrize("kind", ["hf", "webdataset"])
def test_retry_failed_reads_again_what_could_not_be_read_from_the_input(tmp_path, make_config, kind):
    n = 10
    if kind == "hf":
        src = tmp_path / "ds"
        images = save_dataset(src, n)
    else:
        src = tmp_path / "in.tar"
        images = [distinct_jpeg(i) for i in range(n)]
        members = [
            (f"s{i:02d}.{ext}", data)
            for i in range(n)
            for ext, data in [("jpg", images[i]), ("txt", f"{CAPTION} {i}".encode())]
        ]
        write_tar(src, members)
    marker = tmp_path / "disk-is-down"
    marker.touch()
    extra = [
        {"name": f"{__name__}:FailReadsWhileMarked", "marker": str(marker), "sha256": [sha(images[i]) for i in (2, 7)]}
    ]
    cfg = make_config(src, output__samples_per_shard=4, filters__extra=extra)
    out = Path(cfg.output.path)
    first = shard(cfg, show_progress=False)
    # Nothing was downloaded: the sample could not be read from the input, and the message says where and why.
    assert (first["failed_to_read"], first["failed_to_download"], first["successes"]) == (2, 0, n - 2)
    failed = {k: r for k, r in records(out).items() if r["status"] != "success"}
    assert all(
        "OSError reading the image: simulated: the disk went away" in r["error_message"] for r in failed.values()
    )
    assert str(src) in next(iter(failed.values()))["error_message"]

    marker.unlink()  # the disk is back
    retried = shard(
        make_config(src, output__samples_per_shard=4, filters__extra=extra, retry_failed=True), show_progress=False
    )
    assert (retried["successes"], retried["failed_to_read"], retried["retry_shards"]) == (n, 0, 1)
    rows = records(out)
    assert [rows[k]["sha256"] for k in sorted(rows)] == [sha(image) for image in images]
    for key, before in failed.items():  # the retried rows keep their key, url and caption
        assert (rows[key]["url"], rows[key]["caption"]) == (before["url"], before["caption"])
    assert sorted(tar_keys(out)) == sorted(rows)


def test_rerunning_a_finished_job_says_there_is_nothing_to_do(tmp_path, capsys):
    from mpm.cli import main

    src = local_pairs(tmp_path, 8)
    (tmp_path / "img" / "5.jpg").unlink()  # one sample fails: --retry-failed would have something to do
    args = [
        "data", "shard", "--input", str(src), "--output", str(tmp_path / "out"), "--samples-per-shard", "4",
        "--processes", "1", "--threads", "2", "--image-size", "32", "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "nothing to do" not in first and "failed_to_download" in first
    assert main(args) == 0
    again = capsys.readouterr().out
    note = (
        "all 2 shards are already complete (8 samples); nothing to do — use --overwrite to start over or "
        "--retry-failed to re-attempt failures\n"
    )
    assert note in again and again.replace(note, "") == first  # said plainly, with the same summary table
