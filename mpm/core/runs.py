"""What every training recipe shares about its run folder: checkpoints with keep-last and exact resume, the
metrics log, and the check that a resumed run has the settings it started with.

    {out}/train_config.yaml          the resolved config of the run (a rerun with other settings is refused)
    {out}/checkpoints/step-XXXXXXX/  accelerate's state + state.json (step, data position, unlogged counts)
    {out}/metrics.jsonl              one JSON line per logged step
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from accelerate.utils import DistributedType

from mpm.core.config import diff_configs, load_config, save_config
from mpm.core.errors import ConfigError
from mpm.core.files import atomic_write_json

CHECKPOINTS = "checkpoints"


# What a checkpoint holds, and how a run resumes from it. Format 2: model weights may be only the trainable ones
# (`keep`), and the data position is where an optimizer step ended. A checkpoint of another format is refused
# with this message (final models are plain transformers folders and load whatever their age).
CHECKPOINT_FORMAT = 2
FORMAT_CHANGES = {
    2: "checkpoints hold only the trainable weights, and the loss of a step is weighted by its supervised tokens",
}


class Checkpoints:
    """`{out}/checkpoints/step-XXXXXXX/`: accelerate's state (model, optimizer, scheduler, RNG) + state.json
    (step and data position, the same on every rank), written into a temporary folder and renamed, so a checkpoint
    is whole or absent.

    `keep(name) -> bool` chooses the model weights written (e.g. only trainable ones: a frozen 7B LLM is not
    written every `save_every` steps); a resumed run builds the model as before, so the others are what they were.
    It applies where accelerate hands over a whole state dict (one process, DDP); FSDP and DeepSpeed write their
    own sharded formats, whole.
    """

    def __init__(self, out: Path, keep_last: int, keep: Callable[[str], bool] | None = None):
        self.root = out / CHECKPOINTS
        self.keep_last = keep_last
        self.keep = keep
        self._hooked: set[int] = set()

    def latest(self) -> Path | None:
        done = sorted(p for p in self.root.glob("step-*") if (p / "state.json").exists()) if self.root.exists() else []
        return done[-1] if done else None

    def save(self, accelerator, step: int, state: dict) -> Path:
        final = self.root / f"step-{step:07d}"
        tmp = self.root / f".tmp-step-{step:07d}"
        self._hook(accelerator)
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        with _quiet_shared_tensor_notice():
            accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()  # every rank's RNG file is written before the checkpoint counts as whole
        if accelerator.is_main_process:
            weights = "selected" if self.keep is not None else "all"
            atomic_write_json(tmp / "state.json", {"format": CHECKPOINT_FORMAT, "weights": weights, **state})
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in sorted(p for p in self.root.glob("step-*"))[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    def _hook(self, accelerator) -> None:
        """Drop the weights `keep` refuses from the state dicts accelerate is about to write."""
        if self.keep is None or id(accelerator) in self._hooked:
            return
        keep = self.keep

        def select(models, weights, output_dir):
            for state_dict in weights:
                for name in [n for n in state_dict if not keep(n.removeprefix("module."))]:  # DDP's prefix
                    del state_dict[name]

        accelerator.register_save_state_pre_hook(select)
        self._hooked.add(id(accelerator))

    @staticmethod
    def load(accelerator, folder: Path, optimizer=None) -> dict:
        """Restore the run's state from `folder` and return its state.json. `optimizer`: its parameter groups'
        names (the metrics' lr_<name>) are kept: torch replaces the groups with the saved ones."""
        names = [g.get("name") for g in optimizer.param_groups] if optimizer is not None else []
        state = json.loads((folder / "state.json").read_text())
        if state.get("format", 1) != CHECKPOINT_FORMAT:
            change = FORMAT_CHANGES.get(CHECKPOINT_FORMAT, "the checkpoint format changed")
            raise ConfigError(
                f"{folder} was written by an earlier version of this recipe (checkpoint format {state.get('format', 1)},"
                f" now {CHECKPOINT_FORMAT}: {change}); it cannot be resumed. Start a new train.output_dir (or delete "
                "its checkpoints); final models of earlier runs still load"
            )
        # The data position, the batch layout and the RNG files are per process count: another count cannot resume.
        if state["processes"] != accelerator.num_processes:
            raise ConfigError(
                f"{folder} was written by {state['processes']} processes, this run has "
                f"{accelerator.num_processes}: resume with the same number, or use a new train.output_dir"
            )
        sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        # Weights missing from a checkpoint that holds only some keep the values the rebuilt model has.
        try:
            accelerator.load_state(str(folder), **({} if sharded or state["weights"] == "all" else {"strict": False}))
        except ValueError as exc:  # torch: "loaded state dict contains a parameter group that doesn't match ..."
            raise ConfigError(
                f"{folder} cannot be resumed: its optimizer trains other parameter groups ({exc}); use a new "
                "train.output_dir"
            ) from None
        for group, name in zip(optimizer.param_groups if optimizer is not None else [], names):
            group["name"] = name
        return state


class _SharedTensorNotice(logging.Filter):
    """accelerate notes on every save that tied weights (an LM head sharing the embedding) are written once; they
    load back tied, so the notice says nothing a user can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


@contextmanager
def _quiet_shared_tensor_notice():
    log = logging.getLogger("accelerate.utils.other")
    notice = _SharedTensorNotice()
    log.addFilter(notice)
    try:
        yield
    finally:
        log.removeFilter(notice)


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


def summed(accelerator, tally: dict) -> dict:
    """A dict of counts summed over the processes (a collective: every process calls it at the same step)."""
    import torch

    values = torch.tensor(list(tally.values()), dtype=torch.float64, device=accelerator.device)
    return dict(zip(tally, accelerator.reduce(values, "sum").tolist()))


def summed_count(accelerator, count: int) -> int:
    """`count` summed over the processes (no communication with one process)."""
    if accelerator.num_processes == 1:
        return count
    import torch

    return int(accelerator.reduce(torch.tensor(count, device=accelerator.device), reduction="sum"))


def tracker_config(config: dict, prefix: str = "") -> dict:
    """A nested config as the flat `a.b: value` dict TensorBoard / W&B take (other values as strings)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(tracker_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, int | float | str | bool) else str(v)
    return out
