"""The `mpm` command line: the only place in the project that parses arguments.

    mpm data shard   English image-text pairs -> filtered, resumable webdataset shards
    mpm data stats   the summary table of an existing shard folder
    mpm data synth   write a small synthetic pair set (smoke runs, quickstart, benchmarks)

Library code takes explicit keyword arguments / typed configs; this module only maps flags onto them.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dataproc.config import ConfigError, config_to_yaml, load_config

# `mpm data shard` flags -> config keys. Every flag is also a config key, so everything is settable from YAML.
SHARD_FLAGS = [
    # (flag, config key, type, help)
    ("--input", "input.path", str, "input file, glob, folder, or tar shards ('in/{00000..00009}.tar')"),
    ("--input-format", "input.format", str, "auto|parquet|csv|tsv|jsonl|folder|webdataset|hf (default: auto)"),
    ("--url-col", "input.url_col", str, "column holding the image URL or local path (default: url)"),
    ("--caption-col", "input.caption_col", str, "column holding the caption (default: caption)"),
    ("--save-additional-columns", "input.save_additional_columns", "list", "comma-separated input columns to keep"),
    ("--output", "output.path", str, "output folder for the shards"),
    ("--samples-per-shard", "output.samples_per_shard", int, "input rows per shard (default: 10000)"),
    ("--encode-format", "output.encode_format", str, "jpg|webp|png (default: jpg)"),
    ("--encode-quality", "output.encode_quality", int, "jpg/webp quality (default: 95)"),
    ("--image-size", "resize.image_size", int, "target size in pixels (default: 256)"),
    (
        "--resize-mode",
        "resize.resize_mode",
        str,
        "no|border|keep_ratio|keep_ratio_largest|center_crop (default: border)",
    ),
    ("--resize-only-if-bigger", "resize.resize_only_if_bigger", "flag", "never upscale small images"),
    ("--threads", "fetch.threads", int, "I/O threads per worker process (default: 16)"),
    ("--timeout", "fetch.timeout_s", float, "seconds per HTTP attempt (default: 10)"),
    ("--retries", "fetch.retries", int, "extra attempts on timeouts, connection errors, 429, 5xx (default: 2)"),
    ("--user-agent", "fetch.user_agent", str, "HTTP User-Agent"),
    ("--languages", "filters.languages", "list", "comma-separated fastText language codes to keep (default: en)"),
    ("--min-lang-score", "filters.min_lang_score", float, "minimum language-id score (default: 0.3)"),
    ("--processes", "executor.processes", int, "worker processes / concurrent Ray tasks (default: all CPUs)"),
    ("--executor", "executor.kind", str, "local|ray (default: local)"),
    ("--ray-address", "executor.ray_address", str, "Ray cluster address; omit to start a local one"),
    ("--retry-failed", "retry_failed", "flag", "after the normal pass, re-attempt failed samples of complete shards"),
]


def _add_config_flags(parser: argparse.ArgumentParser, table) -> None:
    for flag, key, kind, help_text in table:
        kwargs = {"dest": key, "default": argparse.SUPPRESS, "help": f"{help_text} [{key}]"}
        if kind == "flag":
            parser.add_argument(flag, action="store_true", **kwargs)
            continue
        kwargs["metavar"] = flag.lstrip("-").upper().replace("-", "_")
        if kind == "list":
            parser.add_argument(flag, type=lambda s: [x.strip() for x in s.split(",") if x.strip()], **kwargs)
        else:
            parser.add_argument(flag, type=kind, **kwargs)


def _flags(args: argparse.Namespace, table) -> dict:
    keys = {key for _, key, _, _ in table}
    return {k: v for k, v in vars(args).items() if k in keys}


def _cmd_data_shard(args: argparse.Namespace) -> int:
    from dataproc.shard_layout import format_stats_table
    from dataproc.sharder import ShardConfig, ShardRunError, shard

    flags = _flags(args, SHARD_FLAGS)
    if args.overwrite:
        flags["output.mode"] = "overwrite"
    cfg = load_config(ShardConfig, args.config, flags, args.overrides)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    try:
        totals = shard(cfg, show_progress=not args.no_progress)
    except ShardRunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_stats_table(totals))
    print(f"shards in {cfg.output.path}")
    return 0


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from dataproc.shard_layout import completed_shards, format_stats_table, total_stats

    folder = Path(args.folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder")
    if not completed_shards(folder):
        raise ConfigError(f"{folder} holds no complete shard (no *_stats.json); is it a `mpm data shard` output?")
    print(format_stats_table(total_stats(folder)))
    return 0


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from dataproc.synthetic import write_pairs

    path = write_pairs(args.output, args.num_samples, seed=args.seed, bad_samples=not args.clean)
    print(f"wrote {args.num_samples} pairs: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpm",
        description="MPM toolkit: multilingual multimodal models trained on English image-text data.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more (INFO level)")
    groups = parser.add_subparsers(dest="group", required=True, metavar="{data}")

    data = groups.add_parser("data", help="image-text pairs: shard, inspect, synthesise")
    data_cmds = data.add_subparsers(dest="command", required=True, metavar="{shard,stats,synth}")

    p = data_cmds.add_parser(
        "shard",
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
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML config file (keys as printed by --print-config)")
    _add_config_flags(p, SHARD_FLAGS)
    p.add_argument("--overwrite", action="store_true", help="delete this tool's files in --output and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. filters.min_image_size=64"
    )
    p.set_defaults(func=_cmd_data_shard)

    p = data_cmds.add_parser(
        "stats",
        help="print the summary table of a shard folder",
        description=(
            "Print the summary of an existing `mpm data shard` output folder: samples per status (success, each "
            "failure, each filter reason) with shares, the number of shards, and the most common failure causes. "
            "Counts come from the complete shards' *_stats.json files, so it also works on a run still in progress."
        ),
    )
    p.add_argument("folder", help="output folder of `mpm data shard`")
    p.set_defaults(func=_cmd_data_stats)

    p = data_cmds.add_parser(
        "synth",
        help="write synthetic image-caption pairs (pairs.jsonl + images/)",
        description=(
            "Write procedural JPEGs of mixed sizes with English captions describing them, and a pairs.jsonl "
            "(url = relative image path, caption) ready for `mpm data shard`. Unless --clean, one row in ten is a "
            "deliberately bad one (empty or German caption, duplicate, truncated, zero-byte, HTML, tiny, missing "
            "file, boilerplate caption) so a run's summary shows every reason counted."
        ),
    )
    p.add_argument("--output", required=True, help="folder to write into")
    p.add_argument("--num-samples", type=int, default=200, help="number of rows (default: 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clean", action="store_true", help="no deliberately bad rows")
    p.set_defaults(func=_cmd_data_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
