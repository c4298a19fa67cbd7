"""The image-to-text recipe: `mpm train i2t --config configs/i2t/X.yaml` (stage: pretrain or sft).

    stage pretrain (MPM stage 1): English pair shards; the LLM frozen; the connector (and optionally the vision
        tower) learn to turn images into something the frozen multilingual LLM reads. VisCPM's point: the LLM's
        other languages come along for free.
    stage sft (stage 2): conversations (LLaVA JSON, UniMM-Chat jsonl, ShareGPT); the LLM trained (full or LoRA).

The loop is plain accelerate: forward, loss, backward, clip, optimizer and scheduler steps, all visible below.
Checkpoints hold the model, optimizer, scheduler, RNG states and the data position, so a resumed run continues
exactly where the killed one was (same batches, same weights). Launch on several GPUs with
`accelerate launch --config_file configs/accelerate/ddp.yaml -m mpm.cli train i2t --config ...` or torchrun.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from dataproc.shards import shard_urls
from mpm.core.config import config_to_dict
from mpm.core.errors import ConfigError
from mpm.core.files import output_folder
from mpm.core.runs import Checkpoints, Metrics, check_resume, summed, summed_count, tracker_config
from mpm.data import Conversations, LengthGroupedSampler, PairCaptions, collate, read_all, to_device
from mpm.modeling import MPMForConditionalGeneration
from mpm.processor import IGNORE_INDEX
from mpm.train_config import RESUMABLE, TrainConfig
from mpm.training import (
    build_model,
    keep_frozen_norm_statistics,
    save_final,
    set_trainable,
    shards_weights,
    store_frozen_in,
)

logger = logging.getLogger(__name__)
# Stop when this many samples in a row (on all processes, counted at each log) were unusable: the data is broken.
DRY_LIMIT = 1000
# What a micro-batch whose every sample was skipped runs instead, with zero weight (see the loop).
FILLER = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello"}]
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    final: Path  # the saved final model (written by the main process)
    model: MPMForConditionalGeneration  # this process's trained model (LoRA merged), e.g. to compare ranks


def train(cfg: TrainConfig, show_progress: bool = True) -> TrainResult:
    """Train to `train.max_steps` (resuming from the last checkpoint if there is one)."""
    cfg.check_required()
    t, d, speed = cfg.train, cfg.data, cfg.train.efficiency
    out = Path(t.output_dir)

    # 1. Accelerator, seed, the config this run is bound to -------------------------------------------------------
    # accelerate keeps one mixed-precision setting per process; a process may run several recipes (tests, the
    # demo), so each run starts its own (the distributed setup, PartialState, is kept).
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # without it, accelerate ignores torchrun's processes on a CPU machine
        gradient_accumulation_steps=t.grad_accum,
        mixed_precision=t.mixed_precision,
        log_with=t.report_to or None,
        project_dir=str(out),
    )
    sharded = shards_weights(accelerator)
    if t.lora.enabled and sharded:
        raise ConfigError("train.lora needs whole weights to merge: use DDP or DeepSpeed ZeRO-2, not FSDP / ZeRO-3")
    if cfg.eval.data and sharded:  # the main process alone generates: it needs the whole weights
        raise ConfigError(
            "eval during training needs whole weights: use DDP or ZeRO-2, or evaluate final/ with mpm eval"
        )
    if accelerator.is_main_process:
        output_folder(out, "train.output_dir")
        check_resume(out, cfg, RESUMABLE)
    accelerator.wait_for_everyone()
    set_seed(t.seed)

    # 2. The data's files first (a wrong path fails now, not after the model has loaded) -------------------------
    if t.stage == "sft":
        items = read_all(d.conversations, d.image_folder)  # ConfigError naming the file
    else:
        for shards in d.shards:
            try:
                shard_urls(shards)
            except FileNotFoundError as exc:
                raise ConfigError(f"data.shards: {exc}") from None
    if cfg.eval.data:  # the held-out set, its languages and prompts: checked now, not at the first checkpoint
        from mpm.eval.caption import check_caption_eval

        check_caption_eval(_eval_settings(cfg))

    # 3. The model, what trains, the optimizer ---------------------------------------------------------------------
    model, processor = build_model(cfg.model)
    model.vision_early_exit = speed.vision_early_exit
    groups = set_trainable(model, t, sharded)
    if speed.frozen_in_compute_dtype and accelerator.native_amp:  # (accelerate runs fp16 on a CPU without autocast)
        store_frozen_in(model, COMPUTE_DTYPES[t.mixed_precision])
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Checkpoints keep the trainable weights and every buffer (a trained tower's batch-norm statistics); frozen
    # weights are rebuilt as they were when the run resumes.
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    trained = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    keep = (lambda name: name in trained or name not in names) if speed.trainable_only_checkpoints else None
    optimizer = torch.optim.AdamW(groups, weight_decay=t.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, t.warmup_steps, t.max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    trainable = [p for g in groups for p in g["params"]]
    if accelerator.gradient_accumulation_steps != t.grad_accum:  # an environment variable or DeepSpeed file won
        raise ConfigError(
            f"accelerate accumulates {accelerator.gradient_accumulation_steps} micro-batches but train.grad_accum is "
            f"{t.grad_accum}: set the same number in both (ACCELERATE_GRADIENT_ACCUMULATION_STEPS, the DeepSpeed "
            "config's gradient_accumulation_steps)"
        )
    pack = pack_limit(accelerator.unwrap_model(model), speed.pack_sequences, d.max_length)

    # 4. Resume: weights, optimizer, scheduler, RNG, and where in the data we were ---------------------------------
    checkpoints = Checkpoints(out, t.keep_last, keep)
    accelerator.register_for_checkpointing(scheduler)
    step, epoch, consumed, state = 0, 0, 0, {}
    latest = checkpoints.latest()
    if latest is not None:
        state = Checkpoints.load(accelerator, latest, optimizer)
        step, epoch, consumed = state["step"], state["epoch"], state["batches_in_epoch"]
        logger.info("resuming from %s (step %d)", latest, step)
    if t.report_to:
        accelerator.init_trackers("mpm-i2t", config=tracker_config(config_to_dict(cfg)))

    # 5. The loop ----------------------------------------------------------------------------------------------
    conversations = Conversations(items, d.image_folder, processor, d.max_length) if t.stage == "sft" else None
    stream = _micro_batches(cfg, processor, accelerator, epoch, consumed, conversations, pack)
    metrics = Metrics(out, accelerator, resumed_at=step if latest is not None else None)
    filler = processor.collate([processor.encode_conversation(FILLER, [])])
    # This process's counts since the last log. A resumed run's main process starts with every process's counts
    # between that log and the checkpoint, so the logged rows are those of an uninterrupted run.
    tally = dict.fromkeys(("nll", "tokens", "micro", "samples", "skipped"), 0.0)
    if accelerator.is_main_process:
        tally.update(state.get("unlogged", {}))
    dry = state.get("dry", 0)  # samples skipped, on all processes, since the last logged step that had a usable one
    learned = state.get("learned")  # usable micro-batches, all processes, all logged steps (None: none logged yet)
    bar = tqdm(
        total=t.max_steps, initial=step, unit=" steps", disable=not (show_progress and accelerator.is_main_process)
    )
    model.train()
    keep_frozen_norm_statistics(model)
    while step < t.max_steps:
        # 5a. This optimizer step's micro-batches, and its supervised tokens counted over all of them on every
        # process: the step's loss is the sum of -log p over those tokens divided ONCE by their number, so a token
        # weighs the same in a short answer and in a long description (torchtune; transformers' num_items_in_batch).
        micro = [next(stream) for _ in range(t.grad_accum)]
        batches = [batch for batch, _, _ in micro]
        epoch, consumed = micro[-1][1], micro[-1][2]  # the data position after this step
        for batch in batches:
            tally["skipped"] += len(batch.pop("skipped"))
        step_tokens = summed_count(accelerator, sum(supervised_tokens(b) for b in batches if "input_ids" in b))
        grad_norm = 0.0
        # A step with nothing usable on any process is not taken: its gradient is zero, and AdamW's momentum would
        # still move the weights. (Every process knows: the count is summed over all of them.)
        for batch in batches if step_tokens else []:
            # A micro-batch whose samples were all skipped runs a tiny text-only batch with zero weight instead: so
            # every process runs the same number of forward/backward passes (DDP synchronises in backward).
            usable = "input_ids" in batch
            samples = batch.pop("samples", 0)
            batch = to_device(batch if usable else filler, accelerator.device)
            with accelerator.accumulate(model):
                nll, tokens = nll_sum(model, batch, speed.supervised_logits_only)
                # accelerate divides by grad_accum and DDP averages over processes: undo both, so the gradient is
                # d(sum of the step's -log p) / d(weights) divided by step_tokens, whatever the batch layout.
                loss = nll * (t.grad_accum * accelerator.num_processes / step_tokens)
                accelerator.backward(loss if usable else loss * 0)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(trainable, t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            if usable:
                tally["nll"] += nll.item()
                tally["tokens"] += tokens
                tally["micro"] += 1
                tally["samples"] += samples
        with warnings.catch_warnings():  # a run whose first steps had nothing usable has not stepped AdamW yet
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            scheduler.step()
        step += 1
        bar.update()
        if tally["tokens"]:
            bar.set_postfix_str(f"loss {tally['nll'] / tally['tokens']:.3f}", refresh=False)
        if step % t.log_every == 0 or step == t.max_steps:
            totals = summed(accelerator, tally)  # every process's samples, tokens, skips and losses
            dry = dry + int(totals["skipped"]) if totals["micro"] == 0 else 0
            learned = (learned or 0) + int(totals["micro"])
            if dry >= DRY_LIMIT:
                raise ConfigError(
                    f"no usable training sample among the last {dry} (all skipped, reasons in the warnings "
                    "above): check the shards' images, data.image_folder and data.max_length"
                )
            rates = {f"lr_{g['name']}": lr for g, lr in zip(optimizer.param_groups, scheduler.get_last_lr())}
            metrics.log(step, {
                "loss": round(totals["nll"] / max(totals["tokens"], 1), 5),  # per supervised token
                **rates,  # lr_connector, and lr_llm / lr_vision when those train
                "grad_norm": round(float(grad_norm), 5),
                "tokens": int(totals["tokens"]),  # supervised tokens
                "samples": int(totals["samples"]),
                "skipped": int(totals["skipped"]),
            })  # fmt: skip
            tally = dict.fromkeys(tally, 0.0)
        if step % t.save_every == 0 or step == t.max_steps:
            checkpoints.save(accelerator, step, {
                "step": step, "epoch": epoch, "batches_in_epoch": consumed, "processes": accelerator.num_processes,
                "unlogged": summed(accelerator, tally), "dry": dry, "learned": learned,
            })  # fmt: skip
            if cfg.eval.data:
                evaluate_during_training(cfg, accelerator, model, processor, metrics, step)
    bar.close()
    if learned == 0:
        raise ConfigError(
            f"the run ended without a single usable training sample ({dry} skipped, reasons in the warnings above): "
            "check the shards' images, data.image_folder and data.max_length"
        )

    # 6. The final model, a plain checkpoint (peft layers merged) -------------------------------------------------
    accelerator.wait_for_everyone()
    final = out / "final"
    # Every process takes part in gathering the weights (FSDP / ZeRO-3 shard them); LoRA and the added tokens'
    # rows merge from the modules (whole weights: LoRA is refused under FSDP / ZeRO-3 above).
    unwrapped = accelerator.unwrap_model(model)
    merges = hasattr(unwrapped.language_model, "merge_and_unload") or unwrapped.added_token_embeddings is not None
    state_dict = None if merges else accelerator.get_state_dict(model)
    model = save_final(accelerator.unwrap_model(model), processor, final, state_dict, accelerator.is_main_process)
    accelerator.end_training()
    return TrainResult(final, model)


def evaluate_during_training(cfg: TrainConfig, accelerator, model, processor, metrics: Metrics, step: int) -> None:
    """Zero-shot captioning in `eval.langs` on the held-out set (`mpm eval caption`'s code), on the main process;
    per-language scores and fidelity go to the metrics log as eval_<metric>_<lang>."""
    if accelerator.is_main_process:
        from mpm.eval.caption import evaluate_caption

        settings = _eval_settings(cfg)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.eval()
        try:
            with accelerator.autocast():
                results, _ = evaluate_caption(settings, model=unwrapped, processor=processor, show_progress=False)
        finally:
            unwrapped.train()
            keep_frozen_norm_statistics(unwrapped)
        from mpm.eval.report import metric_values

        row = {f"eval_{name}_{lang}": round(float(value), 5)
               for lang, summary in results["languages"].items() for name, value in metric_values(summary).items()}  # fmt: skip
        metrics.log(step, row)
    accelerator.wait_for_everyone()


def _eval_settings(cfg: TrainConfig):
    from mpm.eval.caption import CaptionEvalConfig

    e = cfg.eval
    return CaptionEvalConfig(
        data=e.data, images=e.images, langs=e.langs, prompts=e.prompts, metrics=e.metrics, max_images=e.max_images,
        max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
    )  # fmt: skip


def supervised_tokens(batch: dict) -> int:
    """Tokens whose prediction is trained: label positions 1.. that are not IGNORE_INDEX."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def nll_sum(model, batch: dict, supervised_logits_only: bool) -> tuple[torch.Tensor, int]:
    """(sum of -log p(token) over the batch's supervised tokens, their number).

    Position t predicts token t+1. With `supervised_logits_only` the LM head runs only at positions where some
    row's next token is supervised (in caption pretraining, the caption: a fraction of the sequence; the head of a
    150k-word vocabulary costs as much as many transformer layers); otherwise at every position.
    """
    labels = batch["labels"]
    targets = labels[:, 1:]  # (B, T-1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    # no KV cache in training: it costs memory, and transformers only keeps packed samples apart without one
    if supervised_logits_only:
        keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)  # (K,) positions
        logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits  # (B, K, V)
        targets = targets[:, keep]
    else:
        logits = model(**inputs, use_cache=False).logits[:, :-1]  # (B, T-1, V)
    nll = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return nll, int((labels[:, 1:] != IGNORE_INDEX).sum())


