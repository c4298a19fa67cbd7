"""Pair shards: the on-disk contract (DESIGN.md "Pair shards") and the one reader trainers use.

Layout of an output folder:
    {shard:05d}.tar            samples {key}.jpg|webp|png, {key}.txt (caption), {key}.json (metadata)
    {shard:05d}.parquet        one row per INPUT sample of the shard, failures included (status, error_message)
    {shard:05d}_stats.json     written last and atomically: marks the shard complete
    stats.json                 run totals; config.yaml: the resolved config the run used
Keys are digits only, `{shard:05d}{index:04d}` (webdataset splits keys at the first dot).
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import webdataset as wds
from PIL import Image

logger = logging.getLogger(__name__)

# Every status a sample can end with. Stats files count each (as "successes" for success).
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


def empty_counts() -> dict[str, int]:
    return {"count": 0, "successes": 0, **{s: 0 for s in FAILURE_STATUSES + FILTER_STATUSES}}


def count_statuses(statuses: Sequence[str]) -> dict[str, int]:
    counts = empty_counts()
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
        for name in totals:
            totals[name] += stats.get(name, 0)
        for message, n in stats.get("errors", {}).items():
            errors[message] = errors.get(message, 0) + n
    totals["shards"] = shards
    totals["retry_shards"] = retry_shards
    totals["errors"] = dict(sorted(errors.items(), key=lambda kv: -kv[1])[:50])
    return totals


# ---------------------------------------------------------------------------------------------------------------
# The reader for trainers


class Pair(NamedTuple):
    image: Image.Image  # RGB
    caption: str
    meta: dict  # the sample's .json (url, lang, sizes, saved input columns, ...) plus "__key__", "__url__"


@dataclass
class BadSampleCounter:
    """The one bad-sample policy of the shard reader: count it, log its key, skip it."""

    count: int = 0
    keys: list[str] = field(default_factory=list)

    def record(self, key: str, reason: str) -> None:
        self.count += 1
        if len(self.keys) < 1000:
            self.keys.append(key)
        logger.warning("skipping bad sample %s: %s", key, reason)


def shard_urls(pattern: str | Sequence[str]) -> list[str]:
    """A brace pattern ("out/{00000..00009}.tar"), a folder of .tar files, a glob, or a list of them."""
    from dataproc.sharder.readers import expand_paths

    patterns = [pattern] if isinstance(pattern, str | Path) else list(pattern)
    urls: list[str] = []
    for p in patterns:
        p = str(p)
        if Path(p).is_dir():
            urls.extend(str(f) for f in sorted(Path(p).glob("*.tar")))
        else:
            urls.extend(expand_paths(p))
    if not urls:
        raise FileNotFoundError(f"no .tar shards match {patterns}; did you run `mpm data shard`?")
    return urls


def _decode_pair(sample: dict, bad: BadSampleCounter) -> Pair | None:
    key = sample.get("__key__", "?")
    try:
        field_name = next((f for f in IMAGE_FIELDS if f in sample), None)
        if field_name is None:
            raise ValueError(f"no image field among {sorted(k for k in sample if not k.startswith('__'))}")
        with Image.open(io.BytesIO(sample[field_name])) as im:
            image = im.convert("RGB")
        caption = sample["txt"].decode("utf-8") if "txt" in sample else ""
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except Exception as exc:  # the policy: any undecodable sample is counted, logged and skipped
        bad.record(key, f"{type(exc).__name__}: {exc}")
        return None
    meta["__key__"], meta["__url__"] = key, sample.get("__url__")
    return Pair(image, caption, meta)


def iter_pairs(
    patterns: str | Sequence[str] | Sequence[Sequence[str]],
    weights: Sequence[float] | None = None,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    resampled: bool = False,
    bad_samples: BadSampleCounter | None = None,
) -> Iterator[Pair]:
    """Stream `Pair(image, caption, meta)` from pair shards, split across ranks and DataLoader workers.

    Args:
        patterns: one shard set (a brace pattern, folder, glob or list of shards), or, with `weights`, a list
            of shard sets to mix.
        weights: sampling weight of each shard set (normalised); each set is resampled forever when mixing, so
            an epoch has no end: stop after the number of steps you want.
        shuffle_buffer: samples held for shuffling (0 = keep shard order).
        seed: shard-shuffle and sample-shuffle seed.
        resampled: draw shards with replacement forever (multi-node training without epoch balancing).
        bad_samples: collects the keys of undecodable samples (count, log, skip); one is made if None.

    Ranks come from torch.distributed (or RANK/WORLD_SIZE), workers from the DataLoader: each gets disjoint
    shards when not resampled (webdataset's split_by_node / split_by_worker).
    """
    bad = bad_samples if bad_samples is not None else BadSampleCounter()
    if weights is None:
        sets = [patterns]
    else:
        sets = list(patterns)
        if len(sets) != len(weights):
            raise ValueError(f"`weights` has {len(weights)} values but `patterns` has {len(sets)} shard sets")
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"`weights` must be non-negative with a positive sum, got {list(weights)}")

    def pipeline(urls: list[str], resample: bool, set_seed: int) -> wds.DataPipeline:
        # Explicit stages (open_clip style): which shards, who reads them, then samples.
        if resample:  # per rank/worker seeds derive from `set_seed` (deterministic=True)
            stages = [wds.ResampledShards(urls, seed=set_seed, deterministic=True)]
        else:
            stages = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker]
            if shuffle_buffer:
                stages.append(wds.detshuffle(len(urls), initial=len(urls), seed=set_seed))
        stages.append(wds.tarfile_to_samples(handler=_shard_error_handler(bad)))
        if shuffle_buffer:
            stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), rng=random.Random(set_seed)))
        stages += [wds.map(lambda s: _decode_pair(s, bad)), wds.select(lambda p: p is not None)]
        return wds.DataPipeline(*stages)

    if weights is None:
        yield from pipeline(shard_urls(sets[0]), resampled, seed)
        return
    # Mixing by weight: each set repeats (resampled), so the mix never ends and proportions hold.
    sources = [iter(pipeline(shard_urls(s), True, seed + i)) for i, s in enumerate(sets)]
    rng = random.Random(seed)
    choices = range(len(sources))
    while True:
        yield next(sources[rng.choices(choices, weights=weights)[0]])


def _shard_error_handler(bad: BadSampleCounter):
    def handler(exc: Exception) -> bool:
        bad.record(getattr(exc, "url", "?"), f"{type(exc).__name__}: {exc}")
        return True  # continue with the next sample / shard

    return handler


def format_stats_table(totals: dict[str, Any]) -> str:
    """The summary printed after a run and by `mpm data stats`: every non-zero status, with failure causes."""
    count = totals.get("count", 0)
    rows = [("success", totals.get("successes", 0))]
    rows += [(s, totals.get(s, 0)) for s in FAILURE_STATUSES + FILTER_STATUSES if totals.get(s, 0)]
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
    return "\n".join(lines)
