"""The coordinator of `mpm data shard`: plan shards, resume, run them on an executor, finalize in input order.

Why in input order: deduplication must keep the first copy in input order whatever the number of processes,
and a resumed run must rebuild exactly the dedup state an uninterrupted run had. So workers only stage shards
(candidates + records, in `{out}/_tmp`), and this process finalizes them strictly in shard order: complete
shards always form a prefix of the run, and the index rebuilt from their parquets is the index at that point.

Crash safety: every file is written to a temporary name and renamed; a shard's stats file is written last. A
staged shard survives a kill and is finalized by the next run without being processed again.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from tqdm import tqdm

from dataproc.shard_layout import completed_shards, make_key, shard_name, total_stats
from dataproc.sharder.config import RESUMABLE_CHANGES, ShardConfig
from dataproc.sharder.executors import make_executor
from dataproc.sharder.filters import Deduplicator, extra_statuses
from dataproc.sharder.readers import InputRow, count_rows, input_fingerprint, read_rows, resolve_input
from dataproc.sharder.worker import ShardTask, staged_paths
from dataproc.sharder.writer import apply_retry, finalize_shard, read_staged
from mpm.core.config import diff_configs, load_config, save_config
from mpm.core.errors import ConfigError
from mpm.core.files import atomic_write_json, output_folder, remove_temporaries

logger = logging.getLogger(__name__)

RETRYABLE_STATUSES = ("failed_to_download", "failed_to_decode", "failed_to_resize")
# Inputs whose rows locate their image inside the input (`InputRow.source`: a tar member, a saved dataset's image),
# which the shard parquet does not record: --retry-failed reads their failed rows again from the input, and also
# retries `failed_to_read` (the image could not be read; a row that cannot be read fails the same way again).
REREAD_FORMATS = ("webdataset", "hf")
SHARD_ATTEMPTS = 2  # a shard whose task raised (not a sample: the whole task) is tried once more
CONFIG_FILE, FINGERPRINT_FILE, STAGED_DIR = "config.yaml", "input_fingerprint.json", "_tmp"


class ShardRunError(RuntimeError):
    """Some shards could not be completed; the message lists them. Rerunning the command resumes."""


def shard(cfg: ShardConfig, show_progress: bool = True) -> dict[str, Any]:
    """Run the sharder to completion (or resume it). Returns the run totals also written to `{out}/stats.json`."""
    cfg.check_required()
    started = time.time()
    statuses = extra_statuses(cfg.filters)  # of the filters.extra blocks: every stats file lists them
    fmt, files = resolve_input(cfg.input)
    executor = make_executor(cfg)  # workers start up while this process prepares the run
    bar = None
    failed: dict[int, str] = {}
    try:
        out = Path(cfg.output.path)
        _prepare_output(out, cfg, files)
        staged_dir = out / STAGED_DIR
        staged_dir.mkdir(exist_ok=True)
        for leftover in [*remove_temporaries(out), *remove_temporaries(staged_dir), *staged_dir.glob("*.tar.tmp")]:
            if leftover.is_file():
                leftover.unlink()
            logger.info("removed %s left by an interrupted run", leftover)

        done = completed_shards(out)
        written = 0  # shards this run finalizes or writes back into
        for shard_id, stats in sorted(done.items()):
            if stats.get("retry_of"):
                # finishes a retry a killed run had not written back yet
                written += apply_retry(out, shard_id, statuses)
        dedup = _rebuild_dedup(out, done, cfg)

        total = count_rows(fmt, files)
        done_rows = sum(s["count"] for s in done.values() if not s.get("retry_of"))
        bar = tqdm(
            total=None if total is None else max(total - done_rows, 0),
            unit=" samples",
            disable=not show_progress,
            dynamic_ncols=True,
            smoothing=0.1,
        )
        tasks = _input_tasks(cfg, fmt, files, set(done), staged_dir)
        failed, finalized = _run(tasks, executor, out, staged_dir, dedup, bar, statuses)
        written += finalized
        if cfg.retry_failed and not failed:
            next_id = max(completed_shards(out), default=-1) + 1
            retries = _retry_tasks(out, cfg, fmt, files, next_id, staged_dir)
            failed, finalized = _run(retries, executor, out, staged_dir, dedup, bar, statuses)
            written += finalized
    except BaseException:
        executor.close(cancel=True)  # Ctrl-C or an error: stop the workers now; a rerun resumes
        raise
    finally:
        if bar is not None:
            bar.close()
    executor.close()

    totals = total_stats(out)
    totals["run"] = {"duration": round(time.time() - started, 3), "input_format": fmt, "failed_shards": failed}
    if done and not written and not failed:
        totals["run"]["note"] = _nothing_to_do(totals, fmt, cfg.retry_failed)
        logger.info(totals["run"]["note"])
    atomic_write_json(out / "stats.json", totals)
    if failed:
        listing = "; ".join(f"{shard_name(i)}: {msg}" for i, msg in sorted(failed.items()))
        raise ShardRunError(
            f"{len(failed)} shard(s) could not be completed ({listing}). Rerun the same command to resume."
        )
    if staged_dir.exists() and not any(staged_dir.iterdir()):
        staged_dir.rmdir()
    return totals


# ---------------------------------------------------------------------------------------------------------------
# Output folder: overwrite, resume checks, the saved config


def _our_files(out: Path) -> list[Path]:
    names = [CONFIG_FILE, FINGERPRINT_FILE, "stats.json"]
    files = [p for p in out.iterdir() if p.name in names]
    for p in out.iterdir():
        stem = p.name.split(".", 1)[0].removesuffix("_stats")
        if stem.isdigit() and (p.suffix in (".tar", ".parquet") or p.name.endswith("_stats.json")):
            files.append(p)
    return files


def _prepare_output(out: Path, cfg: ShardConfig, files: list[str]) -> None:
    output_folder(out, "output.path")
    if cfg.output.mode == "overwrite":
        for path in _our_files(out):
            path.unlink()
        shutil.rmtree(out / STAGED_DIR, ignore_errors=True)
    fingerprint = input_fingerprint(files, out)
    saved = out / CONFIG_FILE
    if saved.exists():
        previous = load_config(ShardConfig, saved)
        changes = diff_configs(previous, cfg, ignore=RESUMABLE_CHANGES)
        if changes:
            listing = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes)
            raise ConfigError(
                f"{out} was written with different settings ({listing}). Use a new --output folder, or "
                "--overwrite to start this one over."
            )
        fp_path = out / FINGERPRINT_FILE
        if fp_path.exists() and json.loads(fp_path.read_text()) != fingerprint:
            raise ConfigError(
                f"the input changed since {out} was started (compare {fp_path}); use a new --output folder, or "
                "--overwrite to start over."
            )
    elif completed_shards(out):
        raise ConfigError(
            f"{out} holds shards but no {CONFIG_FILE}: it was not written by this tool. Use a new --output."
        )
    save_config(cfg, saved)
    atomic_write_json(out / FINGERPRINT_FILE, fingerprint)


def _rebuild_dedup(out: Path, done: dict[int, dict], cfg: ShardConfig) -> Deduplicator:
    """The dedup index an uninterrupted run would hold after the complete shards (a prefix, in order)."""
    dedup = Deduplicator(cfg.filters)
    for shard_id in sorted(i for i, s in done.items() if not s.get("retry_of")):
        table = pq.read_table(out / f"{shard_name(shard_id)}.parquet", columns=["key", "status", "sha256", "phash"])
        for row in table.to_pylist():
            if row["status"] == "success":
                dedup.add(row["sha256"], int(row["phash"], 16), row["key"])
    return dedup


# ---------------------------------------------------------------------------------------------------------------
# Planning


def _input_tasks(cfg: ShardConfig, fmt: str, files: list[str], done: set[int], staged_dir: Path) -> Iterator[ShardTask]:
    n = cfg.output.samples_per_shard
    rows = read_rows(cfg.input, fmt, files)
    for shard_id in itertools.count():
        chunk = list(itertools.islice(rows, n))
        if not chunk:
            return
        if shard_id in done:
            continue
        keys = [make_key(shard_id, i, n) for i in range(len(chunk))]
        yield ShardTask(shard_id, chunk, keys, str(staged_dir))


def _retryable_statuses(fmt: str) -> tuple[str, ...]:
    """The statuses --retry-failed re-attempts for an input format."""
    return (*RETRYABLE_STATUSES, "failed_to_read") if fmt in REREAD_FORMATS else RETRYABLE_STATUSES


def _retry_tasks(
    out: Path, cfg: ShardConfig, fmt: str, files: list[str], next_id: int, staged_dir: Path
) -> Iterator[ShardTask]:
    """Failed samples of complete shards, in key order, packed into new shards that keep the original keys."""
    rows: list[InputRow] = []
    keys: list[str] = []
    sources: set[int] = set()
    for shard_id, key, row in _rows_to_retry(out, cfg, fmt, files):
        rows.append(row)
        keys.append(key)
        sources.add(shard_id)
        if len(rows) == cfg.output.samples_per_shard:
            yield ShardTask(next_id, rows, keys, str(staged_dir), retry_of=sorted(sources))
            next_id, rows, keys, sources = next_id + 1, [], [], set()
    if rows:
        yield ShardTask(next_id, rows, keys, str(staged_dir), retry_of=sorted(sources))


def _failed_records(out: Path, statuses: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """(shard id, parquet record) of the samples of complete input shards that ended with one of `statuses`, in
    key order."""
    for shard_id, stats in sorted(completed_shards(out).items()):
        if stats.get("retry_of") or not any(stats.get(s, 0) for s in statuses):
            continue
        for record in pq.read_table(out / f"{shard_name(shard_id)}.parquet").to_pylist():
            if record["status"] in statuses:
                yield shard_id, record


def _rows_to_retry(out: Path, cfg: ShardConfig, fmt: str, files: list[str]) -> Iterator[tuple[int, str, InputRow]]:
    """(source shard id, key, input row) of every sample to retry, in key order.

    A tabular or folder row is rebuilt from its parquet record (url, caption, saved columns). A webdataset or
    saved-dataset row locates its image inside the input, which the parquet does not record, so it is read again
    from the input (checked unchanged when the run started), walking both in key order.
    """
    if fmt not in REREAD_FORMATS:
        for shard_id, record in _failed_records(out, RETRYABLE_STATUSES):
            extra = {c: record.get(c) for c in cfg.input.save_additional_columns}
            yield shard_id, record["key"], InputRow(url=record["url"], caption=record["caption"], extra=extra)
        return
    n = cfg.output.samples_per_shard
    inputs = ((make_key(i // n, i % n, n), row) for i, row in enumerate(read_rows(cfg.input, fmt, files)))
    for shard_id, record in _failed_records(out, _retryable_statuses(fmt)):
        row = next((row for key, row in inputs if key == record["key"]), None)
        if row is None:  # cannot happen while the input is unchanged
            raise ConfigError(f"--retry-failed: sample {record['key']} is not in the input any more")
        if not row.error:  # a row that cannot be read (bad caption, no image member) fails the same way again
            yield shard_id, record["key"], row


def _nothing_to_do(totals: dict[str, Any], fmt: str, retry_failed: bool) -> str:
    """What a run that found every shard complete and wrote nothing tells the user."""
    done = f"all {totals['shards']} shards are already complete ({totals['count']:,} samples)"
    if retry_failed:
        return f"{done} and none of their failures can be retried; nothing to do — use --overwrite to start over"
    retry = " or --retry-failed to re-attempt failures" if any(totals[s] for s in _retryable_statuses(fmt)) else ""
    return f"{done}; nothing to do — use --overwrite to start over{retry}"


# ---------------------------------------------------------------------------------------------------------------
# Running


def _run(
    tasks: Iterator[ShardTask],
    executor,
    out: Path,
    staged_dir: Path,
    dedup: Deduplicator,
    bar: tqdm,
    extra_statuses: list[str],
) -> tuple[dict[int, str], int]:
    """Run tasks with a bounded number in flight; finalize staged shards in shard order.

    Returns the shards that failed ({shard id: message}) and the number of shards finalized.
    """
    window = 2 * executor.processes  # keeps every worker busy while bounding rows held in memory
    # (shard id, retry_of) of every shard not finalized yet, in shard order. Rows are not kept here: a slow early
    # shard must not make the coordinator hold the rows of every later one.
    order: collections.deque[tuple[int, list[int] | None]] = collections.deque()
    ready: set[int] = set()
    in_flight: dict[Any, ShardTask] = {}
    attempts: collections.Counter = collections.Counter()
    failed: dict[int, str] = {}
    counts = {"done": 0, "ok": 0}
    tasks = iter(tasks)
    exhausted = False
    finalized = 0

    def advance(done: int, ok: int) -> None:
        counts["done"] += done
        counts["ok"] += ok
        bar.update(done)
        bar.set_postfix_str(f"ok {counts['ok'] / max(counts['done'], 1):.1%}", refresh=False)

    while True:
        while not exhausted and len(in_flight) < window:
            task = next(tasks, None)
            if task is None:
                exhausted = True
                break
            order.append((task.shard_id, task.retry_of))
            staged = read_staged(staged_dir, task.shard_id)
            if staged is not None and [r["key"] for r in staged[0]] == task.keys:
                ready.add(task.shard_id)  # staged by an interrupted run: only finalization is left
                advance(len(task.keys), sum(r["status"] == "success" for r in staged[0]))
                continue
            for stale in staged_paths(staged_dir, task.shard_id):
                stale.unlink(missing_ok=True)
            in_flight[executor.submit(task)] = task

        while order and order[0][0] in ready:
            shard_id, retry_of = order.popleft()
            finalize_shard(out, staged_dir, shard_id, dedup, retry_of=retry_of, extra_statuses=extra_statuses)
            finalized += 1
            if retry_of:
                apply_retry(out, shard_id, extra_statuses)

        if exhausted and not in_flight:
            break
        for handle, result in executor.wait(list(in_flight), timeout=0.25):
            task = in_flight.pop(handle)
            if isinstance(result, BaseException):
                attempts[task.shard_id] += 1
                message = f"{type(result).__name__}: {result}"
                if attempts[task.shard_id] < SHARD_ATTEMPTS:
                    logger.warning("shard %s failed (%s); trying it again", shard_name(task.shard_id), message)
                    in_flight[executor.submit(task)] = task
                else:
                    logger.error("shard %s failed twice: %s", shard_name(task.shard_id), message)
                    failed[task.shard_id] = message
            else:
                ready.add(task.shard_id)
        for done, ok in executor.drain_progress():
            advance(done, ok)
    for done, ok in executor.drain_progress():
        advance(done, ok)
    if order:  # later shards stay staged: the next run finalizes them without processing them again
        logger.error(
            "shards from %s on are staged but not finalized (an earlier shard failed)", shard_name(order[0][0])
        )
    return failed, finalized
