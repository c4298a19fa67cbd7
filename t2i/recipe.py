"""The text-to-image recipe: `mpm train t2i --config configs/t2i/X.yaml` (VisCPM-Paint's training, never released).

English pair shards; the multilingual LLM frozen; the UNet learns to read its hidden states through `text_proj`:
    stage align: text_proj + the UNet's cross-attention key/value projections (what reads the text) train, so the
        UNet keeps what it can draw while it learns the new text space (AltDiffusion's first stage)
    stage full:  text_proj + the whole UNet (or LoRA adapters on it)

Every step, written out below (DDPM, Ho et al. 2020; v-prediction, Salimans & Ho 2022; min-SNR, Hang et al. 2023):
    x0       = VAE latents of the image * scaling factor        (pixels in [-1, 1] without a VAE)
    eps      ~ N(0, I)                                          (+ noise_offset * N(0, 1) per channel, if set)
    t        ~ U{0, ..., T-1};  a = alphas_cumprod[t]
    x_t      = sqrt(a) * x0 + sqrt(1 - a) * eps
    target   = eps (epsilon)   or   v = sqrt(a) * eps - sqrt(1 - a) * x0 (v_prediction)
    loss     = w(t) * mean((unet(x_t, t, text) - target)^2)    per sample; the step's loss is their mean
    w(t)     = 1, or with min-SNR (snr = a / (1 - a)): min(snr, gamma) / snr (epsilon), min(snr, gamma) / (snr + 1) (v)
10% of captions (data.caption_dropout) are replaced by the empty prompt: what classifier-free guidance needs.

Checkpoints hold the trainable weights, the optimizer, the LR schedule, RNG states, the EMA weights and the data
position: a resumed run continues exactly (same batches, same noise, same weights). Multi-GPU: `accelerate launch
--config_file configs/accelerate/ddp.yaml -m mpm.cli train t2i --config ...` or torchrun.
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
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from diffusers.utils import make_image_grid
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from dataproc.shards import shard_urls
from mpm.core.config import config_to_dict, save_config
from mpm.core.errors import ConfigError, ModelLoadError
from mpm.core.files import atomic_write_json, output_folder
from mpm.core.runs import Checkpoints, Metrics, check_resume, summed, summed_count, tracker_config
from t2i.cache import build_cache
from t2i.config import RESUMABLE, T2IConfig
from t2i.data import PairImages, collate
from t2i.pipeline import MPMPaintPipeline, llm_states, pad_sequences, tokenize_prompts

logger = logging.getLogger(__name__)
# Stop when this many samples in a row (all processes, counted at each log) were unusable: the data is broken.
DRY_LIMIT = 1000
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


@dataclass
class T2IResult:
    final: Path  # the saved pipeline folder (written by the main process)
    pipeline: MPMPaintPipeline  # this process's trained pipeline (EMA weights when EMA is on, LoRA merged)


def train(cfg: T2IConfig, show_progress: bool = True) -> T2IResult:
    """Train to `train.max_steps` (resuming from the last checkpoint if there is one)."""
    cfg.check_required()
    t, d = cfg.train, cfg.data
    out = Path(t.output_dir)

    # 1. Accelerator, seed, the config this run is bound to -------------------------------------------------------
    AcceleratorState._reset_state()  # one mixed-precision setting per run, even when a process runs several
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=t.grad_accum,
        mixed_precision=t.mixed_precision,
        log_with=t.report_to or None,
        project_dir=str(out),
    )
    if accelerator.is_main_process:
        output_folder(out, "train.output_dir")
        check_resume(out, cfg, RESUMABLE)
    accelerator.wait_for_everyone()
    set_seed(t.seed)
    for shards in d.shards:  # a wrong path fails now, not after the models have loaded
        try:
            shard_urls(shards)
        except FileNotFoundError as exc:
            raise ConfigError(f"data.shards: {exc}") from None

    # 2. The pipeline, the forward process, what trains -------------------------------------------------------------
    pipe = build_pipeline(cfg)
    device = accelerator.device
    text_encoder, vae, tokenizer = pipe.text_encoder, pipe.vae, pipe.tokenizer
    text_encoder.requires_grad_(False).eval().to(device)  # frozen, in the dtype it was stored in
    if vae is not None:
        vae.requires_grad_(False).eval().to(device)
    alphas_cumprod = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod.to(device)
    prediction = pipe.scheduler.config.prediction_type
    unet, text_proj = pipe.unet, pipe.text_proj
    trained = set_trainable(unet, text_proj, t)  # [(name, parameter)]
    params = [p for _, p in trained]
    if t.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    ema = make_ema(params, t.ema.decay) if t.ema.enabled else None
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, t.warmup_steps, t.max_steps)
    unet, text_proj, optimizer = accelerator.prepare(unet, text_proj, optimizer)

    # 3. The text-feature cache (every process encodes its share of the shards; a rerun reuses it) ----------------
    cache = None
    if d.text_feature_cache:
        cache = build_cache(
            d.text_feature_cache, d.shards, text_encoder, tokenizer, pipe.text_proj.config, device,
            rank=accelerator.process_index, world=accelerator.num_processes,
            show_progress=show_progress and accelerator.is_main_process,
        )  # fmt: skip
        accelerator.wait_for_everyone()
    empty_states = cache.empty().to(device) if cache is not None else None

    # 4. Resume: trainable weights, optimizer, schedule, RNG, EMA, data position ------------------------------------
    # Checkpoints keep the trained weights and every buffer; frozen weights are rebuilt as they were on resume.
    trained_names = {n for n, _ in trained}
    frozen_names = {n for m in (pipe.unet, pipe.text_proj) for n, _ in m.named_parameters()} - trained_names
    checkpoints = Checkpoints(out, t.keep_last, keep=lambda name: name not in frozen_names)
    accelerator.register_for_checkpointing(schedule)
    if ema is not None:
        accelerator.register_save_state_pre_hook(
            lambda models, weights, folder: accelerator.is_main_process and save_ema(ema, trained, Path(folder))
        )
    step, epoch, consumed, state = 0, 0, 0, {}
    latest = checkpoints.latest()
    if latest is not None:
        state = Checkpoints.load(accelerator, latest)
        step, epoch, consumed = state["step"], state["epoch"], state["batches_in_epoch"]
        if ema is not None:
            load_ema(ema, trained, latest)
        logger.info("resuming from %s (step %d)", latest, step)
    if t.report_to:
        accelerator.init_trackers("mpm-t2i", config=tracker_config(config_to_dict(cfg)))

    # 5. The loop --------------------------------------------------------------------------------------------------
    stream = _micro_batches(cfg, accelerator, epoch, consumed, cache)
    metrics = Metrics(out, accelerator, resumed_at=step if latest is not None else None)
    filler = {"pixels": torch.zeros(1, 3, d.resolution, d.resolution), "captions": [""], "states": [None]}
    tally = dict.fromkeys(("loss", "samples", "micro", "skipped"), 0.0)
    pending_loss = torch.zeros((), dtype=torch.float64, device=device)  # read at logs and saves: no sync per step
    if accelerator.is_main_process:
        tally.update(state.get("unlogged", {}))
    dry, learned = state.get("dry", 0), state.get("learned")
    bar = tqdm(
        total=t.max_steps, initial=step, unit=" steps", disable=not (show_progress and accelerator.is_main_process)
    )
    unet.train()
    text_proj.train()
    encoders = (text_encoder, tokenizer, text_proj, empty_states)
    while step < t.max_steps:
        # 5a. This optimizer step's micro-batches, and their usable samples counted over all processes: the step's
        # loss is the mean over exactly those samples, whatever the batch layout.
        micro = [next(stream) for _ in range(t.grad_accum)]
        batches = [batch for batch, _, _ in micro]
        epoch, consumed = micro[-1][1], micro[-1][2]
        for batch in batches:
            tally["skipped"] += len(batch.pop("skipped"))
        step_samples = summed_count(accelerator, sum(len(b["captions"]) for b in batches if "pixels" in b))
        grad_norm = 0.0
        for batch in batches if step_samples else []:  # a step with nothing usable anywhere is not taken
            # A micro-batch whose samples were all skipped runs a filler with zero weight: every process runs the
            # same number of forward/backward passes (DDP synchronises in backward).
            usable = "pixels" in batch
            with accelerator.accumulate(unet, text_proj):
                with accelerator.autocast():
                    loss_sum, count = diffusion_loss(
                        batch if usable else filler, unet, text_proj, vae, encoders, alphas_cumprod, prediction,
                        t.snr_gamma, t.noise_offset, device,
                    )  # fmt: skip
                # accelerate divides by grad_accum and DDP averages over processes: undo both, divide once.
                loss = loss_sum * (t.grad_accum * accelerator.num_processes / step_samples)
                accelerator.backward(loss if usable else loss * 0)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            if usable:
                pending_loss += loss_sum.detach()
                tally["samples"] += count
                tally["micro"] += 1
        with warnings.catch_warnings():  # a run whose first steps had nothing usable has not stepped AdamW yet
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            schedule.step()
        if ema is not None and step_samples:
            ema.step(params)
        step += 1
        bar.update()
        if step % t.log_every == 0 or step % t.save_every == 0 or step == t.max_steps:
            tally["loss"] += pending_loss.item()
            pending_loss.zero_()
        if step % t.log_every == 0 or step == t.max_steps:
            totals = summed(accelerator, tally)
            dry = dry + int(totals["skipped"]) if totals["micro"] == 0 else 0
            learned = (learned or 0) + int(totals["micro"])
            if dry >= DRY_LIMIT:
                raise ConfigError(
                    f"no usable training sample among the last {dry} (all skipped, reasons in the warnings above): check data.shards"
                )
            row = {"loss": round(totals["loss"] / max(totals["samples"], 1), 5), "lr": schedule.get_last_lr()[0],
                   "grad_norm": round(float(grad_norm), 5), "samples": int(totals["samples"]),
                   "skipped": int(totals["skipped"])}  # fmt: skip
            if ema is not None:
                row["ema_decay"] = round(ema.cur_decay_value, 6)
            metrics.log(step, row)
            bar.set_postfix_str(f"loss {row['loss']:.4f}", refresh=False)
            tally = dict.fromkeys(tally, 0.0)
        if step % t.save_every == 0 or step == t.max_steps:
            checkpoints.save(accelerator, step, {
                "step": step, "epoch": epoch, "batches_in_epoch": consumed, "processes": accelerator.num_processes,
                "unlogged": summed(accelerator, tally), "dry": dry, "learned": learned,
            })  # fmt: skip
        if cfg.validation.every and (step % cfg.validation.every == 0 or step == t.max_steps):
            validate(cfg, pipe, accelerator, unet, text_proj, ema, params, out / "validation" / f"step-{step:07d}.png")
    bar.close()
    if learned == 0:
        raise ConfigError(f"the run ended without a single usable training sample ({dry} skipped): check data.shards")

    # 6. The final pipeline: EMA weights, LoRA merged, a plain diffusers folder ----------------------------------------
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(params)
    pipe.unet = merge_lora(accelerator.unwrap_model(unet))
    pipe.text_proj = accelerator.unwrap_model(text_proj)
    final = out / "final"
    if accelerator.is_main_process:
        pipe.save_pretrained(final, safe_serialization=True)
        save_config(cfg, final / "train_config.yaml")
    accelerator.wait_for_everyone()  # no process reports the final pipeline before it is written
    accelerator.end_training()
    return T2IResult(final, pipe)


# -- the model ------------------------------------------------------------------------------------------------------
def build_pipeline(cfg: T2IConfig) -> MPMPaintPipeline:
    """From an MPMPaintPipeline folder (`model.init_from`) or from parts; the scheduler predicts what
    `model.prediction_type` says (sampling must match what the UNet learnt)."""
    m = cfg.model
    if m.init_from:
        folder = Path(m.init_from)
        if not (folder / "model_index.json").is_file():
            raise ModelLoadError(f"model.init_from {folder} is not a saved MPMPaintPipeline (no model_index.json)")
        try:
            pipe = MPMPaintPipeline.from_pretrained(folder, trust_remote_code=m.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load model.init_from={str(folder)!r}: {str(exc).splitlines()[0]}") from None
    else:
        pipe = MPMPaintPipeline.from_parts(
            m.llm, sd=m.sd, unet=m.unet, vae=m.vae, scheduler=m.scheduler, tokenizer=m.tokenizer,
            hidden_layer=m.hidden_layer, max_length=m.max_length, pooled=m.pooled, trust_remote_code=m.trust_remote_code,
        )  # fmt: skip
    if m.prediction_type:
        pipe.scheduler.register_to_config(prediction_type=m.prediction_type)
    if pipe.scheduler.config.get("prediction_type") not in ("epsilon", "v_prediction"):
        raise ConfigError(
            f"the scheduler predicts {pipe.scheduler.config.get('prediction_type')!r}: this recipe trains epsilon or "
            "v_prediction (set model.prediction_type)"
        )
    resolution, multiple = cfg.data.resolution, pipe.size_multiple
    if resolution % multiple:
        raise ConfigError(
            f"data.resolution {resolution} must be a multiple of {multiple} (the VAE's factor times the UNet's downsampling)"
        )
    return pipe


def set_trainable(unet, text_proj, t) -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze / unfreeze by stage; returns the trained parameters, named as in each module's state dict.

    align: text_proj, the cross-attention (attn2) key and value projections, and the pooled vector's embedding.
    full: text_proj and the whole UNet, or LoRA adapters on it (train.lora).
    """
    unet.requires_grad_(False)
    text_proj.requires_grad_(True)
    if t.stage == "align":
        for name, module in unet.named_modules():
            if name.endswith(("attn2.to_k", "attn2.to_v")) or name == "class_embedding":
                module.requires_grad_(True)
    elif t.lora.enabled:
        from peft import LoraConfig

        l = t.lora  # noqa: E741
        unet.add_adapter(
            LoraConfig(
                r=l.r,
                lora_alpha=l.alpha,
                lora_dropout=l.dropout,
                target_modules=list(l.target_modules),
                init_lora_weights="gaussian",
            )
        )
        if unet.class_embedding is not None:
            unet.class_embedding.requires_grad_(True)
    else:
        unet.requires_grad_(True)
    trained = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    trained += [(n, p) for n, p in text_proj.named_parameters() if p.requires_grad]
    if len(trained) == len(list(text_proj.parameters())):
        raise ConfigError(f"train.stage {t.stage}: no UNet parameter trains (does the UNet have cross-attention?)")
    return trained


