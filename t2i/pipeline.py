"""`MPMPaintPipeline`: text-to-image conditioned on a frozen multilingual LLM (VisCPM-Paint), as a diffusers pipeline.

    prompt (any language the LLM knows) -> tokenizer -> LLM, hidden states of one layer (frozen)
        -> text_proj: Linear(LLM width -> UNet cross-attention width) + LayerNorm       (trained)
        -> UNet cross-attention (sequence), optionally also a pooled vector added to the timestep embedding
        -> scheduler loop with classifier-free guidance -> VAE decoder (or pixels directly) -> images

Trained on English pairs only, the UNet learns to read the LLM's states; a Chinese prompt lands near its English
translation in those states, so it draws the same picture (VisCPM-Paint: MSCOCO FID 9.5 English, 10.9 Chinese).

How the LLM conditions the UNet is part of `text_proj`'s config (saved with the pipeline): which hidden layer
(0 = token embeddings, -1 = last, -2 = penultimate as Kolors), how many tokens, and whether a pooled vector (the
state of the prompt's last token, which has read the whole prompt) is added to the timestep embedding.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from mpm.core.errors import ConfigError, ModelLoadError, model_errors
from mpm.core.llm import load_llm

logger = logging.getLogger(__name__)


class TextProjection(ModelMixin, ConfigMixin):
    """The bridge from the LLM to the UNet: Linear (no bias) + LayerNorm, as VisCPM-Paint's `CPMBeeTransBlock`,
    and the settings of how the LLM's states are read (they belong to what this module was trained on)."""

    @register_to_config
    def __init__(
        self,
        in_features: int,  # the LLM's hidden size
        out_features: int,  # the UNet's cross_attention_dim
        hidden_layer: int = -1,  # which of the LLM's hidden states: 0 = embeddings, -1 = last, -2 = penultimate
        max_length: int = 128,  # prompt tokens at most (longer prompts are cut, with a warning)
        pooled: bool = False,  # also add the last token's projected state to the UNet's timestep embedding
    ):
        super().__init__()
        self.linear = torch.nn.Linear(in_features, out_features, bias=False)
        self.norm = torch.nn.LayerNorm(out_features)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, in) LLM states, (B, T) mask -> (B, T, out) sequence, and (B, out) pooled (or None)."""
        sequence = self.norm(self.linear(states))
        if not self.config.pooled:
            return sequence, None
        last = mask.long().sum(1).clamp(min=1) - 1  # right padding: the last real token of each prompt
        return sequence, sequence[torch.arange(len(sequence), device=sequence.device), last]


def tokenize_prompts(tokenizer, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ids (B, T), mask (B, T), prompts cut): each prompt's tokens then the end-of-sequence token, right-padded.

    The end token gives every prompt (also the empty one of classifier-free guidance) at least one state, and the
    pooled vector one place that has read the whole prompt. A longer prompt keeps its first tokens and the end.
    """
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
    rows, cut = [], 0
    for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]:
        if len(ids) + 1 > max_length:
            ids, cut = ids[: max_length - 1], cut + 1
        rows.append([*ids, end])
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask, cut


@torch.no_grad()
def llm_states(text_encoder, ids: torch.Tensor, mask: torch.Tensor, hidden_layer: int) -> torch.Tensor:
    """The LLM's hidden states of `hidden_layer` for right-padded prompts (B, T, width); the LM head runs at one
    position only. Causal attention: a real token's state does not depend on the padding after it."""
    out = text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    return out.hidden_states[hidden_layer]


