"""Caption filters (run before fetching, so rejected rows cost no bandwidth) and the run-wide deduplicator.

Each filter either keeps the sample or raises `Rejected(status, message)` with a named reason; the counts per
reason end up in every shard's stats (datatrove's convention).
"""

from __future__ import annotations

import re
from array import array

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
    block value are compared. Hashes live in one array, buckets hold their positions (4 bytes each), which keeps
    a run of millions of images in a few hundred MB.
    """

    def __init__(self, max_distance: int, bits: int = 64):
        self.max_distance = max_distance
        n_blocks = min(max_distance + 1, bits)
        edges = [round(i * bits / n_blocks) for i in range(n_blocks + 1)]
        self.blocks = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges[:-1], edges[1:])]
        self.tables: list[dict[int, array]] = [{} for _ in self.blocks]
        self.values = array("Q")

    def find(self, value: int) -> int | None:
        """Position of the first stored hash (in insertion order of its bucket) within the distance, else None."""
        for table, (shift, mask) in zip(self.tables, self.blocks):
            for position in table.get((value >> shift) & mask, ()):
                if (self.values[position] ^ value).bit_count() <= self.max_distance:
                    return position
        return None

    def add(self, value: int) -> int:
        position = len(self.values)
        self.values.append(value)
        for table, (shift, mask) in zip(self.tables, self.blocks):
            bucket = (value >> shift) & mask
            if bucket not in table:
                table[bucket] = array("I")
            table[bucket].append(position)
        return position


class Deduplicator:
    """Run-wide exact (sha256 of the fetched bytes) and near (pHash) duplicate detection.

    It is only ever called in input order (the coordinator finalizes shards in order), so the copy kept is
    always the first in input order, whatever the number of processes or resumptions. Memory: about 200 bytes
    per kept sample (keys as integers, 128-bit digest prefixes, hashes in arrays).
    """

    def __init__(self, cfg: FilterConfig):
        self.exact: dict[int, int] | None = {} if cfg.dedup_exact else None  # digest prefix -> key
        distance = cfg.near_duplicate_max_distance
        self.near = HammingIndex(distance) if distance is not None else None
        self.near_keys = array("Q")  # key of each HammingIndex position
        self.key_width = 9

    def _key(self, number: int) -> str:
        return f"{number:0{self.key_width}d}"

    def check(self, sha256: str, phash: int) -> Rejected | None:
        if self.exact is not None:
            original = self.exact.get(int(sha256[:32], 16))  # 128 bits: collisions are out of reach
            if original is not None:
                return Rejected("filtered_duplicate", f"same bytes as {self._key(original)}")
        if self.near is not None:
            position = self.near.find(phash)
            if position is not None:
                distance = (self.near.values[position] ^ phash).bit_count()
                original = self._key(self.near_keys[position])
                return Rejected("filtered_near_duplicate", f"pHash within {distance} bits of {original}")
        return None

    def add(self, sha256: str, phash: int, key: str) -> None:
        self.key_width = len(key)  # keys are digits: stored as integers, printed back at this width
        if self.exact is not None:
            self.exact.setdefault(int(sha256[:32], 16), int(key))
        if self.near is not None:
            self.near.add(phash)
            self.near_keys.append(int(key))
