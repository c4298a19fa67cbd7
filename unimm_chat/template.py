"""The offline, deterministic dialogue generator (`--generator template`).

One multi-turn conversation per image, written as an assistant that sees the picture would talk:
    1. the user asks about the picture; the assistant describes it from the captions (the most informative one,
       then up to two others that add something);
    2. questions from the VQA sources and Visual Dialog, each answered as a reply to that kind of question (yes/no,
       a count, a colour, what a sign says, a brand, a time, a sport, a place, what someone is doing, who, why, a
       thing), hedged when the VQA annotators disagreed;
    3. knowledge questions (OK-VQA, A-OKVQA) last, with A-OKVQA's rationales as the explanation, inline or after a
       "why?" from the user.
Every phrasing comes from a pool and is drawn with a random generator seeded by (seed, image id), so a run is
reproducible and an image's dialogue does not depend on the others. Each template used is recorded as a
"phrasing pattern" (`slot:index`) for the stats' diversity report; a human's own wording used verbatim (a
VisDial answer, a caption that is already a sentence) is not a template and is not counted. Annotator text spliced
into a sentence keeps its case unless its first word is a closed-class word ("I also notice a living room"; see
`closed_class.py`). Text whose capitalised first word is not closed-class may be a name ("Obama", "NASA") or a
common noun that started the annotator's sentence ("Man riding a horse"), so it only goes where a sentence starts or
after a colon ("Man riding a horse on a beach.", "Also visible: Obama at a podium."), never "I see Man riding ...".
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from dataproc.vqa_answers import normalize_answer
from unimm_chat.closed_class import CLOSED_CLASS_WORDS
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
    "I see {np}.", "Here's what I see: {np}.", "{NP}, by the look of it.", "{NP}, from what I can tell.",
]  # fmt: skip
EXTRA_NP = [
    "You can also see {np}.", "There's also {np}.", "I also notice {np}.", "In addition, there's {np}.",
    "On top of that, there's {np}.", "Another detail: {np}.", "Nearby, there's {np}.", "It also shows {np}.",
    "There also appears to be {np}.", "Looking closer, there's {np}.", "Also visible: {np}.",
    "Also in the picture: {np}.", "One more thing: {np}.",
]  # fmt: skip
EXTRA_SENTENCE = [
    "Also, {s}",
    "Besides that, {s}",
    "What's more, {s}",
    "On top of that, {s}",
    "In addition, {s}",
    "{S}",
    "One more detail: {s}",
    "Also worth mentioning: {s}",
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
# Every one says "nothing": the validator looks for the answer's word when the answer is "nothing" (not "none").
NOTHING = [
    "Nothing.",
    "Nothing, as far as I can tell.",
    "Nothing that I can see.",
    "Nothing at all.",
    "Nothing, from what I can see.",
]
NUMBER = ["{N}.", "It's {n}.", "It looks like {n}.", "The number is {n}.", "I can make out {n}.", "I'd say {n}."]
# The answer to a "what/which/who/where/why" question is a bare fragment in VQA ("frisbee", "stop sign", "on table"),
# so these pools put it first or after a hedge, as a person answering briefly would ("Frisbee, I believe."): a frame
# such as "It's {a}." or "It looks like {a}." only reads well for some kinds of answer (a colour, a time, a sport, a
# brand) and has its own pool there.
WHAT = [
    "{A}.", "I'd say {a}.", "{A}, from what I can see.", "{A}, I believe.", "{A}, as far as I can tell.",
    "{A}, by the look of it.", "{A}, judging from the picture.", "{A}, I think.", "I'd go with {a}.",
    "{A}, it looks like.",
]  # fmt: skip
OTHER = [
    "{A}.", "I'd say {a}.", "{A}, it seems.", "{A}, as far as I can tell.", "{A}, I believe.",
    "{A}, by the look of it.", "{A}, judging from the picture.", "{A}, I think.", "{A}, from what I can see.",
]  # fmt: skip
COLOUR = [
    "{A}.", "It's {a}.", "It looks {a}.", "{A}, mostly.", "It appears {a}.", "I'd call it {a}.", "Mostly {a}.",
    "It looks {a} to me.", "{A}, from what I can see.", "The colour is {a}.", "I'd say {a}.", "Looks {a}.",
]  # fmt: skip
# "What does the sign say?": the words are quoted exactly as written.
SAYS = [
    'It says "{a}".', 'It reads "{a}".', 'It says "{a}", as far as I can read.', 'I can read "{a}".',
    'The writing says "{a}".', 'The text reads "{a}".', 'It says "{a}", from what I can make out.',
    'From what I can read, it says "{a}".',
]  # fmt: skip
SAYS_HEDGED = [
    'I think it says "{a}".', 'It seems to say "{a}".', 'It\'s hard to read, but probably "{a}".',
    'Probably "{a}", but it\'s hard to make out.', 'It might say "{a}".',
]  # fmt: skip
BRAND = [
    "{A}.", "It's {a}.", "It looks like {a}.", "{A}, I believe.", "{A}, from what I can see.", "I'd say {a}.",
    "The brand is {a}.", "{A}, by the look of it.",
]  # fmt: skip
TIME = [  # what time / time of day / season / year / month / day
    "It's {a}.", "{A}.", "It looks like {a}.", "I'd say it's {a}.", "{A}, I'd say.", "It appears to be {a}.",
    "{A}, by the look of it.", "From what I can see, it's {a}.",
]  # fmt: skip
SPORT = [  # what sport / what game
    "{A}.", "It's {a}.", "Looks like {a}.", "That's {a}.", "{A}, by the look of it.", "{A}, from what I can see.",
    "I'd say {a}.", "It looks like {a} to me.", "{A}, I believe.",
]  # fmt: skip
WHO = [
    "{A}.", "{A}, I believe.", "{A}, from what I can see.", "{A}, as far as I can tell.", "I'd say {a}.",
    "{A}, by the look of it.", "I'd go with {a}.",
]  # fmt: skip
KIND = [  # what kind / type / breed / species / style / flavour of ...
    "{A}.", "{A}, I believe.", "{A}, by the look of it.", "I'd say {a}.", "{A}, from what I can see.", "{A}, I think.",
    "I'd go with {a}.", "{A}, as far as I can tell.", "{A}, judging from the picture.",
]  # fmt: skip
PLACE = [
    "{A}.", "{A}, from what I can see.", "{A}, by the look of it.", "{A}, it looks like.", "I'd say {a}.",
    "{A}, as far as I can tell.", "{A}, judging from the picture.",
]  # fmt: skip
DOING = [
    "{A}.", "Looks like {a}.", "{A}, from what I can see.", "I'd say {a}.", "{A}, it looks like.",
    "{A}, by the look of it.", "{A}, as far as I can tell.",
]  # fmt: skip
WHY = [
    "{A}, most likely.", "{A}, I'd guess.", "{A}, I'd say.", "{A}, probably.", "{A}, I think.", "My best guess: {a}.",
    "{A}, by the look of it.",
]  # fmt: skip
# "What is the man doing?" "surfing" / "Where is the cat?" "on the couch": the question's own subject and verb,
# then the answer ("The man is surfing.").
ECHO = [
    "{SUBJ} {be} {a}.", "{SUBJ} {be} {a}, from what I can see.", "It looks like {subj} {be} {a}.",
    "I'd say {subj} {be} {a}.", "From what I can see, {subj} {be} {a}.", "{SUBJ} {be} {a}, by the look of it.",
]  # fmt: skip
ECHO_HEDGED = [
    "I think {subj} {be} {a}.", "{SUBJ} {be} probably {a}.", "It's hard to tell, but {subj} {be} probably {a}.",
    "{SUBJ} {be} {a}, I think.",
]  # fmt: skip
HEDGED = [
    "{A}, probably.", "{A}, I think.", "{A}, I'd guess.", "{A}, most likely.",
    "It's hard to say for sure, but I'd go with {a}.", "{A}, maybe.", "I'm not certain, but I'd say {a}.",
]  # fmt: skip
# Yes/no questions that a short answer can echo ("Is there a dog?" "Yes, there is."): question start -> the
# (yes, no) answer's subject and verb. "is this a/an" only: in "Is this man happy?" "it" would be wrong.
YES_NO_ECHO = {
    "is there": ("there is", "there isn't"), "are there": ("there are", "there aren't"), "is it": ("it is", "it isn't"),
    "is this a": ("it is", "it isn't"), "is this an": ("it is", "it isn't"), "is that a": ("it is", "it isn't"),
    "is that an": ("it is", "it isn't"), "are they": ("they are", "they aren't"),
    "are these": ("they are", "they aren't"), "are those": ("they are", "they aren't"),
    "does it": ("it does", "it doesn't"), "do they": ("they do", "they don't"), "can you see": ("I can", "I can't"),
    "do you see": ("I do", "I don't"),
}  # fmt: skip
YES_ECHO = [
    "Yes, {echo}.", "Yep, {echo}.", "Yes, {echo}, from what I can see.", "Yes, {echo}, clearly.",
    "Yes, {echo}, as far as I can tell.", "That's right, {echo}.", "Yes, {echo}, I'm fairly sure.",
]  # fmt: skip
NO_ECHO = [
    "No, {echo}.", "Nope, {echo}.", "No, {echo}, from what I can see.", "No, {echo}, as far as I can tell.",
    "No, I'm afraid {echo}.", "No, {echo}, I'm fairly sure.",
]  # fmt: skip
# When the echo's subject is the assistant ("Can you see a dog?" "Yes, I can."), only the entries that end with it:
# "Yes, I can, from what I can see." hedges a claim about its own sight.
PLAIN_ECHO = re.compile(r"\{echo\}\.$")
YES_NO_ECHO_RATE = 0.35  # the rest use the general YES / NO pools
# Singular -> plural wording, for colour/brand/text questions about several things ("What color are the walls?"
# "They're white."); the templates above are written in the singular.
PLURAL_WORDING = [
    ("It's", "They're"), ("it's", "they're"), ("It looks", "They look"), ("It appears", "They appear"),
    ("call it", "call them"), ("It says", "They say"), ("it says", "they say"), ("It reads", "They read"),
    ("It seems", "They seem"), ("It might", "They might"),
]  # fmt: skip
# Answers to "where" that can follow "The man is ..." ("outside", "on the couch"); a bare place ("beach") cannot.
PLACE_WORDS = {
    "in", "on", "at", "under", "behind", "near", "next", "beside", "by", "inside", "outside", "above", "below",
    "over", "between", "across", "along", "around", "underneath", "beneath", "outdoors", "indoors", "upstairs",
    "downstairs", "home", "there", "here", "nearby", "everywhere", "nowhere", "atop",
}  # fmt: skip
WHY_FOLLOW_UP = [
    "Why do you say that?", "What makes you think so?", "How can you tell?", "Why is that?", "What gives it away?",
    "How do you know?", "What's the reasoning?", "Why do you think that is?", "Can you explain?", "What tells you that?",
]  # fmt: skip
RATIONALE = [
    "{R}", "Because {r}", "Well, {r}", "Mainly because {r}", "The clue is that {r}", "It's because {r}",
    "Here's why: {r}", "{R} That's what gives it away.", "My reasoning: {r}",
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
_WORDS = re.compile(r"[a-z]+")
# Question kinds (matched on the lower-cased question), each answered from its own pool; see `classify`.
_COLOUR_Q = re.compile(r"^(what|which) colou?rs?\b")
# Something written: "What does the sign say?", "What is written on the bus?", "What do you think it reads?"; not
# "What would you say this room is?" or "What does this say about the artist?".
_SAYS_Q = re.compile(
    r"^(what|which)\b(?!.*\byou(?:'d| would| might| could| can)? say\b)(?!.*\b(?:say|says|said) about\b)"
    r"(?:.*\b(?:does|do|did)\b.*\b(?:say|read|spell)\b|.*\b(?:says|reads|spells|written)\b)"
    r"|^what (word|words|letters?)\b"
)
# The question asks for the time ("What time of day is it?", "When was this taken?"), not "What is the man doing at
# this time of day?".
_TIME_Q = re.compile(
    r"^(what|which) (time|year|month|day|season|decade|century)\b|^(what|which)(?: is|'s) the (time|year|month|season)\b"
    r"|^when\b.*\b(taken|shot)\b"
)
# "make" only as a noun ("What make is the car?", "What is the make of this car?"), not "What sound does it make?".
_BRAND_Q = re.compile(r"^(what|which)\b(?:.*\b(brand|company|manufacturer|airline|logo)\b|(?:.*\bthe)? make\b)")
_SPORT_Q = re.compile(r"^(what|which) (sport|game)s?\b|^(what|which)\b.*\bsport\b")
_KIND_Q = re.compile(r"^(what|which) (kinds?|types?|breed|species|style|sort|flavou?r|variety|model)\b")
_DOING_Q = re.compile(r"\bdoing\b")
# Questions whose subject a reply can repeat: "What is the man in red doing?", "Where is the cat?" (a determiner and
# one word, or a pronoun: "Where is the cat sitting?" is not "the cat sitting is ...").
_DOING_ECHO_Q = re.compile(r"^what (is|are|was|were) (.+) doing\??$", re.IGNORECASE)
_WHERE_ECHO_Q = re.compile(
    r"^where (is|are|was|were) ((?:the|this|that|these|those) [a-z']+|he|she|it|they|this|that|these|those)\??$",
    re.IGNORECASE,
)
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
_LOWERABLE = set(_AUX) | CLOSED_CLASS_WORDS | {"how", "why"}  # "Okay, anything else?"


def lower_first(text: str) -> str:
    """'Is it raining?' -> 'is it raining?' (not 'TV' -> 'tV'): for questions after a lead-in."""
    return text[:1].lower() + text[1:] if text[1:2].islower() or len(text) == 1 else text


_FIRST_WORD = re.compile(r"[A-Za-z]+(?=[\s,;:']|$)")  # a whole word: "A-frame" and "A. Lincoln" are left alone


def mid_sentence(text: str) -> str:
    """Annotator text placed after other words: 'A living room' -> 'a living room', 'The man' -> 'the man'. Only a
    closed-class first word is lowered: 'Obama', 'NASA', 'TV' or any other word may be a name and keeps its case."""
    match = _FIRST_WORD.match(text)
    if match is None:
        return text
    word = match.group(0)
    if word != "I" and word.lower() in CLOSED_CLASS_WORDS and (len(word) == 1 or word[1:].islower()):
        return word.lower() + text[len(word) :]
    return text


def starts_sentence_only(text: str) -> bool:
    """Must annotator text start a sentence (or follow a colon)? Yes when its first word is capitalised and stays so
    mid-sentence ("Obama", "NASA", "Man riding a horse", "People use umbrellas"): it may be a name, so it is not
    lowered, and a capital after other words reads as a mistake. "I" and lowered closed-class words go anywhere."""
    return text[:1].isupper() and mid_sentence(text) == text and re.match(r"I\b", text) is None


def sentence_initial(template: str) -> bool:
    """Does the template's field start a sentence ("{NP}.", "{S}") or follow a colon ("Here's why: {r}")?"""
    return template.startswith("{") or re.search(r": \{[a-z]+\}", template) is not None


