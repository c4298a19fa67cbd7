"""CPU: what the alignment stage's two caches and batches buy, each beside its baseline in the same run.

    python benchmarks/bench_align.py [--repeats 5] [--pairs 4] [--claims 32]

  (a) a `mpm train align` step (mpm.recipes.align.pair_losses: policy forward over chosen + rejected, DDPO loss,
      backward, AdamW) with the reference log-probs read from the cache, against the same step with the reference
      model run on the batch as well (what a trainer without the cache does every step); alternated, medians;
      ratio = live-reference time / cached time;
  (b) the RLAIF-V labeler (mpm.align.labeler.score_questions: P(yes) vs P(no) from one forward step) scoring
      `--claims` yes/no questions one at a time against batches of 16; ratio = batched claims/s / one-at-a-time.
The model is the one of bench_i2t.py (CLIP 4 x 256 at 224 px, a 4 x 512 Qwen2, mlp connector, 8k-word vocabulary).
Results: benchmarks/_work/align/bench_align.json.
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

from mpm.align.batches import collate_pairs, encode_pair, response_logps, unpadded  # noqa: E402
from mpm.align.data import PreferencePair  # noqa: E402
from mpm.align.labeler import score_questions  # noqa: E402
from mpm.align.losses import preset  # noqa: E402
from mpm.align.reference import ReferenceCache  # noqa: E402
from mpm.modeling import MPMForConditionalGeneration  # noqa: E402
from mpm.recipes.align import pair_losses  # noqa: E402

WORK = REPO / "benchmarks" / "_work" / "align"


def build():
    tok = word_tokenizer(8000)
    vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                              image_size=224, patch_size=16)  # fmt: skip
    text = Qwen2Config(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    return MPMForConditionalGeneration.from_parts(vision, text, tokenizer=tok, connector_type="mlp", image_size=224)


def pairs(n: int) -> list[PreferencePair]:
    WORK.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        image = WORK / f"{i}.png"
        Image.new("RGB", (224, 224), (30 * i % 255, 120, 200)).save(image)
        answer = [f"w{(7 * i + k) % 7000}" for k in range(48)]
        wrong = answer[:20] + [f"w{7000 + k}" for k in range(6)] + answer[26:]  # a corrected 6-word segment
        out.append(PreferencePair(str(i), image, " ".join(f"w{k}" for k in range(12)), " ".join(answer),
                                  " ".join(wrong), row=i))  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=4, help="pairs per training step (2x rows)")
    ap.add_argument("--claims", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    policy, processor = build()
    reference, _ = build()
    policy.float().train()
    reference.float().eval()
    loss_cfg = preset("rlhfv_paper")
    encoded = [encode_pair(processor, p, 4096, key=p.id) for p in pairs(args.pairs)]
    cache = ReferenceCache(WORK, {}, rank=0)  # in memory: the parts are not written
    with torch.no_grad():
        rows = unpadded(*response_logps(reference, collate_pairs(processor, encoded)))
    from mpm.align.batches import response_hash

    for i, p in enumerate(encoded):
        cache.entries[p.id] = (rows[i], rows[len(encoded) + i])
        cache.hashes[p.id] = response_hash(p)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)

    def step(live: bool) -> float:
        start = time.perf_counter()
        if live:  # what a trainer without the cache does every step
            with torch.no_grad():
                response_logps(reference, collate_pairs(processor, encoded))
        losses, _ = pair_losses(policy, processor, encoded, cache, loss_cfg, torch.device("cpu"))
        losses.sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    step(False), step(True)  # warm-up
    cached, live = [], []
    for _ in range(args.repeats):
        cached.append(step(False))
        live.append(step(True))
    a, b = statistics.median(cached), statistics.median(live)

    images = [Image.new("RGB", (224, 224), (10 * i % 255, 60, 90)) for i in range(args.claims)]
    items = [(images[i], f"w{i} w{i + 1} w{i + 2} w{i + 3} ?") for i in range(args.claims)]
    table = WORK / "yes_no.yaml"  # the benchmark vocabulary's words: w1 for yes, w2 for no
    table.write_text('en:\n  "yes": [w1]\n  "no": [w2]\n')
    policy.eval()

    def claims_per_second(batch_size: int) -> float:
        start = time.perf_counter()
        score_questions(policy, processor, items, "en", batch_size=batch_size, table=table)
        return args.claims / (time.perf_counter() - start)

    claims_per_second(16)  # warm-up
    one, batched = [], []
    for _ in range(max(1, args.repeats // 2)):
        one.append(claims_per_second(1))
        batched.append(claims_per_second(16))
    c1, c16 = statistics.median(one), statistics.median(batched)

    result = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "pairs_per_step": args.pairs,
        "train_step_cached_s": round(a, 4),
        "train_step_live_reference_s": round(b, 4),
        "cache_speedup": round(b / a, 3),
        "labeler_claims_per_s_one_at_a_time": round(c1, 2),
        "labeler_claims_per_s_batch16": round(c16, 2),
        "labeler_batching_speedup": round(c16 / c1, 3),
    }
    (WORK / "bench_align.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"align step, {args.pairs} pairs: cached reference {a:.3f} s, live reference {b:.3f} s -> "
          f"the cache is {b / a:.2f}x faster")  # fmt: skip
    print(f"labeler: {c1:.1f} claims/s one at a time, {c16:.1f} claims/s in batches of 16 -> {c16 / c1:.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
