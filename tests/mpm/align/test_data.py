"""Preference pairs from every supported format: read, detected, bad rows counted by reason, images opened lazily."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mpm.align.data import PreferencePair, open_image, read_preferences
from mpm.core.errors import ConfigError, DataError
from mpm.core.images import ImageError

RED, BLUE = (255, 0, 0), (0, 0, 255)


def png(colour=RED, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (4, 3), colour).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records))
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_design_jsonl_is_read_with_images_beside_the_file(tmp_path):
    (tmp_path / "a.png").write_bytes(png(BLUE))
    data = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {
                "id": "p1",
                "image": "a.png",
                "question": "<image>\n图里有什么？",
                "chosen": "一只猫。",
                "rejected": "两只狗。",
                "lang": "zh",
                "source": "human",
            },
            {"id": "p2", "image": None, "question": "Что это?", "chosen": "Кошка.", "rejected": "Собака."},
        ],
    )
    prefs = read_preferences(data)
    assert prefs.format == "mpm" and len(prefs) == 2 and prefs.skipped == []
    first, second = prefs.pairs
    assert (first.id, first.question, first.chosen, first.rejected, first.lang) == (
        "p1",
        "图里有什么？",
        "一只猫。",
        "两只狗。",
        "zh",
    )
    assert first.image == tmp_path / "a.png" and first.extra == {"source": "human"}
    assert first.source == f"{data} line 1"
    assert open_image(first).getpixel((0, 0)) == BLUE
    assert second.image is None and second.lang is None


def test_relative_images_are_found_under_the_images_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "sub").mkdir()
    (folder / "sub" / "a.png").write_bytes(png())
    data = write_jsonl(
        tmp_path / "pairs.jsonl", [{"image": "sub/a.png", "question": "q", "chosen": "a", "rejected": "b"}]
    )
    assert read_preferences(data, images=folder).pairs[0].image == folder / "sub" / "a.png"
    # without the folder the image is looked for beside the file: a counted skip, not a crash
    prefs = read_preferences(data)
    assert prefs.pairs == [] and prefs.counts == {"missing_image": 1}
    assert "sub/a.png" in prefs.skipped[0].detail and prefs.skipped[0].where == f"{data} line 1"


def test_rlhfv_parquet_reads_the_text_json_and_embedded_image(tmp_path):
    text = {
        "question": "<image>\nDescribe the image.",
        "chosen": "A red square.",
        "rejected": "A blue circle.",
        "logps": [1.0, 2.0],
    }
    data = write_parquet(
        tmp_path / "RLHF-V-Dataset.parquet",
        [
            {
                "image": {"bytes": png(RED), "path": None},
                "text": json.dumps(text),
                "origin_dataset": "OK-VQA",
                "origin_split": "train",
                "idx": 7,
                "image_path": "ok/7.jpg",
            }
        ],
    )
    prefs = read_preferences(data)
    assert prefs.format == "rlhfv" and len(prefs) == 1, prefs.skipped
    pair = prefs.pairs[0]
    assert (pair.id, pair.question, pair.chosen, pair.rejected) == (
        "7",
        "Describe the image.",
        "A red square.",
        "A blue circle.",
    )
    assert isinstance(pair.image, bytes)
    assert pair.extra == {
        "origin_dataset": "OK-VQA",
        "origin_split": "train",
        "image_path": "ok/7.jpg",
        "logps": [1.0, 2.0],
    }
    assert open_image(pair).getpixel((1, 1)) == RED


def test_rlaifv_parquet_reads_its_columns(tmp_path):
    rows = [
        {
            "ds_name": "RLAIF-V",
            "image": {"bytes": png(BLUE), "path": "x.jpg"},
            "question": "What colour is it?",
            "chosen": "Blue.",
            "rejected": "Green.",
            "origin_dataset": "COCO",
            "origin_split": '{"model": "llava"}',
            "idx": 3,
            "image_path": "coco/3.jpg",
        },
        {
            "ds_name": "RLAIF-V",
            "image": {"bytes": png(RED, "RGBA"), "path": "y.png"},
            "question": "Colour?",
            "chosen": "Red.",
            "rejected": "Pink.",
            "origin_dataset": "VQA",
            "origin_split": "{}",
            "idx": 4,
            "image_path": "vqa/4.jpg",
        },
    ]
    prefs = read_preferences(write_parquet(tmp_path / "RLAIF-V-Dataset_000.parquet", rows))
    assert prefs.format == "rlaifv" and [p.id for p in prefs] == ["3", "4"] and prefs.skipped == []
    assert prefs.pairs[0].extra == {
        "ds_name": "RLAIF-V",
        "origin_dataset": "COCO",
        "origin_split": '{"model": "llava"}',
        "image_path": "coco/3.jpg",
    }
    assert open_image(prefs.pairs[0]).getpixel((0, 0)) == BLUE
    assert open_image(prefs.pairs[1]).mode == "RGB"


def test_llamafactory_sharegpt_json_and_role_content_jsonl_and_alpaca(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    sharegpt = tmp_path / "dpo_mm.json"
    sharegpt.write_text(
        json.dumps(
            [
                {
                    "conversations": [
                        {"from": "system", "value": "Be exact."},
                        {"from": "human", "value": "<image>Qu'y a-t-il ?"},
                    ],
                    "chosen": {"from": "gpt", "value": "Un carré rouge."},
                    "rejected": {"from": "gpt", "value": "Un chat."},
                    "images": ["a.png"],
                },
            ]
        )
    )
    prefs = read_preferences(sharegpt)
    assert prefs.format == "llamafactory" and len(prefs) == 1, prefs.skipped
    pair = prefs.pairs[0]
    assert (pair.question, pair.chosen, pair.rejected) == ("Qu'y a-t-il ?", "Un carré rouge.", "Un chat.")
    assert pair.image == tmp_path / "a.png" and pair.extra == {"system": "Be exact."} and pair.id == "dpo_mm-0"

    messages = write_jsonl(
        tmp_path / "mm.jsonl",
        [
            {
                "messages": [{"role": "user", "content": "<image>ما هذا؟"}],
                "chosen": {"role": "assistant", "content": "مربع."},
                "rejected": "دائرة.",
                "images": ["a.png"],
            },
        ],
    )
    pair = read_preferences(messages).pairs[0]
    assert (pair.question, pair.chosen, pair.rejected) == ("ما هذا؟", "مربع.", "دائرة.")

    alpaca = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {
                "instruction": "<image>यह क्या है?",
                "input": "एक शब्द में।",
                "chosen": "वर्ग",
                "rejected": "गोला",
                "images": [],
            },
        ],
    )
    prefs = read_preferences(alpaca)
    assert prefs.format == "llamafactory" and prefs.pairs[0].question == "यह क्या है?\nएक शब्द में।"
    assert prefs.pairs[0].image is None


def test_trl_conversational_jsonl_and_standard_parquet(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    conv = write_jsonl(
        tmp_path / "trl.jsonl",
        [
            {
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "ภาพนี้คืออะไร"}]}],
                "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "สี่เหลี่ยมสีแดง"}]}],
                "rejected": [{"role": "assistant", "content": "แมว"}],
                "images": ["a.png"],
            },
        ],
    )
    prefs = read_preferences(conv)
    assert prefs.format == "trl" and len(prefs) == 1, prefs.skipped
    pair = prefs.pairs[0]
    assert (pair.question, pair.chosen, pair.rejected, pair.image) == (
        "ภาพนี้คืออะไร",
        "สี่เหลี่ยมสีแดง",
        "แมว",
        tmp_path / "a.png",
    )

    table = write_parquet(
        tmp_path / "trl.parquet",
        [
            {
                "prompt": "<image>What is it?",
                "chosen": "A square.",
                "rejected": "A cat.",
                "images": [{"bytes": png(BLUE), "path": None}],
            },
        ],
    )
    prefs = read_preferences(table)
    assert prefs.format == "trl" and prefs.pairs[0].question == "What is it?"
    assert open_image(prefs.pairs[0]).getpixel((0, 0)) == BLUE


@pytest.mark.parametrize(
    "question, clean",
    [
        ("<image>\nWhat is this?", "What is this?"),
        ("What is this?\n<image>", "What is this?"),
        ("Look at <image> here.", "Look at here."),
        ("  plain question  ", "plain question"),
    ],
)
def test_the_image_placeholder_is_removed_from_questions(tmp_path, question, clean):
    data = write_jsonl(tmp_path / "p.jsonl", [{"question": question, "chosen": "a", "rejected": "b"}])
    assert read_preferences(data).pairs[0].question == clean


def test_every_bad_row_reason_is_counted_and_the_good_rows_kept(tmp_path, caplog):
    (tmp_path / "ok.png").write_bytes(png())
    good = {"image": "ok.png", "question": "q", "chosen": "yes", "rejected": "no"}
    data = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            good,
            "{not json",  # bad_json
            {"question": "q", "rejected": "no"},  # missing_field
            {"question": "q", "chosen": "", "rejected": "no"},  # empty
            {"question": "<image>", "chosen": "a", "rejected": "b"},  # empty (only the placeholder)
            {"question": "q", "chosen": "same", "rejected": " same\n"},  # identical
            {"image": "gone.png", "question": "q", "chosen": "a", "rejected": "b"},  # missing_image
            {"question": "q", "chosen": 3, "rejected": "b"},  # bad_field
            [1, 2],  # bad_field: not an object
            good,
        ],
    )
    with caplog.at_level("WARNING"):
        prefs = read_preferences(data)
    assert len(prefs) == 2
    assert prefs.counts == {
        "bad_json": 1,
        "missing_field": 1,
        "empty": 2,
        "identical": 1,
        "missing_image": 1,
        "bad_field": 2,
    }
    assert [s.where for s in prefs.skipped][:2] == [f"{data} line 2", f"{data} line 3"]
    assert "skipping preference row" in caplog.text and "identical" in caplog.text
    assert "9 rows skipped" not in prefs.summary() and "8 rows skipped" in prefs.summary()


def test_identical_pairs_are_skipped_because_they_give_no_gradient(tmp_path):
    rows = [
        {"question": "q", "chosen": "A cat.", "rejected": "A cat.", "image": {"bytes": png(), "path": None}, "idx": 1},
        {"question": "q", "chosen": "A cat.", "rejected": "A dog.", "image": {"bytes": png(), "path": None}, "idx": 2},
    ]
    prefs = read_preferences(write_parquet(tmp_path / "rlaif.parquet", rows))
    assert [p.id for p in prefs] == ["2"] and prefs.counts == {"identical": 1}


def test_undecodable_image_bytes_are_counted(tmp_path):
    rows = [
        {"question": "q", "chosen": "a", "rejected": "b", "image": {"bytes": b"\x89PNG not really", "path": None}},
        # a PNG cut short: the header opens, the data does not (caught by verify, without decoding pixels)
        {"question": "q", "chosen": "a", "rejected": "b", "image": {"bytes": png()[:-12], "path": None}},
        {"question": "q", "chosen": "a", "rejected": "b", "image": {"bytes": png(), "path": None}},
    ]
    prefs = read_preferences(write_parquet(tmp_path / "rlaif.parquet", rows))
    assert len(prefs) == 1 and prefs.counts == {"bad_image": 2}
    assert [s.where[-5:] for s in prefs.skipped] == ["row 0", "row 1"]


def test_rlhfv_text_that_is_not_json_is_counted(tmp_path):
    rows = [
        {"image": {"bytes": png(), "path": None}, "text": "{broken", "idx": 0},
        {
            "image": {"bytes": png(), "path": None},
            "text": json.dumps({"question": "q", "chosen": "a", "rejected": "b"}),
            "idx": 1,
        },
    ]
    prefs = read_preferences(write_parquet(tmp_path / "rlhfv.parquet", rows))
    assert prefs.format == "rlhfv" and [p.id for p in prefs] == ["1"] and prefs.counts == {"bad_json": 1}


def test_multi_turn_prompts_and_several_images_are_counted(tmp_path):
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(png())
    data = write_jsonl(
        tmp_path / "lf.jsonl",
        [
            {
                "conversations": [
                    {"from": "human", "value": "hi"},
                    {"from": "gpt", "value": "hello"},
                    {"from": "human", "value": "<image>and this?"},
                ],
                "chosen": {"from": "gpt", "value": "x"},
                "rejected": {"from": "gpt", "value": "y"},
            },
            {
                "conversations": [{"from": "human", "value": "<image><image>compare"}],
                "chosen": {"from": "gpt", "value": "x"},
                "rejected": {"from": "gpt", "value": "y"},
                "images": ["a.png", "b.png"],
            },
            {
                "conversations": [{"from": "human", "value": "<image>one"}],
                "chosen": {"from": "gpt", "value": "x"},
                "rejected": {"from": "gpt", "value": "y"},
                "images": ["b.png"],
            },
        ],
    )
    prefs = read_preferences(data)
    assert prefs.counts == {"multi_turn": 1, "multi_image": 1} and prefs.pairs[0].image == tmp_path / "b.png"


def test_an_unknown_format_names_the_file_and_the_keys_found(tmp_path):
    data = write_jsonl(tmp_path / "odd.jsonl", [{"caption": "x", "url": "http://example.invalid/1.jpg"}])
    with pytest.raises(DataError, match=r"odd\.jsonl.*found keys \['caption', 'url'\]"):
        read_preferences(data)
    table = write_parquet(tmp_path / "odd.parquet", [{"response_a": "x", "response_b": "y"}])
    with pytest.raises(DataError, match=r"found keys \['response_a', 'response_b'\]"):
        read_preferences(table)


def test_the_format_comes_from_the_first_record_that_has_one(tmp_path):
    data = write_jsonl(
        tmp_path / "p.jsonl",
        [
            "{bad",
            {"question": "q0", "chosen": "a"},  # no rejected: matches no format yet, skipped
            {"question": "q1", "chosen": "a", "rejected": "b"},
            {"question": "q2", "chosen": "c"},  # the format is known now: an mpm row missing a field
        ],
    )
    prefs = read_preferences(data)
    assert prefs.format == "mpm" and [p.question for p in prefs] == ["q1"]
    assert [(s.where.rsplit(" ", 1)[-1], s.reason) for s in prefs.skipped] == [
        ("1", "bad_json"),
        ("2", "missing_field"),
        ("4", "missing_field"),
    ]
    assert "no 'rejected'" in prefs.skipped[1].detail
    # no record in any format: the whole file is refused, naming the keys of every record
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "chosen": "a"}, {"caption": "x"}])
    with pytest.raises(DataError, match=r"not a preference format.*found keys \['caption', 'chosen', 'question'\]"):
        read_preferences(odd)


def test_whole_file_problems_raise(tmp_path):
    with pytest.raises(DataError, match="no such preference file"):
        read_preferences(tmp_path / "missing.jsonl")
    csv = tmp_path / "pairs.csv"
    csv.write_text("question,chosen,rejected\n")
    with pytest.raises(DataError, match=r"\.jsonl, \.json or \.parquet.*'\.csv'"):
        read_preferences(csv)
    empty = write_jsonl(tmp_path / "empty.jsonl", ["{bad", "{worse"])
    with pytest.raises(DataError, match=r"no preference records \(2 unreadable rows\)"):
        read_preferences(empty)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable parquet file"):
        read_preferences(broken)
    good = write_jsonl(tmp_path / "ok.jsonl", [{"question": "q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match="is not a folder"):
        read_preferences(good, images=tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="'dpo'"):
        read_preferences(good, fmt="dpo")


def test_a_forced_format_reads_every_row_that_way(tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "chosen": "a", "rejected": "b"}])
    prefs = read_preferences(data, fmt="trl")
    assert prefs.format == "trl" and len(prefs) == 0 and prefs.counts == {"missing_field": 1}


def test_open_image_errors_name_the_pair(tmp_path):
    pair = PreferencePair("p9", b"\x89PNG\r\n\x1a\n truncated", "q", "a", "b", source="x.parquet row 9")
    with pytest.raises(ImageError, match=r"preference pair 'p9' \(x\.parquet row 9\) cannot be decoded"):
        open_image(pair)
    with pytest.raises(DataError, match="has no image"):
        open_image(PreferencePair("p0", None, "q", "a", "b"))
    with pytest.raises(DataError, match="gone.png"):
        open_image(PreferencePair("p1", tmp_path / "gone.png", "q", "a", "b"))
