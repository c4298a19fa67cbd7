"""Leaf utilities of the image-to-text recipe: building the model, choosing what trains, LoRA, the final model.
No loop here: the loop is in mpm/recipes/i2t.py, readable top to bottom; checkpoints, metrics and resume checks
are every recipe's (mpm.core.runs)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from mpm.core.errors import ModelLoadError, model_errors
from mpm.core.hub import check_model_source
from mpm.modeling import AddedTokenEmbeddings, MPMForConditionalGeneration
from mpm.processor import MPMProcessor
from mpm.train_config import ModelSection, TrainSection

logger = logging.getLogger(__name__)


def build_model(cfg: ModelSection) -> tuple[MPMForConditionalGeneration, MPMProcessor]:
    """From an MPM checkpoint (`init_from`), or from pretrained parts and a new connector; the LLM's attention
    implementation set when `attn_implementation` is given."""
    model, processor = _load_or_assemble(cfg)
    if cfg.attn_implementation:
        with model_errors("model.attn_implementation", cfg.attn_implementation, is_model=False):
            model.language_model.set_attn_implementation(cfg.attn_implementation)
    return model, processor


def _load_or_assemble(cfg: ModelSection) -> tuple[MPMForConditionalGeneration, MPMProcessor]:
    if cfg.init_from:
        folder = Path(cfg.init_from)
        config_file = folder / "config.json"
        model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
        if model_type != "mpm":
            raise ModelLoadError(f"model.init_from {folder} holds a {model_type!r} model, not an MPM checkpoint")
        with model_errors("model.init_from", folder):
            return MPMForConditionalGeneration.from_pretrained(folder), MPMProcessor.from_pretrained(folder)
    for key in ("vision", "llm", "tokenizer"):  # hub ids that cannot be fetched now: one line, in seconds
        check_model_source(f"model.{key}", getattr(cfg, key))
    try:
        return MPMForConditionalGeneration.from_parts(
            cfg.vision,
            cfg.llm,
            tokenizer=cfg.tokenizer,
            trust_remote_code=cfg.trust_remote_code,
            dtype=torch.float32,
            **mpm_settings(cfg),
        )
    except OSError as exc:  # a wrong path or hub id, a folder without weights
        raise ModelLoadError(f"cannot load model.vision={cfg.vision!r} / model.llm={cfg.llm!r}: {exc}") from None


def mpm_settings(cfg: ModelSection) -> dict:
    """The MPMConfig fields among the model section's settings."""
    settings = {
        k: v for k, v in vars(cfg).items() if k not in ("vision", "llm", "tokenizer", "init_from", "trust_remote_code")
    }
    for key in ("image_size", "delimit_images", "attn_implementation"):  # None: from_parts' default
        if settings[key] is None:
            settings.pop(key)
    settings.pop("attn_implementation", None)  # not an MPMConfig field: set on the LLM (build_model)
    return settings


def set_trainable(model: MPMForConditionalGeneration, cfg: TrainSection, shards_weights: bool = False) -> list[dict]:
    """Freeze / unfreeze per the config; returns optimizer parameter groups (the connector and the added tokens'
    rows at the connector's rate). `shards_weights` (FSDP / ZeRO-3): the added tokens' rows cannot be merged into
    a sharded embedding matrix at the end, so they keep their first values (the mean embedding)."""
    model.requires_grad_(False)
    model.connector.requires_grad_(True)
    if cfg.llm_trainable and not cfg.lora.enabled:
        model.language_model.requires_grad_(True)
    if cfg.vision != "frozen":
        last_n = None if cfg.vision == "full" else cfg.vision_last_n
        for module in model.connector.vision_modules(model.vision_tower, model.config, last_n):
            module.requires_grad_(True)
    if cfg.lora.enabled:
        apply_lora(model, cfg)
    # The tokens this model added (slice markers, image delimiters) have new embedding rows: they must learn even
    # when the LLM does not (frozen, or LoRA). The image placeholder's own row is never used (replaced by features).
    new_tokens = added_token_ids(model)
    if shards_weights and new_tokens and cfg.train_new_token_embeddings and not cfg.llm_trainable:
        logger.warning(
            "FSDP / ZeRO-3: the added tokens' embedding rows stay as initialised (train_new_token_embeddings)"
        )
    elif new_tokens and cfg.train_new_token_embeddings and (not cfg.llm_trainable or cfg.lora.enabled):
        width = model.get_input_embeddings().weight.shape[1]
        model.added_token_embeddings = AddedTokenEmbeddings(new_tokens, width)
        head = model.language_model.get_output_embeddings()
        if head is not None and head.weight is model.get_input_embeddings().weight:
            # tied: the head's rows for these tokens are the same rows, so they train there too (what is merged)
            model.added_token_embeddings.attach_to_head(head)
    # The connector and the new token rows learn from scratch: the connector's rate. Each group is named: the metrics
    # log its rate as lr_<name>.
    fresh = ("connector.", "added_token_embeddings.")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"name": "connector", "params": [p for n, p in named if n.startswith(fresh)], "lr": cfg.connector_lr}]
    for name, prefix in (("llm", "language_model."), ("vision", "vision_tower.")):
        params = [p for n, p in named if n.startswith(prefix)]
        if params:
            groups.append({"name": name, "params": params, "lr": cfg.lr})
    grouped = {id(p) for g in groups for p in g["params"]}
    missing = [n for n, p in named if id(p) not in grouped]
    if missing:  # a trainable part the groups do not know would silently never train
        raise RuntimeError(f"trainable parameters in no optimizer group: {missing[:5]}")
    return groups


