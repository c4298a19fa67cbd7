"""GPU: stage-1 (caption pretraining) steps with the recipe's efficiency switches off vs on, same shapes.

    python benchmarks/bench_stage1_gpu.py           # on a GPU machine (benchmarks/gpu_i2t.sh runs it)
    python benchmarks/bench_stage1_gpu.py --tiny    # small shapes on a CPU: checks the script itself

Needs only torch and transformers (the GPU machine has no project dependencies; run with PYTHONPATH=.), so it
drives the model the way `mpm/recipes/i2t.py` does rather than running the recipe: random-initialised parts
shaped like SigLIP-base/16 at 384 px (576 patches, feature layer -2) + a 64-query resampler + Qwen2.5-0.5B (24
layers x 896, vocabulary 151,936, tied), the LLM and tower frozen, batch 64 captions of 10-70 tokens after a
16-token instruction, bf16 autocast, AdamW on the connector, 20 steps after 5 warm-up steps.

    before: frozen weights fp32 (cast by autocast on every step), the whole tower (last layer, post-norm and
            pooling head included), padded rows with an attention mask, logits at every position, a KV cache built
    after:  frozen weights bf16, the tower up to its feature layer, the batch packed into one row when flash
            attention is installed (padded otherwise, as the recipe's `pack_sequences: auto`), logits only
            where the next token is a caption token, no KV cache
Prints samples/s, peak GPU memory and the frozen LLM's weight memory for each, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, SiglipVisionConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mpm.configuration import MPMConfig  # noqa: E402
from mpm.modeling import MPMForConditionalGeneration  # noqa: E402

IGNORE = -100


def shapes(tiny: bool):
    if tiny:
        text = Qwen2Config(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
        vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                    image_size=64, patch_size=16)  # fmt: skip
        return text, vision, 8, 16
    text = Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32_768,
                       tie_word_embeddings=True, rope_theta=1_000_000.0)  # fmt: skip
    vision = SiglipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                image_size=384, patch_size=16)  # fmt: skip
    return text, vision, 64, 64


def samples(text, batch: int, queries: int, image_token: int, seed: int):
    """(input ids, labels) per sample: image placeholders, a 16-token instruction, a 10-70-token caption."""
    rng = random.Random(seed)
    out = []
    for _ in range(batch):
        prompt = [rng.randrange(1000, 100_000 if text.vocab_size > 100_000 else 4000) for _ in range(16)]
        caption = [
            rng.randrange(1000, 100_000 if text.vocab_size > 100_000 else 4000) for _ in range(rng.randint(10, 70))
        ]
        ids = [1] + [image_token] * queries + prompt + caption
        labels = [IGNORE] * (len(ids) - len(caption)) + caption
        out.append((ids, labels))
    return out


def padded(items, device):
    length = max(len(ids) for ids, _ in items)
    ids = torch.tensor([i + [0] * (length - len(i)) for i, _ in items], device=device)
    labels = torch.tensor([lab + [IGNORE] * (length - len(lab)) for _, lab in items], device=device)
    mask = torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i, _ in items], device=device)
    return {"input_ids": ids, "attention_mask": mask}, labels


def packed(items, device):
    """All samples in one row, position ids restarting (mpm.processor.collate_packed's layout: transformers' flash
    attention keeps packed samples apart only in a single row)."""
    ids = [t for i, _ in items for t in i]
    labels = [t for _, lab in items for t in [IGNORE] + lab[1:]]
    positions = [p for i, _ in items for p in range(len(i))]
    return {
        "input_ids": torch.tensor([ids], device=device),
        "position_ids": torch.tensor([positions], device=device),
    }, (torch.tensor([labels], device=device))


def build(text, vision, after: bool, device, attention: str):
    torch.manual_seed(0)
    config = MPMConfig(vision_config=vision, text_config=text, connector_type="resampler", num_queries=64,
                       image_token_id=text.vocab_size - 1, image_size=vision.image_size, vision_feature_layer=-2)  # fmt: skip
    config.text_config._attn_implementation = attention
    model = MPMForConditionalGeneration(config).to(device)
    model.requires_grad_(False)
    model.connector.requires_grad_(True)
    model.vision_early_exit = after
    if after:  # the recipe's store_frozen_in
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    return model.train()


def step(model, inputs, labels, pixels, after: bool):
    with torch.autocast(pixels.device.type, dtype=torch.bfloat16):
        if not after:  # the recipe before: the model's own loss over every position, a KV cache
            return model(**inputs, pixel_values=pixels, labels=labels).loss
        targets = labels[:, 1:]
        keep = (targets != IGNORE).any(0).nonzero().squeeze(1)
        logits = model(**inputs, pixel_values=pixels, logits_to_keep=keep, use_cache=False).logits
    nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets[:, keep].flatten(), reduction="sum")
    return nll / (targets != IGNORE).sum()


def measure(name, text, vision, batch, after, device, steps, warmup, attention, pack):
    model = build(text, vision, after, device, attention)
    items = samples(text, batch, 64, text.vocab_size - 1, seed=0)
    inputs, labels = packed(items, device) if pack else padded(items, device)
    pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    frozen = sum(p.numel() * p.element_size() for p in model.language_model.parameters() if not p.requires_grad)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(model, inputs, labels, pixels, after).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    result = {
        "setting": name,
        "samples_per_s": batch * len(times) / sum(times),
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "frozen_llm_gb": frozen / 2**30,
        "rows": tuple(inputs["input_ids"].shape),
    }
    print(json.dumps(result), flush=True)
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU: checks the script")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    text, vision, batch, _ = shapes(args.tiny)
    steps, warmup = (3, 1) if args.tiny else (args.steps, args.warmup)
    try:
        import flash_attn  # noqa: F401

        flash = device.type == "cuda"
    except ImportError:
        flash = False
    after_attention = "flash_attention_2" if flash else "sdpa"
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; batch {batch}; "
          f"after: {after_attention}{', packed' if flash else ', padded (no flash-attn)'}", flush=True)  # fmt: skip
    before = measure("before (all switches off)", text, vision, batch, False, device, steps, warmup, "sdpa", False)
    after = measure("after (defaults)", text, vision, batch, True, device, steps, warmup, after_attention, flash)
    speed = after["samples_per_s"] / before["samples_per_s"]
    memory = after["frozen_llm_gb"] / before["frozen_llm_gb"]
    print(f"samples/s: {speed:.2f}x; frozen LLM weights: {memory:.2f}x", flush=True)
    if after["peak_memory_gb"]:
        print(f"peak GPU memory: {before['peak_memory_gb']:.2f} -> {after['peak_memory_gb']:.2f} GB", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": str(device), "results": [before, after]}, indent=2))


if __name__ == "__main__":
    main()
