"""Caption filters (run before fetching, so rejected rows cost no bandwidth) and the run-wide deduplicator.

Each filter either keeps the sample or raises `Rejected(status, message)` with a named reason; the counts per
reason end up in every shard's stats (datatrove's convention).
"""

from __future__ import annotations

import re

from dataproc.langid import LangPrediction, LanguageIdentifier
from dataproc.sharder.config import FilterConfig
from dataproc.sharder.images import Rejected


class CaptionFilters:
    """Empty caption, length, boilerplate, language. Returns the language prediction of a kept caption."""

    def __init__(self, cfg: FilterConfig, identifier: LanguageIdentifier | None = None):
        self.cfg = cfg
        self.boilerplate = [re.compile(p, re.IGNORECASE) for p in cfg.boilerplate_patterns]
        self.identify = identifier or LanguageIdentifier()

    def __call__(self, caption: str | None) -> LangPrediction:
        cfg = self.cfg
        if caption is None or not caption.strip():
            raise Rejected("filtered_empty_caption", "caption is empty" if caption is not None else "caption is null")
        text = caption.strip()
        chars, words = len(text), len(text.split())  # words = whitespace tokens (a CJK sentence is one word)
        if chars < cfg.min_caption_chars or (cfg.max_caption_chars is not None and chars > cfg.max_caption_chars):
            raise Rejected(
                "filtered_caption_length",
                f"{chars} characters, outside filters.min/max_caption_chars [{cfg.min_caption_chars}, {cfg.max_caption_chars}]",
            )
        if words < cfg.min_caption_words or (cfg.max_caption_words is not None and words > cfg.max_caption_words):
            raise Rejected(
                "filtered_caption_length",
                f"{words} words, outside filters.min/max_caption_words [{cfg.min_caption_words}, {cfg.max_caption_words}]",
            )
        for pattern in self.boilerplate:
            if pattern.search(text):
                raise Rejected("filtered_boilerplate", f"matches boilerplate pattern {pattern.pattern!r}")
        prediction = self.identify(text)
        if cfg.languages and (prediction.lang not in cfg.languages or prediction.score < cfg.min_lang_score):
            raise Rejected(
                "filtered_language",
                f"language {prediction.lang} ({prediction.score:.2f}); wanted {cfg.languages} with score >= "
                f"{cfg.min_lang_score}",
            )
        return prediction


class HammingIndex:
    """Finds a stored 64-bit hash within Hamming distance `max_distance` of a query.

    Multi-index hashing (Norouzi, Punjani, Fleet, CVPR 2012): split the bits into max_distance + 1 blocks; by
    pigeonhole two hashes within that distance agree exactly on at least one block, so only hashes sharing a
    block value are compared.
    """

    def __init__(self, max_distance: int, bits: int = 64):
        self.max_distance = max_distance
        n_blocks = min(max_distance + 1, bits)
        edges = [round(i * bits / n_blocks) for i in range(n_blocks + 1)]
        self.blocks = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges[:-1], edges[1:])]
        self.tables: list[dict[int, list[tuple[int, str]]]] = [{} for _ in self.blocks]

    def find(self, value: int) -> tuple[int, str] | None:
        """The first stored (hash, key) within the distance, in insertion order of its bucket."""
        for table, (shift, mask) in zip(self.tables, self.blocks):
            for stored, key in table.get((value >> shift) & mask, ()):
                if (stored ^ value).bit_count() <= self.max_distance:
                    return stored, key
        return None

    def add(self, value: int, key: str) -> None:
        for table, (shift, mask) in zip(self.tables, self.blocks):
            table.setdefault((value >> shift) & mask, []).append((value, key))


class Deduplicator:
    """Run-wide exact (sha256 of the fetched bytes) and near (pHash) duplicate detection.

    It is only ever called in input order (the coordinator finalizes shards in order), so the copy kept is
    always the first in input order, whatever the number of processes or resumptions.
    """

    def __init__(self, cfg: FilterConfig):
        self.exact: dict[str, str] | None = {} if cfg.dedup_exact else None
        distance = cfg.near_duplicate_max_distance
        self.near = HammingIndex(distance) if distance is not None else None

    def check(self, sha256: str, phash: int) -> Rejected | None:
        if self.exact is not None and sha256 in self.exact:
            return Rejected("filtered_duplicate", f"same bytes as {self.exact[sha256]}")
        if self.near is not None:
            found = self.near.find(phash)
            if found is not None:
                distance = (found[0] ^ phash).bit_count()
                return Rejected("filtered_near_duplicate", f"pHash within {distance} bits of {found[1]}")
        return None

    def add(self, sha256: str, phash: int, key: str) -> None:
        if self.exact is not None:
            self.exact.setdefault(sha256, key)
        if self.near is not None:
            self.near.add(phash, key)
