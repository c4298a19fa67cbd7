import pytest

from dataproc.langid import LID176_LANGUAGES, LanguageIdentifier

# Inline multilingual fixtures (Latin, CJK, Cyrillic, Arabic, Devanagari, Thai).
SAMPLES = {
    "en": "Two dogs are playing in the snow near a red house.",
    "de": "Zwei Hunde spielen im Schnee neben einem roten Haus.",
    "zh": "一只猫坐在红色的垫子上。",  # lid.176.ftz calls some Chinese sentences yue (Cantonese)
    "ja": "赤い家の近くで二匹の犬が雪の中で遊んでいる。",
    "ru": "Две собаки играют в снегу возле красного дома.",
    "ar": "كلبان يلعبان في الثلج بالقرب من منزل أحمر.",
    "hi": "दो कुत्ते लाल घर के पास बर्फ में खेल रहे हैं।",
    "th": "สุนัขสองตัวกำลังเล่นหิมะใกล้บ้านสีแดง",
}


@pytest.fixture(scope="module")
def identify():
    return LanguageIdentifier()


@pytest.mark.parametrize("lang", sorted(SAMPLES))
def test_identifies_scripts_and_languages(identify, lang):
    prediction = identify(SAMPLES[lang])
    assert prediction.lang == lang
    assert 0.5 < prediction.score <= 1.0


def test_newlines_and_empty_text(identify):
    assert identify("A cat on a mat.\nIt is sleeping.").lang == "en"
    assert identify("   \n ").lang == "und"


def test_label_list_matches_model(identify):
    model = identify._model
    seen = set()
    for text in [*SAMPLES.values(), "x", ""]:
        labels, _ = model.predict(" ".join(text.split()), k=176, threshold=0.0)
        seen |= {label.removeprefix("__label__") for label in labels}
    assert len(LID176_LANGUAGES) == 176
    assert seen <= LID176_LANGUAGES