def upper_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def as_question(question: str) -> str:
    question = upper_first(question.strip().rstrip(". "))
    return question if question.endswith("?") else question + "?"


def as_sentence(text: str) -> str:
    return upper_first(full_stop(text))


def full_stop(text: str) -> str:
    """'a man is surfing' -> 'a man is surfing.': the case is left to `splice`."""
    text = text.strip()
    return text if text[-1:] in ".!?。！？" else text + "."


def splice(template: str, **texts: str) -> str:
    """Fill a template with annotator text (a caption, an answer, a rationale): `{x}` where it follows other words
    (see `mid_sentence`), `{X}` where it starts the sentence ("{NP}." -> "A living room with a TV.")."""
    fields = {}
    for name, text in texts.items():
        fields[name], fields[name.upper()] = mid_sentence(text), upper_first(text)
    return template.format(**fields)


@dataclass
class AnswerKind:
    # yes | no | nothing | how_many | number | time | colour | says | brand | sport | who | why | kind | place |
    # doing | what | other | verbatim
    kind: str
    value: str


def classify(qa: QA) -> AnswerKind:
    """The kind of answer a question gets, which decides how it is phrased ("What does the sign say?" "stop" ->
    'It says "stop".')."""
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
    if is_number and not _TIME_Q.search(q):  # "What year is it?" "2010" is a time, not "The number is 2010."
        return AnswerKind("how_many" if counting else "number", norm)
    if answer.lower() in ("none", "nothing"):
        return AnswerKind("nothing", answer)
    checks = [
        ("why", q.startswith("why")), ("who", q.startswith(("who", "whom", "whose"))), ("colour", _COLOUR_Q.match(q)),
        ("says", _SAYS_Q.search(q)), ("time", _TIME_Q.search(q)), ("brand", _BRAND_Q.search(q)),
        ("sport", _SPORT_Q.search(q)), ("kind", _KIND_Q.match(q)), ("place", q.startswith("where")),
        ("doing", _DOING_Q.search(q)), ("what", q.startswith(("what", "which"))),
    ]  # fmt: skip
    for kind, matched in checks:  # the first that matches: "What sport is he doing?" is a sport question
        if matched:
            return AnswerKind(kind, answer)
    return AnswerKind("other", answer)


