"""MMBench-style multiple choice with circular evaluation (MMBench, MMBench-CN, CCBench: what MiniCPM-V reports).

The data is MMBench's TSV (as VLMEvalKit ships it): columns `index`, `question`, `A`, `B`[, `C`, `D`, ...] (empty
cells: fewer options), `answer` (a letter), optional `hint` and `category`, and `image`: base64-encoded image bytes,
an image file name under `images_folder`, or (VLMEvalKit's deduplicated files) the `index` of another row whose
image it shares.

Circular evaluation (MMBench paper, "CircularEval"): a question with k options is asked k times, the options shifted
by 0..k-1 places (rotation r puts original option (i + r) mod k at letter i), and counts as right only if EVERY
rotation is answered right; a model that always answers "A" scores 0, not 25%. Answers without a letter count as
wrong (and are counted: `unparsed`). `vanilla_accuracy` is rotation 0 alone (the plain, non-circular score).

The prompt is LLaVA's MMBench prompt (`llava/eval/model_vqa_mmbench.py`): the hint, the question, one line per
option ("A. text"), then the instruction of the language (INSTRUCTIONS).

English and Chinese MMBench hold the same questions, so the transfer ratio is zh accuracy / en accuracy
(`transfer`).
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mpm.core.errors import ConfigError, DataError
from mpm.core.images import ImageError, open_image

LETTERS = "ABCDEFGHI"
# LLaVA's `model_vqa_mmbench.py` (`--single-pred-prompt`, lang en / cn).
INSTRUCTIONS = {
    "en": "Answer with the option's letter from the given choices directly.",
    "zh": "请直接回答选项字母。",
}
MISSING = ("", "nan", "NaN")  # what pandas (which writes these TSVs) leaves in an empty cell


@dataclass
class MCQuestion:
    index: str
    question: str
    options: list[str]  # the option texts, A first (2 to 9)
    answer: str  # the right letter
    hint: str | None = None
    category: str | None = None
    image: bytes | Path | None = None  # encoded image bytes (from base64) or a file


# ---------------------------------------------------------------------------------------------------------------
# 1. Reading the TSV


def read_mmbench_tsv(path: str | Path, images_folder: str | Path | None = None) -> list[MCQuestion]:
    """The questions of an MMBench TSV. Raises DataError naming the file, the row's index and the field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (an MMBench TSV with columns index, question, A, B, ..., answer, image)")
    folder = Path(images_folder) if images_folder is not None else None
    if folder is not None and not folder.is_dir():
        raise DataError(f"images folder {folder}: not a folder")
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # a base64 image is far beyond the 128 KiB default
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        columns = reader.fieldnames or []
        needed = ["index", "question", "A", "B", "answer", "image"]
        missing = [c for c in needed if c not in columns]
        if missing:
            raise DataError(f"{path}: no column {', '.join(missing)} (columns: {', '.join(columns) or 'none'}); "
                            "an MMBench TSV has index, question, hint, A, B, C, D, answer, category, image")  # fmt: skip
        rows = list(reader)
    if not rows:
        raise DataError(f"{path} holds no question")
    letters = [c for c in LETTERS if c in columns]
    questions, seen, raw_images = [], set(), {}
    for number, row in enumerate(rows, 2):  # line numbers: the header is line 1
        index = (row.get("index") or "").strip()
        where = f"{path}:{number} (index {index!r})"
        if not index or index in seen:
            raise DataError(f"{where}: every row needs a unique `index`")
        seen.add(index)
        question = (row.get("question") or "").strip()
        if not question:
            raise DataError(f"{where}: empty `question`")
        cells = [(row.get(c) or "").strip() for c in letters]
        cells = ["" if c in MISSING else c for c in cells]
        k = len(cells) - next((i for i, c in enumerate(reversed(cells)) if c), len(cells))
        if k < 2 or not all(cells[:k]):
            raise DataError(f"{where}: options must fill {', '.join(letters[:2])}, ... without gaps (at least 2), got "
                            f"{dict(zip(letters, cells))}")  # fmt: skip
        answer = (row.get("answer") or "").strip()
        if answer not in letters[:k]:
            raise DataError(f"{where}: `answer` must be one of the option letters {''.join(letters[:k])}, "
                            f"got {answer!r}")  # fmt: skip
        hint = (row.get("hint") or "").strip()
        category = (row.get("category") or "").strip()
        questions.append(MCQuestion(index, question, cells[:k], answer, None if hint in MISSING else hint,
                                    category or None))  # fmt: skip
        raw_images[index] = ((row.get("image") or "").strip(), where)
    for q in questions:  # second pass: a row may share another row's image by naming its index
        q.image = _image(*raw_images[q.index], folder, raw_images)
    return questions


