"""ONE tokenizer per language for CIDEr and BLEU, chosen by name and recorded with every score.

Why fixed and recorded: pycocoevalcap's CIDEr splits on whitespace, so unsegmented Chinese, Japanese or Thai becomes
one "word" per sentence and CIDEr collapses to ~0; and the segmenter choice alone moves scores about 2x (CIDEr zh 0.65
with characters vs 0.38 with jieba on the same outputs, multicaptioneval; AI Challenger 2017 saw 0.7 vs 1.7 with
jieba vs thulac). Scores are only comparable under the same tokenizer, applied to references and outputs alike, so
each language has one default (mpm.eval.languages) and a run may override it by name; the name goes into the
results.

Tokenizers (all but "ptb" start with NFKC, so full-width "Ａ１" and half-width katakana match their usual forms):
    words   lower-cased; every Unicode punctuation character (categories P*) replaced by a space; split on
            whitespace. "T-shirt" -> ["t", "shirt"], "l'homme" -> ["l", "homme"]. For space-delimited scripts.
    chars   for scripts written without spaces (Han, kana, Thai, Lao, Khmer, Myanmar, ...): each character of those
            scripts is one token, carrying its combining marks (Thai vowel and tone marks stay on their consonant);
            runs of letters and digits of other scripts (Latin, digits, Cyrillic, Hangul) stay ONE lower-cased
            word, so "我的iPhone 15很好" -> [我, 的, iphone, 15, 很, 好]; punctuation and whitespace separate and are
            dropped; any other symbol ("+", "°") is a token of its own. The default for zh, ja, th (as mBLIP and
            multicaptioneval score Chinese and Thai).
    jieba   Chinese words by jieba.lcut (default dictionary), lower-cased, punctuation dropped. An option for zh.
    ptb     English: the Stanford PTB tokenizer as the COCO caption evaluation runs it (pycocoevalcap's jar,
            `-preserveLines -lowerCase`, then its punctuation list removed). Needs Java; one Java process per
            batch (`ptb_tokenize`), because a process per caption takes ~0.2 s each. An option for en.

A run's override is a spec: "jieba" (every language of the run; a tokenizer made for one language refuses the
others) or "zh:jieba,en:ptb" (just those languages).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import unicodedata
from collections.abc import Callable

from mpm.core.errors import ConfigError
from mpm.eval.languages import language

# Scripts written without spaces between words, by the prefix of their Unicode character names ("CJK UNIFIED
# IDEOGRAPH-4E00", "HIRAGANA LETTER A", "KATAKANA-HIRAGANA PROLONGED SOUND MARK", "IDEOGRAPHIC ITERATION MARK",
# "THAI CHARACTER KO KAI", ...).
UNSEGMENTED_SCRIPTS = ("CJK ", "IDEOGRAPHIC", "HIRAGANA", "KATAKANA", "BOPOMOFO", "THAI", "LAO", "KHMER", "MYANMAR",
                       "TIBETAN")  # fmt: skip

# Tokenizers made for one language; "chars" and "words" apply to any.
TOKENIZER_LANGUAGES = {"jieba": "zh", "ptb": "en"}
TOKENIZERS = ("chars", "words", "jieba", "ptb")


@functools.lru_cache(maxsize=65_536)
def is_unsegmented(ch: str) -> bool:
    """True for a character of a script written without spaces between words (Han, kana, Thai, ...)."""
    return unicodedata.name(ch, "").startswith(UNSEGMENTED_SCRIPTS)


def is_punctuation(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P")


@functools.cache
def _punctuation_to_space() -> dict[int, str]:
    """str.translate's table: every Unicode punctuation character (category P*) -> a space (built once, 0.3 s)."""
    return {cp: " " for cp in range(sys.maxunicode + 1) if unicodedata.category(chr(cp)).startswith("P")}


def strip_punctuation(text: str) -> str:
    """Every Unicode punctuation character replaced by a space."""
    return text.translate(_punctuation_to_space())


def words_tokenize(text: str) -> list[str]:
    return strip_punctuation(unicodedata.normalize("NFKC", text).lower()).split()


def chars_tokenize(text: str) -> list[str]:
    text = unicodedata.normalize("NFKC", text).lower()
    tokens: list[str] = []
    run: list[str] = []  # the current word of a space-delimited script (Latin letters, digits, ...)
    mark_target = False  # may a combining mark attach to tokens[-1]? (only right after a single-character token)
    for ch in text:
        category = unicodedata.category(ch)
        if ch.isspace() or category[0] == "P":
            if run:
                tokens.append("".join(run))
                run = []
            mark_target = False
        elif category[0] == "M":  # a combining mark belongs to the character before it
            if run:
                run.append(ch)
            elif mark_target:
                tokens[-1] += ch
            else:
                tokens.append(ch)  # a stray mark after a space: its own token rather than silently dropped
        elif category[0] in "LN" and not is_unsegmented(ch):
            run.append(ch)
            mark_target = False
        else:  # a character of an unsegmented script, or a symbol
            if run:
                tokens.append("".join(run))
                run = []
            tokens.append(ch)
            mark_target = True
    if run:
        tokens.append("".join(run))
    return tokens


@functools.cache
def _jieba():
    try:
        import jieba
    except ImportError:
        raise ConfigError("tokenizer 'jieba' needs jieba: pip install jieba (or pip install -e '.[eval]')") from None
    jieba.setLogLevel(logging.WARNING)  # it prints "Building prefix dict..." to stderr at first use otherwise
    return jieba


