import random
import re
from collections import Counter

import pytest

from unimm_chat.build import phrasing_stats
from unimm_chat.config import SourcesConfig
from unimm_chat.conversations import IMAGE_TOKEN
from unimm_chat.sources import QA, ImageRecord, ReadStats, merge_sources
from unimm_chat.synthetic import write_annotations
from unimm_chat.template import (
    DESCRIBE_NP,
    EXTRA_NP,
    EXTRA_SENTENCE,
    RATIONALE,
    TemplateGenerator,
    classify,
    mid_sentence,
    splice,
)
from unimm_chat.validate import answer_agrees, validate


def record(**kwargs):
    base = {
        "image_id": 7,
        "captions": ["A man riding a wave on top of a surfboard.", "A surfer in a black wetsuit on a big wave"],
    }
    base.update(kwargs)
    return ImageRecord(**base)


def test_dialogue_is_a_valid_conversation_and_deterministic():
    qas = [
        QA("What color is the wetsuit?", "black", ["vqav2"], 0.9, "other", ["black"] * 9 + ["blue"]),
        QA("How many people are there?", "1", ["vqav2"], 1.0, "number", ["1"] * 10),
        QA("is the water calm", "no, it's wavy", ["visdial"], answers=["no, it's wavy"]),
        QA(
            "What sport is this?",
            "surfing",
            ["aokvqa"],
            1.0,
            answers=["surfing"] * 10,
            rationales=["The man stands on a board on a wave."],
        ),
    ]
    rec = record(qas=qas)
    gen = TemplateGenerator(seed=3)
    conv, patterns = gen.generate(rec)
    again, _ = TemplateGenerator(seed=3).generate(rec)
    other, _ = TemplateGenerator(seed=4).generate(rec)
    assert [m.content for m in conv.messages] == [m.content for m in again.messages]
    assert [m.content for m in conv.messages] != [m.content for m in other.messages]
    assert conv.messages[0].content.startswith(f"{IMAGE_TOKEN}\n") and conv.messages[0].role == "user"
    assert validate(conv, rec, min_turns=2) is None  # alternating, one <image>, no leaks, answers agree
    text = " ".join(m.content for m in conv.messages)
    assert "surfboard" in conv.messages[1].content.lower()  # the description comes from the captions
    assert "black" in text and "The man stands on a board on a wave." in text.replace(
        "the man stands", "The man stands"
    )
    assert any(p.startswith("opener:") for p in patterns)
    # knowledge questions come last (possibly followed by a "why?" turn)
    asked = [m.content for m in conv.messages if m.role == "user"]
    sport = next(i for i, q in enumerate(asked) if "sport" in q)
    assert all(not any(w in q for w in ("wetsuit", "people", "water")) for q in asked[sport:])


def test_low_agreement_answers_are_hedged_and_very_low_ones_left_out():
    rec = record(
        qas=[
            QA("What is on the wave?", "surfer", ["vqav2"], 0.5, "other", ["surfer"] * 5 + ["man"] * 5),
            QA("What is in the sky?", "bird", ["vqav2"], 0.2, "other", ["bird"] * 2 + ["kite"] * 8),
        ]
    )
    conv, patterns = TemplateGenerator(seed=0).generate(rec)
    text = " ".join(m.content for m in conv.messages)
    assert "hedged" in " ".join(patterns) and "sky" not in text


def test_records_without_usable_annotations_give_no_dialogue():
    conv, _ = TemplateGenerator().generate(ImageRecord(image_id=1, qas=[QA("Q?", "a", ["vqav2"], 0.1, "other", ["a"])]))
    assert conv is None
    only_questions, _ = TemplateGenerator().generate(
        ImageRecord(image_id=2, qas=[QA("Is it sunny?", "yes", ["vqav2"], 1.0, "yes/no", ["yes"])])
    )
    assert only_questions.messages[0].content.startswith(f"{IMAGE_TOKEN}\nIs it sunny?")