def pad_sequences(seqs: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Batches of (B_i, T_i, C) states with (B_i, T_i) masks -> one (sum B_i, max T_i, C) batch, zero-padded."""
    width = max(s.shape[1] for s in seqs)
    padded = [torch.nn.functional.pad(s, (0, 0, 0, width - s.shape[1])) for s in seqs]
    masks = [torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in masks]
    return torch.cat(padded), torch.cat(masks)


class MPMPaintPipeline(DiffusionPipeline):
    """Text-to-image with a multilingual LLM as the text encoder (VisCPM-Paint).

    Components: `text_encoder` (a transformers causal LM, frozen), `tokenizer`, `text_proj` (`TextProjection`),
    `unet` (`UNet2DConditionModel`), `vae` (`AutoencoderKL`, or None to denoise pixels directly), `scheduler`
    (any diffusers scheduler: `pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)`).
    """

    model_cpu_offload_seq = "text_encoder->text_proj->unet->vae"
    _optional_components = ["vae"]

    def __init__(self, text_encoder, tokenizer, text_proj: TextProjection, unet: UNet2DConditionModel, scheduler,
                 vae: AutoencoderKL | None = None):  # fmt: skip
        super().__init__()
        check_components(text_encoder, text_proj, unet, vae)
        self.register_modules(
            text_encoder=text_encoder, tokenizer=tokenizer, text_proj=text_proj, unet=unet, vae=vae, scheduler=scheduler
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # -- building ---------------------------------------------------------------------------------------------------
    @classmethod
    def from_parts(
        cls,
        llm,
        sd: str | Path | None = None,
        unet: UNet2DConditionModel | str | Path | None = None,
        vae: AutoencoderKL | str | Path | None = None,
        scheduler: SchedulerMixin | str | Path | None = None,
        tokenizer=None,
        hidden_layer: int = -1,
        max_length: int = 128,
        pooled: bool = False,
        trust_remote_code: bool = False,
    ) -> MPMPaintPipeline:
        """A new pipeline: the LLM from transformers (folder, hub id, loaded model), and the UNet, VAE and scheduler
        from a diffusers Stable Diffusion folder (`sd`: its `unet/`, `vae/`, `scheduler/`; no CLIP text encoder is
        read) or given one by one (`unet`: a model, a folder with weights, or a config.json / folder holding only
        one, for a UNet trained from scratch). `text_proj` is created for the widths. No VAE: pixel space."""
        text_encoder, tokenizer = load_llm(llm, tokenizer, trust_remote_code=trust_remote_code)  # in its stored dtype
        text_encoder.requires_grad_(False).eval()
        if sd is not None:
            sd = Path(sd)
            if not (sd / "model_index.json").is_file() or not (sd / "unet").is_dir():
                raise ModelLoadError(
                    f"sd={str(sd)!r} is not a diffusers Stable Diffusion folder (model_index.json, unet/)"
                )
            unet = unet if unet is not None else sd / "unet"
            vae = vae if vae is not None else (sd / "vae" if (sd / "vae").is_dir() else None)
            scheduler = scheduler if scheduler is not None else sd / "scheduler"
        if unet is None:
            raise ConfigError("give `sd` (a Stable Diffusion folder) or `unet` (a UNet, its folder or its config file)")
        unet = load_unet(unet, pooled)
        vae = load_vae(vae)
        scheduler = load_scheduler(scheduler)
        width = text_encoder.get_input_embeddings().weight.shape[1]
        text_proj = TextProjection(width, unet.config.cross_attention_dim, hidden_layer, max_length, pooled)
        return cls(text_encoder, tokenizer, text_proj, unet, scheduler, vae)

    # -- encoding prompts -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(sequence (B, T, C), mask (B, T), pooled (B, C) or None): what the UNet is conditioned on."""
        device = device or self._execution_device
        cfg = self.text_proj.config
        ids, mask, cut = tokenize_prompts(self.tokenizer, prompts, cfg.max_length)
        if cut:
            logger.warning(
                "%d prompt(s) longer than %d tokens were cut to fit (text_proj.max_length)", cut, cfg.max_length
            )
        ids, mask = ids.to(device), mask.to(device)
        states = llm_states(self.text_encoder, ids, mask, cfg.hidden_layer)
        sequence, pooled = self.text_proj(states.to(self.text_proj.dtype), mask)
        return sequence, mask, pooled

    # -- checks -----------------------------------------------------------------------------------------------------
    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: the VAE's factor times the UNet's downsampling."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.down_block_types) - 1)

    def check_inputs(self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                     negative_pooled_prompt_embeds, height, width, guidance_scale, num_images_per_prompt,
                     num_inference_steps) -> None:  # fmt: skip
        if (prompt is None) == (prompt_embeds is None):
            raise ConfigError("give either `prompt` or `prompt_embeds`, not both and not neither")
        if isinstance(prompt, list) and not prompt:
            raise ConfigError("`prompt` is an empty list: give at least one prompt")
        if prompt is not None and not (isinstance(prompt, str) or all(isinstance(p, str) for p in prompt)):
            raise ConfigError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ConfigError("give either `negative_prompt` or `negative_prompt_embeds`, not both")
        count = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else len(prompt_embeds)
        if isinstance(negative_prompt, list) and len(negative_prompt) != count:
            raise ConfigError(f"`negative_prompt` has {len(negative_prompt)} entries for {count} prompts")
        if prompt_embeds is not None:
            if prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != self.unet.config.cross_attention_dim:
                raise ConfigError(
                    f"`prompt_embeds` must be (batch, tokens, {self.unet.config.cross_attention_dim}) (text_proj's "
                    f"output), got {tuple(prompt_embeds.shape)}"
                )
            if negative_prompt_embeds is not None and negative_prompt_embeds.shape[0] != prompt_embeds.shape[0]:
                raise ConfigError("`negative_prompt_embeds` and `prompt_embeds` must have the same batch size")
            if self.text_proj.config.pooled and pooled_prompt_embeds is None:
                raise ConfigError(
                    "this pipeline adds a pooled vector: give `pooled_prompt_embeds` with `prompt_embeds`"
                )
            if (
                negative_prompt_embeds is not None
                and self.text_proj.config.pooled
                and negative_pooled_prompt_embeds is None
            ):
                raise ConfigError("give `negative_pooled_prompt_embeds` with `negative_prompt_embeds`")
        if not self.text_proj.config.pooled and (
            pooled_prompt_embeds is not None or negative_pooled_prompt_embeds is not None
        ):
            raise ConfigError("this pipeline adds no pooled vector (text_proj.pooled is false): drop the pooled embeds")
        multiple = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % multiple:
                raise ConfigError(
                    f"`{name}` must be a positive multiple of {multiple} (the VAE's factor {self.vae_scale_factor} times "
                    f"the UNet's downsampling), got {value}; images are never resized silently"
                )
        if guidance_scale < 0:
            raise ConfigError(
                f"`guidance_scale` must be >= 0 (<= 1: no classifier-free guidance), got {guidance_scale}"
            )
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ConfigError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ConfigError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps}")

    # -- sampling ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
    ):
        """Images for `prompt` (a string or a list), in any language the LLM knows.

        `prompt_embeds` / `negative_prompt_embeds` replace the prompts: text_proj's outputs (B, T, C), with
        `prompt_attention_mask` (B, T) when they are padded (as `encode_prompt` returns them; default: every token
        attended), and with a pooled pipeline `pooled_prompt_embeds` (B, C). `latents`: the starting noise. `guidance_scale <= 1` runs without
        classifier-free guidance (one UNet pass per step); above 1 the unconditional branch uses `negative_prompt`
        or the empty prompt. Returns `ImagePipelineOutput(images)` (PIL images, or arrays / tensors by
        `output_type`: "pil" | "np" | "pt" | "latent").
        """
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self.check_inputs(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                          negative_pooled_prompt_embeds, height, width, guidance_scale, num_images_per_prompt,
                          num_inference_steps)  # fmt: skip
        device = self._execution_device
        guided = guidance_scale > 1

        # 1. Conditioning: the prompts' states (and the unconditional branch's) --------------------------------------
        if prompt_embeds is not None:
            cond, cond_mask, cond_pooled = _given(prompt_embeds, prompt_attention_mask, pooled_prompt_embeds, device)
        else:
            cond, cond_mask, cond_pooled = self.encode_prompt([prompt] if isinstance(prompt, str) else prompt, device)
        batch = len(cond)
        if guided:
            if negative_prompt_embeds is not None:
                uncond, uncond_mask, uncond_pooled = _given(
                    negative_prompt_embeds, negative_prompt_attention_mask, negative_pooled_prompt_embeds, device
                )
            else:
                negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * batch
                uncond, uncond_mask, uncond_pooled = self.encode_prompt(negatives, device)
            embeds, mask = pad_sequences([uncond, cond], [uncond_mask, cond_mask])
            pooled = torch.cat([uncond_pooled, cond_pooled]) if cond_pooled is not None else None
        else:
            embeds, mask, pooled = cond, cond_mask, cond_pooled
        repeat = num_images_per_prompt
        embeds, mask = embeds.repeat_interleave(repeat, 0), mask.repeat_interleave(repeat, 0)
        pooled = pooled.repeat_interleave(repeat, 0) if pooled is not None else None
        embeds = embeds.to(self.unet.dtype)
        if bool(mask.all()):  # nothing to mask: attention without a mask may take a faster kernel (flash, on GPUs)
            mask = None
        pooled = pooled.to(self.unet.dtype) if pooled is not None else None

        # 2. The starting noise and the schedule ---------------------------------------------------------------------
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        shape = (
            batch * repeat,
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ConfigError(f"`latents` must be {shape} for these prompts and this size, got {tuple(latents.shape)}")
        latents = latents.to(device, self.unet.dtype) * self.scheduler.init_noise_sigma
        step_kwargs = (
            {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        )

        # 3. Denoising, with classifier-free guidance: uncond + scale * (cond - uncond) ---------------------------------
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            prediction = self.unet(
                model_input, t, encoder_hidden_states=embeds, encoder_attention_mask=mask, class_labels=pooled
            ).sample
            if guided:
                uncond_pred, cond_pred = prediction.chunk(2)
                prediction = uncond_pred + guidance_scale * (cond_pred - uncond_pred)
            latents = self.scheduler.step(prediction, t, latents, **step_kwargs).prev_sample

        # 4. Latents -> images ----------------------------------------------------------------------------------------
        if output_type == "latent":
            images = latents
        else:
            if self.vae is not None:
                images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
            else:
                images = latents
            images = self.image_processor.postprocess(images.float().clamp(-1, 1), output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def _given(embeds: torch.Tensor, mask: torch.Tensor | None, pooled: torch.Tensor | None, device) -> tuple:
    if mask is None:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    elif tuple(mask.shape) != tuple(embeds.shape[:2]):
        raise ConfigError(
            f"an attention mask must be (batch, tokens) = {tuple(embeds.shape[:2])}, got {tuple(mask.shape)}"
        )
    return embeds.to(device), mask.to(device), pooled.to(device) if pooled is not None else None


def check_components(text_encoder, text_proj: TextProjection, unet: UNet2DConditionModel, vae) -> None:
    """The widths and settings that must agree between the components (a clear error, not a shape mismatch deep
    inside the UNet)."""
    width = text_encoder.get_input_embeddings().weight.shape[1]
    cfg = text_proj.config
    if cfg.in_features != width:
        raise ConfigError(
            f"text_proj reads {cfg.in_features}-wide LLM states but the LLM ({text_encoder.config.model_type}) is "
            f"{width} wide: use the LLM this text_proj was trained with, or build a new one (from_parts)"
        )
    if cfg.out_features != unet.config.cross_attention_dim:
        raise ConfigError(
            f"text_proj writes {cfg.out_features}-wide states but the UNet's cross_attention_dim is "
            f"{unet.config.cross_attention_dim}"
        )
    layers = text_encoder.config.get_text_config().num_hidden_layers
    if not -(layers + 1) <= cfg.hidden_layer <= layers:
        raise ConfigError(
            f"text_proj.hidden_layer {cfg.hidden_layer} is out of range for an LLM with {layers} layers "
            f"(0 = token embeddings .. {layers} = last, or -1 .. -{layers + 1})"
        )
    if cfg.pooled and unet.config.class_embed_type != "projection":
        raise ConfigError(
            "text_proj.pooled adds a pooled vector to the timestep embedding: the UNet needs class_embed_type "
            "'projection' (from_parts(..., pooled=True) adds it)"
        )
    channels = vae.config.latent_channels if vae is not None else 3
    if unet.config.in_channels != channels:
        raise ConfigError(
            f"the UNet takes {unet.config.in_channels} channels but the "
            f"{'VAE latents have' if vae is not None else 'images (no VAE: pixel space) have'} {channels}"
        )


def load_unet(unet, pooled: bool = False) -> UNet2DConditionModel:
    """A UNet from a model, a folder with weights, or a config file / folder holding only config.json (random
    weights, trained from scratch). `pooled`: gives it the projection class embedding the pooled vector goes
    through, zero-initialised so a pretrained UNet starts as it was."""
    if not isinstance(unet, UNet2DConditionModel):
        path = Path(unet)
        config_file = path if path.is_file() else path / "config.json"
        has_weights = path.is_dir() and any(path.glob("diffusion_pytorch_model*.safetensors"))
        if path.is_dir() and not has_weights and any(path.glob("diffusion_pytorch_model*.bin")):
            raise ModelLoadError(
                f"unet={str(path)!r} holds only pickled .bin weights: this toolkit loads safetensors only (convert "
                "them with diffusers: UNet2DConditionModel.from_pretrained(folder).save_pretrained(folder))"
            )
        with model_errors("unet", path, is_model=not path.is_file()):
            if has_weights:
                unet = UNet2DConditionModel.from_pretrained(path, use_safetensors=True)
            elif config_file.is_file():
                unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_file))
            else:
                raise OSError(f"{path} holds neither a UNet's weights nor its config.json")
    if pooled and unet.config.class_embed_type != "projection":
        config = {k: v for k, v in unet.config.items() if not k.startswith("_")}  # (its defaults' list would win)
        config.update(
            class_embed_type="projection", projection_class_embeddings_input_dim=config["cross_attention_dim"]
        )
        widened = UNet2DConditionModel.from_config(config)
        missing, _ = widened.load_state_dict(unet.state_dict(), strict=False)
        assert all(name.startswith("class_embedding.") for name in missing), missing
        torch.nn.init.zeros_(widened.class_embedding.linear_2.weight)
        torch.nn.init.zeros_(widened.class_embedding.linear_2.bias)
        unet = widened
    return unet


def load_vae(vae) -> AutoencoderKL | None:
    if vae is None or isinstance(vae, AutoencoderKL):
        return vae
    with model_errors("vae", vae):
        return AutoencoderKL.from_pretrained(vae, use_safetensors=True)


def load_scheduler(scheduler) -> SchedulerMixin:
    """A scheduler object, or the folder / scheduler_config.json of one (its `_class_name` chooses the class);
    None: DDPM with Stable Diffusion's schedule."""
    import diffusers

    if isinstance(scheduler, SchedulerMixin):
        return scheduler
    if scheduler is None:
        # clip_sample off: predicted x0 clipped to [-1, 1] is right for pixels only, and VAE latents exceed it
        return diffusers.DDPMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False
        )
    path = Path(scheduler)
    with model_errors("scheduler", path):
        config = diffusers.DDPMScheduler.load_config(path)
        name = config.get("_class_name", "DDPMScheduler")
        if not hasattr(diffusers, name):
            raise ValueError(f"unknown scheduler class {name!r} in {path}")
        return getattr(diffusers, name).from_config(config)