def pack_limit(model, setting: str, max_length: int) -> int | None:
    """Up to how many tokens a micro-batch is packed into ONE row (`train.efficiency.pack_sequences`), or None.

    One row: transformers keeps packed samples apart in flash attention only within a single row, and the LM head
    then runs at exactly the supervised positions (with several rows, at every position supervised in any row).
    Flash attention's variable-length kernels make a long row cost what its samples cost alone: no limit. sdpa
    and eager compute the row's whole masked attention matrix, so `auto` packs a micro-batch only when it fits in
    `data.max_length` tokens (what one sample may cost anyway), else leaves it padded; `always` packs every one.
    """
    attention = model.config.text_config._attn_implementation or "eager"
    if setting == "never":
        return None
    if not packing_keeps_samples_apart(model.language_model):
        logger.warning(
            "the LLM's attention (%s) does not keep samples apart when they share a row: training without packing "
            "(train.efficiency.pack_sequences)", attention,
        )  # fmt: skip
        return None
    return sys.maxsize if setting == "always" or "flash" in attention else max_length


@torch.no_grad()
def packing_keeps_samples_apart(lm: torch.nn.Module) -> bool:
    """Does the LLM's attention keep two samples apart when they share a row with position ids restarting at 0
    (as transformers' packed-sequence masks and flash-attention do)? Checked on 8 tokens on the model's own device
    (after `prepare`: flash kernels run on GPUs only): the second sample's logits must be those it has alone.
    Older or custom attention code that ignores it would mix samples."""
    param = next(lm.parameters())
    vocab = lm.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0)).to(param.device)
    was_training = lm.training
    lm.eval()
    try:
        positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]], device=param.device)
        packed = lm(input_ids=ids, position_ids=positions, use_cache=False)
        alone = lm(input_ids=ids[:, 4:], position_ids=positions[:, :4], use_cache=False)
    finally:
        lm.train(was_training)
    a, b = packed.logits[:, 4:].float(), alone.logits.float()
    return bool((a - b).abs().max() <= 1e-2 * b.abs().max() + 1e-4)


