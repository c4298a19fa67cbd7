"""LLM-as-judge against a real OpenAI-compatible server on 127.0.0.1, and MMBench circular evaluation: rotations,
letters, hand-computed scores, a TSV with a base64 image, and a tiny random MPM model through the whole path."""

from __future__ import annotations

import base64
import csv
from pathlib import Path

import pytest

from mpm.core.errors import ConfigError, DataError, EndpointError
from mpm.eval.judge import LLMJudge, load_judge_prompt, parse_reply
from mpm.eval.mmbench import (
    INSTRUCTIONS,
    MCQuestion,
    build_prompt,
    evaluate_mmbench,
    extract_letter,
    read_mmbench_tsv,
    rotations,
    score_items,
    score_mmbench,
    transfer,
)
from mpm.eval.scorers import SCORERS
from tests.conftest import image_bytes

CONFIGS = Path(__file__).parents[3] / "configs" / "eval"
EN_PROMPT = CONFIGS / "judge_llava_bench.yaml"

# ---------------------------------------------------------------------------------------------------------------
# LLM judge

# question -> the judge's canned reply (reference score first, as the prompt asks)
REPLIES = {
    "What is the cat doing?": "8 6\nAssistant 2 misses the mat.",
    "What colour is the car?": "9, 9\nBoth are right.",
    "Why is the road wet?": "**Assistant 1: 7, Assistant 2: 3**\nThe second answer guesses.",
    "How many birds?": "I am unable to rate these answers.",  # no scores: unparsed
    "猫在做什么？": "8 4\n助手2的回答不完整。",
    "车是什么颜色？": "１０ ５\n",  # full-width digits
}


def judge_reply(body: dict) -> str:
    user = body["messages"][-1]["content"]
    return next(reply for question, reply in REPLIES.items() if question in user)


def judge_items(questions, lang="en", category=None):
    return [{"id": str(i), "lang": lang, "question": q, "output": f"answer {i}", "references": [f"reference {i}"],
             **({"category": category[i]} if category else {})} for i, q in enumerate(questions)]  # fmt: skip


def test_judge_scores_relative_to_the_reference_and_counts_unparsed_replies(chat_server, tmp_path):
    server = chat_server(judge_reply)
    judge = LLMJudge(endpoint=server.base_url, model="judge-1", max_workers="2", cache_file=str(tmp_path / "c.sqlite"))
    items = judge_items(list(REPLIES)[:4], category=["conv", "conv", "complex", "complex"])
    items[0]["context"] = ["A cat sits on a mat.", "cat: [0.1, 0.2, 0.5, 0.6]"]  # LLaVA-Bench: captions and boxes
    scores = judge.score(items, "en")

    # judged: (8, 6), (9, 9), (7, 3); the fourth reply has no scores
    assert scores.values["judge_relative_score"] == pytest.approx((6 + 9 + 3) / (8 + 9 + 7) * 100)  # 75.0
    assert scores.values["judge_answer_score"] == pytest.approx(6.0)
    assert scores.values["judge_reference_score"] == pytest.approx(8.0)
    assert (scores.values["judge_judged"], scores.values["judge_unparsed"], scores.values["judge_failed"]) == (3, 1, 0)
    assert scores.values["judge_relative_score/conv"] == pytest.approx(15 / 17 * 100)
    assert scores.values["judge_relative_score/complex"] == pytest.approx(3 / 7 * 100)  # the unparsed one left out
    assert scores.per_item == [6.0, 9.0, 3.0, None]
    unparsed = scores.details["items"][3]
    assert unparsed["status"] == "unparsed" and unparsed["reply"] == REPLIES["How many birds?"]
    assert scores.details["prompt_file"] == str(EN_PROMPT) and scores.details["model"] == "judge-1"

    # what the judge saw: LLaVA's layout, the captions as context, the no-context line otherwise
    sent = {r["messages"][-1]["content"].split("[Question]\n")[1].split("\n")[0]: r for r in server.requests}
    cat = sent["What is the cat doing?"]
    assert cat["model"] == "judge-1" and cat["temperature"] == 0.2 and cat["messages"][0]["role"] == "system"
    user = cat["messages"][1]["content"]
    assert "[Context]\nA cat sits on a mat.\ncat: [0.1, 0.2, 0.5, 0.6]" in user
    assert "[Assistant 1]\nreference 0\n" in user and "[Assistant 2]\nanswer 0\n" in user
    assert "No description of the image" in sent["How many birds?"]["messages"][1]["content"]
    assert len(server.requests) == 4

    # scoring again asks only for the reply that could not be parsed; a new process reuses the cache file
    judge.score(items, "en")
    assert len(server.requests) == 5
    again = LLMJudge(endpoint=server.base_url, model="judge-1", cache_file=str(tmp_path / "c.sqlite"))
    assert again.score(items, "en").values == scores.values and len(server.requests) == 6


