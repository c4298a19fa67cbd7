"""GPU: the text-to-image model at Stable Diffusion 2.1-base's shapes, beside diffusers' own way on the same UNet.

    bash benchmarks/gpu_t2i.sh                                   # on a GPU machine (carries the diffusers wheel)
    PYTHON=.venv/bin/python bash benchmarks/gpu_t2i.sh --tiny    # tiny shapes on a CPU, a few steps: checks the script

Random-initialised parts (no downloads): a UNet2DConditionModel with SD 2.1-base's config (865M parameters, 64x64
latents for 512 px images), an AutoencoderKL shaped like SD's (84M), an LLM shaped like Qwen2.5-0.5B (24 layers x
896, 14 heads / 2 KV heads, 151,936-word vocabulary, bf16, frozen), `TextProjection` 896 -> 1024, a BPE tokenizer
trained in memory, captions of 10-60 words, DDIM with SD's schedule. bf16 autocast over fp32 trained weights.

Training, images/s (batch 8, stage full: the UNet and text_proj train, gradient checkpointing, AdamW fused, gradient
clipping, no EMA):
    recipe, live LLM         `t2i.recipe.diffusion_loss` (VAE encode, noise, the LLM on the captions, text_proj,
                             masked cross-attention, min-SNR 5) + backward + clip + AdamW: `mpm train t2i`'s step
    recipe, cached features  the same with the LLM's states read per sample from host memory, as with
                             `data.text_feature_cache`
    diffusers' standard      train_text_to_image.py's step (--snr_gamma 5): text features fed straight to the UNet,
                             (batch, 77, 1024) computed once, no mask, no text_proj
Sampling, seconds per image (50 DDIM steps, guidance 7.5, 4 prompts a call, VAE decode, output tensors):
    MPMPaintPipeline(prompts)                the LLM encodes the prompts in every call
    MPMPaintPipeline(prompt_embeds=...)      features given: the text encoder out of the measurement
    StableDiffusionPipeline(prompt_embeds=...)  diffusers' own pipeline on the SAME UNet, VAE and scheduler, its
                                             text_encoder None: the text encoder is out of the measurement
Variants alternate in blocks (A B C, then C B A, ...) so drift hits all; medians. A watchdog ends the process with
a traceback after --timeout seconds rather than hanging. Results: --out (JSON).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = (  # noqa: SIM905 (one line of words reads better than a list of 57 strings)
    "cat dog house tree river mountain red blue green yellow small large old new wooden metal bright dark soft round "
    "tall short near under beside with a the of on in photo painting city street sky cloud sun moon flower garden "
    "table chair window door road car boat bird fish horse field forest snow rain night"
).split()


def tokenizer_in_memory():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def build(tiny: bool, device, llm_dtype):
    """The parts, random weights, built on the device: (pipe, shapes dict)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from t2i.pipeline import MPMPaintPipeline, TextProjection

    if tiny:
        unet_config = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                           attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8)  # fmt: skip
        vae_config = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=16)
        llm_config = Qwen2Config(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    else:  # stabilityai/stable-diffusion-2-1-base's unet/config.json and vae/config.json; Qwen/Qwen2.5-0.5B's config
        unet_config = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                           block_out_channels=(320, 640, 1280, 1280),
                           down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                           up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=1024,
                           attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, norm_num_groups=32)  # fmt: skip
        vae_config = dict(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512
        )
        llm_config = Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32_768,
                                 rope_theta=1_000_000.0, tie_word_embeddings=True)  # fmt: skip
    blocks = len(vae_config["block_out_channels"])
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * blocks,
                            up_block_types=("UpDecoderBlock2D",) * blocks, scaling_factor=0.18215, **vae_config)  # fmt: skip
        llm = Qwen2ForCausalLM(llm_config).to(llm_dtype)
        text_proj = TextProjection(llm_config.hidden_size, unet_config["cross_attention_dim"], -1, 128)
    llm.requires_grad_(False).eval()
    vae.requires_grad_(False).eval()
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")  # fmt: skip
    pipe = MPMPaintPipeline(llm, tokenizer_in_memory(), text_proj, unet, scheduler, vae)
    pipe.set_progress_bar_config(disable=True)
    count = lambda m: round(sum(p.numel() for p in m.parameters()) / 1e6, 1)  # noqa: E731
    shapes = {"unet_m": count(unet), "vae_m": count(vae), "llm_m": count(llm), "text_proj_m": count(text_proj),
              "image_px": unet_config["sample_size"] * pipe.vae_scale_factor, "latent": unet_config["sample_size"]}  # fmt: skip
    return pipe, shapes


