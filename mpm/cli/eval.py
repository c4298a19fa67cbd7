"""`mpm eval`: cross-lingual transfer measured per language (captioning, VQA, hallucination, multiple choice,
text-to-image), with language fidelity beside every generative score; `mpm eval report` compares runs."""

from __future__ import annotations

from dataclasses import dataclass, field

from mpm.cli.options import Flag, add_command

COMMON = [
    Flag("--model", "model", str, "checkpoint to generate with (MPM or LLaVA)"),
    Flag("--predictions", "predictions", str, 'score outputs made elsewhere: jsonl {"image", "lang", "output"}'),
    Flag("--data", "data", str, "the benchmark file"),
    Flag("--images", "images", str, "folder holding the data's images"),
    Flag("--langs", "langs", "list", "languages, comma-separated (e.g. en,zh,de)"),
    Flag("--output", "output", str, "results folder: results.json, items.jsonl, table.md, chart.png", short="-o"),
    Flag("--metric", "metrics", "append", "a registered scorer or package.module:Class; repeat for several"),
    Flag("--batch-size", "batch_size", int, "requests generated together"),
    Flag("--max-new-tokens", "max_new_tokens", int, "tokens generated at most per output"),
    Flag("--device", "device", str, "auto|cpu|cuda"),
    Flag("--quantize", "quantize", str, "int8|int4: the LLM's weights quantised (weight-only)"),
]


def _finish(results: dict, items: list[dict], output: str) -> int:
    from mpm.eval.report import markdown_table, write_results

    written = write_results(results, items, output)
    print(markdown_table(results))
    print(f"written: {', '.join(str(p) for p in written)}")
    return 0


def _require(cfg, *keys: str) -> None:
    from mpm.core.errors import ConfigError

    for key in keys:
        if not getattr(cfg, key):
            raise ConfigError(f"give --{key.replace('_', '-')}")


def caption_command(cfg, args) -> int:
    from mpm.eval.caption import evaluate_caption

    _require(cfg, "data", "output")
    results, items = evaluate_caption(cfg, show_progress=not args.no_progress)
    return _finish(results, items, cfg.output)


def vqa_command(cfg, args) -> int:
    from mpm.eval.vqa import evaluate_vqa

    _require(cfg, "data", "output")
    results, items = evaluate_vqa(cfg, show_progress=not args.no_progress)
    return _finish(results, items, cfg.output)


@dataclass
class ChairCommand:
    model: str | None = None
    predictions: str | None = None  # jsonl {"image", "lang", "output"}: English descriptions made elsewhere
    images: str | None = None  # COCO images (with --model: every image of the folder, or the first max_images)
    instances: str = ""  # COCO instances_{split}.json
    captions: str | None = None  # COCO captions_{split}.json (objects the references mention count as present)
    prompt: str = "Describe this image in detail."
    max_images: int | None = None
    output: str = ""
    batch_size: int = 8
    max_new_tokens: int = 256
    device: str = "auto"
    quantize: str | None = None  # int8 | int4: the LLM's Linear weights quantised (mpm.quantize)


def chair_command(cfg: ChairCommand, args) -> int:
    from mpm.eval.chair import evaluate_chair

    _require(cfg, "instances", "output")
    if (cfg.model is None) == (cfg.predictions is None):
        from mpm.core.errors import ConfigError

        raise ConfigError("give --model (with --images) to describe images, or --predictions FILE to score")
    outputs = cfg.predictions if cfg.predictions else _describe_images(cfg, not args.no_progress)
    results, items = evaluate_chair(outputs, cfg.instances, cfg.captions)
    results.update(model=cfg.model, predictions=cfg.predictions, data=cfg.instances)
    return _finish(results, items, cfg.output)


