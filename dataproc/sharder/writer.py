"""Finalizing shards in the output folder (the coordinator's side of a shard's life).

A staged shard (candidates tar + records parquet from the worker) becomes the contract triple: the final tar
holds the candidates the deduplicator kept, the parquet every row with its final status, and the stats file,
written last and atomically, marks the shard complete. Retried samples are written back into the parquet and
stats of the shard they came from, so totals count every input row once.
"""

from __future__ import annotations

import collections
import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from dataproc.shard_layout import FAILURE_STATUSES, count_statuses, shard_name, stats_path
from dataproc.sharder.filters import Deduplicator
from dataproc.sharder.worker import records_table, staged_paths
from mpm.core.files import atomic_write_json

MAX_ERROR_GROUPS = 20


def error_groups(records: list[dict]) -> dict[str, int]:
    """Most common failure messages, grouped by their text before the first ': ' (drops URLs and paths)."""
    counter: collections.Counter = collections.Counter()
    for r in records:
        if r["status"] in FAILURE_STATUSES and r["error_message"]:
            message = r["error_message"]
            if message.startswith("/") or " row " in message or " line " in message:  # reader errors name the place
                message = message.split(": ", 1)[-1]
            counter[message.split(": ", 1)[0][:120]] += 1
    return dict(counter.most_common(MAX_ERROR_GROUPS))


def shard_stats(
    records: list[dict], timing: dict[str, float], extra_statuses: Sequence[str] = (), **extra: Any
) -> dict[str, Any]:
    counts = count_statuses([r["status"] for r in records], extra_statuses)
    return {**counts, **timing, "errors": error_groups(records), **extra}


def _write_parquet(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _write_tar(staged: Path, dst: Path, spans: dict[str, list[int]], drop: set[str]) -> None:
    """The final tar: the staged tar itself when nothing is dropped, else its kept samples' bytes copied over.

    A staged sample's members are contiguous and their byte range is known (`spans`), so dropping samples is
    byte copying, with no tar header parsing: Python's tarfile costs ~0.2 ms per member, which on a 2-core
    machine took CPU from the workers.
    """
    if not drop:
        os.replace(staged, dst)
        return
    tmp = dst.with_name(f".{dst.name}.tmp")
    with open(staged, "rb") as src, open(tmp, "wb") as out:
        for key, (begin, end) in spans.items():  # in input order
            if key not in drop:
                src.seek(begin)
                out.write(src.read(end - begin))
        # End of archive: two zero blocks, padded to a whole record (what tarfile writes on close).
        size = out.tell() + 2 * tarfile.BLOCKSIZE
        out.write(b"\0" * (2 * tarfile.BLOCKSIZE + (-size) % tarfile.RECORDSIZE))
    os.replace(tmp, dst)
    staged.unlink()


def read_staged(staged_dir: Path, shard_id: int) -> tuple[list[dict], dict[str, float]] | None:
    """Records and timing of a staged shard, or None if it is not (completely) staged."""
    tar, parquet = staged_paths(staged_dir, shard_id)
    if not (parquet.exists() and tar.exists()):  # the tar goes first when finalizing: then only a redo is safe
        return None
    table = pq.read_table(parquet)
    timing = json.loads(table.schema.metadata[b"mpm_stage"])
    return table.to_pylist(), timing


def finalize_shard(
    out: Path,
    staged_dir: Path,
    shard_id: int,
    dedup: Deduplicator,
    retry_of: list[int] | None = None,
    extra_statuses: Sequence[str] = (),
) -> dict[str, Any]:
    """Deduplicate a staged shard in key order and write its tar, parquet and (last) stats. Returns the stats.

    `extra_statuses`: those of the run's `filters.extra` blocks, listed (zeros included) after the built-in ones.
    """
    records, timing = read_staged(staged_dir, shard_id)
    drop = set()
    for record in records:  # records are in input order
        if record["status"] != "success":
            continue
        phash = int(record["phash"], 16)
        rejected = dedup.check(record["sha256"], phash)
        if rejected is not None:
            record.update(status=rejected.status, error_message=rejected.message, width=None, height=None)
            drop.add(record["key"])
        else:
            dedup.add(record["sha256"], phash, record["key"])
    name = shard_name(shard_id)
    staged_tar, staged_parquet = staged_paths(staged_dir, shard_id)
    _write_tar(staged_tar, out / f"{name}.tar", timing.pop("spans"), drop)
    _write_parquet(out / f"{name}.parquet", records_table(records))
    stats = shard_stats(records, timing, extra_statuses, **({"retry_of": retry_of} if retry_of else {}))
    atomic_write_json(stats_path(out, shard_id), stats)
    staged_parquet.unlink()
    return stats


def apply_retry(out: Path, retry_shard_id: int, extra_statuses: Sequence[str] = ()) -> int:
    """Write a complete retry shard's outcomes back into the parquet and stats of the shards it retried. Returns
    the number of shards rewritten (0 when it was applied already).

    Idempotent: a run killed half way through applies it again (rows are replaced by key), and a source shard's
    stats list the retry shards already applied (`retried_into`), written after its parquet.
    """
    retry_name = shard_name(retry_shard_id)
    retry_stats = json.loads(stats_path(out, retry_shard_id).read_text(encoding="utf-8"))
    retried = {r["key"]: r for r in pq.read_table(out / f"{retry_name}.parquet").to_pylist()}
    rewritten = 0
    for source_id in retry_stats["retry_of"]:
        source_stats_path = stats_path(out, source_id)
        source_stats = json.loads(source_stats_path.read_text(encoding="utf-8"))
        if retry_shard_id in source_stats.get("retried_into", []):
            continue
        rewritten += 1
        parquet = out / f"{shard_name(source_id)}.parquet"
        table = pq.read_table(parquet)
        rows = [retried.get(r["key"], r) for r in table.to_pylist()]
        _write_parquet(parquet, records_table(rows))
        timing = {k: source_stats[k] for k in ("start_time", "end_time", "duration") if k in source_stats}
        retried_into = [*source_stats.get("retried_into", []), retry_shard_id]
        stats = shard_stats(rows, timing, extra_statuses, retried_into=retried_into)
        atomic_write_json(source_stats_path, stats)
    return rewritten
