"""The offline, deterministic dialogue generator (`--generator template`).

One multi-turn conversation per image, written as an assistant that sees the picture would talk:
    1. the user asks about the picture; the assistant describes it from the captions (the most informative one,
       then up to two others that add something);
    2. questions from the VQA sources and Visual Dialog, each answered naturally for its kind of answer (yes/no,
       a count, a colour, a place, a thing), hedged when the VQA annotators disagreed;
    3. knowledge questions (OK-VQA, A-OKVQA) last, with A-OKVQA's rationales as the explanation, inline or after a
       "why?" from the user.
Every phrasing comes from a pool and is drawn with a random generator seeded by (seed, image id), so a run is
reproducible and an image's dialogue does not depend on the others. Each template used is recorded as a
"phrasing pattern" (`slot:index`) for the stats' diversity report; a human's own wording used verbatim (a
VisDial answer, a caption that is already a sentence) is not a template and is not counted.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from dataproc.vqa_answers import normalize_answer
from unimm_chat.conversations import IMAGE_TOKEN, Conversation, Message
from unimm_chat.sources import QA, ImageRecord, usable_qas

OPENERS = [
    "What's happening in this picture?", "Can you describe this image?", "What do you see here?",
    "Tell me about this photo.", "What is going on in this scene?", "Could you give me a quick description of this picture?",
    "Describe what you see in this image.", "What does this photo show?", "Can you walk me through what's in this picture?",
    "I'd love a description of this image.", "What's in this image?", "Give me an overview of this scene.",
    "How would you describe this photo?", "What can you tell me about this picture?",
    "Take a look at this image. What's going on?", "Please describe this scene for me.", "What's shown here?",
    "Can you tell me what this picture is about?", "Summarize what you see in this photo.",
    "What is this image showing?", "Have a look at this photo. What do you notice?", "What's the scene here?",
    "Could you describe this picture in a few sentences?", "What am I looking at here?",
]  # fmt: skip
DESCRIBE_NP = [
    "This image shows {np}.", "In this picture, I can see {np}.", "The photo shows {np}.", "It's a picture of {np}.",
    "Here we have {np}.", "{NP}.", "This looks like {np}.", "The image captures {np}.", "What we see here is {np}.",
    "I see {np}.",
]  # fmt: skip
EXTRA_NP = [
    "You can also see {np}.", "There's also {np}.", "I also notice {np}.", "In addition, there's {np}.",
    "On top of that, there's {np}.", "Another detail: {np}.", "Nearby, there's {np}.", "It also shows {np}.",
    "There also appears to be {np}.", "Looking closer, there's {np}.",
]  # fmt: skip
EXTRA_SENTENCE = [
    "Also, {s}",
    "Besides that, {s}",
    "What's more, {s}",
    "On top of that, {s}",
    "In addition, {s}",
    "{S}",
]
LEAD_INS = [
    "Also, ", "And ", "One more thing: ", "I'm curious, ", "Quick question: ", "Okay, ", "Interesting. ", "Thanks! ",
    "Got it. ", "Hmm, ", "By the way, ", "Another question: ", "Tell me, ", "Out of curiosity, ", "Alright. ",
    "Nice. ", "I see. ", "Cool. ", "Thanks. ", "Great. ", "Now, ", "Let me ask: ", "So, ", "Oh, and ",
]  # fmt: skip
LEAD_IN_RATE = 0.3
YES = [
    "Yes.", "Yes, definitely.", "Yep.", "Yes, that's right.", "Yes, it looks that way.", "Yes, I can see that.",
    "Yes, clearly.", "Yes, it appears so.", "Correct.", "Yes, that's correct.", "Absolutely.",
    "Yes, from what I can see.", "Yes, as far as I can tell.", "Yes, it seems so.", "That's right, yes.",
    "Yes, indeed.", "Sure looks like it, yes.", "Yes, you can see that here.", "Yes, it's pretty clear.",
    "Right, yes.", "Yes, that's what it looks like.", "Yes, I'd say so.", "Yes, that's visible in the picture.",
    "It does look that way, yes.",
]  # fmt: skip
NO = [
    "No.", "No, it doesn't look like it.", "No, not that I can see.", "Nope.", "No, that's not the case.",
    "Not really, no.", "No, it doesn't appear so.", "No, I don't see that.", "Definitely not.", "No, not here.",
    "No, it doesn't seem so.", "No, there's no sign of that.", "No, that's not what it looks like.", "Not at all.",
    "No, I can't see that in the picture.", "No, that doesn't seem to be the case.", "No, not in this picture.",
    "Nope, not that I can tell.", "No, I'd say not.", "No, doesn't look like it.",
]  # fmt: skip
YES_HEDGED = ["I think so, yes.", "Probably, yes.", "It seems so.", "Most likely, yes.", "I believe so.", "Probably."]
NO_HEDGED = ["I don't think so.", "Probably not.", "It doesn't seem so.", "Most likely not.", "I'd guess not."]
HOW_MANY = [
    "There are {n}.", "I count {n}.", "{N}.", "It looks like {n}.", "I can see {n}.", "{N}, as far as I can tell.",
    "There seem to be {n}.", "I'd say {n}.", "Looks like {n} to me.", "{N} in total.", "I can make out {n}.",
    "{N}, from what I can see.",
]  # fmt: skip
HOW_MANY_ONE = ["There's just one.", "Only one.", "Just one.", "I can see one.", "One.", "It looks like just one."]
HOW_MANY_ZERO = [
    "None.",
    "There aren't any.",
    "I don't see any.",
    "Zero, as far as I can tell.",
    "None that I can see.",
]
NOTHING = [
    "Nothing.",
    "Nothing, as far as I can tell.",
    "I don't see anything.",
    "None that I can see.",
    "Nothing at all.",
]
NUMBER = ["{N}.", "It's {n}.", "It looks like {n}.", "The number is {n}.", "I can make out {n}.", "I'd say {n}."]
WHAT = [
    "{A}.", "It's {a}.", "It looks like {a}.", "I'd say {a}.", "That would be {a}.", "It appears to be {a}.",
    "Looks like {a}.", "{A}, from what I can see.", "{A}, I believe.", "That looks like {a}.", "Pretty sure it's {a}.",
    "{A}, as far as I can tell.", "From what I can see, it's {a}.", "I think it's {a}.", "My answer would be {a}.",
]  # fmt: skip
COLOUR = [
    "{A}.", "It's {a}.", "It looks {a}.", "{A}, mostly.", "It appears {a}.", "I'd call it {a}.", "Mostly {a}.",
    "It looks {a} to me.", "{A}, from what I can see.", "The colour is {a}.", "I'd say {a}.", "Looks {a}.",
]  # fmt: skip
OTHER = [
    "{A}.", "I'd say {a}.", "{A}, it seems.", "From what I can see, {a}.", "{A}, as far as I can tell.",
    "Looks like {a}.", "I think {a}.", "{A}, I believe.", "It seems {a}.", "My take: {a}.", "{A}, by the look of it.",
    "{A}, judging from the picture.",
]  # fmt: skip
DOING = [
    "{A}.", "Looks like {a}.", "{A}, from what I can see.", "It seems to be {a}.", "I'd say {a}.", "{A}, it looks like.",
    "{A}, by the look of it.", "From what I can see, {a}.", "{A}, as far as I can tell.", "Mostly {a}.",
]  # fmt: skip
WHY = [
    "{A}.",
    "Probably {a}.",
    "Most likely {a}.",
    "I'd guess {a}.",
    "My guess is {a}.",
    "Likely {a}.",
    "{A}, I'd say.",
]
HEDGED = [
    "Probably {a}.", "I think {a}.", "Most likely {a}.", "It's hard to say for sure, but probably {a}.",
    "Possibly {a}.", "It might be {a}.", "I'm not certain, but I'd say {a}.",
]  # fmt: skip
WHY_FOLLOW_UP = [
    "Why do you say that?", "What makes you think so?", "How can you tell?", "Why is that?", "What gives it away?",
    "How do you know?", "What's the reasoning?", "Why do you think that is?", "Can you explain?", "What tells you that?",
]  # fmt: skip
RATIONALE = [
    "{R}", "Because {r}", "Well, {r}", "Mainly because {r}", "The clue is that {r}", "It's because {r}",
    "Here's why: {r}", "{R} That's what gives it away.",
]  # fmt: skip
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]

# A caption is already a sentence when it starts with a pronoun-like subject or has a finite verb; most COCO
# captions are noun phrases with a participle ("A man riding a wave"), which the templates turn into sentences.
_SENTENCE = re.compile(
    r"^(there|this|that|it|these|those|here|they|he|she|we|i|you|someone|somebody)\b"
    r"|\b(is|are|was|were|has|have|had|sits|stands|lies|holds|looks|appears|seems|shows|took|rides|eats|plays|"
    r"walks|runs|flies|waits|carries|wears|contains|sit|stand|ride|eat|play|walk|run|fly|wait|carry|wear)\b",
    re.IGNORECASE,
)
_COLOUR_Q, _DOING_Q, _WORDS = re.compile(r"what colou?r"), re.compile(r"\bdoing\b"), re.compile(r"[a-z]+")
_AUX = (
    "is",
    "are",
    "was",
    "were",
    "does",
    "do",
    "did",
    "can",
    "could",
    "has",
    "have",
    "had",
    "will",
    "would",
    "should",
)
_LOWERABLE = set(_AUX) | {"what", "which", "who", "whose", "where", "when", "why", "how", "does", "any", "in", "on"}


def lower_first(text: str) -> str:
    """'A man riding' -> 'a man riding' (not 'TV' -> 'tV')."""
    return text[:1].lower() + text[1:] if text[1:2].islower() or len(text) == 1 else text


def upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def as_question(question: str) -> str:
    question = upper_first(question.strip().rstrip(". "))
    return question if question.endswith("?") else question + "?"


def as_sentence(text: str) -> str:
    text = upper_first(text.strip())
    return text if text[-1:] in ".!?。！？" else text + "."


@dataclass
class AnswerKind:
    kind: str  # yes | no | nothing | how_many | number | colour | doing | what | why | other | verbatim
    value: str


def classify(qa: QA) -> AnswerKind:
    answer = qa.answer.strip().rstrip(".")
    norm = normalize_answer(answer)
    q = qa.question.strip().lower()
    if norm in ("yes", "no"):
        return AnswerKind(norm, norm)
    counting = q.startswith("how many")
    # A number only where one is asked for, or written as digits: VQA normalisation turns "none" and "one" into
    # "0" and "1" too ("What is he holding?" "none"; "Which one is bigger?" "one").
    is_number = norm.isascii() and norm.isdigit() and (counting or (answer.isascii() and answer.isdigit()))
    if qa.sources[0] == "visdial" and not is_number:
        return AnswerKind("verbatim", answer)  # a person's own conversational answer: used as written
    if is_number:
        return AnswerKind("how_many" if counting else "number", norm)
    if answer.lower() in ("none", "nothing"):
        return AnswerKind("nothing", answer)
    if _COLOUR_Q.match(q):
        return AnswerKind("colour", answer)
    if _DOING_Q.search(q):
        return AnswerKind("doing", answer)
    if q.startswith(("what", "which", "who", "whose")):
        return AnswerKind("what", answer)
    if q.startswith("why"):
        return AnswerKind("why", answer)
    return AnswerKind("other", answer)


class TemplateGenerator:
    """`generate(record) -> (Conversation | None, patterns)`; None when the record has nothing to talk about.

    The conversation's `images` is left empty: the build names the image (a configurable pattern).
    """

    name = "template"

    def __init__(self, seed: int = 0, max_turns: int = 10, min_vqa_agreement: float = 0.3):
        self.seed = seed
        self.max_turns = max_turns  # user-assistant exchanges, the description and "why?" follow-ups included
        self.min_vqa_agreement = min_vqa_agreement

    def _pick(self, rng: random.Random, slot: str, pool: list[str], patterns: set[str]) -> str:
        index = rng.randrange(len(pool))
        patterns.add(f"{slot}:{index}")
        return pool[index]

    # 1. the description --------------------------------------------------------------------------------------
    def describe(self, captions: list[str], rng: random.Random, patterns: set[str]) -> str:
        ranked = sorted(captions, key=lambda c: -len(set(_WORDS.findall(c.lower()))))
        main, extras = ranked[0], []
        seen = set(_WORDS.findall(main.lower()))
        for caption in ranked[1:]:
            words = set(_WORDS.findall(caption.lower()))
            if len(extras) < 2 and len(words - seen) >= max(2, len(words) // 3):  # adds something new
                extras.append(caption)
                seen |= words
        parts = [self._clause(main, "describe", DESCRIBE_NP, None, rng, patterns)]
        for extra in extras[: rng.randint(0, 2)]:
            parts.append(self._clause(extra, "extra", EXTRA_NP, EXTRA_SENTENCE, rng, patterns))
        return " ".join(parts)

    def _clause(self, caption: str, slot: str, np_pool, sentence_pool, rng, patterns) -> str:
        text = caption.strip().rstrip(".")
        if not _WORDS.search(text.lower()):
            return as_sentence(
                caption.strip()
            )  # not English (a Chinese caption, say): the annotator's words as they are
        if _SENTENCE.search(text):
            if sentence_pool is None:
                return as_sentence(text)  # already a sentence: the annotator's own words
            template = self._pick(rng, f"{slot}_sentence", sentence_pool, patterns)
            return template.format(s=lower_first(as_sentence(text)), S=as_sentence(text))
        template = self._pick(rng, slot, np_pool, patterns)
        return template.format(np=lower_first(text), NP=upper_first(text))

    # 2. questions and answers ---------------------------------------------------------------------------------
    def ask(self, question: str, first: bool, rng: random.Random, patterns: set[str]) -> str:
        question = as_question(question)
        if not first and rng.random() < LEAD_IN_RATE:
            lead = self._pick(rng, "lead_in", LEAD_INS, patterns)
            first_word = question.split(" ", 1)[0].lower()
            if not lead.rstrip().endswith((".", "!")) and first_word in _LOWERABLE:
                question = lower_first(question)
            question = lead + question
        return question

    def answer(self, qa: QA, rng: random.Random, patterns: set[str]) -> str:
        kind = classify(qa)
        hedge = qa.agreement is not None and qa.agreement < 0.6
        if kind.kind in ("yes", "no"):
            pool = {"yes": YES_HEDGED if hedge else YES, "no": NO_HEDGED if hedge else NO}[kind.kind]
            return self._pick(rng, f"{kind.kind}{'_hedged' if hedge else ''}", pool, patterns)
        if kind.kind == "verbatim":
            return as_sentence(kind.value)
        if kind.kind == "nothing":
            return self._pick(rng, "nothing", NOTHING, patterns)
        if kind.kind in ("how_many", "number"):
            n = int(kind.value)
            if kind.kind == "how_many" and n in (0, 1):
                return self._pick(rng, f"how_many_{n}", HOW_MANY_ZERO if n == 0 else HOW_MANY_ONE, patterns)
            spelled = NUMBER_WORDS[n] if n <= 10 and rng.random() < 0.5 else str(n)
            template = self._pick(rng, kind.kind, HOW_MANY if kind.kind == "how_many" else NUMBER, patterns)
            return template.format(n=spelled, N=upper_first(spelled))
        pools = {"colour": COLOUR, "doing": DOING, "what": WHAT, "why": WHY, "other": OTHER}
        pool, slot = pools[kind.kind], kind.kind
        if hedge:
            pool, slot = HEDGED, "hedged"
        template = self._pick(rng, slot, pool, patterns)
        return template.format(a=lower_first(kind.value), A=upper_first(kind.value))

    def explain(self, rationale: str, rng: random.Random, patterns: set[str]) -> str:
        template = self._pick(rng, "rationale", RATIONALE, patterns)
        text = rationale.strip()
        return template.format(R=as_sentence(text), r=lower_first(as_sentence(text)))

    # the whole dialogue ---------------------------------------------------------------------------------------
    def select(self, record: ImageRecord, rng: random.Random) -> list[QA]:
        """Knowledge questions first in priority, then confident VQA answers, then Visual Dialog; asked simplest first."""
        usable = usable_qas(record.qas, self.min_vqa_agreement)
        rank = {"aokvqa": 0, "okvqa": 1, "vqav2": 2, "visdial": 3}
        budget = self.max_turns - (1 if record.captions else 0)
        chosen = sorted(usable, key=lambda qa: (rank[qa.sources[0]], rng.random()))[: max(budget, 0)]
        simple = [qa for qa in chosen if qa.sources[0] in ("vqav2", "visdial")]
        knowledge = [qa for qa in chosen if qa.sources[0] in ("aokvqa", "okvqa")]
        rng.shuffle(simple)
        return simple + knowledge

    def generate(self, record: ImageRecord) -> tuple[Conversation | None, set[str]]:
        rng = random.Random(f"{self.seed}:{record.image_id}")
        patterns: set[str] = set()
        messages: list[Message] = []
        if record.captions:
            opener = self._pick(rng, "opener", OPENERS, patterns)
            messages += [
                Message("user", f"{IMAGE_TOKEN}\n{opener}"),
                Message("assistant", self.describe(record.captions, rng, patterns)),
            ]
        for qa in self.select(record, rng):
            if len(messages) // 2 >= self.max_turns:
                break
            question = self.ask(qa.question, not messages, rng, patterns)
            answer = self.answer(qa, rng, patterns)
            follow_up = None
            if qa.rationales:
                if rng.random() < 0.5 or len(messages) // 2 + 2 > self.max_turns:
                    answer = f"{answer} {self.explain(qa.rationales[0], rng, patterns)}"
                else:
                    follow_up = (
                        self._pick(rng, "why", WHY_FOLLOW_UP, patterns),
                        self.explain(qa.rationales[-1], rng, patterns),
                    )
            if not messages:
                question = f"{IMAGE_TOKEN}\n{question}"
            messages += [Message("user", question), Message("assistant", answer)]
            if follow_up:
                messages += [Message("user", follow_up[0]), Message("assistant", follow_up[1])]
        if not messages:
            return None, patterns
        return Conversation(f"{record.image_id:012d}", [], messages, "en"), patterns  # the caller names the image