def yes_no_echo(question: str, polarity: str) -> str | None:
    """'Is there a dog?' -> 'there is' / "there isn't", for "Yes, there is."; None when the question has no such
    short answer in YES_NO_ECHO."""
    words = " ".join(_WORDS.findall(question.lower())) + " "
    for start, (yes, no) in YES_NO_ECHO.items():
        if words.startswith(start + " "):
            return yes if polarity == "yes" else no
    return None


def echo_subject(qa: QA, kind: str) -> tuple[str, str] | None:
    """(subject, verb) of "What is the man doing?" or "Where is the cat?" when the answer can follow them
    ("surfing" -> "The man is surfing."; "outside" -> "The cat is outside."); None otherwise ("beach" cannot)."""
    first = qa.answer.strip().lower().split(" ", 1)[0]
    if kind == "doing":
        match, fits = _DOING_ECHO_Q.match(qa.question.strip()), first.endswith("ing")
    elif kind == "place":
        match, fits = _WHERE_ECHO_Q.match(qa.question.strip()), first in PLACE_WORDS
    else:
        return None
    if match is None or not fits:
        return None
    verb, subject = match.group(1).lower(), match.group(2)
    if subject.lower() in ("you", "i", "we") or len(subject.split()) > 6:
        return None  # "What are you doing?": the reply would need another subject
    if kind == "place" and subject.split()[-1].lower().endswith(("ing", "ed", "en")):
        return None  # "Where is this taken?", "Where is the cat sitting?": a verb, not the subject's noun
    return subject, verb