def added_token_ids(model: MPMForConditionalGeneration) -> list[int]:
    """Ids of the tokens whose embedding rows the model uses and the LLM never learnt (all added ones but the image
    placeholder, whose row is replaced by visual features)."""
    cfg = model.config
    ids = [cfg.slice_start_token_id, cfg.slice_end_token_id, cfg.image_start_token_id, cfg.image_end_token_id]
    return [i for i in ids if i is not None]


def store_frozen_in(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Frozen weights in the compute dtype (bf16 / fp16): autocast would cast them on every step anyway, and a
    frozen 7B LLM takes half the memory. Trainable weights stay fp32 for the optimizer; buffers (rotary
    frequencies, batch-norm statistics) keep their precision, and so do batch norms' own weights (batch_norm
    refuses bf16 weights beside fp32 running statistics)."""
    norms = {
        id(p) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for p in m.parameters()
    }
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and id(param) not in norms:
            param.data = param.data.to(dtype)


def keep_frozen_norm_statistics(model: torch.nn.Module) -> None:
    """Frozen batch norms (a frozen ResNet / ConvNeXt tower) keep their running statistics: in train mode they
    would still update them, and a "frozen" tower would change. A norm without parameters of its own
    (affine=False) counts as frozen when the module holding it has nothing trainable."""
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if not isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            continue
        owner = module if any(True for _ in module.parameters()) else modules[name.rpartition(".")[0]]
        if not any(p.requires_grad for p in owner.parameters()):
            module.eval()


def apply_lora(model: MPMForConditionalGeneration, cfg: TrainSection) -> None:
    """LoRA adapters on the LLM (peft); the base weights stay frozen."""
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)
    )
    model.language_model = get_peft_model(model.language_model, config)


def save_final(
    model: MPMForConditionalGeneration,
    processor: MPMProcessor,
    folder: Path,
    state_dict: dict | None = None,
    write: bool = True,
) -> MPMForConditionalGeneration:
    """A plain MPM checkpoint in fp32, written beside `folder` and renamed (whole or absent). LoRA is merged into
    the LLM (the adapter also saved alone in `lora_adapter/`), the added tokens' rows into its embeddings;
    `state_dict` is the gathered one under FSDP / ZeRO-3. Every process calls it (each merges its own copy, so all
    hold the same plain model); only the one with `write` writes. Returns the plain model."""
    tmp = folder.with_name(f".tmp-{folder.name}")
    if write:
        shutil.rmtree(tmp, ignore_errors=True)
    # Frozen parts were kept in the compute dtype during training: the saved model has one dtype, fp32, and the
    # merges below happen in it (LoRA's small updates would be rounded away in bf16).
    model.float()
    lm = model.language_model
    if hasattr(lm, "merge_and_unload"):
        if write:
            lm.save_pretrained(tmp / "lora_adapter")
        model.language_model = lm.merge_and_unload()
        state_dict = None
    if model.added_token_embeddings is not None:
        model.added_token_embeddings.merge_into(model.get_input_embeddings())
        model.added_token_embeddings = None
        state_dict = None
    if state_dict is not None:
        state_dict = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    if write:
        model.save_pretrained(tmp, state_dict=state_dict)
        processor.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return model


def shards_weights(accelerator) -> bool:
    """Whether the run shards the weights (FSDP, DeepSpeed ZeRO-3): then LoRA cannot be merged at the end."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = accelerator.state.deepspeed_plugin
    return accelerator.distributed_type == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3
