"""RLAIF-V steps 2-3: split each response into atomic claims and turn each claim into a yes/no question.

RLAIF-V (seeds-notes 4.1, "Divide") splits a response into self-contained facts with a fine-tuned Llama-3-8B
"split" model, rewrites each fact as a general question with a second "changeq" model, and appends
" Please answer yes or no." (`construct_question_yesno`). The labeler then answers every question with one token;
a response's score counts the rejected claims (mpm.align.pairs).

Two splitters, one output (`list[Claim]` per response, in the response's language):

    rule   offline, no model. Split after the language's separators (. ! ? ; / 。！？；，...), then at clause
           conjunctions (" and ", " und ", "并且" ...) when both sides are at least `min_claim_length` long;
           fragments shorter than that are dropped and counted. The question is `question_template` filled with
           the claim. Crude (no parser: "Mr. Smith" splits), but a real option for users without a split model.
    llm    a `generate(prompts: list[str]) -> list[str]` callable (the caller wraps a local transformers model or
           an OpenAI-compatible endpoint, with its cache and retries) answers `split_prompt`; the reply is parsed
           as one claim per line (numbered lists, bullets, blank lines, a prose preamble or a "Facts:" header are
           all accepted, see `parse_claim_list`). Questions come from `question_prompt` (as RLAIF-V's changeq
           model) + `answer_suffix`, or from the template (`questions="template"`).

Everything language-specific is data: `configs/align/claims/<lang>.yaml` (separators, conjunctions, length unit,
templates, prompts). A language without a file is a ConfigError that lists the available ones.

A reply that is empty or garbage is never guessed at: the response keeps no claims and `ClaimStats` counts it
(`empty`, `malformed`), so a bad split model shows up in the numbers instead of in the preference pairs.
"""

from __future__ import annotations

import logging
import re
import string
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mpm.core.config import check_choice, parse_yaml
from mpm.core.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_FOLDER = Path(__file__).resolve().parents[2] / "configs" / "align" / "claims"
SPLITTERS = ("rule", "llm")
# Placeholders each template must use, no more and no fewer (a typo like {respones} fails at load, not mid-run).
_FIELDS = {
    "question_template": {"claim"},
    "split_prompt": {"question", "response"},
    "question_prompt": {"claim"},
}
_KEYS = {"lang", "length_unit", "min_claim_length", "separators", "space_after", "conjunctions", "answer_suffix"}
_KEYS |= set(_FIELDS)

Generate = Callable[[list[str]], list[str]]


@dataclass(frozen=True)
class Claim:
    text: str  # the atomic claim, without its final punctuation
    question: str  # the yes/no question the labeler answers
    lang: str


@dataclass(frozen=True)
class ResponseToSplit:
    question: str  # the instruction the response answers (the LLM splitter's prompt shows it)
    response: str
    lang: str  # a code with a configs/align/claims/<lang>.yaml


@dataclass
class ClaimStats:
    """Counts over everything a splitter has seen; every response ends in exactly one of claims / empty / malformed."""

    responses: int = 0
    claims: int = 0
    empty: int = 0  # rule: nothing left after splitting; llm: a blank reply
    malformed: int = 0  # llm: a reply that is not a list of claims (see parse_claim_list)
    dropped_short: int = 0  # rule: fragments shorter than min_claim_length
    question_fallback: int = 0  # llm questions: a blank question reply, so the template question was used


@dataclass(frozen=True)
class LanguageRules:
    """One parsed `configs/align/claims/<lang>.yaml`."""

    lang: str
    length_unit: str  # "words" or "chars"
    min_claim_length: int
    separators: tuple[str, ...]
    space_after: bool
    conjunctions: tuple[str, ...]
    question_template: str
    answer_suffix: str
    split_prompt: str
    question_prompt: str
    path: str


def available_languages(folder: str | Path = DEFAULT_FOLDER) -> list[str]:
    return sorted(p.stem for p in Path(folder).glob("*.yaml"))


