import json
import re

import pytest

from mpm.core.config import load_config
from mpm.core.errors import ConfigError
from unimm_chat.config import TranslateConfig
from unimm_chat.conversations import Conversation, Message, write_llava_json
from unimm_chat.translate import segments, translate

SOURCE = [
    Conversation(
        "1",
        ["1.jpg"],
        [
            Message("user", "<image>\nWhat is happening in this picture?"),
            Message("assistant", "A man is riding a big wave on a red surfboard.\n\nThe water looks cold."),
            Message("user", "Is it daytime?"),
            Message("assistant", "Yes, the sun is shining brightly over the beach."),
        ],
        "en",
    ),
    Conversation(
        "2",
        ["2.jpg"],
        [
            Message("user", "<image>\nDescribe the image."),
            Message("assistant", "A cat is sleeping on a soft couch near the window."),
        ],
        "en",
    ),
]
CHINESE = "这张图片里有一个人在海上冲浪，天气很好。"


def test_segments_keep_markers_lines_and_spaces():
    pieces = segments("<image>\n  Hello there. \n\nBye")
    assert pieces == [("<image>", False), ("\n", False), ("  ", False), ("Hello there.", True), (" ", False),
                      ("\n", False), ("\n", False), ("Bye", True)]  # fmt: skip
    assert "".join(p for p, _ in pieces) == "<image>\n  Hello there. \n\nBye"
    assert segments("2.") == [("2.", False)]  # nothing to translate in numbers and punctuation


def mt_config(tmp_path, base_url, langs, **extra):
    write_llava_json(SOURCE, tmp_path / "llava.json")
    flags = {"input": str(tmp_path / "llava.json"), "output": str(tmp_path / "mt"), "langs": langs, "backend": "openai"}
    flags.update({"model": "fake-mt", "openai.base_url": base_url, "openai.retries": 1, "openai.backoff_s": 0.01})
    flags.update(extra)
    return load_config(TranslateConfig, None, flags)


def test_translation_keeps_structure_and_rejects_what_is_not_the_target_language(tmp_path, chat_server):
    def respond(body):
        prompt = body["messages"][0]["content"]
        target = re.search(r"to (\w+)", prompt).group(1)
        text = prompt.rsplit("\n\n", 1)[1]
        if target == "German":
            return text  # a model that returns the source language
        if "cat" in text:
            return 400, b'{"error": "refused"}'
        return CHINESE

    server = chat_server(respond)
    stats = translate(mt_config(tmp_path, server.base_url, ["zh", "de"]), show_progress=False)
    zh, de = stats["languages"]["zh"], stats["languages"]["de"]
    assert zh["translated"] == 1 and zh["rejections"] == {"translation_failed": 1}
    assert de["translated"] == 0 and de["rejections"] == {"wrong_language": 2}
    out = json.loads((tmp_path / "mt" / "llava.zh.json").read_text(encoding="utf-8"))
    turns = out[0]["conversations"]
    assert (
        out[0]["lang"] == "zh"
        and out[0]["image"] == "1.jpg"
        and [t["from"] for t in turns] == ["human", "gpt", "human", "gpt"]
    )
    assert turns[0]["value"] == f"<image>\n{CHINESE}"
    assert turns[1]["value"] == f"{CHINESE}\n\n{CHINESE}"  # two lines, translated one by one, blank line kept
    assert stats["unique_segments"] == 7

    # A rerun translates only what failed (the refused segment), in each language.
    asked = len(server.requests)
    again = translate(mt_config(tmp_path, server.base_url, ["zh", "de"]), show_progress=False)
    assert again["languages"]["zh"]["segments_from_cache"] == 6 and again["languages"]["zh"]["segments_translated"] == 1
    assert again["languages"]["de"]["segments_from_cache"] == 7
    assert len(server.requests) - asked == 1  # the refused segment, asked again (a 400 is not retried within a run)
    # Settings that change translations are part of the cache key: other settings, new translations.
    other = translate(mt_config(tmp_path, server.base_url, ["zh"], **{"openai.max_tokens": 99}), show_progress=False)
    assert other["languages"]["zh"]["segments_translated"] == 7


def test_a_translation_that_invents_an_image_marker_is_rejected(tmp_path, chat_server):
    server = chat_server(lambda body: f"{CHINESE} <image>")
    stats = translate(mt_config(tmp_path, server.base_url, ["zh"]), show_progress=False)
    assert stats["languages"]["zh"]["rejections"] == {"image_token": 2}


def test_hf_backend_with_a_tiny_random_m2m100(tmp_path, tiny_m2m100):
    write_llava_json(SOURCE, tmp_path / "llava.json")
    flags = {"input": str(tmp_path / "llava.json"), "output": str(tmp_path / "mt"), "langs": ["zh"], "backend": "hf"}
    flags.update({"model": str(tiny_m2m100), "hf.max_new_tokens": 8, "hf.batch_size": 4})
    stats = translate(load_config(TranslateConfig, None, flags), show_progress=False)
    zh = stats["languages"]["zh"]
    assert zh["segments_translated"] == 7  # a random model's output is not Chinese: rejected, counted, not fatal
    assert zh["translated"] + sum(zh["rejections"].values()) == 2


def test_config_errors():
    with pytest.raises(ConfigError, match=r"unknown language codes \['chinese'\]"):
        load_config(TranslateConfig, None, {"langs": ["chinese"]})
    with pytest.raises(ConfigError, match=r"unknown language codes \['la'\]"):  # fastText knows Latin, NLLB does not
        load_config(TranslateConfig, None, {"langs": ["la"]})
    cfg = load_config(TranslateConfig, None, {"input": "x", "output": "y", "model": "m", "langs": ["en"]})
    with pytest.raises(ConfigError, match="includes the source language"):
        cfg.check_required()


def test_cli_translate(tmp_path, chat_server, capsys):
    from mpm.cli import main

    server = chat_server(lambda body: CHINESE)
    write_llava_json(SOURCE, tmp_path / "llava.json")
    args = ["unimm", "translate", "--input", str(tmp_path / "llava.json"), "--langs", "zh", "--backend", "openai",
            "--base-url", server.base_url, "--model", "fake-mt", "--output", str(tmp_path / "mt"), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "zh: 2 of 2 conversations (rejected: none)" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "mt" / "llava.zh.json").read_text(encoding="utf-8"))) == 2
    assert main([*args[:3], str(tmp_path / "missing.json"), *args[4:]]) == 2
    assert "no such file or folder" in capsys.readouterr().err
