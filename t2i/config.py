"""Typed configuration of `mpm train t2i` (YAML in configs/t2i/, loaded with mpm.core.config.load_config)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mpm.core.config import check_choice, check_range
from mpm.core.errors import ConfigError

# Prompts rendered into a grid every `validation.every` steps: the same scene in several languages, so a user sees
# English-only training carry over (VisCPM-Paint's claim) as it happens.
VALIDATION_PROMPTS = [
    "a red cat wearing a hat",
    "一只戴着帽子的红猫",
    "eine rote Katze mit Hut",
    "un chat rouge portant un chapeau",
]


@dataclass
class ModelSection:
    init_from: str | None = None  # an MPMPaintPipeline folder to continue from (e.g. stage full after align)
    llm: str = ""  # the multilingual causal LM: folder or hub id (frozen)
    tokenizer: str | None = None  # default: the LLM's
    sd: str | None = None  # a diffusers Stable Diffusion folder: its unet/, vae/ and scheduler/ (no CLIP needed)
    unet: str | None = None  # instead of sd's: a UNet folder, or a config.json to build one from scratch
    vae: str | None = None  # instead of sd's: an AutoencoderKL folder; none (and no sd): pixel space
    scheduler: str | None = None  # instead of sd's: a scheduler folder; none: DDPM with Stable Diffusion's betas
    hidden_layer: int = -1  # the LLM's hidden states the UNet reads: 0 = embeddings, -1 = last, -2 = penultimate
    max_length: int = 128  # prompt tokens at most
    pooled: bool = False  # also add the last token's state to the timestep embedding (Kolors' pooled vector)
    prediction_type: str | None = None  # epsilon | v_prediction (default: the scheduler's)
    trust_remote_code: bool = False


@dataclass
class DataSection:
    shards: list[str] = field(default_factory=list)  # pair shard sets (output folders of `mpm data shard`)
    weights: list[float] | None = None  # sampling weight per shard set
    resolution: int = 512  # training images are resized (shorter side) and cropped to resolution x resolution
    center_crop: bool = True  # false: a random crop
    random_flip: bool = True
    caption_dropout: float = 0.1  # share of captions replaced by the empty prompt (classifier-free guidance)
    text_feature_cache: str | None = None  # a folder: the LLM's states of every caption, computed once and reused
    shuffle_buffer: int = 1000
    num_workers: int = 2

    def __post_init__(self):
        check_range("data.resolution", self.resolution, 8)
        check_range("data.caption_dropout", self.caption_dropout, 0.0, 1.0)
        check_range("data.num_workers", self.num_workers, 0)
        check_range("data.shuffle_buffer", self.shuffle_buffer, 0)


@dataclass
class LoraSection:
    enabled: bool = False  # LoRA adapters on the UNet instead of training its weights (merged into final/)
    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class EmaSection:
    enabled: bool = True  # final/ and the validation grids use the averaged weights
    # the most it reaches: at step n it is min(decay, n / (n + 9)), 0 at n = 1 (diffusers EMAModel)
    decay: float = 0.9999

    def __post_init__(self):
        check_range("train.ema.decay", self.decay, 0.0, 1.0)


@dataclass
class TrainSection:
    # align: text_proj and the UNet's cross-attention key/value projections learn (the UNet keeps what it could
    # draw); full: text_proj and the whole UNet (AltDiffusion's stages; VisCPM-Paint "gradually unfreezes")
    stage: str = "align"
    output_dir: str = ""
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 8  # per device, per micro-step
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-2
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16
    gradient_checkpointing: bool = False
    snr_gamma: float | None = 5.0  # min-SNR loss weighting (Hang et al. 2023); null: plain MSE
    noise_offset: float = 0.0
    lora: LoraSection = field(default_factory=LoraSection)
    ema: EmaSection = field(default_factory=EmaSection)
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 2
    report_to: list[str] = field(default_factory=list)  # tensorboard, wandb

    def __post_init__(self):
        check_choice("train.stage", self.stage, ("align", "full"))
        check_choice("train.mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        for name in ("max_steps", "batch_size", "grad_accum", "save_every", "log_every", "keep_last"):
            check_range(f"train.{name}", getattr(self, name), 1)
        if self.snr_gamma is not None and self.snr_gamma <= 0:  # 0 would weigh every sample 0: nothing learnt
            raise ConfigError(f"train.snr_gamma must be > 0 (5 is usual) or null for plain MSE, got {self.snr_gamma}")
        unknown = [r for r in self.report_to if r not in ("tensorboard", "wandb")]
        if unknown:
            raise ConfigError(f"`train.report_to` knows tensorboard and wandb, got {unknown}")


@dataclass
class ValidationSection:
    prompts: list[str] = field(default_factory=lambda: list(VALIDATION_PROMPTS))
    every: int = 500  # steps between grids (and one at the end); 0: never
    steps: int = 25  # sampling steps
    guidance_scale: float = 7.5
    seed: int = 0

    def __post_init__(self):
        check_range("validation.every", self.every, 0)
        check_range("validation.steps", self.steps, 1)
        check_range("validation.guidance_scale", self.guidance_scale, 0.0)


@dataclass
class T2IConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    validation: ValidationSection = field(default_factory=ValidationSection)

    def check_required(self) -> None:
        if not self.train.output_dir:
            raise ConfigError("train.output_dir is required")
        m = self.model
        if not m.init_from and not m.llm:
            raise ConfigError("give model.llm (the multilingual LLM), or model.init_from (an MPMPaintPipeline folder)")
        if not m.init_from and not (m.sd or m.unet):
            raise ConfigError(
                "give model.sd (a diffusers Stable Diffusion folder) or model.unet (a UNet folder, or a config.json "
                "to train one from scratch)"
            )
        if m.prediction_type is not None:
            check_choice("model.prediction_type", m.prediction_type, ("epsilon", "v_prediction"))
        if not self.data.shards:
            raise ConfigError("set data.shards: pair shard folders written by `mpm data shard`")
        weights = self.data.weights
        if weights is not None and (
            len(weights) != len(self.data.shards) or any(w < 0 for w in weights) or sum(weights) <= 0
        ):
            raise ConfigError(
                f"data.weights {list(weights)} must hold one non-negative weight per shard set in data.shards "
                f"({len(self.data.shards)}), with a positive sum"
            )
        given = [k for k in ("llm", "tokenizer", "sd", "unet", "vae", "scheduler") if getattr(m, k)]
        if m.init_from and given:
            raise ConfigError(
                f"model.init_from is a whole pipeline: remove model.{', model.'.join(given)} (they would be ignored)"
            )
        if self.train.lora.enabled and self.train.stage != "full":
            raise ConfigError("train.lora adapts the whole UNet: set train.stage full (align trains k/v directly)")


# Settings that may change when resuming: how often, not what is trained, and where (a moved run folder).
RESUMABLE = (
    "train.save_every", "train.log_every", "train.keep_last", "train.report_to", "train.output_dir",
    "validation.every", "validation.prompts", "validation.steps", "validation.guidance_scale", "validation.seed",
)  # fmt: skip