def test_judge_uses_the_chinese_prompt_for_chinese(chat_server):
    server = chat_server(judge_reply)
    scores = LLMJudge(endpoint=server.base_url, model="j").score(
        judge_items(["猫在做什么？", "车是什么颜色？"], "zh"), "zh"
    )
    assert scores.details["prompt_file"].endswith("judge_llava_bench_zh.yaml") and scores.details["prompt_lang"] == "zh"
    assert scores.values["judge_relative_score"] == pytest.approx((4 + 5) / (8 + 10) * 100)
    messages = server.requests[0]["messages"]
    assert messages[0]["content"].startswith("你是") and "[问题]\n" in messages[1]["content"]
    assert "（没有图片的文字描述" in messages[1]["content"]
    # a language without its own file is judged with the English prompt
    assert LLMJudge(endpoint=server.base_url, model="j").prompt_for("th")[0] == EN_PROMPT


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("8 6\nbecause", (8, 6)),
        ("7,5", (7, 5)),
        ("\n  **9 4**  \n", (9, 4)),
        ("Assistant 1: 8, Assistant 2: 6", (8, 6)),
        ("助手1：8分，助手2：6分", (8, 6)),
        ("8/10 6/10", (8, 6)),
        ("7.5 6", (7.5, 6)),
        ("8 6 5", None),  # three numbers
        ("8\n6", None),  # the second score not on the first line
        ("12 6", None),  # out of 1..10
        ("", None),
        ("The first answer is better.\n8 6", None),
    ],
)
def test_judge_reply_parsing(reply, expected):
    parsed = parse_reply(reply, load_judge_prompt(EN_PROMPT))
    assert (parsed and (parsed["reference"], parsed["answer"])) == expected or parsed is expected


def test_shipped_judge_prompts_load_and_bad_ones_are_refused(tmp_path, chat_server):
    for path in sorted(CONFIGS.glob("judge_*.yaml")):
        prompt = load_judge_prompt(path)
        assert prompt.reply_scores == ["reference", "answer"] and "{context}" in prompt.user_template
    assert SCORERS["llm_judge"] is LLMJudge
    bad = tmp_path / "judge.yaml"
    bad.write_text("user_template: 'Rate {answer}'\n")
    with pytest.raises(ConfigError, match=r"lacks \{question\}, \{reference\}"):
        load_judge_prompt(bad)
    bad.write_text("user_template: '{question} {answer}'\nreply_scores: [answer, answer]\n")
    with pytest.raises(ConfigError, match="reply_scores"):
        load_judge_prompt(bad)
    bad.write_text("user_template: '{question} {answer} {reference}'\nscore_max: 10\ntemprature: 0\n")
    with pytest.raises(ConfigError, match="temprature"):
        load_judge_prompt(bad)
    with pytest.raises(ConfigError, match="endpoint=URL"):
        LLMJudge(model="j")
    with pytest.raises(ConfigError, match="max_workers"):
        LLMJudge(endpoint="http://127.0.0.1:1/v1", model="j", max_workers="many")
    refusing = chat_server(lambda body: (401, b'{"error": "bad key"}'))
    with pytest.raises(EndpointError, match="HTTP 401"):
        LLMJudge(endpoint=refusing.base_url, model="j").score(judge_items(["What is the cat doing?"]), "en")
    server = chat_server(judge_reply)
    with pytest.raises(DataError, match="item 0 .* reference answer"):
        LLMJudge(endpoint=server.base_url, model="j").score([{"question": "q?", "output": "a", "references": []}], "en")


# ---------------------------------------------------------------------------------------------------------------
# MMBench


def q(index, options, answer, category=None):
    return MCQuestion(str(index), f"Question {index}?", list(options), answer, category=category)