def merge_lora(unet):
    """LoRA adapters folded into the UNet's weights, the adapter layers removed: a plain UNet2DConditionModel."""
    if getattr(unet, "_hf_peft_config_loaded", False):
        unet.fuse_lora()
        unet.unload_lora()
    return unet


def make_ema(params, decay: float) -> EMAModel:
    """Averaged weights: after optimizer step n, ema = d * ema + (1 - d) * weights with d = min(decay, n / (n + 9)),
    and d = 0 at n = 1 (diffusers' EMAModel without the power warm-up)."""
    return EMAModel(params, decay=decay, foreach=True)


def save_ema(ema: EMAModel, trained, folder: Path) -> None:
    save_file(
        {name: s.detach().contiguous().cpu() for (name, _), s in zip(trained, ema.shadow_params)},
        folder / "ema.safetensors",
    )
    atomic_write_json(folder / "ema.json", {"optimization_step": ema.optimization_step})


def load_ema(ema: EMAModel, trained, folder: Path) -> None:
    saved = load_file(folder / "ema.safetensors")
    for (name, _), shadow in zip(trained, ema.shadow_params):
        shadow.copy_(saved[name])
    ema.optimization_step = json.loads((folder / "ema.json").read_text())["optimization_step"]


# -- the maths ------------------------------------------------------------------------------------------------------
def add_noise(x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * eps."""
    a = _per_sample(alphas_cumprod[t], x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def v_target(x0: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = sqrt(a_t) * eps - sqrt(1 - a_t) * x0 (Salimans & Ho 2022)."""
    a = _per_sample(alphas_cumprod[t], x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (B,): snr = a / (1 - a); min(snr, gamma) / snr for epsilon targets,
    min(snr, gamma) / (snr + 1) for v targets (the same weighting of the x0 error)."""
    a = alphas_cumprod[t].float()
    snr = (a / (1 - a)).clamp(min=1e-8)  # a zero-terminal-SNR schedule has snr 0 at t = T: weight 1, not 0 / 0
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if prediction == "v_prediction" else clipped / snr


def text_condition(batch: dict, encoders, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The UNet's conditioning for a batch: the LLM's states (cached, or computed now) through text_proj."""
    text_encoder, tokenizer, text_proj, empty_states = encoders
    cfg = _unwrap(text_proj).config
    if empty_states is None:  # live: one LLM forward over the batch's captions (dropped ones are "")
        ids, mask, _ = tokenize_prompts(tokenizer, batch["captions"], cfg.max_length)
        ids, mask = ids.to(device), mask.to(device)
        # outside autocast: the LLM runs in its stored dtype, as when the cache is built (same states both ways)
        with torch.no_grad(), torch.autocast(torch.device(device).type, enabled=False):
            states = llm_states(text_encoder, ids, mask, cfg.hidden_layer)
    else:  # cached: each sample's states, the empty prompt's for dropped captions
        rows = [(s if s is not None else empty_states).to(device) for s in batch["states"]]
        ones = [torch.ones(1, len(r), dtype=torch.long, device=device) for r in rows]
        states, mask = pad_sequences([r[None] for r in rows], ones)
    sequence, pooled = text_proj(states.float(), mask)
    return sequence, mask, pooled


def diffusion_loss(batch, unet, text_proj, vae, encoders, alphas_cumprod, prediction: str, snr_gamma: float | None,
                   noise_offset: float, device, noise=None, timesteps=None) -> tuple[torch.Tensor, int]:  # fmt: skip
    """(sum over the batch of each sample's weighted mean squared error, number of samples); `noise` and
    `timesteps` may be given (a fixed batch to compare losses on)."""
    pixels = batch["pixels"].to(device)
    with torch.no_grad():
        if vae is not None:
            x0 = vae.encode(pixels.to(vae.dtype)).latent_dist.sample() * vae.config.scaling_factor
        else:
            x0 = pixels
    x0 = x0.float()
    if noise is None:
        noise = torch.randn_like(x0)
        if noise_offset:  # a shared offset per channel lets the model learn very dark / bright images
            noise = noise + noise_offset * torch.randn(x0.shape[0], x0.shape[1], 1, 1, device=device)
    if timesteps is None:
        timesteps = torch.randint(0, len(alphas_cumprod), (x0.shape[0],), device=device)
    noisy = add_noise(x0, noise, alphas_cumprod, timesteps)
    target = noise if prediction == "epsilon" else v_target(x0, noise, alphas_cumprod, timesteps)
    sequence, mask, pooled = text_condition(batch, encoders, device)
    predicted = unet(noisy, timesteps, encoder_hidden_states=sequence, encoder_attention_mask=mask,
                     class_labels=pooled).sample  # fmt: skip
    per_sample = ((predicted.float() - target) ** 2).mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(alphas_cumprod, timesteps, snr_gamma, prediction)
    return per_sample.sum(), len(per_sample)


# -- validation grids ------------------------------------------------------------------------------------------------
@torch.no_grad()
def validate(cfg: T2IConfig, pipe, accelerator, unet, text_proj, ema, params, path: Path) -> None:
    """The validation prompts (several languages) drawn with the current weights (EMA's, when on) into one grid;
    on the main process, the others wait."""
    v = cfg.validation
    if accelerator.is_main_process and v.prompts:
        if ema is not None:
            ema.store(params)
            ema.copy_to(params)
        view = MPMPaintPipeline(pipe.text_encoder, pipe.tokenizer, accelerator.unwrap_model(text_proj),
                                accelerator.unwrap_model(unet), pipe.scheduler, pipe.vae)  # fmt: skip
        view.set_progress_bar_config(disable=True)
        unet.eval()
        try:
            size = cfg.data.resolution
            with accelerator.autocast():
                images = view(v.prompts, num_inference_steps=v.steps, guidance_scale=v.guidance_scale, height=size,
                              width=size, generator=torch.Generator().manual_seed(v.seed)).images  # fmt: skip
        finally:
            unet.train()
            if ema is not None:
                ema.restore(params)
        columns = min(4, len(images))
        path.parent.mkdir(parents=True, exist_ok=True)
        make_image_grid(images, rows=-(-len(images) // columns), cols=columns).save(path)
        atomic_write_json(path.with_suffix(".json"), {"prompts": v.prompts, "order": "row-major"})
    accelerator.wait_for_everyone()


# -- data -------------------------------------------------------------------------------------------------------------
def _micro_batches(cfg: T2IConfig, accelerator, epoch: int, consumed: int, cache):
    """This process's micro-batches from the data position (epoch, batches consumed in it) on, endlessly, each with
    the position after it."""
    t, d = cfg.train, cfg.data
    while True:
        stream = PairImages(
            d.shards, d.weights, d.resolution, d.center_crop, d.random_flip, d.caption_dropout, d.shuffle_buffer,
            t.seed + epoch, resampled=accelerator.num_processes > 1, batch_size=t.batch_size, skip_batches=consumed,
            cache=cache,
        )  # fmt: skip
        # The loader's own generator leaves the global RNG (noise, timesteps) alone.
        loader = DataLoader(stream, batch_size=t.batch_size, num_workers=d.num_workers, collate_fn=collate,
                            generator=torch.Generator().manual_seed(t.seed * 1000 + epoch))  # fmt: skip
        start, usable = consumed, 0
        for i, batch in enumerate(loader):
            if i < start:
                continue
            if batch.pop("passed"):
                raise RuntimeError(f"batch {i} holds samples passed over for resuming from batch {start}")
            consumed += 1
            usable += "pixels" in batch
            yield batch, epoch, consumed
        if consumed == 0:
            raise ConfigError("the training data gave no batch in a whole pass (see the warnings above)")
        if start == 0 and summed_count(accelerator, usable) == 0:
            raise ConfigError(
                "a whole pass over data.shards gave no usable sample (all skipped, see the warnings above)"
            )
        epoch, consumed = epoch + 1, 0


def _unwrap(module):
    return getattr(module, "module", module)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.float().reshape(-1, *([1] * (like.ndim - 1)))
