import json

import pytest

from dataproc.vqa_answers import majority_answer, normalize_answer, vqa_accuracy
from unimm_chat.config import SourcesConfig
from unimm_chat.sources import ReadStats, SourceError, merge_sources, question_key


def write(path, obj):
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return str(path)


def vqa_files(tmp_path, name, questions, annotations):
    q = write(tmp_path / f"{name}_q.json", {"questions": questions})
    a = write(tmp_path / f"{name}_a.json", {"annotations": annotations})
    return q, a


def answers(*values):
    return [{"answer": v, "answer_confidence": "yes", "answer_id": i + 1} for i, v in enumerate(values)]


def test_vqa_normalisation_and_accuracy():
    assert normalize_answer("Two dogs!") == "2 dogs"
    assert normalize_answer("the red one.") == "red 1"
    assert normalize_answer("dont know") == "don't know"
    assert majority_answer(["yes", "Yes", "no", "yes"]) == ("yes", 0.75)
    assert majority_answer(["Red", "red", "blue"]) == ("Red", 2 / 3)  # spelling ties go to the first seen
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("2", ["2"] * 10) == 1.0
    assert vqa_accuracy("cat", ["dog"] * 10) == 0.0


def test_every_source_merges_into_one_record_per_image(tmp_path):
    captions = write(
        tmp_path / "captions.json",
        {
            "images": [{"id": 1, "file_name": "000000000001.jpg"}, {"id": 2, "file_name": "000000000002.jpg"}],
            "annotations": [
                {"image_id": 1, "id": 10, "caption": "A man riding a wave."},
                {"image_id": 1, "id": 11, "caption": "  "},  # empty: skipped, counted
                {"image_id": 2, "id": 12, "caption": "一只猫坐在垫子上。"},  # non-ASCII passes through untouched
            ],
        },
    )
    vq, va = vqa_files(
        tmp_path,
        "vqa",
        [
            {"image_id": 1, "question": "What is the man riding?", "question_id": 100},
            {"image_id": 1, "question": "Is it sunny?", "question_id": 101},  # no annotation
        ],
        [
            {
                "question_id": 100,
                "image_id": 1,
                "answer_type": "other",
                "answers": answers(*["wave"] * 7, *["surfboard"] * 3),
            },
            {"question_id": 999, "image_id": 1, "answer_type": "other", "answers": answers("x")},  # no question
        ],
    )
    oq, oa = vqa_files(
        tmp_path,
        "ok",
        [{"image_id": 3, "question": "What sport is this?", "question_id": 300}],  # image 3: in one source only
        [
            {
                "question_id": 300,
                "image_id": 3,
                "answer_type": "other",
                "answers": [{**a, "raw_answer": a["answer"]} for a in answers(*["surfing"] * 10)],
            }
        ],
    )
    aok = write(
        tmp_path / "aokvqa.json",
        [
            {"image_id": 1, "question_id": "a1", "question": "what is the man RIDING", "choices": ["a wave", "a horse"],
             "correct_choice_idx": 0, "direct_answers": ["wave"] * 10, "rationales": ["Water is curling over."]},
            {"image_id": 2, "question_id": "a2", "question": "Test split item?", "choices": ["x"]},  # no answer
        ],
    )  # fmt: skip
    visdial = write(
        tmp_path / "visdial.json",
        {
            "data": {
                "questions": ["is it sunny", "what color is the cat"],
                "answers": ["yes, i think so", "white"],
                "dialogs": [
                    {
                        "image_id": 2,
                        "caption": "a cat on a mat",
                        "dialog": [{"question": 1, "answer": 1}, {"question": 0}],
                    },
                    {"image_id": 4, "caption": "a dog", "dialog": [{"question": 7, "answer": 0}]},  # bad index
                ],
            }
        },
    )
    stats = ReadStats()
    paths = SourcesConfig(captions, vq, va, oq, oa, aok, visdial)
    records = merge_sources(paths, stats)
    assert list(records) == [1, 2, 3, 4]
    one = records[1]
    assert one.file_name == "000000000001.jpg" and one.captions == ["A man riding a wave."]
    assert len(one.qas) == 1  # A-OKVQA and VQAv2 asked the same question: merged, A-OKVQA first
    qa = one.qas[0]
    assert qa.sources == ["aokvqa", "vqav2"] and qa.answer == "a wave" and qa.rationales == ["Water is curling over."]
    assert qa.answers == ["a wave", "wave", "surfboard"]  # accepted: the choice, and answers given at least twice
    assert records[2].captions == ["一只猫坐在垫子上。", "a cat on a mat"]
    assert records[2].qas[0].answer == "white" and records[2].qas[0].sources == ["visdial"]
    assert records[3].qas[0].answer == "surfing" and records[3].file_name is None
    assert records[4].qas == [] and records[4].sources == ["coco_captions"]
    counts = stats.as_dict()
    assert counts["coco_captions"]["skipped_empty_caption"] == 1
    assert counts["vqav2"]["skipped_question_without_annotation"] == 1
    assert counts["vqav2"]["skipped_annotation_without_question"] == 1
    assert counts["vqav2"]["merged_duplicate_question"] == 1
    assert counts["aokvqa"]["skipped_no_answer"] == 1
    assert counts["visdial"]["skipped_no_answer"] == 1 and counts["visdial"]["skipped_bad_index"] == 1
    vqa = records[1].qas[0]
    assert vqa.agreement == 1.0  # A-OKVQA's direct answers agree with its choice


