"""The preference-alignment recipe: `mpm train align --config configs/align/X.yaml` (DPO, RLHF-V's dense DPO).

    per pair (x = image + question, y_w chosen, y_l rejected; mpm.align.losses has every formula written out):
        s(y)   = sum_t w_t log p(y_t | x, y_<t)   [/ N, N = sum_t w_t, when loss.normalise]
                 w_t = loss.gamma on the tokens of corrected segments (a token diff of y_w and y_l), 1 elsewhere
        L      = -log sigmoid(beta * ((s_pi(y_w) - s_ref(y_w)) - (s_pi(y_l) - s_ref(y_l))))  [+ sft_weight * -s_pi(y_w)]
    step loss = (sum of L over the step's pairs, all micro-batches and processes) / (their number)

The reference model's log-probs are computed once, before training, and cached beside the data
(mpm.align.reference); the loop reads them and never runs the reference model. The loop itself is plain
accelerate, as in mpm/recipes/i2t.py: forward, loss, backward, clip, optimizer and scheduler steps. Checkpoints hold
the weights, optimizer, scheduler, RNG states and the data position, so a resumed run continues exactly.
Start from any MPM checkpoint (a stage-2 final/, or an earlier alignment) or an exported LLaVA one (converted
first, into OUTPUT_DIR/imported/).
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, set_seed
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from mpm.align.batches import EncodedPair, collate_pairs, encode_pair, pair_weights, response_logps
from mpm.align.config import RESUMABLE, AlignConfig
from mpm.align.data import read_preferences
from mpm.align.losses import place_weights, preference_loss, sequence_logps
from mpm.align.reference import ReferenceCache, default_folder, expected_manifest, fill
from mpm.core.config import config_to_dict
from mpm.core.errors import ConfigError, DataError
from mpm.core.files import output_folder
from mpm.core.runs import Checkpoints, Metrics, check_resume, summed, summed_count, tracker_config
from mpm.data import LengthGroupedSampler, to_device
from mpm.export import import_llava_once
from mpm.inference import load_model
from mpm.modeling import MPMForConditionalGeneration
from mpm.processor import MPMProcessor
from mpm.train_config import ModelSection as I2TModelSection
from mpm.training import build_model, keep_frozen_norm_statistics, save_final, set_trainable, shards_weights

logger = logging.getLogger(__name__)


@dataclass
class AlignResult:
    final: Path
    model: MPMForConditionalGeneration
    pairs: int  # usable pairs
    skipped: dict[str, str]  # pair key -> why it could not be used


def train(cfg: AlignConfig, show_progress: bool = True) -> AlignResult:
    """Train to `train.max_steps` (resuming from the last checkpoint if there is one)."""
    cfg.check_required()
    t, d = cfg.train, cfg.data
    out = Path(t.output_dir)

    # 1. Accelerator, seed, the config this run is bound to -------------------------------------------------------
    AcceleratorState._reset_state()  # a process may run several recipes (tests, the demo): each its own settings
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=t.grad_accum,
        mixed_precision=t.mixed_precision,
        log_with=t.report_to or None,
        project_dir=str(out),
    )
    if shards_weights(accelerator) and t.lora.enabled:
        raise ConfigError("train.lora needs whole weights to merge: use DDP or DeepSpeed ZeRO-2, not FSDP / ZeRO-3")
    if accelerator.gradient_accumulation_steps != t.grad_accum:  # an environment variable or DeepSpeed file won
        raise ConfigError(
            f"accelerate accumulates {accelerator.gradient_accumulation_steps} micro-batches but train.grad_accum is "
            f"{t.grad_accum}: set the same number in both"
        )
    if accelerator.is_main_process:
        output_folder(out, "train.output_dir")
        check_resume(out, cfg, RESUMABLE)
    accelerator.wait_for_everyone()
    set_seed(t.seed)

    # 2. The pairs, and the reference log-probs (computed once, each process a share, then read by all) ---------
    preferences = read_preferences(d.preferences, d.images, d.format)
    logger.info("%s", preferences.summary())
    items = [(str(pair.row), pair) for pair in preferences.pairs]  # keyed by record number: ids may repeat
    if not items:
        raise DataError(f"data.preferences {d.preferences}: no usable pair ({preferences.summary()})")
    # An exported (or native) LLaVA checkpoint is converted to an MPM one first, once (mpm.export.import_llava).
    start = _as_mpm(cfg.model.init_from, out / "imported" / "policy", accelerator)
    reference = start if cfg.model.reference in (None, cfg.model.init_from) else cfg.model.reference
    if _model_type(reference) == "llava":  # (a reference folder that is gone is fine while its cache is complete)
        reference = _as_mpm(reference, out / "imported" / "reference", accelerator)
    processor = MPMProcessor.from_pretrained(start)
    cache_folder = Path(cfg.reference.cache) if cfg.reference.cache else default_folder(d.preferences)
    settings = {"max_length": d.max_length, "format": d.format, "images": d.images,
                "chat_template": processor.tokenizer.chat_template, "raw_prompt": d.raw_prompt,
                "mixed_precision": t.mixed_precision}  # fmt: skip
    wanted = [expected_manifest(reference, d.preferences, settings) if accelerator.is_main_process else None]
    wanted = broadcast_object_list(wanted)[0]  # the data file hashed once, not by every process
    if accelerator.is_main_process:  # created (or refused, or emptied for --no-cache) before anyone reads it
        ReferenceCache.open(cache_folder, wanted, cfg.reference.recompute)
    accelerator.wait_for_everyone()
    cache = ReferenceCache.open(cache_folder, wanted, create=False, rank=accelerator.process_index)
    share = items[accelerator.process_index :: accelerator.num_processes]
    made = fill(cache, lambda: load_model(reference, device=str(accelerator.device))[0], processor, share,
                d.max_length, cfg.reference.batch_size, show_progress=show_progress and accelerator.is_main_process,
                autocast=accelerator.autocast, raw_prompt=d.raw_prompt)  # fmt: skip
    if made:
        logger.info("reference log-probs: %d pairs computed into %s", made, cache_folder)
    accelerator.wait_for_everyone()
    cache = ReferenceCache.open(cache_folder, wanted, create=False, rank=accelerator.process_index)
    usable = [(key, pair) for key, pair in items if key in cache.entries]
    if not usable:
        reasons = sorted({why.split(":")[0] for why in cache.skipped.values()})
        raise DataError(f"data.preferences {d.preferences}: none of the {len(items)} pairs can be used ({reasons})")
    if cache.skipped:
        logger.warning("%d of %d pairs cannot be used (too long, a bad image, identical answers): see %s",
                       len(cache.skipped), len(items), cache_folder)  # fmt: skip

    # 3. The policy, what trains, the optimizer ------------------------------------------------------------------
    model, processor = build_model(I2TModelSection(init_from=start,
                                                   attn_implementation=cfg.model.attn_implementation))  # fmt: skip
    groups = set_trainable(model, t)
    for module in model.modules():  # the reference ran without dropout: so does the policy (as TRL's default)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(groups, weight_decay=t.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, t.warmup_steps, t.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    trainable = [p for g in groups for p in g["params"]]
    loss_cfg = cfg.loss.settings()

    # 4. Resume: weights, optimizer, scheduler, RNG, and where in the data we were ---------------------------------
    checkpoints = Checkpoints(out, t.keep_last)
    accelerator.register_for_checkpointing(scheduler)
    step, epoch, consumed, state = 0, 0, 0, {}
    latest = checkpoints.latest()
    if latest is not None:
        state = Checkpoints.load(accelerator, latest, optimizer)
        step, epoch, consumed = state["step"], state["epoch"], state["batches_in_epoch"]
        logger.info("resuming from %s (step %d)", latest, step)
    if t.report_to:
        accelerator.init_trackers("mpm-align", config=tracker_config(config_to_dict(cfg)))

    # 5. The loop ----------------------------------------------------------------------------------------------
    stream = _micro_batches(usable, t.batch_size, t.seed, accelerator, epoch, consumed)
    metrics = Metrics(out, accelerator, resumed_at=step if latest is not None else None)
    tally = dict.fromkeys(TALLY, 0.0)  # this process's sums since the last log
    if accelerator.is_main_process:
        tally.update(state.get("unlogged", {}))
    bar = tqdm(total=t.max_steps, initial=step, unit=" steps",
               disable=not (show_progress and accelerator.is_main_process))  # fmt: skip
    model.train()
    keep_frozen_norm_statistics(model)
    while step < t.max_steps:
        # 5a. This optimizer step's micro-batches, and its pairs counted over all of them on every process: the
        # step's loss is the sum of the pairs' losses divided ONCE by their number (a smaller last micro-batch
        # weighs no more per pair).
        micro = [next(stream) for _ in range(t.grad_accum)]
        epoch, consumed = micro[-1][1], micro[-1][2]
        step_pairs = summed_count(accelerator, sum(len(group) for group, _, _ in micro))
        grad_norm = 0.0
        for group, _, _ in micro:
            pairs = [_encoded(processor, pair, d, key, cache_folder) for key, pair in group]
            with accelerator.accumulate(model):
                losses, logged = pair_losses(model, processor, pairs, cache, loss_cfg, accelerator.device)
                # accelerate divides by grad_accum and DDP averages over processes: undo both, so the gradient is
                # d(sum of the step's pair losses) / d(weights) divided by step_pairs.
                loss = losses.sum() * (t.grad_accum * accelerator.num_processes / step_pairs)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(trainable, t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            for key in TALLY:
                tally[key] += logged[key]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            scheduler.step()
        step += 1
        bar.update()
        if tally["pairs"]:
            bar.set_postfix_str(f"loss {tally['loss'] / tally['pairs']:.4f}", refresh=False)
        if step % t.log_every == 0 or step == t.max_steps:
            totals = summed(accelerator, tally)
            n = max(totals["pairs"], 1)
            rates = {f"lr_{g['name']}": lr for g, lr in zip(optimizer.param_groups, scheduler.get_last_lr())}
            metrics.log(step, {
                "loss": round(totals["loss"] / n, 6),  # per pair, with the SFT term if any
                "dpo_loss": round(totals["dpo_loss"] / n, 6),
                "reward_margin": round(totals["margin"] / n, 6),  # mean of r_w - r_l
                "reward_accuracy": round(totals["correct"] / n, 4),  # share of pairs with r_w > r_l
                "reward_chosen": round(totals["reward_chosen"] / n, 6),
                "reward_rejected": round(totals["reward_rejected"] / n, 6),
                "logp_chosen": round(totals["logp_chosen"] / n, 4),  # the policy's s(y_w), as the loss sees it
                "logp_rejected": round(totals["logp_rejected"] / n, 4),
                **rates,
                "grad_norm": round(float(grad_norm), 5),
                "pairs": int(totals["pairs"]),
            })  # fmt: skip
            tally = dict.fromkeys(TALLY, 0.0)
        if step % t.save_every == 0 or step == t.max_steps:
            checkpoints.save(accelerator, step, {
                "step": step, "epoch": epoch, "batches_in_epoch": consumed, "processes": accelerator.num_processes,
                "unlogged": summed(accelerator, tally),
            })  # fmt: skip
    bar.close()

    # 6. The final model, a plain MPM checkpoint (LoRA merged) ---------------------------------------------------
    accelerator.wait_for_everyone()
    final = out / "final"
    unwrapped = accelerator.unwrap_model(model)
    merges = hasattr(unwrapped.language_model, "merge_and_unload") or unwrapped.added_token_embeddings is not None
    state_dict = None if merges else accelerator.get_state_dict(model)
    model = save_final(unwrapped, processor, final, state_dict, accelerator.is_main_process)
    accelerator.end_training()
    return AlignResult(final, model, len(usable), dict(cache.skipped))


TALLY = ("loss", "dpo_loss", "margin", "correct", "reward_chosen", "reward_rejected", "logp_chosen",
         "logp_rejected", "pairs")  # fmt: skip


def pair_losses(model, processor, pairs: list[EncodedPair], cache: ReferenceCache, loss_cfg,
                device) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
    """Per-pair losses (B,) of one micro-batch (one forward pass over both sides), and their sums for the log."""
    batch = to_device(collate_pairs(processor, pairs), device)
    logps, mask = response_logps(model, batch)
    weights = place_weights(pair_weights(pairs, loss_cfg.gamma, loss_cfg.min_match), mask) if (
        loss_cfg.token_weighted) else None  # fmt: skip
    scores = sequence_logps(logps, mask, weights, loss_cfg.normalise)
    ref_chosen, ref_rejected = cache.get(pairs)
    ref_logps = place_weights([r.to(device) for r in ref_chosen + ref_rejected], mask)  # the cached values in place
    ref_scores = sequence_logps(ref_logps, mask, weights, loss_cfg.normalise)
    b = len(pairs)
    out = preference_loss(scores[:b], scores[b:], ref_scores[:b], ref_scores[b:], loss_cfg.beta,
                          sft_weight=loss_cfg.sft_weight)  # fmt: skip
    margin = out["chosen_rewards"] - out["rejected_rewards"]
    logged = {
        "loss": out["losses"].sum().item(),
        "dpo_loss": out["dpo_losses"].sum().item(),
        "margin": margin.sum().item(),
        "correct": (margin > 0).sum().item(),
        "reward_chosen": out["chosen_rewards"].sum().item(),
        "reward_rejected": out["rejected_rewards"].sum().item(),
        "logp_chosen": scores[:b].detach().sum().item(),
        "logp_rejected": scores[b:].detach().sum().item(),
        "pairs": b,
    }
    return out["losses"], logged


def _micro_batches(items: list, batch_size: int, seed: int, accelerator, epoch: int, consumed: int):
    """This process's micro-batches of (key, pair) from the data position (epoch, batches consumed in it) on,
    endlessly, each with the position after it: `LengthGroupedSampler`'s batches (similar lengths, less padding;
    the order depends only on seed and epoch; each global batch split between the processes)."""
    lengths = [len(pair.question) + len(pair.chosen) + len(pair.rejected) for _, pair in items]
    sampler = LengthGroupedSampler(lengths, batch_size, seed, True, accelerator.process_index,
                                   accelerator.num_processes)  # fmt: skip
    if len(sampler) == 0:
        raise ConfigError(f"{len(items)} usable pairs cannot fill one batch of {batch_size} x "
                          f"{accelerator.num_processes} processes: lower train.batch_size")  # fmt: skip
    while True:
        batches = sampler.batches(epoch)
        for index in range(consumed, len(batches)):
            yield [items[i] for i in batches[index]], epoch, index + 1
        epoch, consumed = epoch + 1, 0


def _encoded(processor, pair, d, key: str, cache_folder: Path) -> EncodedPair:
    try:
        return encode_pair(processor, pair, d.max_length, key=key, raw_prompt=d.raw_prompt)
    except DataError as exc:  # it encoded when the cache was made: its image changed or went since
        raise DataError(f"{exc} (it could be read when reference cache {cache_folder} was made; fix the image, "
                        "or rerun with --no-cache to leave the pair out)") from None  # fmt: skip


def _as_mpm(folder: str, imported: Path, accelerator) -> str:
    """An MPM checkpoint folder for `folder`: itself, or for a LLaVA checkpoint its conversion into `imported`
    (made by the main process, once: a resumed run reuses it)."""
    model_type = _model_type(folder)
    if model_type not in ("mpm", "llava"):
        raise ConfigError(f"{folder}: not a saved MPM or LLaVA model (config.json model_type {model_type!r}); start "
                          "from an MPM checkpoint or an exported LLaVA one")  # fmt: skip
    if accelerator.is_main_process:
        import_llava_once(folder, imported)
    accelerator.wait_for_everyone()
    return import_llava_once(folder, imported)  # made: every process gets its path


def _model_type(folder: str) -> str | None:
    config = Path(folder) / "config.json"
    return json.loads(config.read_text()).get("model_type") if config.is_file() else None