def _image(value: str, where: str, folder: Path | None, raw_images: dict) -> bytes | Path:
    if not value:
        raise DataError(f"{where}: empty `image`")
    if folder is not None and len(value) < 1024 and (folder / value).is_file():
        return folder / value
    if len(value) <= 64:  # too short for image data: another row's index (VLMEvalKit dedup) or a missing file
        shared = raw_images.get(value)
        if shared is not None and len(shared[0]) > 64:
            return _image(shared[0], shared[1], folder, raw_images)
        raise DataError(f"{where}: `image` {value!r} is neither a file in the images folder ({folder}) nor the "
                        "index of a row holding base64 image data: pass --images-folder, or check the file")  # fmt: skip
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"{where}: `image` is not valid base64 (starts {value[:40]!r}) and not a file in the images "
                        f"folder ({folder})") from None  # fmt: skip


def load_image(question: MCQuestion) -> Image.Image:
    """The question's image as the models see it (upright RGB). Raises ImageError naming the question."""
    if isinstance(question.image, Path):
        return open_image(question.image)
    try:
        return open_image(Image.open(io.BytesIO(question.image)))
    except (UnidentifiedImageError, OSError, ImageError) as exc:
        raise ImageError(f"question {question.index}: its base64 image cannot be decoded ({exc})") from None


# ---------------------------------------------------------------------------------------------------------------
# 2. Rotations, prompts, letters


def rotations(question: MCQuestion) -> list[tuple[list[str], str]]:
    """(options, right letter) for each rotation r = 0..k-1: option i of rotation r is original option (i + r) % k,
    so the right answer moves from index a to (a - r) % k."""
    k, a = len(question.options), LETTERS.index(question.answer)
    return [(question.options[r:] + question.options[:r], LETTERS[(a - r) % k]) for r in range(k)]


def instruction_for(lang: str, instruction: str | None = None) -> str:
    if instruction is not None:
        return instruction
    if lang not in INSTRUCTIONS:
        hint = " (MMBench's 'cn' is 'zh' here)" if lang == "cn" else ""
        raise ConfigError(f"no MMBench instruction for language {lang!r}{hint}: known {sorted(INSTRUCTIONS)}; give "
                          "`instruction` (the sentence asking for the option's letter) in that language")  # fmt: skip
    return INSTRUCTIONS[lang]


def build_prompt(question: MCQuestion, options: list[str], instruction: str) -> str:
    """LLaVA's MMBench prompt: hint, question, "A. option" lines, the instruction; one line each."""
    text = f"{question.hint}\n{question.question}" if question.hint else question.question
    text += "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, options))
    return f"{text}\n{instruction}"


_STANDALONE = re.compile(r"(?<![A-Za-z0-9])([A-Za-z])(?![A-Za-z0-9])")


def _plain(text: str) -> str:
    return text.strip().strip(".。!！ ").casefold()


def extract_letter(output: str, options: list[str]) -> str | None:
    """The option letter an output chooses, or None (unparsed: scored wrong).

    In order: the output is a single letter of any case ("B", "c."); the whole output is one option's text ("猫"
    for option "猫"; case and a final full stop ignored); the first standalone capital letter that is an option's ("B", "(C) a
    cat", "The answer is D.", "答案是B"), skipping an "A" used as the English article ("A cat is ...") and capitals
    that name no option ("I think B" gives B). Full-width letters count (NFKC).
    """
    letters = LETTERS[: len(options)]
    text = unicodedata.normalize("NFKC", output).strip()
    if not text:
        return None
    if len(_plain(text)) == 1 and _plain(text).upper() in letters:
        return _plain(text).upper()  # a letter, even where options are letters too (asked for, it wins)
    same = [letter for letter, option in zip(letters, options) if _plain(option) and _plain(option) == _plain(text)]
    if len(same) == 1:
        return same[0]
    for match in _STANDALONE.finditer(text):
        letter = match.group(1)
        if letter not in letters:
            continue
        if letter == "A" and re.match(r" +[a-z]", text[match.end() :]):
            continue  # "A cat": the article, not option A
        return letter
    return None


# ---------------------------------------------------------------------------------------------------------------
# 3. Scoring


def score_items(
    questions: list[MCQuestion], predictions: Mapping[tuple[str, int], str], instruction: str | None = None
) -> list[dict]:
    """One row per question: every rotation's expected letter, output and extracted letter; `correct` only if
    every rotation is right. `predictions[(index, rotation)]` is the raw output; a missing one is a DataError."""
    missing = [(q.index, r) for q in questions for r in range(len(q.options)) if (q.index, r) not in predictions]
    if missing:
        raise DataError(f"{len(missing)} prediction(s) missing (first: question {missing[0][0]!r}, rotation "
                        f"{missing[0][1]}): circular evaluation needs an output for every rotation")  # fmt: skip
    rows = []
    for q in questions:
        answers = []
        for r, (options, expected) in enumerate(rotations(q)):
            output = predictions[(q.index, r)]
            predicted = extract_letter(output, options)
            answers.append({"rotation": r, "expected": expected, "output": output, "predicted": predicted,
                            "correct": predicted == expected})  # fmt: skip
        row = {"index": q.index, "category": q.category, "answer": q.answer, "options": q.options,
               "correct": all(a["correct"] for a in answers), "rotations": answers}  # fmt: skip
        if instruction is not None:
            row["prompt"] = build_prompt(q, q.options, instruction)  # rotation 0's
        rows.append(row)
    return rows


