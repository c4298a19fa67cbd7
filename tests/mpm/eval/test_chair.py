"""CHAIR on hand-made COCO annotation files: object matching (every class, plurals, phrases, the reference's special
cases), CHAIR_s / CHAIR_i computed by hand, missing images, the scorer and evaluate_chair."""

from __future__ import annotations

import json

import pytest

from mpm.core.errors import ConfigError, DataError
from mpm.eval.chair import ChairScorer, CocoObjects, chair, coco_image_id, evaluate_chair, mentioned_objects
from mpm.eval.coco_objects import COCO_SYNONYMS
from mpm.eval.scorers import SCORERS

# The 80 COCO classes with their plurals, written out by hand (not by the code under test).
CLASS_PLURALS = {
    "person": "people", "bicycle": "bicycles", "car": "cars", "motorcycle": "motorcycles", "airplane": "airplanes",
    "bus": "buses", "train": "trains", "truck": "trucks", "boat": "boats", "traffic light": "traffic lights",
    "fire hydrant": "fire hydrants", "stop sign": "stop signs", "parking meter": "parking meters", "bench": "benches",
    "bird": "birds", "cat": "cats", "dog": "dogs", "horse": "horses", "sheep": "sheep", "cow": "cows",
    "elephant": "elephants", "bear": "bears", "zebra": "zebras", "giraffe": "giraffes", "backpack": "backpacks",
    "umbrella": "umbrellas", "handbag": "handbags", "tie": "ties", "suitcase": "suitcases", "frisbee": "frisbees",
    "skis": "skis", "snowboard": "snowboards", "sports ball": "sports balls", "kite": "kites",
    "baseball bat": "baseball bats", "baseball glove": "baseball gloves", "skateboard": "skateboards",
    "surfboard": "surfboards", "tennis racket": "tennis rackets", "bottle": "bottles", "wine glass": "wine glasses",
    "cup": "cups", "fork": "forks", "knife": "knives", "spoon": "spoons", "bowl": "bowls", "banana": "bananas",
    "apple": "apples", "sandwich": "sandwiches", "orange": "oranges", "broccoli": "broccoli", "carrot": "carrots",
    "hot dog": "hot dogs", "pizza": "pizzas", "donut": "donuts", "cake": "cakes", "chair": "chairs",
    "couch": "couches", "potted plant": "potted plants", "bed": "beds", "dining table": "dining tables",
    "toilet": "toilets", "tv": "tvs", "laptop": "laptops", "mouse": "mice", "remote": "remotes",
    "keyboard": "keyboards", "cell phone": "cell phones", "microwave": "microwaves", "oven": "ovens",
    "toaster": "toasters", "sink": "sinks", "refrigerator": "refrigerators", "book": "books", "clock": "clocks",
    "vase": "vases", "scissors": "scissors", "teddy bear": "teddy bears", "hair drier": "hair driers",
    "toothbrush": "toothbrushes",
}  # fmt: skip


def test_table_has_the_80_coco_classes():
    assert list(COCO_SYNONYMS) == list(CLASS_PLURALS)
    assert len(COCO_SYNONYMS) == 80


@pytest.mark.parametrize("cls", list(CLASS_PLURALS))
def test_every_class_and_synonym_maps_to_its_class(cls):
    plural = CLASS_PLURALS[cls]
    assert mentioned_objects(f"There is a {cls} here.") == [(cls, cls)]
    assert mentioned_objects(f"There are two {plural.upper()} on the left.") == [(plural, cls)]
    for synonym in COCO_SYNONYMS[cls]:
        assert mentioned_objects(f"Look at the {synonym}!") == [(synonym, cls)], synonym


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two dogs and a puppy.", [("dogs", "dog"), ("puppy", "dog")]),
        ("A man eating a hot dog.", [("man", "person"), ("hot dog", "hot dog")]),
        ("Hot dogs on a grill", [("hot dogs", "hot dog")]),
        ("teddy bears on a bed", [("teddy bears", "teddy bear"), ("bed", "bed")]),
        ("A woman talks on a cell phone.", [("woman", "person"), ("cell phone", "cell phone")]),
        ("A motorbike and two motor bikes", [("motorbike", "motorcycle"), ("motor bikes", "motorcycle")]),
        ("men, women and children", [("men", "person"), ("women", "person"), ("children", "person")]),
        ("puppies, ponies, geese, oxen, calves, mice", [("puppies", "dog"), ("ponies", "horse"), ("geese", "bird"),
                                                         ("oxen", "cow"), ("calves", "cow"), ("mice", "mouse")]),
        ("two buses and wine glasses", [("buses", "bus"), ("wine glasses", "wine glass")]),
        ("knives and forks", [("knives", "knife"), ("forks", "fork")]),
        ("three policemen and two ladies", [("policemen", "person"), ("ladies", "person")]),
        ("The dog's bowl", [("dog", "dog"), ("bowl", "bowl")]),
        ("a stove top oven", [("stove top oven", "oven")]),
        ("A traffic light next to a stop sign and a fire hydrant.",
         [("traffic light", "traffic light"), ("stop sign", "stop sign"), ("fire hydrant", "fire hydrant")]),
    ],
)  # fmt: skip
def test_plurals_and_phrases(text, expected):
    assert mentioned_objects(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("It is hot today.", []),  # "hot" alone is no hot dog
        ("a teddy", []),
        ("a cell wall, a traffic jam, a fire, a wine list", []),
        ("a baby elephant and an adult giraffe", [("baby elephant", "elephant"), ("adult giraffe", "giraffe")]),
        ("baby birds", [("baby birds", "bird")]),  # not a (human) baby
        ("a baby animal", []),
        ("a passenger jet", [("passenger jet", "airplane")]),  # not a passenger
        ("a toilet seat", [("toilet seat", "toilet")]),
        ("the seat next to the toilet", [("toilet", "toilet")]),  # reference: with a toilet, a seat is no chair
        ("a seat", [("seat", "chair")]),
        ("a man with a bow tie", [("man", "person"), ("bow tie", "tie")]),
        ("a man skiing and snowboarding", [("man", "person")]),  # verbs are not singularised into skis
        ("a hot-dog stand, dog-friendly", []),  # hyphenated compounds are one token, as with nltk
        ("scattered categories on a carpet", []),  # whole words only
        ("hot", []),
    ],
)
def test_words_that_must_not_map(text, expected):
    assert mentioned_objects(text) == expected


