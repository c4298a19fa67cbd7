"""Caption and answer metrics, and the text scorers `mpm eval` finds by name: cider, bleu4, vqa_accuracy, exact_match.

CIDEr-D (Vedantam et al. 2015, https://arxiv.org/abs/1411.5726) is pycocoevalcap's `Cider`, called on tokens we
segmented (mpm/eval/text.py) and joined by spaces, because its own split is on whitespace. Its `Cider` IS CIDEr-D,
as COCO reports it (read from pycocoevalcap/cider/cider_scorer.py): n-grams 1-4, tf-idf vectors, hypothesis counts
clipped by the reference's (`min(vec_hyp, vec_ref)`), a Gaussian length penalty exp(-(len_hyp - len_ref)^2 / 2*6^2),
the mean over n and over references, times 10 (0-10 scale, 1.0 = "100" in papers that print x100). The idf comes
from the references of the set being scored, so a score depends on the set's size and mix: with one image every
idf is 0 and so is CIDEr. Compare CIDEr only on the same test set.

BLEU-4 is sacrebleu's, with tokenize="none" on the same space-joined tokens (so BLEU sees the tokens CIDEr sees):
    corpus  `BLEU.corpus_score` as sacrebleu's defaults have it (smoothing "exp", which only acts when some n-gram
            order has no match in the whole set), 0-100.
    item    sentence BLEU as sacrebleu's `sentence_bleu` defaults have it: smoothing "exp" (mteval-v13a's NIST
            smoothing: the k-th n-gram order without a match counts 1 / 2^k matches) and effective order (orders
            longer than the sentence are left out), so a short caption is not 0 for lacking a 4-gram.
    Items may have different numbers of references. sacrebleu takes references as parallel streams (stream k = the
    k-th reference of every item) and drops `None` entries per item (sacrebleu/metrics/base.py `_cache_references`),
    so shorter reference lists are padded with None. Padding with "" or a repeated reference would change the
    scores: "" is a real reference of length 0 and takes part in the closest-length brevity penalty.
"""

from __future__ import annotations

import functools
from importlib import metadata

from dataproc.vqa_answers import normalize_answer, vqa_accuracy
from mpm.core.errors import ConfigError, DataError
from mpm.eval.scorers import Scores, TextScorer, register_scorer
from mpm.eval.text import parse_tokenizer_spec, tokenize_many, tokenizer_for

MIN_VQA_ANSWERS = 4  # below this, even an answer every human gave cannot reach 1.0 (n-1 < 3 matches per subset)


def _join(tokens: list[str]) -> str:
    for token in tokens:
        if not token or token != "".join(token.split()):
            raise ValueError(f"token {token!r} is empty or holds whitespace; tokens are joined by spaces for scoring")
    return " ".join(tokens)


def _check_lengths(candidates: list, references: list) -> None:
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("nothing to score: no candidates")
    for i, refs in enumerate(references):
        if not refs:
            raise ValueError(f"item {i} has no references")


def cider_d(candidates: list[list[str]], references: list[list[list[str]]]) -> tuple[float, list[float]]:
    """CIDEr-D of tokenized candidates (one per item) against tokenized references (one or more per item).

    Returns (corpus score = mean of the item scores, item scores), 0-10 scale.
    """
    try:
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        raise ConfigError(
            "CIDEr needs pycocoevalcap: pip install pycocoevalcap (or pip install -e '.[eval]')"
        ) from None
    _check_lengths(candidates, references)
    if not any(r for refs in references for r in refs):
        # pycocoevalcap would fail on max() of an empty idf table
        raise DataError("CIDEr: every reference is empty after tokenization; check the references and the tokenizer")
    res = {i: [_join(c)] for i, c in enumerate(candidates)}
    gts = {i: [_join(r) for r in refs] for i, refs in enumerate(references)}
    score, scores = Cider().compute_score(gts, res)
    return float(score), [float(s) for s in scores]


