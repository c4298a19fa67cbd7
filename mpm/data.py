"""Training data for the image-to-text recipe: pair shards (stage 1) and conversations (stage 2).

Both give `Encoded` samples (input ids, labels on assistant tokens, pixels) to a DataLoader. A sample that cannot
be used (an unreadable image, a conversation that does not fit) is skipped and counted, with the reason and the
file logged: the batch carries the list of skips so the main process can add them to its metrics.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

from dataproc.shards import BadSampleCounter, decode_pair, iter_samples
from mpm.core.errors import ConfigError, DataError
from mpm.core.images import ImageError, open_image
from mpm.core.skips import SkipLog
from mpm.processor import Encoded, MPMProcessor, ProcessingError
from unimm_chat import Conversation, read_conversations

logger = logging.getLogger(__name__)


@dataclass
class Skipped:
    reason: str
    where: str


@dataclass
class Passed:
    """A sample read but not decoded: it lies before the data position a resumed run starts from."""


class PairCaptions(IterableDataset):
    """Stage 1: pair shards -> "<image>\\n{an English caption instruction}" answered with the caption.

    The instruction is picked by a hash of the sample key, so a resumed run sees exactly the same text. Every
    sample of the stream gives one item (an undecodable image a `Skipped`), so a position in batches maps to a
    number of samples per DataLoader worker: resuming at batch `skip_batches` passes over that many samples
    without decoding them (`Passed`), instead of decoding and encoding everything before the position.
    """

    def __init__(
        self,
        shards: list[str],
        weights,
        processor: MPMProcessor,
        prompts: list[str],
        max_length: int,
        shuffle_buffer: int,
        seed: int,
        resampled: bool = False,
        batch_size: int = 1,
        skip_batches: int = 0,
    ):
        self.shards, self.weights, self.processor = shards, weights, processor
        self.prompts, self.max_length, self.shuffle_buffer, self.seed = prompts, max_length, shuffle_buffer, seed
        self.resampled, self.batch_size, self.skip_batches = resampled, batch_size, skip_batches

    def __iter__(self) -> Iterator[Encoded | Skipped | Passed]:
        # without weights, the shard sets are one stream; with weights, a weighted mix of endless streams
        bad = BadSampleCounter()  # undecodable samples (the shard reader logs them sparingly)
        skips = SkipLog(logger, "sample")  # samples that do not fit: the first ten logged, then every 1,000th
        samples = iter_samples(self.shards, self.weights, self.shuffle_buffer, self.seed, self.resampled, bad)
        # The DataLoader takes batch i from worker i % workers, so this worker made these batches before the
        # position (or more, if another worker's stream ended first: the trainer drops all of them anyway).
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        passed = len(range(worker, self.skip_batches, workers)) * self.batch_size
        for n, sample in enumerate(samples):
            if n < passed:
                yield Passed()
                continue
            key = sample.get("__key__", "")
            pair = decode_pair(sample, bad)
            if pair is None:
                yield Skipped("undecodable sample", key)
                continue
            prompt = self.prompts[int(hashlib.md5(key.encode()).hexdigest(), 16) % len(self.prompts)]
            messages = [
                {"role": "user", "content": f"<image>\n{prompt}"},
                {"role": "assistant", "content": pair.caption},
            ]
            try:
                if "<image>" in prompt:  # a raw prompt: the image where the marker is, no chat template
                    yield self.processor.encode_raw(prompt, pair.caption, [pair.image], self.max_length)
                else:
                    yield self.processor.encode_conversation(messages, [pair.image], self.max_length)
            except ProcessingError as exc:
                skips.record(key, str(exc))
                yield Skipped(str(exc), key)


def read_all(files: list[str], image_folder: str | None) -> list[Conversation]:
    """Every conversation of the files; a missing or unreadable file or folder is a ConfigError naming it."""
    if image_folder and not Path(image_folder).is_dir():
        raise ConfigError(f"data.image_folder {image_folder!r} is not a folder")
    try:
        return [c for f in files for c in read_conversations(f)]
    except (OSError, DataError) as exc:
        raise ConfigError(f"data.conversations: {exc}") from None


class Conversations(Dataset):
    """Stage 2: conversations (from `read_all`), images from `image_folder`."""

    def __init__(self, items: list[Conversation], image_folder: str, processor: MPMProcessor, max_length: int):
        self.items = items
        self.image_folder = Path(image_folder) if image_folder else None
        # skips counted exactly (in the batches), logged sparingly: the first ten, then one line every 1,000
        # (each DataLoader worker logs its own)
        self.skips = SkipLog(logger, "conversation")
        self.processor, self.max_length = processor, max_length

    def __len__(self) -> int:
        return len(self.items)

    def length(self, index: int) -> int:
        """A cheap size estimate for grouping batches by length (characters + a fixed cost per image)."""
        conv = self.items[index]
        return sum(len(m.content) for m in conv.messages) + 256 * len(conv.images)

    def __getitem__(self, index: int) -> Encoded | Skipped:
        conv = self.items[index]
        images = []
        for name in conv.images:
            path = self.image_folder / name if self.image_folder else Path(name)
            try:
                images.append(open_image(path))
            except ImageError as exc:  # missing, truncated, too large or not an image: skip
                self.skips.record(conv.id, f"image {path}: {exc}")
                return Skipped(f"unreadable image ({type(exc).__name__})", str(path))
        messages = [{"role": m.role, "content": m.content} for m in conv.messages]
        try:
            return self.processor.encode_conversation(messages, images, self.max_length)
        except ProcessingError as exc:
            self.skips.record(conv.id, str(exc))
            return Skipped(str(exc).split(":")[0], conv.id)


class LengthGroupedSampler(Sampler[list[int]]):
    """Batches of similar lengths (less padding), in a random order that depends only on (seed, epoch): shuffle,
    cut into mega-batches of 50 batches, sort each by length, cut into batches, shuffle the batches."""

    def __init__(
        self, lengths: list[int], batch_size: int, seed: int, group: bool = True, rank: int = 0, world: int = 1
    ):
        self.lengths, self.batch_size, self.seed, self.group = lengths, batch_size, seed, group
        self.rank, self.world = rank, world
        self.epoch = 0

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        size = self.batch_size * self.world
        if self.group:
            mega = size * 50
            order = [
                i
                for s in range(0, len(order), mega)
                for i in sorted(order[s : s + mega], key=lambda i: -self.lengths[i])
            ]
        batches = [order[s : s + size] for s in range(0, len(order) - size + 1, size)]  # whole batches only
        rng.shuffle(batches)
        return [b[self.rank :: self.world] for b in batches]  # each rank its share of every global batch

    def __iter__(self):
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        return len(self.lengths) // (self.batch_size * self.world)


def collate(processor: MPMProcessor, items: list[Encoded | Skipped], pack: int | None = None) -> dict:
    """A batch of the usable items, packed into one row when they fit in `pack` tokens, else padded; and the list
    of skipped ones (for the metrics)."""
    usable = [x for x in items if isinstance(x, Encoded)]
    if not usable:
        batch = {}
    elif pack is not None and sum(len(x.input_ids) for x in usable) <= pack:
        batch = processor.collate_packed(usable)
    else:
        batch = processor.collate(usable)
    batch["samples"] = len(usable)
    batch["skipped"] = [x for x in items if isinstance(x, Skipped)]
    batch["passed"] = sum(isinstance(x, Passed) for x in items)
    return batch


def to_device(batch: dict, device: torch.device) -> dict:
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[key] = value.to(device)
        elif key == "pixel_values" and isinstance(value, list):
            out[key] = [v.to(device) for v in value]
        else:
            out[key] = value
    return out
