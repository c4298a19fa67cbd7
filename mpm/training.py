"""Leaf utilities of the image-to-text recipe: building the model, choosing what trains, LoRA, the final model.
No loop here: the loop is in mpm/recipes/i2t.py, readable top to bottom; checkpoints, metrics and resume checks
are every recipe's (mpm.core.runs)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from mpm.core.errors import ModelLoadError
from mpm.modeling import MPMForConditionalGeneration
from mpm.processor import MPMProcessor
from mpm.train_config import ModelSection, TrainSection

logger = logging.getLogger(__name__)


def build_model(cfg: ModelSection) -> tuple[MPMForConditionalGeneration, MPMProcessor]:
    """From an MPM checkpoint (`init_from`), or from pretrained parts and a new connector."""
    if cfg.init_from:
        folder = Path(cfg.init_from)
        config_file = folder / "config.json"
        model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
        if model_type != "mpm":
            raise ModelLoadError(f"model.init_from {folder} holds a {model_type!r} model, not an MPM checkpoint")
        return MPMForConditionalGeneration.from_pretrained(folder), MPMProcessor.from_pretrained(folder)
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
    if settings["image_size"] is None:  # the vision tower's own size
        settings.pop("image_size")
    return settings


def set_trainable(model: MPMForConditionalGeneration, cfg: TrainSection) -> list[dict]:
    """Freeze / unfreeze per the config; returns optimizer parameter groups (the connector at its own rate)."""
    model.requires_grad_(False)
    model.connector.requires_grad_(True)
    if cfg.llm_trainable and not cfg.lora.enabled:
        model.language_model.requires_grad_(True)
    if cfg.vision != "frozen":
        for module in vision_modules_to_train(model, None if cfg.vision == "full" else cfg.vision_last_n):
            module.requires_grad_(True)
    if cfg.lora.enabled:
        apply_lora(model, cfg)
    connector = [p for p in model.connector.parameters() if p.requires_grad]
    others = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("connector.")]
    groups = [{"params": connector, "lr": cfg.connector_lr}]
    if others:
        groups.append({"params": others, "lr": cfg.lr})
    return groups


def vision_modules_to_train(model: MPMForConditionalGeneration, last_n: int | None) -> list[torch.nn.Module]:
    """The vision modules whose output reaches the connector: the blocks up to the feature layer (its last `last_n`,
    or all of them with the embeddings when None). Blocks past the feature layer, and heads or final norms the
    connector never reads, stay frozen: they would get no gradient, yet weight decay would still move them."""
    tower, cfg = model.vision_tower, model.config
    encoder = tower.encoder
    blocks = list(encoder.layers if hasattr(encoder, "layers") else encoder.stages)
    used = cfg.vision_feature_layer % (len(blocks) + 1)  # hidden_states = (embeddings, block 1, ..., block N)
    modules = blocks[:used] if last_n is None else blocks[max(used - last_n, 0) : used]
    if last_n is None:
        stem = [getattr(tower, name, None) for name in ("embeddings", "embedder", "pre_layrnorm")]
        modules += [m for m in stem if m is not None]
    if cfg.connector_type == "bridge" and used == len(blocks):  # the bridge normalises the last layer's output
        modules.append(tower.post_layernorm)
    return modules


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
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ImportError("train.lora needs peft: pip install peft") from exc
    lora = cfg.lora
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)
    )
    model.language_model = get_peft_model(model.language_model, config)


def save_final(
    model: MPMForConditionalGeneration, processor: MPMProcessor, folder: Path, state_dict: dict | None = None
) -> None:
    """A plain MPM checkpoint, written beside `folder` and renamed (whole or absent). LoRA adapters are merged into
    the LLM (and also saved alone in `lora_adapter/`); `state_dict` is the gathered one under FSDP / ZeRO-3."""
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    lm = model.language_model
    if hasattr(lm, "merge_and_unload"):
        lm.save_pretrained(tmp / "lora_adapter")
        model.language_model = lm.merge_and_unload()
        state_dict = None
    model.save_pretrained(tmp, state_dict=state_dict)
    processor.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
