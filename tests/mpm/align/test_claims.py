"""Claim splitting and yes/no questions: the rule splitter on inline multilingual text, the LLM splitter on
recorded replies (strings below), and the shipped language files."""

from __future__ import annotations

import shutil

import pytest

from mpm.align.claims import (
    DEFAULT_FOLDER,
    Claim,
    LLMSplitter,
    ResponseToSplit,
    RuleSplitter,
    available_languages,
    build_splitter,
    load_language,
    parse_claim_list,
    parse_question,
    split_clauses,
)
from mpm.core.errors import ConfigError

SHIPPED = ("de", "en", "es", "fr", "ja", "zh")


@pytest.mark.parametrize("lang", SHIPPED)
def test_every_shipped_language_loads(lang):
    rules = load_language(lang)
    assert rules.lang == lang
    assert "{claim}" in rules.question_template
    assert set(SHIPPED) <= set(available_languages())


def test_unknown_language_lists_the_available_ones():
    with pytest.raises(ConfigError, match=r"'xx'.*available: de, en, es, fr, ja, zh"):
        load_language("xx")


def test_a_language_is_one_file(tmp_path):
    text = (DEFAULT_FOLDER / "en.yaml").read_text(encoding="utf-8").replace("lang: en", "lang: pt")
    text = text.replace('" and "', '" e "').replace("Is it true that {claim}?", "É verdade que {claim}?")
    (tmp_path / "pt.yaml").write_text(text, encoding="utf-8")
    [claims] = RuleSplitter(tmp_path).split([ResponseToSplit("", "O gato está dormindo e o cão está latindo.", "pt")])
    assert [c.text for c in claims] == ["O gato está dormindo", "o cão está latindo"]
    assert claims[0].question.startswith("É verdade que O gato está dormindo?")


