"""CPU: weight-only quantised inference (mpm.quantize, optimum-quanto) against float weights, side by side.

    python benchmarks/bench_quantize.py [--repeats 3] [--new-tokens 32] [--threads 2]

The model is the one of bench_align.py / bench_i2t.py (CLIP 4 x 256 at 224 px, a 4 x 512 Qwen2 with an untied head,
mlp connector), with a vocabulary of 8000 words after MPM's added tokens (a multiple of 16: PyTorch's packed int4
CPU kernel, used for bf16 weights, needs it). Random weights: only memory and speed are measured here; accuracy is
in tests/mpm/test_quantize.py. For each variant (fp32, bf16, int8 and int4 on fp32 activations, int8 and int4 on
bf16 activations), the same 4 prompts (an image and a text each) go one at a time through mpm.inference.generate,
greedy:
  - LLM weights: bytes stored by the LLM's parameters and buffers (int8 / packed int4 data, scales, embeddings);
  - first-token latency: a generate call with max_new_tokens=1 (image encoding + prefill + one step), median;
  - tokens/s: new tokens over the time of generate calls with --new-tokens (end tokens disabled), median.
Ratios are against fp32. Results: benchmarks/_work/quantize/bench_quantize.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_i2t import word_tokenizer  # noqa: E402
from transformers import CLIPVisionConfig, Qwen2Config  # noqa: E402

import mpm.inference  # noqa: E402
from mpm.inference import Request, generate  # noqa: E402
from mpm.modeling import MPMForConditionalGeneration  # noqa: E402
from mpm.quantize import quantize_model, weight_bytes  # noqa: E402

WORK = REPO / "benchmarks" / "_work" / "quantize"
VARIANTS = {  # name: (float dtype, quantize mode)
    "fp32": (torch.float32, None),
    "bf16": (torch.bfloat16, None),
    "int8": (torch.float32, "int8"),
    "int4": (torch.float32, "int4"),
    "int8+bf16": (torch.bfloat16, "int8"),
    "int4+bf16": (torch.bfloat16, "int4"),
}


def build():
    tok = word_tokenizer(7997)  # + MPM's 3 added tokens = 8000
    vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                              image_size=224, patch_size=16)  # fmt: skip
    text = Qwen2Config(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model, processor = MPMForConditionalGeneration.from_parts(
        vision, text, tokenizer=tok, connector_type="mlp", image_size=224
    )
    assert model.language_model.lm_head.out_features == 8000, model.language_model.lm_head
    return model.eval(), processor


def requests() -> list[Request]:
    out = []
    for i in range(4):
        image = Image.new("RGB", (224, 224), (40 * i, 120, 200 - 30 * i))
        out.append(Request([image], prompt="<image>\n" + " ".join(f"w{(13 * i + k) % 7000}" for k in range(24))))
    return out


def counting(model) -> list[int]:
    """New-token counts of the model's generate calls (mpm.inference.generate returns only text)."""
    counted: list[int] = []
    inner = model.generate

    def generate_and_count(*args, **kwargs):
        new = inner(*args, **kwargs)
        counted.append(new.shape[1])
        return new

    model.generate = generate_and_count
    return counted


def measure(model, processor, counted, prompts, new_tokens: int) -> tuple[list[float], list[float]]:
    """(first-token latencies, tokens/s) over the prompts, one at a time."""
    first, rates = [], []
    for prompt in prompts:
        start = time.perf_counter()
        generate(model, processor, [prompt], max_new_tokens=1, batch_size=1)
        first.append(time.perf_counter() - start)
        start = time.perf_counter()
        generate(model, processor, [prompt], max_new_tokens=new_tokens, batch_size=1)
        rates.append(counted[-1] / (time.perf_counter() - start))
    return first, rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # every generated token counts: no end-of-sequence stop (random weights would stop at random places)
    mpm.inference.stop_tokens = lambda model, processor: []
    prompts = requests()
    models, results = {}, {}
    for name, (dtype, mode) in VARIANTS.items():
        model, processor = build()
        model.to(dtype)
        if mode is not None:
            quantize_model(model, mode)
        models[name] = (model, processor, counting(model))
        results[name] = {"llm_bytes": weight_bytes(model.language_model), "first": [], "rates": []}
    with torch.no_grad():
        for model, processor, _ in models.values():  # warm-up
            generate(model, processor, prompts[:1], max_new_tokens=4, batch_size=1)
        for repeat in range(args.repeats):  # variants interleaved: a slow spell of the machine hits them all
            for name, (model, processor, counted) in models.items():
                first, rates = measure(model, processor, counted, prompts, args.new_tokens)
                results[name]["first"] += first
                results[name]["rates"] += rates
            print(f"repeat {repeat + 1}/{args.repeats} done", file=sys.stderr)
    for r in results.values():
        r["first_token_s"] = statistics.median(r.pop("first"))
        r["tokens_per_s"] = statistics.median(r.pop("rates"))
    base = results["fp32"]
    print(f"{'variant':<10} {'LLM MiB':>8} {'x fp32':>7} {'1st tok ms':>10} {'x fp32':>7} {'tok/s':>7} {'x fp32':>7}")
    for name, r in results.items():
        r["memory_ratio"] = r["llm_bytes"] / base["llm_bytes"]
        r["first_token_ratio"] = r["first_token_s"] / base["first_token_s"]
        r["speed_ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
        print(f"{name:<10} {r['llm_bytes'] / 2**20:>8.1f} {r['memory_ratio']:>7.2f} {r['first_token_s'] * 1e3:>10.1f} "
              f"{r['first_token_ratio']:>7.2f} {r['tokens_per_s']:>7.1f} {r['speed_ratio']:>7.2f}")  # fmt: skip
    WORK.mkdir(parents=True, exist_ok=True)
    out = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "results": results,
    }
    (WORK / "bench_quantize.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