def summarize(rows: list[dict], questions: list[MCQuestion]) -> dict:
    """The per-language summary: circular accuracy (0-1), counts, rotation-0 accuracy, per category."""
    n = len(rows)
    by_category: dict[str, list[bool]] = {}
    for row in rows:
        by_category.setdefault(row["category"] or "", []).append(row["correct"])
    summary = {
        "accuracy": sum(r["correct"] for r in rows) / n if n else None,
        "questions": n,
        "unparsed": sum(a["predicted"] is None for r in rows for a in r["rotations"]),
        "answers": sum(len(r["rotations"]) for r in rows),
        "circular": True,
        "vanilla_accuracy": sum(r["rotations"][0]["correct"] for r in rows) / n if n else None,
        "question_set": question_set(questions),
    }
    if any(by_category):
        summary["categories"] = {c: {"accuracy": sum(v) / len(v), "questions": len(v)}
                                 for c, v in sorted(by_category.items())}  # fmt: skip
    return summary


def question_set(questions: list[MCQuestion]) -> str:
    """A short hash of the question indices: `transfer` compares languages only over the same questions."""
    return hashlib.sha256("\n".join(sorted(q.index for q in questions)).encode()).hexdigest()[:16]


def score_mmbench(questions: list[MCQuestion], predictions: Mapping[tuple[str, int], str], lang: str = "en") -> dict:
    """Results from outputs made elsewhere: `predictions[(index, rotation)]` -> raw output (rotation as in
    `rotations`)."""
    rows = score_items(questions, predictions)
    return {"task": "mmbench", "languages": {lang: summarize(rows, questions)}}


def transfer(results_by_lang: Mapping[str, dict], source: str = "en") -> dict[str, dict]:
    """{lang: {"accuracy", "source_accuracy", "ratio"}} for every language but `source`: ratio = accuracy /
    source accuracy (None when the source scores 0). Values are `score_mmbench` / `evaluate_mmbench` results (or
    their per-language summaries); the languages must have been asked the same questions."""
    summaries = {lang: r["languages"][lang] if "languages" in r else r for lang, r in results_by_lang.items()}
    if source not in summaries:
        raise ConfigError(f"transfer needs the {source!r} results, got {sorted(summaries)}")
    base = summaries[source]
    out = {}
    for lang, summary in summaries.items():
        if lang == source:
            continue
        if summary.get("question_set") != base.get("question_set"):
            raise DataError(f"transfer: {lang} was asked other questions than {source} ({summary['questions']} vs "
                            f"{base['questions']} questions, or other indices): use the same questions in both")  # fmt: skip
        ratio = summary["accuracy"] / base["accuracy"] if base["accuracy"] else None
        out[lang] = {"accuracy": summary["accuracy"], "source_accuracy": base["accuracy"], "ratio": ratio}
    return out


# ---------------------------------------------------------------------------------------------------------------
# 4. Generating


def evaluate_mmbench(
    model,
    processor,
    tsv: str | Path,
    lang: str,
    images_folder: str | Path | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    instruction: str | None = None,
) -> tuple[dict, list[dict]]:
    """(results, per-question rows) of `model` on an MMBench TSV in `lang`, every rotation asked (greedy).

    Args:
        model, processor: as `mpm.inference.load_model` returns them.
        tsv: the MMBench TSV; images_folder: where file-name images are.
        lang: selects the instruction (INSTRUCTIONS) unless `instruction` is given.
    Returns:
        results {"task": "mmbench", "data", "instruction", "languages": {lang: {"accuracy", "questions",
        "unparsed", "answers", "circular", "vanilla_accuracy", "question_set"[, "categories"]}}}, and one row per
        question (see `score_items`) with rotation 0's prompt.
    """
    from mpm.inference import Request, generate

    instruction = instruction_for(lang, instruction)
    questions = read_mmbench_tsv(tsv, images_folder)
    predictions: dict[tuple[str, int], str] = {}
    # A few batches of questions at a time: their images are decoded once for all their rotations, and never all
    # at once (MMBench's 4,000+ images).
    chunk = max(1, batch_size)
    for start in range(0, len(questions), chunk):
        keys, requests = [], []
        for q in questions[start : start + chunk]:
            image = load_image(q)
            for r, (options, _) in enumerate(rotations(q)):
                keys.append((q.index, r))
                prompt = build_prompt(q, options, instruction)
                requests.append(Request(images=[image], messages=[{"role": "user", "content": prompt}]))
        outputs = generate(model, processor, requests, max_new_tokens=max_new_tokens, batch_size=batch_size)
        predictions.update(zip(keys, outputs))
    rows = score_items(questions, predictions, instruction)
    results = {"task": "mmbench", "data": str(tsv), "instruction": {lang: instruction},
               "languages": {lang: summarize(rows, questions)}}  # fmt: skip
    return results, rows
