import json

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
