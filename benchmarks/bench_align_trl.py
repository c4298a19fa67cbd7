"""CPU: the training step of `mpm train align` (DPO) against TRL's `DPOTrainer`, same model, data and settings.

    python benchmarks/bench_align_trl.py [--rounds 3] [--steps 6] [--pairs 4]     (needs the bench-trl extra)

One tiny MPM model (the one of bench_align.py: CLIP 4 x 256 at 224 px, mlp connector, a 4 x 512 Qwen2, 8k-word
vocabulary) is saved, and exported with mpm.export.export_llava to a transformers LlavaForConditionalGeneration
checkpoint for TRL. Both train on the same 16 preference pairs (image, question, chosen, rejected: the same tokens,
checked) with `--pairs` pairs per step, plain DPO (loss sigmoid, beta 0.1), AdamW at 5e-7, no weight decay, gradient
clipping at 1.0, cosine schedule, fp32, no gradient checkpointing, dropout off. Both train the same parameters: the
LLM (embeddings and LM head included) and the connector; the vision tower is frozen (checked).

Reference model: both use log-probs computed once before training, so no step runs it. `mpm train align` caches
them itself (mpm.align.reference). TRL 1.16 refuses `precompute_ref_log_probs=True` for vision datasets (its
DPOTrainer raises ValueError), so this script does TRL's precompute itself: its own `compute_ref_log_probs` over
its own vision collator's batches, the results added as the `ref_chosen_logps` / `ref_rejected_logps` columns its
loss reads when `precompute_ref_logps` is set (what `precompute_ref_log_probs=True` does for text datasets).

Timed: the time between consecutive optimizer steps (data encoding, forward over chosen + rejected, loss, backward,
clipping, optimizer and scheduler steps), the precompute, model loading and saving excluded; the first step of each
run is dropped as warm-up. The two trainers run `--rounds` times each, alternated, in one process; the medians over
all timed steps are printed with ratio = TRL s/step / mpm s/step (>= 1: mpm is at least as fast), and the same
for the fastest step of each (the least disturbed by other processes on a shared machine).
Results: benchmarks/_work/align_trl/bench_align_trl.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
import trl  # noqa: E402
from bench_align import build, pairs  # noqa: E402
from datasets import Dataset  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoProcessor, LlavaForConditionalGeneration, TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from mpm.align.batches import collate_pairs, encode_pair  # noqa: E402
from mpm.align.config import (  # noqa: E402
    AlignConfig,
    DataSection,
    LossSection,
    ModelSection,
    ReferenceSection,
    TrainSection,
)
from mpm.export import export_llava  # noqa: E402
from mpm.recipes import align  # noqa: E402
from mpm.train_config import ModelSection as I2TModelSection  # noqa: E402
from mpm.training import build_model, set_trainable  # noqa: E402

WORK = REPO / "benchmarks" / "_work" / "align_trl"
LR, BETA, NUM_PAIRS = 5e-7, 0.1, 16


def make_models() -> tuple[Path, Path]:
    """The MPM checkpoint `mpm train align` starts from, and its LLaVA export for TRL."""
    model, processor = build()
    mpm_dir, llava_dir = WORK / "mpm_model", WORK / "llava_model"
    model.save_pretrained(mpm_dir)
    processor.save_pretrained(mpm_dir)
    export_llava(mpm_dir, llava_dir)
    return mpm_dir, llava_dir


def write_pairs() -> tuple[Path, list]:
    """bench_align.py's pairs (an image each, a 12-word question, 48-word answers) as an mpm-format jsonl."""
    data = pairs(NUM_PAIRS)
    path = WORK / "pairs.jsonl"
    with path.open("w") as f:
        for p in data:
            record = {"id": p.id, "image": str(p.image), "question": p.question, "chosen": p.chosen,
                      "rejected": p.rejected}  # fmt: skip
            f.write(json.dumps(record) + "\n")
    return path, data


def trl_dataset(data: list, eos: str) -> Dataset:
    """The same pairs in TRL's plain vision format, the prompt and answers as MPM's template writes them (the
    exported processor's chat template is MPM's plain one, which takes no image parts)."""
    return Dataset.from_list([{
        "images": [Image.open(p.image).convert("RGB")],
        "prompt": f"User: <image>\n{p.question}\nAssistant:",
        "chosen": f" {p.chosen}{eos}",
        "rejected": f" {p.rejected}{eos}",
    } for p in data])  # fmt: skip


def step_intervals(stamps: list[float]) -> list[float]:
    """Seconds per step from the times the steps ended, the first step (warm-up) dropped."""
    return [b - a for a, b in zip(stamps, stamps[1:])]


def run_mpm(mpm_dir: Path, data_path: Path, run: int, args) -> list[float]:
    """One `mpm train align` run of `args.steps` steps; its step times from the progress bar's updates, which the
    loop makes once per optimizer step (the bar is off; the updates still happen)."""
    stamps = []

    class StampedBar(tqdm):
        def update(self, n=1):
            stamps.append(time.perf_counter())
            return super().update(n)

    cfg = AlignConfig(
        model=ModelSection(init_from=str(mpm_dir)),
        data=DataSection(preferences=str(data_path), format="mpm"),
        loss=LossSection(preset="dpo", beta=BETA),
        reference=ReferenceSection(cache=str(WORK / "mpm_refcache"), batch_size=args.pairs),
        train=TrainSection(output_dir=str(WORK / f"mpm_run{run}"), max_steps=args.steps, batch_size=args.pairs,
                           lr=LR, connector_lr=LR, train_llm=True, vision="frozen", log_every=10**6,
                           save_every=10**6),
    )  # fmt: skip
    with mock.patch.object(align, "tqdm", StampedBar):
        align.train(cfg, show_progress=False)
    return step_intervals(stamps)


