"""Checks every generated dialogue must pass; each failure is one named, counted reason.

    not_alternating      turns must go user, assistant, user, ... and end with the assistant
    empty_turn           a turn with no text
    image_token          exactly one <image>, in the first user turn
    annotation_leak      the assistant talks about the data instead of the picture ("according to the caption")
    too_short            fewer than `min_turns` exchanges, or almost no words from the assistant
    inconsistent_answer  a turn asks one of the image's VQA questions and the answer disagrees with the ground truth
(`unparseable`, `prompt_echo` and `llm_error` are given earlier, by the LLM generators.)
"""

from __future__ import annotations

import re

from dataproc.vqa_answers import normalize_answer
from unimm_chat.conversations import IMAGE_TOKEN, Conversation
from unimm_chat.sources import QA, ImageRecord, question_key, usable_qas

LEAKS = re.compile(
    r"\baccording to the (caption|annotation|description|data|information|text|labels?)s?\b"
    r"|\bthe (captions?|annotations?|annotators?|ground[- ]truth|rationales?)\b"
    r"|\bannotat(ed|ion|ions|or|ors)\b"
    r"|\b(based on|from) the (provided|given) (information|description|data|text|details)\b"
    r"|\bas (described|mentioned|stated) in the (caption|description|text|data)\b"
    r"|\b(the )?dataset\b|\bVQA\b"
    r"|\bI (can't|cannot|am unable to) see (the|this|any) (image|picture|photo)\b"
    r"|\bas an AI\b",
    re.IGNORECASE,
)
_YES_WORDS = {
    "yes",
    "yeah",
    "yep",
    "yup",
    "sure",
    "correct",
    "indeed",
    "right",
    "absolutely",
    "definitely",
    "certainly",
}
_NO_WORDS = {"no", "nope", "not", "never", "none", "nothing"}
_HEDGED_YES = re.compile(r"\b(i think so|i believe so|it seems so|it does|probably|likely)\b")
_NONE = re.compile(r"\b(no|none|nothing|any)\b|n't\b")
_TOKENS = re.compile(r"[a-z']+")
_WH = {"what", "why", "how", "where", "when", "which", "who", "whose"}
# Spelled numbers past ten (the VQA normalisation stops at ten), for "There are twelve people."
_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
          "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]  # fmt: skip
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_NUMBER_WORD = re.compile(
    r"\b(" + "|".join(_TENS) + r")(?:[- ](" + "|".join(_UNITS[1:10]) + r"))?\b|\b(" + "|".join(_UNITS) + r")\b"
)


def _digits(text: str) -> str:
    """'twenty-two' -> '22', 'twelve' -> '12' (whole words only)."""

    def number(m: re.Match) -> str:
        if m.group(3):
            return str(_UNITS.index(m.group(3)))
        return str(_TENS[m.group(1)] + (_UNITS.index(m.group(2)) if m.group(2) else 0))

    return _NUMBER_WORD.sub(number, text.lower())


def polarity(reply: str) -> str | None:
    """'yes', 'no' or None: the first yes- or no-word of the reply decides ("Yes, there is no doubt" is yes)."""
    tokens = _TOKENS.findall(reply.lower())
    for i, token in enumerate(tokens):
        if token in _NO_WORDS or token.endswith("n't"):
            return "no"
        if token in _YES_WORDS:
            return "no" if tokens[i + 1 : i + 2] == ["not"] else "yes"  # "Definitely not."
    return "yes" if _HEDGED_YES.search(reply.lower()) else None


def answer_agrees(answer_text: str, qa: QA) -> bool:
    """Does an assistant reply agree with a question's ground truth? Replies that cannot be judged pass.

    yes/no: the reply's leading polarity must match. Otherwise an accepted answer (VQA-normalised, number words as
    digits) must appear as whole words in the reply.
    """
    truth = normalize_answer(qa.answer)
    if truth in ("yes", "no"):
        said = polarity(answer_text)
        return said is None or said == truth
    reply = normalize_answer(_digits(answer_text))
    accepted = {truth, *(normalize_answer(a) for a in qa.answers)}
    words = f" {reply} "
    if "0" in accepted and _NONE.search(reply):  # "There aren't any." answers "how many ...?" with 0
        return True
    return any(gt and f" {gt} " in words for gt in accepted)


def _matching_question(asked: str, questions: dict[str, QA]) -> QA | None:
    """The VQA question a user turn asks: the same words, or the same words after a short lead-in ("Also, is it
    raining?"), never after a question word ("Why is the man wearing a hat?" is not "Is the man wearing a hat?")."""
    if asked in questions:
        return questions[asked]
    for key, qa in questions.items():
        if asked.endswith(" " + key):
            lead = asked[: -len(key)].split()
            if len(lead) <= 4 and not _WH & set(lead):
                return qa
    return None


def validate(
    conv: Conversation, record: ImageRecord, min_turns: int, min_vqa_agreement: float = 0.0
) -> tuple[str, str] | None:
    """None if the dialogue passes, else (reason, detail). Only VQA answers at least `min_vqa_agreement` of the
    annotators gave are enforced (the generators leave the others out too)."""
    messages = [m for m in conv.messages if m.role != "system"]
    for i, message in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if message.role != expected:
            return "not_alternating", f"turn {i} is {message.role}, expected {expected}"
    if not messages or messages[-1].role != "assistant":
        return "not_alternating", "the dialogue does not end with the assistant"
    for i, message in enumerate(messages):
        if not message.content.replace(IMAGE_TOKEN, "").strip():
            return "empty_turn", f"turn {i} is empty"
    counts = [m.content.count(IMAGE_TOKEN) for m in messages]
    if counts[0] != 1 or sum(counts) != 1:
        return "image_token", f"{IMAGE_TOKEN} counts per turn: {counts}"
    leak = LEAKS.search("\n".join(m.content for m in messages if m.role == "assistant"))  # one search, not one per turn
    if leak:
        return "annotation_leak", f"{leak.group(0)!r} in an assistant turn"
    assistant_words = sum(len(m.content.split()) for m in messages if m.role == "assistant")
    if len(messages) // 2 < min_turns or assistant_words < 3:
        return "too_short", f"{len(messages) // 2} exchanges, {assistant_words} assistant words"
    usable = usable_qas(record.qas, min_vqa_agreement)
    questions = {question_key(qa.question): qa for qa in usable if qa.sources[0] != "visdial"}
    for i in range(0, len(messages) - 1, 2):
        asked = question_key(messages[i].content.replace(IMAGE_TOKEN, ""))
        qa = _matching_question(asked, questions)
        if qa is not None and not answer_agrees(messages[i + 1].content, qa):
            return (
                "inconsistent_answer",
                f"{qa.question!r}: expected {qa.answer!r}, got {messages[i + 1].content!r:.80}",
            )
    return None
