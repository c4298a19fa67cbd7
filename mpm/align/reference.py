"""Reference log-probs, computed once with the reference model and cached beside the data.

DPO compares the policy with a frozen reference model on every pair; the reference's log-probs never change, so
they are computed once, stored per token (so any gamma or normalisation can be applied to them later), and the
training loop never runs (or even loads) the reference model when the cache is complete.

    <data file>.refcache/
        manifest.json          what the cache was computed from: the reference model (its path and a fingerprint
                               of its files), the data (a digest of the file and the encoding settings)
        part-R-NNNNN-T.pt      {"keys": [...], "chosen": [(n_i,) float32], "rejected": [(m_i,) float32],
                               "hashes": {key: digest of the two answers' token ids},
                               "skipped": {key: reason}} (pairs that cannot be encoded: too long, a bad image);
                               written atomically by process R every `part_size` pairs (T: a unique stamp, so
                               processes and concurrent runs never write the same name): a kill keeps every part

Pairs are keyed by their record number in the data file (ids repeat in some public sets), and each entry carries
a digest of the pair's answer tokens: a pair that encodes otherwise at training time (another tokenizer, data
edited in place) is refused rather than trained against another pair's numbers.

A cache computed from another model or other data is refused, naming which (delete the folder, or recompute with
`--no-cache`). When the reference model's folder is gone, a cache made from the same path is trusted: that is
the point of the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mpm.align.batches import EncodedPair, collate_pairs, encode_pair, response_hash, response_logps, unpadded
from mpm.align.data import PreferencePair
from mpm.align.losses import is_degenerate
from mpm.core.errors import ConfigError, DataError
from mpm.core.files import atomic_write_bytes, atomic_write_json
from mpm.data import to_device

logger = logging.getLogger(__name__)
MANIFEST = "manifest.json"
VERSION = 2
_SAMPLE = 1 << 20  # bytes read at each sampled offset of a weight file for its fingerprint
_STRIDE = 1 << 28  # a sample every 256 MiB (and the last MiB)


def default_folder(data: str | Path) -> Path:
    data = Path(data)
    return data.with_name(data.name + ".refcache")


def model_fingerprint(folder: str | Path) -> str | None:
    """A digest of a saved model's config.json and weight files (name, size, 1 MiB every 256 MiB and the last
    MiB of each): changes when the model does without reading gigabytes. None when the folder is gone."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return None
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for weights in sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")]):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with weights.open("rb") as f:
            for offset in [*range(0, size, _STRIDE), max(size - _SAMPLE, 0)]:
                f.seek(offset)
                digest.update(f.read(_SAMPLE))
    return digest.hexdigest()[:16]


