"""The text-to-image recipe: its maths against the formulas, the text-feature cache, what trains per stage, training
through the real CLI on shards written by the sharder, exact resume, bad samples, LoRA, the shipped configs."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import webdataset as wds
from diffusers import DDPMScheduler
from PIL import Image
from safetensors.torch import load_file

from mpm.cli import main
from mpm.core.config import load_config
from mpm.core.errors import ConfigError
from t2i import MPMPaintPipeline
from t2i.cache import TextFeatureCache, build_cache
from t2i.config import T2IConfig
from t2i.data import PairImages, collate
from t2i.pipeline import llm_states, tokenize_prompts
from t2i.recipe import add_noise, build_pipeline, diffusion_loss, make_ema, min_snr_weights, set_trainable, v_target

REPO = Path(__file__).parents[2]
TINY = str(REPO / "configs" / "t2i" / "tiny.yaml")
CONFIGS = sorted((REPO / "configs" / "t2i").glob("*.yaml"))


def tiny_config(llm, shards, out, *overrides) -> T2IConfig:
    base = [f"model.llm={llm}", f"data.shards=[{shards}]", f"train.output_dir={out}", "validation.every=0"]
    return load_config(T2IConfig, TINY, None, [*base, *overrides])


def cli(llm, shards, out, *overrides) -> list[str]:
    return ["train", "t2i", "--config", TINY, "--no-progress", f"model.llm={llm}", f"data.shards=[{shards}]",
            f"train.output_dir={out}", *overrides]  # fmt: skip


def first_batch(cfg: T2IConfig, cache=None, size: int = 8) -> dict:
    d = cfg.data
    stream = PairImages(
        d.shards, None, d.resolution, d.center_crop, d.random_flip, d.caption_dropout, 0, 0, cache=cache
    )
    items = []
    for item in stream:
        items.append(item)
        if len(items) == size:
            return collate(items)
    raise AssertionError("the shards hold fewer samples than a batch")


def loss_on(pipe, batch, noise, timesteps, cache_empty=None, prediction="epsilon", snr_gamma=5.0) -> float:
    alphas = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    encoders = (pipe.text_encoder, pipe.tokenizer, pipe.text_proj, cache_empty)
    with torch.no_grad():
        total, count = diffusion_loss(batch, pipe.unet, pipe.text_proj, pipe.vae, encoders, alphas, prediction,
                                      snr_gamma, 0.0, "cpu", noise=noise, timesteps=timesteps)  # fmt: skip
    return float(total) / count


# -- the maths --------------------------------------------------------------------------------------------------------
def test_noise_v_target_and_min_snr_weights_follow_their_formulas():
    alphas = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    a = alphas[t].view(4, 1, 1, 1)
    assert torch.allclose(add_noise(x0, noise, alphas, t), a.sqrt() * x0 + (1 - a).sqrt() * noise)
    assert torch.allclose(v_target(x0, noise, alphas, t), a.sqrt() * noise - (1 - a).sqrt() * x0)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.allclose(add_noise(x0, noise, alphas, t), scheduler.add_noise(x0, noise, t), atol=1e-6)
    assert torch.allclose(v_target(x0, noise, alphas, t), scheduler.get_velocity(x0, noise, t), atol=1e-6)

    snr = alphas[t] / (1 - alphas[t])
    eps_w, v_w = min_snr_weights(alphas, t, 5.0, "epsilon"), min_snr_weights(alphas, t, 5.0, "v_prediction")
    for i in range(4):  # min(snr, 5) / snr for epsilon, min(snr, 5) / (snr + 1) for v
        assert eps_w[i].item() == pytest.approx(min(snr[i].item(), 5.0) / snr[i].item(), rel=1e-5)
        assert v_w[i].item() == pytest.approx(min(snr[i].item(), 5.0) / (snr[i].item() + 1), rel=1e-5)
    assert eps_w[0] < 1e-2 and eps_w[3] == pytest.approx(1.0)  # low noise (high snr) down-weighted, high noise kept


def test_ema_follows_its_formula():
    param = torch.nn.Parameter(torch.zeros(3))
    ema = make_ema([param], decay=0.5)
    shadow = param.detach().clone()
    for n, value in enumerate([1.0, 2.0, 4.0, 8.0], start=1):
        with torch.no_grad():
            param.fill_(value)
        ema.step([param])
        decay = 0.0 if n == 1 else min(0.5, n / (n + 9))  # no averaging at the first step, then warming up to 0.5
        shadow = decay * shadow + (1 - decay) * param.detach()
        assert torch.allclose(ema.shadow_params[0], shadow), n


# -- the text-feature cache ---------------------------------------------------------------------------------------
def test_cached_features_give_the_live_loss_with_caption_dropout(paint_llm, paint_shards, tmp_path):
    cfg = tiny_config(paint_llm, paint_shards, tmp_path / "run", "data.caption_dropout=0.5", "model.pooled=true")
    torch.manual_seed(0)
    pipe = build_pipeline(cfg)
    cache = build_cache(tmp_path / "cache", cfg.data.shards, pipe.text_encoder, pipe.tokenizer, pipe.text_proj.config,
                        "cpu", show_progress=False)  # fmt: skip
    live, cached = first_batch(cfg), first_batch(cfg, cache)
    assert live["captions"] == cached["captions"]
    dropped = [c == "" for c in live["captions"]]
    assert any(dropped) and not all(dropped)  # some captions dropped, the same ones in both
    assert [s is None for s in cached["states"]] == dropped
    assert torch.equal(live["pixels"], cached["pixels"])
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(live["pixels"].shape, generator=g)
    timesteps = torch.randint(0, 1000, (len(noise),), generator=g)
    a = loss_on(pipe, live, noise, timesteps)
    b = loss_on(pipe, cached, noise, timesteps, cache_empty=cache.empty())
    assert a == pytest.approx(b, rel=1e-5)
    # the cache is what a rerun reads: reopening gives the same states
    again = TextFeatureCache(tmp_path / "cache")
    assert torch.equal(again.empty(), cache.empty())


def test_a_shard_that_changed_is_encoded_again(paint_llm, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()

    def write(captions):
        with wds.TarWriter(str(shards / "00000.tar")) as tar:
            for i, caption in enumerate(captions):
                buf = io.BytesIO()
                Image.new("RGB", (32, 32), (200, 20 * i, 30)).save(buf, "PNG")
                tar.write({"__key__": f"{i:09d}", "png": buf.getvalue(), "txt": caption})

    write(["red", "green"])
    cfg = tiny_config(paint_llm, shards, tmp_path / "run")
    pipe = build_pipeline(cfg)
    args = (tmp_path / "cache", cfg.data.shards, pipe.text_encoder, pipe.tokenizer, pipe.text_proj.config, "cpu")
    build_cache(*args, show_progress=False)
    write(["a much longer caption about a red picture", "green"])  # re-sharded into the same folder: same keys
    cache = build_cache(*args, show_progress=False)
    ids, mask, _ = tokenize_prompts(pipe.tokenizer, ["a much longer caption about a red picture"], 32)
    with torch.no_grad():
        live = llm_states(pipe.text_encoder, ids, mask, -1)[0]
    assert torch.equal(cache.get(str(shards / "00000.tar"), "000000000"), live)


def test_a_resampled_stream_draws_new_choices_when_a_sample_comes_back(paint_llm, paint_shards, tmp_path):
    cfg = tiny_config(paint_llm, paint_shards, tmp_path / "run", "data.caption_dropout=0.5")
    d = cfg.data
    stream = PairImages(d.shards, None, d.resolution, True, True, 0.5, 0, 0, resampled=True)
    dropped: dict[str, list[bool]] = {}
    for _, item in zip(range(300), stream):
        dropped.setdefault(item.key, []).append(item.caption == "")
    back = {key: seen for key, seen in dropped.items() if len(seen) > 2}  # 96 samples: most come back
    assert len(back) > 20
    # a sample's caption is dropped some times and kept others (not fixed once per sample for the whole run)
    assert sum(len(set(seen)) == 2 for seen in back.values()) > len(back) / 2


def test_a_cache_made_with_other_settings_is_refused(paint_llm, paint_shards, tmp_path):
    cfg = tiny_config(paint_llm, paint_shards, tmp_path / "run")
    pipe = build_pipeline(cfg)
    folder = tmp_path / "cache"
    build_cache(
        folder, cfg.data.shards, pipe.text_encoder, pipe.tokenizer, pipe.text_proj.config, "cpu", show_progress=False
    )
    with pytest.raises(ConfigError, match="another hidden layer \\(-1; this run: -2\\)"):
        pipe.text_proj.register_to_config(hidden_layer=-2)
        build_cache(folder, cfg.data.shards, pipe.text_encoder, pipe.tokenizer, pipe.text_proj.config, "cpu")
    pipe.text_proj.register_to_config(hidden_layer=-1, max_length=16)
    with pytest.raises(ConfigError, match="another maximum length \\(32; this run: 16\\)"):
        build_cache(folder, cfg.data.shards, pipe.text_encoder, pipe.tokenizer, pipe.text_proj.config, "cpu")
    pipe.text_proj.register_to_config(max_length=32)
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().weight[0, 0] += 1.0  # the same folder, retrained
    with pytest.raises(ConfigError, match="another LLM .*use a new folder"):
        build_cache(folder, cfg.data.shards, pipe.text_encoder, pipe.tokenizer, pipe.text_proj.config, "cpu")


# -- what trains --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage", ["align", "full", "lora"])
def test_which_parameters_receive_gradients_in_each_stage(paint_llm, paint_shards, tmp_path, stage):
    overrides = ["train.stage=full", "train.lora.enabled=true"] if stage == "lora" else [f"train.stage={stage}"]
    cfg = tiny_config(paint_llm, paint_shards, tmp_path / "run", "model.pooled=true", *overrides)
    pipe = build_pipeline(cfg)
    trained = set_trainable(pipe.unet, pipe.text_proj, cfg.train)
    names = {n for n, _ in trained}
    batch = first_batch(cfg, size=4)
    alphas = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    encoders = (pipe.text_encoder, pipe.tokenizer, pipe.text_proj, None)
    loss, _ = diffusion_loss(batch, pipe.unet, pipe.text_proj, None, encoders, alphas, "epsilon", None, 0.0, "cpu")
    loss.backward()
    graded = {n for n, p in pipe.unet.named_parameters() if p.grad is not None}
    graded |= {n for n, p in pipe.text_proj.named_parameters() if p.grad is not None}
    assert graded == names
    assert not any(p.requires_grad or p.grad is not None for p in pipe.text_encoder.parameters())  # the LLM: frozen
    assert {"linear.weight", "norm.weight", "norm.bias"} <= names  # text_proj always trains
    unet_names = names - {"linear.weight", "norm.weight", "norm.bias"}
    if stage == "align":  # the cross-attention keys/values and the pooled vector's embedding, nothing else
        assert unet_names and all(
            ".attn2.to_k." in n or ".attn2.to_v." in n or n.startswith("class_embedding.") for n in unet_names
        )
        assert any(".attn2.to_k." in n for n in unet_names) and any(
            n.startswith("class_embedding.") for n in unet_names
        )
    elif stage == "full":
        assert unet_names == {n for n, _ in pipe.unet.named_parameters()}
    else:
        lora = {n for n in unet_names if "lora_" in n}
        assert lora and unet_names - lora == {
            n for n, _ in pipe.unet.class_embedding.named_parameters(prefix="class_embedding")
        }


# -- training through the CLI ---------------------------------------------------------------------------------------
def test_training_through_the_cli_lowers_the_loss_and_paints(paint_llm, paint_shards, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tiny_config(paint_llm, paint_shards, out)
    torch.manual_seed(cfg.train.seed)  # as the recipe builds it: the same initial weights
    before_pipe = build_pipeline(cfg)
    batch = first_batch(cfg)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(batch["pixels"].shape, generator=g)
    timesteps = torch.randint(0, 1000, (len(noise),), generator=g)
    before = loss_on(before_pipe, batch, noise, timesteps)

    args = cli(paint_llm, paint_shards, out, "train.max_steps=30", "train.ema.enabled=false", "validation.every=15")
    assert main(args) == 0
    assert "final pipeline in" in capsys.readouterr().out
    after = loss_on(MPMPaintPipeline.from_pretrained(out / "final"), batch, noise, timesteps)
    assert after < 0.7 * before, (before, after)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(2, 31, 2)) and rows[-1]["loss"] < rows[0]["loss"]
    grids = sorted((out / "validation").glob("*.png"))
    assert [p.name for p in grids] == ["step-0000015.png", "step-0000030.png"]
    assert Image.open(grids[0]).size == (64, 32)  # two prompts (English, Chinese) of 32 px, side by side
    assert (out / "final" / "train_config.yaml").is_file()

    # the trained pipeline draws from a Chinese prompt, through `mpm paint`
    assert main(["paint", "--model", str(out / "final"), "红色的图片。", "-o", str(tmp_path / "paint"), "--steps", "3",
                 "--no-progress"]) == 0  # fmt: skip
    assert Image.open(tmp_path / "paint" / "0-0.png").size == (32, 32)


def test_exact_resume_with_ema_two_workers_and_the_data_position(paint_llm, paint_shards, tmp_path):
    common = ["train.max_steps=7", "train.save_every=3", "train.keep_last=3", "data.num_workers=2",
              "data.shuffle_buffer=8", "train.ema.decay=0.9"]  # fmt: skip
    straight = tmp_path / "straight"
    assert main(cli(paint_llm, paint_shards, straight, *common)) == 0
    # a run killed right after its step-3 checkpoint: its folder holds that checkpoint, the config and the log
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-0000003", resumed / "checkpoints" / "step-0000003")
    shutil.copy(straight / "train_config.yaml", resumed / "train_config.yaml")
    shutil.copy(straight / "metrics.jsonl", resumed / "metrics.jsonl")  # rows after step 3 are rewound
    assert (resumed / "checkpoints" / "step-0000003" / "ema.safetensors").is_file()
    assert main(cli(paint_llm, paint_shards, resumed, *common)) == 0

    for part in ("unet/diffusion_pytorch_model.safetensors", "text_proj/diffusion_pytorch_model.safetensors"):
        a, b = load_file(straight / "final" / part), load_file(resumed / "final" / part)
        assert all(torch.equal(a[k], b[k]) for k in a), part
    losses = lambda run: [json.loads(r)["loss"] for r in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(straight) == losses(resumed)
    # checkpoints hold only what trains (the UNet here: all of it) and text_proj, not the frozen LLM
    saved = set(load_file(straight / "checkpoints" / "step-0000003" / "model_1.safetensors"))
    assert saved == {"linear.weight", "norm.weight", "norm.bias"}


def test_two_processes_keep_identical_weights(paint_llm, paint_shards, tmp_path):
    out = tmp_path / "ddp"
    # both processes encode half the shards into the text-feature cache, then train on it
    overrides = [f"model.llm={paint_llm}", f"data.shards=[{paint_shards}]", f"train.output_dir={out}", "train.stage=align",
                 "model.pooled=true", "train.max_steps=4", "train.batch_size=2", "validation.every=2",
                 f"data.text_feature_cache={tmp_path / 'cache'}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          str(REPO / "tests" / "t2i" / "ddp_train.py"), TINY, *overrides],
                         cwd=REPO, capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    digests = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert digests[0]["world"] == digests[1]["world"] == 2
    assert digests[0]["weights"] == digests[1]["weights"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["samples"] for r in rows] == [8, 8]  # 2 per rank and step, both ranks counted, a log every 2 steps
    assert len(list((out / "validation").glob("*.png"))) == 2  # drawn by the main process while the other waits
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 4 + 1  # every shard, and the empty prompt


def test_corrupt_images_in_training_shards_are_counted_and_skipped(paint_llm, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    with wds.TarWriter(str(shards / "00000.tar")) as tar:
        for i in range(10):
            buf = io.BytesIO()
            Image.new("RGB", (40, 40), (200, 20 * i, 30)).save(buf, "PNG")
            image = b"not an image at all" if i in (3, 7) else buf.getvalue()
            tar.write(
                {"__key__": f"{i:09d}", "png": image, "txt": f"picture {i}", "json": json.dumps({"key": i}).encode()}
            )
    out = tmp_path / "run"
    # one pass over the 10 samples in batches of 4: 4, 4, 2 (two of them unusable)
    args = cli(
        paint_llm, shards, out, "train.max_steps=3", "train.log_every=3", "data.shuffle_buffer=0", "validation.every=0"
    )
    assert main(args) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["samples"] == 8 and row["skipped"] == 2


def test_lora_on_the_unet_is_merged_into_a_plain_final_unet(paint_llm, paint_shards, tmp_path):
    out = tmp_path / "run"
    assert main(cli(paint_llm, paint_shards, out, "train.max_steps=3", "train.lora.enabled=true", "train.lora.r=4",
                    "train.lr=0.01", "train.ema.enabled=false")) == 0  # fmt: skip
    weights = load_file(out / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    assert not [k for k in weights if "lora" in k]
    torch.manual_seed(0)
    fresh = build_pipeline(tiny_config(paint_llm, paint_shards, tmp_path / "x"))
    changed = [k for k, v in fresh.unet.state_dict().items() if not torch.equal(v, weights[k])]
    assert changed and all(".to_q." in k or ".to_k." in k or ".to_v." in k or ".to_out.0." in k for k in changed)
    # checkpoints of a LoRA run hold the adapters, not the UNet's own weights
    saved = load_file(out / "checkpoints" / "step-0000003" / "model.safetensors")
    assert saved and all("lora_" in k for k in saved if k.endswith("weight") or k.endswith("bias"))


# -- bad settings -------------------------------------------------------------------------------------------------
def test_settings_are_checked_before_anything_loads(paint_llm, paint_shards, tmp_path, capsys):
    assert main(cli(paint_llm, tmp_path / "nothing", tmp_path / "a")) == 2
    assert "data.shards: no .tar shards" in capsys.readouterr().err
    assert main(cli(paint_llm, paint_shards, tmp_path / "b", "data.resolution=33")) == 2
    assert "data.resolution 33 must be a multiple of 2" in capsys.readouterr().err
    assert main(cli(paint_llm, paint_shards, tmp_path / "c", "train.stage=warm")) == 2
    assert "train.stage" in capsys.readouterr().err
    assert main(cli(paint_llm, paint_shards, tmp_path / "d", "train.lora.enabled=true", "train.stage=align")) == 2
    assert "set train.stage full" in capsys.readouterr().err
    assert main(cli(paint_llm, paint_shards, tmp_path / "e", "model.prediction_type=sample")) == 2
    assert "model.prediction_type" in capsys.readouterr().err
    assert main(cli(paint_llm, paint_shards, tmp_path / "f", "train.snr_gamma=0")) == 2
    assert "train.snr_gamma must be > 0" in capsys.readouterr().err
    assert main(cli(paint_llm, paint_shards, tmp_path / "g", "validation.guidance_scale=-1")) == 2
    assert "validation.guidance_scale" in capsys.readouterr().err
    assert main(cli(paint_llm, paint_shards, tmp_path / "h", f"model.init_from={tmp_path}")) == 2
    assert "model.init_from is a whole pipeline: remove model.llm" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert main(cli(paint_llm, paint_shards, tmp_path / "i", f"data.text_feature_cache={tmp_path / 'file'}")) == 2
    assert "is a file: give a folder" in capsys.readouterr().err


def test_v_prediction_is_trained_and_saved_for_sampling(paint_llm, paint_shards, tmp_path):
    out = tmp_path / "run"
    assert main(cli(paint_llm, paint_shards, out, "train.max_steps=2", "model.prediction_type=v_prediction")) == 0
    scheduler = json.loads((out / "final" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"


# -- the shipped configs ------------------------------------------------------------------------------------------
def test_there_are_real_recipes_besides_the_tiny_one():
    assert "tiny.yaml" in {p.name for p in CONFIGS} and len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_t2i_config_is_valid(path):
    cfg = load_config(T2IConfig, path)
    assert f"--config configs/t2i/{path.name}" in path.read_text().split("\nmodel:")[0]  # the launch command
    if path.name != "tiny.yaml":
        cfg.check_required()
        assert cfg.train.mixed_precision == "bf16" and cfg.data.text_feature_cache
