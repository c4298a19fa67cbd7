"""GPU: SFT throughput and model FLOPs utilisation of MPM (resampler) beside native LLaVA (mlp) at the same shapes.

    python benchmarks/bench_i2t_gpu.py            # on a GPU machine (benchmarks/gpu_i2t.sh runs this)
    python benchmarks/bench_i2t_gpu.py --tiny     # a few seconds on a CPU, to check the script itself

Random-initialised models shaped like Qwen2.5-0.5B (24 layers, hidden 896, 14 heads / 2 KV heads, vocab 151,936)
+ SigLIP-base/16 at 384 px (12 layers, hidden 768): bf16 autocast, SDPA attention, sequences of 2048 tokens, 30 SFT
steps (LLM + connector trained, vision tower frozen, AdamW), the first 5 not timed. Needs only torch and
transformers (run from the source tree with PYTHONPATH=.; no downloads).

MFU = (6 x trainable params x tokens + 2 x frozen params x tokens + attention FLOPs) / time / peak, with attention
FLOPs per token 12 x layers x heads x head_dim x seq (fwd + bwd; 4x instead of 12x for the frozen tower's forward),
against the H100's 989 TFLOP/s dense bf16 peak (`--peak-tflops` for other cards).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, SiglipVisionConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mpm.configuration import MPMConfig  # noqa: E402
from mpm.modeling import MPMForConditionalGeneration  # noqa: E402

IMAGE_TOKEN = 151_646


def shapes(tiny: bool):
    if tiny:
        text = Qwen2Config(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)  # fmt: skip
        vision = SiglipVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=64,
            patch_size=16,
        )
        return text, vision, 256, 2
    text = Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, max_position_embeddings=32_768, tie_word_embeddings=True, rope_theta=1_000_000.0)  # fmt: skip
    vision = SiglipVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=384,
        patch_size=16,
    )
    return text, vision, 2048, 8


def flops_per_step(model, text, vision, batch: int, seq: int, image_tokens: int, patches: int) -> float:
    vision_params = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" in n)
    trainable = sum(p.numel() for n, p in model.named_parameters() if "vision_tower" not in n)
    head_dim = text.hidden_size // text.num_attention_heads
    llm = (
        6 * trainable * batch * seq
        + 12 * text.num_hidden_layers * text.num_attention_heads * head_dim * seq * batch * seq
    )
    v_head = vision.hidden_size // vision.num_attention_heads
    tower = (
        2 * vision_params * batch * patches
        + 4 * vision.num_hidden_layers * vision.num_attention_heads * v_head * patches * batch * patches
    )
    return llm + tower


def run(
    name: str,
    model,
    text,
    vision,
    batch: int,
    seq: int,
    image_tokens: int,
    steps: int,
    warmup: int,
    device,
    peak: float,
) -> dict:
    model.to(device)
    model.vision_tower.requires_grad_(False) if hasattr(
        model, "vision_tower"
    ) else model.model.vision_tower.requires_grad_(False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 150_000 if seq > 256 else 2000, (batch, seq), generator=generator)
    ids[:, 1 : 1 + image_tokens] = IMAGE_TOKEN if seq > 256 else 2040
    ids = ids.to(device)
    pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=generator).to(device)
    labels = ids.masked_fill(ids == (IMAGE_TOKEN if seq > 256 else 2040), -100)
    patches = (vision.image_size // vision.patch_size) ** 2
    flops = flops_per_step(model, text, vision, batch, seq, image_tokens, patches)
    times = []
    for step in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    seconds = sum(times) / len(times)
    result = {
        "model": name,
        "tokens_per_s": batch * seq / seconds,
        "step_s": seconds,
        "mfu": flops / seconds / (peak * 1e12),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }
    print(
        f"{name:34s} {result['tokens_per_s']:>10.0f} tok/s  step {seconds:.3f} s  MFU {result['mfu']:.1%}", flush=True
    )
    model.to("cpu")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small shapes on the CPU: checks the script")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the card (H100 SXM: 989)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    text, vision, seq, batch = shapes(args.tiny)
    batch = args.batch or batch
    steps, warmup = (4, 1) if args.tiny else (args.steps, args.warmup)
    image_token = 2040 if args.tiny else IMAGE_TOKEN
    text.vocab_size = max(text.vocab_size, image_token + 1)
    print(
        f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; batch {batch} x {seq} tokens",
        flush=True,
    )
    results = []
    torch.manual_seed(0)
    mpm = MPMForConditionalGeneration(
        MPMConfig(
            vision_config=vision,
            text_config=text,
            connector_type="resampler",
            num_queries=64,
            image_token_id=image_token,
            image_size=vision.image_size,
            vision_feature_layer=-1,
        )  # fmt: skip
    )
    results.append(
        run(
            "MPM (SigLIP + resampler 64 queries)",
            mpm,
            text,
            vision,
            batch,
            seq,
            64,
            steps,
            warmup,
            device,
            args.peak_tflops,
        )
    )
    del mpm
    patches = (vision.image_size // vision.patch_size) ** 2
    llava = LlavaForConditionalGeneration(
        LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=image_token,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            image_seq_length=patches,
        )  # fmt: skip
    )
    results.append(
        run(
            f"LLaVA (SigLIP + mlp, {patches} tokens)",
            llava,
            text,
            vision,
            batch,
            seq,
            patches,
            steps,
            warmup,
            device,
            args.peak_tflops,
        )
    )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"device": str(device), "batch": batch, "seq": seq, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
