"""Typed configuration of `mpm train i2t` (YAML in configs/i2t/, loaded with mpm.core.config.load_config)."""

from __future__ import annotations

from dataclasses import dataclass, field

# English caption instructions for stage 1, as VisCPM samples them (finetune/utils/prompts.py has 10).
from mpm.core.config import check_choice, check_range
from mpm.core.errors import ConfigError

# English caption instructions for stage 1, as VisCPM samples them (finetune/utils/prompts.py has 10).
CAPTION_PROMPTS = [
    "Describe the image briefly.",
    "Write a short caption for this picture.",
    "What does this image show?",
    "Give a one-sentence description of the photo.",
    "Caption this image.",
    "Summarize the content of the picture.",
    "Describe what you see.",
    "What is in this photo?",
    "Provide a brief description of the image.",
    "Tell me what this picture shows in a few words.",
]


@dataclass
class ModelSection:
    vision: str = ""  # a vision tower: folder or hub id (CLIP, SigLIP, ResNet, ConvNeXt)
    llm: str = ""  # a causal LM: folder or hub id
    tokenizer: str | None = None  # default: the LLM's
    init_from: str | None = None  # an MPM checkpoint to start from (stage 2 after stage 1); replaces vision/llm
    connector_type: str = "mlp"  # a registered connector: mlp | resampler | bridge | your own (mpm.connectors)
    num_queries: int = 64
    bridge_experts: bool = False  # bridge: the queries get their own norms and MLP in each tower layer (Muffin)
    connector_hidden_size: int | None = None
    vision_feature_layer: int = -2
    vision_feature_select: str = "patch"
    image_size: int | None = None
    use_slicing: bool = False
    max_slices: int = 9
    scale_resolution: int = 448
    delimit_images: bool | None = None  # default: on, except in the plain LLaVA layout (mlp, no slicing)
    attn_implementation: str | None = None  # the LLM's: sdpa (transformers' default) | flash_attention_2 | eager
    trust_remote_code: bool = False

    def __post_init__(self):
        from mpm.connectors import CONNECTORS  # a misspelt connector is an error when the config loads

        if ":" not in self.connector_type:  # package.module:Class is imported (and checked) when the model is built
            check_choice("model.connector_type", self.connector_type, sorted(CONNECTORS))


@dataclass
class LoraSection:
    enabled: bool = False
    r: int = 64
    alpha: int = 64
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class DataSection:
    shards: list[str] = field(default_factory=list)  # pretrain: pair shard sets (folders or brace patterns)
    weights: list[float] | None = None  # pretrain: sampling weight per shard set
    shuffle_buffer: int = 1000
    # pretrain: the caption instructions, one picked per sample. An entry holding "<image>" is a raw prompt (no chat
    # template, the image where the marker is, e.g. "<ctx><image></ctx> Describe in English:"), asked the same way
    # by `mpm.generate` (Request(prompt=...)) and by `mpm eval`'s prompt table
    caption_prompts: list[str] = field(default_factory=lambda: list(CAPTION_PROMPTS))
    conversations: list[str] = field(default_factory=list)  # sft: LLaVA JSON, UniMM-Chat jsonl/parquet, ShareGPT
    image_folder: str = ""  # sft: where the conversations' image file names live
    max_length: int = 2048
    group_by_length: bool = True  # sft: batches of similar lengths (less padding)
    num_workers: int = 2


@dataclass
class EfficiencySection:
    """Speed and memory switches (stage 1 is where the compute goes), all on by default. Each can be turned off to
    get the earlier behaviour: benchmarks/bench_stage1.py runs both side by side."""

    frozen_in_compute_dtype: bool = True  # frozen weights stored in bf16/fp16 under mixed precision, not fp32
    trainable_only_checkpoints: bool = True  # intermediate checkpoints without the frozen weights (final/ is whole)
    vision_early_exit: bool = True  # the vision tower stops at the feature layer the connector reads
    # a micro-batch's samples in one row, attention kept apart (no padding): auto (flash attention: always; sdpa /
    # eager, which compute the row's whole masked attention: when it fits in data.max_length) | always | never
    pack_sequences: str = "auto"
    supervised_logits_only: bool = True  # the LM head runs only where the next token is supervised

    def __post_init__(self):
        check_choice("train.efficiency.pack_sequences", self.pack_sequences, ("auto", "always", "never"))


