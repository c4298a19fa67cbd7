"""`mpm unimm`: UniMM-Chat dialogues from caption/VQA annotations, their translation, small annotation files."""

from __future__ import annotations

from dataclasses import dataclass

from mpm.cli.options import Flag, add_command

BUILD_FLAGS = [
    Flag("--coco-captions", "sources.coco_captions", str, "COCO captions file (captions_train2017.json)"),
    Flag("--vqav2-questions", "sources.vqav2_questions", str, "VQAv2 questions file"),
    Flag("--vqav2-annotations", "sources.vqav2_annotations", str, "VQAv2 annotations file"),
    Flag("--okvqa-questions", "sources.okvqa_questions", str, "OK-VQA questions file"),
    Flag("--okvqa-annotations", "sources.okvqa_annotations", str, "OK-VQA annotations file"),
    Flag("--aokvqa", "sources.aokvqa", str, "A-OKVQA file (aokvqa_v1p0_train.json)"),
    Flag("--visdial", "sources.visdial", str, "Visual Dialog 1.0 file (visdial_1.0_train.json)"),
    Flag("--generator", "generator", str, "template|hf|openai (default: template)"),
    Flag("--output", "output", str, "output folder"),
    Flag("--seed", "seed", int, "template generator seed (default: 0)"),
    Flag("--max-turns", "max_turns", int, "exchanges per dialogue at most (default: 10)"),
    Flag("--image-pattern", "image_pattern", str, "image file name pattern (default: {image_id:012d}.jpg)"),
    Flag("--base-url", "openai.base_url", str, "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1"),
    Flag("--api-key-env", "openai.api_key_env", str, "environment variable holding the API key (default: OPENAI_API_KEY)"),
    Flag("--concurrency", "openai.concurrency", int, "requests in flight (default: 8)"),
    Flag("--batch-size", "hf.batch_size", int, "hf generator batch size (default: 4)"),
    Flag("--max-new-tokens", "hf.max_new_tokens", int, "hf generator tokens per dialogue (default: 1024)"),
    Flag("--trust-remote-code", "hf.trust_remote_code", "flag", "allow the hf model's own code (off by default)"),
]  # fmt: skip
TRANSLATE_FLAGS = [
    Flag("--input", "input", str, "conversations: LLaVA JSON, UniMM-Chat jsonl, ShareGPT/LLaMA-Factory, or a dataset folder"),
    Flag("--langs", "langs", "list", "comma-separated target languages (ISO 639-1), e.g. zh,de"),
    Flag("--backend", "backend", str, "hf (NLLB/M2M100/Marian) or openai (default: hf)"),
    Flag("--model", "model", str, "hf: model folder or hub id; openai: model name"),
    Flag("--output", "output", str, "output folder (llava.<lang>.json per language)"),
    Flag("--source-lang", "source_lang", str, "language of the input (default: en)"),
    Flag("--base-url", "openai.base_url", str, "OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1"),
    Flag("--api-key-env", "openai.api_key_env", str, "environment variable holding the API key (default: OPENAI_API_KEY)"),
    Flag("--concurrency", "openai.concurrency", int, "requests in flight (default: 8)"),
    Flag("--batch-size", "hf.batch_size", int, "hf batch size (default: 16)"),
    Flag("--device", "hf.device", str, "auto|cpu|cuda (default: auto)"),
]  # fmt: skip


@dataclass
class SynthCommand:
    output: str = ""  # folder to write the annotation files into
    num_images: int = 50  # 118287 = COCO scale
    seed: int = 0


SYNTH_FLAGS = [
    Flag("--output", "output", str, "folder to write the annotation files into"),
    Flag("--num-images", "num_images", int, "number of images (default: 50; 118287 = COCO scale)"),
    Flag("--seed", "seed", int, "random seed (default: 0)"),
]


def model_flag(args, load) -> dict:
    """--model belongs to whichever LLM generator the config chooses."""
    if args.model is None:
        return {}
    return {"hf.model" if load().generator == "hf" else "openai.model": args.model}


def build_command(cfg, args) -> int:
    from unimm_chat.build import build

    stats = build(cfg, show_progress=not args.no_progress)
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


def translate_command(cfg, args) -> int:
    from unimm_chat.translate import translate

    stats = translate(cfg, show_progress=not args.no_progress)
    for lang, s in stats["languages"].items():
        rejected = ", ".join(f"{r} {n}" for r, n in s["rejections"].items()) or "none"
        print(
            f"{lang}: {s['translated']:,} of {stats['conversations']:,} conversations (rejected: {rejected}) -> {s['output']}"
        )
    return 0


def synth_command(cfg: SynthCommand, args) -> int:
    from mpm.core.errors import ConfigError
    from unimm_chat.synthetic import write_annotations

    if not cfg.output:
        raise ConfigError("no output folder: pass --output DIR")
    paths = write_annotations(cfg.output, cfg.num_images, seed=cfg.seed)
    flags = " ".join(f"--{name.replace('_', '-')} {path}" for name, path in paths.items())
    print(f"wrote annotation files for {cfg.num_images} images into {cfg.output}; build with:")
    print(f"  mpm unimm build {flags} --output DIR")
    return 0


def register(groups) -> None:
    unimm = groups.add_parser("unimm", help="UniMM-Chat dialogues from caption/VQA annotations; translation")
    commands = unimm.add_subparsers(dest="command", required=True, metavar="{build,translate,synth}")
    p = add_command(
        commands,
        "build",
        build_command,
        "unimm_chat.config:BuildConfig",
        BUILD_FLAGS,
        extra_flags=model_flag,
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
    # --model sets hf.model or openai.model, whichever generator runs: not one config key, so not in the table
    p.add_argument("--model", default=None, help="hf: model folder or hub id; openai: model name")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = add_command(
        commands,
        "translate",
        translate_command,
        "unimm_chat.config:TranslateConfig",
        TRANSLATE_FLAGS,
        help="translate conversations into other languages (NLLB/M2M100/Marian or an endpoint)",
        description=(
            "Translate every conversation into each --langs language, keeping turns and <image> markers exactly, "
            "check each result with fastText language id, and write OUTPUT/llava.<lang>.json. Translations are "
            "cached, so a rerun only translates what is missing."
        ),
        epilog="example: mpm unimm translate --input unimm/llava.json --langs zh,de --backend hf "
        "--model facebook/nllb-200-distilled-600M --output unimm_mt/",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    add_command(
        commands,
        "synth",
        synth_command,
        SynthCommand,
        SYNTH_FLAGS,
        help="write small annotation files in the official schemas (tests, demos, benchmarks)",
        description=(
            "Write COCO captions, VQAv2, OK-VQA, A-OKVQA and Visual Dialog files for --num-images synthetic scenes, "
            "in the official schemas and with the real datasets' proportions, and print the build command."
        ),
        epilog="example: mpm unimm synth --output annotations/ --num-images 200",
    )
