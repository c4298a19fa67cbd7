"""`mpm data`: image-text pairs -> filtered, resumable webdataset shards; their summary; a synthetic pair set."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from mpm.cli.options import Flag, add_command

SHARD_FLAGS = [
    Flag("--input", "input.path", str, "input file, glob, folder, or tar shards ('in/{00000..00009}.tar')"),
    Flag("--input-format", "input.format", str, "auto|parquet|csv|tsv|jsonl|folder|webdataset|hf (default: auto)"),
    Flag("--url-col", "input.url_col", str, "column holding the image URL or local path (default: url)"),
    Flag("--caption-col", "input.caption_col", str, "column holding the caption (default: caption)"),
    Flag("--save-additional-columns", "input.save_additional_columns", "list", "comma-separated input columns to keep"),
    Flag("--output", "output.path", str, "output folder for the shards"),
    Flag("--samples-per-shard", "output.samples_per_shard", int, "input rows per shard (default: 10000)"),
    Flag("--encode-format", "output.encode_format", str, "jpg|webp|png (default: jpg)"),
    Flag("--encode-quality", "output.encode_quality", int, "jpg/webp quality (default: 95)"),
    Flag("--overwrite", "output.mode", "const", "delete this tool's files in --output and start over", "overwrite"),
    Flag("--image-size", "resize.image_size", int, "target size in pixels (default: 256)"),
    Flag("--resize-mode", "resize.resize_mode", str, "no|border|keep_ratio|keep_ratio_largest|center_crop (default: border)"),
    Flag("--resize-only-if-bigger", "resize.resize_only_if_bigger", "flag", "never upscale small images"),
    Flag("--threads", "fetch.threads", int, "I/O threads per worker process (default: 16)"),
    Flag("--timeout", "fetch.timeout_s", float, "seconds per HTTP attempt (default: 10)"),
    Flag("--retries", "fetch.retries", int, "extra attempts on timeouts, connection errors, 429, 5xx (default: 2)"),
    Flag("--user-agent", "fetch.user_agent", str, "HTTP User-Agent"),
    Flag("--languages", "filters.languages", "list", "comma-separated fastText language codes to keep (default: en)"),
    Flag("--min-lang-score", "filters.min_lang_score", float, "minimum language-id score (default: 0.3)"),
    Flag("--processes", "executor.processes", int, "worker processes / concurrent Ray tasks (default: all CPUs)"),
    Flag("--executor", "executor.kind", str, "local|ray (default: local)"),
    Flag("--ray-address", "executor.ray_address", str, "Ray cluster address; omit to start a local one"),
    Flag("--retry-failed", "retry_failed", "flag", "after the normal pass, re-attempt failed samples of complete shards"),
]  # fmt: skip


@dataclass
class StatsCommand:
    folder: str = ""  # an output folder of `mpm data shard`


@dataclass
class SynthCommand:
    output: str = ""  # folder to write pairs.jsonl and images/ into
    num_samples: int = 200
    seed: int = 0
    clean: bool = False  # no deliberately bad rows


SYNTH_FLAGS = [
    Flag("--output", "output", str, "folder to write into"),
    Flag("--num-samples", "num_samples", int, "number of rows (default: 200)"),
    Flag("--seed", "seed", int, "random seed (default: 0)"),
    Flag("--clean", "clean", "flag", "no deliberately bad rows"),
]


def shard_command(cfg, args) -> int:
    from dataproc.shard_layout import format_stats_table
    from dataproc.sharder import ShardRunError, shard

    try:
        totals = shard(cfg, show_progress=not args.no_progress)
    except ShardRunError as exc:  # some shards failed twice: not the user's input, and a rerun resumes
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_stats_table(totals))
    print(f"shards in {cfg.output.path}")
    return 0


def stats_command(cfg: StatsCommand, args) -> int:
    from pathlib import Path

    from dataproc.shard_layout import completed_shards, format_stats_table, total_stats
    from mpm.core.errors import ConfigError

    folder = Path(cfg.folder)
    if not cfg.folder or not folder.is_dir():
        raise ConfigError(f"{cfg.folder!r} is not a folder: give the output folder of `mpm data shard`")
    if not completed_shards(folder):
        raise ConfigError(f"{folder} holds no complete shard (no *_stats.json); is it a `mpm data shard` output?")
    print(format_stats_table(total_stats(folder)))
    return 0


def synth_command(cfg: SynthCommand, args) -> int:
    from dataproc.synthetic import write_pairs
    from mpm.core.errors import ConfigError

    if not cfg.output:
        raise ConfigError("no output folder: pass --output DIR")
    path = write_pairs(cfg.output, cfg.num_samples, seed=cfg.seed, bad_samples=not cfg.clean)
    print(f"wrote {cfg.num_samples} pairs: {path}")
    return 0


def register(groups) -> None:
    data = groups.add_parser("data", help="image-text pairs: shard, inspect, synthesise")
    commands = data.add_subparsers(dest="command", required=True, metavar="{shard,stats,synth}")

    p = add_command(
        commands,
        "shard",
        shard_command,
        "dataproc.sharder:ShardConfig",
        SHARD_FLAGS,
        help="turn URL/path + caption lists, image folders, tar shards or saved datasets into filtered shards",
        description=(
            "Fetch, validate, filter (language, caption length, boilerplate, image size, exact and near duplicates), "
            "resize and write image-text pairs as webdataset shards with a parquet of every input row and a stats "
            "file per shard. Rerunning resumes; complete shards are left untouched. Settings come from (lowest "
            "first) defaults, --config YAML, flags, and KEY=VALUE overrides; see `--print-config` for every key."
        ),
        epilog=(
            "example: mpm data shard --input pairs.parquet --output shards/ --url-col url --caption-col caption "
            "--image-size 256 --resize-mode keep_ratio --processes 2 --threads 16\n"
            "         mpm data shard --config configs/data/laion.yaml resize.image_size=384"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the two examples on their own lines
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    add_command(
        commands,
        "stats",
        stats_command,
        StatsCommand,
        positional=("folder", "the output folder of `mpm data shard`"),
        help="print the summary table of a shard folder",
        description=(
            "Print the summary of an existing `mpm data shard` output folder: samples per status (success, each "
            "failure, each filter reason) with shares, the number of shards, and the most common failure causes. "
            "Counts come from the complete shards' *_stats.json files, so it also works on a run still in progress."
        ),
        epilog="example: mpm data stats shards/",
    )

    add_command(
        commands,
        "synth",
        synth_command,
        SynthCommand,
        SYNTH_FLAGS,
        help="write synthetic image-caption pairs (pairs.jsonl + images/)",
        description=(
            "Write procedural JPEGs of mixed sizes with English captions describing them, and a pairs.jsonl "
            "(url = relative image path, caption) ready for `mpm data shard`. Unless --clean, one row in ten is a "
            "deliberately bad one (empty or German caption, duplicate, truncated, zero-byte, HTML, tiny, missing "
            "file, boilerplate caption) so a run's summary shows every reason counted."
        ),
        epilog="example: mpm data synth --output pairs/ --num-samples 300",
    )
