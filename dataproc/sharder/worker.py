"""The per-shard function: rows in, a staged shard out. Both executors (local processes, Ray) run exactly this.

Per shard: caption filters (no network) -> fetch in threads -> header filters, decode, image filters, resize,
encode (in input order, in this process's main thread) -> a staged tar of candidates and a staged parquet of every
row. The filters are the blocks `build_filters` makes from the config (filters.py).
Deduplication is NOT done here: it needs every earlier sample of the run, so the coordinator does it when it
finalizes shards in input order (see run.py). A sample's problem never escapes this function: it becomes a status
(a filter that raises is a bug in the filter, not the sample's problem: it fails the shard).
"""

from __future__ import annotations

import collections
import hashlib
import io
import itertools
import json
import os
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dataproc.shard_layout import RECORD_SCHEMA
from dataproc.sharder.config import ShardConfig
from dataproc.sharder.fetch import Fetcher, FetchError
from dataproc.sharder.filters import FilterError, Rejected, Sample, apply_filters, build_filters
from dataproc.sharder.images import process_image
from dataproc.sharder.readers import InputRow, read_source_bytes
from mpm.core.files import atomic_write_bytes

PROGRESS_INTERVAL_S = 0.5


@dataclass
class ShardTask:
    shard_id: int
    rows: list[InputRow]
    keys: list[str]  # one per row; retried samples keep the keys they had
    staged_dir: str
    retry_of: list[int] | None = None  # for retry shards: the shards whose failed samples these are


def staged_paths(staged_dir: str | Path, shard_id: int) -> tuple[Path, Path]:
    """(candidates tar, records parquet) of a staged shard; the parquet is written last and marks it complete."""
    base = Path(staged_dir) / f"{shard_id:05d}"
    return base.with_suffix(".staged.tar"), base.with_suffix(".staged.parquet")


def base_record(key: str, row: InputRow) -> dict[str, Any]:
    """The parquet row of a sample, before anything happened to it (field order = column order)."""
    return {
        "key": key,
        "url": row.url,
        "caption": row.caption,
        "status": None,
        "error_message": None,
        "width": None,
        "height": None,
        "original_width": None,
        "original_height": None,
        "sha256": None,
        "phash": None,  # 16 hex digits; kept in the parquet so a resumed run can rebuild its dedup index
        "lang": None,
        "lang_score": None,
        **row.extra,
    }


class _WorkerState:
    """What a worker process builds once and reuses for every shard of a run."""

    def __init__(self, cfg: ShardConfig):
        self.cfg = cfg
        self.fetcher = Fetcher(cfg.fetch)
        self.filters = build_filters(cfg.filters)
        self.datasets_cache: dict = {}
        # Pillow's own bomb check follows ours (it raises at twice this); we reject above 1x from the header.
        Image.MAX_IMAGE_PIXELS = cfg.resize.max_image_pixels


_STATE: _WorkerState | None = None


def worker_state(cfg: ShardConfig) -> _WorkerState:
    global _STATE
    if _STATE is None or _STATE.cfg != cfg:
        _STATE = _WorkerState(cfg)
    return _STATE


def _ordered_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, window: int) -> Iterator[tuple[Any, Future]]:
    """pool.map with at most `window` calls in flight, yielding (item, future) in input order."""
    items = iter(items)
    pending: collections.deque = collections.deque()
    for item in itertools.islice(items, window):
        pending.append((item, pool.submit(fn, item)))
    while pending:
        item, future = pending.popleft()
        for nxt in itertools.islice(items, 1):
            pending.append((nxt, pool.submit(fn, nxt)))
        yield item, future


