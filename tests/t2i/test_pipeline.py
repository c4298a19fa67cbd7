"""MPMPaintPipeline on tiny real parts: a Qwen2 LLM (64 wide), a Stable Diffusion folder holding only unet/, vae/
and scheduler/ (latent space, VAE factor 2), and a pixel-space UNet from configs/t2i/unet_tiny_32px.json. Two
sampling steps everywhere: the tests check plumbing (sizes, batches, conditioning, errors), not picture quality."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from mpm.core.errors import ConfigError
from t2i import MPMPaintPipeline, TextProjection
from t2i.pipeline import tokenize_prompts
from tests.t2i.conftest import UNET_CONFIG

STEPS = 2


def draw(pipe, prompt="a red cat", seed=0, **kwargs):
    """float images (N, H, W, 3) in [0, 1], for a fixed seed."""
    kwargs = {"num_inference_steps": STEPS, "output_type": "np", **kwargs}
    if "generator" not in kwargs:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return pipe(prompt, **kwargs).images


def rebuild(pipe, text_proj: TextProjection) -> MPMPaintPipeline:
    """The same LLM, UNet, VAE and scheduler with another text_proj (its weights copied from `pipe`'s)."""
    text_proj.load_state_dict(pipe.text_proj.state_dict())
    new = MPMPaintPipeline(pipe.text_encoder, pipe.tokenizer, text_proj, pipe.unet, pipe.scheduler, pipe.vae)
    new.set_progress_bar_config(disable=True)
    return new


class UNetBatches:
    """Records the batch size of every UNet forward (a forward pre-hook on its `sample` argument)."""

    def __init__(self, unet):
        self.sizes: list[int] = []
        self.handle = unet.register_forward_pre_hook(lambda module, args: self.sizes.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: one thread is faster, and several spin-wait badly on a busy machine (28 s vs 3 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sd_pipe(paint_llm, sd_folder) -> MPMPaintPipeline:
    """A latent-space pipeline from a Stable Diffusion folder (model_index.json, unet/, vae/, scheduler/ only)."""
    torch.manual_seed(0)
    pipe = MPMPaintPipeline.from_parts(paint_llm, sd=sd_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- building, saving, loading ---------------------------------------------------------------------------------------
def test_from_sd_folder_draws_through_the_vae_and_round_trips(sd_pipe, tmp_path):
    assert sd_pipe.vae is not None and sd_pipe.vae_scale_factor == 2
    assert sd_pipe.text_proj.config.in_features == 64
    assert sd_pipe.text_proj.config.out_features == sd_pipe.unet.config.cross_attention_dim == 64
    images = draw(sd_pipe, height=24, width=16)
    assert images.shape == (1, 24, 16, 3)  # latents 12x8, decoded by the VAE to the size asked for
    assert np.isfinite(images).all()
    default = sd_pipe("a red cat", num_inference_steps=STEPS).images[0]  # PIL by default
    assert default.size == (16, 16)  # the UNet's sample_size 8 times the VAE's factor 2

    sd_pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "MPMPaintPipeline"
    assert index["text_proj"] == ["t2i.pipeline", "TextProjection"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    loaded = MPMPaintPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.text_proj, TextProjection)
    keys = ("in_features", "out_features", "hidden_layer", "max_length", "pooled")
    assert {k: loaded.text_proj.config[k] for k in keys} == {k: sd_pipe.text_proj.config[k] for k in keys}
    again = draw(loaded, height=24, width=16)
    np.testing.assert_array_equal(again, images)
    other_seed = draw(loaded, seed=1, height=24, width=16)
    assert not np.allclose(other_seed, images)  # the comparison above can tell images apart


def test_pixel_space_pipeline_from_the_unet_config_file(paint_llm, tmp_path):
    pixel_pipe = MPMPaintPipeline.from_parts(paint_llm, unet=UNET_CONFIG)  # random weights from the config file
    pixel_pipe.set_progress_bar_config(disable=True)
    assert pixel_pipe.vae is None and pixel_pipe.vae_scale_factor == 1
    assert pixel_pipe.unet.config.in_channels == 3
    images = draw(pixel_pipe)
    assert images.shape == (1, 32, 32, 3)  # no VAE: the UNet's sample_size is the image size
    assert np.isfinite(images).all()
    pixel_pipe.save_pretrained(tmp_path / "pipe")
    loaded = MPMPaintPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.vae is None
    np.testing.assert_array_equal(draw(loaded), images)


# -- bad input -------------------------------------------------------------------------------------------------------
def test_empty_prompt_list_is_an_error(sd_pipe):
    with pytest.raises(ValueError, match="`prompt` is an empty list") as error:
        draw(sd_pipe, prompt=[])
    assert error.type is ConfigError  # a UserError: the CLI prints it as one line


def test_prompt_and_prompt_embeds_together_is_an_error(sd_pipe):
    embeds, _, _ = sd_pipe.encode_prompt(["a red cat"])
    with pytest.raises(ConfigError, match="either `prompt` or `prompt_embeds`, not both"):
        draw(sd_pipe, prompt="a red cat", prompt_embeds=embeds)
    with pytest.raises(ConfigError, match="not both and not neither"):
        draw(sd_pipe, prompt=None)


def test_size_must_be_a_multiple_of_vae_factor_times_unet_downsampling(sd_pipe):
    assert sd_pipe.size_multiple == 4  # VAE factor 2 x one downsampling of the UNet
    with pytest.raises(ConfigError, match=r"`height` must be a positive multiple of 4 .* got 18"):
        draw(sd_pipe, height=18, width=16)
    with pytest.raises(ConfigError, match=r"`width` must be a positive multiple of 4 .* got 14"):
        draw(sd_pipe, height=16, width=14)
    # A valid size is drawn as asked: 12 is not rounded to 16, and height and width are not swapped.
    assert draw(sd_pipe, height=12, width=12).shape == (1, 12, 12, 3)
    assert draw(sd_pipe, height=8, width=20).shape == (1, 8, 20, 3)


def test_negative_guidance_scale_is_an_error(sd_pipe):
    with pytest.raises(ConfigError, match=r"`guidance_scale` must be >= 0.*got -1"):
        draw(sd_pipe, guidance_scale=-1.0)


def test_guidance_at_most_one_runs_a_single_unet_pass(sd_pipe):
    with UNetBatches(sd_pipe.unet) as seen:
        draw(sd_pipe, guidance_scale=1.0)
    assert seen.sizes == [1] * STEPS  # no unconditional branch: the batch is not doubled
    with UNetBatches(sd_pipe.unet) as seen:
        draw(sd_pipe, guidance_scale=0.0)
    assert seen.sizes == [1] * STEPS
    with UNetBatches(sd_pipe.unet) as seen:
        draw(sd_pipe, guidance_scale=7.5)
    assert seen.sizes == [2] * STEPS  # unconditional and conditional together
    with UNetBatches(sd_pipe.unet) as seen:
        draw(sd_pipe, prompt=["a", "b"], guidance_scale=7.5, num_images_per_prompt=2, generator=None)
    assert seen.sizes == [8] * STEPS


def test_long_prompt_is_cut_to_max_length_with_a_warning(sd_pipe, caplog):
    pipe = rebuild(sd_pipe, TextProjection(64, 64, max_length=8))
    long = "a red cat wearing a small hat sits on a green mat under a tall blue tree " * 4
    assert len(pipe.tokenizer(long)["input_ids"]) > 8
    with caplog.at_level(logging.WARNING, logger="t2i.pipeline"):
        embeds, mask, _ = pipe.encode_prompt([long, "cat"])
    assert embeds.shape[:2] == mask.shape == (2, 8)  # the end token kept within max_length
    assert mask[0].tolist() == [1] * 8
    assert "1 prompt(s) longer than 8 tokens were cut" in caplog.text
    uncut, _, _ = sd_pipe.encode_prompt([long])  # max_length 128: the whole prompt
    assert uncut.shape[1] > 8
    torch.testing.assert_close(embeds[0, :7], uncut[0, :7])  # the first tokens are kept (then the end token)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="t2i.pipeline"):
        images = draw(pipe, prompt=long)
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
    assert "longer than 8 tokens were cut" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="t2i.pipeline"):
        pipe.encode_prompt(["a red cat"])
    assert "were cut" not in caplog.text  # a short prompt is not reported


def test_llm_width_must_match_text_proj(sd_pipe):
    parts = {"unet": sd_pipe.unet, "scheduler": sd_pipe.scheduler, "vae": sd_pipe.vae}
    wrong = TextProjection(in_features=32, out_features=64)
    with pytest.raises(ConfigError, match=r"text_proj reads 32-wide LLM states but the LLM \(qwen2\) is 64 wide"):
        MPMPaintPipeline(sd_pipe.text_encoder, sd_pipe.tokenizer, wrong, **parts)
    wrong_out = TextProjection(in_features=64, out_features=32)
    with pytest.raises(ConfigError, match="UNet's cross_attention_dim is 64"):
        MPMPaintPipeline(sd_pipe.text_encoder, sd_pipe.tokenizer, wrong_out, **parts)
    with pytest.raises(ConfigError, match=r"the UNet takes 4 channels but the images \(no VAE: pixel space\) have 3"):
        MPMPaintPipeline(sd_pipe.text_encoder, sd_pipe.tokenizer, TextProjection(64, 64), **{**parts, "vae": None})


# -- conditioning ----------------------------------------------------------------------------------------------------
def test_prompt_embeds_give_the_same_image_as_the_prompt(sd_pipe):
    embeds, _, _ = sd_pipe.encode_prompt(["a red cat"])
    negative, _, _ = sd_pipe.encode_prompt([""])
    assert negative.shape[1] < embeds.shape[1]  # the unconditional branch is padded to the prompt's length
    from_prompt = draw(sd_pipe, prompt="a red cat")
    from_embeds = draw(sd_pipe, prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative)
    np.testing.assert_allclose(from_embeds, from_prompt, atol=1e-5)
    other = sd_pipe.encode_prompt(["a blue dog on the grass"])[0]
    assert not np.allclose(draw(sd_pipe, prompt=None, prompt_embeds=other), from_prompt, atol=1e-3)
    with pytest.raises(ConfigError, match=r"`prompt_embeds` must be \(batch, tokens, 64\)"):
        draw(sd_pipe, prompt=None, prompt_embeds=embeds[..., :32])


def test_hidden_layer_chooses_the_llm_states(sd_pipe):
    llm, tok = sd_pipe.text_encoder, sd_pipe.tokenizer
    prompts = ["a red cat", "一只戴着红帽子的猫"]
    ids, mask, _ = tokenize_prompts(tok, prompts, 128)
    with torch.no_grad():
        hidden = llm(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        token_embeddings = llm.get_input_embeddings()(ids)
    assert len(hidden) == llm.config.num_hidden_layers + 1 == 3
    encoded = {}
    for layer in (0, 1, -2, -1):
        pipe = rebuild(sd_pipe, TextProjection(64, 64, hidden_layer=layer))
        sequence, got_mask, _ = pipe.encode_prompt(prompts)
        assert torch.equal(got_mask, mask)
        with torch.no_grad():
            expected = pipe.text_proj(token_embeddings if layer == 0 else hidden[layer], mask)[0]
        torch.testing.assert_close(sequence, expected)
        encoded[layer] = sequence
    torch.testing.assert_close(encoded[1], encoded[-2])  # with 2 layers: 1 and -2 are the same state
    real = mask.bool()
    assert not torch.allclose(encoded[-2][real], encoded[-1][real], atol=1e-3)
    assert not torch.allclose(encoded[0][real], encoded[-1][real], atol=1e-3)


@pytest.mark.parametrize("layer", [3, -4, 100])
def test_hidden_layer_out_of_range_is_an_error(sd_pipe, paint_llm, layer):
    with pytest.raises(ConfigError, match=f"text_proj.hidden_layer {layer} is out of range for an LLM with 2 layers"):
        rebuild(sd_pipe, TextProjection(64, 64, hidden_layer=layer))
    if layer == 3:
        with pytest.raises(ConfigError, match="is out of range"):
            MPMPaintPipeline.from_parts(paint_llm, unet=UNET_CONFIG, hidden_layer=layer)


def test_pooled_conditioning_starts_at_zero_and_then_counts(paint_llm, sd_folder, sd_pipe):
    pooled = MPMPaintPipeline.from_parts(paint_llm, sd=sd_folder, pooled=True)
    pooled.set_progress_bar_config(disable=True)
    pooled.text_proj.load_state_dict(sd_pipe.text_proj.state_dict())  # the same bridge as the plain pipeline
    assert pooled.text_proj.config.pooled
    assert pooled.unet.config.class_embed_type == "projection"
    assert pooled.unet.config.projection_class_embeddings_input_dim == 64
    assert sd_pipe.unet.class_embedding is None
    # The pretrained UNet's weights are all kept; only the new class embedding was added.
    plain_state = sd_pipe.unet.state_dict()
    for name, value in pooled.unet.state_dict().items():
        if not name.startswith("class_embedding."):
            assert torch.equal(value, plain_state[name]), name
    sequence, mask, vector = pooled.encode_prompt(["a red cat", "cat"])
    assert vector.shape == (2, 64)
    torch.testing.assert_close(vector, sequence[torch.arange(2), mask.sum(1) - 1])  # each prompt's last token
    with torch.no_grad():
        assert pooled.unet.class_embedding(vector).abs().max() == 0  # zero-initialised: adds nothing yet

    plain_images = draw(sd_pipe)
    np.testing.assert_allclose(draw(pooled), plain_images, atol=1e-6)
    with pytest.raises(ConfigError, match="give `pooled_prompt_embeds` with `prompt_embeds`"):
        draw(pooled, prompt=None, prompt_embeds=sequence[:1])

    with torch.no_grad():
        torch.nn.init.normal_(pooled.unet.class_embedding.linear_2.weight, std=1.0)
    assert not np.allclose(draw(pooled), plain_images, atol=1e-3)


def test_scheduler_can_be_swapped(sd_pipe):
    ddpm = sd_pipe.scheduler
    assert isinstance(ddpm, DDPMScheduler)
    ddpm_images = draw(sd_pipe)
    sd_pipe.scheduler = DPMSolverMultistepScheduler.from_config(ddpm.config)
    try:
        images = draw(sd_pipe)
        assert isinstance(sd_pipe.scheduler, DPMSolverMultistepScheduler)
        assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
        assert not np.allclose(images, ddpm_images, atol=1e-3)  # the new scheduler did the sampling
    finally:
        sd_pipe.scheduler = ddpm


def test_several_prompts_and_images_per_prompt_with_a_generator_list(sd_pipe):
    prompts = ["a red cat", "一只戴着红帽子的猫"]
    generators = [torch.Generator().manual_seed(s) for s in range(4)]
    images = draw(sd_pipe, prompt=prompts, num_images_per_prompt=2, generator=generators)
    assert images.shape == (4, 16, 16, 3)
    # Images come prompt by prompt, and image k is seeded by its own generator: the second prompt's images redraw
    # alone with generators 2 and 3, whatever else was in the batch.
    alone = draw(
        sd_pipe,
        prompt=prompts[1],
        num_images_per_prompt=2,
        generator=[torch.Generator().manual_seed(s) for s in (2, 3)],
    )
    np.testing.assert_allclose(alone, images[2:], atol=1e-4)
    assert not np.allclose(images[0], images[1], atol=1e-3)
    pils = sd_pipe(prompts, num_inference_steps=STEPS, num_images_per_prompt=2).images
    assert len(pils) == 4 and all(im.size == (16, 16) for im in pils)


def test_padded_prompt_embeds_with_their_mask_give_the_prompts_images(sd_pipe):
    prompts = ["a cat", "a red cat sitting on a mat in the sun"]
    embeds, mask, _ = sd_pipe.encode_prompt(prompts)
    negative, negative_mask, _ = sd_pipe.encode_prompt(["", ""])
    assert mask[0].sum() < mask.shape[1]  # the short prompt is padded
    generators = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    from_prompts = draw(sd_pipe, prompt=prompts, generator=generators())
    from_embeds = draw(sd_pipe, prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask,
                       negative_prompt_embeds=negative, negative_prompt_attention_mask=negative_mask,
                       generator=generators())  # fmt: skip
    np.testing.assert_allclose(from_embeds, from_prompts, atol=1e-5)
    with pytest.raises(ConfigError, match="an attention mask must be"):
        draw(sd_pipe, prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask[:, :2])


def test_pooled_embeds_on_a_pipeline_without_a_pooled_vector_and_wrong_latents_are_errors(sd_pipe):
    embeds, _, _ = sd_pipe.encode_prompt(["a cat"])
    with pytest.raises(ConfigError, match="adds no pooled vector"):
        draw(sd_pipe, prompt=None, prompt_embeds=embeds, pooled_prompt_embeds=embeds[:, 0])
    with pytest.raises(ConfigError, match="`latents` must be"):
        draw(sd_pipe, latents=torch.zeros(1, 4, 3, 3))


def test_the_default_scheduler_does_not_clip_latents_and_bin_weights_are_refused(tmp_path):
    from diffusers import UNet2DConditionModel

    from mpm.core.errors import ModelLoadError
    from t2i.pipeline import load_scheduler, load_unet

    assert load_scheduler(None).config.clip_sample is False  # VAE latents exceed [-1, 1]
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(UNET_CONFIG))
    unet.save_pretrained(tmp_path / "unet", safe_serialization=False)  # pickled weights only
    with pytest.raises(ModelLoadError, match="holds only pickled .bin weights"):
        load_unet(tmp_path / "unet")
