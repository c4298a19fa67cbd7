"""Generation, chat and export to plain transformers LLaVA."""

import numpy as np
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
# Noise survives resizing as detail: any difference between two resize implementations shows in its pixels.
NOISE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8), "RGB")
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
    ours = processor.collate([processor.encode_prompt(MESSAGES, [NOISE])])
    theirs = llava_processor(
        images=[NOISE],
        text=[llava_processor.apply_chat_template(MESSAGES, add_generation_prompt=True)],
        return_tensors="pt",
    )
    assert type(llava_processor.image_processor).__name__ in ("CLIPImageProcessorPil", "CLIPImageProcessor")
    assert torch.equal(theirs["input_ids"], ours["input_ids"])
    assert torch.allclose(theirs["pixel_values"], ours["pixel_values"], atol=1e-5)  # the same pixels
    with torch.no_grad():
        a = model(ours["input_ids"], ours["pixel_values"], ours["attention_mask"]).logits
        b = llava(**theirs).logits
    assert torch.allclose(a, b, atol=1e-4)
    exported, exported_processor = load_model(out, device="cpu")
    assert generate(exported, exported_processor, [Request([NOISE], MESSAGES)], max_new_tokens=6) == generate(
        model, processor, [Request([NOISE], MESSAGES)], max_new_tokens=6
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
    assert end_of_turn in stop_tokens(reloaded, reprocessor)
    llava, llava_processor = load_model(export_llava(tmp_path / "mpm", tmp_path / "llava"), device="cpu")
    assert end_of_turn in stop_tokens(llava, llava_processor)


class ScriptedHead(torch.nn.Module):
    """An LM head that makes the model say `script` token by token, then `filler` forever."""

    def __init__(self, script, filler, vocab):
        super().__init__()
        self.script, self.filler, self.vocab, self.calls = script, filler, vocab, 0

    def forward(self, hidden):
        token = self.script[self.calls] if self.calls < len(self.script) else self.filler
        self.calls += 1
        logits = torch.zeros(*hidden.shape[:-1], self.vocab)
        logits[..., token] = 10.0
        return logits


def test_generation_stops_at_the_templates_end_of_turn_not_only_at_eos(tiny, tmp_path):
    """A base checkpoint: eos <|endoftext|>, while its chat template closes turns with <|im_end|>."""
    from mpm.inference import stop_tokens

    tok = make_tokenizer()
    tok.eos_token = "<|endoftext|>"
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    model, processor = tiny(tokenizer=tok)
    assert processor.end_of_turn_ids() == [end_of_turn]
    assert end_of_turn in model.language_model.generation_config.eos_token_id  # written by from_parts
    model.save_pretrained(tmp_path / "mpm")
    processor.save_pretrained(tmp_path / "mpm")
    reloaded, reprocessor = load_model(tmp_path / "mpm", device="cpu")
    assert end_of_turn in reloaded.language_model.generation_config.eos_token_id
    llava, llava_processor = load_model(export_llava(tmp_path / "mpm", tmp_path / "llava"), device="cpu")
    assert end_of_turn in llava.generation_config.eos_token_id  # the export keeps it
    assert end_of_turn in stop_tokens(reloaded, reprocessor)
    # A model that answers "Red", closes its turn, then would write the user's next turn itself ("A A A ...").
    red = tok("Red", add_special_tokens=False)["input_ids"]
    scripted = ScriptedHead(
        [*red, end_of_turn], filler=tok("A", add_special_tokens=False)["input_ids"][0], vocab=len(tok)
    )
    reloaded.language_model.lm_head = scripted
    assert generate(reloaded, reprocessor, [Request([RED], MESSAGES)], max_new_tokens=8) == ["Red"]
    assert scripted.calls == len(red) + 1  # it stopped at <|im_end|>, not at max_new_tokens


def test_a_raw_prompt_keeps_its_bos_when_batched_with_chat_requests(saved, tmp_path):
    from tokenizers.processors import TemplateProcessing

    tok = make_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>"})  # a Llama-style tokenizer: BOS added to every text it tokenizes
    bos = tok.bos_token_id
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    assert tok("x")["input_ids"][0] == bos
    llava, llava_processor = load_model(export_llava(saved(tokenizer=tok), tmp_path / "llava"), device="cpu")
    seen = []
    llava.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True)
    raw = Request([RED], prompt="<image>\nA photo of")
    generate(llava, llava_processor, [raw], max_new_tokens=1)
    alone = seen[-1][0].tolist()
    generate(llava, llava_processor, [Request([RED], MESSAGES), raw], max_new_tokens=1, batch_size=2)
    mixed = seen[-1][1].tolist()
    assert alone[0] == bos and mixed[-len(alone) :] == alone  # the same tokens, BOS first, after the left padding


def test_an_empty_answer_says_so_and_help_lists_the_commands(saved, tmp_path, capsys, monkeypatch):
    model, processor = load_model(saved(), device="cpu")
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.language_model.lm_head = ScriptedHead([eos], filler=eos, vocab=len(processor.tokenizer))  # stops at once
    script = iter(["/help", "/hepl", "/image", "/r/aww", "/quit"])
    said = []
    interactive(model, processor, read=lambda _: next(script), write=said.append, max_new_tokens=3)
    assert said[1].startswith("commands: /image PATH") and "/help" in said[1]  # /help answers, not the model
    assert said[2].startswith("unknown command /hepl")
    assert said[3] == "give the image's path: /image PATH"
    assert said[4] == "model> (empty answer: the model produced only whitespace or stopped at once)"  # "/r/aww": text
    monkeypatch.setattr("mpm.inference.load_model", lambda *a, **k: (model, processor))
    RED.save(tmp_path / "red.png")
    assert main(["chat", "--model", str(tmp_path), "--image", str(tmp_path / "red.png"), "Hi"]) == 0
    assert capsys.readouterr().out.strip() == "(empty answer: the model produced only whitespace or stopped at once)"


def test_generate_places_images_without_markers_first_as_the_cli_does(saved):
    model, processor = load_model(saved(), device="cpu")
    marked = Request([RED, NOISE], [{"role": "user", "content": "<image><image>\nSame colour?"}])
    bare = Request([RED, NOISE], [{"role": "user", "content": "Same colour?"}])
    raw_marked, raw_bare = Request([RED], prompt="<image>\nA photo of"), Request([RED], prompt="A photo of")
    assert generate(model, processor, [bare, raw_bare], max_new_tokens=4) == generate(
        model, processor, [marked, raw_marked], max_new_tokens=4
    )
