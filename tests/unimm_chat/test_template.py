from collections import Counter

from unimm_chat.build import phrasing_stats
from unimm_chat.config import SourcesConfig
from unimm_chat.conversations import IMAGE_TOKEN
from unimm_chat.sources import QA, ImageRecord, ReadStats, merge_sources
from unimm_chat.synthetic import write_annotations
from unimm_chat.template import TemplateGenerator, classify
from unimm_chat.validate import validate


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
    assert classify(QA("Where is he?", "beach", ["vqav2"])).kind == "other"


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
