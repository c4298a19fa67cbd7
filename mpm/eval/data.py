"""Reading evaluation data: captioning and VQA references, and predictions made elsewhere.

Every reader returns items: dicts with `id`, `image` (a file name under the images folder), `lang`, `references`
(a list) and every other field of the data line (scorers receive them: the miniature world's attributes, a
question). Formats:

    captions, Crossmodal-3600   captions.jsonl: {"image/key": K, "image/locale": L, "<lang>": {"caption": [...]}, ...}
                                (images {K}.jpg)
    captions, generic           jsonl {"image", "lang", "references": [...], ...}
    VQA, generic (MaXM, xGQA)   jsonl {"image", "lang", "question", "answers": [...], ...}
    VQA, VQAv2                  the official questions + annotations JSON files (English; images
                                COCO_{split}_{image_id:012d}.jpg)
    predictions                 jsonl {"image", "lang", "output"} with an optional "id" (what `mpm eval` writes)
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from mpm.core.errors import DataError


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-empty line; a line that is not a JSON object is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    if not rows:
        raise DataError(f"{path} holds no line")
    return rows


def read_captions(path: str | Path, langs: list[str]) -> dict[str, list[dict]]:
    """Captioning items per requested language (Crossmodal-3600 or the generic jsonl). A requested language with
    no references in the file is a DataError listing the languages it has."""
    rows = read_jsonl(path)
    found: dict[str, list[dict]] = defaultdict(list)
    if "image/key" in rows[0][1]:  # Crossmodal-3600: one line per image, every language's captions in it
        present: set[str] = set()
        for number, row in rows:
            key = row.get("image/key")
            if not isinstance(key, str):
                raise DataError(f"{path}:{number}: `image/key` must be a string")
            present |= {k for k, v in row.items() if isinstance(v, dict) and "caption" in v}
            for lang in langs:
                entry = row.get(lang) or {}
                captions = entry.get("caption") if isinstance(entry, dict) else None
                if entry and not (isinstance(captions, list) and all(isinstance(c, str) for c in captions)):
                    raise DataError(f'{path}:{number}: `{lang}` must be {{"caption": [strings]}} (Crossmodal-3600)')
                if captions:
                    found[lang].append({"id": key, "image": f"{key}.jpg", "lang": lang, "references": list(captions),
                                        "locale": row.get("image/locale")})  # fmt: skip
    else:  # one line per (image, language), or per caption: the references of one (id, language) are merged
        present, merged = set(), {}
        for number, row in rows:
            image, lang, refs = row.get("image"), row.get("lang"), row.get("references")
            if not isinstance(image, str) or not isinstance(lang, str):
                raise DataError(f"{path}:{number}: each line needs `image` and `lang` strings")
            if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
                raise DataError(f"{path}:{number}: `references` must be a list of strings")
            present.add(lang)
            if lang in langs and refs:
                key = (str(row.get("id", image)), lang)
                if key in merged:
                    merged[key]["references"] += refs
                    continue
                extra = {k: v for k, v in row.items() if k not in ("image", "lang", "references", "id")}
                merged[key] = {"id": key[0], "image": image, "lang": lang, "references": list(refs), **extra}
                found[lang].append(merged[key])
    _check_languages(path, langs, found, present)
    return dict(found)


def read_vqa(path: str | Path, langs: list[str], annotations: str | Path | None = None) -> dict[str, list[dict]]:
    """VQA items per language: the generic jsonl, or VQAv2's questions file with its annotations file (English)."""
    if annotations is not None:
        if langs != ["en"]:
            raise DataError(f"VQAv2 (--annotations) is English only: use --langs en, not {','.join(langs)}")
        return {"en": _read_vqav2(Path(path), Path(annotations))}
    rows = read_jsonl(path)
    found: dict[str, list[dict]] = defaultdict(list)
    present, seen = set(), defaultdict(set)
    for number, row in rows:
        image, lang, question, answers = row.get("image"), row.get("lang"), row.get("question"), row.get("answers")
        if not all(isinstance(v, str) for v in (image, lang, question)):
            raise DataError(f"{path}:{number}: each line needs `image`, `lang` and `question` strings")
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not answers:
            raise DataError(f"{path}:{number}: `answers` must be a non-empty list of strings")
        present.add(lang)
        if lang in langs:
            # without an id, a question is named by its image and its text (not its line: editing the file must
            # not re-pair predictions with other questions)
            qid = str(row.get("id", f"{image}#{question}"))
            if qid in seen[lang]:
                raise DataError(f"{path}:{number}: question {qid!r} ({lang}) appears twice: give each question an `id`")
            seen[lang].add(qid)
            extra = {k: v for k, v in row.items() if k not in ("image", "lang", "answers", "id")}
            found[lang].append({"id": qid, "image": image, "lang": lang, "references": [str(a) for a in answers],
                                **extra})  # fmt: skip
    _check_languages(path, langs, found, present)
    return dict(found)


