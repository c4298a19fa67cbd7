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


UNIMM_BUILD_FLAGS = [
    ("--coco-captions", "sources.coco_captions", str, "COCO captions file (captions_train2017.json)"),
    ("--vqav2-questions", "sources.vqav2_questions", str, "VQAv2 questions file"),
    ("--vqav2-annotations", "sources.vqav2_annotations", str, "VQAv2 annotations file"),
    ("--okvqa-questions", "sources.okvqa_questions", str, "OK-VQA questions file"),
    ("--okvqa-annotations", "sources.okvqa_annotations", str, "OK-VQA annotations file"),
    ("--aokvqa", "sources.aokvqa", str, "A-OKVQA file (aokvqa_v1p0_train.json)"),
    ("--visdial", "sources.visdial", str, "Visual Dialog 1.0 file (visdial_1.0_train.json)"),
    ("--generator", "generator", str, "template|hf|openai (default: template)"),
    ("--output", "output", str, "output folder"),
    ("--seed", "seed", int, "template generator seed (default: 0)"),
    ("--max-turns", "max_turns", int, "exchanges per dialogue at most (default: 10)"),
    ("--image-pattern", "image_pattern", str, "image file name pattern (default: {image_id:012d}.jpg)"),
    ("--base-url", "openai.base_url", str, "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1"),
    ("--api-key-env", "openai.api_key_env", str, "environment variable holding the API key (default: OPENAI_API_KEY)"),
    ("--concurrency", "openai.concurrency", int, "requests in flight (default: 8)"),
    ("--batch-size", "hf.batch_size", int, "hf generator batch size (default: 4)"),
    ("--max-new-tokens", "hf.max_new_tokens", int, "hf generator tokens per dialogue (default: 1024)"),
    ("--trust-remote-code", "hf.trust_remote_code", "flag", "allow the hf model's own code (off by default)"),
]
UNIMM_TRANSLATE_FLAGS = [
    (
        "--input",
        "input",
        str,
        "conversations: LLaVA JSON, UniMM-Chat jsonl, ShareGPT/LLaMA-Factory, or a dataset folder",
    ),
    ("--langs", "langs", "list", "comma-separated target languages (ISO 639-1), e.g. zh,de"),
    ("--backend", "backend", str, "hf (NLLB/M2M100/Marian) or openai (default: hf)"),
    ("--model", "model", str, "hf: model folder or hub id; openai: model name"),
    ("--output", "output", str, "output folder (llava.<lang>.json per language)"),
    ("--source-lang", "source_lang", str, "language of the input (default: en)"),
    ("--base-url", "openai.base_url", str, "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1"),
    ("--api-key-env", "openai.api_key_env", str, "environment variable holding the API key (default: OPENAI_API_KEY)"),
    ("--concurrency", "openai.concurrency", int, "requests in flight (default: 8)"),
    ("--batch-size", "hf.batch_size", int, "hf batch size (default: 16)"),
    ("--device", "hf.device", str, "auto|cpu|cuda (default: auto)"),
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


def _cmd_unimm_build(args: argparse.Namespace) -> int:
    from unimm_chat.build import build
    from unimm_chat.config import BuildConfig
    from unimm_chat.sources import SourceError

    flags = _flags(args, UNIMM_BUILD_FLAGS)
    if args.model is not None:  # --model belongs to whichever LLM generator is chosen
        generator = load_config(BuildConfig, args.config, flags, args.overrides).generator
        flags["hf.model" if generator == "hf" else "openai.model"] = args.model
    cfg = load_config(BuildConfig, args.config, flags, args.overrides)
    try:
        stats = build(cfg, show_progress=not args.no_progress)
    except SourceError as exc:
        raise ConfigError(str(exc)) from None
    turns = stats["turns_per_dialogue"]
    print(f"{stats['dialogues']:,} dialogues from {stats['images']:,} images, {turns['mean']} exchanges on average")
    for reason, n in stats["rejections"].items():
        print(f"  rejected {reason}: {n:,}  (e.g. {stats['rejection_examples'][reason]})")
    if "phrasing" in stats:
        p = stats["phrasing"]
        print(
            f"phrasing: {p['patterns']} templates used; the most used appears in {p['max_share_of_dialogues']:.1%} of dialogues"
        )
    print(f"timings (s): {stats['timings_s']}")
    print(f"wrote {cfg.output}/llava.json, unimm_chat.jsonl, dataset/, stats.json")
    return 0


def _cmd_unimm_translate(args: argparse.Namespace) -> int:
    from unimm_chat.config import TranslateConfig
    from unimm_chat.conversations import ConversationFormatError
    from unimm_chat.translate import translate

    cfg = load_config(TranslateConfig, args.config, _flags(args, UNIMM_TRANSLATE_FLAGS), args.overrides)
    try:
        stats = translate(cfg, show_progress=not args.no_progress)
    except ConversationFormatError as exc:
        raise ConfigError(str(exc)) from None
    for lang, s in stats["languages"].items():
        rejected = ", ".join(f"{r} {n}" for r, n in s["rejections"].items()) or "none"
        print(
            f"{lang}: {s['translated']:,} of {stats['conversations']:,} conversations (rejected: {rejected}) -> {s['output']}"
        )
    return 0


def _cmd_unimm_synth(args: argparse.Namespace) -> int:
    from unimm_chat.synthetic import write_annotations

    paths = write_annotations(args.output, args.num_images, seed=args.seed)
    flags = " ".join(f"--{name.replace('_', '-')} {path}" for name, path in paths.items())
    print(f"wrote annotation files for {args.num_images} images into {args.output}; build with:")
    print(f"  mpm unimm build {flags} --output DIR")
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from mpm.chat import interactive, one_shot
    from mpm.inference import ModelLoadError, load_model, open_image

    if not args.interactive and not args.prompt:
        raise ConfigError("give a message to answer, or --interactive")
    try:
        model, processor = load_model(args.model, device=args.device)
    except ModelLoadError as exc:
        raise ConfigError(str(exc)) from None
    generation = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0}
    if args.temperature > 0:
        generation.update(temperature=args.temperature, top_p=args.top_p)
    try:
        if args.interactive:  # --image and the message, if given, are the first turn's
            for path in args.image:
                open_image(path)  # a missing or unreadable image is an error before the session starts
            interactive(model, processor, images=args.image, first=args.prompt, **generation)
        else:
            print(one_shot(model, processor, args.prompt, args.image, raw=args.raw, **generation))
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    return 0


