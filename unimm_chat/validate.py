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
from unimm_chat.sources import QA, ImageRecord, question_key

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
_YES = re.compile(
    r"\b(yes|yep|yeah|correct|absolutely|indeed|right|i think so|i believe so|it seems so|it does|probably)\b"
)
_NO = re.compile(r"\b(no|nope|not|none|never)\b|n't\b")
_NONE = re.compile(r"\b(no|none|any)\b|n't\b")


def answer_agrees(answer_text: str, qa: QA) -> bool:
    """Does an assistant reply agree with a question's ground truth (VQA normalisation, any accepted answer)?"""
    reply = normalize_answer(answer_text)
    truth = normalize_answer(qa.answer)
    if truth in ("yes", "no"):
        said_no = bool(_NO.search(reply))
        said_yes = bool(_YES.search(reply)) and not reply.startswith("no")
        return said_yes and not said_no if truth == "yes" else said_no
    accepted = {truth, *(normalize_answer(a) for a in qa.answers)}
    words = f" {reply} "  # normalisation already turned number words into digits ("three" -> "3")
    if "0" in accepted and _NONE.search(reply):  # "There aren't any." answers "how many ...?" with 0
        return True
    return any(gt and f" {gt} " in words for gt in accepted)


def validate(conv: Conversation, record: ImageRecord, min_turns: int) -> tuple[str, str] | None:
    """None if the dialogue passes, else (reason, detail)."""
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
    questions = {question_key(qa.question): qa for qa in record.qas if qa.sources[0] != "visdial"}
    for i in range(0, len(messages) - 1, 2):
        asked = question_key(messages[i].content.replace(IMAGE_TOKEN, ""))
        qa = questions.get(asked) or next((q for k, q in questions.items() if len(k) > 12 and asked.endswith(k)), None)
        if qa is not None and not answer_agrees(messages[i + 1].content, qa):
            return (
                "inconsistent_answer",
                f"{qa.question!r}: expected {qa.answer!r}, got {messages[i + 1].content!r:.80}",
            )
    return None