def test_answer_kinds():
    assert classify(QA("What is the man holding?", "none", ["vqav2"])).kind == "nothing"
    assert classify(QA("Which one is bigger?", "one", ["vqav2"])).kind == "what"
    assert classify(QA("What number is on the bus?", "42", ["vqav2"])).kind == "number"
    assert classify(QA("What is this?", "²", ["vqav2"])).kind == "what"
    assert classify(QA("Is it sunny?", "Yes", ["vqav2"])).kind == "yes"
    assert classify(QA("How many dogs?", "two", ["vqav2"])).kind == "how_many"
    assert classify(QA("what color is the cat", "white", ["visdial"])).kind == "verbatim"
    assert classify(QA("how many cats", "2", ["visdial"])).kind == "how_many"
    assert classify(QA("What colour is the bus?", "red", ["vqav2"])).kind == "colour"
    assert classify(QA("What is the man doing?", "surfing", ["vqav2"])).kind == "doing"
    assert classify(QA("Why is he wet?", "rain", ["okvqa"])).kind == "why"
    assert classify(QA("Where is he?", "beach", ["vqav2"])).kind == "place"
    assert classify(QA("What does the sign say?", "stop", ["vqav2"])).kind == "says"
    assert classify(QA("What is written on the bus?", "downtown", ["vqav2"])).kind == "says"
    assert classify(QA("What brand is the laptop?", "dell", ["vqav2"])).kind == "brand"
    assert classify(QA("What time of day is it?", "afternoon", ["vqav2"])).kind == "time"
    assert classify(QA("What year is it?", "2010", ["vqav2"])).kind == "time"  # digits, but not "The number is"
    assert classify(QA("What sport is the man doing?", "surfing", ["okvqa"])).kind == "sport"
    assert classify(QA("Who is holding the umbrella?", "woman", ["vqav2"])).kind == "who"
    assert classify(QA("What kind of dog is this?", "labrador", ["vqav2"])).kind == "kind"
    assert classify(QA("Is it a cat or a dog?", "dog", ["vqav2"])).kind == "other"


def test_no_phrasing_pattern_in_more_than_a_fifth_of_dialogues(tmp_path):
    paths = write_annotations(tmp_path, 600, seed=1)
    records = merge_sources(SourcesConfig(**{k: str(v) for k, v in paths.items()}), ReadStats())
    gen = TemplateGenerator(seed=0)
    used = Counter()
    n = 0
    for rec in records.values():
        conv, patterns = gen.generate(rec)
        assert validate(conv, rec, min_turns=2) is None, conv
        used.update(patterns)
        n += 1
    stats = phrasing_stats(used, n)
    assert stats["max_share_of_dialogues"] <= 0.2, stats["most_used"]
    assert stats["patterns"] > 150


def test_non_english_captions_pass_through_untouched():
    rec = ImageRecord(
        image_id=3, captions=["一只猫坐在垫子上。"], qas=[QA("Is it a cat?", "yes", ["vqav2"], 1.0, "yes/no", ["yes"])]
    )
    conv, _ = TemplateGenerator().generate(rec)
    assert conv.messages[1].content == "一只猫坐在垫子上。"


# Captions as written -> how they must read after other words: only a closed-class first word ("A", "The") is
# lowered; a proper noun or an acronym never is. At the start of a sentence every caption keeps its capital.
NP_CAPTIONS = {
    "A living room with a television": "a living room with a television",
    "The man giving a speech at a podium": "the man giving a speech at a podium",
    "Obama giving a speech at a podium": "Obama giving a speech at a podium",
    "NASA rocket on the launch pad": "NASA rocket on the launch pad",
    "TV on a wooden stand": "TV on a wooden stand",
}
SENTENCE_CAPTIONS = {
    "A man is giving a speech at a podium.": "a man is giving a speech at a podium.",
    "The crowd is watching the speaker.": "the crowd is watching the speaker.",
    "Obama is giving a speech at a podium.": "Obama is giving a speech at a podium.",
    "NASA's rocket stands on the launch pad.": "NASA's rocket stands on the launch pad.",
    "TV sits on a wooden stand.": "TV sits on a wooden stand.",
}


def spliced(text, caption):
    """(at the start of a sentence?, as written) for each place `caption` appears in `text`, in any case."""
    return [
        (m.start() == 0 or text[: m.start()].endswith((". ", "? ", "! ")), m.group(0))
        for m in re.finditer(re.escape(caption), text, re.IGNORECASE)
    ]


