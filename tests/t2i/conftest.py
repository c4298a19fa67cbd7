"""Tiny real components for the text-to-image model: an LLM and tokenizer from configs, a pixel-space UNet from
configs/t2i/unet_tiny_32px.json, a tiny AutoencoderKL, pair shards written by the real sharder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.mpm.conftest import make_colour_shards, make_tokenizer, text_config

UNET_CONFIG = "configs/t2i/unet_tiny_32px.json"


@pytest.fixture(scope="session")
def paint_llm(tmp_path_factory):
    """A folder holding a tiny Qwen2 LLM (64 wide, random weights) and its tokenizer, as if downloaded."""
    import torch
    from transformers import Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("paint_llm")
    tok = make_tokenizer()
    torch.manual_seed(0)
    config = text_config("qwen2", len(tok))
    config.hidden_size, config.intermediate_size = 64, 128
    Qwen2ForCausalLM(config).save_pretrained(root)
    tok.save_pretrained(root)
    return root


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    """A diffusers Stable Diffusion folder holding only model_index.json, unet/, vae/ and scheduler/ (no CLIP text
    encoder: none can be downloaded, and none is needed)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    config = {**json.loads(Path(UNET_CONFIG).read_text()), "in_channels": 4, "out_channels": 4, "sample_size": 8}
    config.pop("_class_name")
    UNet2DConditionModel(**config).save_pretrained(root / "unet")
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=16,
    ).save_pretrained(root / "vae")  # fmt: skip
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(root / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"]}  # fmt: skip
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.fixture(scope="session")
def paint_shards(tmp_path_factory):
    """Pair shards written by the real sharder: flat-coloured 32x32 images captioned with their colour."""
    return make_colour_shards(tmp_path_factory.mktemp("paint_pairs"))
