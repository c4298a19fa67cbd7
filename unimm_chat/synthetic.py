"""Annotation files in the official schemas, written from a small scene model (tests, quickstart, benchmark).

`write_annotations(folder, num_images)` writes COCO captions, VQAv2 and OK-VQA (questions + annotations),
A-OKVQA and Visual Dialog 1.0 files whose contents agree with each other: every image is a scene (a subject, an
activity, an object of some colour, a count of things, a place), captions describe it, questions ask about it with
ten annotator answers that mostly agree, A-OKVQA adds choices and rationales, Visual Dialog ten rounds. Proportions
follow the real datasets (per image: 5 captions, ~3.75 VQAv2 questions; OK-VQA on ~8%, A-OKVQA on ~14% of images),
so `--num-images 118287` gives a COCO-scale set for the benchmark.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson as _json


def _dump(obj, path: Path) -> None:
    path.write_bytes(_json.dumps(obj))


@dataclass(frozen=True)
class Scene:
    place: str
    subject: str  # "man", "dog", ...
    activity: str  # "riding a wave on a surfboard"
    thing: str  # an object with a colour
    counted: str  # plural noun that is counted
    sport_or_use: str  # knowledge answer
    knowledge_q: str
    rationale: str  # why the knowledge answer holds
    choices: tuple[str, ...]  # A-OKVQA distractors (+ the answer)


SCENES = [
    Scene("beach", "man", "riding a wave on a surfboard", "surfboard", "birds", "surfing",
          "What sport is the man doing?", "He is standing on a board on a breaking wave.", ("skiing", "sailing", "swimming")),
    Scene("park", "dog", "catching a frisbee", "frisbee", "trees", "fetch",
          "What game is the dog playing?", "Dogs love chasing a thrown frisbee and bringing it back.", ("hide and seek", "tag", "chess")),
    Scene("street", "bus", "driving down the road", "bus", "cars", "public transport",
          "What is this vehicle used for?", "A large bus carries many passengers around the city.", ("racing", "farming", "camping")),
    Scene("kitchen", "woman", "cutting vegetables on a counter", "knife", "plates", "cooking",
          "What is the woman preparing to do?", "Chopping vegetables is a step in making a meal.", ("painting", "sewing", "cleaning")),
    Scene("living room", "cat", "sleeping on a couch", "couch", "pillows", "resting",
          "Why is the cat lying still?", "Its eyes are closed and it is curled up, so it is asleep.", ("hunting", "eating", "playing")),
    Scene("tennis court", "woman", "swinging a tennis racket", "racket", "balls", "tennis",
          "What sport is being played?", "She holds a racket and there is a net on the court.", ("golf", "baseball", "hockey")),
    Scene("snowy slope", "skier", "skiing down a hill", "jacket", "flags", "winter",
          "What season is it most likely?", "The ground is covered in snow, which happens in winter.", ("summer", "spring", "autumn")),
    Scene("field", "giraffe", "eating leaves from a tree", "fence", "zebras", "africa",
          "Which continent do these animals come from?", "Giraffes and zebras live in the African savanna.", ("europe", "asia", "antarctica")),
    Scene("dining table", "man", "eating a slice of pizza", "pizza", "glasses", "italy",
          "Which country is this food famous in?", "Pizza was first made in Naples, in Italy.", ("japan", "mexico", "india")),
    Scene("train station", "train", "pulling into the platform", "train", "people", "travel",
          "What are the people waiting for?", "People stand on a platform to board the arriving train.", ("a bus", "a plane", "a taxi")),
]  # fmt: skip
COLOURS = ["red", "blue", "white", "black", "green", "yellow", "orange", "brown", "gray"]
CAPTION_TEMPLATES = [
    "A {subject} {activity} at the {place}.",
    "a {colour} {thing} near a {subject} {activity}",
    "There is a {subject} {activity}.",
    "A {subject} is {activity} while {count_word} {counted} are nearby.",
    "The {subject} {activity} next to a {colour} {thing}.",
    "View of a {place} with a {subject} {activity}.",
    "Someone took a picture of a {subject} {activity}.",
]
NUMBER_WORDS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _answers(truth: str, rng: random.Random, alternatives: list[str], agreement: float) -> list[dict]:
    """Ten annotator answers: about `agreement` of them give the truth, the rest an alternative."""
    out = []
    for i in range(10):
        answer = truth if rng.random() < agreement else rng.choice(alternatives)
        out.append({"answer": answer, "answer_confidence": rng.choice(["yes", "yes", "maybe"]), "answer_id": i + 1})
    return out


def _vqa_items(scene: Scene, colour: str, count: int, rng: random.Random) -> list[tuple[str, str, str, str, list[str]]]:
    """(question, truth, answer_type, question_type, alternatives) about a scene."""
    absent = rng.choice(["elephant", "umbrella", "clock", "horse", "bicycle"])
    return [
        (f"What color is the {scene.thing}?", colour, "other", "what color is the", COLOURS),
        (
            f"How many {scene.counted} are there?",
            str(count),
            "number",
            "how many",
            [str(count + 1), str(max(count - 1, 0))],
        ),
        (f"Is there a {scene.subject} in the picture?", "yes", "yes/no", "is there a", ["no"]),
        (
            f"Is there {'an' if absent[0] in 'aeiou' else 'a'} {absent} in the picture?",
            "no",
            "yes/no",
            "is there a",
            ["yes"],
        ),
        (f"Where is the {scene.subject}?", scene.place, "other", "where is the", ["outside", "inside"]),
        (
            f"What is the {scene.subject} doing?",
            scene.activity.split(" ")[0],
            "other",
            "what is the",
            ["standing", "sitting"],
        ),
        ("Is it daytime?", rng.choice(["yes", "no"]), "yes/no", "is it", ["yes", "no"]),
    ]


def write_annotations(
    folder: str | Path,
    num_images: int,
    seed: int = 0,
    first_image_id: int = 9,
    visdial_only_images: int = 0,
    visdial_answer_table: int = 2_000,
) -> dict[str, Path]:
    """Write the five sources' files into `folder`; returns {source name: path}.

    `visdial_only_images` adds images that only Visual Dialog knows (VisDial 1.0 train has 123k images, COCO 2017
    train 118k); `visdial_answer_table` is the size of the answer table its 100 answer options per round index
    (337,527 in VisDial 1.0 train).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    images, captions = [], []
    vqa_q, vqa_a, ok_q, ok_a, aok = [], [], [], [], []
    # Visual Dialog is streamed to disk: with its 100 answer options per round it is the biggest file.
    visdial_path = folder / "visdial_1.0_train.json"
    visdial = open(visdial_path, "wb")  # noqa: SIM115 - closed below, after the tables are written
    visdial.write(b'{"version": "1.0", "split": "train", "data": {"dialogs": [')
    options_rng = np.random.default_rng(seed)

    def add_dialog(image_id: int, caption: str, rounds: list[tuple[str, str]]) -> None:
        turns = []
        for q, a in rounds:
            options = options_rng.integers(0, visdial_answer_table, 100)  # 100 candidate answers per round
            gt = int(options_rng.integers(0, 100))
            options[gt] = table(vd_answers, a)
            turns.append(
                {
                    "question": table(vd_questions, q),
                    "answer": int(options[gt]),
                    "answer_options": options,
                    "gt_index": gt,
                }
            )
        if visdial.tell() > 60:
            visdial.write(b",")
        visdial.write(
            _json.dumps({"image_id": image_id, "caption": caption, "dialog": turns}, option=_json.OPT_SERIALIZE_NUMPY)
        )

    vd_questions: dict[str, int] = {}
    vd_answers: dict[str, int] = {}

    def table(store: dict[str, int], text: str) -> int:
        return store.setdefault(text, len(store))

    ids = [first_image_id + 7 * i for i in range(num_images + visdial_only_images)]
    for n, image_id in enumerate(ids):
        if n >= num_images:  # only in Visual Dialog
            scene = SCENES[rng.randrange(len(SCENES))]
            rounds = [
                ("is the photo in color", "yes"),
                (f"is there a {scene.subject}", "yes"),
                ("is it sunny", "i think so"),
            ]
            add_dialog(image_id, f"a {scene.subject} {scene.activity}", rounds * 3 + rounds[:1])
            continue
        scene = SCENES[rng.randrange(len(SCENES))]
        colour, count = rng.choice(COLOURS), rng.randint(0, 6)
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": 480, "width": 640})
        for k, template in enumerate(rng.sample(CAPTION_TEMPLATES, 5)):
            text = template.format(
                subject=scene.subject, activity=scene.activity, place=scene.place, colour=colour,
                thing=scene.thing, counted=scene.counted, count_word=NUMBER_WORDS[count],
            )  # fmt: skip
            captions.append({"image_id": image_id, "id": 10 * image_id + k, "caption": text})
        items = _vqa_items(scene, colour, count, rng)
        for k, (question, truth, answer_type, question_type, alternatives) in enumerate(
            rng.sample(items, rng.choice([3, 4, 4, 4]))
        ):
            qid = image_id * 1000 + k
            agreement = rng.choice([1.0, 0.9, 0.9, 0.8, 0.7, 0.6])  # how many of the 10 annotators give the truth
            vqa_q.append({"image_id": image_id, "question": question, "question_id": qid})
            vqa_a.append({
                "question_id": qid, "image_id": image_id, "question_type": question_type, "answer_type": answer_type,
                "multiple_choice_answer": truth, "answers": _answers(truth, rng, alternatives, agreement),
            })  # fmt: skip
        if n % 12 == 0:  # OK-VQA: ~8% of images
            qid = image_id * 1000 + 500
            ok_q.append({"image_id": image_id, "question": scene.knowledge_q, "question_id": qid})
            answers = _answers(scene.sport_or_use, rng, list(scene.choices), 0.8)
            for a in answers:
                a["raw_answer"] = a["answer"]
            ok_a.append({
                "question_id": qid, "image_id": image_id, "question_type": "other", "answer_type": "other",
                "multiple_choice_answer": scene.sport_or_use, "answers": answers,
            })  # fmt: skip
        if n % 7 == 3:  # A-OKVQA: ~14% of images
            choices = [scene.sport_or_use, *scene.choices]
            rng.shuffle(choices)
            aok.append({
                "split": "train", "image_id": image_id, "question_id": f"aok{image_id}", "question": scene.knowledge_q,
                "choices": choices, "correct_choice_idx": choices.index(scene.sport_or_use),
                "direct_answers": [a["answer"] for a in _answers(scene.sport_or_use, rng, list(scene.choices), 0.8)],
                "difficult_direct_answer": False,
                "rationales": [scene.rationale, f"The picture shows a {scene.subject} {scene.activity}.",
                               f"You can tell from the {scene.place}."],
            })  # fmt: skip
        rounds = [
            ("is the photo in color", "yes"), (f"how many {scene.counted} are there", str(count)),
            (f"what color is the {scene.thing}", colour), (f"is the {scene.subject} {scene.activity.split(' ')[0]}", "yes, it is"),
            ("is it sunny", rng.choice(["yes", "no, it looks cloudy", "i think so"])), ("are there any people", rng.choice(["yes, a few", "no", "i can't tell"])),
            ("is this indoors", "no" if scene.place not in ("kitchen", "living room") else "yes"),
            (f"can you see the {scene.place}", "yes"), ("is there any text", "no, i don't see any"), ("anything else", "not really"),
        ]  # fmt: skip
        add_dialog(image_id, captions[-1]["caption"].lower().rstrip("."), rounds)

    paths = {
        "coco_captions": folder / "captions_train2017.json",
        "vqav2_questions": folder / "v2_OpenEnded_mscoco_train2014_questions.json",
        "vqav2_annotations": folder / "v2_mscoco_train2014_annotations.json",
        "okvqa_questions": folder / "OpenEnded_mscoco_train2014_questions.json",
        "okvqa_annotations": folder / "mscoco_train2014_annotations.json",
        "aokvqa": folder / "aokvqa_v1p0_train.json",
        "visdial": visdial_path,
    }
    info = {"description": "synthetic annotations written by unimm_chat.synthetic", "version": "1.0"}
    _dump({"info": info, "images": images, "annotations": captions}, paths["coco_captions"])
    _dump(
        {"info": info, "task_type": "Open-Ended", "data_type": "mscoco", "questions": vqa_q}, paths["vqav2_questions"]
    )
    _dump({"info": info, "data_type": "mscoco", "annotations": vqa_a}, paths["vqav2_annotations"])
    _dump({"info": info, "questions": ok_q}, paths["okvqa_questions"])
    _dump({"info": info, "annotations": ok_a}, paths["okvqa_annotations"])
    _dump(aok, paths["aokvqa"])
    answers = list(vd_answers) + [f"answer option {i}" for i in range(len(vd_answers), visdial_answer_table)]
    visdial.write(
        b'], "questions": ' + _json.dumps(list(vd_questions)) + b', "answers": ' + _json.dumps(answers) + b"}}"
    )
    visdial.close()
    return paths