@pytest.mark.parametrize(
    ("pool", "field", "captions"),
    [
        (DESCRIBE_NP, "np", NP_CAPTIONS),
        (EXTRA_NP, "np", NP_CAPTIONS),
        (EXTRA_SENTENCE, "s", SENTENCE_CAPTIONS),
        (RATIONALE, "r", SENTENCE_CAPTIONS),
    ],
)
def test_every_caption_template_lowers_only_closed_class_words(pool, field, captions):
    for template in pool:
        for caption, mid in captions.items():
            text = splice(template, **{field: caption})
            [(at_start, written)] = spliced(text, caption)
            assert written == (caption if at_start else mid), (template, text)
            assert at_start == template.startswith("{"), (template, text)
            assert text[0].isupper(), text


def test_closed_class_words_only_as_whole_words():
    assert mid_sentence("It's a dog") == "it's a dog" and mid_sentence("Two cats on a couch") == "two cats on a couch"
    for unchanged in ("I think so", "US flag on a pole", "A-frame house", "London bus", "View of a beach", "iPhone"):
        assert mid_sentence(unchanged) == unchanged


def test_generated_descriptions_keep_names_and_lower_articles():
    """The generator's own descriptions, every caption both as the main one and as an extra, over many seeds."""
    seen = Counter()
    for caption, mid in NP_CAPTIONS.items():
        as_main = [caption, "Flags"]  # too short to be an extra: only the caption is described
        as_extra = ["Several people with cameras and microphones crowd around outside today", caption]
        for captions in (as_main, as_extra):
            for seed in range(30):
                conv, _ = TemplateGenerator(seed=seed).generate(record(image_id=seed, captions=captions))
                for at_start, written in spliced(conv.messages[1].content, caption):
                    assert written == (caption if at_start else mid), conv.messages[1].content
                    seen[at_start] += 1
    assert seen[True] and seen[False]  # both positions were checked


def reply(question, answer, agreement=1.0, seed=0):
    qa = QA(question, answer, ["vqav2"], agreement, "other", [answer])
    patterns = set()
    text = TemplateGenerator().answer(qa, random.Random(seed), patterns)
    assert answer_agrees(text, qa), text  # the validator's check against the ground truth
    return text, patterns


@pytest.mark.parametrize("agreement", [1.0, 0.5])
def test_what_a_sign_says_is_quoted(agreement):
    for seed in range(40):
        text, patterns = reply("What does the sign say?", "stop", agreement, seed)
        assert re.search(r'\b(say|says|read|reads|probably) "stop"', text, re.IGNORECASE), text
        assert ("hedged" in " ".join(patterns)) == (agreement < 0.6)
    several, _ = reply("What do the signs say?", "one way", seed=0)
    assert '"one way"' in several and "It says" not in several


def glued(answer):
    """A bare VQA fragment glued into a frame that needs an article or a clause: "Likely stop sign.", "It's frisbee."."""
    frames = r"likely|probably|most likely|it's|it looks like|looks like|that would be|that looks like|it might be"
    return lambda text: not re.match(rf"({frames}) {answer}", text, re.IGNORECASE)


@pytest.mark.parametrize(
    ("question", "answer", "fits"),
    [
        ("What is the man doing?", "surfing", lambda t: re.search(r"the man is (probably )?surfing", t, re.I)),
        ("What are the kids doing?", "playing soccer", lambda t: re.search(r"kids are (probably )?playing", t, re.I)),
        ("Where are the people?", "outside", lambda t: re.search(r"the people are (probably )?outside", t, re.I)),
        ("What color are the flowers?", "yellow", lambda t: not re.search(r"(it's|it|call it) yellow", t, re.I)),
        ("What color is the bus?", "red", lambda t: not re.search(r"they", t, re.I)),
        ("Why did the car stop?", "stop sign", glued("stop sign")),
        ("What is the man holding?", "frisbee", glued("frisbee")),
        ("Where is the cat?", "beach", glued("beach")),
        ("Who is holding the umbrella?", "woman", glued("woman")),
        ("What kind of dog is this?", "labrador", glued("labrador")),
        ("What sport is the man doing?", "surfing", lambda t: "man is" not in t),  # a sport, not what he is doing
    ],
)
def test_answers_are_phrased_for_the_question(question, answer, fits):
    for agreement in (1.0, 0.5):
        for seed in range(40):
            text, _ = reply(question, answer, agreement, seed)
            assert fits(text), text