def test_bad_language_file_names_file_and_key(tmp_path):
    shutil.copy(DEFAULT_FOLDER / "en.yaml", tmp_path / "en.yaml")
    path = tmp_path / "en.yaml"
    path.write_text(path.read_text().replace("{response}", "{respones}"), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"en\.yaml: split_prompt must use the placeholders"):
        load_language("en", tmp_path)
    path.write_text(path.read_text() + "colour: red\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"unknown keys \['colour'\]"):
        load_language("en", tmp_path)


@pytest.mark.parametrize(
    ("lang", "text", "want"),
    [
        (
            "en",
            "A man is holding a red umbrella and a dog sits next to him. The sign costs 3.5 dollars; it is old!",
            ["A man is holding a red umbrella", "a dog sits next to him", "The sign costs 3.5 dollars", "it is old"],
        ),
        ("en", "A black and white cat sleeps.", ["A black and white cat sleeps"]),  # "A black" is too short
        ("de", "Ein Hund liegt im Gras und eine Katze schläft daneben.", ["Ein Hund liegt im Gras", "eine Katze schläft daneben"]),
        ("fr", "Un chat dort sur le lit et une lampe est allumée ; il fait nuit.", ["Un chat dort sur le lit", "une lampe est allumée", "il fait nuit"]),
        ("es", "¿Qué hay? Un perro corre en el parque y un niño lo sigue.", ["Un perro corre en el parque", "un niño lo sigue"]),
        ("zh", "桌子上有苹果和香蕉，旁边坐着一个女孩。她穿着红色的裙子并且戴着一顶帽子！", ["桌子上有苹果和香蕉", "旁边坐着一个女孩", "她穿着红色的裙子", "戴着一顶帽子"]),
        ("ja", "机の上にりんごとバナナがあります。女の子が座っていて、赤い服を着ています。", ["机の上にりんごとバナナがあります", "女の子が座っていて", "赤い服を着ています"]),
    ],
)  # fmt: skip
def test_rule_split(lang, text, want):
    claims, _ = split_clauses(text, load_language(lang))
    assert claims == want


def test_rule_splitter_questions_and_counts():
    splitter = RuleSplitter()
    out = splitter.split(
        [
            ResponseToSplit("Describe.", "Yes. The cat is black.", "en"),
            ResponseToSplit("描述", "猫是黑色的。", "zh"),
            ResponseToSplit("Describe.", "Ok.", "en"),
        ]
    )
    assert out[0] == [Claim("The cat is black", "Is it true that The cat is black? Please answer yes or no.", "en")]
    assert out[1] == [Claim("猫是黑色的", "猫是黑色的，对吗？请回答是或否。", "zh")]
    assert out[2] == []
    s = splitter.stats
    assert (s.responses, s.claims, s.empty, s.dropped_short, s.malformed) == (3, 2, 1, 2, 0)


# Recorded replies of split models, as they come back.
NUMBERED = "1. The cat is black.\n2. The cat sits on a red sofa.\n3) A lamp is on the table."
BULLETS_WITH_PREAMBLE = (
    "Sure! Here are the facts:\n\n- The cat is black.\n\n* The sofa is red.\n• A lamp is on.\nHope this helps."
)
FACTS_HEADER = "### Facts:\n- There is a dog.\n- The dog is brown."
PLAIN_LINES = "The cat is black.\n\nThe sofa is red.\n"
COLON_ITEM = "Facts:\n1. The sign reads:\n2. 价格：\n- The door is open."
ZH_NUMBERED = "事实：\n1、猫是黑色的。\n2、沙发是红色的。\n（3）桌子上有一盏灯。"
PARAGRAPH = "I am sorry, but as an AI I " + "cannot really say what is in the picture and will not list facts " * 6


@pytest.mark.parametrize(
    ("reply", "want"),
    [
        (NUMBERED, ["The cat is black", "The cat sits on a red sofa", "A lamp is on the table"]),
        (BULLETS_WITH_PREAMBLE, ["The cat is black", "The sofa is red", "A lamp is on"]),
        (FACTS_HEADER, ["There is a dog", "The dog is brown"]),
        (PLAIN_LINES, ["The cat is black", "The sofa is red"]),
        (ZH_NUMBERED, ["猫是黑色的", "沙发是红色的", "桌子上有一盏灯"]),
        (COLON_ITEM, ["The sign reads", "价格", "The door is open"]),  # only unmarked lines are headers
    ],
)
def test_parse_claim_list(reply, want):
    assert parse_claim_list(reply) == (want, "")


@pytest.mark.parametrize(
    ("reply", "problem"), [("", "empty"), ("  \n\n ", "empty"), ("Facts:\n### Facts:", "malformed"), (PARAGRAPH, "malformed"), ("1. ...\n2. !!", "malformed")]
)  # fmt: skip
def test_parse_claim_list_rejects(reply, problem):
    assert parse_claim_list(reply) == ([], problem)


def test_parse_question():
    assert parse_question('\n"Is the cat black?"\nextra') == "Is the cat black?"
    assert parse_question("1. 猫是黑色的吗？") == "猫是黑色的吗？"
    assert parse_question("  \n") == ""
    assert parse_question("Question:\n1. Does the sign read:") == "Does the sign read:"  # marked: not a header


class Recorded:
    """A generator that answers from a dict of recorded replies, keyed by a substring of the prompt."""

    def __init__(self, replies: dict[str, str]):
        self.replies, self.calls = replies, []

    def __call__(self, prompts: list[str]) -> list[str]:
        self.calls.append(prompts)
        return [next(r for key, r in self.replies.items() if key in p) for p in prompts]


def test_llm_splitter_counts_malformed_and_empty():
    gen = Recorded(
        {
            "Answer: A black cat": NUMBERED,
            "Answer: garbage": PARAGRAPH,
            "Answer: nothing": "",
            "回答：一只黑猫": ZH_NUMBERED,
            "Statement: The cat is black\n": "Is the cat black?",
            "Statement: The cat sits": "",  # a blank question reply: template question, counted
            "Statement: A lamp": "1. Is a lamp on the table?",
            "陈述：": "这是真的吗？",
        }
    )
    splitter = LLMSplitter(gen)
    items = [
        ResponseToSplit("Describe.", "A black cat.", "en"),
        ResponseToSplit("Describe.", "garbage", "en"),
        ResponseToSplit("Describe.", "nothing", "en"),
        ResponseToSplit("描述", "一只黑猫", "zh"),
    ]
    out = splitter.split(items)
    assert [len(c) for c in out] == [3, 0, 0, 3]
    assert out[0][0] == Claim("The cat is black", "Is the cat black? Please answer yes or no.", "en")
    assert out[0][1].question == "Is it true that The cat sits on a red sofa? Please answer yes or no."
    assert out[0][2].question == "Is a lamp on the table? Please answer yes or no."
    assert out[3][0] == Claim("猫是黑色的", "这是真的吗？请回答是或否。", "zh")
    s = splitter.stats
    assert (s.responses, s.claims, s.malformed, s.empty, s.question_fallback) == (4, 6, 1, 1, 1)
    assert len(gen.calls) == 2  # one batch of split prompts, one of question prompts
    assert "回答：一只黑猫" in gen.calls[0][3]  # the split prompt is in the response's language


def test_llm_splitter_template_questions_make_one_call():
    gen = Recorded({"Answer:": PLAIN_LINES})
    out = LLMSplitter(gen, questions="template").split([ResponseToSplit("Q", "x", "en")])
    assert [c.question for c in out[0]] == [
        "Is it true that The cat is black? Please answer yes or no.",
        "Is it true that The sofa is red? Please answer yes or no.",
    ]
    assert len(gen.calls) == 1


def test_llm_splitter_checks_reply_count():
    with pytest.raises(ValueError, match="returned 0 replies for 1 prompts"):
        LLMSplitter(lambda prompts: []).split([ResponseToSplit("Q", "x", "en")])


def test_build_splitter():
    assert isinstance(build_splitter("rule"), RuleSplitter)
    assert isinstance(build_splitter("llm", generate=lambda p: p, questions="template"), LLMSplitter)
    with pytest.raises(ConfigError, match="needs a generator"):
        build_splitter("llm")
    with pytest.raises(ConfigError, match=r"`splitter` must be one of \['rule', 'llm'\]"):
        build_splitter("spacy")
