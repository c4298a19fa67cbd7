"""What every training recipe shares about its run folder: checkpoints with keep-last and exact resume, the
metrics log, and the check that a resumed run has the settings it started with.

    {out}/train_config.yaml          the resolved config of the run (a rerun with other settings is refused)
    {out}/checkpoints/step-XXXXXXX/  accelerate's state + state.json (step, data position, unlogged counts)
    {out}/metrics.jsonl              one JSON line per logged step
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mpm.core.config import diff_configs, load_config, save_config
from mpm.core.errors import ConfigError
from mpm.core.files import atomic_write_json

CHECKPOINTS = "checkpoints"


class Checkpoints:
    """`{out}/checkpoints/step-XXXXXXX/`: accelerate's state (model, optimizer, scheduler, RNG) + state.json
    (step and data position, the same on every rank), written into a temporary folder and renamed, so a checkpoint
    is whole or absent."""

    def __init__(self, out: Path, keep_last: int):
        self.root = out / CHECKPOINTS
        self.keep_last = keep_last

    def latest(self) -> Path | None:
        done = sorted(p for p in self.root.glob("step-*") if (p / "state.json").exists()) if self.root.exists() else []
        return done[-1] if done else None

    def save(self, accelerator, step: int, state: dict) -> Path:
        final = self.root / f"step-{step:07d}"
        tmp = self.root / f".tmp-step-{step:07d}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()  # every rank's RNG file is written before the checkpoint counts as whole
        if accelerator.is_main_process:
            atomic_write_json(tmp / "state.json", state)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in sorted(p for p in self.root.glob("step-*"))[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    @staticmethod
    def load(accelerator, folder: Path) -> dict:
        state = json.loads((folder / "state.json").read_text())
        # The data position, the batch layout and the RNG files are per process count: another count cannot resume.
        if state.get("processes", accelerator.num_processes) != accelerator.num_processes:  # (older: unrecorded)
            raise ConfigError(
                f"{folder} was written by {state['processes']} processes, this run has "
                f"{accelerator.num_processes}: resume with the same number, or use a new train.output_dir"
            )
        accelerator.load_state(str(folder))
        return state


def check_resume(out: Path, cfg: Any, resumable: Sequence[str], filename: str = "train_config.yaml") -> None:
    """A run resumes only with the settings it started with, except the `resumable` keys (how long, how often).

    The resolved config of this run is then saved as `{out}/{filename}` (its schema is `type(cfg)`, any recipe's).
    """
    saved = out / filename
    if saved.exists():
        previous = load_config(type(cfg), saved)
        changes = diff_configs(previous, cfg, ignore=resumable)
        if changes and (out / CHECKPOINTS).exists():
            listing = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes)
            raise ConfigError(
                f"{out} holds checkpoints of a run with other settings ({listing}). Use a new train.output_dir, or "
                "delete its checkpoints to start over."
            )
    save_config(cfg, saved)


class Metrics:
    """One JSON line per logged step in {out}/metrics.jsonl (+ TensorBoard / W&B through accelerate if asked)."""

    def __init__(self, out: Path, accelerator, resumed_at: int | None):
        """`resumed_at`: the checkpoint step a resumed run starts from (rows after it are dropped: they are logged
        again), or None for a new run (a fresh file)."""
        self.path = out / "metrics.jsonl"
        self.accelerator = accelerator
        self.start = time.time()
        if accelerator.is_main_process:
            rows = self.path.read_text(encoding="utf-8").splitlines() if self.path.exists() else []
            kept = [r for r in rows if resumed_at is not None and _step_of(r, resumed_at + 1) <= resumed_at]
            self.path.write_text("".join(r + "\n" for r in kept), encoding="utf-8")

    def log(self, step: int, values: dict) -> None:
        values = {"step": step, **values, "elapsed_s": round(time.time() - self.start, 2)}
        if self.accelerator.is_main_process:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(values) + "\n")
        self.accelerator.log(values, step=step)


def _step_of(row: str, unreadable: int) -> int:
    """A metrics row's step; `unreadable` for a row cut short by a kill."""
    try:
        return json.loads(row)["step"]
    except (ValueError, KeyError, TypeError):
        return unreadable