def test_rotations_move_the_options_and_the_right_letter():
    assert rotations(q(1, ["cat", "dog"], "A")) == [(["cat", "dog"], "A"), (["dog", "cat"], "B")]
    assert rotations(q(2, ["x", "y", "z"], "C")) == [
        (["x", "y", "z"], "C"),
        (["y", "z", "x"], "B"),
        (["z", "x", "y"], "A"),
    ]
    four = rotations(q(3, ["a", "b", "c", "d"], "B"))
    assert [o for o, _ in four] == [list("abcd"), list("bcda"), list("cdab"), list("dabc")]
    assert [letter for _, letter in four] == ["B", "A", "D", "C"]
    for options, letter in four:  # the right option's text stays "b"
        assert options["ABCD".index(letter)] == "b"


@pytest.mark.parametrize(
    "output, expected",
    [
        ("B", "B"),
        ("(C) a cat", "C"),
        ("The answer is D.", "D"),
        ("猫", "B"),  # the option's text
        ("答案是C。", "C"),
        ("Ｄ", "D"),  # full width
        ("c", "C"),
        ("A cat is on the mat.", None),  # the article, not option A
        ("I think B", "B"),
        ("E", None),  # no option E
        ("", None),
    ],
)
def test_letter_extraction(output, expected):
    assert extract_letter(output, ["狗", "猫", "鸟", "鱼"]) == expected


def test_a_letter_wins_over_an_option_that_is_a_letter():
    assert extract_letter("A", ["B", "A"]) == "A" and extract_letter("(B) A", ["B", "A"]) == "B"


def test_circular_scoring_by_hand_and_the_transfer_ratio():
    animals = ["cat", "dog", "bird", "fish"]
    questions = [q(1, animals, "A", "colour"), q(2, animals, "C", "colour"), q(3, animals[:2], "B", "count"),
                 q(4, animals[:3], "A", "count")]  # fmt: skip
    right = {(x.index, r): letter for x in questions for r, (_, letter) in enumerate(rotations(x))}
    predictions = dict(right)
    predictions[("2", 2)] = "B" if right[("2", 2)] != "B" else "C"  # question 2: 3 of 4 rotations right: wrong
    predictions[("3", 1)] = f"The answer is {right[('3', 1)]}."  # still right
    predictions[("4", 1)] = ""  # unparsed: question 4 wrong
    results = score_mmbench(questions, predictions, "en")
    en = results["languages"]["en"]
    assert results["task"] == "mmbench" and en["circular"] is True
    assert en["accuracy"] == pytest.approx(2 / 4) and en["questions"] == 4
    assert en["unparsed"] == 1 and en["answers"] == 4 + 4 + 2 + 3
    assert en["vanilla_accuracy"] == pytest.approx(1.0)  # every rotation 0 was right
    assert en["categories"] == {"colour": {"accuracy": 0.5, "questions": 2}, "count": {"accuracy": 0.5, "questions": 2}}
    rows = score_items(questions, predictions)
    assert [r["correct"] for r in rows] == [True, False, True, False]
    assert [a["correct"] for a in rows[1]["rotations"]] == [True, True, False, True]

    zh_predictions = dict(right)
    zh_predictions[("1", 3)] = "我不知道"
    zh_predictions[("3", 0)] = "猫"  # not an option's text: unparsed
    zh_predictions[("4", 2)] = "Cat."  # rotation 2 of question 4 is (bird, cat, dog): option B, right
    zh = score_mmbench(questions, {**zh_predictions, ("2", 0): "B"}, "zh")
    assert zh["languages"]["zh"]["accuracy"] == pytest.approx(1 / 4)
    ratio = transfer({"en": results, "zh": zh})
    assert ratio == {"zh": {"accuracy": 0.25, "source_accuracy": 0.5, "ratio": pytest.approx(0.5)}}
    with pytest.raises(DataError, match="other questions"):
        transfer({"en": results, "zh": score_mmbench(questions[:2], zh_predictions, "zh")})
    with pytest.raises(DataError, match="rotation 1"):
        score_mmbench(questions, {k: v for k, v in predictions.items() if k != ("4", 1)})


def write_tsv(path: Path, rows: list[dict], columns=("index", "question", "hint", "A", "B", "C", "D", "answer",
                                                        "category", "image")):  # fmt: skip
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, columns, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


