"""CHAIR: object hallucination in English image descriptions (Rohrbach et al. 2018, "Object Hallucination in Image
Captioning", https://arxiv.org/abs/1809.02156), against COCO instance annotations and reference captions.

    CHAIR_i = hallucinated object mentions / all object mentions
    CHAIR_s = descriptions with at least one hallucinated mention / all descriptions

A mention is a word or phrase of the COCO-80 synonym table (mpm/eval/coco_objects.py, from the paper's code); it is
hallucinated when its class is not among the image's ground-truth classes: the categories of the image's instance
annotations plus the classes mentioned in its reference captions (as the paper's code does: a caption can name an
object the segmentations missed). Repeated mentions count each time ("a dog chasing another dog": 2 mentions).

Matching rules (`mentioned_objects`):
  1. lower-case; tokens are runs of letters/digits, kept together across hyphens ("hot-dog", "dog-friendly" are one
     token and match nothing, as with nltk's tokeniser in the reference); apostrophes split ("dog's" -> dog, s).
  2. plurals: the table's entries and their generated plural forms (coco_objects.plural_forms: dogs, puppies, men,
     children, knives, buses, wine glasses, teddy bears) are matched; no other word is rewritten, so verbs stay
     verbs ("skiing" is not "ski", as with the paper's `pattern.en.singularize`).
  3. left to right, the longest phrase wins: "hot dog" is one hot dog, not a dog; "teddy bears" not bears; "baby
     elephant" is an elephant, not a (human) baby; "passenger jet" an airplane, not a passenger; "toilet seat" the
     toilet; "baby animal" / "home plate" name nothing. "hot", "teddy", "cell", "traffic" alone name nothing.
  4. as in the reference, a description that mentions a toilet does not count "seat" as a chair.
  5. ambiguous words keep the reference's reading, so numbers stay comparable with published ones: "orange" is
     always the fruit (an "orange cat" mentions an orange), "table"/"desk" a dining table, "bow" a tie, "ball" a
     sports ball, "computer" a laptop, "mouse" the computer mouse.

Image ids: an item's `image` is a COCO file name, `COCO_val2014_000000123456.jpg` or `000000123456.jpg` (a folder
in front is ignored): the digits at the end of the name before the extension are the integer COCO image id; an int
is taken as the id. An image that is not in the instances file is counted and listed as missing and excluded from
both rates, never scored as hallucination-free.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import orjson

from mpm.core.errors import ConfigError, DataError
from mpm.eval.coco_objects import phrase_table
from mpm.eval.data import read_jsonl
from mpm.eval.scorers import Scores, TextScorer, register_scorer

SYNONYM_SOURCE = "LisaAnne/Hallucination data/synonyms.txt + utils/chair.py rules (see mpm/eval/coco_objects.py)"

_TOKEN = re.compile(r"[^\W_]+(?:-[^\W_]+)*")  # letters/digits, joined across hyphens; apostrophes split
_TRAILING_DIGITS = re.compile(r"(\d+)$")


@cache
def _phrases() -> tuple[dict[tuple[str, ...], tuple[str | None, str]], int]:
    table = phrase_table()
    return table, max(len(key) for key in table)


def mentioned_objects(text: str) -> list[tuple[str, str]]:
    """(words as written, lower-cased; COCO class) for every object mention in an English text, in order.
    "Two dogs and a hot dog" -> [("dogs", "dog"), ("hot dog", "hot dog")]. Rules in the module docstring."""
    table, longest = _phrases()
    tokens = _TOKEN.findall(text.lower())
    found: list[tuple[str, str | None, str]] = []  # (surface, class or None, table entry)
    i = 0
    while i < len(tokens):
        for n in range(min(longest, len(tokens) - i), 0, -1):
            hit = table.get(tuple(tokens[i : i + n]))
            if hit is not None:
                found.append((" ".join(tokens[i : i + n]), *hit))
                i += n
                break
        else:
            i += 1
    # reference rule: "the seat of the toilet" does not mention a chair
    if any(entry in ("toilet", "toilet seat") for _, _, entry in found):
        found = [m for m in found if m[2] != "seat"]
    return [(surface, cls) for surface, cls, _ in found if cls is not None]


def coco_image_id(image: str | int) -> int:
    """The integer COCO image id of `COCO_val2014_000000123456.jpg`, `000000123456.jpg`, `val2014/...jpg` or an int."""
    if isinstance(image, int) and not isinstance(image, bool):
        return image
    if not isinstance(image, str):
        raise DataError(f"image {image!r}: expected a COCO file name such as COCO_val2014_000000123456.jpg")
    name = image.replace("\\", "/").rsplit("/", 1)[-1]
    stem = name.rsplit(".", 1)[0] if "." in name else name
    match = _TRAILING_DIGITS.search(stem)
    if match is None:
        raise DataError(f"image {image!r} has no COCO image id: CHAIR needs COCO file names such as "
                        "COCO_val2014_000000123456.jpg or 000000123456.jpg")  # fmt: skip
    return int(match.group(1))


def _load_json(path: str | Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path}: no such file (COCO annotations, e.g. annotations/instances_val2014.json)")
    try:
        data = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise DataError(f"{what} {path}: not JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{what} {path}: not a COCO annotation file (expected an object with an `annotations` list)")
    return data


@dataclass
class CocoObjects:
    """The ground-truth COCO classes of each image (`objects[image_id]`), from instance annotations and, when
    given, the classes mentioned in the reference captions."""

    objects: dict[int, frozenset[str]]
    instances: str
    captions: str | None = None

    @classmethod
    def from_files(
        cls, instances_json: str | Path, captions_json: str | Path | None = None, image_ids: Iterable[int] | None = None
    ) -> CocoObjects:
        """Read COCO `instances_*.json` (and `captions_*.json`). The images are those listed in the instances file
        (an image with no instance annotation has no object, unless its captions name some). `image_ids` keeps only
        those images (reading a full val2014 captions file for a few hundred images is then quicker)."""
        table, _ = _phrases()
        keep = None if image_ids is None else set(image_ids)
        data = _load_json(instances_json, "instances")
        category_class: dict[int, str] = {}
        for category in data.get("categories") or []:
            hit = table.get(tuple(str(category.get("name", "")).lower().split()))
            if hit is None or hit[0] is None:
                raise DataError(f"instances {instances_json}: category {category.get('name')!r} (id "
                                f"{category.get('id')}) is not a COCO-80 class; CHAIR needs the COCO 2014/2017 "
                                "instances files")  # fmt: skip
            category_class[category["id"]] = hit[0]
        found: dict[int, set[str]] = {}
        for image in data.get("images") or []:
            if not isinstance(image, dict) or "id" not in image:
                raise DataError(f"instances {instances_json}: an entry of `images` has no `id`: {str(image)[:80]}")
            if keep is None or image["id"] in keep:
                found[image["id"]] = set()
        for number, annotation in enumerate(data["annotations"]):
            try:
                image_id, category_id = annotation["image_id"], annotation["category_id"]
            except (KeyError, TypeError):
                raise DataError(
                    f"instances {instances_json}: annotation #{number} lacks image_id / category_id"
                ) from None
            if category_id not in category_class:
                raise DataError(f"instances {instances_json}: annotation #{number} has category_id {category_id}, "
                                "which `categories` does not list")  # fmt: skip
            if keep is None or image_id in keep:
                found.setdefault(image_id, set()).add(category_class[category_id])
        if captions_json is not None:
            captions = _load_json(captions_json, "captions")
            for number, annotation in enumerate(captions["annotations"]):
                image_id, caption = annotation.get("image_id"), annotation.get("caption")
                if not isinstance(caption, str):
                    raise DataError(f"captions {captions_json}: annotation #{number} has no `caption` string")
                if image_id in found:  # captions of images the instances file lacks are another split's: ignored
                    found[image_id].update(cls_ for _, cls_ in mentioned_objects(caption))
        return cls(
            {image_id: frozenset(classes) for image_id, classes in found.items()},
            str(instances_json),
            None if captions_json is None else str(captions_json),
        )


def chair(outputs: list[tuple[int | str, str]], objects: CocoObjects) -> dict:
    """CHAIR of English descriptions: `outputs` are (image id or COCO file name, text).

    Returns {"chair_s", "chair_i" (None when nothing was scored / nothing mentioned), "captions" (scored),
    "mentions", "hallucinated" (mentions), "hallucinated_captions", "missing_images" (descriptions whose image is
    not in the annotations, excluded), "missing_image_ids" (sorted, unique), "items": one dict per output in order
    with image_id, mentioned and hallucinated ([words, class] pairs), chair_s (0/1), chair_i, missing}."""
    items, missing_ids = [], set()
    n_captions = n_mentions = n_hallucinated = n_hallucinated_captions = 0
    for image, text in outputs:
        image_id = coco_image_id(image)
        truth = objects.objects.get(image_id)
        if truth is None:
            missing_ids.add(image_id)
            items.append({"image_id": image_id, "missing": True, "mentioned": None, "hallucinated": None,
                          "chair_s": None, "chair_i": None})  # fmt: skip
            continue
        mentioned = mentioned_objects(text)
        hallucinated = [(words, cls) for words, cls in mentioned if cls not in truth]
        n_captions += 1
        n_mentions += len(mentioned)
        n_hallucinated += len(hallucinated)
        n_hallucinated_captions += bool(hallucinated)
        items.append({
            "image_id": image_id, "missing": False,
            "mentioned": [list(m) for m in mentioned], "hallucinated": [list(h) for h in hallucinated],
            "chair_s": int(bool(hallucinated)), "chair_i": len(hallucinated) / len(mentioned) if mentioned else None,
        })  # fmt: skip
    return {
        "chair_s": n_hallucinated_captions / n_captions if n_captions else None,
        "chair_i": n_hallucinated / n_mentions if n_mentions else None,
        "captions": n_captions,
        "mentions": n_mentions,
        "hallucinated": n_hallucinated,
        "hallucinated_captions": n_hallucinated_captions,
        "missing_images": len(items) - n_captions,
        "missing_image_ids": sorted(missing_ids),
        "items": items,
    }


def _check_english(lang: str, where: str) -> None:
    if lang.replace("_", "-").split("-")[0].lower() != "en":
        raise DataError(f"{where}: lang {lang!r}: CHAIR matches English object words only; translate the outputs to "
                        "English first (and say so when reporting) and give them lang 'en'")  # fmt: skip


def _scored(outputs: list[tuple[int | str, str]], instances, captions) -> tuple[dict, CocoObjects]:
    wanted = {coco_image_id(image) for image, _ in outputs}
    objects = CocoObjects.from_files(instances, captions, image_ids=wanted)
    result = chair(outputs, objects)
    if outputs and result["captions"] == 0:
        shown = ", ".join(map(str, result["missing_image_ids"][:5]))
        raise DataError(f"none of the {len(outputs)} outputs' images is in {instances} (ids {shown}...): is it the "
                        "right split (val2014 vs train2014) for these images?")  # fmt: skip
    return result, objects


def evaluate_chair(
    outputs_file_or_items: str | Path | list[dict], instances: str | Path, captions: str | Path | None = None
) -> tuple[dict, list[dict]]:
    """CHAIR of a predictions jsonl (`{"image", "lang", "output"}` per line, lang "en" when absent) or of the same
    dicts in a list. Returns (results, per_item):
        results = {"task": "chair", "languages": {"en": {"chair_s", "chair_i", "captions", "mentions",
                   "hallucinated", "missing_images"}}, "details": {...}}
        per_item = the input dicts with image_id, mentioned, hallucinated, chair_s, chair_i, missing added."""
    if isinstance(outputs_file_or_items, str | Path):
        rows = [(f"{outputs_file_or_items}:{number}", row) for number, row in read_jsonl(outputs_file_or_items)]
    else:
        rows = [(f"item #{index}", row) for index, row in enumerate(outputs_file_or_items)]
    outputs = []
    for where, row in rows:
        if not isinstance(row.get("image"), str | int) or not isinstance(row.get("output"), str):
            raise DataError(
                f"{where}: needs `image` (a COCO file name) and `output` (a string), got keys {sorted(row)}"
            )
        _check_english(str(row.get("lang", "en")), where)
        outputs.append((row["image"], row["output"]))
    result, objects = _scored(outputs, instances, captions)
    per_item = [{**row, "lang": row.get("lang", "en"), **item} for (_, row), item in zip(rows, result["items"])]
    keys = ("chair_s", "chair_i", "captions", "mentions", "hallucinated", "missing_images")
    results = {
        "task": "chair",
        "languages": {"en": {key: result[key] for key in keys}},
        "details": {
            "instances": objects.instances,
            "captions": objects.captions,
            "hallucinated_captions": result["hallucinated_captions"],
            "missing_image_ids": result["missing_image_ids"],
            "synonyms": SYNONYM_SOURCE,
        },
    }
    return results, per_item


@register_scorer
class ChairScorer(TextScorer):
    """`--metric chair metric_options.chair.instances=PATH [metric_options.chair.captions=PATH]`: CHAIR_s and CHAIR_i of
    English outputs on COCO images (items carry `image`, a COCO file name, and `output`). Per item: 1.0 when the
    output hallucinates an object, 0.0 when not, None when its image is not in the annotations."""

    name = "chair"

    def __init__(self, instances: str | None = None, captions: str | None = None):
        if not instances:
            raise ConfigError("scorer 'chair' needs the option instances=PATH (COCO annotations/instances_val2014."
                              "json); captions=PATH (captions_val2014.json) is optional, the published CHAIR uses both")  # fmt: skip
        self.instances, self.captions = instances, captions

    def check(self, items: list[dict], lang: str) -> None:
        _check_english(lang, "scorer 'chair'")

    def score(self, items: list[dict], lang: str) -> Scores:
        _check_english(lang, "scorer 'chair'")
        outputs = [(item["image"], item["output"]) for item in items]
        result, objects = _scored(outputs, self.instances, self.captions)
        nan = None  # undefined rates (nothing mentioned) stay visible as null (JSON has no NaN), never 0
        return Scores(
            {"chair_s": nan if result["chair_s"] is None else result["chair_s"],
             "chair_i": nan if result["chair_i"] is None else result["chair_i"]},
            per_item=[None if item["missing"] else float(item["chair_s"]) for item in result["items"]],
            details={key: result[key] for key in ("captions", "mentions", "hallucinated", "hallucinated_captions",
                                                   "missing_images", "missing_image_ids")}
            | {"items": result["items"], "instances": objects.instances, "captions_file": objects.captions,
               "synonyms": SYNONYM_SOURCE},
        )  # fmt: skip