def test_yes_no_answers_can_echo_the_question():
    replies = {
        reply("Is there a dog in the picture?", truth, seed=seed)[0] for truth in ("yes", "no") for seed in range(60)
    }
    assert any(r.startswith("Yes, there is") for r in replies) and any("there isn't" in r for r in replies)
    assert not any("it is" in reply("Is this man happy?", "yes", seed=seed)[0] for seed in range(60))


def test_question_fitted_dialogues_pass_validation():
    qas = [
        QA("What does the sign say?", "stop", ["vqav2"], 0.9, "other", ["stop"]),
        QA("What color are the flowers?", "yellow", ["vqav2"], 0.8, "other", ["yellow"]),
        QA("What is the man doing?", "riding bike", ["vqav2"], 0.5, "other", ["riding bike", "biking"]),
        QA("Where is the man?", "outside", ["vqav2"], 1.0, "other", ["outside"]),
        QA("Why did the car stop?", "stop sign", ["vqav2"], 0.7, "other", ["stop sign"]),
        QA("What brand is the car?", "toyota", ["vqav2"], 0.9, "other", ["toyota"]),
        QA("Is there a dog in the picture?", "no", ["vqav2"], 1.0, "yes/no", ["no"]),
        QA("What time of day is it?", "morning", ["vqav2"], 0.6, "other", ["morning"]),
        QA("What kind of tree is this?", "palm", ["vqav2"], 0.9, "other", ["palm"]),
    ]
    rec = record(captions=["A stop sign on a street corner", "NASA rocket behind the palm trees"], qas=qas)
    for seed in range(30):
        conv, patterns = TemplateGenerator(seed=seed, max_turns=12).generate(rec)
        assert validate(conv, rec, min_turns=2) is None, conv
        sign = next(m.content for q, m in zip(conv.messages, conv.messages[1:]) if "the sign say" in q.content)
        assert '"stop"' in sign
        assert any(p.startswith("says:") for p in patterns)


def kind_of(question, answer):
    return classify(QA(question, answer, ["vqav2"])).kind


def test_make_is_a_brand_question_only_as_a_noun():
    for question, answer in [
        ("What sound does this animal make?", "moo"),
        ("What is the woman trying to make?", "cake"),
    ]:
        assert kind_of(question, answer) != "brand"
        for seed in range(40):
            assert "brand" not in reply(question, answer, seed=seed)[0].lower()
    for question in ("What brand is the laptop?", "What make is the car?", "What is the make of this car?"):
        assert kind_of(question, "toyota") == "brand", question


def test_says_needs_something_written():
    for question, answer in [
        ("What would you say this room is?", "kitchen"),
        ("What does this say about the artist?", "a lot"),
    ]:
        assert kind_of(question, answer) != "says"
        for seed in range(40):
            assert '"' not in reply(question, answer, seed=seed)[0]
    for question in (
        "What does the sign say?", "What does this say?", "What do the letters say?", "What is written on the bus?",
        "What does the banner read?", "What do you think the sign says?", "What word is on the sign?",
    ):  # fmt: skip
        assert kind_of(question, "stop") == "says", question


def test_time_of_day_only_when_the_time_is_asked():
    assert kind_of("What is the man doing at this time of day?", "surfing") == "doing"
    for seed in range(40):
        assert not reply("What is the man doing at this time of day?", "surfing", seed=seed)[0].startswith("It's")
    for question in ("What time of day is it?", "What time is it?", "What is the time of day?", "When was this taken?"):
        assert kind_of(question, "morning") == "time", question


def test_yes_no_echo_about_the_assistant_is_plain():
    replies = set()
    for question in ("Can you see the dog?", "Do you see a dog?"):
        for truth in ("yes", "no"):
            replies |= {reply(question, truth, seed=seed)[0] for seed in range(200)}
    echoed = {r for r in replies if re.match(r"\w+('s)?( \w+)?, I('m afraid I)? (can|can't|do|don't)\.$", r)}
    assert {"Yes, I can.", "No, I can't.", "Yes, I do.", "No, I don't."} & echoed
    assert not [r for r in replies if re.search(r"\bI (can|can't|do|don't),", r)], replies