def captions(n: int, rng: random.Random) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60))) for _ in range(n)]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# -- training ---------------------------------------------------------------------------------------------------------
def training(pipe, args, device, compute_dtype) -> dict:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from t2i.pipeline import llm_states, tokenize_prompts
    from t2i.recipe import diffusion_loss

    unet, vae, text_proj, llm, tokenizer = pipe.unet, pipe.vae, pipe.text_proj, pipe.text_encoder, pipe.tokenizer
    unet.train().enable_gradient_checkpointing()
    text_proj.train()
    params = [*unet.parameters(), *text_proj.parameters()]
    optimizer = torch.optim.AdamW(params, lr=2e-5, weight_decay=1e-2, fused=device.type == "cuda")
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    autocast = torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)
    rng = random.Random(0)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    batches = [
        {"pixels": torch.rand(args.batch, 3, size, size) * 2 - 1, "captions": captions(args.batch, rng)}
        for _ in range(4)
    ]  # host tensors, moved to the device inside each step as the recipe's DataLoader batches are
    for batch in batches:  # the cached LLM states of each caption (host memory, as the cache's files give them)
        ids, mask, _ = tokenize_prompts(tokenizer, batch["captions"], text_proj.config.max_length)
        with torch.no_grad():
            states = llm_states(llm, ids.to(device), mask.to(device), -1)
        batch["states"] = [s[: int(m.sum())].cpu() for s, m in zip(states, mask)]
    ids, mask, _ = tokenize_prompts(tokenizer, [""], text_proj.config.max_length)
    with torch.no_grad():
        empty_states = llm_states(llm, ids.to(device), mask.to(device), -1)[0]  # a dropped caption's states
    live = (llm, tokenizer, text_proj, None)
    cached = (llm, tokenizer, text_proj, empty_states)
    fixed_text = torch.randn(args.batch, 77, unet.config.cross_attention_dim, device=device)  # CLIP-like, 77 tokens

    def recipe_step(batch, encoders):
        with autocast:
            loss_sum, count = diffusion_loss(batch, unet, text_proj, vae, encoders, alphas_cumprod, "epsilon", 5.0, 0.0,
                                             device)  # fmt: skip
        (loss_sum / count).backward()

    def diffusers_step(batch):  # examples/text_to_image/train_text_to_image.py, --snr_gamma 5, features given
        with autocast:
            with torch.no_grad():
                latents = vae.encode(batch["pixels"].to(device)).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), device=device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            prediction = unet(noisy, timesteps, fixed_text, return_dict=False)[0]
            snr = compute_snr(noise_scheduler, timesteps)
            weights = torch.stack([snr, 5.0 * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / snr
            loss = torch.nn.functional.mse_loss(prediction.float(), noise.float(), reduction="none")
            loss = (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()
        loss.backward()

    variants = {
        "recipe, live LLM": lambda b: recipe_step({"pixels": b["pixels"], "captions": b["captions"]}, live),
        "recipe, cached text features": lambda b: recipe_step(b, cached),
        "diffusers' standard step": diffusers_step,
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    memory: dict[str, float] = {}
    step = 0
    for round_ in range(-1, args.rounds):  # round -1: warm-up, not timed
        names = list(variants) if round_ % 2 else list(variants)[::-1]
        for name in names:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for _ in range(args.warmup if round_ < 0 else args.steps):
                batch = batches[step % len(batches)]
                step += 1
                sync(device)
                start = time.perf_counter()
                variants[name](batch)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                sync(device)
                if round_ >= 0:
                    times[name].append(time.perf_counter() - start)
            if round_ < 0 and device.type == "cuda":
                memory[name] = torch.cuda.max_memory_allocated() / 2**30
        if round_ >= 0:
            print(f"[training round {round_ + 1}/{args.rounds}] " + ", ".join(
                f"{n} {args.batch / statistics.median(t[-args.steps:]):.2f} img/s" for n, t in times.items()), flush=True)  # fmt: skip
    unet.disable_gradient_checkpointing()
    del optimizer
    result = {}
    for name, t in times.items():
        step_s = statistics.median(t)
        result[name] = {"images_per_s": args.batch / step_s, "step_s": step_s, "peak_memory_gb": memory.get(name)}
    return result


# -- sampling ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sampling(pipe, args, device, compute_dtype) -> dict:
    from diffusers import StableDiffusionPipeline

    pipe.unet.eval().to(compute_dtype)
    pipe.vae.to(compute_dtype)
    pipe.text_proj.eval().to(compute_dtype)
    sd = StableDiffusionPipeline(vae=pipe.vae, text_encoder=None, tokenizer=None, unet=pipe.unet, scheduler=pipe.scheduler,
                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    sd.set_progress_bar_config(disable=True)
    prompts = captions(args.prompts, random.Random(1))
    embeds = pipe.encode_prompt(prompts)[0]  # the given features: the prompts' own (tokens, 1024)
    uncond = pipe.encode_prompt([""] * len(prompts))[0]
    embeds = (
        torch.nn.functional.pad(embeds, (0, 0, 0, 77 - embeds.shape[1])) if embeds.shape[1] < 77 else embeds[:, :77]
    )
    uncond = torch.nn.functional.pad(uncond, (0, 0, 0, embeds.shape[1] - uncond.shape[1]))
    common = {"num_inference_steps": args.sample_steps, "guidance_scale": 7.5, "output_type": "pt"}

    def generator(seed):
        return torch.Generator(device=device).manual_seed(seed)

    variants = {
        "MPMPaintPipeline(prompts)": lambda s: pipe(prompts, generator=generator(s), **common).images,
        "MPMPaintPipeline(prompt_embeds)": lambda s: (
            pipe(prompt_embeds=embeds, negative_prompt_embeds=uncond, generator=generator(s), **common).images
        ),  # fmt: skip
        "StableDiffusionPipeline(prompt_embeds)": lambda s: (
            sd(prompt_embeds=embeds, negative_prompt_embeds=uncond, generator=generator(s), **common).images
        ),  # fmt: skip
    }
    first = {name: draw(0) for name, draw in variants.items()}  # warm-up
    difference = (
        first["MPMPaintPipeline(prompt_embeds)"].float() - first["StableDiffusionPipeline(prompt_embeds)"].float()
    )
    difference = difference.abs().max().item()
    print(f"same features, same noise: MPMPaintPipeline vs StableDiffusionPipeline images differ by at most {difference:.4f} "
          "(0..1 scale; the MPM pipeline passes an all-ones cross-attention mask)", flush=True)  # fmt: skip
    if args.tiny and difference > 1e-3:
        raise SystemExit("the two pipelines draw different images from the same features and noise")
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name in list(variants) if round_ % 2 == 0 else list(variants)[::-1]:
            sync(device)
            start = time.perf_counter()
            variants[name](round_ + 1)
            sync(device)
            times[name].append((time.perf_counter() - start) / len(prompts))
        print(f"[sampling round {round_ + 1}/{args.rounds}] "
              + ", ".join(f"{n} {t[-1]:.3f} s/img" for n, t in times.items()), flush=True)  # fmt: skip
    result = {name: {"seconds_per_image": statistics.median(t)} for name, t in times.items()}
    result["max_image_difference_mpm_vs_sd"] = difference
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # not "modules that should be kept in float32: []" for each bf16 cast
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU, a few steps: checks the script")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default 8; tiny 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps per variant and round")
    parser.add_argument("--warmup", type=int, default=None, help="untimed training steps per variant first")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (training and sampling)")
    parser.add_argument("--sample-steps", type=int, default=None, help="sampling steps (default 50; tiny 3)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per sampling call")
    parser.add_argument("--timeout", type=float, default=330, help="end the process (with a traceback) after this")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    faulthandler.dump_traceback_later(args.timeout, exit=True)  # fail loudly, never hang
    started = time.perf_counter()
    args.batch = args.batch or (2 if args.tiny else 8)
    args.steps = args.steps or (2 if args.tiny else 8)
    args.warmup = args.warmup or (1 if args.tiny else 3)
    args.sample_steps = args.sample_steps or (3 if args.tiny else 50)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny to check the script on a CPU")
    device = torch.device("cpu" if args.tiny else "cuda")
    compute_dtype = torch.float32 if args.tiny else torch.bfloat16
    import diffusers
    import transformers

    header = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "transformers": transformers.__version__, "diffusers": diffusers.__version__,
              "diffusers_from": str(Path(diffusers.__file__).parent), "compute_dtype": str(compute_dtype),
              "batch": args.batch, "sample_steps": args.sample_steps, "prompts": args.prompts}  # fmt: skip
    print(json.dumps(header), flush=True)
    pipe, shapes = build(args.tiny, device, torch.float32 if args.tiny else torch.bfloat16)
    print(json.dumps(shapes), flush=True)
    results = {**header, "shapes": shapes}
    results["training"] = training(pipe, args, device, compute_dtype)
    results["sampling"] = sampling(pipe, args, device, compute_dtype)
    train, sample = results["training"], results["sampling"]
    base = train["diffusers' standard step"]["images_per_s"]
    print(f"\ntraining, batch {args.batch}, {shapes['image_px']} px, median of {args.rounds} x {args.steps} steps:")
    for name, row in train.items():
        memory = f"{row['peak_memory_gb']:.1f} GB" if row["peak_memory_gb"] is not None else "-"
        print(f"  {name:<32} {row['images_per_s']:>8.2f} img/s  {row['images_per_s'] / base:>6.3f}x diffusers  "
              f"peak {memory}")  # fmt: skip
    sd = sample["StableDiffusionPipeline(prompt_embeds)"]["seconds_per_image"]
    print(
        f"sampling, {args.sample_steps} DDIM steps, guidance 7.5, {args.prompts} prompts a call, median of {args.rounds}:"
    )
    for name, row in sample.items():
        if isinstance(row, dict):
            print(
                f"  {name:<40} {row['seconds_per_image']:>7.3f} s/img  {sd / row['seconds_per_image']:>6.3f}x diffusers"
            )
    results["wall_s"] = time.perf_counter() - started
    print(f"total {results['wall_s']:.0f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"written: {args.out}")
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
