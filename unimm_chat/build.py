"""`mpm unimm build`: annotation files -> merged per-image records -> dialogues -> validated -> exports + stats.

Writes into the output folder:
    llava.json        the conversations in LLaVA JSON (DESIGN.md conversation contract)
    unimm_chat.jsonl  the released UniMM-Chat layout ({"image_name", "data"})
    dataset/          a Hugging Face dataset (save_to_disk) with the LLaVA columns
    stats.json        images, dialogues, turns, tokens, rejections by reason, source coverage, phrasing diversity,
                      timings of reading / merging / generating / writing
    config.yaml       the resolved config
    cache.sqlite      (LLM generators) every reply, so a rerun resumes without asking again
"""

from __future__ import annotations

import re
import resource
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mpm.core.config import save_config
from mpm.core.errors import EndpointError
from mpm.core.files import atomic_write_json, output_folder
from mpm.core.http import LLMError, ResponseCache
from unimm_chat.config import BuildConfig
from unimm_chat.conversations import Conversation, write_hf_dataset, write_llava_json, write_unimm_jsonl
from unimm_chat.llm import HFGenerator, OpenAIGenerator, ParseError, to_conversation
from unimm_chat.sources import ImageRecord, ReadStats, merge_sources
from unimm_chat.template import TemplateGenerator
from unimm_chat.validate import validate

_TOKEN = re.compile(r"\w+|[^\w\s]")
MAX_ERRORS_IN_A_ROW = 25  # an endpoint that fails this many requests in a row is down or misconfigured


def image_name(record: ImageRecord, pattern: str) -> str:
    if "{file_name" in pattern and not record.file_name:
        raise ValueError(f"image {record.image_id} has no file_name in the COCO captions file")
    return pattern.format(image_id=record.image_id, file_name=record.file_name)


class _Tally:
    """Accepted dialogues, rejections by reason (with the first example of each), phrasing patterns."""

    def __init__(self):
        self.accepted: list[tuple[ImageRecord, Conversation]] = []
        self.rejections: Counter = Counter()
        self.examples: dict[str, str] = {}
        self.patterns: Counter = Counter()  # pattern -> number of dialogues using it

    def reject(self, reason: str, record: ImageRecord, detail: str) -> None:
        self.rejections[reason] += 1
        self.examples.setdefault(reason, f"image {record.image_id}: {detail}"[:300])

    def offer(self, record: ImageRecord, conv: Conversation, cfg: BuildConfig, patterns=()) -> bool:
        failure = validate(conv, record, cfg.min_turns, cfg.min_vqa_agreement)
        if failure:
            self.reject(failure[0], record, failure[1])
            return False
        self.accepted.append((record, conv))
        self.patterns.update(patterns)
        return True


def build(cfg: BuildConfig, show_progress: bool = True) -> dict[str, Any]:
    """Run the whole build; returns the stats also written to `{output}/stats.json`."""
    cfg.check_required()
    out = output_folder(cfg.output, "output")
    save_config(cfg, out / "config.yaml")
    timings: dict[str, float] = {}
    started = time.perf_counter()

    # 1. Read and merge the sources.
    read_stats = ReadStats()
    records = list(merge_sources(cfg.sources, read_stats).values())
    merged_at = time.perf_counter()
    timings["read"] = read_stats.load_seconds
    timings["merge"] = merged_at - started - read_stats.load_seconds
    memory = {"read_and_merge": _peak_rss_mb()}

    # 2. Generate and validate.
    tally = _Tally()
    bar = tqdm(total=len(records), unit=" images", disable=not show_progress, desc=f"{cfg.generator} dialogues")
    names: dict[int, str] = {}
    for record in records:
        try:
            names[record.image_id] = image_name(record, cfg.image_pattern)
        except ValueError as exc:
            tally.reject("no_file_name", record, str(exc))
    usable = [r for r in records if r.image_id in names]
    cache_stats = {}
    if cfg.generator == "template":
        generator = TemplateGenerator(cfg.seed, cfg.max_turns, cfg.min_vqa_agreement)
        for record in usable:
            conv, patterns = generator.generate(record)
            if conv is None:
                tally.reject("no_usable_annotations", record, "no captions and no question with a confident answer")
            else:
                conv.images = [names[record.image_id]]
                tally.offer(record, conv, cfg, patterns)
            bar.update()
    else:
        cache_stats = _generate_with_llm(cfg, usable, names, tally, bar, out / "cache.sqlite")
    bar.close()
    generated_at = time.perf_counter()
    timings["generate"] = generated_at - merged_at
    memory["generate"] = _peak_rss_mb()

    # 3. Write the exports and the stats.
    conversations = [conv for _, conv in tally.accepted]
    write_llava_json(conversations, out / "llava.json")
    write_unimm_jsonl(conversations, out / "unimm_chat.jsonl")
    write_hf_dataset(conversations, out / "dataset")
    timings["write"] = time.perf_counter() - generated_at
    timings["total"] = time.perf_counter() - started
    memory["write"] = _peak_rss_mb()
    stats = _stats(cfg, records, tally, read_stats, cache_stats, timings)
    stats["peak_memory_mb"] = memory  # the process's peak resident memory at the end of each phase
    atomic_write_json(out / "stats.json", stats)
    return stats


