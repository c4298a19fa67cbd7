"""Generation, chat and export to plain transformers LLaVA."""

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from mpm.chat import interactive
from mpm.cli import main
from mpm.core.errors import ExportError
from mpm.export import export_llava
from mpm.inference import Request, generate, load_model, without_reasoning
from tests.mpm.conftest import make_tokenizer

RED = Image.new("RGB", (40, 30), (200, 10, 10))
MESSAGES = [{"role": "user", "content": "<image>\nWhat is this?"}]


@pytest.fixture
def saved(tiny, tmp_path):
    def save(**kwargs):
        model, processor = tiny(**kwargs)
        folder = tmp_path / f"model{len(list(tmp_path.iterdir()))}"
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        return folder

    return save


@pytest.mark.parametrize(
    ("vision", "chat_template"), [("clip", True), ("siglip", True), ("clip", False)], ids=["clip", "siglip", "plain"]
)
def test_export_llava_round_trip(saved, tmp_path, vision, chat_template):
    # without a chat template of its own, the model's plain template goes into the export (so it can be prompted)
    source = saved(vision=vision, tokenizer=make_tokenizer(chat_template=chat_template))
    out = export_llava(source, tmp_path / "llava")
    llava = LlavaForConditionalGeneration.from_pretrained(out).eval()  # plain transformers, no MPM code
    llava_processor = AutoProcessor.from_pretrained(out)
    model, processor = load_model(source, device="cpu")
    ours = processor.collate([processor.encode_prompt(MESSAGES, [RED])])
    theirs = llava_processor(
        images=[RED],
        text=[llava_processor.apply_chat_template(MESSAGES, add_generation_prompt=True)],
        return_tensors="pt",
    )
    assert torch.equal(theirs["input_ids"], ours["input_ids"])
    assert torch.allclose(theirs["pixel_values"], ours["pixel_values"], atol=1e-4)
    with torch.no_grad():
        a = model(ours["input_ids"], ours["pixel_values"], ours["attention_mask"]).logits
        b = llava(**theirs).logits
    assert torch.allclose(a, b, atol=1e-4)
    exported, exported_processor = load_model(out, device="cpu")
    assert generate(exported, exported_processor, [Request([RED], MESSAGES)], max_new_tokens=6) == generate(
        model, processor, [Request([RED], MESSAGES)], max_new_tokens=6
    )


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"connector": "resampler"}, "connector is 'resampler'"),
        ({"use_slicing": True}, "slices images"),
        ({"vision": "resnet"}, "convolutional"),
        ({"image_size": 48}, "made for 32px"),
    ],
)
def test_export_refuses_what_llava_cannot_express(saved, tmp_path, kwargs, reason):
    with pytest.raises(ExportError, match=reason):
        export_llava(saved(**kwargs), tmp_path / "out")


def test_batched_generation_matches_one_by_one(saved):
    model, processor = load_model(saved(), device="cpu")
    requests = [
        Request([RED], MESSAGES),
        Request([RED, Image.new("RGB", (20, 50))], [{"role": "user", "content": "<image> and <image>: same colour?"}]),
        Request([RED], prompt="<image>\nA photo of"),
    ]
    batched = generate(model, processor, requests, max_new_tokens=6, batch_size=3)
    single = [generate(model, processor, [r], max_new_tokens=6)[0] for r in requests]
    assert batched == single