def bleu4(candidates_tokens: list[list[str]], references_tokens: list[list[list[str]]]) -> tuple[float, list[float]]:
    """Corpus BLEU-4 and sentence BLEU-4 per item (0-100), on tokenized text; see the module docstring."""
    try:
        from sacrebleu.metrics import BLEU
    except ImportError:
        raise ConfigError("BLEU needs sacrebleu: pip install sacrebleu (or pip install -e '.[eval]')") from None
    _check_lengths(candidates_tokens, references_tokens)
    hyps = [_join(c) for c in candidates_tokens]
    refs = [[_join(r) for r in item] for item in references_tokens]
    n_streams = max(len(item) for item in refs)
    streams = [[item[k] if k < len(item) else None for item in refs] for k in range(n_streams)]
    # force=True: the input is tokenized on purpose (sacrebleu warns about " ." endings otherwise).
    # Each segment's n-gram statistics are extracted once, then summed for the corpus score and scored alone for
    # the per-item one (what corpus_score and sentence_score do, without extracting every reference twice: half
    # of BLEU's time at XM3600 scale).
    corpus = BLEU(tokenize="none", force=True)
    sentence = BLEU(tokenize="none", force=True, effective_order=True)
    stats = corpus._extract_corpus_statistics(hyps, streams)
    score = corpus._aggregate_and_compute(stats).score
    per_item = [sentence._compute_score_from_stats(segment).score for segment in stats]
    return float(score), [float(s) for s in per_item]


@functools.cache
def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _outputs(items: list[dict]) -> list[str]:
    """Model outputs; a missing or empty output is "" and scores 0."""
    return [item.get("output") or "" for item in items]


def _where(item: dict, i: int) -> str:
    return f"item {item['id']!r}" if "id" in item else f"item {i}"


def _references(items: list[dict], lang: str, scorer: str) -> list[list[str]]:
    """Every item's references as strings; an item without any is an error (the task layer checks first)."""
    if not items:
        raise ConfigError(f"{scorer}: no items to score for language {lang!r}")
    refs = []
    for i, item in enumerate(items):
        item_refs = item.get("references")
        if item_refs is not None and not isinstance(item_refs, list | tuple):
            raise DataError(f"{scorer}: `references` of {_where(item, i)} ({lang}) must be a list, got {item_refs!r}")
        if not item_refs:
            raise ConfigError(
                f"{scorer} needs references, but {_where(item, i)} of language {lang!r} has none; give every item of "
                "this language references, or score it with a metric that needs none"
            )
        refs.append([str(r) for r in item_refs])
    return refs


class _CaptionScorer(TextScorer):
    """Shared by cider and bleu4: one tokenizer per language (option `tokenizer`: a name, or "zh:jieba,en:ptb")."""

    package: str  # the scoring library, recorded with its version

    def __init__(self, tokenizer: str | dict | None = None):
        self.tokenizer = tokenizer
        parse_tokenizer_spec(tokenizer)  # a typo fails before any model runs

    def _metric(self, candidates, references) -> tuple[float, list[float]]:
        raise NotImplementedError

    def check(self, items: list[dict], lang: str) -> None:
        tokenizer_for(lang, self.tokenizer)
        _references(items, lang, self.name)

    def score(self, items: list[dict], lang: str) -> Scores:
        refs = _references(items, lang, self.name)
        name = tokenizer_for(lang, self.tokenizer)
        # one call for outputs and references together: "ptb" starts Java once
        outputs = _outputs(items)
        flat = tokenize_many(outputs + [r for item in refs for r in item], lang, name)
        candidates, rest = flat[: len(outputs)], flat[len(outputs) :]
        references, start = [], 0
        for item in refs:
            references.append(rest[start : start + len(item)])
            start += len(item)
        value, per_item = self._metric(candidates, references)
        details = {"tokenizer": {lang: name}, "versions": {self.package: _version(self.package)}, "items": len(items)}
        if name == "jieba":
            details["versions"]["jieba"] = _version("jieba")
        return Scores({self.name: value}, per_item=per_item, details=details)