def _describe_images(cfg: ChairCommand, show_progress: bool) -> list[dict]:
    from pathlib import Path

    from mpm.core.errors import DataError
    from mpm.inference import Request, generate, load_model

    if not cfg.images or not Path(cfg.images).is_dir():
        raise DataError(f"--images {cfg.images!r}: give the folder of COCO images to describe")
    files = sorted(p for p in Path(cfg.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    files = files[: cfg.max_images] if cfg.max_images else files
    if not files:
        raise DataError(f"--images {cfg.images}: no .jpg / .png image in it")
    model, processor = load_model(cfg.model, device=cfg.device, quantize=cfg.quantize)
    requests = [Request(images=[str(f)], messages=[{"role": "user", "content": cfg.prompt}]) for f in files]
    answers = generate(model, processor, requests, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                       show_progress=show_progress)  # fmt: skip
    return [{"image": f.name, "lang": "en", "output": a} for f, a in zip(files, answers)]


@dataclass
class MmbenchCommand:
    model: str = ""
    data: list[str] = field(default_factory=list)  # one TSV per language, in the order of langs
    langs: list[str] = field(default_factory=lambda: ["en"])
    images: str | None = None  # when the TSV names image files instead of holding base64 images
    output: str = ""
    batch_size: int = 8
    max_new_tokens: int = 8
    device: str = "auto"
    quantize: str | None = None  # int8 | int4: the LLM's Linear weights quantised (mpm.quantize)


def mmbench_command(cfg: MmbenchCommand, args) -> int:
    from mpm.core.errors import ConfigError
    from mpm.eval.languages import parse_langs
    from mpm.eval.mmbench import evaluate_mmbench, transfer
    from mpm.inference import load_model

    _require(cfg, "model", "data", "output")
    langs = parse_langs(",".join(cfg.langs))
    if len(cfg.data) != len(langs):
        raise ConfigError(f"give one --data TSV per language: {len(cfg.data)} files for {len(langs)} languages")
    model, processor = load_model(cfg.model, device=cfg.device, quantize=cfg.quantize)
    results, items = None, []
    for tsv, lang in zip(cfg.data, langs):
        lang_results, lang_items = evaluate_mmbench(model, processor, tsv, lang, cfg.images, cfg.batch_size,
                                                    cfg.max_new_tokens)  # fmt: skip
        if results is None:
            results = lang_results
        else:
            results["languages"].update(lang_results["languages"])
        items += [{"lang": lang, **row} for row in lang_items]  # one items.jsonl for every language
    if "en" in langs:  # the same questions in English and another language give the transfer ratio directly
        for lang, ratio in transfer(results["languages"]).items():
            results["languages"][lang]["transfer_ratio"] = {"accuracy": ratio["ratio"]}
    results.update(model=cfg.model, data=list(cfg.data))
    return _finish(results, items, cfg.output)


@dataclass
class PaintEvalCommand:
    model: str = ""  # an MPMPaintPipeline folder
    prompts: str = ""  # jsonl {"id", "lang", "prompt"}: the same ids in every language
    langs: list[str] = field(default_factory=lambda: ["en"])
    scorer: str | None = None  # a CLIP / SigLIP-style model: image-text scores and consistency
    feature_model: str | None = None  # CLIP / SigLIP / DINOv2: Frechet distance to the reference images
    reference_images: str | None = None
    metrics: list[str] = field(default_factory=list)  # image judges: registered names or module:Class
    metric_options: dict = field(default_factory=dict)  # {judge: {option: value}}, e.g. clip_score.model=PATH
    num_images: int = 1
    seed: int = 0
    steps: int = 30
    guidance: float = 7.5
    size: str | None = None
    batch_size: int = 4
    output: str = ""
    device: str = "auto"


def paint_command(cfg: PaintEvalCommand, args) -> int:
    from mpm.cli.paint import parse_size
    from mpm.eval.paint import evaluate_paint, read_parallel_prompts
    from mpm.eval.scorers import build_scorer
    from t2i import MPMPaintPipeline

    _require(cfg, "model", "prompts", "output")
    width, height = parse_size(cfg.size)
    import torch

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    from mpm.cli.paint import PaintCommand, load_pipeline

    if args.no_progress:  # also the loading bars of diffusers and transformers
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    pipe = load_pipeline(PaintCommand(model=cfg.model, device=device))
    assert isinstance(pipe, MPMPaintPipeline)
    results, items = evaluate_paint(
        pipe, read_parallel_prompts(cfg.prompts), cfg.langs, cfg.output, scorer_path=cfg.scorer, feature_model=cfg.feature_model,
        reference_images=cfg.reference_images, num_images=cfg.num_images, seed=cfg.seed, steps=cfg.steps,
        guidance_scale=cfg.guidance, height=height, width=width, batch_size=cfg.batch_size,
        judges=[build_scorer(name, "image", **cfg.metric_options.get(name, {})) for name in cfg.metrics],
        device=device, show_progress=not args.no_progress,
    )  # fmt: skip
    results.update(model=cfg.model, data=cfg.prompts)
    return _finish(results, items, cfg.output)


@dataclass
class ReportCommand:
    results: list[str] = field(default_factory=list)
    output: str | None = None  # also write the table to this markdown file


def report_command(cfg: ReportCommand, args) -> int:
    from mpm.core.errors import ConfigError
    from mpm.eval.report import compare

    if len(cfg.results) < 1:
        raise ConfigError("give the results.json files to compare")
    table = compare(cfg.results)
    print(table)
    if cfg.output:
        from mpm.core.files import atomic_write_bytes

        atomic_write_bytes(cfg.output, table.encode("utf-8"))
    return 0


def register(groups) -> None:
    evaluate = groups.add_parser("eval", help="measure cross-lingual transfer per language")
    commands = evaluate.add_subparsers(dest="command", required=True,
                                       metavar="{caption,vqa,chair,mmbench,paint,report}")  # fmt: skip
    generative = "; language fidelity (did it answer in the language asked?) and the transfer ratio to English beside every score"
    p = add_command(
        commands, "caption", caption_command, "mpm.eval.caption:CaptionEvalConfig",
        [*COMMON, Flag("--prompts", "prompts", str, "YAML/JSON {lang: prompt} overriding the shipped prompts"),
         Flag("--tokenizer", "tokenizer", str, "CIDEr/BLEU tokenizers other than the defaults, e.g. zh:jieba,en:ptb"),
         Flag("--max-images", "max_images", int, "the first N images per language")],
        help="zero-shot captioning per language: CIDEr-D, BLEU-4" + generative,
        description="Caption Crossmodal-3600 (captions.jsonl) or a generic jsonl per language, asked in each language, "
                    "then score per language with one fixed tokenizer each (characters for zh/ja/th)" + generative + ".",
        epilog="example: mpm eval caption --model runs/i2t/final --data xm3600/captions.jsonl --images xm3600/images "
               "--langs en,zh,de,ja -o runs/eval/xm3600",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = add_command(
        commands, "vqa", vqa_command, "mpm.eval.vqa:VqaEvalConfig",
        [*COMMON, Flag("--annotations", "annotations", str, "VQAv2 annotations JSON (with --data the questions JSON)"),
         Flag("--templates", "templates", str, "YAML/JSON {lang: '... {question} ...'}"),
         Flag("--max-questions", "max_questions", int, "the first N questions per language")],
        help="VQA per language: VQAv2 accuracy, or normalised exact match (MaXM, xGQA)" + generative,
        description="Answer VQAv2 (official accuracy) or jsonl questions per language (normalised exact match)"
                    + generative + ".",
        epilog="example: mpm eval vqa --model runs/i2t/final --data maxm.jsonl --images maxm/ --langs en,zh,fr -o out/",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = add_command(
        commands, "chair", chair_command, ChairCommand,
        [Flag("--model", "model", str, "checkpoint to describe the images with"),
         Flag("--predictions", "predictions", str, "English descriptions made elsewhere (jsonl)"),
         Flag("--images", "images", str, "COCO images to describe"),
         Flag("--instances", "instances", str, "COCO instances JSON"),
         Flag("--captions", "captions", str, "COCO captions JSON"),
         Flag("--max-images", "max_images", int, "the first N images"),
         Flag("--device", "device", str, "auto|cpu|cuda"), Flag("--quantize", "quantize", str, "int8|int4: the LLM's weights quantised (weight-only)"),
         Flag("--output", "output", str, "results folder", short="-o")],
        help="object hallucination of English descriptions: CHAIR_s and CHAIR_i (COCO)",
        epilog="example: mpm eval chair --model runs/i2t/final --images coco/val2014 --max-images 500 "
               "--instances annotations/instances_val2014.json --captions annotations/captions_val2014.json -o out/",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_command(
        commands, "mmbench", mmbench_command, MmbenchCommand,
        [Flag("--model", "model", str, "checkpoint"), Flag("--data", "data", "append", "a TSV per language, in --langs order"),
         Flag("--langs", "langs", "list", "languages of the TSVs"), Flag("--images", "images", str, "image folder"),
         Flag("--device", "device", str, "auto|cpu|cuda"), Flag("--quantize", "quantize", str, "int8|int4: the LLM's weights quantised (weight-only)"),
         Flag("--output", "output", str, "results folder", short="-o")],
        help="MMBench-style multiple choice with circular evaluation; en + zh give the transfer ratio",
        epilog="example: mpm eval mmbench --model runs/i2t/final --data mmbench_en.tsv --data mmbench_cn.tsv --langs en,zh -o out/",
    )  # fmt: skip
    p = add_command(
        commands, "paint", paint_command, PaintEvalCommand,
        [Flag("--model", "model", str, "MPMPaintPipeline folder"),
         Flag("--prompts", "prompts", str, 'jsonl {"id", "lang", "prompt"}, the same ids in every language'),
         Flag("--langs", "langs", "list", "languages"),
         Flag("--scorer", "scorer", str, "CLIP / SigLIP-style model for image-text scores and consistency"),
         Flag("--feature-model", "feature_model", str, "CLIP / SigLIP / DINOv2 model for the Frechet distance"),
         Flag("--reference-images", "reference_images", str, "folder of real images for the Frechet distance"),
         Flag("--metric", "metrics", "append", "an image judge: registered name or package.module:Class"),
         Flag("--num-images", "num_images", int, "images per prompt"), Flag("--seed", "seed", int, "base seed"),
         Flag("--steps", "steps", int, "sampling steps"), Flag("--guidance", "guidance", float, "guidance scale"),
         Flag("--size", "size", str, "512 or WIDTHxHEIGHT"), Flag("--device", "device", str, "auto|cpu|cuda"),
         Flag("--output", "output", str, "results folder (images under it)", short="-o")],
        help="text-to-image per language: image-text score (also against the English prompt), cross-language consistency",
        epilog="example: mpm eval paint --model runs/t2i/final --prompts prompts.jsonl --langs en,zh --scorer CLIP_DIR -o out/",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = add_command(
        commands, "report", report_command, ReportCommand,
        [Flag("--output", "output", str, "also write the table to this markdown file", short="-o")],
        positional=("results", "results.json files of runs of the same benchmark"),
        help="compare several results.json files in one table",
        epilog="example: mpm eval report runs/eval/a/results.json runs/eval/b/results.json",
    )  # fmt: skip
