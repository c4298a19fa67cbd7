"""CPU: the two costs that size `mpm demo`'s time budget, each beside its baseline in the same run.

    python benchmarks/bench_demo.py [--repeats 3] [--steps 8] [--threads 2]

  (a) a text-to-image training step (forward, backward, AdamW) of the demo's UNet (attention only at the 8x8 level,
      mpm.demo.run.UNET_CONFIG) against the same UNet with attention at every level (the first design), batch 32 at
      32 px, measured alternately; ratio = baseline time / demo time;
  (b) a text-pretraining step of the demo LM (mpm.demo.pretrain: the robust mix, context noise, AdamW) with 3 world
      languages against 6: how the LM stage grows with the languages (the gate itself passed after 500 and 750
      steps in the runs recorded in BENCHMARKS.md).
Medians over repeats of the mean step time (the first step of each repeat left out). Results:
benchmarks/_work/demo/bench_demo.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

WORK = Path(__file__).resolve().parent / "_work" / "demo"


def unet_step_seconds(config: dict, steps: int) -> float:
    from diffusers import UNet2DConditionModel

    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    unet = UNet2DConditionModel(**kwargs)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    x, text = torch.randn(32, 3, 32, 32), torch.randn(32, 24, kwargs["cross_attention_dim"])
    times = []
    for _ in range(steps + 1):
        t = torch.randint(0, 1000, (32,))
        start = time.perf_counter()
        loss = unet(x, t, encoder_hidden_states=text).sample.pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.fmean(times[1:])


def lm_step_seconds(langs: list[str], steps: int, folder: Path) -> float:
    from mpm.demo import lm, pretrain
    from mpm.demo.world import load_world

    world = load_world(langs)
    settings = pretrain.PretrainSettings(tokenizer_lines=4000)
    tok = pretrain.load_or_train_tokenizer(world, langs, folder / "-".join(langs), settings)
    model = pretrain.build_model(tok, settings)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    rng = np.random.default_rng(0)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        batch = lm.encode_batch(tok, lm.text_mix(world, langs, rng, settings.batch), settings.max_positions)
        embeds = pretrain.input_embeddings(model, batch)
        labels = batch["labels"].masked_fill(batch["context_mask"], -100)
        model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=labels).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.fmean(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from mpm.demo.run import UNET_CONFIG

    everywhere = dict(UNET_CONFIG, block_out_channels=[48, 96], attention_head_dim=8,
                      down_block_types=["CrossAttnDownBlock2D"] * 2, up_block_types=["CrossAttnUpBlock2D"] * 2)  # fmt: skip
    WORK.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[float]] = {
        "unet_demo": [],
        "unet_attention_everywhere": [],
        "lm_3_langs": [],
        "lm_6_langs": [],
    }
    for r in range(args.repeats):
        runs["unet_demo"].append(unet_step_seconds(UNET_CONFIG, args.steps))
        runs["unet_attention_everywhere"].append(unet_step_seconds(everywhere, max(2, args.steps // 4)))
        runs["lm_3_langs"].append(lm_step_seconds(["en", "zh", "de"], args.steps * 4, WORK))
        runs["lm_6_langs"].append(lm_step_seconds(["en", "zh", "de", "fr", "es", "ja"], args.steps * 4, WORK))
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in runs.items()), flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "seconds_per_step": med,
        "unet_ratio": med["unet_attention_everywhere"] / med["unet_demo"],
        "lm_6_over_3": med["lm_6_langs"] / med["lm_3_langs"],
        "runs": runs,
    }
    (WORK / "bench_demo.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"t2i step: demo UNet {med['unet_demo']:.3f} s, attention everywhere {med['unet_attention_everywhere']:.3f} s "
          f"-> {result['unet_ratio']:.1f}x")  # fmt: skip
    print(f"LM step: 3 languages {med['lm_3_langs']:.3f} s, 6 languages {med['lm_6_langs']:.3f} s "
          f"({result['lm_6_over_3']:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