def _cmd_train_i2t(args: argparse.Namespace) -> int:
    from mpm.inference import ModelLoadError
    from mpm.recipes.i2t import train
    from mpm.train_config import TrainConfig

    cfg = load_config(TrainConfig, args.config, None, args.overrides)
    try:
        result = train(cfg, show_progress=not args.no_progress)
    except ModelLoadError as exc:
        raise ConfigError(str(exc)) from None
    print(f"final model in {result.final}")
    return 0


def _cmd_export_llava(args: argparse.Namespace) -> int:
    from mpm.export import ExportError, export_llava

    try:
        out = export_llava(args.model, args.out)
    except ExportError as exc:
        raise ConfigError(str(exc)) from None
    print(f"wrote a LlavaForConditionalGeneration checkpoint to {out}")
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
    groups = parser.add_subparsers(dest="group", required=True, metavar="{data,unimm,train,chat,export}")

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

    unimm = groups.add_parser("unimm", help="UniMM-Chat dialogues from caption/VQA annotations; translation")
    unimm_cmds = unimm.add_subparsers(dest="command", required=True, metavar="{build,translate,synth}")
    p = unimm_cmds.add_parser(
        "build",
        help="merge COCO captions, VQAv2, OK-VQA, A-OKVQA and VisDial per image into multi-turn dialogues",
        description=(
            "Read any subset of the official annotation files, merge them into one record per COCO image, write one "
            "knowledge-rich multi-turn dialogue per image (template: offline and deterministic; hf: a local chat "
            "model; openai: any OpenAI-compatible endpoint, cached and resumable), validate every dialogue and write "
            "DIR/llava.json, DIR/unimm_chat.jsonl, DIR/dataset/ and DIR/stats.json."
        ),
        epilog=(
            "example: mpm unimm build --coco-captions captions_train2017.json --vqav2-questions Q.json "
            "--vqav2-annotations A.json --aokvqa aokvqa_v1p0_train.json --visdial visdial_1.0_train.json "
            "--generator template --output unimm/"
        ),
    )
    p.add_argument("--config", help="YAML config file (see configs/unimm/)")
    _add_config_flags(p, UNIMM_BUILD_FLAGS)
    p.add_argument("--model", default=None, help="hf: model folder or hub id; openai: model name")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. min_vqa_agreement=0.5"
    )
    p.set_defaults(func=_cmd_unimm_build)

    p = unimm_cmds.add_parser(
        "translate",
        help="translate conversations into other languages (NLLB/M2M100/Marian or an endpoint)",
        description=(
            "Translate every conversation into each --langs language, keeping turns and <image> markers exactly, "
            "check each result with fastText language id, and write OUTPUT/llava.<lang>.json. Translations are "
            "cached, so a rerun only translates what is missing."
        ),
        epilog="example: mpm unimm translate --input unimm/llava.json --langs zh,de --backend hf "
        "--model facebook/nllb-200-distilled-600M --output unimm_mt/",
    )
    p.add_argument("--config", help="YAML config file")
    _add_config_flags(p, UNIMM_TRANSLATE_FLAGS)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. min_lang_score=0.7")
    p.set_defaults(func=_cmd_unimm_translate)

    p = unimm_cmds.add_parser(
        "synth",
        help="write small annotation files in the official schemas (tests, demos, benchmarks)",
        description=(
            "Write COCO captions, VQAv2, OK-VQA, A-OKVQA and Visual Dialog files for --num-images synthetic scenes, "
            "in the official schemas and with the real datasets' proportions, and print the build command."
        ),
    )
    p.add_argument("--output", required=True, help="folder to write the annotation files into")
    p.add_argument("--num-images", type=int, default=50, help="number of images (default: 50; 118287 = COCO scale)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_unimm_synth)

    p = groups.add_parser(
        "chat",
        help="talk to an image-to-text model (one message, or --interactive)",
        description=(
            "Answer a message about one or more images with an MPM checkpoint (or a LLaVA one). Without <image> "
            "markers in the message, the images go first. --interactive starts a multi-turn session: /image PATH "
            "adds an image to the next message, /reset forgets, /quit ends."
        ),
        epilog='example: mpm chat --model runs/sft --image cat.jpg "用中文描述这张图片"',
    )
    p.add_argument("prompt", nargs="?", help="the message (with --interactive: the first one, optional)")
    p.add_argument("--model", required=True, help="checkpoint folder (MPM, or LLaVA / exported)")
    p.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    p.add_argument(
        "--interactive", action="store_true", help="multi-turn session (--image and the message, if given, start it)"
    )
    p.add_argument("--raw", action="store_true", help="send the message as a raw prompt, without the chat template")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--device", default="auto", help="auto|cpu|cuda")
    p.set_defaults(func=_cmd_chat)

    train_group = groups.add_parser("train", help="train models (i2t: image-to-text)")
    train_cmds = train_group.add_subparsers(dest="command", required=True, metavar="{i2t}")
    p = train_cmds.add_parser(
        "i2t",
        help="MPM image-to-text training: stage pretrain (English pairs, LLM frozen) or sft (conversations)",
        description=(
            "Train an image-to-text MPM model with accelerate. stage: pretrain reads pair shards (mpm data shard) "
            "with the LLM frozen; stage: sft reads conversations (LLaVA JSON, UniMM-Chat jsonl, ShareGPT) and trains "
            "the LLM (full or LoRA). Rerunning the same command resumes exactly from the last checkpoint. Multi-GPU: "
            "accelerate launch --config_file configs/accelerate/ddp.yaml -m mpm.cli train i2t --config ..."
        ),
        epilog="example: mpm train i2t --config configs/i2t/qwen2.5-0.5b_siglip_resampler_pretrain.yaml train.max_steps=2000",
    )
    p.add_argument("--config", required=True, help="YAML config (configs/i2t/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. train.lr=1e-5")
    p.set_defaults(func=_cmd_train_i2t)

    export = groups.add_parser("export", help="convert checkpoints to other formats")
    export_cmds = export.add_subparsers(dest="command", required=True, metavar="{llava}")
    p = export_cmds.add_parser(
        "llava",
        help="an mlp checkpoint without slicing as a plain transformers LlavaForConditionalGeneration",
        description=(
            "Write a LLaVA checkpoint (weights, config, LlavaProcessor) that loads with transformers alone and gives "
            "the same logits. Only checkpoints with the mlp connector, no slicing and a ViT tower can be LLaVA."
        ),
    )
    p.add_argument("--model", required=True, help="MPM checkpoint folder")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_cmd_export_llava)
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
