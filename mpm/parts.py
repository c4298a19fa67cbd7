"""Building an MPM model from pretrained parts: any vision tower + any causal LM (+ a new connector)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoImageProcessor, PreTrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING

from mpm.configuration import CLIP_MEAN, CLIP_STD, MPMConfig
from mpm.connectors import connector_class
from mpm.core.hub import check_model_source
from mpm.core.llm import load_llm
from mpm.modeling import MPMForConditionalGeneration, build_connector
from mpm.processor import MPMProcessor
from mpm.vision import probe_patch_size


def load_vision(vision, dtype=None, trust_remote_code: bool = False) -> tuple[PreTrainedModel, list, list]:
    """(vision model, image mean, image std) from a folder or hub id, a loaded model, or a config (random
    weights, for tests). A full CLIP/SigLIP checkpoint or model gives its vision half."""
    if isinstance(vision, PreTrainedModel):
        inner = getattr(vision, "vision_model", None)
        if isinstance(inner, PreTrainedModel):  # a full CLIPModel / SiglipModel: its vision half
            vision = inner
        return (vision, *default_stats(vision.config))
    if isinstance(vision, PreTrainedConfig):
        return (MODEL_MAPPING[type(vision)](vision), *default_stats(vision))
    check_model_source("vision", vision)
    config = AutoConfig.from_pretrained(vision, trust_remote_code=trust_remote_code)
    vision_config = getattr(config, "vision_config", config)  # CLIPConfig / SiglipConfig hold a vision_config
    model = MODEL_MAPPING[type(vision_config)].from_pretrained(vision, dtype=dtype or "auto")
    try:
        image_processor = AutoImageProcessor.from_pretrained(vision)
        mean, std = list(image_processor.image_mean), list(image_processor.image_std)
    except (OSError, ValueError, AttributeError):  # no preprocessor_config.json: the statistics of the family
        mean, std = default_stats(vision_config)
    return model, mean, std


def default_stats(vision_config) -> tuple[list, list]:
    """Image mean and std a tower family was trained with, when no image processor file says (SigLIP: 0.5)."""
    if vision_config.model_type.startswith("siglip"):
        return [0.5] * 3, [0.5] * 3
    return list(CLIP_MEAN), list(CLIP_STD)


def from_parts(
    vision,
    llm,
    tokenizer=None,
    connector_type: str = "mlp",
    dtype=None,
    trust_remote_code: bool = False,
    **config_kwargs,
) -> tuple[MPMForConditionalGeneration, MPMProcessor]:
    """An MPM model and its processor.

    Args:
        vision: vision tower: a folder or hub id (CLIP, SigLIP, ResNet, ConvNeXt), a model, or a config.
        llm: causal LM: a folder or hub id, a model, or a config (then `tokenizer` is required).
        tokenizer: the LLM's tokenizer (an object or a folder); loaded from `llm` when it is a path.
        connector_type: a registered connector ("mlp", "resampler", "bridge", ...); other MPMConfig fields go in
            `config_kwargs`.
    The image and slice tokens (and, unless the layout is LLaVA's, the image delimiters) are added to the tokenizer
    and the LLM's embeddings resized (new rows get the mean embedding). The pretrained weights are used as they
    are; only the connector is new. The whole model has one dtype: `dtype`, else the LLM's. The token that closes
    an assistant turn in the chat template becomes a stop token of the saved generation config.
    """
    connector = connector_class(connector_type)  # a misspelt name fails before any weight loads
    # Several images in one message are delimited, except in the plain LLaVA layout (an mlp model without
    # slicing), which `mpm export llava` must reproduce exactly.
    config_kwargs.setdefault(
        "delimit_images", not (connector.exports_to_llava and not config_kwargs.get("use_slicing", False))
    )
    vision_model, mean, std = load_vision(vision, dtype, trust_remote_code)
    lm, tok = load_llm(llm, tokenizer, dtype, trust_remote_code)
    # One dtype for the whole model: the one asked for, else the LLM's (parts are often stored in different ones,
    # e.g. an fp32 CLIP and a bf16 Qwen2.5, and the connector sits between them).
    if isinstance(dtype, torch.dtype):
        lm.to(dtype)  # a model or config object given as the LLM was not loaded in it
    vision_model.to(next(lm.parameters()).dtype)
    names = ["image_token", "slice_start_token", "slice_end_token"]
    if config_kwargs["delimit_images"]:
        names += ["image_start_token", "image_end_token"]
    tokens = [config_kwargs.get(k, getattr(MPMConfig, k)) for k in names]
    known = len(tok)
    tok.add_tokens(tokens, special_tokens=True)
    rows = lm.get_input_embeddings().weight.shape[0]
    if rows < len(tok):
        # mean_resizing=False: transformers would sample the new rows around the mean and print a notice on every
        # run; they are set to the mean below (deterministic, as before for padded vocabularies)
        lm.resize_token_embeddings(len(tok), mean_resizing=False)
    if len(tok) > known:  # new rows, or spare never-trained rows of a padded vocabulary (Qwen2): the mean embedding
        _set_rows_to_mean(lm, range(known, len(tok)), known)
    config = MPMConfig(
        vision_config=vision_model.config,
        text_config=lm.config,
        connector_type=connector_type,
        **{f"{name}_id": tok.convert_tokens_to_ids(token) for name, token in zip(names, tokens)},
        image_mean=config_kwargs.pop("image_mean", mean),
        image_std=config_kwargs.pop("image_std", std),
        **config_kwargs,
    )
    if config.vision_kind == "conv" and config.patch_size is None:
        config.patch_size = probe_patch_size(vision_model, config.image_size, config.vision_feature_layer)
    with torch.device("meta"):  # the skeleton only: the real towers are put in below, never initialised twice
        model = MPMForConditionalGeneration(config)
    model.vision_tower = vision_model
    model.language_model = lm
    model.connector = build_connector(config).to(next(lm.parameters()).dtype)
    model.connector.init_from_tower(vision_model)
    processor = MPMProcessor(tok, config)
    add_stop_tokens(lm.generation_config, processor.end_of_turn_ids())
    return model, processor


def add_stop_tokens(generation_config, ids: list[int]) -> None:
    """Generation also stops at `ids` (a base checkpoint's eos is <|endoftext|> while its chat template closes
    turns with <|im_end|>: without this, it would write the next user turn itself)."""
    eos = generation_config.eos_token_id
    current = [eos] if isinstance(eos, int) else list(eos or [])
    generation_config.eos_token_id = current + [i for i in ids if i not in current]


@torch.no_grad()
def _set_rows_to_mean(lm, rows: range, known: int) -> None:
    """Give embedding rows the mean of the first `known` (trained) rows, in the input and output embeddings."""
    matrices = [lm.get_input_embeddings().weight]
    output = lm.get_output_embeddings()
    if output is not None and output.weight is not matrices[0]:  # untied
        matrices.append(output.weight)
    for weight in matrices:
        weight[rows.start : rows.stop] = weight[:known].mean(0)