def process_shard(task: ShardTask, cfg: ShardConfig, progress=None) -> int:
    """Stage one shard. `progress`, if given, receives (samples done, successes) increments via `.put()`."""
    state = worker_state(cfg)
    start = time.time()
    tar_path, parquet_path = staged_paths(task.staged_dir, task.shard_id)
    tar_path.parent.mkdir(parents=True, exist_ok=True)
    records = [base_record(key, row) for key, row in zip(task.keys, task.rows)]
    samples = [Sample(caption=row.caption, url=row.url, columns=row.extra) for row in task.rows]
    reporter = _ProgressReporter(progress)

    # 1. Rows that could not be read, and caption filters: no network needed.
    to_fetch = []
    for i, (row, record, sample) in enumerate(zip(task.rows, records, samples)):
        if row.error:
            record.update(status="failed_to_read", error_message=row.error)
            reporter.add(1, 0)
            continue
        try:
            apply_filters(state.filters, "caption", sample)
            to_fetch.append(i)
        except Rejected as rejected:
            record.update(status=rejected.status, error_message=rejected.message)
            reporter.add(1, 0)
        record.update(sample.tags)

    def fetch(i: int) -> bytes | FetchError:
        row = task.rows[i]
        if row.source is not None:  # an image inside the input (a tar member, a saved dataset's image): not a download
            try:
                return read_source_bytes(row.source, state.datasets_cache)
            except Exception as exc:  # this sample's problem only; --retry-failed reads it again
                message = f"{row.source.where}: {type(exc).__name__} reading the image: {exc}"
                return FetchError(message, status="failed_to_read")
        try:
            return state.fetcher.fetch(row.url)
        except FetchError as exc:
            return exc
        except Exception as exc:  # an unexpected error fetching one URL is this sample's problem only
            return FetchError(f"{type(exc).__name__}: {exc}")

    # 2. Fetch in threads; decode and write in input order so the staged tar is deterministic.
    tmp_tar = tar_path.with_suffix(".tar.tmp")
    mtime = int(start)
    spans: dict[
        str, tuple[int, int]
    ] = {}  # key -> byte range of its members, so finalizing can drop samples by copying bytes
    with (
        open(tmp_tar, "wb") as stream,
        tarfile.open(fileobj=stream, mode="w") as tar,
        ThreadPoolExecutor(cfg.fetch.threads, thread_name_prefix="fetch") as pool,
    ):
        for i, future in _ordered_map(pool, fetch, to_fetch, window=4 * cfg.fetch.threads):
            begin = stream.tell()
            ok = _process_sample(future.result(), samples[i], records[i], state, tar, mtime)
            if ok:
                spans[records[i]["key"]] = (begin, stream.tell())
            reporter.add(1, int(ok))
    os.replace(tmp_tar, tar_path)

    # 3. The staged parquet, last: its presence means the staged tar is complete.
    table = records_table(records)
    end = time.time()
    meta = {"start_time": start, "end_time": end, "duration": end - start, "spans": spans}
    table = table.replace_schema_metadata({b"mpm_stage": json.dumps(meta).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(parquet_path, sink.getvalue().to_pybytes())
    reporter.flush()
    return task.shard_id


def _process_sample(
    fetched: bytes | FetchError, sample: Sample, record: dict, state: _WorkerState, tar: tarfile.TarFile, mtime: int
) -> bool:
    cfg = state.cfg
    if isinstance(fetched, FetchError):
        record.update(status=fetched.status, error_message=str(fetched))
        return False
    record["sha256"] = hashlib.sha256(fetched).hexdigest()
    try:
        image = process_image(fetched, cfg.resize, cfg.output, state.filters, sample)
    except Rejected as rejected:
        record.update(status=rejected.status, error_message=rejected.message)
        return False
    except FilterError:
        raise  # a filter's bug fails the shard: it is not this sample's problem
    except Exception as exc:  # Pillow raises many types on hostile input; the sample fails, the shard goes on
        record.update(status="failed_to_decode", error_message=f"{type(exc).__name__}: {exc}")
        return False
    finally:
        record.update(sample.tags)  # what header/image filters tagged, whatever the outcome
    record.update(
        status="success",
        width=image.width,
        height=image.height,
        original_width=image.original_width,
        original_height=image.original_height,
        phash=f"{image.phash:016x}",
    )
    meta = {k: v for k, v in record.items() if k != "phash"}
    members = {
        cfg.output.encode_format: image.data,
        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
        "txt": (sample.caption or "").encode("utf-8"),
    }
    for ext, data in members.items():  # one sample's members are contiguous, as webdataset requires
        info = tarfile.TarInfo(f"{record['key']}.{ext}")
        info.size, info.mtime, info.mode = len(data), mtime, 0o444
        tar.addfile(info, io.BytesIO(data))
    return True


def records_table(records: list[dict]) -> pa.Table:
    """Records -> a table with the fixed columns typed and saved input columns inferred."""
    columns = {f.name: pa.array([r[f.name] for r in records], f.type) for f in RECORD_SCHEMA}
    extra_names = [k for k in (records[0] if records else {}) if k not in columns]
    for name in extra_names:
        columns[name] = pa.array([r.get(name) for r in records])
    return pa.table(columns)


class _ProgressReporter:
    """Batches progress increments so the queue sees a few messages per second, not one per sample."""

    def __init__(self, sink):
        self.sink = sink
        self.done = self.ok = 0
        self.last = time.monotonic()

    def add(self, done: int, ok: int) -> None:
        self.done += done
        self.ok += ok
        if self.sink is not None and time.monotonic() - self.last > PROGRESS_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        if self.sink is not None and self.done:
            self.sink.put((self.done, self.ok))
        self.done = self.ok = 0
        self.last = time.monotonic()
