"""The text-feature cache: the frozen LLM's states of every training caption, computed once and read back.

With a large LLM the text forward costs more than the UNet step; the LLM never changes (frozen), so each caption's
states are the same every epoch. The cache holds the states `text_proj` reads (before it: text_proj trains).

    {cache}/cache.json                 what made it (LLM and tokenizer fingerprints, hidden layer, max length, dtype)
    {cache}/empty.safetensors          the empty prompt's states (dropped captions, classifier-free guidance)
    {cache}/{shard id}.safetensors     one per pair shard: {sample key: (tokens, width) states}, written whole,
                                       stamped with the shard's size and modification time

Building resumes per shard (a shard's file is written atomically, last); a shard that changed since (re-sharded
into the same folder) is encoded again. A cache made with another LLM, tokenizer, layer, maximum length or dtype
is refused with a message naming which.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from tqdm import tqdm

from dataproc.shards import iter_captions, shard_urls
from mpm.core.errors import ConfigError
from mpm.core.files import atomic_write_bytes, atomic_write_json
from t2i.pipeline import llm_states, tokenize_prompts

logger = logging.getLogger(__name__)
EMPTY = "empty.safetensors"


def llm_fingerprint(text_encoder) -> str:
    """A short hash of the LLM's config and the first values of every weight: another model, or the same folder
    retrained, gives another fingerprint (cheap: a few thousand values per tensor, not gigabytes). The path, the
    transformers version and the dtype (checked on its own) are left out."""
    digest = hashlib.sha256()
    config = text_encoder.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        config.pop(key, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, param in text_encoder.state_dict().items():
        digest.update(name.encode())
        digest.update(param.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary and the end / pad tokens (what turns a caption into the LLM's input)."""
    digest = hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    digest.update(f"{tokenizer.eos_token_id}:{tokenizer.pad_token_id}".encode())
    return digest.hexdigest()[:16]


def shard_id(url: str) -> str:
    """The cache file of a shard: a hash of its absolute path (two shard sets may both hold 00000.tar)."""
    return hashlib.sha1(str(Path(url).resolve()).encode()).hexdigest()[:16]


