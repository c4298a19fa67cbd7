"""LLM-as-judge scoring (LLaVA-Bench style, as VisCPM reports its chat models): a judge model behind an
OpenAI-compatible endpoint compares the evaluated model's answer with a reference answer, given the question and,
optionally, a textual description of the image (captions, boxes), and replies with scores.

The judge prompt is data: a YAML file (configs/eval/judge_llava_bench.yaml, `JudgePrompt` below) with a system
prompt, a user template with the placeholders {question} {reference} {answer} {context}, and the scores the reply's
first line must hold (`reply_scores: [reference, answer]`: "8 6" scores the reference 8 and the answer 6, as LLaVA's
rule.json asks). For language L a sibling file `<stem>_L.yaml` (judge_llava_bench_zh.yaml) is used when it exists.

Reported, over the items whose reply could be parsed (LLaVA-Bench's convention, `summarize_gpt_review.py`):

    judge_relative_score = sum(answer scores) / sum(reference scores) * 100
    judge_answer_score   = mean answer score          judge_reference_score = mean reference score

Replies that cannot be parsed are counted (`judge_unparsed`) and kept in the details, never scored (LLaVA scores
them -1 and averages that in); requests that failed after their retries are counted too (`judge_failed`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from mpm.core.config import load_config
from mpm.core.errors import ConfigError, DataError, EndpointError
from mpm.core.http import ChatClient, LLMError, ResponseCache
from mpm.eval.scorers import Scores, TextScorer, register_scorer

logger = logging.getLogger(__name__)

DEFAULT_PROMPT_FILE = Path(__file__).resolve().parents[2] / "configs" / "eval" / "judge_llava_bench.yaml"
PLACEHOLDERS = ("question", "reference", "answer", "context")
SCORE_NAMES = ("reference", "answer")


@dataclass
class JudgePrompt:
    """A judge prompt file (YAML). Unknown keys are errors."""

    name: str = ""
    lang: str = "en"  # the language the prompt is written in (a `<stem>_<lang>.yaml` sibling must say its language)
    system: str = ""  # the system message; empty: none is sent
    user_template: str = ""  # {question} {reference} {answer} {context} are replaced; other braces stay
    no_context: str = ""  # what {context} becomes for an item without one
    reply_scores: list[str] = field(default_factory=lambda: ["reference", "answer"])  # the first line's scores
    score_min: float = 1.0
    score_max: float = 10.0
    temperature: float = 0.2
    max_tokens: int = 1024


def load_judge_prompt(path: str | Path) -> JudgePrompt:
    """A judge prompt file, checked: the template holds {question} and {answer} (and {reference} when the reference
    is scored), `reply_scores` names 'answer' once and only the known scores."""
    prompt = load_config(JudgePrompt, path)
    if not prompt.user_template.strip():
        raise ConfigError(f"{path}: `user_template` is empty: write the judge's user message with {{question}}, "
                          "{answer} and {reference}")  # fmt: skip
    scores = list(prompt.reply_scores)
    if "answer" not in scores or len(set(scores)) != len(scores) or not set(scores) <= set(SCORE_NAMES):
        raise ConfigError(f"{path}: `reply_scores` must list 'answer' and optionally 'reference', each once, in the "
                          f"order the reply gives them; got {scores}")  # fmt: skip
    needed = ["question", "answer"] + (["reference"] if "reference" in scores else [])
    missing = [name for name in needed if "{" + name + "}" not in prompt.user_template]
    if missing:
        raise ConfigError(f"{path}: `user_template` lacks {', '.join('{' + m + '}' for m in missing)}: the judge "
                          "would not see what it scores")  # fmt: skip
    if not prompt.score_min < prompt.score_max:
        raise ConfigError(f"{path}: score_min ({prompt.score_min}) must be below score_max ({prompt.score_max})")
    return prompt


def render(template: str, values: dict[str, str]) -> str:
    """The template with its placeholders replaced in one pass (an answer holding "{question}" stays as written)."""
    return re.sub(r"\{(" + "|".join(PLACEHOLDERS) + r")\}", lambda m: values[m.group(1)], template)


# "Assistant 1: 8" / "助手1：8" labels hold digits that are not scores.
_LABEL = re.compile(r"(assistant|助手)\s*\d+", re.IGNORECASE)
# A score, with an optional "/10" denominator ("8/10 6/10") that is not a score.
_NUMBER = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)(?:\s*/\s*\d+(?:\.\d+)?)?")


def parse_reply(reply: str, prompt: JudgePrompt) -> dict[str, float] | None:
    """{score name: value} from the reply's first non-empty line, or None when that line does not hold exactly the
    expected number of scores within [score_min, score_max]. Handles "8 6", "8, 6", "**8 6**", "8/10 6/10",
    "Assistant 1: 8, Assistant 2: 6" and full-width digits; does not look past the first line (the prompt says where
    the scores go: a number in the explanation is not a score)."""
    lines = [line for line in unicodedata.normalize("NFKC", reply).splitlines() if line.strip()]
    if not lines:
        return None
    numbers = [float(n) for n in _NUMBER.findall(_LABEL.sub(" ", lines[0]))]
    if len(numbers) != len(prompt.reply_scores):
        return None
    if any(not prompt.score_min <= n <= prompt.score_max for n in numbers):
        return None
    return dict(zip(prompt.reply_scores, numbers))


@register_scorer
class LLMJudge(TextScorer):
    """`--metric llm_judge`: a judge model scores each answer against its reference (see the module docstring).

    Options: endpoint (base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1), model (the judge's
    name there), prompt_file (default configs/eval/judge_llava_bench.yaml), api_key_env (the environment variable
    holding the key; none is sent without it), max_workers (requests in flight, default 4), cache_file (a SQLite
    file keeping parsed replies across runs; replies are always reused within the process), retries (per request,
    default 4) and timeout_s (per request, default 120).
    Items: `question`, `output`, `references` (the reference answer is references[0]), optional `context` (a string
    or a list of strings, joined by new lines) and `category` (scored per category too).
    """

    name = "llm_judge"

    def __init__(self, endpoint: str | None = None, model: str | None = None, prompt_file: str | None = None,
                 api_key_env: str | None = None, max_workers: int | str = 4, cache_file: str | None = None,
                 retries: int | str = 4, timeout_s: float | str = 120.0):  # fmt: skip
        if not endpoint:
            raise ConfigError("llm_judge needs the option endpoint=URL: the base URL of an OpenAI-compatible server "
                              "(e.g. metric_options.llm_judge.endpoint=http://127.0.0.1:8000/v1)")  # fmt: skip
        if not model:
            raise ConfigError("llm_judge needs the option model=NAME: the judge model's name at the endpoint")
        self.prompt_file = Path(prompt_file) if prompt_file else DEFAULT_PROMPT_FILE
        if not self.prompt_file.is_file():
            raise ConfigError(f"llm_judge prompt_file {str(self.prompt_file)!r} does not exist: give a judge prompt "
                              "YAML (configs/eval/judge_llava_bench.yaml in the repository)")  # fmt: skip
        self.endpoint, self.model, self.api_key_env = endpoint, model, api_key_env
        self.max_workers = _positive_int("max_workers", max_workers)
        self.retries = _positive_int("retries", retries, minimum=0)
        try:
            self.timeout_s = float(timeout_s)
        except ValueError:
            raise ConfigError(f"llm_judge option timeout_s must be a number of seconds, got {timeout_s!r}") from None
        self.cache = ResponseCache(cache_file) if cache_file else None
        self.cache_file = cache_file
        self._replies: dict[str, str] = {}  # cache key -> parsed reply: re-scoring a subset asks nothing again
        self._prompts: dict[str, tuple[Path, JudgePrompt, ChatClient]] = {}

    def prompt_for(self, lang: str) -> tuple[Path, JudgePrompt, ChatClient]:
        """The prompt file used for `lang` (the `<stem>_<lang>.yaml` sibling when it exists), and a client with the
        prompt's sampling settings."""
        if lang not in self._prompts:
            sibling = self.prompt_file.with_name(f"{self.prompt_file.stem}_{lang}{self.prompt_file.suffix}")
            path = sibling if sibling.is_file() else self.prompt_file
            prompt = load_judge_prompt(path)
            if path == sibling and prompt.lang != lang:
                raise ConfigError(f"{path}: used for {lang!r} by its name, but its `lang` is {prompt.lang!r}")
            client = ChatClient(self.endpoint, self.model, api_key_env=self.api_key_env, timeout_s=self.timeout_s,
                                retries=self.retries, concurrency=self.max_workers, temperature=prompt.temperature,
                                max_tokens=prompt.max_tokens)  # fmt: skip
            self._prompts[lang] = (path, prompt, client)
        return self._prompts[lang]

    def messages(self, item: dict, number: int, prompt: JudgePrompt) -> list[dict]:
        """The judge's chat messages for one item (`number`: its place, for error messages)."""
        question, output, refs = item.get("question"), item.get("output"), item.get("references")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"llm_judge: item {number} ({item.get('id', '?')}) has no `question` string: the judge "
                            "needs the question the answer replies to")  # fmt: skip
        if not isinstance(output, str):
            raise DataError(f"llm_judge: item {number} ({item.get('id', '?')}) has no `output` string")
        reference = ""
        if "reference" in prompt.reply_scores:
            if not isinstance(refs, list) or not refs or not isinstance(refs[0], str) or not refs[0].strip():
                raise DataError(f"llm_judge: item {number} ({item.get('id', '?')}) has no reference answer "
                                f"(`references[0]`), got {refs!r}: the prompt scores the answer against one")  # fmt: skip
            reference = refs[0]
        context = item.get("context")
        if isinstance(context, list):
            context = "\n".join(str(c) for c in context)
        if context is not None and not isinstance(context, str):
            raise DataError(f"llm_judge: item {number} ({item.get('id', '?')}): `context` must be a string or a list "
                            f"of strings, got {type(context).__name__}")  # fmt: skip
        values = {"question": question, "reference": reference, "answer": output,
                  "context": context if context and context.strip() else prompt.no_context}  # fmt: skip
        user = render(prompt.user_template, values)
        return ([{"role": "system", "content": prompt.system}] if prompt.system else []) + [
            {"role": "user", "content": user}
        ]

    def score(self, items: list[dict], lang: str) -> Scores:
        path, prompt, client = self.prompt_for(lang)
        requests = [(client.cache_key(m, "llm_judge"), m) for m in
                    (self.messages(item, i, prompt) for i, item in enumerate(items))]  # fmt: skip
        fresh = [(key, m) for key, m in requests if key not in self._replies]
        replies: dict[str, str | LLMError] = {}
        with contextlib.closing(client.complete_many(dict(fresh).items(), self.cache)) as answers:
            for key, reply, _ in answers:
                if isinstance(reply, LLMError) and reply.fatal:  # every other request would fail the same way
                    raise EndpointError(f"llm_judge: the judge {self.model!r} at {self.endpoint} fails: {reply}")
                replies[key] = reply
                if isinstance(reply, str) and parse_reply(reply, prompt) is not None:
                    self._replies[key] = reply  # only parsed replies are kept: a rerun asks again for the others
                    if self.cache is not None:
                        self.cache.put(key, reply)
        rows, per_item = [], []
        for key, _ in requests:
            reply = self._replies.get(key, replies.get(key))
            if isinstance(reply, LLMError):
                rows.append({"status": "failed", "error": str(reply)})
                per_item.append(None)
                continue
            parsed = parse_reply(reply, prompt)
            rows.append({"status": "judged" if parsed else "unparsed", "reply": reply, **(parsed or {})})
            per_item.append(parsed["answer"] if parsed else None)
        failed = sum(r["status"] == "failed" for r in rows)
        if items and failed == len(items):
            raise EndpointError(f"llm_judge: every request to {self.endpoint} (model {self.model!r}) failed; the "
                                f"first: {rows[0]['error']}")  # fmt: skip
        unparsed = sum(r["status"] == "unparsed" for r in rows)
        if unparsed:
            logger.warning("llm_judge %s: %d of %d replies could not be parsed and are not scored (first: %r)", lang,
                           unparsed, len(rows), next(r["reply"] for r in rows if r["status"] == "unparsed")[:200])  # fmt: skip
        values = summarize(rows, prompt)
        categories = [item.get("category") for item in items]
        if items and all(isinstance(c, str) for c in categories):
            for category in sorted(set(categories)):
                part = summarize([r for r, c in zip(rows, categories) if c == category], prompt)
                values.update({f"{k}/{category}": v for k, v in part.items() if k.endswith("_score")})
        details = {"endpoint": self.endpoint, "model": self.model, "prompt_file": str(path), "prompt": prompt.name,
                   "prompt_lang": prompt.lang, "temperature": prompt.temperature, "max_tokens": prompt.max_tokens,
                   "cache_file": self.cache_file, "items": rows}  # fmt: skip
        return Scores(values, per_item=per_item, details=details)


def summarize(rows: list[dict], prompt: JudgePrompt) -> dict:
    """The aggregate values over judged rows: relative score (LLaVA-Bench), mean scores, counts."""
    judged = [r for r in rows if r["status"] == "judged"]
    answer = sum(r["answer"] for r in judged)
    values = {"judge_answer_score": answer / len(judged) if judged else None}
    if "reference" in prompt.reply_scores:
        reference = sum(r["reference"] for r in judged)
        values["judge_reference_score"] = reference / len(judged) if judged else None
        values["judge_relative_score"] = answer / reference * 100 if reference else None
    values.update({"judge_judged": len(judged), "judge_unparsed": sum(r["status"] == "unparsed" for r in rows),
                   "judge_failed": sum(r["status"] == "failed" for r in rows)})  # fmt: skip
    return values


def _positive_int(name: str, value, minimum: int = 1) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum or str(value).strip() != str(number):
        raise ConfigError(f"llm_judge option {name} must be an integer >= {minimum}, got {value!r}")
    return number