@register_scorer
class CiderScorer(_CaptionScorer):
    """CIDEr-D, 0-10 (pycocoevalcap), on the language's tokenizer."""

    name = "cider"
    package = "pycocoevalcap"
    mean_of_items = True

    def _metric(self, candidates, references):
        return cider_d(candidates, references)


@register_scorer
class Bleu4Scorer(_CaptionScorer):
    """Corpus BLEU-4, 0-100 (sacrebleu), on the language's tokenizer; per item: smoothed sentence BLEU."""

    name = "bleu4"
    package = "sacrebleu"

    def _metric(self, candidates, references):
        return bleu4(candidates, references)


@register_scorer
class VQAAccuracyScorer(TextScorer):
    """VQAv2 accuracy: min(#humans who gave the answer / 3, 1), averaged over the 10 leave-one-annotator-out
    subsets of the human answers (the item's `references`), after the official answer normalisation
    (dataproc.vqa_answers, from GT-Vision-Lab/VQA vqaEval.py).

    One difference from vqaEval.py: it normalises the human answers only when they disagree, and then only their
    punctuation, because VQAv2's released answers are already normalised; here both sides get the full
    normalisation, so data whose human answers are not pre-normalised (translated sets) is scored fairly. On
    pre-normalised answers the two agree.
    """

    name = "vqa_accuracy"
    mean_of_items = True

    def check(self, items: list[dict], lang: str) -> None:
        refs = _references(items, lang, self.name)
        for i, (item, item_refs) in enumerate(zip(items, refs)):
            if len(item_refs) < MIN_VQA_ANSWERS:
                raise ConfigError(
                    f"vqa_accuracy needs the human answers of VQAv2-style data (10 per question); {_where(item, i)} "
                    f"of language {lang!r} has {len(item_refs)}, with which even a perfect answer scores below 1.0; use "
                    "--metric exact_match for single-answer data (xGQA, MaXM)"
                )

    def score(self, items: list[dict], lang: str) -> Scores:
        self.check(items, lang)
        refs = _references(items, lang, self.name)
        per_item = [vqa_accuracy(output, item_refs) for output, item_refs in zip(_outputs(items), refs)]
        return Scores(
            {self.name: sum(per_item) / len(per_item)},
            per_item=per_item,
            details={"normalisation": "VQAv2 (dataproc.vqa_answers)", "items": len(items)},
        )


def match_key(text: str, lang: str) -> str:
    """What exact_match compares: English answers get the official VQA normalisation (number words to digits,
    articles dropped, contractions); other languages their default tokenizer's tokens (NFKC, lower-case, no
    punctuation; characters for zh/ja/th, so "两 只" matches "两只"), joined by spaces."""
    if lang == "en":
        return normalize_answer(text)
    return " ".join(tokenize_many([text], lang)[0])


@register_scorer
class ExactMatchScorer(TextScorer):
    """1 when the normalised output equals any normalised reference (MaXM, xGQA), else 0; see `match_key`."""

    name = "exact_match"
    mean_of_items = True

    def check(self, items: list[dict], lang: str) -> None:
        _references(items, lang, self.name)

    def score(self, items: list[dict], lang: str) -> Scores:
        refs = _references(items, lang, self.name)
        per_item = []
        for output, item_refs in zip(_outputs(items), refs):
            key = match_key(output, lang)
            per_item.append(float(bool(key) and key in {match_key(r, lang) for r in item_refs}))
        normalisation = "VQAv2 answer normalisation" if lang == "en" else f"tokenizer {tokenizer_for(lang)!r}"
        return Scores(
            {self.name: sum(per_item) / len(per_item)},
            per_item=per_item,
            details={"normalisation": {lang: normalisation}, "items": len(items)},
        )