class StepStamps(TrainerCallback):
    """The time at the end of each optimizer step (after the scheduler step and zero_grad)."""

    def __init__(self):
        self.stamps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.stamps.append(time.perf_counter())


def with_reference_logps(trainer: DPOTrainer, dataset: Dataset, batch_size: int) -> Dataset:
    """TRL's precompute, done here: its reference model over its collator's batches, in dataset order."""
    chosen, rejected = [], []
    for start in range(0, len(dataset), batch_size):
        batch = trainer.data_collator(
            [dict(row) for row in dataset.select(range(start, min(start + batch_size, len(dataset))))]
        )
        c, r = trainer.compute_ref_log_probs(trainer.ref_model, batch)
        chosen += c.tolist()
        rejected += r.tolist()
    return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)


def with_reference_columns(collator):
    """TRL's vision collator, passing the precomputed columns on as the text collator does."""

    def collate(examples: list[dict]) -> dict:
        batch = collator(examples)
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            batch[key] = torch.tensor([example[key] for example in examples])
        return batch

    return collate


def trl_trainer(llava_dir: Path, dataset: Dataset, run: int, args) -> tuple[DPOTrainer, StepStamps]:
    """A DPOTrainer on the LLaVA export, its reference log-probs precomputed and its reference model dropped."""
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=torch.float32)
    model.model.vision_tower.requires_grad_(False)  # as `train.vision: frozen`
    config = DPOConfig(
        output_dir=str(WORK / f"trl_run{run}"), max_steps=args.steps, per_device_train_batch_size=args.pairs,
        learning_rate=LR, weight_decay=0.0, max_grad_norm=1.0, lr_scheduler_type="cosine", optim="adamw_torch",
        loss_type=["sigmoid"], beta=BETA, max_length=None, bf16=False, activation_checkpointing=False,
        disable_dropout=True, use_cpu=True, report_to="none", save_strategy="no", logging_steps=10**6,
        remove_unused_columns=False, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    stamps = StepStamps()
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset,
                         processing_class=AutoProcessor.from_pretrained(llava_dir), callbacks=[stamps])  # fmt: skip
    trainer.train_dataset = with_reference_logps(trainer, dataset, args.pairs)
    trainer.data_collator = with_reference_columns(trainer.data_collator)
    trainer.precompute_ref_logps, trainer.ref_model = True, None  # the steps read the columns, as with precompute
    return trainer, stamps


def run_trl(llava_dir: Path, dataset: Dataset, run: int, args) -> list[float]:
    """One DPOTrainer run of `args.steps` steps; its step times from a callback at each optimizer step's end."""
    trainer, stamps = trl_trainer(llava_dir, dataset, run, args)
    trainer.train()
    return step_intervals(stamps.stamps)


def check_same_work(mpm_dir: Path, llava_dir: Path, data: list, dataset: Dataset, args) -> dict:
    """Both see rows of the same length and train the same number of parameters."""
    mpm_model, processor = build_model(I2TModelSection(init_from=str(mpm_dir)))
    groups = set_trainable(mpm_model, TrainSection(train_llm=True, vision="frozen"))
    mpm_rows = collate_pairs(processor, [encode_pair(processor, p, 4096) for p in data[: args.pairs]])["input_ids"]
    trainer, _ = trl_trainer(llava_dir, dataset, -1, args)
    rows = trainer.train_dataset.select(range(args.pairs))
    trl_rows = trainer.data_collator([dict(row) for row in rows])["input_ids"]
    checked = {
        "tokens_per_row": [mpm_rows.shape[1], trl_rows.shape[1]],
        "trainable_parameters": [sum(p.numel() for g in groups for p in g["params"]),
                                 sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)],
    }  # fmt: skip
    for what, (ours, theirs) in checked.items():
        if ours != theirs:
            raise SystemExit(f"not the same work: {what} mpm {ours}, TRL {theirs}")
    return checked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="runs of each trainer, alternated")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run (the first is not timed)")
    ap.add_argument("--pairs", type=int, default=4, help="pairs per step (2x rows)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)

    mpm_dir, llava_dir = make_models()
    data_path, data = write_pairs()
    dataset = trl_dataset(data, AutoProcessor.from_pretrained(llava_dir).tokenizer.eos_token)
    checked = check_same_work(mpm_dir, llava_dir, data, dataset, args)
    ours, theirs = [], []
    for run in range(args.rounds):
        ours += run_mpm(mpm_dir, data_path, run, args)
        theirs += run_trl(llava_dir, dataset, run, args)
    a, b = statistics.median(ours), statistics.median(theirs)

    result = {
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "trl": trl.__version__,
        "pairs_per_step": args.pairs,
        "timed_steps_each": len(ours),
        **checked,
        "mpm_step_s": round(a, 4),
        "trl_step_s": round(b, 4),
        "ratio_trl_over_mpm": round(b / a, 3),
        "mpm_fastest_step_s": round(min(ours), 4),
        "trl_fastest_step_s": round(min(theirs), 4),
        "ratio_fastest": round(min(theirs) / min(ours), 3),
        "mpm_steps_s": [round(x, 3) for x in ours],
        "trl_steps_s": [round(x, 3) for x in theirs],
    }
    (WORK / "bench_align_trl.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"DPO step, {args.pairs} pairs ({checked['tokens_per_row'][0]} tokens a row), median of {len(ours)} steps: "
          f"mpm {a:.3f} s, TRL {trl.__version__} {b:.3f} s -> TRL / mpm = {b / a:.2f}")  # fmt: skip
    print(f"fastest step: mpm {min(ours):.3f} s, TRL {min(theirs):.3f} s -> TRL / mpm = {result['ratio_fastest']:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