def jieba_tokenize(text: str) -> list[str]:
    text = unicodedata.normalize("NFKC", text).lower()
    return [word for token in _jieba().lcut(text) for word in strip_punctuation(token).split()]


def _ptb_jar() -> tuple[str, list[str]]:
    try:
        from pycocoevalcap.tokenizer import ptbtokenizer
    except ImportError:
        raise ConfigError(
            "tokenizer 'ptb' needs pycocoevalcap: pip install pycocoevalcap (or pip install -e '.[eval]')"
        ) from None
    folder = os.path.dirname(os.path.abspath(ptbtokenizer.__file__))
    return os.path.join(folder, ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR), ptbtokenizer.PUNCTUATIONS


def ptb_tokenize(texts: list[str]) -> list[list[str]]:
    """COCO's English tokenization of every text, in one Java process.

    The same command and punctuation list as pycocoevalcap's PTBTokenizer, but the input file goes to the system
    temp folder (pycocoevalcap writes it into its own package folder, which may be read-only) and blank texts
    skip Java.
    """
    java = shutil.which("java")
    if java is None:
        raise ConfigError(
            "tokenizer 'ptb' runs the Stanford PTB tokenizer, which needs Java on PATH (e.g. apt-get install "
            "default-jre-headless); or score English with tokenizer 'words'"
        )
    jar, punctuation = _ptb_jar()
    drop = set(punctuation)
    # PTB reads one caption per line (-preserveLines); any line break inside a caption would shift every later one
    lines = [" ".join(text.split()) for text in texts]
    todo = [i for i, line in enumerate(lines) if line]
    out: list[list[str]] = [[] for _ in texts]
    if not todo:
        return out
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as f:
        f.write("\n".join(lines[i] for i in todo) + "\n")
        path = f.name
    try:
        cmd = [java, "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", path]
        done = subprocess.run(cmd, capture_output=True, check=False)
    finally:
        os.remove(path)
    if done.returncode != 0:
        raise RuntimeError(f"the PTB tokenizer failed ({' '.join(cmd)}): {done.stderr.decode(errors='replace')[-500:]}")
    result = done.stdout.decode("utf-8").split("\n")
    if len(result) < len(todo):
        raise RuntimeError(f"the PTB tokenizer returned {len(result)} lines for {len(todo)} captions")
    for i, line in zip(todo, result):
        out[i] = [token for token in line.rstrip().split(" ") if token and token not in drop]
    return out


_SIMPLE: dict[str, Callable[[str], list[str]]] = {
    "chars": chars_tokenize,
    "words": words_tokenize,
    "jieba": jieba_tokenize,
}


def parse_tokenizer_spec(spec: str | dict | None) -> dict[str, str] | str | None:
    """A run's override: None, one tokenizer name for every language, or {lang: name} ("zh:jieba,en:ptb" or a
    mapping from a config file). Names and language codes are checked here, before any model runs."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, str) and ":" not in spec and "=" not in spec:
        _check_name(spec.strip())
        return spec.strip()
    if isinstance(spec, str):
        pairs = {}
        for part in spec.split(","):
            lang, sep, name = part.replace("=", ":").partition(":")
            if not sep or not lang.strip() or not name.strip():
                raise ConfigError(
                    f"tokenizer {spec!r}: write one name (e.g. 'jieba') or LANG:NAME pairs, e.g. 'zh:jieba,en:ptb'"
                )
            pairs[lang.strip()] = name.strip()
        spec = pairs
    if not isinstance(spec, dict):
        raise ConfigError(f"tokenizer: expected a name or a mapping of language -> name, got {spec!r}")
    for lang, name in spec.items():
        language(lang)
        _check_name(name)
        _check_pair(lang, name)
    return dict(spec)


def _check_name(name: str) -> None:
    if name not in TOKENIZERS:
        raise ConfigError(f"unknown tokenizer {name!r}; known: {', '.join(TOKENIZERS)}")


def _check_pair(lang: str, name: str) -> None:
    only = TOKENIZER_LANGUAGES.get(name)
    if only is not None and lang != only:
        raise ConfigError(
            f"tokenizer {name!r} is made for {language(only).name} ({only}) only, not for {lang!r}; set it for that "
            f"language alone with '{only}:{name}'"
        )


def tokenizer_for(lang: str, override: str | dict | None = None) -> str:
    """The tokenizer name for `lang`: the override (a spec, see `parse_tokenizer_spec`) or the language's default."""
    default = language(lang).tokenizer
    spec = parse_tokenizer_spec(override)
    if spec is None:
        return default
    name = spec if isinstance(spec, str) else spec.get(lang, default)
    _check_pair(lang, name)
    return name


def tokenize(text: str, lang: str, tokenizer: str | None = None) -> list[str]:
    """Tokens of one text (`tokenizer` None: the language's default). For many texts use `tokenize_many`."""
    return tokenize_many([text], lang, tokenizer)[0]


def tokenize_many(texts: list[str], lang: str, tokenizer: str | None = None) -> list[list[str]]:
    """Tokens of every text with one tokenizer (one Java process for "ptb")."""
    name = tokenizer_for(lang, tokenizer)
    if name == "ptb":
        return ptb_tokenize(texts)
    return [list(_tokens(name, text)) for text in texts]


@functools.lru_cache(maxsize=1_000_000)
def _tokens(name: str, text: str) -> tuple[str, ...]:
    """One text's tokens, remembered: CIDEr, BLEU and the in-language scores tokenize the same references and
    outputs several times (at XM3600 scale: 390,000 texts, 12 s a pass)."""
    return tuple(_SIMPLE[name](text))
