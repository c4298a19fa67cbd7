"""CPU: `mpm serve` throughput and latency at 1, 4 and 16 concurrent clients against sequential `mpm.generate` calls.

    python benchmarks/bench_serve.py [--requests 32] [--max-tokens 32] [--threads 2]

One small model (bench_align.py's: CLIP 4 x 256 at 224 px, mlp connector, a 4 x 512 Qwen2, 8k-word vocabulary;
its stop tokens' embedding rows zeroed so every answer runs to --max-tokens and all do the same work) is saved and
served in this process (uvicorn in a thread, the engine's default batching: up to 8 rows, a 20 ms window). The same
--requests chat requests (an image and a question each, greedy) are sent by C client threads at a time over HTTP,
for C = 1, 4, 16; the baseline runs them one after another through `mpm.inference.generate` (batch size 1, no
server). Printed: requests/s, generated tokens/s, p50 / p95 latency per request, and throughput / baseline.
Target (issue 14): at least 2x the baseline's throughput at 16 clients.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import httpx  # noqa: E402
from bench_align import build  # noqa: E402

from mpm.inference import Request, generate, load_model  # noqa: E402

WORK = REPO / "benchmarks" / "_work" / "serve"


def save_model() -> Path:
    model, processor = build()
    with torch.no_grad():
        for token in {processor.tokenizer.eos_token, processor.tokenizer.pad_token, "<|im_end|>"}:
            index = processor.tokenizer.convert_tokens_to_ids(token)
            if isinstance(index, int) and index >= 0:
                model.get_input_embeddings().weight[index] = 0.0
                model.language_model.lm_head.weight[index] = 0.0
    folder = WORK / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def requests(n: int) -> list[tuple[Image.Image, str]]:
    return [(Image.new("RGB", (224, 224), (40 * i % 255, 90, 200)), " ".join(f"w{(13 * i + k) % 7000}" for k in range(12)))
            for i in range(n)]  # fmt: skip


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def sequential(folder: Path, items, max_tokens: int) -> dict:
    model, processor = load_model(folder, device="cpu")
    latencies, tokens = [], 0
    start = time.perf_counter()
    for image, question in items:
        t = time.perf_counter()
        answer = generate(model, processor, [Request([image], messages=[{"role": "user", "content": question}])],
                          max_new_tokens=max_tokens)[0]  # fmt: skip
        latencies.append(time.perf_counter() - t)
        tokens += len(processor.tokenizer(answer, add_special_tokens=False)["input_ids"])
    return summary(time.perf_counter() - start, latencies, tokens, len(items))


def served(url: str, items, max_tokens: int, clients: int) -> dict:
    bodies = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(im)}},
                                                         {"type": "text", "text": q}]}],
               "max_tokens": max_tokens, "temperature": 0} for im, q in items]  # fmt: skip

    def one(body):
        t = time.perf_counter()
        r = httpx.post(f"{url}/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t, r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, bodies))
    return summary(time.perf_counter() - start, [r[0] for r in results], sum(r[1] for r in results), len(items))


def summary(seconds: float, latencies: list[float], tokens: int, n: int) -> dict:
    ordered = sorted(latencies)
    return {"seconds": round(seconds, 2), "requests_per_s": round(n / seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "p50_s": round(statistics.median(ordered), 3),
            "p95_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3)}  # fmt: skip


def main() -> None:
    from mpm.serve.server import ServeConfig, ThreadedServer, build_app

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=ServeConfig.max_batch, help="the server's --max-batch")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = save_model()
    items = requests(args.requests)

    running = ThreadedServer(build_app(ServeConfig(model=str(folder), max_batch=args.max_batch)))
    try:
        served(running.url, items[:4], args.max_tokens, 4)  # warm-up
        results = {"sequential": sequential(folder, items, args.max_tokens)}
        for clients in (1, 4, 16):
            results[f"served_{clients}"] = served(running.url, items, args.max_tokens, clients)
        health = httpx.get(f"{running.base}/health").json()
    finally:
        running.close()
    base = results["sequential"]["requests_per_s"]
    print(f"{args.requests} requests, {args.max_tokens} new tokens each, greedy, {args.threads} threads")
    print(f"{'':14} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p95 s':>7} {'x base':>7}")
    for name, r in results.items():
        print(f"{name:14} {r['requests_per_s']:7.3f} {r['tokens_per_s']:7.1f} {r['p50_s']:7.3f} {r['p95_s']:7.3f} "
              f"{r['requests_per_s'] / base:7.2f}")  # fmt: skip
    print(f"engine: {health['batches']} batches, largest {health['largest_batch']} rows")
    out = {"machine": f"{platform.machine()} {args.threads} threads, torch {torch.__version__}", **vars(args),
           "results": results, "ratio_16": round(results["served_16"]["requests_per_s"] / base, 2)}  # fmt: skip
    (WORK / "bench_serve.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
