"""CPU: `MPMPaintPipeline` sampling and `mpm train t2i` training steps against minimal hand-written loops.

    python benchmarks/bench_t2i.py [--repeats 3] [--steps 16] [--sample-steps 20] [--threads 1]

Same UNet, scheduler, LLM and text features on both sides, measured side by side and alternating so the machine's
noise hits both:
  (a) sampling: seconds per image of `MPMPaintPipeline.__call__` (20 DDIM steps, guidance 7.5, 4 prompts) against
      a bare classifier-free-guidance loop (the prompts encoded with `pipe.encode_prompt`, then scale_model_input,
      UNet, guidance, scheduler.step, images); the two must give the same images (checked before timing);
  (b) training step time of the real recipe (`t2i.recipe.train`: pair shards written by `mpm data shard`, the
      DataLoader, accelerate, min-SNR loss, gradient clipping, a checkpoint at the end, EMA off) against a minimal
      loop (the same PairImages stream, the same LLM run live on the captions, Linear + LayerNorm, UNet, MSE, the
      same AdamW and clipping), each run in a fresh process; step times between the recipe's metrics.jsonl rows
      (taken where `Metrics.log` writes elapsed_s, unrounded, with the process's CPU time; a row every step) or
      the same clock in the loop, the first steps left out;
  (c) the recipe with `data.text_feature_cache` against live text encoding (the cache is rebuilt before each
      cached run and its build time reported on its own); and the recipe with EMA on (its default) for its cost.
Ratios: hand-written time / MPM time (>= 0.95x target: MPM at most about 5% slower). Shapes: a pixel-space UNet at
32 px (32-64-128 channels, one ResNet per level, cross-attention only at the 8x8 level, 4.1M parameters), a
Qwen2-like LLM (4 layers x 512, 8 heads / 2 KV heads, 2,000-word BPE vocabulary; the LLM's forward is a large share
of a step at this size), captions of 11-51 words, batch 8. Results: benchmarks/_work/t2i/bench_t2i.json.

One torch thread by default (`--threads 0`: torch's default): on the project's 2-core box, shared with other work,
two threads stall on each other when the other core is busy. Measured here: with a quiet box two threads were
faster (0.20 vs 0.32 s a step), but run medians spread by +-15% and single steps spiked 10x; under a test suite's
load, steps ran 3-5x slower than with one thread. That buries the few per cent compared here. Wall-clock and process
CPU times are both reported; with one thread the CPU time is the work done, whatever else runs on the box.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORK = REPO / "benchmarks" / "_work" / "t2i"
PROMPTS = ["a red cat wearing a hat", "一只戴着帽子的红猫", "a small wooden house near a lake", "blue sky"]
FILLER = ["with", "near", "under", "beside", "small", "large", "bright", "dark", "old", "new", "wooden", "metal",
          "soft", "round", "tall", "short"]  # fmt: skip
UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 1,
    "block_out_channels": [32, 64, 128],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 256,
    "attention_head_dim": 4,
    "norm_num_groups": 16,
}
BATCH = 8
LR = 1e-4


# -- inputs, written once -----------------------------------------------------------------------------------------------
def prepare() -> tuple[Path, Path, Path]:
    """Pair shards of 200 captioned pictures (64 px), an LLM folder (random weights + a BPE tokenizer), the UNet's
    config."""
    shards, llm, unet = WORK / "shards", WORK / "llm", WORK / "unet.json"
    unet.parent.mkdir(parents=True, exist_ok=True)
    unet.write_text(json.dumps(UNET, indent=1))
    if (shards / "stats.json").exists() and (llm / "config.json").exists():
        return shards, llm, unet
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from dataproc.sharder import ShardConfig, shard
    from dataproc.synthetic import write_pairs
    from mpm.core.config import load_config

    pairs = write_pairs(WORK / "pairs", 200, seed=0, sizes=[(96, 72), (80, 80)], bad_samples=False)
    rng = random.Random(0)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    for row in rows:  # web captions vary in length
        row["caption"] += " " + " ".join(rng.choice(FILLER) for _ in range(rng.randint(0, 32)))
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = {"input.path": str(pairs), "output.path": str(shards), "resize.image_size": 64,
             "resize.resize_mode": "center_crop", "executor.processes": 1, "filters.languages": []}  # fmt: skip
    shard(load_config(ShardConfig, None, flags), show_progress=False)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [r["caption"] for r in rows] + PROMPTS * 20
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                                 tie_word_embeddings=True)).save_pretrained(llm)  # fmt: skip
    tok.save_pretrained(llm)
    return shards, llm, unet


def overrides(shards: Path, llm: Path, unet: Path, out: Path, steps: int, extra: list[str]) -> list[str]:
    """configs/t2i/tiny.yaml with this benchmark's shapes: stage full, fp32, validation off, one checkpoint (at the
    end, after the last timed step), a metrics row every step."""
    return [
        f"model.llm={llm}", f"model.unet={unet}", "model.max_length=64", f"data.shards=[{shards}]",
        "data.resolution=32", "data.num_workers=0", "data.shuffle_buffer=32", "train.stage=full",
        f"train.batch_size={BATCH}", f"train.lr={LR}", "train.warmup_steps=0", f"train.max_steps={steps}",
        "train.log_every=1", f"train.save_every={steps}", "train.keep_last=1", "train.ema.enabled=false",
        "validation.every=0", f"train.output_dir={out}", *extra,
    ]  # fmt: skip


# -- (b, c) training: one run per process ---------------------------------------------------------------------------
def child(spec_json: str) -> None:
    spec = json.loads(spec_json)
    import torch

    from mpm.core.config import load_config
    from t2i.config import T2IConfig

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    cfg = load_config(T2IConfig, REPO / "configs" / "t2i" / "tiny.yaml", None, spec["overrides"])
    result, ends = {}, []
    if spec["kind"] == "recipe":
        from mpm.core.runs import Metrics
        from t2i import recipe

        if cfg.data.text_feature_cache:  # built here (timed), so the recipe finds it made
            from t2i.cache import build_cache

            pipe = recipe.build_pipeline(cfg)
            start = time.perf_counter()
            build_cache(cfg.data.text_feature_cache, cfg.data.shards, pipe.text_encoder, pipe.tokenizer,
                        pipe.text_proj.config, torch.device("cpu"), show_progress=False)  # fmt: skip
            result["cache_build_s"] = time.perf_counter() - start
            del pipe
        log = Metrics.log

        def clocked(self, step, values):  # the instants metrics.jsonl's elapsed_s is taken at, unrounded + CPU time
            log(self, step, values)
            ends.append((time.perf_counter(), time.process_time()))

        Metrics.log = clocked
        recipe.train(cfg, show_progress=False)
        rows = [json.loads(line) for line in (Path(cfg.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
        result["elapsed_s"] = [r["elapsed_s"] for r in rows]
    else:
        handwritten_train(cfg, ends)
    # step i's time: the end of step i - the end of step i-1 (wall clock, and this process's CPU time)
    result["step_s"] = [b[0] - a[0] for a, b in zip(ends, ends[1:])]
    result["cpu_s"] = [b[1] - a[1] for a, b in zip(ends, ends[1:])]
    print(json.dumps(result))


def handwritten_train(cfg, ends: list) -> None:
    """A minimal loop: the same data stream, UNet, LLM, AdamW and clipping; each step's end (wall, CPU) in `ends`."""
    import torch
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from torch.utils.data import DataLoader

    from t2i.data import PairImages, collate
    from t2i.recipe import build_pipeline

    t, d = cfg.train, cfg.data
    set_seed(t.seed)
    pipe = build_pipeline(cfg)  # the same weights as the recipe's run (same seed, same order)
    llm, tokenizer, unet = pipe.text_encoder.eval(), pipe.tokenizer, pipe.unet.train()
    proj = torch.nn.Sequential(torch.nn.Linear(512, 256, bias=False), torch.nn.LayerNorm(256))
    proj.load_state_dict({"0.weight": pipe.text_proj.linear.weight, "1.weight": pipe.text_proj.norm.weight,
                          "1.bias": pipe.text_proj.norm.bias})  # fmt: skip
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    params = [*unet.parameters(), *proj.parameters()]
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    stream = PairImages(d.shards, d.weights, d.resolution, d.center_crop, d.random_flip, d.caption_dropout,
                        d.shuffle_buffer, t.seed, batch_size=t.batch_size)  # fmt: skip
    batches = iter(DataLoader(stream, batch_size=t.batch_size, num_workers=d.num_workers, collate_fn=collate))
    for _ in range(t.max_steps):
        batch = next(batches)
        x0 = batch["pixels"]
        text = tokenizer([c + tokenizer.eos_token for c in batch["captions"]], padding=True, return_tensors="pt")
        with torch.no_grad():
            states = llm.model(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).last_hidden_state
        noise = torch.randn_like(x0)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x0),))
        noisy = noise_scheduler.add_noise(x0, noise, timesteps)
        predicted = unet(noisy, timesteps, encoder_hidden_states=proj(states),
                         encoder_attention_mask=text["attention_mask"]).sample  # fmt: skip
        loss = torch.nn.functional.mse_loss(predicted, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        loss.item()
        ends.append((time.perf_counter(), time.process_time()))


def run_child(spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env
    )
    if proc.returncode:
        raise SystemExit(f"{spec['kind']} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- (a) sampling -------------------------------------------------------------------------------------------------------
def sampling(llm: Path, unet_config: Path, repeats: int, steps: int) -> dict:
    """Seconds per image (wall clock and this process's CPU time) of both ways, alternating A/B then B/A."""
    import numpy as np
    import torch
    from diffusers import DDIMScheduler

    from t2i import MPMPaintPipeline

    torch.manual_seed(0)
    pipe = MPMPaintPipeline.from_parts(str(llm), unet=unet_config, max_length=64)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.eval()
    guidance = 7.5

    def mpm(seed: int):
        generator = torch.Generator().manual_seed(seed)
        return pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                    output_type="np").images  # fmt: skip

    @torch.no_grad()
    def handwritten(seed: int):
        cond, cond_mask, _ = pipe.encode_prompt(PROMPTS)
        uncond, uncond_mask, _ = pipe.encode_prompt([""] * len(PROMPTS))
        width = cond.shape[1]  # the empty prompt is the shortest: pad it to the prompts' length
        embeds = torch.cat([torch.nn.functional.pad(uncond, (0, 0, 0, width - uncond.shape[1])), cond])
        mask = torch.cat([torch.nn.functional.pad(uncond_mask, (0, width - uncond.shape[1])), cond_mask])
        scheduler, unet = pipe.scheduler, pipe.unet
        scheduler.set_timesteps(steps)
        shape = (len(PROMPTS), 3, 32, 32)
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            prediction = unet(model_input, t, encoder_hidden_states=embeds, encoder_attention_mask=mask).sample
            uncond_pred, cond_pred = prediction.chunk(2)
            prediction = uncond_pred + guidance * (cond_pred - uncond_pred)
            latents = scheduler.step(prediction, t, latents).prev_sample
        return (latents / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()

    difference = float(np.abs(mpm(0) - handwritten(0)).max())  # also the warm-up of both
    if difference > 1e-4:
        raise SystemExit(f"the pipeline and the hand-written loop draw different images (max difference {difference})")
    times = {name: {"wall": [], "cpu": []} for name in ("MPMPaintPipeline", "hand-written loop")}
    for repeat in range(repeats):
        order = [("MPMPaintPipeline", mpm), ("hand-written loop", handwritten)]
        for name, draw in order if repeat % 2 == 0 else order[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            draw(repeat + 1)
            times[name]["wall"].append((time.perf_counter() - wall) / len(PROMPTS))
            times[name]["cpu"].append((time.process_time() - cpu) / len(PROMPTS))
        print(f"[sampling {repeat + 1}/{repeats}] "
              + ", ".join(f"{k} {v['wall'][-1]:.3f} s/image (CPU {v['cpu'][-1]:.3f})" for k, v in times.items()),
              flush=True)  # fmt: skip
    return {"seconds_per_image": times, "max_image_difference": difference, "steps": steps, "prompts": len(PROMPTS)}


def median_of_runs(runs: list[dict], key: str, warmup: int) -> float:
    """The median over runs of each run's median step (steps warmup+1 .. the last): robust to a busy moment."""
    return statistics.median(statistics.median(r[key][warmup - 1 :]) for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16, help="training steps per run (the first --warmup not timed)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--sample-repeats", type=int, default=5, help="timed sampling calls of each way")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default); see above")
    parser.add_argument("--skip-sampling", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    shards, llm, unet = prepare()
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                     "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "batch": BATCH,
                     "unet": UNET, "load_average_start": os.getloadavg()[0]}  # fmt: skip
    if not args.skip_sampling:
        results["sampling"] = sampling(llm, unet, args.sample_repeats, args.sample_steps)

    settings = {
        "hand-written loop (live LLM)": ("handwritten", []),
        "recipe, live LLM": ("recipe", []),
        "recipe, text-feature cache": ("recipe", [f"data.text_feature_cache={WORK / 'cache'}"]),
        "recipe, live LLM, EMA on (default)": ("recipe", ["train.ema.enabled=true"]),
    }
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    for repeat in range(0 if args.skip_training else args.repeats):
        for name in list(settings) if repeat % 2 == 0 else list(settings)[::-1]:
            kind, extra = settings[name]
            out = WORK / "run"
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(WORK / "cache", ignore_errors=True)
            spec = {"kind": kind, "threads": args.threads,
                    "overrides": overrides(shards, llm, unet, out, args.steps, extra)}  # fmt: skip
            runs[name].append(run_child(spec))
            shutil.rmtree(out, ignore_errors=True)
            one = runs[name][-1]
            print(f"[training {repeat + 1}/{args.repeats}] {name}: median step "
                  f"{statistics.median(one['step_s'][args.warmup - 1 :]):.3f} s "
                  f"(CPU {statistics.median(one['cpu_s'][args.warmup - 1 :]):.3f} s)", flush=True)  # fmt: skip

    results["load_average_end"] = os.getloadavg()[0]
    print(f"\nmachine: {results['machine']}, torch {torch.__version__}, {torch.get_num_threads()} torch threads; "
          f"load average {results['load_average_start']:.2f} at the start, {results['load_average_end']:.2f} at the "
          "end (other work shares the machine)")  # fmt: skip
    if "sampling" in results:
        s = results["sampling"]["seconds_per_image"]
        table = {k: {c: statistics.median(v[c]) for c in ("wall", "cpu")} for k, v in s.items()}
        mpm, hand = table["MPMPaintPipeline"], table["hand-written loop"]
        results["sampling"]["median"] = table
        results["sampling"]["ratio"] = {c: hand[c] / mpm[c] for c in ("wall", "cpu")}
        print(f"\n(a) sampling: {args.sample_steps} DDIM steps, guidance 7.5, {len(PROMPTS)} prompts a call, median of "
              f"{args.sample_repeats} alternating calls each")  # fmt: skip
        print(f"{'':<30} {'s / image':>10} {'CPU s / image':>14}")
        print(f"{'MPMPaintPipeline.__call__':<30} {mpm['wall']:>10.3f} {mpm['cpu']:>14.3f}")
        print(f"{'hand-written CFG loop':<30} {hand['wall']:>10.3f} {hand['cpu']:>14.3f}")
        print(f"ratio hand-written / MPM: {hand['wall'] / mpm['wall']:.3f}x wall, {hand['cpu'] / mpm['cpu']:.3f}x CPU "
              "(target >= 0.95x)")  # fmt: skip
    if runs and all(runs.values()):
        table = {n: {c: median_of_runs(rs, f"{c}_s", args.warmup) for c in ("step", "cpu")} for n, rs in runs.items()}
        base, live = table["hand-written loop (live LLM)"], table["recipe, live LLM"]
        cached = table["recipe, text-feature cache"]
        build = statistics.median(r["cache_build_s"] for r in runs["recipe, text-feature cache"])
        results["training"] = {
            "runs": runs, "median_step_s": table, "steps": args.steps, "timed_steps": args.steps - args.warmup,
            "ratio": {c: base[c] / live[c] for c in ("step", "cpu")},
            "cache_speedup": {c: live[c] / cached[c] for c in ("step", "cpu")}, "cache_build_s": build,
        }  # fmt: skip
        print(f"\n(b, c) training: batch {BATCH}, steps {args.warmup + 1}-{args.steps} of each run timed, fresh "
              f"processes alternating; the median step of each run, the median of {args.repeats} runs")  # fmt: skip
        print(f"{'':<38} {'step (s)':>9} {'steps/s':>8} {'CPU s':>7} {'hand-written / this':>20}")
        for name, row in table.items():
            print(f"{name:<38} {row['step']:>9.3f} {1 / row['step']:>8.2f} {row['cpu']:>7.3f} "
                  f"{base['step'] / row['step']:>19.3f}x")  # fmt: skip
        print(f"ratio hand-written / recipe (live): {base['step'] / live['step']:.3f}x wall, "
              f"{base['cpu'] / live['cpu']:.3f}x CPU (target >= 0.95x)")  # fmt: skip
        print(f"text-feature cache: {live['step'] / cached['step']:.2f}x steps/s over live encoding "
              f"({live['cpu'] / cached['cpu']:.2f}x in CPU time); building it took {build:.1f} s (median) for 200 "
              "captions")  # fmt: skip
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "bench_t2i.json").write_text(json.dumps(results, indent=1))
    print(f"\nwritten: {WORK / 'bench_t2i.json'}")


if __name__ == "__main__":
    main()