def load_language(lang: str, folder: str | Path = DEFAULT_FOLDER) -> LanguageRules:
    """Parse and check `<folder>/<lang>.yaml`; every problem is a ConfigError naming the file and key."""
    path = Path(folder) / f"{lang}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"no claim rules for language {lang!r} (available: {', '.join(available_languages(folder)) or 'none'}); "
            f"add {path} with the keys of configs/align/claims/en.yaml"
        )
    p = str(path)
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except Exception as e:  # OSError or a yaml error
        raise ConfigError(f"{p}: cannot read the claim rules: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: must be a mapping with keys {sorted(_KEYS)}")
    if unknown := set(data) - _KEYS:
        raise ConfigError(f"{p}: unknown keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    if missing := _KEYS - set(data):
        raise ConfigError(f"{p}: missing keys {sorted(missing)}")
    if data["lang"] != lang:
        raise ConfigError(f"{p}: lang is {data['lang']!r}, but the file name says {lang!r}")
    check_choice(f"{p}: length_unit", data["length_unit"], ("words", "chars"))
    if not isinstance(data["min_claim_length"], int) or data["min_claim_length"] < 1:
        raise ConfigError(f"{p}: min_claim_length must be an integer >= 1, got {data['min_claim_length']!r}")
    for key in ("separators", "conjunctions"):
        if not isinstance(data[key], list) or not all(isinstance(s, str) and s for s in data[key]):
            raise ConfigError(f"{p}: {key} must be a list of non-empty strings, got {data[key]!r}")
    if not isinstance(data["space_after"], bool):
        raise ConfigError(f"{p}: space_after must be true or false, got {data['space_after']!r}")
    for key, want in _FIELDS.items():
        try:
            got = {f for _, f, _, _ in string.Formatter().parse(data[key]) if f is not None}
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{p}: {key} is not a template: {e}") from None
        if got != want:
            raise ConfigError(f"{p}: {key} must use the placeholders {sorted(want)}, but uses {sorted(got)}")
    return LanguageRules(
        lang=lang,
        length_unit=data["length_unit"],
        min_claim_length=data["min_claim_length"],
        separators=tuple(data["separators"]),
        space_after=data["space_after"],
        conjunctions=tuple(data["conjunctions"]),
        question_template=data["question_template"],
        answer_suffix=data["answer_suffix"],
        split_prompt=data["split_prompt"],
        question_prompt=data["question_prompt"],
        path=p,
    )


# ---- the rule splitter -------------------------------------------------------------------------------------------


def _strip_punct(text: str) -> str:
    """Whitespace and punctuation off both ends ("¿", "。", "“"): the claim is filled into a question template."""
    text = text.strip()
    while text and (text[0].isspace() or unicodedata.category(text[0]).startswith("P")):
        text = text[1:]
    while text and (text[-1].isspace() or unicodedata.category(text[-1]).startswith("P")):
        text = text[:-1]
    return text


def claim_length(text: str, rules: LanguageRules) -> int:
    return len(text.split()) if rules.length_unit == "words" else len("".join(text.split()))


def split_clauses(text: str, rules: LanguageRules) -> tuple[list[str], int]:
    """The rule splitter on one response: (claims, number of fragments dropped as too short)."""
    # 1. After every separator (with space_after: only before whitespace or the end, so "3.5" stays whole).
    seps = "|".join(re.escape(s) for s in rules.separators)
    pieces = re.split(f"(?:{seps})" + (r"(?=\s|$)" if rules.space_after else ""), text)
    claims, dropped = [], 0
    conj = re.compile("(" + "|".join(re.escape(c) for c in rules.conjunctions) + ")") if rules.conjunctions else None
    for piece in pieces:
        # 2. At conjunctions, but only where both sides are long enough to be claims: "a black and white cat" is
        # one claim ("a black" is too short), "the cat sleeps and the dog barks" two. Greedy left to right; a
        # short side stays joined to its neighbour.
        parts = conj.split(piece) if conj else [piece]
        merged = [parts[0]]
        for word, part in zip(parts[1::2], parts[2::2], strict=True):
            left, right = _strip_punct(merged[-1]), _strip_punct(part)
            if (
                claim_length(left, rules) >= rules.min_claim_length
                and claim_length(right, rules) >= rules.min_claim_length
            ):
                merged.append(part)
            else:
                merged[-1] += word + part
        for m in merged:
            m = _strip_punct(m)
            if not m:
                continue  # the empty tail after a final "."
            if claim_length(m, rules) < rules.min_claim_length:
                dropped += 1
            else:
                claims.append(m)
    return claims, dropped


def template_question(claim: str, rules: LanguageRules) -> str:
    return rules.question_template.format(claim=claim)


class _Languages:
    """Language rules loaded on first use, from one folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._rules: dict[str, LanguageRules] = {}

    def __call__(self, lang: str) -> LanguageRules:
        if lang not in self._rules:
            self._rules[lang] = load_language(lang, self.folder)
        return self._rules[lang]


@dataclass
class RuleSplitter:
    """Offline clause splitting and template questions (module docstring)."""

    folder: str | Path = DEFAULT_FOLDER
    stats: ClaimStats = field(default_factory=ClaimStats)

    def __post_init__(self):
        self.rules = _Languages(self.folder)

    def split(self, items: Sequence[ResponseToSplit]) -> list[list[Claim]]:
        out = []
        for item in items:
            rules = self.rules(item.lang)
            texts, dropped = split_clauses(item.response, rules)
            self.stats.responses += 1
            self.stats.dropped_short += dropped
            self.stats.claims += len(texts)
            self.stats.empty += not texts
            out.append([Claim(t, template_question(t, rules), item.lang) for t in texts])
        return out


# ---- the LLM splitter --------------------------------------------------------------------------------------------

# A list item: "1." "1)" "(1)" "1、" "-" "*" "•" "·" "①".."⑳" at the start of a line.
_MARKER = re.compile(r"^\s*(?:\d{1,3}\s*[.)．、:：]|\(\d{1,3}\)|（\d{1,3}）|[-*•·+–]|[\u2460-\u2473])\s*")
_HEADER = re.compile(r"^\s*(?:#+\s.*|.*[:：]\s*)$")  # "### Facts:", "Here are the facts:", "事实："; see _is_header
DEFAULT_MAX_CLAIM_CHARS = 300


def _is_header(line: str) -> bool:
    """An UNMARKED line that looks like a header: a marked item ending in a colon ("1. The sign reads:") is content."""
    return not _MARKER.match(line) and bool(_HEADER.match(line))


def parse_claim_list(reply: str, max_claim_chars: int = DEFAULT_MAX_CLAIM_CHARS) -> tuple[list[str], str]:
    """Claims from a split model's reply: (claims, "") or ([], "empty" | "malformed").

    Rules, in order: a blank reply is "empty". Blank lines and header lines (unmarked lines such as "### Facts:",
    "Here are the facts:", anything ending in a colon; a marked item like "1. The sign reads:" is not one) are
    skipped. If any line carries a list marker (1. 1) (1) 1、 - * • ①), only
    marked lines are claims: the rest is prose around the list. Otherwise every remaining line is a claim (the
    prompt asks for one per line). The reply is "malformed" when no claim remains, or when a claim is longer
    than `max_claim_chars` (a paragraph, not an atomic fact: the model ignored the format).
    """
    if not reply.strip():
        return [], "empty"
    lines = [ln for ln in reply.splitlines() if ln.strip() and not _is_header(ln)]
    marked = [ln for ln in lines if _MARKER.match(ln)]
    kept = [_MARKER.sub("", ln, count=1) for ln in marked] if marked else lines
    claims = [c for c in (_strip_punct(k.strip().strip("*_")) for k in kept) if c]
    if not claims or any(len(c) > max_claim_chars for c in claims):
        return [], "malformed"
    return claims, ""


def parse_question(reply: str) -> str:
    """The first non-blank line of a question reply, without a list marker or quotes; "" when there is none."""
    for raw in reply.splitlines():
        line = _MARKER.sub("", raw.strip(), count=1).strip().strip("\"'“”「」*")
        if line and (_MARKER.match(raw) or not _HEADER.match(line)):  # a marked item is never a header
            return line
    return ""


@dataclass
class LLMSplitter:
    """Claims and questions from a generator (module docstring). `generate` takes a batch of prompts and returns
    one reply per prompt, in order."""

    generate: Generate
    folder: str | Path = DEFAULT_FOLDER
    questions: str = "llm"  # "llm": question_prompt + answer_suffix (RLAIF-V's changeq); "template": no model call
    max_claim_chars: int = DEFAULT_MAX_CLAIM_CHARS
    stats: ClaimStats = field(default_factory=ClaimStats)

    def __post_init__(self):
        check_choice("questions", self.questions, ("llm", "template"))
        if self.max_claim_chars < 1:
            raise ConfigError(f"max_claim_chars must be >= 1, got {self.max_claim_chars}")
        self.rules = _Languages(self.folder)

    def _ask(self, prompts: list[str]) -> list[str]:
        if not prompts:
            return []
        replies = self.generate(prompts)
        if len(replies) != len(prompts):  # a generator bug, not a user error
            raise ValueError(f"generate returned {len(replies)} replies for {len(prompts)} prompts")
        return replies

    def split(self, items: Sequence[ResponseToSplit]) -> list[list[Claim]]:
        # 1. One split prompt per response, in the response's language.
        prompts = [self.rules(i.lang).split_prompt.format(question=i.question, response=i.response) for i in items]
        texts: list[list[str]] = []
        for item, reply in zip(items, self._ask(prompts), strict=True):
            claims, problem = parse_claim_list(reply, self.max_claim_chars)
            self.stats.responses += 1
            self.stats.claims += len(claims)
            if problem:
                setattr(self.stats, problem, getattr(self.stats, problem) + 1)
                logger.debug("split reply %s for %r: %r", problem, item.response[:80], reply[:200])
            texts.append(claims)
        # 2. One question per claim, all claims of the batch in one call.
        flat = [(i, t) for i, (item, ts) in enumerate(zip(items, texts, strict=True)) for t in ts]
        if self.questions == "llm":
            q_prompts = [self.rules(items[i].lang).question_prompt.format(claim=t) for i, t in flat]
            questions = []
            for (i, t), reply in zip(flat, self._ask(q_prompts), strict=True):
                rules = self.rules(items[i].lang)
                q = parse_question(reply)
                if not q:  # counted; the claim must still be checked, so it gets the template question
                    self.stats.question_fallback += 1
                    questions.append(template_question(t, rules))
                else:
                    questions.append(q + rules.answer_suffix)
        else:
            questions = [template_question(t, self.rules(items[i].lang)) for i, t in flat]
        out: list[list[Claim]] = [[] for _ in items]
        for (i, t), q in zip(flat, questions, strict=True):
            out[i].append(Claim(t, q, items[i].lang))
        return out


def build_splitter(name: str, generate: Generate | None = None, folder: str | Path = DEFAULT_FOLDER, **kwargs):
    """`rule` or `llm` (which needs `generate`)."""
    check_choice("splitter", name, SPLITTERS)
    if name == "rule":
        if kwargs:
            raise ConfigError(f"the rule splitter takes no options, got {sorted(kwargs)}")
        return RuleSplitter(folder)
    if generate is None:
        raise ConfigError(
            "splitter=llm needs a generator (a local transformers model or an OpenAI-compatible endpoint)"
        )
    return LLMSplitter(generate, folder, **kwargs)
