import io
import json
import re
import shutil
import time

import pytest

import dataproc.translate
from mpm.core.config import load_config
from mpm.core.errors import ConfigError, EndpointError, UserError
from mpm.core.http import ResponseCache
from tests.unimm_chat.conftest import CORPUS
from unimm_chat.config import TranslateConfig
from unimm_chat.conversations import Conversation, Message, write_llava_json
from unimm_chat.translate import FIRST_BATCH, WrongOutputLanguage, segments, translate

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
GERMAN = "Ein Mann reitet auf einer großen Welle."


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
            return text if text.startswith(("Describe", "A cat")) else GERMAN  # conversation 2 left in English
        if "cat" in text:
            return 400, b'{"error": "refused"}'
        return CHINESE

    server = chat_server(respond)
    stats = translate(mt_config(tmp_path, server.base_url, ["zh", "de"]), show_progress=False)
    zh, de = stats["languages"]["zh"], stats["languages"]["de"]
    assert zh["translated"] == 1 and zh["rejections"] == {"translation_failed": 1}
    assert de["translated"] == 1 and de["rejections"] == {"wrong_language": 1}
    assert re.fullmatch(r"2: fastText says en \(0\.\d\d\), not de", de["rejection_examples"]["wrong_language"])
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


def test_a_conversation_below_the_minimum_score_says_so(tmp_path, chat_server):
    server = chat_server(lambda body: "Ein Mann.")  # German, but fastText is not sure (0.55)
    stats = translate(mt_config(tmp_path, server.base_url, ["de"], min_lang_score=0.9), show_progress=False)
    example = stats["languages"]["de"]["rejection_examples"]["wrong_language"]
    assert re.fullmatch(r"1: fastText says de \(0\.\d\d\), below the minimum 0\.9 \(min_lang_score\)", example)


def many_segments(n: int) -> list[Conversation]:
    things = [f"{c} {a}" for c in ("red", "blue", "green", "small") for a in ("car", "dog", "bird", "house", "tree")]
    return [
        Conversation(
            str(i),
            [f"{i}.jpg"],
            [Message("user", "<image>\nWhat is it?"), Message("assistant", f"The {thing} is number {i} in a row.")],
        )
        for i, thing in enumerate(things[:n])
    ]


def cached(folder) -> int:
    cache = ResponseCache(folder / "cache.sqlite")
    try:
        return len(cache)
    finally:
        cache.close()


def test_a_model_that_writes_another_language_stops_after_the_first_batch(tmp_path, chat_server):
    server = chat_server(lambda body: body["messages"][0]["content"].rsplit("\n\n", 1)[1])  # echoes the source
    cfg = mt_config(tmp_path, server.base_url, ["zh", "de"])
    write_llava_json(many_segments(20), cfg.input)  # 21 segments
    cfg.openai.concurrency = 1
    with pytest.raises(WrongOutputLanguage) as caught:
        translate(cfg, show_progress=False)
    message = str(caught.value)
    assert isinstance(caught.value, UserError) and "\n" not in message
    assert re.match(
        r"model 'fake-mt' translated 1\d/1\d segments of the first batch into en \(the source language\), not zh "
        r"\(fastText, per segment\): is it a translation model for zh \(Chinese \(Simplified\)\)\? The model behind "
        r"http://127\.0\.0\.1:\d+/v1/chat/completions does not follow the translation prompt",
        message,
    ), message
    assert len(server.requests) == FIRST_BATCH  # not the 5 others, nor German
    assert not (tmp_path / "mt" / "llava.zh.json").exists()
    assert cached(tmp_path / "mt") == 0  # nothing of the wrong language is kept


def test_an_endpoint_that_fails_every_segment_stops_the_run(tmp_path, chat_server, monkeypatch):
    monkeypatch.setattr(dataproc.translate, "MAX_FAILURES_IN_A_ROW", 3)
    server = chat_server(lambda body: (400, b'{"error": "no"}'))
    with pytest.raises(
        EndpointError,
        match=r"model 'fake-mt' at http://127.0.0.1:\d+/v1/chat/completions fails \(3 segments in a row failed\): "
        r"HTTP 400.*cached in .*cache\.sqlite",
    ):
        translate(mt_config(tmp_path, server.base_url, ["zh"]), show_progress=False)


