"""The text-feature cache: the frozen LLM's states of every training caption, computed once and read back.

With a large LLM the text forward costs more than the UNet step; the LLM never changes (frozen), so each caption's
states are the same every epoch. The cache holds the states `text_proj` reads (before it: text_proj trains).

    {cache}/cache.json                 what made it (LLM fingerprint, hidden layer, max length, dtype) + shard index
    {cache}/empty.safetensors          the empty prompt's states (dropped captions, classifier-free guidance)
    {cache}/{shard id}.safetensors     one per pair shard: {sample key: (tokens, width) states}, written whole

Building resumes per shard (a shard's file is written atomically, last). A cache made with another LLM, layer,
maximum length or dtype is refused with a message naming which.
"""

from __future__ import annotations

import hashlib
import json
import logging
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
    retrained, gives another fingerprint (cheap: a few thousand values per tensor, not gigabytes)."""
    digest = hashlib.sha256()
    config = text_encoder.config.to_dict()
    config.pop("_name_or_path", None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, param in text_encoder.state_dict().items():
        digest.update(name.encode())
        digest.update(param.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def shard_id(url: str) -> str:
    """The cache file of a shard: a hash of its absolute path (two shard sets may both hold 00000.tar)."""
    return hashlib.sha1(str(Path(url).resolve()).encode()).hexdigest()[:16]


class TextFeatureCache:
    """Reads cached states by (shard, key); each DataLoader worker opens the files it needs (memory-mapped)."""

    def __init__(self, folder: str | Path, identity: dict):
        self.folder = Path(folder)
        self.identity = identity
        self._open: dict[str, object] = {}

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
        return {"folder": self.folder, "identity": self.identity, "_open": {}}


def build_cache(folder: str | Path, shards: list[str], text_encoder, tokenizer, text_proj_config, device,
                batch_size: int = 32, show_progress: bool = True) -> TextFeatureCache:  # fmt: skip
    """The cache of every caption of `shards` (resuming: shards already cached are kept), or a ConfigError if the
    folder holds a cache made with other settings."""
    folder = Path(folder)
    identity = {
        "llm": str(text_encoder.config._name_or_path or text_encoder.config.model_type),
        "fingerprint": llm_fingerprint(text_encoder),
        "hidden_layer": text_proj_config.hidden_layer,
        "max_length": text_proj_config.max_length,
        "dtype": str(text_encoder.dtype).removeprefix("torch."),
    }
    check_identity(folder, identity)
    folder.mkdir(parents=True, exist_ok=True)
    urls = [url for pattern in shards for url in shard_urls(pattern)]
    atomic_write_json(folder / "cache.json", {**identity, "shards": {url: shard_id(url) for url in urls}})

    def encode(captions: list[str]) -> list[torch.Tensor]:
        ids, mask, _ = tokenize_prompts(tokenizer, captions, text_proj_config.max_length)
        states = llm_states(text_encoder, ids.to(device), mask.to(device), text_proj_config.hidden_layer)
        return [s[: int(m.sum())].contiguous().cpu() for s, m in zip(states, mask)]

    with torch.no_grad():
        if not (folder / EMPTY).is_file():
            atomic_write_bytes(folder / EMPTY, safetensors_bytes({"states": encode([""])[0]}))
        todo = [url for url in urls if not (folder / f"{shard_id(url)}.safetensors").is_file()]
        for url in tqdm(todo, unit=" shards", desc="caching text features", disable=not show_progress):
            features: dict[str, torch.Tensor] = {}
            pairs = list(iter_captions(url))
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start : start + batch_size]
                features.update(zip([k for k, _ in chunk], encode([c for _, c in chunk])))
            atomic_write_bytes(folder / f"{shard_id(url)}.safetensors", safetensors_bytes(features))
    return TextFeatureCache(folder, identity)


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
    names = {"fingerprint": "LLM", "hidden_layer": "hidden layer", "max_length": "maximum length", "dtype": "dtype"}
    for key, name in names.items():
        if saved.get(key) != identity[key]:
            made, now = saved.get(key), identity[key]
            if key == "fingerprint":
                made, now = f"{saved.get('llm')} ({made})", f"{identity['llm']} ({now})"
            raise ConfigError(
                f"data.text_feature_cache {folder} was made with another {name} ({made}; this run: {now}): use a new "
                "folder, or delete this one to rebuild it"
            )
