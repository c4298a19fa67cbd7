"""`mpm export llava`: an `mlp` MPM checkpoint without slicing as a plain `LlavaForConditionalGeneration` folder.

The result loads with `transformers.LlavaForConditionalGeneration` and `AutoProcessor` alone (no MPM code) and
gives the same logits: same vision tower, the MLP as LLaVA's projector (linear_1, GELU, linear_2), the same image
placeholder scheme. Other checkpoints cannot be LLaVA: the resampler and the bridge are not LLaVA's projector,
slicing is not LLaVA's image scheme, and LLaVA reads ViT hidden states only.
"""

from __future__ import annotations

import os
from pathlib import Path

import transformers
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from mpm.connectors import connector_class
from mpm.core.errors import ExportError, ModelLoadError
from mpm.inference import load_model
from mpm.modeling import MPMForConditionalGeneration
from mpm.processor import PLAIN_CHAT_TEMPLATE

# transformers 5 names the PIL-backed class CLIPImageProcessorPil (CLIPImageProcessor uses torchvision when present);
# in 4.x CLIPImageProcessor is the PIL one.
PIL_IMAGE_PROCESSOR = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def llava_config(model: MPMForConditionalGeneration) -> LlavaConfig:
    cfg = model.config
    reasons = []
    if not connector_class(cfg.connector_type).exports_to_llava:
        reasons.append(f"its connector is {cfg.connector_type!r} (LLaVA's projector is the 'mlp' connector)")
    if cfg.delimit_images:
        reasons.append("it wraps each image in delimiter tokens (LLaVA's layout is the placeholders alone)")
    if cfg.use_slicing:
        reasons.append("it slices images (LLaVA feeds one fixed-size image)")
    if cfg.vision_kind != "vit":
        reasons.append(
            f"its vision tower is convolutional ({cfg.vision_config.model_type}); LLaVA reads ViT hidden states"
        )
    tower_size = getattr(cfg.vision_config, "image_size", None)  # convolutional towers have none
    if tower_size is not None and cfg.image_size != tower_size:
        reasons.append(
            f"it feeds {cfg.image_size}px images to a tower made for {tower_size}px (MPM interpolates "
            "the position embeddings; LLaVA does not)"
        )
    if cfg.connector_hidden_size not in (None, cfg.text_config.hidden_size):
        reasons.append("its MLP hidden width differs from the LLM width (LLaVA's projector uses the LLM width)")
    if reasons:
        raise ExportError("this checkpoint cannot be exported as LLaVA: " + "; ".join(reasons))
    clip = cfg.vision_config.model_type == "clip_vision_model"
    strategy = "default" if clip and cfg.vision_feature_select == "patch" else "full"
    tokens = (cfg.image_size // cfg.patch_size) ** 2 + (1 if clip and strategy == "full" else 0)
    return LlavaConfig(
        vision_config=cfg.vision_config,
        text_config=cfg.text_config,
        image_token_index=cfg.image_token_id,
        image_seq_length=tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=cfg.vision_feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )


def to_llava(model: MPMForConditionalGeneration) -> LlavaForConditionalGeneration:
    """The same weights under LLaVA's names."""
    llava = LlavaForConditionalGeneration(llava_config(model)).to(next(model.parameters()).dtype)
    rename = {
        "vision_tower.": "model.vision_tower.",
        "connector.": "model.multi_modal_projector.",
        "language_model.model.": "model.language_model.",
        "language_model.lm_head.": "lm_head.",
    }
    state = {}
    for name, tensor in model.state_dict().items():
        prefix = next(p for p in rename if name.startswith(p))
        state[rename[prefix] + name[len(prefix) :]] = tensor
    missing, unexpected = llava.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and llava.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ExportError(f"weights do not map onto LLaVA: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if llava.config.tie_word_embeddings:
        llava.tie_weights()
    return llava


def export_llava(model_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    try:
        model, processor = load_model(model_dir, device="cpu")
    except ModelLoadError as exc:
        raise ExportError(str(exc)) from None
    if not isinstance(model, MPMForConditionalGeneration):
        raise ExportError(f"{model_dir} is already a LLaVA checkpoint")
    llava = to_llava(model)
    llava.generation_config = model.language_model.generation_config  # its end-of-turn tokens
    out = Path(out_dir)
    llava.save_pretrained(out)
    cfg = model.config
    # The PIL image processor: MPM's processor resizes with PIL (bicubic), and so gives the same pixels; the
    # torchvision one resizes tensors and differs by a few levels (benchmarks/gpu_i2t.sh measures it).
    image_processor = PIL_IMAGE_PROCESSOR(
        size={"height": cfg.image_size, "width": cfg.image_size},
        do_center_crop=False,
        image_mean=cfg.image_mean,
        image_std=cfg.image_std,
    )
    clip = cfg.vision_config.model_type == "clip_vision_model"
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=processor.tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy=llava.config.vision_feature_select_strategy,
        image_token=cfg.image_token,
        num_additional_image_tokens=1 if clip else 0,
        # the format the model was trained with: the LLM's template, or the plain one MPM uses without it
        chat_template=processor.tokenizer.chat_template or PLAIN_CHAT_TEMPLATE,
    ).save_pretrained(out)
    return out