def test_chat_cli_one_shot_and_errors(saved, tmp_path, capsys):
    folder = saved()
    RED.save(tmp_path / "red.png")
    assert (
        main(
            [
                "chat",
                "--model",
                str(folder),
                "--image",
                str(tmp_path / "red.png"),
                "用中文描述这张图片",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["chat", "--model", str(folder), "--image", str(tmp_path / "missing.png"), "Hi"]) == 2
    assert "missing.png' does not exist" in capsys.readouterr().err
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    assert main(["chat", "--model", str(folder), "--image", str(tmp_path / "broken.jpg"), "Hi"]) == 2
    assert "cannot be read" in capsys.readouterr().err
    llm_only = tmp_path / "llm"
    llm_only.mkdir()
    (llm_only / "config.json").write_text('{"model_type": "qwen2"}')
    assert main(["chat", "--model", str(llm_only), "Hi"]) == 2
    assert "holds a 'qwen2' model, not an MPM" in capsys.readouterr().err


def test_interactive_session_with_several_images(saved, tmp_path):
    model, processor = load_model(saved(), device="cpu")
    RED.save(tmp_path / "a.png")
    script = iter(
        ["/image " + str(tmp_path / "a.png"), "What is it?", "/image nowhere.png", "And now?", "/reset", "Hi", "/quit"]
    )
    said = []
    interactive(model, processor, read=lambda _: next(script), write=said.append, max_new_tokens=3)
    assert any("added to your next message" in s for s in said)
    assert any("error: image 'nowhere.png' does not exist" in s for s in said)
    assert sum(s.startswith("model>") for s in said) == 3 and "(conversation reset)" in said


def test_interactive_session_goes_on_after_a_failed_turn(saved, tmp_path):
    model, processor = load_model(saved(), device="cpu")
    script = iter(["is <image> red, and <image>?", "What colour is it?", "/quit"])  # 2 markers, 1 image: refused
    said = []
    interactive(model, processor, read=lambda _: next(script), write=said.append, images=[RED], max_new_tokens=3)
    assert "2 <image> markers but 1 image" in said[2] and "were not kept" in said[2]
    assert said[3].startswith("model>")  # the failed turn's message and image are forgotten


def test_chat_cli_interactive_starts_with_the_command_line_image_and_message(saved, tmp_path, capsys, monkeypatch):
    folder = saved()
    RED.save(tmp_path / "red.png")
    monkeypatch.setattr("builtins.input", lambda _: "/quit")
    args = ["chat", "--model", str(folder), "--interactive", "--image", str(tmp_path / "red.png"), "What is it?"]
    assert main([*args, "--max-new-tokens", "3"]) == 0
    printed = capsys.readouterr().out
    assert "red.png added to your next message" in printed and "you> What is it?" in printed and "model>" in printed
    assert main(["chat", "--model", str(folder), "--interactive", "--image", str(tmp_path / "no.png")]) == 2
    assert "no.png' does not exist" in capsys.readouterr().err


def test_chat_uses_the_models_own_image_marker(saved, tmp_path, capsys):
    folder = saved(image_token="<img>")
    RED.save(tmp_path / "red.png")
    assert (
        main(["chat", "--model", str(folder), "--image", str(tmp_path / "red.png"), "Hi", "--max-new-tokens", "2"]) == 0
    )


def test_bad_generation_arguments_are_clear_errors(saved):
    model, processor = load_model(saved(), device="cpu")
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        generate(model, processor, [Request([RED], MESSAGES)], batch_size=0)
    with pytest.raises(ValueError, match="request 0 must have either `messages` or `prompt`, not neither"):
        generate(model, processor, [Request([RED])])


def test_a_leading_reasoning_block_is_left_out_of_answers():
    assert without_reasoning("<think>\nThe user asks...\n</think>\n\n红色。") == "红色。"
    assert without_reasoning("<think>\n\n</think>\n\nIt is red.") == "It is red."
    assert without_reasoning("It is red. <think>") == "It is red. <think>"
    assert without_reasoning("<think> never closed") == "<think> never closed"


def test_end_of_turn_tokens_survive_save_and_export(tiny, tmp_path):
    from mpm.inference import stop_tokens

    model, processor = tiny()
    end_of_turn = processor.tokenizer.convert_tokens_to_ids("<|im_start|>")  # stands for Llama-3's <|eot_id|>
    model.language_model.generation_config.eos_token_id = [processor.tokenizer.eos_token_id, end_of_turn]
    model.save_pretrained(tmp_path / "mpm")
    processor.save_pretrained(tmp_path / "mpm")
    reloaded, reprocessor = load_model(tmp_path / "mpm", device="cpu")
    assert end_of_turn in stop_tokens(reloaded, reprocessor.tokenizer)
    llava, llava_processor = load_model(export_llava(tmp_path / "mpm", tmp_path / "llava"), device="cpu")
    assert end_of_turn in stop_tokens(llava, llava_processor.tokenizer)