@dataclass
class TrainSection:
    stage: str = "pretrain"  # pretrain: LLM frozen, English pairs; sft: conversations, LLM trained (full or LoRA)
    output_dir: str = ""
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 8  # per device, per micro-step
    grad_accum: int = 1
    lr: float = 2e-5  # LLM (and vision tower) learning rate
    connector_lr: float = 1e-3  # the connector learns from scratch: its own, larger rate
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16
    gradient_checkpointing: bool = False
    train_llm: bool | None = None  # default: False for pretrain, True for sft
    vision: str = "frozen"  # frozen | full | last_n
    vision_last_n: int = 2
    lora: LoraSection = field(default_factory=LoraSection)
    train_new_token_embeddings: bool = True  # the added image/slice tokens learn even with the LLM frozen or LoRA
    efficiency: EfficiencySection = field(default_factory=EfficiencySection)
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 2
    report_to: list[str] = field(default_factory=list)  # tensorboard, wandb

    @property
    def llm_trainable(self) -> bool:
        """train_llm, or by default: frozen in pretrain (MPM stage 1), trained in sft."""
        return self.train_llm if self.train_llm is not None else self.stage == "sft"

    def __post_init__(self):
        check_choice("train.stage", self.stage, ("pretrain", "sft"))
        check_train_section(self)


def check_train_section(t) -> None:
    """The checks every i2t-model training section shares (`mpm train i2t`, `mpm train align`)."""
    check_choice("train.mixed_precision", t.mixed_precision, ("no", "bf16", "fp16"))
    check_choice("train.vision", t.vision, ("frozen", "full", "last_n"))
    for name in ("max_steps", "batch_size", "grad_accum", "save_every", "log_every", "keep_last", "vision_last_n"):
        check_range(f"train.{name}", getattr(t, name), 1)
    unknown = [r for r in t.report_to if r not in ("tensorboard", "wandb")]
    if unknown:
        raise ConfigError(f"`train.report_to` knows tensorboard and wandb, got {unknown}")


@dataclass
class EvalSection:
    """Zero-shot captioning on a small held-out set at every checkpoint (the same code as `mpm eval caption`), so the
    MPM transfer can be watched while stage 1 runs: per-language scores and fidelity go to the metrics log."""

    data: str | None = None  # Crossmodal-3600 captions.jsonl or a generic jsonl {"image", "lang", "references"}
    images: str | None = None
    langs: list[str] = field(default_factory=lambda: ["en"])
    prompts: str | None = None  # YAML/JSON {lang: prompt} overriding the shipped prompts
    metrics: list[str] = field(default_factory=lambda: ["cider"])
    max_images: int = 50  # per language
    max_new_tokens: int = 32
    batch_size: int = 8

    def __post_init__(self):
        check_range("eval.max_images", self.max_images, 1)
        check_range("eval.batch_size", self.batch_size, 1)


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def check_required(self) -> None:
        if not self.train.output_dir:
            raise ConfigError("train.output_dir is required")
        if not self.model.init_from and not (self.model.vision and self.model.llm):
            raise ConfigError(
                "give model.vision and model.llm (pretrained parts), or model.init_from (an MPM checkpoint)"
            )
        if self.train.stage == "pretrain" and not self.data.shards:
            raise ConfigError("stage pretrain reads pair shards: set data.shards (output folders of `mpm data shard`)")
        weights = self.data.weights
        if self.train.stage == "pretrain" and weights is not None:
            if len(weights) != len(self.data.shards):
                raise ConfigError(
                    f"data.weights has {len(weights)} values for {len(self.data.shards)} shard sets in data.shards: "
                    "give one weight per shard set"
                )
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ConfigError(f"data.weights must be non-negative with a positive sum, got {list(weights)}")
        if self.train.stage == "sft" and not self.data.conversations:
            raise ConfigError(
                "stage sft reads conversations: set data.conversations (LLaVA JSON, UniMM-Chat jsonl, ...)"
            )
        if self.train.lora.enabled and not self.train.llm_trainable:
            raise ConfigError("train.lora.enabled trains the LLM through LoRA: set train.train_llm true")


# Settings that may change when resuming: how often, not what is trained, and where (a moved run folder).
# Not train.max_steps: the learning-rate schedule is laid out over it, so a new length would make the rate jump.
RESUMABLE = ("train.save_every", "train.log_every", "train.keep_last", "train.report_to", "train.output_dir", "eval")
