import io
import json
import re
from pathlib import Path

import pytest

from unimm_chat import Conversation, Message, read_conversations
from unimm_chat.conversations import (
    ConversationFormatError,
    write_hf_dataset,
    write_llava_json,
    write_unimm_jsonl,
)

CONVS = [
    Conversation(
        "000000000285",
        ["000000000285.jpg"],
        [Message("user", "<image>\n这是什么？"), Message("assistant", "一只熊。")],
        "zh",
    ),
    Conversation(
        "two",
        ["a.jpg", "b.jpg"],
        [Message("system", "Be brief."), Message("user", "<image><image>\nCompare."), Message("assistant", "Same.")],
    ),
]


def test_llava_json_round_trip_keeps_images_markers_and_lang(tmp_path):
    write_llava_json(CONVS, tmp_path / "llava.json")
    raw = json.loads((tmp_path / "llava.json").read_text(encoding="utf-8"))
    assert raw[0] == {
        "id": "000000000285",
        "image": "000000000285.jpg",
        "conversations": [{"from": "human", "value": "<image>\n这是什么？"}, {"from": "gpt", "value": "一只熊。"}],
        "lang": "zh",
    }
    assert raw[1]["images"] == ["a.jpg", "b.jpg"] and raw[1]["conversations"][0]["from"] == "system"
    assert list(read_conversations(tmp_path / "llava.json")) == CONVS


def test_unimm_jsonl_and_dataset_folder(tmp_path):
    write_unimm_jsonl(CONVS[:1], tmp_path / "unimm.jsonl")
    line = json.loads((tmp_path / "unimm.jsonl").read_text(encoding="utf-8"))
    assert line["image_name"] == "000000000285" and line["data"][1] == {"from": "gpt", "value": "一只熊。"}
    back = list(read_conversations(tmp_path / "unimm.jsonl"))
    assert back[0].images == ["000000000285.jpg"] and back[0].messages == CONVS[0].messages
    write_hf_dataset(CONVS, tmp_path / "dataset")
    assert list(read_conversations(tmp_path / "dataset")) == CONVS