def test_orange_is_the_fruit_even_as_a_colour():
    """The reference table has no colour rule: an "orange cat" mentions an orange (and hallucinates it when the
    image has no orange). Kept so that numbers stay comparable with published CHAIR."""
    assert mentioned_objects("An orange cat.") == [("orange", "orange"), ("cat", "cat")]


@pytest.mark.parametrize(
    ("image", "image_id"),
    [("COCO_val2014_000000123456.jpg", 123456), ("000000000042.jpg", 42), ("val2014/COCO_val2014_000000000007.jpg", 7),
     ("123", 123), (99, 99)],
)  # fmt: skip
def test_coco_image_id(image, image_id):
    assert coco_image_id(image) == image_id


def test_coco_image_id_rejects_names_without_digits():
    with pytest.raises(DataError, match="cat.jpg"):
        coco_image_id("cat.jpg")


def write_coco(tmp_path):
    """Image 1: a dog and a frisbee (segmentations), a person in its captions. Image 2: a cat and a couch.
    Image 3: listed, no annotation; its caption names a pizza."""
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(COCO_SYNONYMS)]
    cid = {c["name"]: c["id"] for c in categories}
    instances = {
        "images": [{"id": 1, "file_name": "COCO_val2014_000000000001.jpg"}, {"id": 2}, {"id": 3}],
        "categories": categories,
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": cid["dog"]},
            {"id": 11, "image_id": 1, "category_id": cid["dog"]},
            {"id": 12, "image_id": 1, "category_id": cid["frisbee"]},
            {"id": 13, "image_id": 2, "category_id": cid["cat"]},
            {"id": 14, "image_id": 2, "category_id": cid["couch"]},
        ],
    }
    captions = {
        "images": [{"id": 1}, {"id": 2}, {"id": 3}],
        "annotations": [
            {"id": 1, "image_id": 1, "caption": "A man throws a frisbee to his dog."},
            {"id": 2, "image_id": 3, "caption": "Slices of pizza on a plate."},
            {"id": 3, "image_id": 77, "caption": "A giraffe."},  # another split's image: ignored
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    return tmp_path / "instances.json", tmp_path / "captions.json"


def test_ground_truth_from_instances_and_captions(tmp_path):
    instances, captions = write_coco(tmp_path)
    assert CocoObjects.from_files(instances).objects == {
        1: {"dog", "frisbee"}, 2: {"cat", "couch"}, 3: frozenset()}  # fmt: skip
    with_captions = CocoObjects.from_files(instances, captions).objects
    assert with_captions == {1: {"dog", "frisbee", "person"}, 2: {"cat", "couch"}, 3: {"pizza"}}
    assert CocoObjects.from_files(instances, captions, image_ids=[2]).objects == {2: {"cat", "couch"}}


# Hand count (instances + captions): image 1 = {dog, frisbee, person}, image 2 = {cat, couch}, image 3 = {pizza}.
OUTPUTS = [
    ("COCO_val2014_000000000001.jpg", "A man and two dogs play with a frisbee."),  # 3 mentions, 0 hallucinated
    ("000000000001.jpg", "A dog sits on a bench next to a cat."),  # dog ok, bench + cat hallucinated: 3 / 2
    ("COCO_val2014_000000000002.jpg", "A kitten sleeps on the sofa."),  # 2 / 0
    ("COCO_val2014_000000000003.jpg", "A pizza and a wine glass on a table."),  # pizza ok, wine glass + table: 3 / 2
    ("COCO_val2014_000000000002.jpg", "A quiet afternoon."),  # 0 mentions, counts as a caption without hallucination
    ("COCO_val2014_000000000999.jpg", "A dog."),  # not in the annotations: missing, excluded
    ("COCO_val2014_000000000998.jpg", "A cat."),  # missing
]


def test_chair_by_hand(tmp_path):
    objects = CocoObjects.from_files(*write_coco(tmp_path))
    result = chair(OUTPUTS, objects)
    assert (result["captions"], result["mentions"], result["hallucinated"]) == (5, 11, 4)
    assert result["hallucinated_captions"] == 2
    assert result["chair_s"] == pytest.approx(2 / 5)
    assert result["chair_i"] == pytest.approx(4 / 11)
    assert result["missing_images"] == 2 and result["missing_image_ids"] == [998, 999]
    items = result["items"]
    assert items[1]["hallucinated"] == [["bench", "bench"], ["cat", "cat"]]
    assert items[1]["chair_i"] == pytest.approx(2 / 3)
    assert items[3]["hallucinated"] == [["wine glass", "wine glass"], ["table", "dining table"]]
    assert items[4] == {"image_id": 2, "missing": False, "mentioned": [], "hallucinated": [], "chair_s": 0,
                        "chair_i": None}  # fmt: skip
    assert items[5]["missing"] and items[5]["chair_s"] is None


def test_without_captions_the_person_is_hallucinated(tmp_path):
    instances, _ = write_coco(tmp_path)
    result = chair(OUTPUTS[:1], CocoObjects.from_files(instances))
    assert result["items"][0]["hallucinated"] == [["man", "person"]]
    assert result["chair_s"] == 1.0 and result["chair_i"] == pytest.approx(1 / 3)


def test_evaluate_chair_from_a_predictions_file(tmp_path):
    instances, captions = write_coco(tmp_path)
    predictions = tmp_path / "predictions.jsonl"
    lines = [{"image": image, "lang": "en", "output": text, "id": f"q{i}"} for i, (image, text) in enumerate(OUTPUTS)]
    predictions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    results, per_item = evaluate_chair(predictions, instances, captions)
    assert results["task"] == "chair"
    assert results["languages"]["en"] == {"chair_s": pytest.approx(0.4), "chair_i": pytest.approx(4 / 11),
                                          "captions": 5, "mentions": 11, "hallucinated": 4, "missing_images": 2}  # fmt: skip
    assert results["details"]["missing_image_ids"] == [998, 999]
    assert results["details"]["captions"] == str(captions)
    assert [item["id"] for item in per_item] == [f"q{i}" for i in range(7)]
    assert per_item[2]["mentioned"] == [["kitten", "cat"], ["sofa", "couch"]]
    # the same as a list of dicts, lang absent meaning English
    same, _ = evaluate_chair([{"image": image, "output": text} for image, text in OUTPUTS], instances, captions)
    assert same["languages"] == results["languages"]


def test_errors_a_user_can_make(tmp_path):
    instances, captions = write_coco(tmp_path)
    with pytest.raises(DataError, match="English"):
        evaluate_chair([{"image": "000000000001.jpg", "lang": "de", "output": "Ein Hund."}], instances)
    with pytest.raises(DataError, match="right split"):
        evaluate_chair([{"image": "000000000555.jpg", "output": "A dog."}], instances)
    with pytest.raises(DataError, match="`output`"):
        evaluate_chair([{"image": "000000000001.jpg"}], instances)
    with pytest.raises(DataError, match="no such file"):
        evaluate_chair([{"image": "000000000001.jpg", "output": "A dog."}], tmp_path / "nope.json")
    lvis = tmp_path / "lvis.json"
    lvis.write_text(json.dumps({"images": [], "categories": [{"id": 1, "name": "aerosol_can"}], "annotations": []}))
    with pytest.raises(DataError, match="aerosol_can"):
        CocoObjects.from_files(lvis)
    with pytest.raises(ConfigError, match="instances=PATH"):
        ChairScorer()


def test_scorer(tmp_path):
    instances, captions = write_coco(tmp_path)
    assert SCORERS["chair"] is ChairScorer and ChairScorer.kind == "text"  # `--metric chair`
    scorer = ChairScorer(instances=str(instances), captions=str(captions))
    items = [{"image": image, "lang": "en", "output": text, "references": []} for image, text in OUTPUTS]
    scores = scorer.score(items, "en")
    assert scores.values == {"chair_s": pytest.approx(0.4), "chair_i": pytest.approx(4 / 11)}
    assert scores.per_item == [0.0, 1.0, 0.0, 1.0, 0.0, None, None]
    assert scores.details["missing_image_ids"] == [998, 999]
    nothing = scorer.score([{"image": "000000000002.jpg", "output": "Quiet."}], "en")
    assert nothing.values["chair_s"] == 0.0 and nothing.values["chair_i"] is None
    with pytest.raises(DataError, match="English"):
        scorer.score(items, "zh")
