"""`mpm eval vqa`: visual question answering per language (VQAv2, MaXM, xGQA-style jsonl).

The question goes to the model in its own language, followed by a short-answer instruction from a per-language
template (`{question}` is replaced; a file can give other templates). VQAv2 is scored with its official accuracy,
jsonl sets with normalised exact match, unless other metrics are named.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mpm.core.config import check_range
from mpm.core.errors import ConfigError
from mpm.eval.caption import request_for_prompts
from mpm.eval.data import read_vqa
from mpm.eval.generative import GenerationSettings, ScoringSettings, evaluate_generative
from mpm.eval.languages import parse_langs

# LLaVA-1.5's short-answer instruction, written in each language it is asked in; other languages get the bare question
# unless a templates file gives one.
SHORT_ANSWER = {
    "en": "{question}\nAnswer the question using a single word or phrase.",
    "zh": "{question}\n请用一个单词或短语回答问题。",
    "de": "{question}\nBeantworte die Frage mit einem einzigen Wort oder einer kurzen Phrase.",
    "fr": "{question}\nRéponds à la question par un seul mot ou une courte expression.",
    "es": "{question}\nResponde a la pregunta con una sola palabra o frase.",
    "ja": "{question}\n一つの単語または短い語句で質問に答えてください。",
}


@dataclass
class VqaEvalConfig:
    model: str | None = None
    predictions: str | None = None
    data: str = ""  # jsonl {"image", "lang", "question", "answers"}, or VQAv2's questions JSON (with annotations)
    annotations: str | None = None  # VQAv2's annotations JSON (English)
    images: str | None = None
    langs: list[str] = field(default_factory=lambda: ["en"])
    templates: str | None = None  # YAML/JSON {lang: "... {question} ..."} overriding SHORT_ANSWER
    output: str = ""
    metrics: list[str] | None = None  # default: vqa_accuracy for VQAv2, exact_match for jsonl
    metric_options: dict = field(default_factory=dict)
    max_questions: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 16
    device: str = "auto"
    quantize: str | None = None  # int8 | int4: the LLM's Linear weights quantised (mpm.quantize)
    # fastText cannot tell the language of a one-word answer ("rot", "ja": wrongly labelled): short answers are
    # too short to judge, so VQA fidelity speaks for the longer answers (`fidelity_judged`)
    min_chars: int = 6
    min_words: int = 3

    def __post_init__(self):
        for name in ("batch_size", "max_new_tokens", "min_chars", "min_words"):
            check_range(name, getattr(self, name), 1)


def load_templates(path: str) -> dict[str, str]:
    """{lang: template} from a YAML or JSON file."""
    from pathlib import Path

    import yaml

    from mpm.core.config import parse_yaml
    from mpm.core.errors import DataError

    try:
        table = parse_yaml(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise DataError(f"--templates {path}: cannot be read ({exc})") from None
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise DataError(f"--templates {path}: expected a mapping of language code to template string")
    return {str(k): v for k, v in table.items()}


def evaluate_vqa(cfg: VqaEvalConfig, model=None, processor=None, show_progress: bool = True):
    langs = parse_langs(",".join(cfg.langs))
    templates = {**SHORT_ANSWER, **(load_templates(cfg.templates) if cfg.templates else {})}
    for lang in langs:
        templates.setdefault(lang, "{question}")
        if "{question}" not in templates[lang]:
            raise ConfigError(f"the VQA template for {lang} must contain {{question}}, got {templates[lang]!r}")
    items = read_vqa(cfg.data, langs, cfg.annotations)
    if cfg.max_questions:
        items = {lang: lang_items[: cfg.max_questions] for lang, lang_items in items.items()}
    metrics = cfg.metrics or (["vqa_accuracy"] if cfg.annotations else ["exact_match"])
    scoring = ScoringSettings(metrics, cfg.metric_options, cfg.min_chars, cfg.min_words)
    generation = GenerationSettings(cfg.batch_size, cfg.max_new_tokens, cfg.device, cfg.quantize)
    describe = {"data": cfg.data, "annotations": cfg.annotations, "images": cfg.images,
                "prompts": {lang: templates[lang] for lang in langs}}  # fmt: skip
    return evaluate_generative(
        "vqa", items, request_for_prompts(templates), scoring, cfg.images, cfg.model, cfg.predictions, generation,
        model, processor, show_progress, describe,
    )  # fmt: skip