def about_several(question: str) -> bool:
    """'What color are the walls?' / 'What do the signs say?': is the question about several things? The first
    auxiliary verb decides, unless a pronoun after it is the subject of another verb ("What color shirt are they
    wearing?" asks about one shirt)."""
    words = _WORDS.findall(question.lower())
    for i, word in enumerate(words):
        if word in ("is", "was", "does", "did", "has"):
            return False
        if word in ("are", "were", "have", "do"):
            return not (words[i + 1 : i + 2] in (["they"], ["you"], ["we"], ["i"]) and len(words) > i + 2)
    return False


def plural(template: str) -> str:
    """'It's {a}.' -> "They're {a}." (PLURAL_WORDING)."""
    for singular, several in PLURAL_WORDING:
        template = template.replace(singular, several)
    return template


class TemplateGenerator:
    """`generate(record) -> (Conversation | None, patterns)`; None when the record has nothing to talk about.

    The conversation's `images` is left empty: the build names the image (a configurable pattern).
    """

    name = "template"

    def __init__(self, seed: int = 0, max_turns: int = 10, min_vqa_agreement: float = 0.3):
        self.seed = seed
        self.max_turns = max_turns  # user-assistant exchanges, the description and "why?" follow-ups included
        self.min_vqa_agreement = min_vqa_agreement

    def _pick(self, rng: random.Random, slot: str, pool: list[str], patterns: set[str], fits=None) -> str:
        """A template from `pool`, only among those `fits(template)` accepts when given; recorded as `slot:index`
        (its index in the whole pool)."""
        indices = range(len(pool)) if fits is None else [i for i, template in enumerate(pool) if fits(template)]
        index = indices[rng.randrange(len(indices))]
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
            template = self._pick(rng, f"{slot}_sentence", sentence_pool, patterns, self._fits(text))
            return splice(template, s=full_stop(text))
        template = self._pick(rng, slot, np_pool, patterns, self._fits(text))
        return splice(template, np=text)

    @staticmethod
    def _fits(text: str):
        """The templates annotator text may go into: all, or only sentence-initial ones (`starts_sentence_only`)."""
        return sentence_initial if starts_sentence_only(text) else None

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
            echo = yes_no_echo(qa.question, kind.kind)
            if echo and not hedge and rng.random() < YES_NO_ECHO_RATE:  # "Is there a dog?" "Yes, there is."
                pool = YES_ECHO if kind.kind == "yes" else NO_ECHO
                fits = PLAIN_ECHO.search if echo.startswith("I ") else None  # "Yes, I can.", not "..., clearly."
                return self._pick(rng, f"{kind.kind}_echo", pool, patterns, fits).format(echo=echo)
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
        hedged = "_hedged" if hedge else ""
        echo = echo_subject(qa, kind.kind)
        if echo:  # "What is the man doing?" "surfing" -> "The man is surfing."
            subject, verb = echo
            template = self._pick(rng, f"{kind.kind}_echo{hedged}", ECHO_HEDGED if hedge else ECHO, patterns)
            return splice(template, a=kind.value, subj=subject, be=verb)
        if kind.kind == "says":  # the words in quotes, exactly as written
            template = self._pick(rng, f"says{hedged}", SAYS_HEDGED if hedge else SAYS, patterns)
            return (plural(template) if about_several(qa.question) else template).format(a=kind.value)
        pools = {
            "time": TIME, "colour": COLOUR, "brand": BRAND, "sport": SPORT, "who": WHO, "why": WHY, "kind": KIND,
            "place": PLACE, "doing": DOING, "what": WHAT, "other": OTHER,
        }  # fmt: skip
        pool, slot = (HEDGED, "hedged") if hedge else (pools[kind.kind], kind.kind)
        template = self._pick(rng, slot, pool, patterns)
        if slot in ("colour", "brand") and about_several(qa.question):  # "What color are the walls?" "They're white."
            template = plural(template)
        return splice(template, a=kind.value)

    def explain(self, rationale: str, rng: random.Random, patterns: set[str]) -> str:
        rationale = full_stop(rationale)
        template = self._pick(rng, "rationale", RATIONALE, patterns, self._fits(rationale))
        return splice(template, r=rationale)

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