def data_fingerprint(path: str | Path, settings: dict) -> str:
    """A digest of the data file's bytes and the settings that change what is encoded (max_length, the chat
    template, the image folder, the precision)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def expected_manifest(model: str | Path, data: str | Path, data_settings: dict) -> dict:
    """What a cache for this reference model and data must say it was computed from (hashes the data once)."""
    return {
        "version": VERSION,
        "model": {"path": str(Path(model).resolve()), "fingerprint": model_fingerprint(model)},
        "data": {"path": str(Path(data).resolve()), "fingerprint": data_fingerprint(data, data_settings)},
    }


class ReferenceCache:
    """Per-pair reference log-probs of the scored tokens of each side, read from and added to `folder`."""

    def __init__(self, folder: Path, manifest: dict, rank: int = 0):
        self.folder, self.manifest, self.rank = folder, manifest, rank
        self.entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hashes: dict[str, str] = {}
        self.skipped: dict[str, str] = {}  # key -> why the pair cannot be used
        self._written = 0
        for part in sorted(folder.glob("part-*.pt")):  # (a part being written is a hidden temporary: not seen)
            stored = torch.load(part, weights_only=True)
            for i, key in enumerate(stored["keys"]):
                self.entries[key] = (stored["chosen"][i], stored["rejected"][i])
            self.hashes.update(stored["hashes"])
            self.skipped.update(stored["skipped"])

    @classmethod
    def open(cls, folder: str | Path, wanted: dict, recompute: bool = False, create: bool = True,
             rank: int = 0) -> ReferenceCache:  # fmt: skip
        """The cache in `folder` for `wanted` (`expected_manifest`); refused when it was made from another model or
        other data; emptied first when `recompute`; created when absent and `create`."""
        folder = Path(folder)
        if recompute and folder.exists():
            shutil.rmtree(folder)
        manifest_file = folder / MANIFEST
        if manifest_file.is_file():
            _check_same(folder, json.loads(manifest_file.read_text(encoding="utf-8")), wanted)
        elif folder.exists() and any(folder.glob("part-*.pt")):
            raise ConfigError(f"reference cache {folder}: the folder holds parts but no {MANIFEST}; delete it")
        elif wanted["model"]["fingerprint"] is None:
            raise ConfigError(
                f"reference model {wanted['model']['path']}: no saved model there (config.json) and no cache to use"
            )
        elif not create:
            raise ConfigError(f"reference cache {folder} has no {MANIFEST}: it was not created (shared storage?)")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(manifest_file, wanted)
        return cls(folder, wanted, rank)

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys neither computed nor known to be unusable."""
        return [k for k in keys if k not in self.entries and k not in self.skipped]

    def add(self, keys: list[str], chosen: list[torch.Tensor], rejected: list[torch.Tensor],
            hashes: dict[str, str] | None = None, skipped: dict[str, str] | None = None) -> None:  # fmt: skip
        """Store one part (written atomically, under a name no other process or run uses)."""
        part = self.folder / f"part-{self.rank}-{self._written:05d}-{time.time_ns()}.pt"
        record = {"keys": keys, "chosen": chosen, "rejected": rejected, "hashes": dict(hashes or {}),
                  "skipped": dict(skipped or {})}  # fmt: skip
        buffer = io.BytesIO()
        torch.save(record, buffer)
        atomic_write_bytes(part, buffer.getvalue())
        self._written += 1
        for i, key in enumerate(keys):
            self.entries[key] = (chosen[i], rejected[i])
        self.hashes.update(hashes or {})
        self.skipped.update(skipped or {})

    def get(self, pairs: list[EncodedPair]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The cached log-probs of these encoded pairs, after checking each still encodes as it did."""
        for pair in pairs:
            if pair.id not in self.entries:
                raise KeyError(f"reference cache {self.folder} has no log-probs for pair {pair.id}")
            if self.hashes.get(pair.id) != response_hash(pair):
                raise ConfigError(
                    f"pair {pair.id} of the data now encodes otherwise than when reference cache {self.folder} was "
                    "computed (another tokenizer or processor, or the data changed): rerun with --no-cache"
                )
        return [self.entries[p.id][0] for p in pairs], [self.entries[p.id][1] for p in pairs]


def _check_same(folder: Path, found: dict, wanted: dict) -> None:
    if found.get("version") != VERSION:
        raise ConfigError(f"reference cache {folder} was written by another version of this toolkit: delete it")
    if found["data"]["fingerprint"] != wanted["data"]["fingerprint"]:
        raise ConfigError(
            f"reference cache {folder} was computed for other data ({found['data']['path']}, fingerprint "
            f"{found['data']['fingerprint']}; now {wanted['data']['path']}, {wanted['data']['fingerprint']}: the "
            "file, data.max_length, the chat template or the precision changed): delete it or run with --no-cache "
            "to recompute"
        )
    same_path = found["model"]["path"] == wanted["model"]["path"]
    now = wanted["model"]["fingerprint"]
    if now is None and same_path:
        logger.info("reference model %s is gone; using its cached log-probs (%s)", found["model"]["path"], folder)
        return
    if found["model"]["fingerprint"] != now:
        raise ConfigError(
            f"reference cache {folder} was computed with another reference model ({found['model']['path']}, "
            f"fingerprint {found['model']['fingerprint']}; now {wanted['model']['path']}, {now}): delete it or run "
            "with --no-cache to recompute"
        )


@torch.no_grad()
def fill(cache: ReferenceCache, load_model: Callable[[], Any], processor, items: list[tuple[str, PreferencePair]],
         max_length: int, batch_size: int, part_size: int = 512, show_progress: bool = True,
         autocast: Callable[[], Any] = contextlib.nullcontext, raw_prompt: str | None = None) -> int:  # fmt: skip
    """Encode the (key, pair) items the cache lacks and compute their reference log-probs (under `autocast`: the
    policy's precision), loading the reference model only if any are missing; a pair that cannot be encoded is
    recorded as skipped, with the reason. Returns how many keys were added (computed or skipped)."""
    missing = set(cache.missing(key for key, _ in items))
    todo = [(key, pair) for key, pair in items if key in missing]
    if not todo:
        return 0
    model = load_model().eval()
    device = next(model.parameters()).device
    keys, chosen, rejected, hashes, skipped = [], [], [], {}, {}
    for start in tqdm(range(0, len(todo), batch_size), desc="reference log-probs", unit="batch",
                      disable=not show_progress):  # fmt: skip
        group = []
        for key, pair in todo[start : start + batch_size]:
            try:
                encoded = encode_pair(processor, pair, max_length, key=key, raw_prompt=raw_prompt)
            except DataError as exc:  # ProcessingError (too long), a missing or undecodable image
                skipped[key] = f"{type(exc).__name__}: {exc}"
                continue
            if is_degenerate(*encoded.response_ids()):
                skipped[key] = "identical: the two answers tokenize the same (no gradient)"
                continue
            group.append(encoded)
        if group:
            with autocast():
                rows = unpadded(*response_logps(model, to_device(collate_pairs(processor, group), device)))
            keys += [p.id for p in group]
            chosen += rows[: len(group)]
            rejected += rows[len(group) :]
            hashes.update({p.id: response_hash(p) for p in group})
        if len(keys) + len(skipped) >= part_size:
            cache.add(keys, chosen, rejected, hashes, skipped)
            keys, chosen, rejected, hashes, skipped = [], [], [], {}, {}
    if keys or skipped:
        cache.add(keys, chosen, rejected, hashes, skipped)
    return len(todo)
