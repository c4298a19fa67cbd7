"""`mpm paint` through the real CLI entry (mpm.cli.main): a saved MPMPaintPipeline (tiny Qwen2 LLM, the
Stable Diffusion folder's UNet and VAE) draws PNGs; a tiny random CLIP ranks candidates."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

from mpm.cli import main
from t2i import MPMPaintPipeline

STEPS = "2"
CAT = "一只戴着红帽子的猫"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: one thread is faster, and several spin-wait badly on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(paint_llm, sd_folder, tmp_path_factory) -> Path:
    """A saved pipeline folder, as `mpm train t2i` leaves in final/ (latent space: VAE factor 2, sizes % 4)."""
    folder = tmp_path_factory.mktemp("paint_model")
    torch.manual_seed(0)
    MPMPaintPipeline.from_parts(paint_llm, sd=sd_folder).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipe(model) -> MPMPaintPipeline:
    """The same folder loaded here, to redraw what the CLI drew."""
    pipe = MPMPaintPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    """A tiny random CLIP (hidden 32, 32 px, patch 8) with a byte-level BPE tokenizer, saved as a model folder."""
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[bos, eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([CAT, "a red cat wearing a hat", "a blue dog in the snow"] * 10, trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, bpe.token_to_id(bos)), (eos, bpe.token_to_id(eos))]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token=eos)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = CLIPConfig(
        text_config={**tower, **ids, "pad_token_id": tokenizer.pad_token_id, "vocab_size": len(tokenizer)},
        vision_config={**tower, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    folder = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def paint(capsys, *args) -> tuple[int, str, str]:
    """Runs `mpm paint ARGS --steps 2 --no-progress`: (exit status, stdout, the `error: ...` lines of stderr)."""
    status = main(["paint", *map(str, args), "--steps", STEPS, "--no-progress"])
    out, err = capsys.readouterr()
    paint.stderr = err
    return status, out, "\n".join(line for line in err.splitlines() if line.startswith("error:"))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def index_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "index.jsonl").read_text(encoding="utf-8").splitlines()]


def redraw(pipe, prompt: str, seeds: list[int], size: int = 16) -> list[Image.Image]:
    """What `mpm paint` draws for one prompt: one generator per image, seeded seed + k (guidance 7.5)."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe([prompt], num_inference_steps=int(STEPS), height=size, width=size,
                num_images_per_prompt=len(seeds), generator=generators).images  # fmt: skip


# -- drawing -----------------------------------------------------------------------------------------------------------
def test_one_prompt_several_images_then_a_rerun_skips_it(model, pipe, tmp_path, capsys):
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, stdout, err = paint(capsys, "--model", model, CAT, "-o", out, "--size", 16, "--num-images", 2)
    assert status == 0, err
    assert "2 image(s) of 1 prompt(s)" in stdout
    assert f"| {STEPS}/{STEPS} [" not in paint.stderr  # --no-progress: no sampling bar either
    assert not [w for w in caught if "torch_dtype" in str(w.message)]  # loaded with diffusers' `dtype=`
    assert sorted(p.name for p in out.iterdir()) == ["0-0.png", "0-1.png", "0-grid.png", "index.jsonl"]
    first, second = pixels(out / "0-0.png"), pixels(out / "0-1.png")
    assert first.shape == second.shape == (16, 16, 3)
    assert Image.open(out / "0-grid.png").size == (32, 16)  # side by side
    np.testing.assert_array_equal(pixels(out / "0-grid.png"), np.concatenate([first, second], axis=1))
    assert not np.array_equal(first, second)  # seeds 0 and 1
    # Image k is seeded with seed + k: redrawn here, pixel for pixel.
    for k, image in enumerate(redraw(pipe, CAT, [0, 1])):
        np.testing.assert_array_equal(np.asarray(image), pixels(out / f"0-{k}.png"))
    rows = index_rows(out)
    assert [{k: r[k] for k in ("id", "lang", "prompt", "images")} for r in rows] == [
        {"id": "0", "lang": None, "prompt": CAT, "images": ["0-0.png", "0-1.png"]}
    ]
    assert rows[0]["settings"]["num_images"] == 2 and rows[0]["settings"]["height"] == 16

    (out / "0-1.png").unlink()
    status, stdout, err = paint(capsys, "--model", model, CAT, "-o", out, "--size", 16, "--num-images", 2)
    assert status == 0, err
    assert "0 image(s) of 0 prompt(s)" in stdout
    assert not (out / "0-1.png").exists()  # not drawn again
    assert len(index_rows(out)) == 1

    # the same folder with another prompt, or other settings, would mix images: refused, naming what changed
    status, _, err = paint(capsys, "--model", model, "a blue dog", "-o", out, "--size", 16, "--num-images", 2)
    assert status == 2 and "already holds prompt id '0' drawn otherwise (prompt:" in err
    status, _, err = paint(capsys, "--model", model, CAT, "-o", out, "--size", 16, "--num-images", 2, "--seed", 3)
    assert status == 2 and "seed: 0 -> 3" in err