RED = base64.b64encode(image_bytes((40, 30), (220, 30, 30), "PNG")).decode()
BLUE = base64.b64encode(image_bytes((30, 40), (30, 30, 220), "PNG")).decode()


def test_tsv_with_base64_images_file_names_and_shared_images(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "blue.png").write_bytes(base64.b64decode(BLUE))
    write_tsv(tmp_path / "mmbench.tsv", [
        {"index": "10", "question": "What colour is it?", "hint": "", "A": "red", "B": "blue", "C": "green",
         "D": "", "answer": "A", "category": "colour", "image": RED},
        {"index": "11", "question": "Is it \"dark\"?\nThink.", "hint": "Look closely.", "A": "yes", "B": "no",
         "C": "", "D": "", "answer": "B", "category": "colour", "image": "blue.png"},
        {"index": "12", "question": "Same picture?", "hint": "nan", "A": "yes", "B": "no", "answer": "A",
         "image": "10"},  # VLMEvalKit's deduplicated TSVs: another row's index
    ])  # fmt: skip
    questions = read_mmbench_tsv(tmp_path / "mmbench.tsv", tmp_path / "images")
    first, second, third = questions
    assert first.options == ["red", "blue", "green"] and first.answer == "A" and first.hint is None
    assert isinstance(first.image, bytes) and first.image == base64.b64decode(RED) and third.image == first.image
    assert second.image == tmp_path / "images" / "blue.png" and second.question == 'Is it "dark"?\nThink.'
    assert third.category is None and third.hint is None
    assert build_prompt(second, second.options, INSTRUCTIONS["en"]) == (
        'Look closely.\nIs it "dark"?\nThink.\nA. yes\nB. no\nAnswer with the option\'s letter from the given '
        "choices directly."
    )

    bad = tmp_path / "bad.tsv"
    write_tsv(bad, [{"index": "1", "question": "q", "A": "x", "B": "", "C": "z", "answer": "A", "image": RED}])
    with pytest.raises(DataError, match=r"bad.tsv:2 \(index '1'\): options must fill A, B, ... without gaps"):
        read_mmbench_tsv(bad)
    write_tsv(bad, [{"index": "1", "question": "q", "A": "x", "B": "y", "answer": "C", "image": RED}])
    with pytest.raises(DataError, match="`answer` must be one of the option letters AB, got 'C'"):
        read_mmbench_tsv(bad)
    write_tsv(bad, [{"index": "1", "question": "q", "A": "x", "B": "y", "answer": "A", "image": "cat.jpg"}])
    with pytest.raises(DataError, match="'cat.jpg' is neither a file in the images folder"):
        read_mmbench_tsv(bad)
    write_tsv(bad, [{"index": "1", "question": "q", "answer": "A"}], columns=("index", "question", "answer"))
    with pytest.raises(DataError, match="no column A, B, image"):
        read_mmbench_tsv(bad)


def test_evaluate_mmbench_with_a_tiny_model(tiny, tmp_path):
    model, processor = tiny()
    write_tsv(tmp_path / "mmbench.tsv", [
        {"index": "1", "question": "What colour is it?", "A": "red", "B": "blue", "C": "green", "answer": "A",
         "category": "colour", "image": RED},
        {"index": "2", "question": "这是什么颜色？", "hint": "看图。", "A": "红色", "B": "蓝色", "answer": "B",
         "category": "colour", "image": BLUE},
    ])  # fmt: skip
    results, rows = evaluate_mmbench(model, processor, tmp_path / "mmbench.tsv", "zh", batch_size=2, max_new_tokens=3)
    zh = results["languages"]["zh"]
    assert (zh["questions"], zh["answers"], zh["circular"]) == (2, 5, True)
    assert results["instruction"] == {"zh": "请直接回答选项字母。"}
    assert [len(r["rotations"]) for r in rows] == [3, 2]
    assert all(isinstance(a["output"], str) for r in rows for a in r["rotations"])
    assert zh["unparsed"] == sum(a["predicted"] is None for r in rows for a in r["rotations"])
    assert zh["accuracy"] == sum(r["correct"] for r in rows) / 2
    assert rows[1]["prompt"].startswith("看图。\n这是什么颜色？\nA. 红色\nB. 蓝色\n请直接回答")
    with pytest.raises(ConfigError, match="'cn' is 'zh' here"):
        evaluate_mmbench(model, processor, tmp_path / "mmbench.tsv", "cn")
