"""Stage-1 (caption pretraining) speed and memory: the recipe with its efficiency switches off vs on, same shapes.

    python benchmarks/bench_stage1.py [--steps 10] [--repeats 2] [--ablation]

`mpm train i2t` (the real recipe: pair shards written by `mpm data shard`, the DataLoader, accelerate, checkpoints)
runs with every `train.efficiency.*` switch off (the recipe before them) and on (the defaults), alternating the
two in fresh processes so that the machine's noise and each process's peak memory belong to one run. Shapes: a
SigLIP-like tower (6 layers x 384, 224 px, patch 16: 196 patches, feature layer -2, attention-pooling head), the
resampler (64 queries), a Qwen2-like LLM (4 layers x 512) with Qwen2.5's vocabulary of 151,936 and tied
embeddings, captions of 10-60 words, batch 8, bf16 mixed precision, a checkpoint every 5 steps; peak RSS is
sampled while the steps run (after the model is built). With `--ablation`,
each switch is also turned off alone. Targets (issue 8): >= 1.5x samples/s; the frozen LLM's memory halved.
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
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORK = REPO / "benchmarks" / "_work" / "stage1"
# Each switch's "off" value. pack_sequences is "auto" by default: with sdpa (this CPU) it packs a micro-batch when it
# fits in data.max_length (2048) tokens; the ablation also shows "always".
SWITCHES = {
    "frozen_in_compute_dtype": "false",
    "trainable_only_checkpoints": "false",
    "vision_early_exit": "false",
    "pack_sequences": "never",
    "supervised_logits_only": "false",
}
FILLER_WORDS = [
    "with",
    "near",
    "under",
    "beside",
    "small",
    "large",
    "bright",
    "dark",
    "old",
    "new",
    "wooden",
    "metal",
    "soft",
    "round",
    "tall",
    "short",
]


def prepare() -> tuple[Path, Path, Path]:
    """Pair shards of 160 captioned pictures, and the parts (random weights) saved as if downloaded."""
    shards, vision, llm = WORK / "shards", WORK / "vision", WORK / "llm"
    if (shards / "stats.json").exists() and (llm / "config.json").exists():
        return shards, vision, llm
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2Config,
        Qwen2ForCausalLM,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from dataproc.sharder import ShardConfig, shard
    from dataproc.synthetic import write_pairs
    from mpm.core.config import load_config

    pairs = write_pairs(WORK / "pairs", 160, seed=0, sizes=[(320, 240), (400, 300)], bad_samples=False)
    rng = random.Random(0)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    for row in rows:  # web captions vary in length (LAION: a few words to a paragraph)
        row["caption"] += " " + " ".join(rng.choice(FILLER_WORDS) for _ in range(rng.randint(0, 48)))
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = {"input.path": str(pairs), "output.path": str(shards), "resize.image_size": 224,
             "resize.resize_mode": "center_crop", "executor.processes": 2, "filters.languages": []}  # fmt: skip
    shard(load_config(ShardConfig, None, flags), show_progress=False)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    texts = [r["caption"] for r in rows] + ["Describe the image briefly. user assistant system"] * 20
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2000, special_tokens=special,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                         num_attention_heads=6, image_size=224, patch_size=16)).save_pretrained(vision)  # fmt: skip
    Qwen2ForCausalLM(Qwen2Config(vocab_size=151936, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                                 tie_word_embeddings=True)).save_pretrained(llm)  # fmt: skip
    tok.save_pretrained(llm)
    return shards, vision, llm


def overrides(shards: Path, vision: Path, llm: Path, out: Path, steps: int, switches: dict) -> list[str]:
    return [
        f"model.vision={vision}", f"model.llm={llm}", "model.connector_type=resampler", "model.num_queries=64",
        "model.vision_feature_layer=-2", f"data.shards=[{shards}]", "data.num_workers=0", "data.shuffle_buffer=64",
        "train.stage=pretrain", "train.batch_size=8", "train.mixed_precision=bf16",
        f"train.max_steps={steps}", "train.log_every=1", "train.save_every=5", "train.keep_last=1",
        f"train.output_dir={out}", *[f"train.efficiency.{name}={value}" for name, value in switches.items()],
    ]  # fmt: skip


def child(args_json: str) -> None:
    """One run in this process: samples/s after the first step, peak RSS during the steps, frozen weight bytes."""
    from mpm.core.config import load_config
    from mpm.recipes import i2t
    from mpm.train_config import TrainConfig

    spec = json.loads(args_json)
    cfg = load_config(TrainConfig, None, None, spec["overrides"])
    metrics = Path(cfg.train.output_dir) / "metrics.jsonl"
    peak, frozen = {"rss": 0}, {}
    done = threading.Event()

    def sample_rss():  # the resident set while steps run (after setup: the first metrics row is written)
        while not done.is_set():
            if metrics.exists() and metrics.stat().st_size:
                status = Path("/proc/self/status").read_text()
                rss = int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1])
                peak["rss"] = max(peak["rss"], rss)
            time.sleep(0.02)

    original_keep = i2t.keep_frozen_norm_statistics

    def keep_and_record(model):  # called once, right before the loop: the frozen LLM weights as they train
        lm = model.language_model
        frozen["bytes"] = sum(p.numel() * p.element_size() for p in lm.parameters() if not p.requires_grad)
        original_keep(model)

    i2t.keep_frozen_norm_statistics = keep_and_record
    thread = threading.Thread(target=sample_rss, daemon=True)
    thread.start()
    i2t.train(cfg, show_progress=False)
    done.set()
    thread.join()
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    samples = sum(r["samples"] for r in rows[1:])
    seconds = rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]
    print(json.dumps({"samples_per_s": samples / seconds, "peak_rss_mb": peak["rss"] / 1024,
                      "frozen_llm_mb": frozen["bytes"] / 2**20, "final_loss": rows[-1]["loss"]}))  # fmt: skip


def run(spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env
    )
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ablation", action="store_true", help="also each switch off alone")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    shards, vision, llm = prepare()
    settings = {"all off (before)": SWITCHES, "all on (defaults)": {}}
    if args.ablation:
        settings.update({f"on, but {name}={value}": {name: value} for name, value in SWITCHES.items()})
        settings["on, and pack_sequences=always"] = {"pack_sequences": "always"}
    results: dict[str, list[dict]] = {name: [] for name in settings}
    for repeat in range(args.repeats):
        for name, off in settings.items():
            out = WORK / "run"
            shutil.rmtree(out, ignore_errors=True)
            results[name].append(run({"overrides": overrides(shards, vision, llm, out, args.steps, off)}))
            shutil.rmtree(out, ignore_errors=True)
            print(f"[{repeat + 1}/{args.repeats}] {name}: {results[name][-1]}", flush=True)
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {args.steps} steps of 8 samples"
    )
    print(f"{'setting':<48} {'samples/s':>10} {'x':>7} {'peak RSS MB':>12} {'frozen LLM MB':>14}")
    base = statistics.median(r["samples_per_s"] for r in results["all off (before)"])
    for name, runs in results.items():
        speed = statistics.median(r["samples_per_s"] for r in runs)
        rss = statistics.median(r["peak_rss_mb"] for r in runs)
        frozen = runs[0]["frozen_llm_mb"]
        print(f"{name:<48} {speed:>10.2f} {speed / base:>6.2f}x {rss:>12.0f} {frozen:>14.1f}")


if __name__ == "__main__":
    main()
