"""`mpm export llava`: an `mlp` MPM checkpoint without slicing as a plain `LlavaForConditionalGeneration` folder,
and back (`import_llava`: a LLaVA checkpoint as an MPM one, to train further with MPM's recipes).

The result loads with `transformers.LlavaForConditionalGeneration` and `AutoProcessor` alone (no MPM code) and
gives the same logits: same vision tower, the MLP as LLaVA's projector (linear_1, GELU, linear_2), the same image
placeholder scheme. Other checkpoints cannot be LLaVA: the resampler and the bridge are not LLaVA's projector,
slicing is not LLaVA's image scheme, and LLaVA reads ViT hidden states only.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import transformers
from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from mpm.configuration import VIT_TYPES, MPMConfig
from mpm.connectors import connector_class
from mpm.core.errors import ExportError, ModelLoadError
from mpm.inference import load_model, pil_image_processor
from mpm.modeling import MPMForConditionalGeneration
from mpm.parts import _set_rows_to_mean, add_stop_tokens
from mpm.processor import PLAIN_CHAT_TEMPLATE, MPMProcessor

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


# LLaVA -> MPM ---------------------------------------------------------------------------------------------------


def mpm_config(config: LlavaConfig, processor: LlavaProcessor) -> MPMConfig:
    """The MPMConfig of an `mlp` model without slicing that computes what this LLaVA model computes (the inverse of
    `llava_config`); ExportError naming every field MPM cannot represent. `processor.tokenizer` must already hold
    MPM's slice tokens (`from_llava` adds them)."""
    reasons = []
    vision_type = config.vision_config.model_type
    clip = vision_type == "clip_vision_model"
    strategy = config.vision_feature_select_strategy
    if vision_type not in VIT_TYPES:
        reasons.append(f"vision_config.model_type is {vision_type!r} (MPM reads LLaVA towers of types {VIT_TYPES})")
    if not isinstance(config.vision_feature_layer, int):
        reasons.append(
            f"vision_feature_layer is {config.vision_feature_layer!r} (MPM's connector reads one hidden state, "
            "not several concatenated)"
        )
    if strategy not in ("default", "full"):
        reasons.append(f"vision_feature_select_strategy is {strategy!r} (MPM knows 'default' and 'full')")
    elif strategy == "default" and not clip:
        reasons.append(
            f"vision_feature_select_strategy is 'default' with a {vision_type} tower (LLaVA drops its first patch "
            "token, which has no class token; MPM drops only CLIP's class token)"
        )
    if config.projector_hidden_act != "gelu":
        reasons.append(f"projector_hidden_act is {config.projector_hidden_act!r} (MPM's mlp connector uses 'gelu')")
    if not config.multimodal_projector_bias:
        reasons.append("multimodal_projector_bias is False (MPM's mlp connector has biases)")
    # The image processor: MPM resizes the whole image to image_size x image_size, then rescales and normalises.
    ip = processor.image_processor
    crop = getattr(ip, "do_center_crop", False)
    size = ip.crop_size if crop else ip.size
    side = (_size_field(size, "height"), _size_field(size, "width"))
    tower_size = getattr(config.vision_config, "image_size", None)
    if side != (tower_size, tower_size):
        field = "crop_size" if crop else "size"
        reasons.append(
            f"the image processor's {field} is {side[0]}x{side[1]} (MPM feeds the {tower_size}px tower "
            f"{tower_size}x{tower_size} images)"
        )
    if not (getattr(ip, "do_rescale", True) and abs(getattr(ip, "rescale_factor", 1 / 255) - 1 / 255) < 1e-9):
        reasons.append(f"the image processor's rescale_factor is {getattr(ip, 'rescale_factor', None)!r} (MPM: 1/255)")
    if not getattr(ip, "do_normalize", True):
        reasons.append("the image processor's do_normalize is False (MPM normalises with image_mean/image_std)")
    tokenizer = processor.tokenizer
    image_token = processor.image_token
    if tokenizer.convert_tokens_to_ids(image_token) != config.image_token_index:
        reasons.append(
            f"image_token_index is {config.image_token_index} but the processor's image_token {image_token!r} is "
            f"token {tokenizer.convert_tokens_to_ids(image_token)}"
        )
    template = _chat_template(processor)
    if template is not None and not _takes_text_content(tokenizer, template, image_token):
        reasons.append(
            "its chat_template does not render plain-text message contents (MPM's processor passes strings with "
            f"{image_token!r} markers; LLaVA templates that read content lists of {{'type': ...}} parts do not)"
        )
    if reasons:
        raise ExportError("this LLaVA checkpoint cannot be imported into MPM: " + "; ".join(reasons))
    try:
        cfg = MPMConfig(
            vision_config=config.vision_config,
            text_config=config.text_config,
            connector_type="mlp",
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select="patch" if strategy == "default" else "full",
            image_size=tower_size,
            image_mean=[float(v) for v in ip.image_mean],
            image_std=[float(v) for v in ip.image_std],
            use_slicing=False,
            delimit_images=False,
            image_token=image_token,
            image_token_id=config.image_token_index,
            slice_start_token_id=tokenizer.convert_tokens_to_ids(MPMConfig.slice_start_token),
            slice_end_token_id=tokenizer.convert_tokens_to_ids(MPMConfig.slice_end_token),
            tie_word_embeddings=config.tie_word_embeddings,
        )
    except ValueError as exc:  # e.g. vision_feature_layer outside the tower
        raise ExportError(f"this LLaVA checkpoint cannot be imported into MPM: {exc}") from None
    # LLaVA's processor and MPM's must write the same number of placeholders per image
    patch_size = getattr(processor, "patch_size", None)
    if patch_size is not None:
        theirs = (tower_size // patch_size) ** 2 + processor.num_additional_image_tokens
        theirs -= 1 if processor.vision_feature_select_strategy == "default" else 0
        ours = connector_class("mlp").tokens_per_image(cfg, tower_size, tower_size)
        if theirs != ours:
            raise ExportError(
                f"the LLaVA processor writes {theirs} image tokens per image (patch_size={patch_size}, "
                f"num_additional_image_tokens={processor.num_additional_image_tokens}, "
                f"vision_feature_select_strategy={processor.vision_feature_select_strategy!r}) but the model reads "
                f"{ours}: the checkpoint is inconsistent"
            )
    return cfg


def from_llava(llava_dir: str | os.PathLike) -> tuple[MPMForConditionalGeneration, MPMProcessor]:
    """An MPM model and processor equal to a `LlavaForConditionalGeneration` checkpoint (e.g. one `export_llava`
    wrote, for which the round trip gives the same weights and logits).

    What maps to what (the inverse of `llava_config` / `to_llava` / `export_llava`):
        model.vision_tower.* -> vision_tower.*       model.multi_modal_projector.* -> connector.* (mlp connector)
        model.language_model.* -> language_model.model.*      lm_head.* -> language_model.lm_head.*
        vision_feature_select_strategy 'default' (CLIP) -> vision_feature_select 'patch'; 'full' -> 'full'
        vision_feature_layer -> vision_feature_layer; image_token_index and the processor's image_token ->
        image_token_id / image_token; the image processor's image_mean/std -> image_mean/std; the tower's
        image_size -> image_size; tie_word_embeddings and the generation config (its stop tokens) as they are.
        The chat template (the processor's, else the tokenizer's) becomes the tokenizer's; MPM's plain template
        (what an export of a model without a template carries) becomes no template again, as it was.
    MPM's slice tokens, which the MPM processor requires, are added to the tokenizer when missing (new embedding
    rows: the mean embedding, as `from_parts` does). A center-cropping image processor (llava-hf's) is replaced by
    MPM's resize of the whole image, so non-square images give other pixels (square ones the same).
    Refused (ExportError naming the field and value): towers other than CLIP/SigLIP ViTs, several feature layers,
    'default' selection on SigLIP (LLaVA drops a patch token there), other projector activations, projectors
    without biases, image processors whose output is not the tower's size, and chat templates that only take
    content lists.
    """
    path = Path(llava_dir)
    if not (path / "config.json").is_file():
        raise ExportError(f"{path}: no config.json: not a saved LLaVA checkpoint folder")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != "llava":
        raise ExportError(f"{path} holds a {model_type!r} model, not a LLaVA ('llava') checkpoint")
    try:
        config = LlavaConfig.from_pretrained(path)
        processor = AutoProcessor.from_pretrained(path)
        processor.image_processor = pil_image_processor(path)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{path} is not a LLaVA checkpoint: {first}") from None
    if not isinstance(processor, LlavaProcessor):
        raise ExportError(f"{path}: its processor is a {type(processor).__name__}, not a LlavaProcessor")
    tokenizer = processor.tokenizer
    known = len(tokenizer)
    tokenizer.add_tokens(
        [t for t in (MPMConfig.slice_start_token, MPMConfig.slice_end_token) if t not in tokenizer.get_vocab()],
        special_tokens=True,
    )
    cfg = mpm_config(config, processor)  # refuses before any weight loads
    llava = LlavaForConditionalGeneration.from_pretrained(path, dtype="auto")
    if len(tokenizer) > known:  # the added slice tokens get rows
        if llava.get_input_embeddings().weight.shape[0] < len(tokenizer):
            llava.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        _set_rows_to_mean(llava, range(known, len(tokenizer)), known)
        cfg.text_config.vocab_size = llava.get_input_embeddings().weight.shape[0]
    model = MPMForConditionalGeneration(cfg).to(llava.dtype)
    rename = {
        "model.vision_tower.": "vision_tower.",
        "model.multi_modal_projector.": "connector.",
        "model.language_model.": "language_model.model.",
        "lm_head.": "language_model.lm_head.",
    }
    state = {}
    for name, tensor in llava.state_dict().items():
        prefix = next((p for p in rename if name.startswith(p)), None)
        if prefix is None:
            raise ExportError(f"{path}: the LLaVA weight {name!r} has no place in an MPM model")
        state[rename[prefix] + name[len(prefix) :]] = tensor
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "language_model.lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise ExportError(f"weights do not map onto MPM: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    template = _chat_template(processor)
    tokenizer.chat_template = None if template == PLAIN_CHAT_TEMPLATE else template
    mpm_processor = MPMProcessor(tokenizer, cfg)
    model.language_model.generation_config = llava.generation_config  # its end-of-turn tokens
    add_stop_tokens(model.language_model.generation_config, mpm_processor.end_of_turn_ids())
    return model.eval(), mpm_processor


def import_llava(llava_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write `llava_dir` (a LLaVA checkpoint, see `from_llava`) as an MPM checkpoint folder in `out_dir`: it loads
    with `MPMForConditionalGeneration.from_pretrained`, `MPMProcessor.from_pretrained` and `load_model`."""
    model, processor = from_llava(llava_dir)
    out = Path(out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def load_as_mpm(folder: str | os.PathLike, device: str = "auto", quantize: str | None = None):
    """(model, processor) as MPM ones whatever the checkpoint: an MPM one loaded, a LLaVA one converted
    (`from_llava`); `quantize` as `mpm.inference.load_model`'s. For code that needs MPM's processor (scoring answers,
    the serving decode loop)."""
    config = Path(folder) / "config.json"
    if not (config.is_file() and json.loads(config.read_text()).get("model_type") == "llava"):
        return load_model(folder, device=device, quantize=quantize)
    import torch

    from mpm.quantize import check_mode, quantize_model

    if quantize is not None:
        check_mode(quantize)
    model, processor = from_llava(folder)
    device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    return (quantize_model(model, quantize) if quantize else model), processor


def import_llava_once(folder: str | os.PathLike, imported: str | os.PathLike) -> str:
    """`folder` itself when it holds an MPM checkpoint; for a LLaVA one, its MPM conversion in `imported`, made
    once (into a temporary folder renamed into place, so a conversion cut short is never taken for a finished one).
    Anything else (or nothing) is returned unchanged, for the loader to report."""
    config = Path(folder) / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    if model_type != "llava":
        return str(folder)
    imported = Path(imported)
    if not (imported / "config.json").is_file():
        partial = imported.with_name(imported.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)
        import_llava(folder, partial)
        if imported.exists():
            shutil.rmtree(imported)
        partial.rename(imported)
    return str(imported)


def _size_field(size, name: str) -> int | None:
    """A field of an image processor's size (a dict, or transformers 5's SizeDict)."""
    return size.get(name) if isinstance(size, dict) else getattr(size, name, None)


def _chat_template(processor) -> str | None:
    return getattr(processor, "chat_template", None) or processor.tokenizer.chat_template


def _takes_text_content(tokenizer, template: str, image_token: str) -> bool:
    """Whether `template` renders a message whose content is a string (what MPM's processor passes)."""
    text = f"{image_token}\nWhat is this?"
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], chat_template=template, tokenize=False, add_generation_prompt=True
        )
    except Exception:  # jinja2.TemplateError
        return False
    return text in rendered
