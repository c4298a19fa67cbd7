"""Filter blocks (datatrove style) and the run-wide deduplicator.

A filter is a small class that looks at one sample at one stage and returns None to keep it, or a message saying
why not: the sample then ends with status `filtered_<reason>` and that message, and every reason is counted in the
shard stats. A run's filters are one list built from the config (`build_filters`): the built-in ones set by the
flat `filters.*` keys, in a fixed order, then the blocks listed in `filters.extra`. Each stage runs its filters in
list order:

    caption  before fetching, so a rejected caption costs no bandwidth: empty, length, boilerplate, language, extras
    header   after reading the image header, on the original size, before decoding: size, aspect ratio, area, extras
    image    on the decoded RGB image, before resizing: extras (a CLIP-score, aesthetic or watermark check)

Adding a filter is one class and one config entry:

    @register_filter
    class NoDigitsFilter(Filter):
        name, reason, stage = "no_digits", "digits", "caption"

        def check(self, sample: Sample) -> str | None:
            digits = [c for c in sample.caption if c.isdigit()]
            return f"caption has digits {''.join(digits)!r}" if digits else None

    filters: {extra: [{name: no_digits}]}           # or {name: "my_package.filters:NoDigitsFilter"}

Deduplication is not a block: it needs every earlier kept sample of the run, so the coordinator does it when it
finalizes shards in input order (run.py).
"""

from __future__ import annotations

import importlib
import inspect
import re
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from PIL import Image

from dataproc.langid import LanguageIdentifier
from dataproc.shard_layout import STATUSES
from dataproc.sharder.config import FilterConfig
from mpm.core.errors import ConfigError

STAGES = ("caption", "header", "image")
# Record fields a filter may set. A new column (a CLIP score, say) would change the shard contract (RECORD_SCHEMA).
TAGGABLE_FIELDS = ("lang", "lang_score")


