"""Weight-only quantised inference (mpm.quantize): int8 / packed int4 LLM weights through optimum-quanto, on CPU."""

import sys

import pytest
import torch
from PIL import Image
from transformers import Qwen2Config

from mpm.core.errors import ConfigError
from mpm.inference import Request, generate, load_model
from mpm.modeling import MPMForConditionalGeneration
from mpm.quantize import _tensor_parts, quantization_report, quantize_model
from tests.mpm.conftest import make_tokenizer, vision_config

pytest.importorskip("optimum.quanto")

RED = Image.new("RGB", (40, 30), (200, 10, 10))
MESSAGES = [{"role": "user", "content": "<image>\nWhat is this?"}]
# Error bounds of the logits against the float model (random weights, 2 layers, 24 random tokens x 2). Measured over
# seeds 0-2, fp32 and bf16: int8 relative error 0.014-0.021, cosine >= 0.9997; int4 0.21-0.24, cosine >= 0.969.
# They follow from the rounding noise: int8 with one scale per row over ~2.9 sigma of a Gaussian row has a step of
# 0.023 sigma, noise 0.7% of a weight, ~2% after compounding through the layers; int4 with 16 levels over the ~5.5
# sigma range of a 128-weight group has a step of 0.35 sigma, noise ~10% per layer, ~23% at the logits. The bounds
# leave ~2x (int8) and ~1.5x (int4) headroom.
BOUNDS = {"int8": (0.05, 0.999), "int4": (0.35, 0.95)}


def build(vocab: int = 304, dtype=torch.float32, seed: int = 0):
    """A tiny MPM model whose LLM Linear layers all take 256 or 512 inputs (int4 groups of 128) and give
    multiples of 16 outputs (the vocabulary of 304 included, untied head so it is quantised too)."""
    tok = make_tokenizer()
    text = Qwen2Config(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    model, processor = MPMForConditionalGeneration.from_parts(
        vision_config("clip"), text, tokenizer=tok, connector_type="mlp", num_queries=4, image_size=32
    )
    return model.to(dtype).eval(), processor


def linears(model):
    return {n: m for n, m in model.language_model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_weights_are_stored_quantised_and_logits_stay_close(mode):
    model, _ = build()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    before = {n: m.weight.numel() * 4 for n, m in linears(model).items()}
    embed_before = model.get_input_embeddings().weight.clone()
    with torch.no_grad():
        reference = model(ids).logits
        quantize_model(model, mode)
        logits = model(ids).logits
    after = linears(model)
    assert set(after) == set(before) and "lm_head" in after  # every LLM Linear, the untied head included
    for name, layer in after.items():
        parts = _tensor_parts(layer.weight)  # what is actually stored: data, scales (and shifts)
        data = parts[0]
        out_features, in_features = layer.weight.shape
        if mode == "int8":
            assert data.dtype == torch.int8 and data.numel() == out_features * in_features
        else:  # two 4-bit values per byte
            assert data.dtype == torch.uint8 and data.numel() == out_features * in_features // 2
            assert layer.weight._group_size == 128
        stored = sum(p.nbytes for p in parts)
        assert stored <= {"int8": 0.30, "int4": 0.20}[mode] * before[name], (name, stored / before[name])
    # embeddings, norms, connector and vision tower keep their float weights
    assert torch.equal(model.get_input_embeddings().weight, embed_before)
    assert all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in model.vision_tower.parameters())
    report = quantization_report(model)
    assert report.layers == len(before) and report.linear_ratio <= {"int8": 0.30, "int4": 0.20}[mode]
    assert report.linear_bytes_before == sum(before.values()) and report.llm_bytes_after < report.llm_bytes_before

    max_rel, min_cos = BOUNDS[mode]
    rel = ((logits - reference).norm() / reference.norm()).item()
    cos = torch.nn.functional.cosine_similarity(logits.flatten(1), reference.flatten(1), dim=-1).min().item()
    assert rel < max_rel and cos > min_cos, (rel, cos)


def test_int4_with_bf16_weights_uses_the_packed_cpu_kernel():
    model, _ = build(dtype=torch.bfloat16)
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits.float()
        quantize_model(model, "int4")
        logits = model(ids).logits.float()
    head = model.language_model.lm_head.weight
    assert type(head).__name__ == "TinyGemmWeightQBitsTensor" and _tensor_parts(head)[0].dtype == torch.uint8
    assert ((logits - reference).norm() / reference.norm()).item() < BOUNDS["int4"][0]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_load_model_quantizes_and_generate_answers(tmp_path, mode):
    model, processor = build()
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    float_model, _ = load_model(tmp_path / "m", device="cpu")
    quantized, qprocessor = load_model(tmp_path / "m", device="cpu", quantize=mode)
    assert quantization_report(quantized).mode == mode
    assert type(quantized.language_model.model.layers[0].mlp.up_proj.weight).__name__.startswith("Weight")
    requests = [Request([RED], MESSAGES), Request([], [{"role": "user", "content": "Describe the image."}])]
    answers = generate(quantized, qprocessor, requests, max_new_tokens=6)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    if mode == "int8":  # greedy tokens of the float model (with a clear margin) survive int8 weights
        with torch.no_grad():
            encoded = qprocessor.collate([qprocessor.encode_prompt(MESSAGES, [RED])])
            a = float_model(encoded["input_ids"], encoded["pixel_values"], encoded["attention_mask"]).logits[0, -1]
            b = quantized(encoded["input_ids"], encoded["pixel_values"], encoded["attention_mask"]).logits[0, -1]
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > BOUNDS["int8"][1]


def test_vision_tower_too_and_tied_heads_stay_float(tiny):
    model, _ = tiny()  # Qwen2 with tied embeddings: the head is the embedding matrix
    quantize_model(model.eval(), "int8", vision=True)
    assert type(model.language_model.lm_head) is torch.nn.Linear  # tied: left as the float embedding matrix
    assert model.language_model.lm_head.weight is model.get_input_embeddings().weight
    vision = [m for n, m in model.vision_tower.named_modules() if n.endswith("q_proj")]
    assert vision and all(_tensor_parts(m.weight)[0].dtype == torch.int8 for m in vision)
    assert all(type(p) is torch.nn.Parameter for p in model.connector.parameters())  # the connector stays float


def test_unknown_mode_and_missing_library_are_config_errors(tmp_path, monkeypatch):
    model, _ = build()
    with pytest.raises(ConfigError, match="'int3'.*int8, int4"):
        quantize_model(model, "int3")
    with pytest.raises(ConfigError, match="'fp8'"):  # before the model loads: the folder does not even exist
        load_model(tmp_path / "nowhere", quantize="fp8")
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)
    with pytest.raises(ConfigError, match=r"optimum-quanto.*mpm-toolkit\[quantize\]"):
        quantize_model(model, "int8")
    assert all(type(m) is torch.nn.Linear for m in linears(model).values())  # left untouched


