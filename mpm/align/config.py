"""Typed configuration of `mpm train align` (YAML in configs/align/, loaded with mpm.core.config.load_config)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mpm.align.data import FORMATS
from mpm.align.losses import PRESETS, LossSettings
from mpm.core.config import check_choice, check_range
from mpm.core.errors import ConfigError
from mpm.train_config import LoraSection, check_train_section


@dataclass
class ModelSection:
    init_from: str = ""  # the policy's starting point: an MPM checkpoint folder (stage-2 or an earlier align run)
    reference: str | None = None  # the frozen reference model (default: init_from); unused once its cache exists
    attn_implementation: str | None = None  # the LLM's: sdpa | flash_attention_2 | eager


@dataclass
class DataSection:
    preferences: str = ""  # one preference file: the DESIGN.md jsonl, RLHF-V / RLAIF-V parquet, LLaMA-Factory, TRL
    images: str | None = None  # where relative image paths live (default: beside the file)
    format: str = "auto"  # auto | mpm | rlhfv | rlaifv | llamafactory | trl
    max_length: int = 2048  # a side longer than this (image tokens included) skips the pair, counted
    # A model trained on raw prompts (no chat template, as the miniature world's): the prompt, with `{question}`
    # where the pair's question goes and `<image>` where the image goes; each answer follows it after a space.
    # None: the model's chat template.
    raw_prompt: str | None = None

    def __post_init__(self):
        check_choice("data.format", self.format, ("auto", *FORMATS))
        check_range("data.max_length", self.max_length, 8)
        if self.raw_prompt is not None and "{question}" not in self.raw_prompt:
            raise ConfigError(f"data.raw_prompt {self.raw_prompt!r} has no {{question}}: put it where the question "
                              "goes (e.g. \"<image> {question}\")")  # fmt: skip


@dataclass
class LossSection:
    """A preset (dpo, rlhfv_paper, rlhfv_released) and any of its values overridden."""

    preset: str = "dpo"
    beta: float | None = None
    gamma: float | None = None  # the corrected tokens' weight (DDPO); 1 = plain DPO
    normalise: bool | None = None  # divide each sequence's weighted log-prob by N = |y_u| + gamma |y_c|
    sft_weight: float | None = None  # + sft_weight * NLL of the chosen response
    min_match: int | None = None  # the shortest matching token block that counts as unchanged

    def __post_init__(self):
        check_choice("loss.preset", self.preset, tuple(PRESETS))
        self.settings()  # a bad override fails when the config loads

    def settings(self) -> LossSettings:
        base = PRESETS[self.preset]
        given = {k: getattr(self, k) for k in ("beta", "gamma", "normalise", "sft_weight", "min_match")}
        return LossSettings(**{k: (v if v is not None else getattr(base, k)) for k, v in given.items()})


@dataclass
class ReferenceSection:
    cache: str | None = None  # the cache folder (default: <data.preferences>.refcache beside the data)
    batch_size: int = 8  # pairs per reference forward pass
    recompute: bool = False  # `--no-cache`: compute the reference log-probs again, replacing the cache

    def __post_init__(self):
        check_range("reference.batch_size", self.batch_size, 1)


@dataclass
class TrainSection:
    output_dir: str = ""
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 4  # pairs per device, per micro-step
    grad_accum: int = 1
    lr: float = 5e-7  # the LLM (and vision tower); RLHF-V and RLAIF-V train the whole model at 5e-7
    connector_lr: float = 5e-7  # the connector is trained already: the same small rate unless set
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16
    gradient_checkpointing: bool = False
    train_llm: bool = True  # false: the MPM setting, the LLM frozen and the connector (and vision) trained
    vision: str = "frozen"  # frozen | full | last_n
    vision_last_n: int = 2
    lora: LoraSection = field(default_factory=LoraSection)
    train_new_token_embeddings: bool = False  # the image / slice markers' rows learnt in i2t training stay
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 2
    report_to: list[str] = field(default_factory=list)  # tensorboard, wandb

    @property
    def llm_trainable(self) -> bool:  # what mpm.training.set_trainable reads
        return self.train_llm

    def __post_init__(self):
        check_train_section(self)


@dataclass
class AlignConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    reference: ReferenceSection = field(default_factory=ReferenceSection)
    train: TrainSection = field(default_factory=TrainSection)

    def check_required(self) -> None:
        if not self.train.output_dir:
            raise ConfigError("train.output_dir is required")
        if not self.model.init_from:
            raise ConfigError("model.init_from is required: the MPM checkpoint to align (e.g. a stage-2 final/)")
        if not self.data.preferences:
            raise ConfigError("data.preferences is required: a preference file (jsonl, json or parquet)")
        if self.train.lora.enabled and not self.train.train_llm:
            raise ConfigError("train.lora.enabled trains the LLM through LoRA: set train.train_llm true")


# Settings that may change when resuming: how often, not what is trained, and where (a moved run folder).
RESUMABLE = ("train.save_every", "train.log_every", "train.keep_last", "train.report_to", "train.output_dir",
             "reference.batch_size", "reference.recompute")  # fmt: skip
