"""Training samples of the text-to-image recipe: pair shards -> (pixels in [-1, 1], caption or cached states).

Every sample of the stream gives one item (an undecodable one a `Skipped`), so a data position in batches is a
number of samples per DataLoader worker: a resumed run passes over that many samples without decoding them.
Each sample's random choices (crop, flip, caption dropout) come from a hash of the seed (which changes per epoch),
the rank, the DataLoader worker, the sample's position in that worker's stream and its key: the same in a resumed
run and with or without the text-feature cache, and new each time a resampled stream (several processes, weighted
shard sets: no epochs) brings the sample back.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset

from dataproc.shards import BadSampleCounter, decode_pair, iter_samples


@dataclass
class Sample:
    pixels: torch.Tensor  # (3, R, R) in [-1, 1]
    caption: str  # "" when dropped
    states: torch.Tensor | None  # cached LLM states (tokens, width), None when live or dropped
    key: str = ""  # the shard sample's key


@dataclass
class Skipped:
    reason: str


class Passed:
    """A sample read but not decoded: it lies before the data position a resumed run starts from."""


class PairImages(IterableDataset):
    def __init__(self, shards, weights, resolution: int, center_crop: bool, random_flip: bool, caption_dropout: float,
                 shuffle_buffer: int, seed: int, resampled: bool = False, batch_size: int = 1, skip_batches: int = 0,
                 cache=None):  # fmt: skip
        self.shards, self.weights, self.resolution = shards, weights, resolution
        self.center_crop, self.random_flip, self.caption_dropout = center_crop, random_flip, caption_dropout
        self.shuffle_buffer, self.seed, self.resampled = shuffle_buffer, seed, resampled
        self.batch_size, self.skip_batches, self.cache = batch_size, skip_batches, cache

    def __iter__(self) -> Iterator[Sample | Skipped | Passed]:
        bad = BadSampleCounter()  # counts and logs undecodable samples sparingly
        samples = iter_samples(self.shards, self.weights, self.shuffle_buffer, self.seed, self.resampled, bad)
        # The DataLoader takes batch i from worker i % workers: this worker made these batches before the position.
        rank, _, worker, workers = wds.utils.pytorch_worker_info()
        passed = len(range(worker, self.skip_batches, workers)) * self.batch_size
        for n, sample in enumerate(samples):
            if n < passed:
                yield Passed()
                continue
            pair = decode_pair(sample, bad)
            if pair is None:
                yield Skipped("undecodable sample")
                continue
            key = sample["__key__"]
            # not the shard's path: a run's choices must not depend on where its shards lie
            where = f"{self.seed}:{rank}:{worker}:{n}:{key}"
            rng = random.Random(hashlib.md5(where.encode()).digest())
            dropped = rng.random() < self.caption_dropout
            states = None
            if self.cache is not None and not dropped:
                states = self.cache.get(sample["__url__"], key)
                if states is None:
                    yield Skipped(f"no cached text features for {key}")
                    continue
            pixels = to_pixels(pair.image, self.resolution, self.center_crop, self.random_flip, rng)
            yield Sample(pixels, "" if dropped else pair.caption, states, key)


def to_pixels(image: Image.Image, resolution: int, center_crop: bool, random_flip: bool, rng: random.Random):
    """Shorter side resized to `resolution`, a square crop (centre or random), maybe flipped; (3, R, R) in [-1, 1]."""
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    if center_crop:
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    else:
        left, top = rng.randint(0, size[0] - resolution), rng.randint(0, size[1] - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def collate(items: list) -> dict:
    """A micro-batch: pixels, captions and cached states of the usable samples, and what was skipped or passed."""
    usable = [i for i in items if isinstance(i, Sample)]
    batch = {
        "skipped": [i.reason for i in items if isinstance(i, Skipped)],
        "passed": any(isinstance(i, Passed) for i in items),
        "captions": [i.caption for i in usable],
        "states": [i.states for i in usable],  # None for live encoding and for dropped captions
    }
    if usable:
        batch["pixels"] = torch.stack([i.pixels for i in usable])
    return batch
