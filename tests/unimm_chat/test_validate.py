import pytest

from unimm_chat.conversations import Conversation, Message
from unimm_chat.sources import QA, ImageRecord
from unimm_chat.validate import answer_agrees, validate

RECORD = ImageRecord(
    image_id=1,
    captions=["A red bus on a street."],
    qas=[
        QA("What color is the bus?", "red", ["vqav2"], 0.9, "other", ["red"]),
        QA("Is it raining?", "no", ["vqav2"], 1.0, "yes/no", ["no"]),
        QA("How many buses are there?", "1", ["vqav2"], 1.0, "number", ["1"]),
        QA("how many people", "none", ["visdial"], answers=["none"]),
    ],
)


def conv(*turns):
    roles = ["user", "assistant"]
    return Conversation("1", ["1.jpg"], [Message(roles[i % 2], t) for i, t in enumerate(turns)])


GOOD = [
    "<image>\nWhat's in this picture?",
    "A red bus driving down a city street.",
    "What color is the bus?",
    "It's red.",
]


def test_a_good_dialogue_passes():
    assert validate(conv(*GOOD), RECORD, min_turns=2) is None


@pytest.mark.parametrize(
    ("turns", "reason"),
    [
        (GOOD[:3], "not_alternating"),
        (["<image>\nHi", "Hello", "   ", "Red."], "empty_turn"),
        (["What's in this picture?", "A bus.", "What color?", "Red."], "image_token"),
        (["<image>\nWhat's this?", "A bus.", "<image>\nAnd this?", "Red."], "image_token"),
        (["<image>\nDescribe it.", "According to the caption, a red bus.", "Color?", "Red."], "annotation_leak"),
        (["<image>\nDescribe it.", "The annotations say it is a bus.", "Color?", "Red."], "annotation_leak"),
        (["<image>\nDescribe it.", "As an AI, I cannot see images.", "Color?", "Red."], "annotation_leak"),
        (["<image>\nHi", "A bus."], "too_short"),
        ([*GOOD[:2], "What color is the bus?", "It's blue."], "inconsistent_answer"),
        ([*GOOD[:2], "Also, is it raining?", "Yes, it is."], "inconsistent_answer"),
        ([*GOOD[:2], "How many buses are there?", "There are three."], "inconsistent_answer"),
    ],
)
def test_each_rejection_reason(turns, reason):
    result = validate(conv(*turns), RECORD, min_turns=2)
    assert result is not None and result[0] == reason, result


def test_a_user_turn_that_mentions_the_data_is_fine_but_the_assistant_may_not():
    turns = ["<image>\nThe caption says bus; what do you see?", "A red bus on a street.", "Is it raining?", "No."]
    assert validate(conv(*turns), RECORD, min_turns=2) is None


@pytest.mark.parametrize(
    ("reply", "ok"),
    [("No, it isn't.", True), ("Nope.", True), ("Not at all.", True), ("Yes.", False), ("It looks dry, no.", True)],
)
def test_yes_no_agreement(reply, ok):
    assert answer_agrees(reply, RECORD.qas[1]) is ok


@pytest.mark.parametrize(
    ("reply", "ok"), [("Just one.", True), ("1.", True), ("There is one bus.", True), ("Two.", False)]
)
def test_number_agreement(reply, ok):
    assert answer_agrees(reply, RECORD.qas[2]) is ok


def test_visdial_questions_are_not_checked_against_a_single_free_form_answer():
    turns = [*GOOD[:2], "How many people?", "I can see two people near the bus."]
    assert validate(conv(*turns), RECORD, min_turns=2) is None


@pytest.mark.parametrize(
    ("reply", "truth", "ok"),
    [
        ("Yes, he's wearing a hat, and he doesn't look cold.", "yes", True),
        ("Yes, there is no doubt about it.", "yes", True),
        ("Sure, he has a fedora on.", "yes", True),
        ("Now that you mention it, yes.", "yes", True),
        ("He wears a red cap.", "yes", True),  # cannot be judged: passes
        ("Yes, he is wearing a hat, though not a big one.", "no", False),
        ("Definitely not.", "yes", False),
    ],
)
def test_yes_no_replies_are_judged_by_their_leading_polarity(reply, truth, ok):
    assert answer_agrees(reply, QA("Is he wearing a hat?", truth, ["vqav2"], 1.0, "yes/no", [truth])) is ok


def test_spelled_numbers_past_ten():
    qa = QA("How many people are there?", "12", ["vqav2"], 1.0, "number", ["12"])
    assert answer_agrees("There are twelve people.", qa)
    assert not answer_agrees("Twenty-two birds.", QA("How many birds?", "2", ["vqav2"], 1.0, "number", ["2"]))


def test_a_why_follow_up_is_not_the_yes_no_question_it_ends_with():
    record = ImageRecord(1, qas=[QA("Is the man wearing a hat?", "yes", ["vqav2"], 1.0, "yes/no", ["yes"])])
    turns = [
        "<image>\nIs the man wearing a hat?",
        "Yes.",
        "Why is the man wearing a hat?",
        "Because it is sunny and bright.",
    ]
    assert validate(conv(*turns), record, min_turns=2) is None
    turns[2] = "Also, is the man wearing a hat?"
    turns[3] = "No, he isn't."
    assert validate(conv(*turns), record, min_turns=2)[0] == "inconsistent_answer"


def test_low_agreement_answers_are_not_enforced():
    record = ImageRecord(1, qas=[QA("What is in the sky?", "bird", ["vqav2"], 0.2, "other", ["bird", "kite"])])
    turns = ["<image>\nDescribe it.", "A beach.", "What is in the sky?", "A plane."]
    assert validate(conv(*turns), record, min_turns=2, min_vqa_agreement=0.3) is None
    assert validate(conv(*turns), record, min_turns=2)[0] == "inconsistent_answer"
