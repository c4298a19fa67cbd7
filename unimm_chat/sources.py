"""Readers for the official annotation files, merged into one record per COCO image.

Sources and their official schemas:
    COCO captions   captions_train2017.json: images[{id, file_name}], annotations[{image_id, id, caption}]
    VQAv2, OK-VQA   questions[{image_id, question, question_id}] + annotations[{question_id, image_id,
                    question_type, answer_type, multiple_choice_answer, answers[{answer, answer_confidence,
                    answer_id}]}] (OK-VQA answers may also carry raw_answer)
    A-OKVQA         aokvqa_v1p0_{split}.json: [{split, image_id, question_id, question, choices,
                    correct_choice_idx, direct_answers, difficult_direct_answer, rationales}]
    VisDial 1.0     visdial_1.0_{split}.json: data.dialogs[{image_id, caption, dialog[{question: idx, answer: idx}]}]
                    with data.questions / data.answers string tables

A file that is not JSON or does not follow its schema is an error naming the file, the key and what was expected.
Items that cannot be used (a question without annotations, an A-OKVQA test item without answers, an empty
caption) are counted by reason in `ReadStats` and skipped. Questions asked by several sources are merged (compared
after normalisation): the first source read keeps its answer (order: A-OKVQA, OK-VQA, VQAv2, VisDial: the ones with
knowledge and rationales first), the others add their answers for checking.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dataproc.vqa_answers import majority_answer, normalize_answer
from mpm.core.errors import DataError
from unimm_chat.config import SourcesConfig

try:  # orjson parses the 300 MB VQAv2 annotation file about 3x faster than json
    import orjson as _json

    _JSONDecodeError = _json.JSONDecodeError
except ImportError:  # pragma: no cover - orjson is a dependency; json is the same API for loads
    import json as _json

    _JSONDecodeError = ValueError

SOURCE_ORDER = ("aokvqa", "okvqa", "vqav2", "visdial")


class SourceError(DataError):
    """An annotation file is unreadable or does not follow its official schema."""


@dataclass(slots=True)
class QA:
    question: str
    answer: str  # VQA majority answer, A-OKVQA correct choice, or the VisDial answer
    sources: list[str]  # the first is the one whose answer is used
    agreement: float | None = None  # share of VQA annotators who gave `answer`
    answer_type: str | None = None  # VQA's "yes/no" | "number" | "other"
    # Accepted answers, for checking generated ones: the majority answer and any answer at least two annotators
    # gave (VQA accuracy gives those 2/3 credit or more). Kept deduplicated: VQAv2 alone has 4.4M raw answers.
    answers: list[str] = field(default_factory=list)
    rationales: list[str] = field(default_factory=list)  # A-OKVQA


def usable_qas(qas: list[QA], min_agreement: float) -> list[QA]:
    """The questions dialogues may use: VQA answers fewer than `min_agreement` of annotators gave are left out."""
    return [qa for qa in qas if qa.agreement is None or qa.agreement >= min_agreement]


@dataclass(slots=True)
class ImageRecord:
    image_id: int
    file_name: str | None = None
    captions: list[str] = field(default_factory=list)
    qas: list[QA] = field(default_factory=list)
    _index: dict[str, int] = field(default_factory=dict, repr=False)  # normalised question -> position in qas

    @property
    def sources(self) -> list[str]:
        found = {s for qa in self.qas for s in qa.sources}
        return (["coco_captions"] if self.captions else []) + [s for s in SOURCE_ORDER if s in found]


@dataclass
class ReadStats:
    """Per source: items read, used, and skipped by reason."""

    counts: dict[str, Counter] = field(default_factory=dict)
    load_seconds: float = 0.0  # time spent parsing JSON files (the "reading" part of a build's timings)

    def add(self, source: str, what: str, n: int = 1) -> None:
        counter = self.counts.get(source)
        if counter is None:
            counter = self.counts[source] = Counter()
        counter[what] += n

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {source: dict(counter) for source, counter in self.counts.items()}


# ---------------------------------------------------------------------------------------------------------------
# Loading and schema checks


def load_json(path: str | Path, stats: ReadStats | None = None, drop: re.Pattern | None = None) -> Any:
    """Parse a JSON file; `drop` (a bytes regex) blanks matching parts first (their values become 0)."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    start = time.perf_counter()
    try:
        data = path.read_bytes()
        if drop is not None:
            data = drop.sub(rb'"\1": 0', data)
        return _json.loads(data)
    except (_JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path}: not valid JSON ({exc})") from None
    finally:
        if stats is not None:
            stats.load_seconds += time.perf_counter() - start