def _micro_batches(cfg, processor, accelerator, epoch: int, consumed: int, conversations, pack: int | None):
    """This process's micro-batches from the data position (epoch, batches consumed in it) on, endlessly, each with
    the position after it. A pass that gives no batch, or no usable sample, is an error: the data is broken."""
    epoch_usable = 0 if consumed == 0 else None  # usable micro-batches in an epoch this run sees whole
    while True:
        for batch in _batches(cfg, processor, accelerator, epoch, consumed, conversations, pack):
            consumed += 1
            if epoch_usable is not None and "input_ids" in batch:
                epoch_usable += 1
            yield batch, epoch, consumed
        if consumed == 0:
            raise ConfigError("the training data gave no batch in a whole pass (see the warnings above)")
        if epoch_usable is not None and summed_count(accelerator, epoch_usable) == 0:
            raise ConfigError(
                "a whole pass over the training data gave no usable sample (all skipped, reasons in the warnings "
                "above): check data.image_folder, the images, and data.max_length"
            )
        epoch, consumed, epoch_usable = epoch + 1, 0, 0


def _batches(cfg: TrainConfig, processor, accelerator, epoch: int, skip: int, conversations, pack: int | None):
    """The micro-batches of one epoch for this rank, from batch number `skip` on (the data position to resume)."""
    t, d = cfg.train, cfg.data
    workers = {
        "num_workers": d.num_workers,
        "collate_fn": partial(collate, processor, pack=pack),
        # The loader's own generator (workers' seeds) leaves the global RNG alone: dropout masks after a resume
        # are then the same as in an uninterrupted run.
        "generator": torch.Generator().manual_seed(t.seed * 1000 + epoch),
    }
    if t.stage == "pretrain":
        # Shards are split between ranks and workers inside the stream (webdataset); the seed changes per epoch.
        # With several processes each rank draws shards with replacement, endlessly: split shards would give
        # ranks unequal numbers of batches, and DDP would wait forever for the rank that ran out.
        # The batches before `skip` come through again, made of samples read but not decoded (cheap), and are
        # dropped here: so the DataLoader's order of workers is the one of the interrupted run.
        stream = PairCaptions(
            d.shards, d.weights, processor, d.caption_prompts, d.max_length, d.shuffle_buffer, t.seed + epoch,
            resampled=accelerator.num_processes > 1, batch_size=t.batch_size, skip_batches=skip,
        )  # fmt: skip
        loader = DataLoader(stream, batch_size=t.batch_size, **workers)
        for i, batch in enumerate(loader):
            if i < skip:
                continue
            if batch.pop("passed"):
                raise RuntimeError(f"batch {i} holds samples passed over for resuming from batch {skip}")
            yield batch
        return
    dataset = conversations
    sampler = LengthGroupedSampler(
        [dataset.length(i) for i in range(len(dataset))], t.batch_size, t.seed, d.group_by_length,
        accelerator.process_index, accelerator.num_processes,
    )  # fmt: skip
    if len(sampler) == 0:
        raise ConfigError(
            f"{len(dataset)} conversations give no whole batch of train.batch_size {t.batch_size} x "
            f"{accelerator.num_processes} processes: lower train.batch_size or use fewer processes"
        )
    batches = sampler.batches(epoch)[skip:]  # skipping batches costs nothing here: no image is opened
    for batch in DataLoader(dataset, batch_sampler=batches, **workers):
        batch.pop("passed")
        yield batch