def test_prompts_file_with_ids_and_langs(model, pipe, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": "cat", "lang": "zh", "prompt": CAT}, {"id": "dog", "lang": "en", "prompt": "a blue dog in the snow"},
            {"lang": "en", "prompt": "a red cat wearing a hat"}]  # fmt: skip
    prompts.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]))
    out = tmp_path / "out"
    args = ["--model", model, "--prompts", prompts, "-o", out, "--size", "16x8", "--seed", 5, "--batch-size", 2]
    status, stdout, err = paint(capsys, *args)
    assert status == 0, err
    assert "3 image(s) of 3 prompt(s)" in stdout
    assert sorted(p.name for p in out.glob("*.png")) == ["4-0.png", "cat-0.png", "dog-0.png"]  # no id: line number
    assert [(r["id"], r["lang"], r["prompt"]) for r in index_rows(out)] == [
        ("cat", "zh", CAT), ("dog", "en", rows[1]["prompt"]), ("4", "en", rows[2]["prompt"])
    ]  # fmt: skip
    assert Image.open(out / "cat-0.png").size == (16, 8)  # WIDTHxHEIGHT
    # The second prompt, drawn in a batch with the first, is (to rounding) what it is drawn alone with seed 5.
    alone = pipe([rows[1]["prompt"]], num_inference_steps=int(STEPS), height=8, width=16,
                 generator=[torch.Generator().manual_seed(5)]).images[0]  # fmt: skip
    assert np.abs(np.asarray(alone).astype(int) - pixels(out / "dog-0.png").astype(int)).max() <= 1