def test_a_mode_that_cannot_run_here_is_a_clear_error(monkeypatch):
    # Real: PyTorch's CPU int4 packing (bf16 weights) needs out_features divisible by 16; a 303-word head (300 + MPM's added tokens) is not.
    model, _ = build(vocab=300, dtype=torch.bfloat16)
    with pytest.raises(
        ConfigError, match=r"int4 cannot quantise layer language_model.lm_head \(303 x 256, bfloat16 on cpu\).*16"
    ):
        quantize_model(model, "int4")
    # A kernel that is missing on this machine (as when optimum-quanto's int4 extension cannot be compiled).
    model, _ = build(dtype=torch.bfloat16)

    def missing(*args, **kwargs):
        raise RuntimeError("no CPU kernel for this operator")

    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", missing)
    with pytest.raises(ConfigError, match=r"int4 cannot run on cpu with bfloat16 weights.*no CPU kernel"):
        quantize_model(model, "int4")


def test_a_llava_checkpoint_quantizes_its_decoder_and_head(tmp_path):
    from mpm.export import export_llava

    model, processor = build()
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    llava, llava_processor = load_model(export_llava(tmp_path / "m", tmp_path / "llava"), device="cpu", quantize="int8")
    assert _tensor_parts(llava.lm_head.weight)[0].dtype == torch.int8  # the head sits outside the decoder there
    assert quantization_report(llava).layers == len(linears(model))  # the same 15 LLM layers as the MPM model
    assert len(generate(llava, llava_processor, [Request([RED], MESSAGES)], max_new_tokens=4)) == 1
