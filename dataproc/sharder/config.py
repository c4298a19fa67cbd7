"""Typed configuration of `mpm data shard`. YAML files in configs/data/ fill it; see mpm.core.config."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from dataproc.langid import LID176_LANGUAGES
from dataproc.shard_layout import RECORD_SCHEMA
from mpm.core.config import check_choice, check_range
from mpm.core.errors import ConfigError

INPUT_FORMATS = ("auto", "parquet", "csv", "tsv", "jsonl", "folder", "webdataset", "hf")
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
INTERPOLATIONS = ("area", "bilinear", "bicubic", "lanczos")
ENCODE_FORMATS = ("jpg", "webp", "png")
EXECUTORS = ("local", "ray")
OUTPUT_MODES = ("incremental", "overwrite")

# Captions that describe nothing: placeholders, camera file names, UI text. Case-insensitive `re.search`.
DEFAULT_BOILERPLATE = [
    r"^\s*(untitled|image|photo|picture|img|no description( available)?|null|none|n/?a)\s*\d*\s*$",
    r"^\s*(img|dsc|dscn|dcim|pict|pxl|screenshot)[ _-]?\d+",
    r"\.(jpe?g|png|gif|webp|bmp|tiff?)\s*$",
    r"click (here )?to (enlarge|view|zoom)",
    r"^\s*(may be an image of|image may contain)",
    r"^\s*(thumbnail|placeholder|loading|spacer|logo|icon|banner)\s*$",
    r"^[\W\d_]+$",
]


@dataclass
class InputConfig:
    path: str = ""  # a file, a glob, a folder, or brace-expanded tar shards ("in/{00000..00009}.tar")
    format: str = "auto"  # one of INPUT_FORMATS; auto = by extension / folder content
    url_col: str = "url"  # URL or local path column of tabular inputs
    caption_col: str = "caption"
    image_col: str = "image"  # image column of Hugging Face datasets saved with save_to_disk
    split: str = "train"  # split of a saved DatasetDict
    save_additional_columns: list[str] = field(default_factory=list)

    def __post_init__(self):
        check_choice("input.format", self.format, INPUT_FORMATS)
        reserved = [c for c in self.save_additional_columns if c in RECORD_SCHEMA.names]
        if reserved:
            raise ConfigError(
                f"`input.save_additional_columns` names {reserved}, which the sharder writes itself "
                f"({RECORD_SCHEMA.names}); rename those input columns"
            )


@dataclass
class OutputConfig:
    path: str = ""
    samples_per_shard: int = 10000
    encode_format: str = "jpg"
    encode_quality: int = 95  # jpg/webp quality; png ignores it (lossless)
    mode: str = "incremental"  # incremental: skip complete shards; overwrite: delete this tool's files first

    def __post_init__(self):
        check_range("output.samples_per_shard", self.samples_per_shard, 1)
        check_choice("output.encode_format", self.encode_format, ENCODE_FORMATS)
        check_range("output.encode_quality", self.encode_quality, 1, 100)
        check_choice("output.mode", self.mode, OUTPUT_MODES)


@dataclass
class ResizeConfig:
    image_size: int = 256
    resize_mode: str = "border"  # img2dataset's modes and default
    resize_only_if_bigger: bool = False
    # img2dataset's defaults: area averaging to shrink (Pillow's BOX filter = OpenCV's INTER_AREA), lanczos to grow
    downscale_interpolation: str = "area"
    upscale_interpolation: str = "lanczos"
    max_image_pixels: int = 89_478_485  # decompression-bomb guard (Pillow's default limit), checked from the header

    def __post_init__(self):
        check_range("resize.image_size", self.image_size, 1)
        check_choice("resize.resize_mode", self.resize_mode, RESIZE_MODES)
        check_choice("resize.downscale_interpolation", self.downscale_interpolation, INTERPOLATIONS)
        check_choice("resize.upscale_interpolation", self.upscale_interpolation, INTERPOLATIONS)
        check_range("resize.max_image_pixels", self.max_image_pixels, 1)


@dataclass
class FetchConfig:
    threads: int = 16  # I/O threads in each worker process
    timeout_s: float = 10.0  # per attempt: connect, each read, and the whole body
    retries: int = 2  # extra attempts after connection errors, timeouts, HTTP 429 and 5xx
    backoff_s: float = 0.5  # sleep backoff_s * 2**attempt before each retry
    max_redirects: int = 5
    max_bytes: int = 20_000_000
    user_agent: str = "mpm-toolkit/0.1 (image-text research; honours X-Robots-Tag noai)"
    user_agent_token: str = "mpm-toolkit"  # X-Robots-Tag directives addressed to this token apply too
    disallowed_header_directives: list[str] = field(default_factory=lambda: ["noai", "noimageai"])

    def __post_init__(self):
        check_range("fetch.threads", self.threads, 1)
        check_range("fetch.timeout_s", self.timeout_s, 0.001)
        check_range("fetch.retries", self.retries, 0)
        check_range("fetch.backoff_s", self.backoff_s, 0)
        check_range("fetch.max_redirects", self.max_redirects, 0)
        check_range("fetch.max_bytes", self.max_bytes, 1)


@dataclass
class FilterConfig:
    languages: list[str] = field(default_factory=lambda: ["en"])  # fastText lid.176 codes; [] = tag only
    # lid.176.ftz gives short English captions low scores ("a cat sitting on a red mat": 0.39), so the default
    # is NeMo Curator's 0.3 rather than datatrove's 0.65 (reference/peers-notes.md A6).
    min_lang_score: float = 0.3
    min_caption_chars: int = 3
    max_caption_chars: int | None = 1000
    min_caption_words: int = 1
    max_caption_words: int | None = None
    boilerplate_patterns: list[str] = field(default_factory=lambda: list(DEFAULT_BOILERPLATE))
    min_image_size: int = 0  # minimum of width and height of the original image, pixels
    max_aspect_ratio: float | None = None  # max(w, h) / min(w, h)
    max_image_area: int | None = None  # width * height of the original image, pixels
    dedup_exact: bool = True  # drop images whose bytes (sha256) were already kept in this run
    near_duplicate_max_distance: int | None = 4  # 64-bit pHash Hamming distance; null disables
    # More filter blocks, run after the built-in ones of their stage: each entry is {name: <a registered filter or
    # "package.module:ClassName">, <its options>...}. How to write one: dataproc/sharder/filters.py.
    extra: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self):
        check_range("filters.min_lang_score", self.min_lang_score, 0, 1)
        check_range("filters.min_caption_chars", self.min_caption_chars, 0)
        check_range("filters.min_caption_words", self.min_caption_words, 0)
        check_range("filters.min_image_size", self.min_image_size, 0)
        check_range("filters.max_aspect_ratio", self.max_aspect_ratio, 1)
        check_range("filters.near_duplicate_max_distance", self.near_duplicate_max_distance, 0, 63)
        for pattern in self.boilerplate_patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"`filters.boilerplate_patterns` holds an invalid regex {pattern!r}: {exc}") from None
        self.languages = [lang.strip().lower() for lang in self.languages]
        unknown = [lang for lang in self.languages if lang not in LID176_LANGUAGES]
        if unknown:
            raise ConfigError(
                f"`filters.languages` holds codes fastText lid.176 does not know: {unknown}; "
                "use ISO 639 codes such as en, zh, de (see dataproc/langid.py)"
            )
        if self.extra:
            # Imported here: filters.py builds its blocks from this config (and imports this module).
            from dataproc.sharder.filters import check_extra_filters

            check_extra_filters(self.extra)


@dataclass
class ExecutorConfig:
    kind: str = "local"  # local worker processes, or ray
    processes: int | None = None  # worker processes (local) or concurrent tasks (ray); null = all CPUs
    ray_address: str | None = None  # e.g. "auto" or "ray://head:10001"; null starts a local cluster

    def __post_init__(self):
        check_choice("executor.kind", self.kind, EXECUTORS)
        check_range("executor.processes", self.processes, 1)


@dataclass
class ShardConfig:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    resize: ResizeConfig = field(default_factory=ResizeConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    retry_failed: bool = False  # after the normal pass, re-attempt failed samples of complete shards

    def check_required(self) -> None:
        if not self.input.path:
            raise ConfigError("no input: pass --input PATH (or set input.path in the config)")
        if not self.output.path:
            raise ConfigError("no output folder: pass --output DIR (or set output.path in the config)")

    def resolved_processes(self) -> int:
        return self.executor.processes or os.cpu_count() or 1


# Settings that may change between a run and its resumption: how samples are fetched and executed, not what
# a kept sample looks like (raising a timeout and resuming is a normal thing to do).
RESUMABLE_CHANGES = ("executor", "fetch", "output.mode", "retry_failed")