def _need(obj: Any, key: str, path: Path, where: str, expected: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        found = sorted(obj)[:12] if isinstance(obj, dict) else type(obj).__name__
        raise SourceError(f"{path}: {where} has no key {key!r} (expected {expected}; found {found})")
    return obj[key]


def _need_list(obj: Any, key: str, path: Path, where: str, expected: str) -> list:
    value = _need(obj, key, path, where, expected)
    if not isinstance(value, list):
        raise SourceError(f"{path}: {where}[{key!r}] should be a list ({expected}), got {type(value).__name__}")
    return value


def _check_items(items: list, keys: tuple[str, ...], path: Path, where: str, expected: str) -> None:
    """Schema check on the first item (the files are machine-written: one shape throughout)."""
    if items:
        for key in keys:
            _need(items[0], key, path, f"{where}[0]", expected)


_NON_WORD = re.compile(r"[^\w\s]")


def accepted_answers(majority: str, answers: list[str], min_count: int = 2) -> list[str]:
    """The majority answer and every other answer given at least `min_count` times (after VQA normalisation)."""
    counts = Counter(normalize_answer(a) for a in answers)
    out = [majority]
    seen = {normalize_answer(majority)}
    for a in answers:
        norm = normalize_answer(a)
        if counts[norm] >= min_count and norm not in seen:
            seen.add(norm)
            out.append(a)
    return out


def image_id_of(value: Any, path: Path, where: str) -> int:
    """COCO image ids are integers; anything else (a Flickr-style name, say) is an error naming the file."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise SourceError(f"{path}: {where} has image_id {value!r}; expected an integer COCO image id")


def question_key(question: str) -> str:
    """Questions are the same when they match after lower-casing and dropping punctuation and extra spaces."""
    return " ".join(_NON_WORD.sub(" ", question.lower()).split())


def clean_text(text: Any) -> str:
    return " ".join(text.split()) if isinstance(text, str) else ""  # collapses runs of whitespace; faster than re


# ---------------------------------------------------------------------------------------------------------------
# The readers: each yields (image_id, QA) or (image_id, caption) items


def read_coco_captions(path: str | Path, stats: ReadStats) -> tuple[dict[int, str], Iterator[tuple[int, str]]]:
    """(image id -> file name, iterator of (image id, caption))."""
    path = Path(path)
    data = load_json(path, stats)
    expected = "COCO captions: {images: [{id, file_name}], annotations: [{image_id, id, caption}]}"
    images = _need_list(data, "images", path, "the file", expected)
    annotations = _need_list(data, "annotations", path, "the file", expected)
    _check_items(images, ("id", "file_name"), path, "images", expected)
    _check_items(annotations, ("image_id", "caption"), path, "annotations", expected)
    file_names = {image_id_of(im["id"], path, "an image"): im.get("file_name") for im in images}
    stats.add("coco_captions", "images", len(file_names))

    def captions() -> Iterator[tuple[int, str]]:
        stats.add("coco_captions", "captions_read", len(annotations))
        for ann in annotations:
            caption = clean_text(ann.get("caption"))
            if not caption:
                stats.add("coco_captions", "skipped_empty_caption")
                continue
            yield image_id_of(ann["image_id"], path, "a caption"), caption

    return file_names, captions()


def read_vqa(
    questions_path: str | Path, annotations_path: str | Path, source: str, stats: ReadStats
) -> Iterator[tuple[int, QA]]:
    """VQAv2 or OK-VQA: questions joined with annotations by question_id; majority answer and its agreement."""
    qpath, apath = Path(questions_path), Path(annotations_path)
    min_count = 4 if source == "okvqa" else 2  # OK-VQA repeats each of its 5 annotators' answers twice
    expected_q = f"{source} questions: {{questions: [{{image_id, question, question_id}}]}}"
    expected_a = f"{source} annotations: {{annotations: [{{question_id, image_id, answers: [{{answer}}], ...}}]}}"
    questions = _need_list(load_json(qpath, stats), "questions", qpath, "the file", expected_q)
    _check_items(questions, ("image_id", "question", "question_id"), qpath, "questions", expected_q)
    by_id = {q["question_id"]: q for q in questions}
    del questions
    annotations = _need_list(load_json(apath, stats), "annotations", apath, "the file", expected_a)
    _check_items(annotations, ("question_id", "image_id", "answers"), apath, "annotations", expected_a)
    answered = set()
    stats.add(source, "annotations_read", len(annotations))
    for ann in annotations:
        q = by_id.get(ann["question_id"])
        if q is None:
            stats.add(source, "skipped_annotation_without_question")
            continue
        answered.add(ann["question_id"])
        if q["image_id"] != ann["image_id"]:
            stats.add(source, "skipped_image_id_mismatch")
            continue
        given = [a for a in ann["answers"] if isinstance(a, dict) and clean_text(a.get("answer"))]
        answers = [clean_text(a["answer"]) for a in given]
        question = clean_text(q["question"])
        if not answers or not question:
            stats.add(source, "skipped_empty_question_or_answers")
            continue
        answer, agreement = majority_answer(answers)
        accepted = accepted_answers(answer, answers, min_count)
        # OK-VQA's `answer` is stemmed ("race"); `raw_answer` is what the annotator wrote ("racing"): show that.
        raws = [
            clean_text(a.get("raw_answer"))
            for a in given
            if normalize_answer(clean_text(a["answer"])) == normalize_answer(answer)
        ]
        raws = [r for r in raws if r]
        if raws:
            answer = Counter(raws).most_common(1)[0][0]
            accepted = [answer, *(a for a in accepted if a != answer)]
        stats.add(source, "used")
        yield (
            image_id_of(ann["image_id"], apath, f"annotation {ann['question_id']}"),
            QA(
                question=question,
                answer=answer,
                sources=[source],
                agreement=round(agreement, 2),
                answer_type=ann.get("answer_type"),
                answers=accepted,
            ),
        )
    stats.add(source, "skipped_question_without_annotation", len(by_id) - len(answered))


def read_aokvqa(path: str | Path, stats: ReadStats) -> Iterator[tuple[int, QA]]:
    """A-OKVQA: the correct choice as the answer, direct answers for checking, rationales for explanations."""
    path = Path(path)
    expected = (
        "A-OKVQA: a list of {image_id, question_id, question, choices, correct_choice_idx, direct_answers, rationales}"
    )
    items = load_json(path, stats)
    if not isinstance(items, list):
        raise SourceError(f"{path}: expected {expected}, got a JSON {type(items).__name__}")
    _check_items(items, ("image_id", "question", "choices"), path, "the list", expected)
    for item in items:
        stats.add("aokvqa", "questions_read")
        question = clean_text(item.get("question"))
        choices = item.get("choices") or []
        index = item.get("correct_choice_idx")
        if index is None or not isinstance(index, int) or not 0 <= index < len(choices):
            stats.add("aokvqa", "skipped_no_answer")  # the test split has no answers
            continue
        answer = clean_text(choices[index])
        if not question or not answer:
            stats.add("aokvqa", "skipped_empty_question_or_answer")
            continue
        direct = [clean_text(a) for a in item.get("direct_answers") or [] if clean_text(a)]
        agreement = (
            sum(normalize_answer(a) == normalize_answer(answer) for a in direct) / len(direct) if direct else None
        )
        rationales = [clean_text(r) for r in item.get("rationales") or [] if clean_text(r)]
        stats.add("aokvqa", "used")
        yield (
            image_id_of(item["image_id"], path, f"question {item.get('question_id')}"),
            QA(
                question=question,
                answer=answer,
                sources=["aokvqa"],
                agreement=None if agreement is None else round(agreement, 2),
                answers=accepted_answers(answer, direct),
                rationales=rationales,
            ),
        )


_LOWER_I = re.compile(r"\bi\b")
# VisDial 1.0 lists 100 candidate answers for every round: about 80% of the file and 123M integers once parsed
# (several GB in Python). Dialogues never use them, so they are blanked in the raw bytes before parsing.
_ANSWER_OPTIONS = re.compile(rb'"(answer_options)"\s*:\s*\[[^\]]*\]')


def _visdial_text(text: str) -> str:
    """VisDial text is lower-case without final punctuation: restore "I" (capitalisation is the generator's job)."""
    return _LOWER_I.sub("I", clean_text(text))


def read_visdial(path: str | Path, stats: ReadStats) -> tuple[Iterator[tuple[int, str]], Iterator[tuple[int, QA]]]:
    """(captions, question-answer rounds). Rounds without an answer (the test split's last round) are skipped."""
    path = Path(path)
    expected = "VisDial 1.0: {data: {dialogs: [{image_id, caption, dialog: [{question, answer}]}], questions, answers}}"
    data = _need(load_json(path, stats, drop=_ANSWER_OPTIONS), "data", path, "the file", expected)
    dialogs = _need_list(data, "dialogs", path, "data", expected)
    questions = _need_list(data, "questions", path, "data", expected)
    answers = _need_list(data, "answers", path, "data", expected)
    _check_items(dialogs, ("image_id", "dialog"), path, "data.dialogs", expected)
    captions = [
        (image_id_of(d["image_id"], path, "a dialog"), _visdial_text(d.get("caption")))
        for d in dialogs
        if clean_text(d.get("caption"))
    ]

    cleaned: dict[tuple[int, int], str] = {}  # (table, index) -> text: the tables are shared by many rounds

    def text(table: int, index: int) -> str:
        value = cleaned.get((table, index))
        if value is None:
            value = cleaned[(table, index)] = _visdial_text((questions, answers)[table][index])
        return value

    def rounds() -> Iterator[tuple[int, QA]]:
        read = used = 0
        for dialog in dialogs:
            image_id = image_id_of(dialog["image_id"], path, "a dialog")
            for turn in dialog["dialog"]:
                read += 1
                qi, ai = turn.get("question"), turn.get("answer")
                if ai is None:
                    stats.add("visdial", "skipped_no_answer")
                    continue
                if not (
                    isinstance(qi, int) and isinstance(ai, int) and 0 <= qi < len(questions) and 0 <= ai < len(answers)
                ):
                    stats.add("visdial", "skipped_bad_index")
                    continue
                question, answer = text(0, qi), text(1, ai)
                if not question or not answer:
                    stats.add("visdial", "skipped_empty_question_or_answer")
                    continue
                used += 1
                yield image_id, QA(question=question, answer=answer, sources=["visdial"], answers=[answer])
        stats.add("visdial", "rounds_read", read)
        stats.add("visdial", "used", used)

    return iter(captions), rounds()


# ---------------------------------------------------------------------------------------------------------------
# Merging


def check_sources(paths: SourcesConfig) -> None:
    for name in ("vqav2", "okvqa"):
        q, a = getattr(paths, f"{name}_questions"), getattr(paths, f"{name}_annotations")
        if bool(q) != bool(a):
            missing = f"--{name}-annotations" if q else f"--{name}-questions"
            raise SourceError(f"{name} needs both its questions and its annotations file: {missing} is missing")
    if not any(vars(paths).values()):
        raise SourceError("no annotation source given: pass at least one of --coco-captions, --vqav2-questions, ...")
    if paths.visdial and Path(paths.visdial).is_file():
        with open(paths.visdial, "rb") as f:
            split = re.search(rb'"split"\s*:\s*"(\w+)"', f.read(4096))
        others = [name for name, value in vars(paths).items() if value and name != "visdial"]
        if split and split.group(1) in (b"val", b"test") and others:
            raise SourceError(
                f"{paths.visdial} is VisDial's {split.group(1).decode()} split, whose images are VisDial's own (Flickr), "
                f"not COCO: their ids would be merged with unrelated COCO images from {others}. Use the train file "
                "(COCO images), or build this file alone with --image-pattern "
                "'VisualDialog_val2018_{image_id:012d}.jpg'."
            )


def merge_sources(paths: SourcesConfig, stats: ReadStats) -> dict[int, ImageRecord]:
    """Read every given source and merge them into one record per image id (sorted by image id)."""
    check_sources(paths)
    records: dict[int, ImageRecord] = {}

    def record(image_id: int) -> ImageRecord:
        rec = records.get(image_id)
        if rec is None:
            rec = records[image_id] = ImageRecord(image_id)
        return rec

    caption_keys: dict[int, set[str]] = {}

    def add_caption(image_id: int, caption: str) -> None:
        key = question_key(caption)  # VisDial repeats COCO captions lower-cased and without the final period
        seen = caption_keys.setdefault(image_id, set())
        if key not in seen:
            seen.add(key)
            record(image_id).captions.append(caption)

    def add_qa(image_id: int, qa: QA) -> None:
        rec = record(image_id)
        key = question_key(qa.question)
        position = rec._index.get(key)
        if position is None:
            rec._index[key] = len(rec.qas)
            rec.qas.append(qa)
            return
        kept = rec.qas[position]  # asked before by a source read earlier: merge into it
        stats.add(qa.sources[0], "merged_duplicate_question")
        kept.sources += [s for s in qa.sources if s not in kept.sources]
        kept.answers += [a for a in qa.answers if a not in kept.answers]
        kept.rationales += [r for r in qa.rationales if r not in kept.rationales]

    file_names: dict[int, str] = {}
    if paths.coco_captions:
        file_names, captions = read_coco_captions(paths.coco_captions, stats)
        for image_id, caption in captions:
            add_caption(image_id, caption)
    if paths.aokvqa:
        for image_id, qa in read_aokvqa(paths.aokvqa, stats):
            add_qa(image_id, qa)
    if paths.okvqa_questions:
        for image_id, qa in read_vqa(paths.okvqa_questions, paths.okvqa_annotations, "okvqa", stats):
            add_qa(image_id, qa)
    if paths.vqav2_questions:
        for image_id, qa in read_vqa(paths.vqav2_questions, paths.vqav2_annotations, "vqav2", stats):
            add_qa(image_id, qa)
    if paths.visdial:
        captions, rounds = read_visdial(paths.visdial, stats)
        for image_id, caption in captions:
            add_caption(image_id, caption)
        for image_id, qa in rounds:
            add_qa(image_id, qa)
    for rec in records.values():
        rec._index.clear()  # only needed while merging
        rec.file_name = file_names.get(rec.image_id)
    return dict(sorted(records.items()))