class EndpointFailing(EndpointError):
    """The LLM fails every request the same way (bad key, model, URL, or a server that is down): stop early."""


def _generate_with_llm(cfg: BuildConfig, records, names, tally: _Tally, bar, cache_path: Path) -> dict[str, int]:
    """Ask the LLM (or the cache) for each record's dialogue. Only accepted replies are cached: a rerun asks
    again for the images whose replies failed or were rejected, and never for the others."""
    cache = ResponseCache(cache_path)
    if cfg.generator == "openai":
        generator = OpenAIGenerator(cfg.openai, cfg, cache)
    else:
        generator = HFGenerator(cfg.hf, cfg, cache)
    hits = errors_in_a_row = 0
    try:
        for record, key, reply, cached in generator.replies(records):
            hits += cached
            bar.update()
            if isinstance(reply, LLMError):
                errors_in_a_row += 1
                tally.reject("llm_error", record, str(reply))
                if reply.fatal or errors_in_a_row >= MAX_ERRORS_IN_A_ROW:
                    what = str(reply) if reply.fatal else f"{errors_in_a_row} requests in a row failed ({reply})"
                    raise EndpointFailing(
                        f"stopping: {what}. Fix the endpoint settings and rerun: accepted replies are cached in "
                        f"{cache_path}."
                    )
                continue
            errors_in_a_row = 0
            try:
                conv = to_conversation(record, reply, names[record.image_id])
            except ParseError as exc:
                tally.reject(exc.reason, record, exc.detail)
                continue
            if tally.offer(record, conv, cfg) and not cached:
                cache.put(key, reply)
    finally:
        cache.close()
    return {"cached_replies_used": hits, "new_requests": len(records) - hits}


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def _stats(cfg, records, tally: _Tally, read_stats: ReadStats, cache_stats: dict, timings: dict) -> dict[str, Any]:
    turns = [len(conv.messages) // 2 for _, conv in tally.accepted]
    tokens = [sum(len(_TOKEN.findall(m.content)) for m in conv.messages) for _, conv in tally.accepted]
    n = len(tally.accepted)
    coverage = {}
    for source in ("coco_captions", "aokvqa", "okvqa", "vqav2", "visdial"):
        images = sum(source in r.sources for r in records)
        if images:
            dialogues = sum(source in r.sources for r, _ in tally.accepted)
            coverage[source] = {"images": images, "dialogues": dialogues}
    stats: dict[str, Any] = {
        "generator": cfg.generator,
        "images": len(records),
        "dialogues": n,
        "turns_per_dialogue": {
            "mean": round(statistics.fmean(turns), 2) if turns else 0,
            "min": min(turns, default=0),
            "max": max(turns, default=0),
            "histogram": dict(sorted(Counter(turns).items())),
        },
        "tokens": {
            "total": sum(tokens),
            "per_dialogue_mean": round(statistics.fmean(tokens), 1) if tokens else 0,
            "tokenizer": "words and punctuation marks (regex \\w+|[^\\w\\s])",
        },
        "rejections": dict(tally.rejections.most_common()),
        "rejection_examples": tally.examples,
        "sources": read_stats.as_dict(),
        "coverage": coverage,
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
    }
    if cache_stats:
        stats["cache"] = cache_stats
    if cfg.generator == "template" and n:
        stats["phrasing"] = phrasing_stats(tally.patterns, n)
    return stats


def phrasing_stats(patterns: Counter, dialogues: int) -> dict[str, Any]:
    """How varied the template phrasings are: the share of dialogues that use each template."""
    slots: dict[str, int] = Counter(p.split(":")[0] for p in patterns)
    top = patterns.most_common(10)
    return {
        "patterns": len(patterns),
        "patterns_per_slot": dict(sorted(slots.items())),
        "max_share_of_dialogues": round(top[0][1] / dialogues, 4) if top else 0.0,
        "most_used": [[p, round(c / dialogues, 4)] for p, c in top],
    }
