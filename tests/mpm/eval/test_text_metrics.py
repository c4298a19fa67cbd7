"""Languages, tokenizers, caption/answer metrics and language fidelity of `mpm eval`, on inline multilingual fixtures."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from dataproc.langid import LID176_LANGUAGES, LanguageIdentifier
from mpm.core.errors import ConfigError, DataError
from mpm.eval.fidelity import fidelity
from mpm.eval.languages import (
    LANGUAGES,
    check_prompts,
    is_raw,
    language,
    parse_langs,
    prompt_table,
)
from mpm.eval.metrics import bleu4, cider_d
from mpm.eval.scorers import SCORERS
from mpm.eval.text import ptb_tokenize, tokenize, tokenize_many, tokenizer_for

XM3600 = "ar bn cs da de el en es fa fi fil fr he hi hr hu id it ja ko mi nl no pl pt quz ro ru sv sw te th tr uk vi zh"


# ---------------------------------------------------------------------------------------------------------------------
# The language table and prompts


def test_table_covers_crossmodal_3600_with_valid_lid_labels():
    assert set(XM3600.split()) <= set(LANGUAGES)
    for code, lang in LANGUAGES.items():
        assert lang.code == code and lang.name and lang.prompt.strip()
        assert lang.tokenizer in ("chars", "words")
        assert lang.lid_labels <= LID176_LANGUAGES, f"{code}: labels lid.176 does not have"
        assert not is_raw(lang.prompt)
    assert {c for c, lang in LANGUAGES.items() if lang.tokenizer == "chars"} == {"zh", "ja", "th"}
    # lid.176 spells Filipino tl and Quechua qu, and has no Maori
    assert LANGUAGES["fil"].lid_labels == {"tl"}
    assert LANGUAGES["quz"].lid_labels == {"qu"}
    assert LANGUAGES["mi"].lid_labels == frozenset()
    assert [c for c in XM3600.split() if not LANGUAGES[c].lid_labels] == ["mi"]


def test_every_shipped_prompt_is_identified_as_its_own_language():
    identify = LanguageIdentifier()
    wrong = {}
    for code, lang in LANGUAGES.items():
        if not lang.lid_labels:
            continue  # not measurable (Maori)
        prediction = identify(lang.prompt)
        if prediction.lang not in lang.lid_labels or fidelity([lang.prompt], code).passed != [True]:
            wrong[code] = prediction
    assert not wrong, f"prompts lid.176 labels as another language: {wrong}"


def test_language_lookup_and_parse_langs():
    assert language("zh").name == "Chinese"
    assert parse_langs(" en, zh ,de,en") == ["en", "zh", "de"]
    with pytest.raises(ConfigError, match=r"'xx'.*known: ar, bn"):
        parse_langs("en,xx")
    with pytest.raises(ConfigError, match="unknown language code 'klingon'"):
        language("klingon")
    with pytest.raises(ConfigError, match="no language given"):
        parse_langs(" , ")


def test_prompt_table_reads_yaml_and_json_overrides(tmp_path):
    shipped = prompt_table(None)
    assert shipped["zh"] == "用中文简要描述这张图片。" and len(shipped) == len(LANGUAGES)
    # YAML 1.1 would read the key `no` (Norwegian) as False
    (tmp_path / "p.yaml").write_text("no: Beskriv bildet kort på norsk.\nde: '<image>Ein Foto von'\n", encoding="utf-8")
    table = prompt_table(str(tmp_path / "p.yaml"))
    assert table["no"] == "Beskriv bildet kort på norsk."
    assert is_raw(table["de"]) and not is_raw(table["en"])
    assert table["zh"] == shipped["zh"]  # untouched languages keep the shipped prompt
    (tmp_path / "p.json").write_text(json.dumps({"zh": "请描述图片。"}, ensure_ascii=False), encoding="utf-8")
    assert prompt_table(str(tmp_path / "p.json"))["zh"] == "请描述图片。"
    check_prompts(table, ["no", "de", "zh"])


def test_prompt_table_errors_name_file_and_entry(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("xx: hello\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown language code 'xx'"):
        prompt_table(str(bad))
    bad.write_text("de: 3\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.yaml: the prompt for 'de' must be a non-empty string"):
        prompt_table(str(bad))
    bad.write_text("- de\n", encoding="utf-8")
    with pytest.raises(DataError, match="expected a mapping"):
        prompt_table(str(bad))
    bad.write_text("de: [unclosed\n", encoding="utf-8")
    with pytest.raises(DataError, match="not valid YAML"):
        prompt_table(str(bad))
    with pytest.raises(DataError, match="cannot be read"):
        prompt_table(str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match=r"\.yaml, \.yml or \.json"):
        prompt_table(str(tmp_path / "prompts.txt"))
    with pytest.raises(ConfigError, match="no caption prompt for language 'zh'"):
        check_prompts({"en": "Describe."}, ["en", "zh"])


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers


def test_chars_tokenizer_zh_ja_th():
    # Han characters one by one; the Latin/digit run stays one lower-cased word; punctuation dropped
    assert tokenize("我的iPhone 15很好，两只猫。", "zh") == ["我", "的", "iphone", "15", "很", "好", "两", "只", "猫"]
    # kana and kanji one by one; NFKC turns full-width ＡＢＣ１２ and half-width ｶﾀｶﾅ into their usual forms
    assert tokenize("犬が浜辺を走っている。ＡＢＣ１２ ｶﾀｶﾅ", "ja") == [
        "犬", "が", "浜", "辺", "を", "走", "っ", "て", "い", "る", "abc12", "カ", "タ", "カ", "ナ",
    ]  # fmt: skip
    # Thai vowel and tone marks (combining) stay on their consonant
    assert tokenize("สุนัขวิ่ง 2 ตัว", "th") == ["สุ", "นั", "ข", "วิ่", "ง", "2", "ตั", "ว"]


def test_words_tokenizer_de_and_others():
    assert tokenize("Ein Hund läuft am Strand, „schnell“! T-Shirt", "de") == [
        "ein", "hund", "läuft", "am", "strand", "schnell", "t", "shirt",
    ]  # fmt: skip
    assert tokenize("Собака бежит по пляжу.", "ru") == ["собака", "бежит", "по", "пляжу"]
    assert tokenize("كلب يركض على الشاطئ.", "ar") == ["كلب", "يركض", "على", "الشاطئ"]
    assert tokenize("", "de") == [] and tokenize("...", "zh") == []


def test_jieba_tokenizer_for_chinese():
    assert tokenize("一只狗在海滩上奔跑，旁边有两个人。", "zh", "jieba") == [
        "一只", "狗", "在", "海滩", "上", "奔跑", "旁边", "有", "两个", "人",
    ]  # fmt: skip
    assert tokenizer_for("zh", "zh:jieba,en:ptb") == "jieba"
    assert tokenizer_for("de", "zh:jieba") == "words"
    assert tokenizer_for("zh", None) == "chars"


def test_tokenizer_overrides_are_checked():
    with pytest.raises(ConfigError, match="unknown tokenizer 'spacy'"):
        tokenizer_for("zh", "spacy")
    with pytest.raises(ConfigError, match=r"'jieba' is made for Chinese \(zh\) only, not for 'de'.*'zh:jieba'"):
        tokenize("Ein Hund", "de", "jieba")
    with pytest.raises(ConfigError, match="unknown language code 'xx'"):
        tokenizer_for("zh", "xx:chars")
    with pytest.raises(ConfigError, match="LANG:NAME"):
        tokenizer_for("zh", "zh:")
    with pytest.raises(ConfigError, match="unknown tokenizer"):
        SCORERS["cider"](tokenizer="zh:spacy")  # a typo fails when the scorer is built


# ---------------------------------------------------------------------------------------------------------------------
# CIDEr-D and BLEU against the libraries called directly

# (output, references) per language; reference counts differ between items on purpose
CAPTIONS = {
    "zh": [
        ("一只黑狗在海滩上奔跑。", ["一只黑色的狗在沙滩上跑。", "海滩上有一只狗在奔跑。", "狗在海边跑"]),
        ("桌子上有一碗水果。", ["桌上放着一碗水果。", "一碗苹果和香蕉放在木桌上。"]),
        ("两个人在公园里散步。", ["两个人走在公园的小路上。"]),
    ],
    "ja": [
        ("黒い犬が浜辺を走っている。", ["黒い犬が砂浜を走っている。", "海辺で犬が走っています。"]),
        ("テーブルの上に果物がある。", ["テーブルに果物の入ったボウルがある。"]),
        ("二人が公園を歩いている。", ["公園を散歩する二人。", "二人の人が公園の道を歩いている。", "公園の人々"]),
    ],
    "th": [
        ("สุนัขสีดำวิ่งบนชายหาด", ["สุนัขสีดำกำลังวิ่งบนชายหาด", "หมาวิ่งเล่นที่ทะเล"]),
        ("ผลไม้ในชามบนโต๊ะ", ["ชามผลไม้วางอยู่บนโต๊ะไม้"]),
        ("คนสองคนเดินในสวน", ["คนสองคนเดินเล่นในสวนสาธารณะ", "สองคนเดินบนทางเดินในสวน"]),
    ],
    "de": [
        ("Ein schwarzer Hund rennt am Strand.", ["Ein schwarzer Hund läuft am Strand.", "Ein Hund rennt am Meer."]),
        ("Eine Schüssel Obst auf dem Tisch.", ["Auf dem Holztisch steht eine Schüssel mit Obst."]),
        (
            "Zwei Menschen gehen im Park spazieren.",
            ["Zwei Leute spazieren durch den Park.", "Zwei Personen im Park.", "Menschen gehen auf einem Weg im Park."],
        ),  # fmt: skip
    ],
}


def _tokenized(lang: str) -> tuple[list[list[str]], list[list[list[str]]]]:
    candidates = [tokenize(out, lang) for out, _ in CAPTIONS[lang]]
    references = [[tokenize(r, lang) for r in refs] for _, refs in CAPTIONS[lang]]
    return candidates, references


@pytest.mark.parametrize("lang", sorted(CAPTIONS))
def test_cider_d_equals_pycocoevalcap(lang):
    from pycocoevalcap.cider.cider import Cider

    candidates, references = _tokenized(lang)
    score, per_item = cider_d(candidates, references)
    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(c)] for i, c in enumerate(candidates)}
    expected, expected_items = Cider().compute_score(gts, res)
    assert score == pytest.approx(float(expected), abs=1e-12)
    assert per_item == pytest.approx([float(s) for s in expected_items], abs=1e-12)
    assert score > 0.1  # segmented: the captions share n-grams (whitespace-split zh/ja/th would share none)
    if lang != "de":
        whole = [[[" ".join(r.split())] for r in refs] for _, refs in CAPTIONS[lang]]
        assert cider_d([[out] for out, _ in CAPTIONS[lang]], whole)[0] == 0.0  # why segmentation matters


@pytest.mark.parametrize("lang", sorted(CAPTIONS))
def test_bleu4_equals_sacrebleu_with_variable_reference_counts(lang):
    import sacrebleu
    from sacrebleu.metrics import BLEU

    candidates, references = _tokenized(lang)
    corpus, per_item = bleu4(candidates, references)
    hyps = [" ".join(c) for c in candidates]
    refs = [[" ".join(r) for r in item] for item in references]
    # corpus BLEU by definition: every item's statistics against its OWN references, summed, then one BLEU
    stats = [BLEU(tokenize="none", force=True).sentence_score(h, r) for h, r in zip(hyps, refs)]
    summed = BLEU.compute_bleu(
        correct=[sum(s.counts[n] for s in stats) for n in range(4)],
        total=[sum(s.totals[n] for s in stats) for n in range(4)],
        sys_len=sum(s.sys_len for s in stats),
        ref_len=sum(s.ref_len for s in stats),
        smooth_method="exp",
    )
    assert corpus == pytest.approx(summed.score, abs=1e-9)
    assert 0 < corpus <= 100
    # per item: sacrebleu's sentence_bleu defaults (exp smoothing, effective order)
    expected = [sacrebleu.sentence_bleu(h, r, tokenize="none").score for h, r in zip(hyps, refs)]
    assert per_item == pytest.approx(expected, abs=1e-9)


def test_bleu4_padding_with_empty_string_would_change_the_score():
    # one item with 2 references, one with 1: padding with "" adds a length-0 reference, which can become the
    # "closest" reference length and remove the brevity penalty; None padding (ours) leaves the item's refs alone
    from sacrebleu.metrics import BLEU

    candidates = [["a", "b", "c", "d", "e"], ["a"]]
    references = [[["a", "b", "c", "d", "e"], ["a", "b"]], [["a", "b", "c", "d", "e", "f"]]]
    ours, _ = bleu4(candidates, references)
    hyps, padded = ["a b c d e", "a"], [["a b c d e", "a b c d e f"], ["a b", ""]]
    with_empty = BLEU(tokenize="none", force=True).corpus_score(hyps, padded).score
    assert ours != pytest.approx(with_empty)


def test_cider_and_bleu_scorers_record_tokenizer_and_versions():
    items = [{"output": out, "references": refs, "lang": "zh"} for out, refs in CAPTIONS["zh"]]
    cider = SCORERS["cider"]().score(items, "zh")
    candidates, references = _tokenized("zh")
    assert cider.values["cider"] == pytest.approx(cider_d(candidates, references)[0])
    assert cider.details["tokenizer"] == {"zh": "chars"}
    assert cider.details["versions"]["pycocoevalcap"] == "1.2"
    jieba_run = SCORERS["bleu4"](tokenizer="zh:jieba").score(items, "zh")
    assert jieba_run.details["tokenizer"] == {"zh": "jieba"} and "jieba" in jieba_run.details["versions"]
    assert jieba_run.details["versions"]["sacrebleu"].startswith("2.")
    assert len(jieba_run.per_item) == 3


@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer needs Java")
def test_ptb_reproduces_the_coco_pipeline():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer import ptbtokenizer
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if not os.access(os.path.dirname(ptbtokenizer.__file__), os.W_OK):
        pytest.skip("pycocoevalcap's PTBTokenizer writes into its package folder, which is read-only here")
    data = [
        ("A black dog running on the beach.", ["A black dog runs along the beach.", "A dog is running by the sea."]),
        ("A bowl of fruit on a wooden table", ["A bowl of apples and bananas sits on the table.", "Fruit in a bowl."]),
        ("Two people walking in the park!", ["Two people take a walk in the park.", "A couple's walk, in a park."]),
    ]
    # COCO: PTBTokenizer on {image: [{"caption": ...}]}, then Cider on the tokenized strings
    gts = PTBTokenizer().tokenize({i: [{"caption": r} for r in refs] for i, (_, refs) in enumerate(data)})
    res = PTBTokenizer().tokenize({i: [{"caption": out}] for i, (out, _) in enumerate(data)})
    expected, _ = Cider().compute_score(gts, res)

    items = [{"output": out, "references": refs, "lang": "en"} for out, refs in data]
    scores = SCORERS["cider"](tokenizer="en:ptb").score(items, "en")
    assert scores.values["cider"] == pytest.approx(float(expected), abs=1e-12)
    assert scores.details["tokenizer"] == {"en": "ptb"}
    assert ptb_tokenize(["A couple's walk, in a park.", "", "  "]) == [
        ["a", "couple", "'s", "walk", "in", "a", "park"],
        [],
        [],
    ]


# ---------------------------------------------------------------------------------------------------------------------
# VQA accuracy and exact match


def _vqa(output: str, answers: list[str], lang: str = "en") -> float:
    return (
        SCORERS["vqa_accuracy"]()
        .score([{"output": output, "references": answers, "lang": lang}], lang)
        .values["vqa_accuracy"]
    )


def test_vqa_accuracy_leave_one_out_by_hand():
    # 10 annotators, k of them answered "two" (normalised to "2"). Leaving out one annotator at a time:
    #   k=4: out of a "two" annotator (4 subsets) -> 3 matches -> 1; out of another (6) -> 4 -> 1     => 1.0
    #   k=3: 3 subsets with 2 matches -> 2/3; 7 subsets with 3 -> 1         => (3*2/3 + 7*1)/10 = 0.9
    #   k=2: 2 subsets with 1 match -> 1/3; 8 subsets with 2 -> 2/3         => (2/3 + 16/3)/10  = 0.6
    #   k=1: 1 subset with 0 matches; 9 subsets with 1 -> 1/3               => (9/3)/10         = 0.3
    for k, expected in [(4, 1.0), (3, 0.9), (2, 0.6), (1, 0.3), (0, 0.0)]:
        answers = ["two"] * k + ["three"] * (10 - k)
        assert _vqa("two", answers) == pytest.approx(expected), k
    # the official normalisation: number words, articles, punctuation, case
    assert _vqa("Two.", ["2"] * 10) == 1.0
    assert _vqa("The red car", ["red car"] * 3 + ["blue car"] * 7) == pytest.approx(0.9)
    assert _vqa("", ["yes"] * 10) == 0.0  # an empty output scores 0, never crashes
    with pytest.raises(ConfigError, match=r"item 0 of language 'en' has 1.*exact_match"):
        _vqa("yes", ["yes"])


def test_exact_match_normalises_per_language():
    def em(output, refs, lang):
        items = [{"output": output, "references": refs, "lang": lang}]
        return SCORERS["exact_match"]().score(items, lang).values["exact_match"]

    assert em("Two", ["2", "3"], "en") == 1.0
    assert em("the dog.", ["Dog"], "en") == 1.0
    assert em("两 只。", ["两只"], "zh") == 1.0  # characters: spacing and punctuation do not matter
    assert em("Ein Hund!", ["ein hund"], "de") == 1.0
    assert em("Zwei Hunde", ["ein hund"], "de") == 0.0
    assert em("", ["ein hund"], "de") == 0.0
    assert em(None, ["ein hund"], "de") == 0.0


def test_scorers_refuse_items_without_references():
    for name in ("cider", "bleu4", "vqa_accuracy", "exact_match"):
        with pytest.raises(ConfigError, match=r"item 'q7' of language 'de' has none"):
            SCORERS[name]().score([{"id": "q7", "output": "Ein Hund", "references": [], "lang": "de"}], "de")


# ---------------------------------------------------------------------------------------------------------------------
# Language fidelity

# one caption per language, in Latin, Cyrillic, Arabic, Hebrew, Greek, Devanagari, Han, kana, Hangul and Thai scripts
IN_LANGUAGE = {
    "en": "A small dog is running on the beach.",
    "de": "Ein kleiner Hund läuft am Strand.",
    "fr": "Un petit chien court sur la plage.",
    "ru": "Собака бежит по пляжу.",
    "uk": "Маленька собака біжить по пляжу.",
    "ar": "كلب صغير يركض على الشاطئ",
    "he": "כלב קטן רץ על החוף",
    "el": "Ένας μικρός σκύλος τρέχει στην παραλία",
    "hi": "एक छोटा कुत्ता समुद्र तट पर दौड़ रहा है",
    "zh": "一只狗在海滩上奔跑。",
    "ja": "犬が浜辺を走っている。",
    "ko": "작은 개가 해변에서 달리고 있다",
    "th": "สุนัขตัวเล็กวิ่งอยู่บนชายหาด",
}


def test_fidelity_passes_in_language_captions():
    for lang, caption in IN_LANGUAGE.items():
        result = fidelity([caption], lang)
        assert result.passed == [True], (lang, result.detected)
        assert result.pass_rate == 1.0 and result.strict_pass_rate == 1.0 and result.measurable


def test_fidelity_fails_wrong_language_and_mixed_lines():
    result = fidelity(
        [
            IN_LANGUAGE["zh"],
            IN_LANGUAGE["en"],  # English for a Chinese request
            IN_LANGUAGE["zh"] + "\n" + IN_LANGUAGE["en"],  # switches to English on its second line
            IN_LANGUAGE["ja"],  # Japanese (kana) for a Chinese request
            "猫。",  # too short to judge
        ],
        "zh",
    )
    assert result.passed == [True, False, False, False, None]
    assert (result.judged, result.too_short, result.wrong) == (4, 1, 3)
    assert result.pass_rate == pytest.approx(1 / 4)  # passes / judged
    assert result.strict_pass_rate == pytest.approx(1 / 5)  # passes / all: too short never passes
    assert result.detected == {"en": 2, "ja": 1}
    assert result.to_dict()["detected"] == {"en": 2, "ja": 1}


def test_fidelity_short_lines_are_not_judged_but_long_ones_are():
    # a short English line inside a German answer is not judged (under 3 words); the German line decides
    assert fidelity(["Ein kleiner Hund läuft am Strand.\nNice dog"], "de").passed == [True]
    result = fidelity(["", "   \n  ", "Hund", "一只狗", "A dog"], "zh")
    assert result.passed == [None] * 5 and result.too_short == 5
    assert result.pass_rate is None and result.strict_pass_rate == 0.0
    # the thresholds are parameters: with min_words=2, "Ein Hund" is judged (and is German, not Chinese)
    assert fidelity(["Ein Hund"], "zh", min_words=2).passed == [False]


def test_fidelity_wrong_script():
    # Russian requested, transliterated into Latin script; Hindi requested, answered in Urdu (Arabic script)
    assert fidelity(["Sobaka bezhit po plyazhu u morya"], "ru").passed == [False]
    result = fidelity(["ایک کتا ساحل پر دوڑ رہا ہے"], "hi")
    assert result.passed == [False] and result.detected == {"ur": 1}


def test_fidelity_not_measurable_and_confidence_threshold():
    result = fidelity(["He kurī e oma ana i te one."], "mi")  # lid.176 has no Maori
    assert not result.measurable and result.passed == [None] and result.pass_rate is None
    assert result.to_dict()["measurable"] is False
    # LCB's rule: a line whose top probability is at most the threshold is "unknown" and fails
    assert fidelity([IN_LANGUAGE["en"]], "en", min_confidence=0.3).passed == [True]
    result = fidelity([IN_LANGUAGE["en"]], "en", min_confidence=0.99)
    assert result.passed == [False] and result.detected == {"unknown": 1}
    assert fidelity([], "en").pass_rate is None


def test_empty_and_missing_outputs_score_zero():
    items = [
        {"output": "", "references": ["一只狗在海滩上奔跑。"], "lang": "zh"},
        {"output": None, "references": ["桌子上有一碗水果。"], "lang": "zh"},
        {"output": "一只狗在海滩上奔跑。", "references": ["一只狗在海滩上奔跑。"], "lang": "zh"},
    ]
    for name in ("cider", "bleu4"):
        scores = SCORERS[name]().score(items, "zh")
        assert scores.per_item[:2] == [0.0, 0.0], name
    assert tokenize_many(["", "   "], "th") == [[], []]
    # references with no token at all leave CIDEr's idf undefined: a clear error instead of numpy's
    with pytest.raises(DataError, match="every reference is empty after tokenization"):
        cider_d([["a"], ["b"]], [[[]], [[]]])
