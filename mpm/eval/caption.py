"""`mpm eval caption`: zero-shot captioning per language, asked in the language (the MPM test).

Each language's prompt is written in that language (mpm/eval/languages.py; a file can override any of them), so a
model that understands the question but answers in English fails the fidelity check instead of passing unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mpm.core.config import check_range
from mpm.eval.data import read_captions
from mpm.eval.generative import GenerationSettings, ScoringSettings, evaluate_generative
from mpm.eval.languages import check_prompts, is_raw, parse_langs, prompt_table


@dataclass
class CaptionEvalConfig:
    model: str | None = None  # a checkpoint to generate with (MPM or LLaVA)
    predictions: str | None = None  # or outputs made elsewhere: jsonl {"image", "lang", "output"} (optional "id")
    data: str = ""  # Crossmodal-3600 captions.jsonl, or jsonl {"image", "lang", "references"}
    images: str | None = None  # the folder the data's image names are in
    langs: list[str] = field(default_factory=lambda: ["en"])
    prompts: str | None = None  # YAML/JSON {lang: prompt} overriding the shipped table ("<image>" in it: raw prompt)
    output: str = ""  # the results folder
    metrics: list[str] = field(default_factory=lambda: ["cider", "bleu4"])  # registered names or module:Class
    metric_options: dict = field(default_factory=dict)  # {metric: {option: value}}
    tokenizer: str | None = None  # cider / bleu4 tokenizers other than each language's default: "zh:jieba,en:ptb"
    max_images: int | None = None  # the first N images of each language (a quick look)
    batch_size: int = 8
    max_new_tokens: int = 64
    device: str = "auto"
    quantize: str | None = None  # int8 | int4: the LLM's Linear weights quantised (mpm.quantize)
    min_chars: int = 6
    min_words: int = 3

    def __post_init__(self):
        for name in ("batch_size", "max_new_tokens", "min_chars", "min_words"):
            check_range(name, getattr(self, name), 1)


def request_for_prompts(table: dict[str, str]):
    """The `request_for` of a prompt per language: a chat message, or a raw prompt (image marker inside).
    `with_request=False` gives the prompt alone (scoring predictions: no torch to import)."""

    def request_for(item: dict, images: Path | None, with_request: bool = True):
        prompt = table[item["lang"]].replace("{question}", item.get("question", ""))
        if not with_request:
            return None, prompt
        from mpm.inference import Request

        image = str(images / item["image"]) if images is not None else item["image"]
        if is_raw(prompt):
            return Request(images=[image], prompt=prompt), prompt
        return Request(images=[image], messages=[{"role": "user", "content": prompt}]), prompt

    return request_for


def check_caption_eval(cfg: CaptionEvalConfig) -> tuple[list[str], dict[str, str], dict[str, list[dict]]]:
    """(languages, prompt table, items per language), every setting checked (and each scorer against each
    language) without a model: what a training run checks before its first step."""
    from mpm.eval.scorers import build_scorer

    langs = parse_langs(",".join(cfg.langs))
    table = prompt_table(cfg.prompts)
    check_prompts(table, langs)
    items = read_captions(cfg.data, langs)
    if cfg.max_images:
        items = {lang: lang_items[: cfg.max_images] for lang, lang_items in items.items()}
    for name in cfg.metrics:
        scorer = build_scorer(name, "text", **cfg.metric_options.get(name, {}))
        for lang in langs:
            scorer.check(items[lang], lang)
    return langs, table, items


def evaluate_caption(cfg: CaptionEvalConfig, model=None, processor=None, show_progress: bool = True):
    """(results, per-item rows): see mpm/eval/generative.py for their schema."""
    langs, table, items = check_caption_eval(cfg)
    options = {k: dict(v) for k, v in cfg.metric_options.items()}
    if cfg.tokenizer:
        for name in ("cider", "bleu4"):
            options.setdefault(name, {}).setdefault("tokenizer", cfg.tokenizer)
    scoring = ScoringSettings(cfg.metrics, options, cfg.min_chars, cfg.min_words)
    generation = GenerationSettings(cfg.batch_size, cfg.max_new_tokens, cfg.device, cfg.quantize)
    describe = {"data": cfg.data, "images": cfg.images, "max_images": cfg.max_images,
                "prompts": {lang: table[lang] for lang in langs}}  # fmt: skip
    return evaluate_generative(
        "caption", items, request_for_prompts(table), scoring, cfg.images, cfg.model, cfg.predictions, generation,
        model, processor, show_progress, describe,
    )  # fmt: skip