def test_sharegpt_llama_factory_messages_and_llava_jsonl(tmp_path):
    records = [
        {
            "messages": [
                {"role": "user", "content": "<image>Who are they?"},
                {"role": "assistant", "content": "Players."},
            ],
            "images": ["x.jpg"],
        }
    ]
    (tmp_path / "mllm_demo.json").write_text(json.dumps(records))
    conv = next(read_conversations(tmp_path / "mllm_demo.json"))
    assert (
        conv.images == ["x.jpg"] and conv.messages[0] == Message("user", "<image>Who are they?") and conv.lang is None
    )
    (tmp_path / "llava.jsonl").write_text(
        '{"id": 1, "image": "y.jpg", "conversations": [{"from": "human", "value": "<image>\\nHi"}]}\n\n'
    )
    assert next(read_conversations(tmp_path / "llava.jsonl")).id == "1"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{broken", "not valid JSON"),
        ('"just a string"', "expected a JSON list"),
        ('[{"question": "x"}]', r"not a conversation record.*found keys \['question'\]"),
        ('[{"conversations": [{"from": "robot", "value": "x"}]}]', "turn 0 has from='robot'"),
        ('[{"conversations": [{"value": "x"}]}]', "turn 0 needs 'from' and 'value'"),
        ('[{"image": 3, "conversations": []}]', "images should be a file name"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path, content, message):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(ConversationFormatError, match=message):
        list(read_conversations(tmp_path / "bad.json"))


def png(colour, size=(8, 6)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def unimm_rows() -> list[dict]:
    """Two rows as the released UniMM-Chat parquet files hold them."""
    return [
        {
            "ds_name": "unimm-chat", "image": png((255, 0, 0)), "origin_dataset": "coco", "idx": 7,
            "image_path": "coco/COCO_train2014_000000000009.jpg",  # the name the release gives (the bytes are PNG)
            "conversation": json.dumps([{"from": "human", "value": "What is in the picture?"},
                                        {"from": "gpt", "value": "A red square."}]),
        },
        {
            "ds_name": "unimm-chat", "image": png((0, 0, 255), (5, 9)), "origin_dataset": "vqav2", "idx": 8,
            "image_path": "000000000010.jpg",
            "conversation": json.dumps([{"from": "human", "value": "Look: <image>\nWhat colour?"},
                                        {"from": "gpt", "value": "Blue."}, {"from": "human", "value": "Sure?"},
                                        {"from": "gpt", "value": "Yes."}]),
        },
    ]  # fmt: skip


def write_unimm_parquet(path, rows, struct: bool = True) -> None:
    """`struct`: the image column as a `datasets` Image feature ({"bytes", "path"}), else plain bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {name: [row[name] for row in rows] for name in rows[0]}
    if struct:
        columns["image"] = [None if b is None else {"bytes": b, "path": None} for b in columns["image"]]
        image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    else:
        image_type = pa.binary()
    types = {"image": image_type, "idx": pa.int64()}
    pq.write_table(pa.table({k: pa.array(v, types.get(k, pa.string())) for k, v in columns.items()}), path)


@pytest.mark.parametrize("struct", [True, False], ids=["datasets-image", "bytes"])
def test_released_unimm_chat_parquet_with_its_images(tmp_path, struct):
    from mpm.core.images import open_image

    write_unimm_parquet(tmp_path / "UniMM-Chat_00000000-00000012.parquet", unimm_rows(), struct)
    convs = list(read_conversations(tmp_path / "UniMM-Chat_00000000-00000012.parquet"))
    folder = tmp_path / "UniMM-Chat_00000000-00000012_images"
    assert [c.id for c in convs] == ["7", "8"]
    assert convs[0].images == [str(folder / "coco" / "COCO_train2014_000000000009.jpg")]
    assert convs[1].images == [str(folder / "000000000010.jpg")]
    assert convs[0].messages == [
        Message("user", "<image>\nWhat is in the picture?"),
        Message("assistant", "A red square."),
    ]
    assert convs[1].messages[0] == Message("user", "Look: <image>\nWhat colour?")  # a marker stays where it is
    assert [m.role for m in convs[1].messages] == ["user", "assistant", "user", "assistant"]
    assert convs[1].meta["origin_dataset"] == "vqav2" and convs[1].lang is None
    # On disk, byte for byte; absolute, so `data.image_folder / name` (mpm.data) is the name whatever the folder.
    assert Path(convs[0].images[0]).read_bytes() == unimm_rows()[0]["image"]
    assert open_image(Path("/elsewhere") / convs[1].images[0]).size == (5, 9)
    assert not list(folder.rglob(".*.tmp"))
    # A rerun reads the same conversations and does not write the images again.
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*.jpg")}
    assert list(read_conversations(tmp_path / "UniMM-Chat_00000000-00000012.parquet")) == convs
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*.jpg")} == before


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("conversation", "[{broken", r"row 1 field 'conversation': not valid JSON"),
        ("conversation", '[{"from": "robot", "value": "x"}]', r"row 1 field 'conversation': turn 0 has from='robot'"),
        ("conversation", "[]", r"row 1: field 'conversation' has no turns"),
        ("image", None, r"row 1: field 'image' should hold the image's bytes, got nothing"),
        ("image_path", "../../etc/x.jpg", r"row 1: field 'image_path' '../../etc/x.jpg' is not a relative file name"),
    ],
)
def test_bad_parquet_rows_name_the_file_row_and_field(tmp_path, field, value, message):
    rows = unimm_rows()
    rows[1][field] = value
    write_unimm_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(ConversationFormatError, match=rf"^{re.escape(str(tmp_path / 'bad.parquet'))} {message}"):
        list(read_conversations(tmp_path / "bad.parquet"))


def test_a_file_that_is_not_parquet(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ConversationFormatError, match="broken.parquet: not a readable parquet file"):
        list(read_conversations(tmp_path / "broken.parquet"))