class TextFeatureCache:
    """Reads cached states by (shard, key); each DataLoader worker opens the files it needs (memory-mapped)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._open: dict[str, tuple] = {}

    def empty(self) -> torch.Tensor:
        with safe_open(self.folder / EMPTY, "pt") as f:
            return f.get_tensor("states")

    def get(self, url: str, key: str) -> torch.Tensor | None:
        """The states of sample `key` of shard `url`, or None when the cache does not hold it (a caption that could
        not be read when the cache was built)."""
        sid = shard_id(url)
        if sid not in self._open:
            path = self.folder / f"{sid}.safetensors"
            if not path.is_file():
                raise ConfigError(
                    f"data.text_feature_cache {self.folder} holds no features for shard {url}: rebuild it"
                )
            handle = safe_open(path, "pt")
            self._open[sid] = (handle, set(handle.keys()))
        handle, keys = self._open[sid]
        return handle.get_tensor(key) if key in keys else None

    def __getstate__(self):  # DataLoader workers open their own handles
        return {"folder": self.folder, "_open": {}}


def build_cache(folder: str | Path, shards: list[str], text_encoder, tokenizer, text_proj_config, device,
                rank: int = 0, world: int = 1, batch_size: int = 32, show_progress: bool = True) -> TextFeatureCache:  # fmt: skip
    """The cache of every caption of `shards`, or a ConfigError if the folder holds one made with other settings.

    Shards already cached are kept, unless the shard changed since (its size or modification time: a re-sharded
    folder reuses keys). With several processes each encodes every `world`-th shard from `rank`, then waits for
    the others' files (polling files, not a collective: encoding LAION-scale shards takes longer than a
    collective's timeout); call it on every process.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"data.text_feature_cache {folder} is a file: give a folder")
    urls = [url for pattern in shards for url in shard_urls(pattern)]
    remote = [u for u in urls if "://" in u or u.startswith("pipe:")]
    if remote:
        raise ConfigError(f"data.text_feature_cache reads local shards; {remote[0]} is remote: copy the shards locally")
    identity = {
        "llm": str(text_encoder.config._name_or_path or text_encoder.config.model_type),
        "fingerprint": llm_fingerprint(text_encoder),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "hidden_layer": text_proj_config.hidden_layer,
        "max_length": text_proj_config.max_length,
        "dtype": str(text_encoder.dtype).removeprefix("torch."),
    }

    def encode(captions: list[str]) -> list[torch.Tensor]:
        ids, mask, _ = tokenize_prompts(tokenizer, captions, text_proj_config.max_length)
        states = llm_states(text_encoder, ids.to(device), mask.to(device), text_proj_config.hidden_layer)
        return [s[: int(m.sum())].contiguous().cpu() for s, m in zip(states, mask)]

    if rank == 0:
        check_identity(folder, identity)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "cache.json", {**identity, "shards": {url: shard_id(url) for url in urls}})
        if not (folder / EMPTY).is_file():
            with torch.no_grad():
                atomic_write_bytes(folder / EMPTY, safetensors_bytes({"states": encode([""])[0]}))
    else:
        _wait_for(lambda: (folder / EMPTY).is_file(), "the main process to start the text-feature cache")
        check_identity(folder, identity)
    todo = [url for url in urls[rank::world] if not _is_current(folder, url)]
    with torch.no_grad():
        for url in tqdm(todo, unit=" shards", desc="caching text features", disable=not show_progress):
            features: dict[str, torch.Tensor] = {}
            # by length: a batch pads to its longest caption (on web captions about 30% less LLM work than shard order)
            pairs = sorted(iter_captions(url), key=lambda pair: len(pair[1]))
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start : start + batch_size]
                features.update(zip([k for k, _ in chunk], encode([c for _, c in chunk])))
            atomic_write_bytes(folder / f"{shard_id(url)}.safetensors", safetensors_bytes(features, _stamp(url)))
    if world > 1:
        _wait_for(lambda: all(_is_current(folder, u) for u in urls), "the other processes' text-feature shards")
    return TextFeatureCache(folder)


def _stamp(url: str) -> dict[str, str]:
    """What identifies a shard's contents cheaply: its size and modification time (safetensors metadata)."""
    stat = os.stat(url)
    return {"tar_size": str(stat.st_size), "tar_mtime_ns": str(stat.st_mtime_ns)}


def _is_current(folder: Path, url: str) -> bool:
    path = folder / f"{shard_id(url)}.safetensors"
    if not path.is_file():
        return False
    with safe_open(path, "pt") as f:
        return f.metadata() == _stamp(url)


def _wait_for(done, what: str, poll_s: float = 2.0) -> None:
    waited = 0.0
    while not done():
        time.sleep(poll_s)
        waited += poll_s
        if waited % 300 < poll_s:
            logger.warning("still waiting for %s (%d min)", what, waited // 60)


def check_identity(folder: Path, identity: dict) -> None:
    """A cache made with another LLM, layer, length or dtype would give the UNet other states than training
    with it live: refuse it, naming what differs."""
    saved_file = folder / "cache.json"
    if not saved_file.is_file():
        if folder.is_dir() and any(folder.iterdir()):
            raise ConfigError(
                f"data.text_feature_cache {folder} is a folder that holds no text-feature cache: use another"
            )
        return
    saved = json.loads(saved_file.read_text())
    names = {"fingerprint": "LLM", "tokenizer": "tokenizer", "hidden_layer": "hidden layer",
             "max_length": "maximum length", "dtype": "dtype"}  # fmt: skip
    for key, name in names.items():
        if saved.get(key) != identity[key]:
            made, now = saved.get(key), identity[key]
            if key == "fingerprint":
                made, now = f"{saved.get('llm')} ({made})", f"{identity['llm']} ({now})"
            raise ConfigError(
                f"data.text_feature_cache {folder} was made with another {name} ({made}; this run: {now}): use a new "
                "folder, or delete this one to rebuild it"
            )