class Rejected(Exception):
    """A sample leaves the pipeline with `status` (failed_* or filtered_*) and a message for the record."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Sample:
    """What filters see of one input sample; each stage fills in more of it."""

    caption: str | None  # a non-empty string for every filter after the built-in empty-caption one
    url: str | None = None
    columns: dict[str, Any] = field(default_factory=dict)  # saved input columns (input.save_additional_columns)
    width: int | None = None  # original size as displayed (after EXIF orientation); header and image stages
    height: int | None = None
    # Decoded RGB, image stage only; JPEGs that will shrink are decoded at 1/2-1/8 scale, so use image.size.
    image: Image.Image | None = None
    # Record fields a filter sets (TAGGABLE_FIELDS: the language filter's lang, lang_score); written to the record
    # whether or not a later filter rejects the sample.
    tags: dict[str, Any] = field(default_factory=dict)


class Filter:
    """One filter block. Subclasses set the three class attributes and implement `check`.

    Settings are keyword arguments of `__init__`: the options of the block's `filters.extra` entry (checked against
    the signature when the config loads). `__init__` runs once per worker process, so load models there.
    """

    name: ClassVar[str]  # the registry key: the `name` of its `filters.extra` entry
    reason: ClassVar[str]  # a rejected sample's status is `filtered_<reason>`
    stage: ClassVar[str]  # one of STAGES

    def check(self, sample: Sample) -> str | None:
        """None keeps the sample; a string rejects it and becomes its `error_message`. Never raise for a bad
        sample: an exception is a bug in the filter and fails the shard (see FilterError)."""
        raise NotImplementedError

    @property
    def status(self) -> str:
        return f"filtered_{self.reason}"


class FilterError(RuntimeError):
    """A filter raised, or tagged a field it may not: a bug in the filter, not a sample's problem, so it fails the
    shard (and the run names it) instead of hiding as a per-sample failure."""


def apply_filters(filters: Sequence[Filter], stage: str, sample: Sample) -> None:
    """Run the filters of `stage` in order; raises Rejected(filtered_<reason>, message) at the first rejection."""
    for block in filters:
        if block.stage != stage:
            continue
        try:
            message = block.check(sample)
        except Exception as exc:
            raise FilterError(f"filter {type(block).__name__} raised {type(exc).__name__}: {exc}") from exc
        bad_tags = [k for k in sample.tags if k not in TAGGABLE_FIELDS]
        if bad_tags:
            raise FilterError(f"filter {type(block).__name__} tagged {bad_tags}; a filter may set {TAGGABLE_FIELDS}")
        if message is not None:
            raise Rejected(block.status, message)


# ---------------------------------------------------------------------------------------------------------------
# The registry and `filters.extra`

FILTERS: dict[str, type[Filter]] = {}  # name -> class, filled by @register_filter
REASON_PATTERN = re.compile(r"[a-z][a-z0-9_]*")


def register_filter(cls: type[Filter]) -> type[Filter]:
    """Class decorator: makes `{name: <cls.name>}` usable in `filters.extra`.

    The registry lives in each process: worker processes that are spawned (or Ray workers) only know the filters of
    modules they import. A class in your own module is safer named by its import path, "package.module:ClassName".
    """
    taken = FILTERS.get(cls.name)
    if taken is not None and _qualified(taken) != _qualified(cls):  # the same class again (a reload) is fine
        raise ValueError(f"filter name {cls.name!r} is already registered by {_qualified(taken)}")
    FILTERS[cls.name] = cls
    return cls


def _qualified(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def filter_class(name: str, key: str) -> type[Filter]:
    """The class a `filters.extra` name stands for: a registered name, or an import path "package.module:Class"."""
    if ":" in name:
        module_name, _, class_name = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"`{key}` is {name!r}, but {module_name!r} cannot be imported: {exc}") from None
        cls = getattr(module, class_name, None)
        if cls is None:
            raise ConfigError(f"`{key}` is {name!r}, but module {module_name} has no {class_name!r}")
    else:
        cls = FILTERS.get(name)
        if cls is None:
            raise ConfigError(
                f"`{key}` is {name!r}, which is not a registered filter (registered in this process: "
                f"{sorted(FILTERS) or 'none'}); name a filter class of your own by its import path, "
                "'package.module:ClassName', which every process can import"
            )
    if not (isinstance(cls, type) and issubclass(cls, Filter)):
        raise ConfigError(f"`{key}` is {name!r}, which is not a subclass of dataproc.sharder.filters.Filter")
    if getattr(cls, "stage", None) not in STAGES:
        raise ConfigError(f"filter {name!r} has stage {getattr(cls, 'stage', None)!r}; it must be one of {STAGES}")
    if not REASON_PATTERN.fullmatch(str(getattr(cls, "reason", ""))):
        raise ConfigError(
            f"filter {name!r} has reason {getattr(cls, 'reason', None)!r}; it must be snake_case (status "
            "filtered_<reason>)"
        )
    return cls


BOOL_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def check_extra_filters(entries: list[dict[str, Any]]) -> None:
    """Called when the config loads: every `filters.extra` entry names a filter, its options fit that class's
    `__init__`, and each reason is its own (two filters counting into one status would hide which one dropped)."""
    statuses = set(STATUSES)
    for i, entry in enumerate(entries):
        key = f"filters.extra[{i}]"
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(
                f"`{key}` needs a `name` (a registered filter or 'package.module:ClassName'), got {dict(entry)!r}"
            )
        cls = filter_class(name, f"{key}.name")
        options = {k: v for k, v in entry.items() if k != "name"}
        parameters = inspect.signature(cls).parameters
        for option, value in options.items():
            # YAML 1.2 booleans (mpm.core.config): `strict: off` arrives as the string "off"; a bool option says so
            if option in parameters and parameters[option].annotation in (bool, "bool") and isinstance(value, str):
                if value.lower() not in BOOL_WORDS:
                    raise ConfigError(f"`{key}.{option}` ({name}) takes true or false, got {value!r}")
                entry[option] = options[option] = BOOL_WORDS[value.lower()]
        try:
            inspect.signature(cls).bind(**options)
        except TypeError as exc:
            raise ConfigError(
                f"`{key}` ({name}) has options {options}, which {cls.__name__}{inspect.signature(cls)} does not "
                f"take: {exc}"
            ) from None
        status = f"filtered_{cls.reason}"
        if status in statuses:
            raise ConfigError(
                f"`{key}` ({name}) would count its rejections as {status}, a status another filter already uses; "
                "give the class its own `reason`"
            )
        statuses.add(status)


def extra_statuses(cfg: FilterConfig) -> list[str]:
    """The statuses the `filters.extra` blocks add after the built-in ones (every stats file lists them)."""
    return [f"filtered_{filter_class(e['name'], f'filters.extra[{i}].name').reason}" for i, e in enumerate(cfg.extra)]


def build_filters(cfg: FilterConfig) -> list[Filter]:
    """The filter blocks of a run, in order: the built-in ones, then `filters.extra` (each stage keeps this order)."""
    extras = []
    for i, entry in enumerate(cfg.extra):
        options = {k: v for k, v in entry.items() if k != "name"}
        extras.append(filter_class(entry["name"], f"filters.extra[{i}].name")(**options))
    return [*builtin_filters(cfg), *extras]


# ---------------------------------------------------------------------------------------------------------------
# The built-in blocks, set by the flat `filters.*` keys


class EmptyCaptionFilter(Filter):
    name, reason, stage = "empty_caption", "empty_caption", "caption"

    def check(self, sample: Sample) -> str | None:
        if sample.caption is None:
            return "caption is null"
        return "caption is empty" if not sample.caption.strip() else None


class CaptionLengthFilter(Filter):
    """Characters and words (whitespace tokens: a CJK sentence is one word) of the stripped caption."""

    name, reason, stage = "caption_length", "caption_length", "caption"

    def __init__(
        self, min_chars: int = 0, max_chars: int | None = None, min_words: int = 0, max_words: int | None = None
    ):
        self.min_chars, self.max_chars, self.min_words, self.max_words = min_chars, max_chars, min_words, max_words

    def check(self, sample: Sample) -> str | None:
        text = sample.caption.strip()
        chars, words = len(text), len(text.split())
        if chars < self.min_chars or (self.max_chars is not None and chars > self.max_chars):
            return f"{chars} characters, outside filters.min/max_caption_chars [{self.min_chars}, {self.max_chars}]"
        if words < self.min_words or (self.max_words is not None and words > self.max_words):
            return f"{words} words, outside filters.min/max_caption_words [{self.min_words}, {self.max_words}]"
        return None


class BoilerplateFilter(Filter):
    """Captions that describe nothing (placeholders, camera file names, UI text): case-insensitive `re.search`."""

    name, reason, stage = "boilerplate", "boilerplate", "caption"

    def __init__(self, patterns: Sequence[str]):
        self.patterns = [re.compile(p, re.IGNORECASE) for p in patterns]

    def check(self, sample: Sample) -> str | None:
        text = sample.caption.strip()
        for pattern in self.patterns:
            if pattern.search(text):
                return f"matches boilerplate pattern {pattern.pattern!r}"
        return None


class LanguageFilter(Filter):
    """fastText lid.176 on the caption; tags every kept sample with lang and lang_score. No languages = tag only."""

    name, reason, stage = "language", "language", "caption"

    def __init__(self, languages: Sequence[str], min_score: float, identifier: LanguageIdentifier | None = None):
        self.languages, self.min_score = list(languages), min_score
        self.identify = identifier or LanguageIdentifier()

    def check(self, sample: Sample) -> str | None:
        prediction = self.identify(sample.caption.strip())
        if self.languages and (prediction.lang not in self.languages or prediction.score < self.min_score):
            return (
                f"language {prediction.lang} ({prediction.score:.2f}); wanted {self.languages} with score >= "
                f"{self.min_score}"
            )
        sample.tags.update(lang=prediction.lang, lang_score=round(prediction.score, 4))
        return None


class ImageSizeFilter(Filter):
    name, reason, stage = "image_size", "image_size", "header"

    def __init__(self, min_side: int):
        self.min_side = min_side

    def check(self, sample: Sample) -> str | None:
        w, h = sample.width, sample.height
        if min(w, h) < self.min_side:
            return f"{w}x{h}: min side < filters.min_image_size {self.min_side}"
        return None


class AspectRatioFilter(Filter):
    name, reason, stage = "aspect_ratio", "aspect_ratio", "header"

    def __init__(self, max_ratio: float):
        self.max_ratio = max_ratio

    def check(self, sample: Sample) -> str | None:
        w, h = sample.width, sample.height
        aspect = max(w, h) / min(w, h)
        if aspect > self.max_ratio:
            return f"{w}x{h}: aspect {aspect:.2f} > filters.max_aspect_ratio {self.max_ratio}"
        return None


class ImageAreaFilter(Filter):
    name, reason, stage = "image_area", "image_area", "header"

    def __init__(self, max_area: int):
        self.max_area = max_area

    def check(self, sample: Sample) -> str | None:
        w, h = sample.width, sample.height
        if w * h > self.max_area:
            return f"{w}x{h}: area {w * h} > filters.max_image_area {self.max_area}"
        return None


def builtin_filters(cfg: FilterConfig) -> list[Filter]:
    """The built-in blocks in order; one its settings turn off (no patterns, no limit) is left out."""
    blocks: list[Filter] = [
        EmptyCaptionFilter(),
        CaptionLengthFilter(cfg.min_caption_chars, cfg.max_caption_chars, cfg.min_caption_words, cfg.max_caption_words),
    ]
    if cfg.boilerplate_patterns:
        blocks.append(BoilerplateFilter(cfg.boilerplate_patterns))
    blocks.append(LanguageFilter(cfg.languages, cfg.min_lang_score))  # always: it tags lang even with no languages
    if cfg.min_image_size > 0:
        blocks.append(ImageSizeFilter(cfg.min_image_size))
    if cfg.max_aspect_ratio is not None:
        blocks.append(AspectRatioFilter(cfg.max_aspect_ratio))
    if cfg.max_image_area is not None:
        blocks.append(ImageAreaFilter(cfg.max_image_area))
    return blocks


# ---------------------------------------------------------------------------------------------------------------
# Deduplication (not a block: run-wide state, in the coordinator)


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
