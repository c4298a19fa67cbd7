"""The one reader of pair shards for trainers: `iter_pairs` streams (image, caption, metadata).

`iter_samples` + `decode_pair` are the same stream in two steps, for readers that skip samples cheaply.

Both the image-to-text and the text-to-image recipes read `mpm data shard` output through it. The on-disk
format is described in `dataproc.shard_layout`.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset

from dataproc.shard_layout import IMAGE_FIELDS, expand_paths
from mpm.core.images import upright_rgb
from mpm.core.skips import SkipLog

logger = logging.getLogger(__name__)


class Pair(NamedTuple):
    image: Image.Image  # RGB
    caption: str
    meta: dict  # the sample's .json (url, lang, sizes, saved input columns, ...) plus "__key__", "__url__"


@dataclass
class BadSampleCounter:
    """The one bad-sample policy of the shard reader: count it, keep its key (the first 1,000), skip it. The
    first skips are logged in full, then one line every 1,000 (mpm.core.skips), so a dirty shard cannot bury a
    real error; the count stays exact."""

    count: int = 0
    keys: list[str] = field(default_factory=list)
    log: SkipLog = field(default_factory=lambda: SkipLog(logger, "bad sample"))

    def record(self, key: str, reason: str) -> None:
        self.count += 1
        if len(self.keys) < 1000:
            self.keys.append(key)
        self.log.record(key, reason)


def shard_urls(pattern: str | Sequence[str]) -> list[str]:
    """A brace pattern ("out/{00000..00009}.tar"), a folder of .tar files, a glob, or a list of them."""
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
    missing = [u for u in urls if "://" not in u and not u.startswith("pipe:") and not Path(u).exists()]
    if missing:  # a local path that is not there (remote URLs are webdataset's to open)
        raise FileNotFoundError(f"no .tar shards match {missing[0]}; did you run `mpm data shard`?")
    return urls


def decode_pair(sample: dict, bad: BadSampleCounter) -> Pair | None:
    """A raw sample from `iter_samples` as a `Pair`, or None (counted and logged in `bad`) when it cannot be."""
    key = sample.get("__key__", "?")
    try:
        field_name = next((f for f in IMAGE_FIELDS if f in sample), None)
        if field_name is None:
            raise ValueError(f"no image field among {sorted(k for k in sample if not k.startswith('__'))}")
        with Image.open(io.BytesIO(sample[field_name])) as im:
            image = upright_rgb(im)  # shards from other tools may hold RGBA, 16-bit or EXIF-rotated images
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
) -> IterableDataset:
    """Stream `Pair(image, caption, meta)` from pair shards, split across ranks and DataLoader workers.

    Returns an IterableDataset: iterate it directly, or give it to a `torch.utils.data.DataLoader` (with
    `collate_fn` of your choice); with `num_workers > 0` each worker reads different shards.

    Args:
        patterns: one shard set (a brace pattern, folder, glob or list of shards), or, with `weights`, a list
            of shard sets to mix.
        weights: sampling weight of each shard set (normalised). Each set is resampled forever when mixing, so
            the stream has no end: stop after the number of steps you want.
        shuffle_buffer: samples held for shuffling (0 = keep shard order, no shard shuffle).
        seed: shard-shuffle, sample-shuffle and mixing seed.
        resampled: draw shards with replacement forever (multi-node training without epoch balancing).
        bad_samples: collects the keys of undecodable samples (count, log, skip); one is made if None. With
            DataLoader workers, each worker process counts its own.

    Ranks come from RANK/WORLD_SIZE or torch.distributed, workers from the DataLoader: without resampling each
    gets disjoint shards (webdataset's split_by_node / split_by_worker).
    """
    bad = bad_samples if bad_samples is not None else BadSampleCounter()
    samples = iter_samples(patterns, weights, shuffle_buffer, seed, resampled, bad)
    return wds.DataPipeline(samples, wds.map(partial(decode_pair, bad=bad)), wds.select(_is_pair))


def iter_samples(
    patterns: str | Sequence[str] | Sequence[Sequence[str]],
    weights: Sequence[float] | None = None,
    shuffle_buffer: int = 1000,
    seed: int = 0,
    resampled: bool = False,
    bad_samples: BadSampleCounter | None = None,
) -> IterableDataset:
    """The raw samples behind `iter_pairs` (webdataset dicts of bytes), in the same order, not yet decoded.

    For a reader that must pass over many samples cheaply (a trainer resuming mid-stream reads their bytes but
    does not decode them) and turns the others into pairs with `decode_pair`. Same arguments as `iter_pairs`;
    `bad_samples` counts unreadable shards here.
    """
    bad = bad_samples if bad_samples is not None else BadSampleCounter()
    if weights is None:
        return _pipeline(shard_urls(patterns), resampled, seed, shuffle_buffer, bad)
    sets = list(patterns)
    if len(sets) != len(weights):
        raise ValueError(f"`weights` has {len(weights)} values but `patterns` has {len(sets)} shard sets")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"`weights` must be non-negative with a positive sum, got {list(weights)}")
    sources = [_pipeline(shard_urls(s), True, seed + i, shuffle_buffer, bad) for i, s in enumerate(sets)]
    return WeightedMix(sources, list(weights), seed)


def _pipeline(
    urls: list[str], resampled: bool, seed: int, shuffle_buffer: int, bad: BadSampleCounter
) -> wds.DataPipeline:
    # Explicit stages (open_clip style): which shards, who reads them, then samples.
    if resampled:  # per rank/worker seeds derive from `seed` (deterministic=True)
        stages = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker]
        if shuffle_buffer:
            stages.append(wds.detshuffle(len(urls), initial=len(urls), seed=seed))
    stages.append(wds.tarfile_to_samples(handler=_shard_error_handler(bad)))
    if shuffle_buffer:
        stages.append(partial(_shuffle_samples, buffer=shuffle_buffer, seed=seed))
    return wds.DataPipeline(*stages)


def _shuffle_samples(samples, buffer: int, seed: int):
    # Seeded per rank and worker when iteration starts: with one seed for all, ranks that draw the same shard
    # (resampling) would read it in the same order.
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    rng = random.Random(f"{seed}:{rank}:{worker}")
    return wds.shuffle(buffer, initial=min(buffer, 100), rng=rng)(samples)


def _is_pair(item) -> bool:
    return item is not None


class WeightedMix(IterableDataset):
    """Draws each sample from one of several endless sources with probability proportional to its weight."""

    def __init__(self, sources: list, weights: list[float], seed: int):
        self.sources, self.weights, self.seed = sources, weights, seed

    def __iter__(self) -> Iterator[Pair]:
        rng = random.Random(self.seed * 100_003 + wds.utils.pytorch_worker_seed())  # differs per rank and worker
        iterators = [iter(s) for s in self.sources]
        choices = range(len(iterators))
        while True:
            yield next(iterators[rng.choices(choices, weights=self.weights)[0]])


def _shard_error_handler(bad: BadSampleCounter):
    def handler(exc: Exception) -> bool:
        bad.record(getattr(exc, "url", "?"), f"{type(exc).__name__}: {exc}")
        return True  # continue with the next sample / shard

    return handler


def iter_captions(url: str) -> Iterator[tuple[str, str]]:
    """(key, caption) of every sample of ONE shard, in the shard's order, without decoding images (a text-feature
    cache reads only the captions). A caption that is not UTF-8 is counted, logged and skipped."""
    import tarfile

    bad = BadSampleCounter()
    with tarfile.open(url) as tar:
        for member in tar:
            key, _, extension = member.name.partition(".")
            if extension != "txt" or not member.isfile():
                continue
            try:
                yield key, tar.extractfile(member).read().decode("utf-8")
            except UnicodeDecodeError as exc:
                bad.record(key, f"caption is not UTF-8: {exc}")