def test_majority_answer_and_agreement_from_vqa(tmp_path):
    vq, va = vqa_files(
        tmp_path,
        "vqa",
        [{"image_id": 5, "question": "How many dogs?", "question_id": 1}],
        [
            {
                "question_id": 1,
                "image_id": 5,
                "answer_type": "number",
                "answers": answers("two", "2", "2", "3", "2", "2", "3", "2", "2", "2"),
            }
        ],
    )
    records = merge_sources(SourcesConfig(vqav2_questions=vq, vqav2_annotations=va), ReadStats())
    qa = records[5].qas[0]
    assert qa.answer == "2" and qa.agreement == 0.8 and qa.answer_type == "number"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", r"not valid JSON"),
        (b'{"images": []}', r"the file has no key 'annotations' \(expected COCO captions"),
        (b'{"images": [{"id": 1}], "annotations": []}', r"images\[0\] has no key 'file_name'"),
        (b"[1, 2]", r"has no key 'images'"),
    ],
)
def test_bad_caption_files_name_the_file_key_and_expectation(tmp_path, content, message):
    path = tmp_path / "captions.json"
    path.write_bytes(content)
    with pytest.raises(SourceError, match=message) as info:
        merge_sources(SourcesConfig(coco_captions=str(path)), ReadStats())
    assert str(path) in str(info.value)


def test_bad_vqa_aokvqa_and_visdial_files(tmp_path):
    q = write(tmp_path / "q.json", {"questions": [{"image_id": 1, "question": "Q?"}]})
    a = write(tmp_path / "a.json", {"annotations": []})
    with pytest.raises(SourceError, match=r"q.json: questions\[0\] has no key 'question_id'"):
        merge_sources(SourcesConfig(vqav2_questions=q, vqav2_annotations=a), ReadStats())
    with pytest.raises(SourceError, match="--vqav2-annotations is missing"):
        merge_sources(SourcesConfig(vqav2_questions=q), ReadStats())
    aok = write(tmp_path / "aok.json", {"questions": []})
    with pytest.raises(SourceError, match="aok.json: expected A-OKVQA: a list"):
        merge_sources(SourcesConfig(aokvqa=aok), ReadStats())
    vd = write(tmp_path / "vd.json", {"data": {"dialogs": []}})
    with pytest.raises(SourceError, match=r"vd.json: data has no key 'questions'"):
        merge_sources(SourcesConfig(visdial=vd), ReadStats())
    with pytest.raises(SourceError, match="no such file"):
        merge_sources(SourcesConfig(visdial=str(tmp_path / "missing.json")), ReadStats())
    with pytest.raises(SourceError, match="no annotation source given"):
        merge_sources(SourcesConfig(), ReadStats())


def test_question_key_ignores_case_punctuation_and_spaces():
    assert question_key("What is the man RIDING?") == question_key("what is the  man riding")
    assert question_key("这是什么？") == "这是什么"


def test_synthetic_files_follow_the_schemas(annotations):
    stats = ReadStats()
    records = merge_sources(SourcesConfig(**{k: str(v) for k, v in annotations.items()}), stats)
    assert len(records) == 40 and all(len(r.captions) >= 5 for r in records.values())
    used = {source: counts.get("used", 0) for source, counts in stats.as_dict().items()}
    assert used["vqav2"] > 100 and used["visdial"] == 400 and used["aokvqa"] > 0 and used["okvqa"] > 0


def test_okvqa_shows_raw_answers_and_counts_each_annotator_once(tmp_path):
    raw = ["racing"] * 6 + ["race car"] * 2 + ["speed"] * 2
    stemmed = ["race"] * 6 + ["race car"] * 2 + ["speed"] * 2
    oq, oa = vqa_files(
        tmp_path,
        "ok",
        [{"image_id": 5, "question": "What sport can you use this for?", "question_id": 1}],
        [{"question_id": 1, "image_id": 5, "answer_type": "other",
          "answers": [{"answer": s, "raw_answer": r, "answer_confidence": "yes", "answer_id": i} for i, (s, r) in enumerate(zip(stemmed, raw))]}],
    )  # fmt: skip
    qa = merge_sources(SourcesConfig(okvqa_questions=oq, okvqa_annotations=oa), ReadStats())[5].qas[0]
    assert qa.answer == "racing" and qa.agreement == 0.6
    assert qa.answers == ["racing", "race"]  # 2 of 10 answers = 1 of OK-VQA's 5 annotators: not accepted


def test_visdial_val_is_refused_beside_coco_sources(tmp_path, annotations):
    val = write(
        tmp_path / "visdial_1.0_val.json",
        {"version": "1.0", "split": "val", "data": {"dialogs": [], "questions": [], "answers": []}},
    )
    with pytest.raises(SourceError, match="VisDial's val split.*Flickr"):
        merge_sources(SourcesConfig(coco_captions=str(annotations["coco_captions"]), visdial=val), ReadStats())
    assert merge_sources(SourcesConfig(visdial=val), ReadStats()) == {}  # alone it is fine


def test_string_image_ids_are_clear_errors(tmp_path):
    vd = write(
        tmp_path / "vd.json",
        {
            "data": {
                "dialogs": [{"image_id": "VisualDialog_val2018_000000254080.jpg", "caption": "x", "dialog": []}],
                "questions": [],
                "answers": [],
            }
        },
    )
    with pytest.raises(
        SourceError, match="vd.json: a dialog has image_id 'VisualDialog_val2018_000000254080.jpg'; expected an integer"
    ):
        merge_sources(SourcesConfig(visdial=vd), ReadStats())