def _read_vqav2(questions_file: Path, annotations_file: Path) -> list[dict]:
    try:
        loaded = json.loads(questions_file.read_text(encoding="utf-8"))
        questions = loaded["questions"]
        annotations = json.loads(annotations_file.read_text(encoding="utf-8"))["annotations"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(
            f"cannot read VQAv2 files {questions_file} / {annotations_file} ({type(exc).__name__}: {exc}): give the "
            "official questions JSON ({'questions': [...]}) and annotations JSON ({'annotations': [...]})"
        ) from None
    # images are COCO_{split}_{id:012d}.jpg; the split is the file's data_subtype, or in its name (val2014)
    split = loaded.get("data_subtype") or next(iter(re.findall(r"(?:train|val|test)\d{4}", questions_file.name)), None)
    if not split:
        raise DataError(
            f"{questions_file}: no data_subtype field or split in the name (e.g. val2014) to name images by"
        )
    answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in annotations}
    items = []
    for q in questions:
        if q["question_id"] not in answers:
            raise DataError(f"{annotations_file} has no annotation for question {q['question_id']}")
        items.append({"id": str(q["question_id"]), "image": f"COCO_{split}_{q['image_id']:012d}.jpg", "lang": "en",
                      "question": q["question"], "references": answers[q["question_id"]]})  # fmt: skip
    return items


def read_predictions(path: str | Path) -> dict[tuple[str, str], str]:
    """{(id, lang): output} from a predictions jsonl (`id` defaults to `image`)."""
    predictions = {}
    for number, row in read_jsonl(path):
        image, lang, output = row.get("image"), row.get("lang"), row.get("output")
        if not isinstance(lang, str) or not isinstance(output, str) or not (image or row.get("id")):
            raise DataError(f"{path}:{number}: each line needs `image` (or `id`), `lang` and an `output` string")
        key = (str(row.get("id", image)), lang)
        if key in predictions:
            raise DataError(f"{path}:{number}: a second prediction for {key[0]!r} in {lang!r}")
        predictions[key] = output
    return predictions


def split_missing_images(items: list[dict], images: str | Path | None) -> tuple[list[dict], list[str]]:
    """(items whose image file exists and opens, the missing or unreadable images' names). They are listed and
    excluded from every score, never scored as zero."""
    if images is None:
        return items, []
    folder = Path(images)
    if not folder.is_dir():
        raise DataError(f"--images {folder}: not a folder")
    present, missing, readable = [], [], {}
    for item in items:
        name = item["image"]
        if name not in readable:
            readable[name] = _opens(folder / name)
        (present if readable[name] else missing).append(item)
    return present, sorted({m["image"] for m in missing})


def _opens(path: Path) -> bool:
    """The file exists and its header is an image's (cheap: PIL reads the header only)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.size  # noqa: B018
        return True
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def _check_languages(path, langs: list[str], found: dict, present: set[str]) -> None:
    empty = [lang for lang in langs if not found.get(lang)]
    if empty:
        raise DataError(
            f"{path} has no references for {', '.join(empty)} (languages it has: {', '.join(sorted(present)) or 'none'})"
        )
