"""`mpm unimm translate`: conversations into other languages, structure kept exactly, output checked by language id.

Each message is cut into segments at `<image>` markers and line breaks; only the text segments are translated
(blank lines, markers and surrounding spaces are kept as they were), so turns, roles and `<image>` come out exactly
as they went in. Identical segments are translated once ("Yes." appears in thousands of dialogues). Every
translation is cached (SQLite, `{output}/cache.sqlite`) the moment it is made, so a rerun only translates what is
missing. A translated conversation is rejected, and counted, when a segment failed (`translation_failed`: the
request failed, or the translation was cut at hf.max_new_tokens or at the model's own position limit), when a
translation contains an `<image>` marker of its own (`image_token`), or when fastText does not identify the whole
conversation as the target language (`wrong_language`: e.g. a model that returned the source text).

Two things stop the run instead (one-line errors, exit 2), because every later segment would fail the same way:
- the first batch of each language (16 segments) comes back mostly in another language (`WrongOutputLanguage`:
  a model that does not translate into that language, named with the language it wrote instead);
- the endpoint cannot be reached, refuses the key/model/URL, or fails 25 segments in a row (`TranslatorFailing`).
Translations made before the stop are cached, so the rerun after the fix resumes.
Output: `{output}/llava.<lang>.json` per language, plus `{output}/translate_stats.json`.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dataproc.langid import LanguageIdentifier
from dataproc.translate import (
    LANGID_ALIASES,
    EndpointTranslator,
    HFTranslator,
    TranslationError,
    TranslatorFailing,
    language_name,
)
from mpm.core.config import save_config
from mpm.core.errors import UserError
from mpm.core.files import atomic_write_json, output_folder
from mpm.core.http import ChatClient, ResponseCache
from unimm_chat.config import TranslateConfig
from unimm_chat.conversations import IMAGE_TOKEN, Conversation, Message, read_conversations, write_llava_json

_SPLIT = re.compile(f"({re.escape(IMAGE_TOKEN)}|\\n)")
CHUNK = 256  # segments handed to the backend at a time (it yields them one by one)
FIRST_BATCH = 16  # the first segments of each language, checked for their language before going on
MIN_LETTERS_TO_JUDGE = 8  # shorter translated segments ("Ja.", "2 个") are not judged alone
CONFIDENT = 0.5  # a segment counts as written in another language when fastText says so with this score


class WrongOutputLanguage(UserError):
    """The model writes another language than the one asked for: every conversation would be rejected."""


def segments(text: str) -> list[tuple[str, bool]]:
    """[(piece, translate it?)]: markers, line breaks and surrounding spaces are kept as they are."""
    out = []
    for piece in _SPLIT.split(text):
        if not piece:
            continue
        core = piece.strip()
        if piece in (IMAGE_TOKEN, "\n") or not any(ch.isalpha() for ch in core):
            out.append((piece, False))  # markers, blank lines, numbers and punctuation are kept as they are
        else:
            start = piece.index(core)
            if start:
                out.append((piece[:start], False))
            out.append((core, True))
            if start + len(core) < len(piece):
                out.append((piece[start + len(core) :], False))
    return out


def make_backend(cfg: TranslateConfig):
    if cfg.backend == "hf":
        h = cfg.hf
        return HFTranslator(cfg.model, h.batch_size, h.max_new_tokens, h.num_beams, h.device)
    o = cfg.openai
    client = ChatClient(
        o.base_url,
        cfg.model,
        o.api_key_env,
        o.timeout_s,
        o.retries,
        o.backoff_s,
        o.concurrency,
        o.temperature,
        o.max_tokens,
    )
    return EndpointTranslator(client)


def translate(cfg: TranslateConfig, show_progress: bool = True) -> dict[str, Any]:
    cfg.check_required()
    out = Path(cfg.output)
    output_folder(out, "output")
    save_config(cfg, out / "translate_config.yaml")
    conversations = list(read_conversations(cfg.input))
    cache = ResponseCache(out / "cache.sqlite")
    backend = make_backend(cfg)
    identify = LanguageIdentifier()
    texts = list(
        dict.fromkeys(seg for conv in conversations for m in conv.messages for seg, todo in segments(m.content) if todo)
    )
    stats: dict[str, Any] = {
        "input": cfg.input,
        "conversations": len(conversations),
        "unique_segments": len(texts),
        "languages": {},
    }
    started = time.perf_counter()
    try:
        for lang in cfg.langs:
            stats["languages"][lang] = _translate_language(
                cfg, lang, conversations, texts, backend, cache, identify, out, show_progress
            )
    finally:
        cache.close()
    stats["seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_json(out / "translate_stats.json", stats)
    return stats


def _translate_language(cfg, lang, conversations, texts, backend, cache, identify, out: Path, show_progress) -> dict:
    key = {t: ResponseCache.key("translate", cfg.model, backend.settings, cfg.source_lang, lang, t) for t in texts}
    done: dict[str, str | TranslationError] = {}
    for t in texts:
        cached = cache.get(key[t])
        if cached is not None:
            done[t] = cached
    missing = [t for t in texts if t not in done]
    hits = len(done)
    bar = tqdm(total=len(missing), unit=" segments", desc=f"translate -> {lang}", disable=not show_progress)
    bounds = [0, *range(min(FIRST_BATCH, len(missing)), len(missing), CHUNK), len(missing)]
    try:
        for number, (start, end) in enumerate(zip(bounds, bounds[1:])):
            chunk = missing[start:end]
            results = zip(chunk, backend.translate(chunk, lang, cfg.source_lang))  # raises at a dead endpoint
            if number == 0:  # checked before anything of it is kept
                results = list(results)
                _check_first_batch(cfg, lang, backend, results, identify)
            for text, result in results:  # cached as they come: a stop keeps what was translated
                done[text] = result
                if isinstance(result, str) and result.strip():  # failures and empty replies are asked again next run
                    cache.put(key[text], result)
                bar.update()
    except TranslatorFailing as exc:
        raise TranslatorFailing(
            f"{exc}. Fix the endpoint settings and rerun: the translations made so far are cached in "
            f"{out / 'cache.sqlite'}"
        ) from None
    finally:
        bar.close()

    accepted, rejections, examples = [], Counter(), {}
    wanted = LANGID_ALIASES.get(lang, {lang})
    for conv in conversations:
        translated, failure = _rebuild(conv, lang, done)
        if failure is None:
            text = " ".join(m.content.replace(IMAGE_TOKEN, " ") for m in translated.messages)
            found = identify(text)
            if found.lang not in wanted:
                failure = ("wrong_language", f"fastText says {found.lang} ({found.score:.2f}), not {lang}")
            elif found.score < cfg.min_lang_score:
                failure = (
                    "wrong_language",
                    f"fastText says {found.lang} ({found.score:.2f}), below the minimum {cfg.min_lang_score:g} "
                    "(min_lang_score)",
                )
        if failure is None:
            accepted.append(translated)
        else:
            rejections[failure[0]] += 1
            examples.setdefault(failure[0], f"{conv.id}: {failure[1]}"[:300])
    write_llava_json(accepted, out / f"llava.{lang}.json")
    return {
        "translated": len(accepted),
        "rejections": dict(rejections),
        "rejection_examples": examples,
        "segments_from_cache": hits,
        "segments_translated": len(missing),
        "output": str(out / f"llava.{lang}.json"),
    }


def _check_first_batch(cfg, lang: str, backend, results: list, identify) -> None:
    """Stop at once when the first translations are mostly in one other language: the per-conversation check uses
    the same language id, so it would reject (nearly) every conversation after hours of translating."""
    wanted = LANGID_ALIASES.get(lang, {lang})
    judged = [
        identify(result)
        for _, result in results
        if isinstance(result, str) and sum(ch.isalpha() for ch in result) >= MIN_LETTERS_TO_JUDGE
    ]
    wrong = Counter(p.lang for p in judged if p.lang not in wanted and p.score >= CONFIDENT)
    if sum(wrong.values()) < max(3, 0.75 * len(judged)):
        return
    other, n = wrong.most_common(1)[0]
    echo = " (the source language)" if other == cfg.source_lang else ""
    raise WrongOutputLanguage(
        f"model {cfg.model!r} translated {n}/{len(judged)} segments of the first batch into {other}{echo}, not "
        f"{lang} (fastText, per segment): is it a translation model for {lang} ({language_name(lang)})? "
        f"{backend.target_hint(lang)} Stopped before translating the rest; nothing was written for {lang}."
    )


def _rebuild(conv: Conversation, lang: str, done: dict) -> tuple[Conversation, tuple[str, str] | None]:
    messages = []
    for message in conv.messages:
        parts = []
        for piece, todo in segments(message.content):
            if not todo:
                parts.append(piece)
                continue
            result = done[piece]
            if isinstance(result, TranslationError):
                return conv, ("translation_failed", f"{piece[:60]!r}: {result}")
            if not result.strip():
                return conv, ("translation_failed", f"{piece[:60]!r}: empty translation")
            if IMAGE_TOKEN in result:
                return conv, ("image_token", f"the translation of {piece[:60]!r} contains {IMAGE_TOKEN}")
            parts.append(result)
        messages.append(Message(message.role, "".join(parts)))
    return Conversation(conv.id, list(conv.images), messages, lang), None