def test_cli_stops_fast_in_one_line_when_nothing_listens_at_the_endpoint(tmp_path, chat_server, capsys):
    from mpm.cli import main

    write_llava_json(SOURCE, tmp_path / "llava.json")
    server = chat_server(lambda body: CHINESE)
    args = ["unimm", "translate", "--input", str(tmp_path / "llava.json"), "--backend", "openai", "--model", "fake-mt",
            "--output", str(tmp_path / "mt"), "--no-progress", "--base-url"]  # fmt: skip
    assert main([*args, server.base_url, "--langs", "zh"]) == 0  # 7 Chinese translations cached
    capsys.readouterr()
    started = time.perf_counter()
    assert main([*args, "http://127.0.0.1:1/v1", "--langs", "zh,de"]) == 2  # zh from the cache, de needs the server
    assert time.perf_counter() - started < 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: stopping: translation by model 'fake-mt' fails: ")
    assert "cannot connect to http://127.0.0.1:1/v1/chat/completions" in err and "Connection refused" in err
    assert "the translations made so far are cached in" in err
    assert cached(tmp_path / "mt") == 7  # kept
    assert len(json.loads((tmp_path / "mt" / "llava.zh.json").read_text(encoding="utf-8"))) == 2


@pytest.fixture(scope="module")
def tiny_marian(tmp_path_factory):
    """A 1-layer Marian with only 32 positions (a fixed sinusoidal table: reading past it raises IndexError) that
    never chooses end-of-sequence; as in real Marian configs, EOS is forced at the last allowed position."""
    import sentencepiece as spm
    import torch
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    folder = tmp_path_factory.mktemp("tiny_marian")
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=proto, vocab_size=100, hard_vocab_limit=False,
        character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    for name in ("source.spm", "target.spm"):
        (folder / name).write_bytes(proto.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    for token in ["</s>", "<unk>", "<pad>"]:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tok = MarianTokenizer(str(folder / "source.spm"), str(folder / "target.spm"), str(folder / "vocab.json"))
    config = MarianConfig(
        vocab_size=len(vocab), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, forced_eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = MarianMTModel(config)
    with torch.no_grad():
        model.final_logits_bias[0, tok.eos_token_id] = -1e4  # saved with the weights
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.filterwarnings("ignore:Recommended. pip install sacremoses")
@pytest.mark.parametrize("family", ["marian", "m2m100"])
def test_hf_models_never_generate_past_their_positions(tmp_path, family, request):
    """hf.max_new_tokens beyond the model's positions, a model that does not stop: cut translations, counted (the
    Marian run raised IndexError; M2M100/NLLB generated hf.max_new_tokens tokens at made-up positions)."""
    if family == "marian":
        model, limit = request.getfixturevalue("tiny_marian"), 32
    else:  # M2M100 (and NLLB, the same architecture), never stopping, with 100 positions (no fewer: the table must hold the padding index, 82 here)
        from transformers import GenerationConfig

        model, limit = shutil.copytree(request.getfixturevalue("tiny_m2m100"), tmp_path / "m2m100"), 100
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": limit}))
        gen = GenerationConfig.from_pretrained(model)
        gen.suppress_tokens = [gen.eos_token_id]
        gen.save_pretrained(model)
    long = Conversation("long", ["3.jpg"], [Message("user", "<image>\n" + "Is it daytime? " * 20)])
    write_llava_json([*SOURCE, long], tmp_path / "llava.json")
    flags = {"input": str(tmp_path / "llava.json"), "output": str(tmp_path / "mt"), "langs": ["zh"], "backend": "hf"}
    flags.update({"model": str(model), "hf.max_new_tokens": 1000, "hf.batch_size": 8})
    stats = translate(load_config(TranslateConfig, None, flags), show_progress=False)
    zh = stats["languages"]["zh"]
    assert zh["segments_translated"] == 8 and zh["translated"] == 0 and zh["rejections"] == {"translation_failed": 3}
    assert zh["rejection_examples"]["translation_failed"] == (
        f"1: 'What is happening in this picture?': the translation was cut at the model's limit of {limit - 1} "
        f"tokens (its decoder has {limit} positions)"
    )
    # The long segment is not cut to fit the encoder: it fails, with its length.
    (result,) = dataproc.translate.HFTranslator(str(model)).translate([long.messages[0].content[8:]], "zh")
    assert re.fullmatch(rf"the segment has \d+ tokens; the model reads at most {limit}", str(result))


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
