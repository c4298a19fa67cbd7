"""CPU: MPMForConditionalGeneration (mlp connector) against transformers' LlavaForConditionalGeneration, same weights.

    python benchmarks/bench_i2t.py [--steps 10] [--new-tokens 32]

Both models are built from the same configs with the same weights (the MPM model exported with mpm.export.to_llava)
and fed the same inputs. Measured side by side, alternating A/B runs so the machine's noise hits both:
training step time (forward + backward + AdamW step, all parameters trainable) and greedy generation tokens/s.
Target (issue 4): at least 0.95x the native class on both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPVisionConfig, PreTrainedTokenizerFast, Qwen2Config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from mpm.export import to_llava  # noqa: E402
from mpm.modeling import MPMForConditionalGeneration  # noqa: E402


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    words = {f"w{i}": i for i in range(vocab - 3)}
    words.update({"<pad>": vocab - 3, "<eos>": vocab - 2, "<unk>": vocab - 1})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def build(args):
    tok = word_tokenizer(8000)
    vision = CLIPVisionConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=224,
        patch_size=16,
    )
    text = Qwen2Config(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model, processor = MPMForConditionalGeneration.from_parts(
        vision, text, tokenizer=tok, connector_type="mlp", image_size=224
    )
    llava = to_llava(model)
    prompt = "<image>\n" + " ".join(f"w{i}" for i in range(args.text_tokens))
    images = [Image.new("RGB", (224, 224), (20 * i, 100, 200)) for i in range(args.batch)]
    encoded = [processor.encode_prompt(prompt, [im]) for im in images]
    batch = processor.collate(encoded)
    batch["labels"] = batch["input_ids"].masked_fill(batch["input_ids"] == model.config.image_token_id, -100)
    return model.float(), llava.float(), batch


class Trainer:
    """One optimizer per model; `step()` times forward + backward + AdamW step."""

    def __init__(self, model, batch):
        self.model, self.batch = model.train(), batch
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(self) -> float:
        b = self.batch
        start = time.perf_counter()
        loss = self.model(
            input_ids=b["input_ids"],
            pixel_values=b["pixel_values"],
            attention_mask=b["attention_mask"],
            labels=b["labels"],
        ).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return time.perf_counter() - start


@torch.no_grad()
def generation_seconds(model, batch, new_tokens: int, native: bool) -> float:
    model.eval()
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    start = time.perf_counter()
    if native:
        model.generate(
            input_ids=batch["input_ids"],
            pixel_values=batch["pixel_values"],
            attention_mask=batch["attention_mask"],
            **kwargs,
        )
    else:
        model.generate(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], **kwargs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="training steps per round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds (training steps alternate A, B; generations too)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    ours, native, batch = build(args)
    with torch.no_grad():  # same weights, same inputs: same logits (the comparison is fair)
        a = ours(
            input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"]
        ).logits
        b = native(
            input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"]
        ).logits
    assert torch.allclose(a, b, atol=1e-4), "the two models disagree: the benchmark would compare different work"
    params = sum(p.numel() for p in ours.parameters())
    seq = batch["input_ids"].shape[1]
    image_tokens = int((batch["input_ids"][0] == ours.config.image_token_id).sum())
    print(f"model: {params / 1e6:.1f}M parameters (CLIP 4x256 + Qwen2 4x512), batch {args.batch} x {seq} tokens "
          f"({image_tokens} image tokens each), {torch.get_num_threads()} threads", flush=True)  # fmt: skip
    trainers = {"mpm": Trainer(ours, batch), "llava": Trainer(native, batch)}
    train_times = {"mpm": [], "llava": []}
    gen_times = {"mpm": [], "llava": []}
    for trainer in trainers.values():
        trainer.step()  # warm-up
    for _ in range(args.rounds * args.steps):  # A, B, A, B...: the machine's noise hits both alike
        for name, trainer in trainers.items():
            train_times[name].append(trainer.step())
    for _ in range(args.rounds):
        for name, model in (("mpm", ours), ("llava", native)):
            gen_times[name].append(generation_seconds(model, batch, args.new_tokens, native=name == "llava"))
    step = {k: statistics.median(v) for k, v in train_times.items()}
    tokens_per_s = {k: args.batch * args.new_tokens / statistics.median(v) for k, v in gen_times.items()}
    print(f"\n{'':28s}{'MPM':>10s}{'LLaVA':>10s}{'MPM/LLaVA speed':>18s}")
    print(
        f"{'train step (s, median)':28s}{step['mpm']:>10.3f}{step['llava']:>10.3f}{step['llava'] / step['mpm']:>17.3f}x"
    )
    print(f"{'generation (tokens/s)':28s}{tokens_per_s['mpm']:>10.1f}{tokens_per_s['llava']:>10.1f}"
          f"{tokens_per_s['mpm'] / tokens_per_s['llava']:>17.3f}x")  # fmt: skip
    print("target: >= 0.95x on both")
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "train_step_s": step,
        "generation_tokens_per_s": tokens_per_s,
        "ratios": {"train": step["llava"] / step["mpm"], "generation": tokens_per_s["mpm"] / tokens_per_s["llava"]},
    }
    out = REPO / "benchmarks" / "_work"
    out.mkdir(parents=True, exist_ok=True)
    (out / "i2t_results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
