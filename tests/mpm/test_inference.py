"""Generation, chat and export to plain transformers LLaVA."""

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from mpm.chat import interactive
from mpm.cli import main
from mpm.export import ExportError, export_llava
from mpm.inference import Request, generate, load_model

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


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_export_llava_round_trip(saved, tmp_path, vision):
    source = saved(vision=vision)
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
