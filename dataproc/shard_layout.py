"""Pair shards on disk: the contract (DESIGN.md "Pair shards"), status names, stats files and their totals.

Layout of an output folder:
    {shard:05d}.tar            samples {key}.jpg|webp|png, {key}.txt (caption), {key}.json (metadata)
    {shard:05d}.parquet        one row per INPUT sample of the shard, failures included (status, error_message)
    {shard:05d}_stats.json     written last and atomically: marks the shard complete
    stats.json                 run totals; config.yaml: the resolved config the run used
Keys are digits only, `{shard:05d}{index:04d}` (webdataset splits keys at the first dot).
"""

from __future__ import annotations

import glob
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import braceexpand
import pyarrow as pa


def expand_paths(pattern: str) -> list[str]:
    """Brace expansion ("{00000..00009}") and globs; a plain path is returned as is."""
    paths: list[str] = []
    for expanded in braceexpand.braceexpand(pattern):
        matches = sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
        paths.extend(matches)
    return paths


# Every status a sample can end with. Stats files count each (as "successes" for success). A run with filter blocks
# of its own (`filters.extra`) adds their `filtered_<reason>` statuses after these, in the order of the config.
FAILURE_STATUSES = ("failed_to_read", "failed_to_download", "failed_to_decode", "failed_to_resize")
FILTER_STATUSES = (
    "filtered_empty_caption",
    "filtered_caption_length",
    "filtered_boilerplate",
    "filtered_language",
    "filtered_opt_out",
    "filtered_image_size",
    "filtered_aspect_ratio",
    "filtered_image_area",
    "filtered_duplicate",
    "filtered_near_duplicate",
)
STATUSES = ("success", *FAILURE_STATUSES, *FILTER_STATUSES)

# The columns of every shard parquet row (saved input columns follow). The tar's .json holds the same fields
# without `phash`, which only a resumed run needs (to rebuild its near-duplicate index).
RECORD_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("sha256", pa.string()),
        ("phash", pa.string()),
        ("lang", pa.string()),
        ("lang_score", pa.float32()),
    ]
)
IMAGE_FIELDS = ("jpg", "webp", "png")


def shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"


def index_digits(samples_per_shard: int) -> int:
    return max(4, len(str(samples_per_shard - 1)))


def make_key(shard_id: int, index: int, samples_per_shard: int) -> str:
    return f"{shard_id:05d}{index:0{index_digits(samples_per_shard)}d}"


def stats_path(folder: Path, shard_id: int) -> Path:
    return folder / f"{shard_name(shard_id)}_stats.json"


def completed_shards(folder: str | Path) -> dict[int, dict]:
    """{shard id: its stats} for every complete shard (one whose stats file exists) in `folder`."""
    out = {}
    for path in sorted(Path(folder).glob("*_stats.json")):
        stem = path.name[: -len("_stats.json")]
        if stem.isdigit():
            out[int(stem)] = json.loads(path.read_text(encoding="utf-8"))
    return out


def empty_counts(extra_statuses: Sequence[str] = ()) -> dict[str, int]:
    return {"count": 0, "successes": 0, **{s: 0 for s in (*FAILURE_STATUSES, *FILTER_STATUSES, *extra_statuses)}}


def count_statuses(statuses: Sequence[str], extra_statuses: Sequence[str] = ()) -> dict[str, int]:
    """Stats-file counts: every status listed, zeros included, so totals add up; `extra_statuses` are those of the
    run's own filter blocks."""
    counts = empty_counts(extra_statuses)
    for status in statuses:
        counts["count"] += 1
        counts["successes" if status == "success" else status] += 1
    return counts


def total_stats(folder: str | Path) -> dict[str, Any]:
    """Totals over the complete shards of an output folder, each input row counted once.

    Retry shards (`retry_of` in their stats) are not added: their outcomes were written back into the stats of
    the shards the samples came from.
    """
    totals: dict[str, Any] = empty_counts()
    errors: dict[str, int] = {}
    shards = retry_shards = 0
    for stats in completed_shards(folder).values():
        if stats.get("retry_of"):
            retry_shards += 1
            continue
        shards += 1
        for name in stats:  # statuses of a run's own filter blocks, after the built-in ones
            if name.startswith("filtered_") and name not in totals:
                totals[name] = 0
        for name in totals:
            totals[name] += stats.get(name, 0)
        for message, n in stats.get("errors", {}).items():
            errors[message] = errors.get(message, 0) + n
    totals["shards"] = shards
    totals["retry_shards"] = retry_shards
    totals["errors"] = dict(sorted(errors.items(), key=lambda kv: -kv[1])[:50])
    return totals


def format_stats_table(totals: dict[str, Any]) -> str:
    """The summary printed after a run and by `mpm data stats`: every non-zero status, with failure causes; after a
    run, what the run has to say (`run.note`: e.g. that every shard was already complete and nothing was done)."""
    count = totals.get("count", 0)
    rows = [("success", totals.get("successes", 0))]
    known = (*FAILURE_STATUSES, *FILTER_STATUSES)
    extra = [name for name in totals if name.startswith("filtered_") and name not in known]  # filters.extra blocks
    rows += [(s, totals.get(s, 0)) for s in (*known, *extra) if totals.get(s, 0)]
    width = max(len(name) for name, _ in rows) + 2
    lines = [f"{'status':<{width}}{'samples':>10}{'share':>9}", "-" * (width + 19)]
    for name, n in rows:
        lines.append(f"{name:<{width}}{n:>10,}{n / max(count, 1):>9.1%}")
    lines.append("-" * (width + 19))
    lines.append(f"{'total':<{width}}{count:>10,}")
    shards = f"{totals.get('shards', 0)} shards" + (
        f" (+{totals['retry_shards']} retry shards)" if totals.get("retry_shards") else ""
    )
    lines.append(shards)
    errors = totals.get("errors") or {}
    if errors:
        lines.append("most common failure causes:")
        lines += [f"  {n:>8,}  {message}" for message, n in list(errors.items())[:10]]
    note = (totals.get("run") or {}).get("note")
    if note:
        lines.append(note)
    return "\n".join(lines)
