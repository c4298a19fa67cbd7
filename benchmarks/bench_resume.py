"""CPU: how long a resumed stage-1 run takes to reach its data position, passing over samples vs decoding them.

    python benchmarks/bench_resume.py [--samples 2000] [--position 400] [--repeats 3]

Writes pair shards with `mpm data shard` (synthetic photos-like JPEGs, 448 px keep_ratio, cached in
benchmarks/_work/resume/), then times, side by side and alternating, the wait for the first batch at batch
`--position` of the caption stream the i2t recipe trains on (batch 4, 2 DataLoader workers, slicing on at 448 px):
  decode   the stream before this change: every sample before the position decoded, sliced and tokenized
  pass     `PairCaptions(skip_batches=position)`: samples before the position are read from the tars, not decoded
Both must then give the same batch (checked).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import CLIPVisionConfig, Qwen2Config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench_i2t import word_tokenizer  # noqa: E402

from dataproc.sharder import ShardConfig, shard  # noqa: E402
from dataproc.synthetic import SIZES, write_pairs  # noqa: E402
from mpm.core.config import load_config  # noqa: E402
from mpm.data import PairCaptions, collate  # noqa: E402
from mpm.modeling import MPMForConditionalGeneration  # noqa: E402
from mpm.train_config import CAPTION_PROMPTS  # noqa: E402

WORK = REPO / "benchmarks" / "_work" / "resume"


def make_shards(samples: int) -> Path:
    out = WORK / f"shards-{samples}"
    if (out / "stats.json").exists():
        return out
    pairs = write_pairs(WORK / f"pairs-{samples}", samples, seed=0, sizes=SIZES[:7], bad_samples=False, noise=8.0)
    flags = {"input.path": str(pairs), "output.path": str(out), "output.samples_per_shard": 250,
             "resize.image_size": 448, "resize.resize_mode": "keep_ratio", "filters.languages": [],
             "filters.near_duplicate_max_distance": None}  # fmt: skip
    shard(load_config(ShardConfig, None, flags), show_progress=False)
    return out


def first_batch_at(processor, shards: Path, position: int, pass_over: bool) -> tuple[float, dict]:
    stream = PairCaptions([str(shards)], None, processor, CAPTION_PROMPTS, 2048, shuffle_buffer=100, seed=0,
                          batch_size=4, skip_batches=position if pass_over else 0)  # fmt: skip
    start = time.perf_counter()
    loader = DataLoader(stream, batch_size=4, num_workers=2, collate_fn=partial(collate, processor))
    for i, batch in enumerate(loader):
        if i == position:
            return time.perf_counter() - start, batch
    raise SystemExit(f"the stream has fewer than {position + 1} batches: lower --position or raise --samples")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--position", type=int, default=400, help="the batch the resumed run starts from")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shards = make_shards(args.samples)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              image_size=448, patch_size=14)  # fmt: skip
    text = Qwen2Config(vocab_size=8000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    _, processor = MPMForConditionalGeneration.from_parts(
        vision, text, tokenizer=word_tokenizer(8000), connector_type="resampler", use_slicing=True
    )
    times = {"decode": [], "pass": []}
    for _ in range(args.repeats):
        seconds, decoded = first_batch_at(processor, shards, args.position, pass_over=False)
        times["decode"].append(seconds)
        seconds, passed = first_batch_at(processor, shards, args.position, pass_over=True)
        times["pass"].append(seconds)
        assert torch.equal(decoded["input_ids"], passed["input_ids"]), "the two ways gave different batches"
    decode, fast = statistics.median(times["decode"]), statistics.median(times["pass"])
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"first batch at position {args.position} (x4 samples, 2 workers), median of {args.repeats}:")
    print(f"  decode everything before it: {decode:7.2f} s")
    print(f"  pass over it undecoded:      {fast:7.2f} s")
    print(f"  speed-up: {decode / fast:.1f}x")


if __name__ == "__main__":
    main()