@pytest.mark.parametrize(
    "text, line, message",
    [
        ('{"id": "a", "prompt": "a cat"}\n{"id": "b", "prompt": "a dog"\n', 2, "not JSON"),
        ('{"id": "a", "prompt": "a cat"}\n\n{"id": "b", "prompt": "  "}\n', 3, "`prompt` must be a non-empty string"),
        ('{"id": "a", "prompt": "a cat"}\n{"id": "a", "prompt": "a dog"}\n', 2, "id 'a' appears twice"),
        ('{"id": "a", "text": "a cat"}\n', 1, "`prompt` must be a non-empty string"),
    ],
)
def test_bad_prompts_line_names_the_file_and_line(model, tmp_path, capsys, text, line, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(text)
    status, _, err = paint(capsys, "--model", model, "--prompts", prompts, "-o", tmp_path / "out")
    assert status == 2
    assert err.startswith(f"error: {prompts}:{line}: {message}")
    assert not (tmp_path / "out").exists()  # nothing drawn


def test_empty_prompts_file_is_an_error(model, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n  \n")
    status, _, err = paint(capsys, "--model", model, "--prompts", prompts, "-o", tmp_path / "out")
    assert status == 2
    assert err == f"error: {prompts} holds no prompt"


# -- ranking -----------------------------------------------------------------------------------------------------------
def test_rank_with_keeps_the_candidate_the_scorer_ranks_highest(model, pipe, clip_folder, tmp_path, capsys):
    from t2i.scoring import ImageTextScorer

    scorer = ImageTextScorer(str(clip_folder))
    # A seed whose best candidate is not the first, so keeping the first one by mistake would show.
    for seed in range(0, 30, 3):
        candidates = redraw(pipe, CAT, [seed, seed + 1, seed + 2])
        scores = scorer.score(candidates, [CAT] * 3)
        best = int(scores.argmax())
        if best != 0:
            break
    else:
        pytest.fail("every seed's best candidate was the first")
    assert len({np.asarray(c).tobytes() for c in candidates}) == 3  # three different candidates

    out = tmp_path / "out"
    status, stdout, err = paint(capsys, "--model", model, CAT, "-o", out, "--size", 16, "--seed", seed,
                                "--rank-with", clip_folder, "--num-candidates", 3)  # fmt: skip
    assert status == 0, err
    assert "1 image(s) of 1 prompt(s)" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["0-0.png", "0-scores.json", "index.jsonl"]  # one image: no grid
    np.testing.assert_array_equal(pixels(out / "0-0.png"), np.asarray(candidates[best]))
    saved = json.loads((out / "0-scores.json").read_text(encoding="utf-8"))
    assert saved["prompt"] == CAT
    assert len(saved["images"]) == 1 and saved["images"][0]["kept"] == best
    np.testing.assert_allclose(saved["images"][0]["candidates"], scores.tolist(), rtol=1e-5, atol=1e-6)
    (row,) = index_rows(out)
    assert row["images"] == ["0-0.png"]
    np.testing.assert_allclose(row["scores"], [scores[best].item()], rtol=1e-5, atol=1e-6)


# -- errors ------------------------------------------------------------------------------------------------------------
def test_missing_model_folder(tmp_path, capsys):
    status, _, err = paint(capsys, "--model", tmp_path / "nope", CAT, "-o", tmp_path / "out")
    assert status == 2
    assert err == f"error: --model {tmp_path / 'nope'} is not a saved MPMPaintPipeline (no model_index.json)"


def test_size_not_divisible_is_a_one_line_error(model, tmp_path, capsys):
    out = tmp_path / "out"
    status, _, err = paint(capsys, "--model", model, CAT, "-o", out, "--size", 18)
    assert status == 2
    assert len(err.splitlines()) == 1
    assert err.startswith("error: `height` must be a positive multiple of 4")
    assert "got 18" in err and "never resized silently" in err
    assert not list(out.glob("*.png")) and not (out / "index.jsonl").exists()
    status, _, err = paint(capsys, "--model", model, CAT, "-o", out, "--size", "big")
    assert status == 2 and err.startswith("error: --size must be a number (512) or WIDTHxHEIGHT")


def test_neither_prompt_nor_prompts_file(model, tmp_path, capsys):
    status, _, err = paint(capsys, "--model", model, "-o", tmp_path / "out")
    assert status == 2
    assert err.startswith("error: give one prompt")
    status, _, err = paint(capsys, "--model", model, CAT, "--prompts", tmp_path / "p.jsonl", "-o", tmp_path / "out")
    assert status == 2 and err.startswith("error: give one prompt")


def test_scheduler_by_name(model, tmp_path, capsys):
    status, _, err = paint(capsys, "--model", model, CAT, "-o", tmp_path / "out", "--scheduler", "NoSuchScheduler")
    assert status == 2
    assert err.startswith("error: --scheduler 'NoSuchScheduler' is not a diffusers scheduler class")
    status, _, err = paint(capsys, "--model", model, CAT, "-o", tmp_path / "out", "--scheduler", "AutoencoderKL")
    assert status == 2 and "is not a diffusers scheduler class" in err
    status, _, err = paint(
        capsys, "--model", model, CAT, "-o", tmp_path / "out", "--scheduler", "FlowMatchEulerDiscreteScheduler"
    )
    assert status == 2 and "cannot sample this model (trained with DDPMScheduler); compatible:" in err
    status, _, err = paint(
        capsys, "--model", model, CAT, "-o", tmp_path / "out", "--scheduler", "EulerDiscreteScheduler"
    )
    assert status == 0, err
    assert pixels(tmp_path / "out" / "0-0.png").shape == (16, 16, 3)