# Annotator text whose capitalised first word is not closed-class (a name, an acronym, or a common noun that starts
# the annotator's sentence) keeps its capital, so it may only be spliced where a sentence starts or after a colon.
OPEN_CAPTIONS = [
    "View of a park with a bench", "Man riding a horse on a beach", "Obama giving a speech at a podium",
    "NASA rocket on the launch pad", "Close up of a pizza on a plate",
]  # fmt: skip
OPEN_SENTENCES = ["People are walking along the beach.", "Obama is giving a speech at a podium."]
LOWER_SENTENCES = ["people are walking along the beach.", "man is giving a speech at a podium"]
OPEN_RATIONALES = ["People use umbrellas when it rains.", "Giraffes live in the African savanna."]


def starts_sentence(text, start):
    return start == 0 or text[:start].endswith((". ", "? ", "! ", ": ", "\n"))


def test_capitalised_open_class_text_only_starts_a_sentence():
    seen = Counter()
    filler = "Several people with cameras and microphones crowd around outside today"
    for caption in OPEN_CAPTIONS + OPEN_SENTENCES:
        for captions in ([caption, "Flags"], [filler, caption], [filler, "A dog sleeping on a red couch", caption]):
            for seed in range(40):
                conv, patterns = TemplateGenerator(seed=seed).generate(record(image_id=seed, captions=captions))
                text = conv.messages[1].content
                found = list(re.finditer(re.escape(caption.rstrip(".")), text, re.IGNORECASE))
                assert found or captions[0] == filler, text  # an extra caption is not always used
                for m in found:
                    assert m.group(0) == caption.rstrip(".") and starts_sentence(text, m.start()), text
                    seen[text[: m.start()][-2:] or "start"] += 1
    assert seen["start"] and seen[". "] and seen[": "]  # at the start, after a sentence and after a colon
    # the articles are still lowered after other words
    conv, _ = TemplateGenerator(seed=1).generate(record(captions=["A man riding a horse on a beach", "Flags"]))
    assert "a man riding" in conv.messages[1].content or conv.messages[1].content.startswith("A man riding")


def test_capitalised_rationales_only_start_a_sentence():
    gen, used = TemplateGenerator(), set()
    for rationale in OPEN_RATIONALES:
        for seed in range(60):
            patterns = set()
            text = gen.explain(rationale, random.Random(seed), patterns)
            assert rationale in text and starts_sentence(text, text.index(rationale)), text
            used |= patterns
        qa = QA("Why is she carrying one?", "rain", ["aokvqa"], 1.0, answers=["rain"] * 10, rationales=[rationale])
        for seed in range(40):
            conv, _ = TemplateGenerator(seed=seed).generate(record(image_id=seed, qas=[qa]))
            for m in conv.messages[2:]:
                if rationale in m.content:
                    assert starts_sentence(m.content, m.content.index(rationale)), m.content
    assert len(used) >= 3  # still varied
    assert "Because people use umbrellas when it rains." in {
        gen.explain("people use umbrellas when it rains.", random.Random(s), set()) for s in range(60)
    }  # lower-case text keeps every template


@pytest.mark.parametrize(
    ("pool", "field"), [(DESCRIBE_NP, "np"), (EXTRA_NP, "np"), (EXTRA_SENTENCE, "s"), (RATIONALE, "r")]
)
def test_every_caption_pool_has_sentence_initial_templates(pool, field):
    initial = [t for t in pool if starts_sentence(t, t.lower().index("{" + field + "}"))]
    assert len(initial) >= 3, initial


def test_lower_case_text_is_capitalised_only_where_a_sentence_starts():
    filler = "Several people with cameras and microphones crowd around outside today"
    seen = Counter()
    for caption in LOWER_SENTENCES:
        for seed in range(60):
            conv, _ = TemplateGenerator(seed=seed).generate(record(image_id=seed, captions=[filler, caption]))
            text = conv.messages[1].content
            for m in re.finditer(re.escape(caption.rstrip(".")), text, re.IGNORECASE):
                at_start = starts_sentence(text, m.start()) and not text[: m.start()].endswith(": ")
                assert m.group(0)[0].isupper() == at_start, text
                seen[at_start] += 1
    assert seen[True] and seen[False]


def test_closed_class_questions_are_lowered_after_a_lead_in():
    asked = {
        TemplateGenerator().ask(q, False, random.Random(s), set())
        for q in ("Anything else?", "Is it sunny?")
        for s in range(40)
    }
    assert any(q.startswith(("Also, anything", "So, anything", "Okay, anything", "And anything")) for q in asked), asked
    assert not [q for q in asked if re.search(r"[,a-z] (Anything|Is)\b", q)], asked
