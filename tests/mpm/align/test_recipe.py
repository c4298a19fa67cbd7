"""`mpm train align` end to end on a tiny MPM model: the margin grows, resume is exact, the cache replaces the
reference model, the LLM can stay frozen."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mpm.align.config import AlignConfig
from mpm.cli import main
from mpm.core.config import load_config

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]


@pytest.fixture
def start(save_tiny):
    return save_tiny("sft")


@pytest.fixture
def pairs_file(tmp_path):
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    rows = []
    for i, colour in enumerate(COLOURS):
        Image.new("RGB", (32, 32), colour).save(images / f"{i}.png")
        wrong = COLOURS[(i + 3) % len(COLOURS)]
        rows.append({"id": f"p{i}", "image": f"images/{i}.png", "question": "What colour is the square?",
                     "chosen": f"The square is {colour} and it sits alone.", "lang": "en",
                     "rejected": f"The square is {wrong} and a dog sits beside it."})  # fmt: skip
    path = tmp_path / "data" / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def args(start, pairs, out, *more):
    return ["train", "align", "--no-progress", "--config", "configs/align/rlhfv_paper.yaml",
            f"model.init_from={start}", f"data.preferences={pairs}", f"train.output_dir={out}",
            "data.max_length=256", "train.batch_size=2", "train.grad_accum=2", "train.lr=2e-3",
            "train.connector_lr=2e-3", "train.mixed_precision=no", "train.gradient_checkpointing=false",
            "train.warmup_steps=0", "train.log_every=1", "train.save_every=3", "train.keep_last=5", *more]  # fmt: skip


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_few_steps_raise_the_margin_and_resume_exactly(start, pairs_file, tmp_path):
    straight = tmp_path / "straight"
    assert main(args(start, pairs_file, straight, "train.max_steps=6", "train.log_every=2")) == 0
    rows = metrics(straight)
    assert [r["step"] for r in rows] == [2, 4, 6] and all(r["pairs"] == 8 for r in rows)
    assert abs(rows[0]["reward_margin"]) < rows[-1]["reward_margin"] / 2  # it starts as the reference
    assert rows[-1]["reward_margin"] > 0.05 and rows[-1]["reward_accuracy"] >= 0.75
    assert rows[-1]["loss"] < rows[0]["loss"]
    cache = pairs_file.with_name("pairs.jsonl.refcache")
    assert (cache / "manifest.json").is_file() and list(cache.glob("part-*.pt"))

    # a run killed after its step-3 checkpoint (between two logs): what it leaves, then the same command again
    resumed = tmp_path / "resumed"
    assert main(args(start, pairs_file, resumed, "train.max_steps=6", "train.log_every=2")) == 0
    for later in [p for p in (resumed / "checkpoints").glob("step-*") if p.name > "step-0000003"]:
        shutil.rmtree(later)
    shutil.rmtree(resumed / "final")
    assert main(args(start, pairs_file, resumed, "train.max_steps=6", "train.log_every=2")) == 0
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(resumed / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(resumed) == [{**r, "elapsed_s": m["elapsed_s"]} for r, m in zip(rows, metrics(resumed))]


def test_the_step_loss_is_divided_once_by_the_pairs_of_all_micro_batches(start, pairs_file, tmp_path):
    # one step over all 8 pairs: one micro-batch of 8, or two of 4 accumulated: the same update
    one = tmp_path / "one"
    two = tmp_path / "two"
    assert main(args(start, pairs_file, one, "train.max_steps=1", "train.batch_size=8", "train.grad_accum=1")) == 0
    assert main(args(start, pairs_file, two, "train.max_steps=1", "train.batch_size=4", "train.grad_accum=2")) == 0
    a = load_file(str(one / "final" / "model.safetensors"))
    b = load_file(str(two / "final" / "model.safetensors"))
    assert any(not torch.equal(a[k], load_file(str(start / "model.safetensors"))[k]) for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    # Adam hides a constant factor in the update: the gradient's norm (before clipping) does not
    (first,), (second,) = metrics(one), metrics(two)
    assert first["grad_norm"] > 0 and second["grad_norm"] == pytest.approx(first["grad_norm"], rel=1e-4)
    assert second["loss"] == pytest.approx(first["loss"], abs=1e-6)


def test_the_cache_replaces_the_reference_model_and_the_llm_can_stay_frozen(start, pairs_file, tmp_path):
    reference = tmp_path / "reference"
    shutil.copytree(start, reference)
    first = tmp_path / "first"
    common = ["train.max_steps=2", f"model.reference={reference}", "train.train_llm=false", "loss.preset=dpo"]
    assert main(args(start, pairs_file, first, *common)) == 0
    shutil.rmtree(reference)  # the cache is complete: training never needs the reference model again
    second = tmp_path / "second"
    assert main(args(start, pairs_file, second, *common)) == 0
    assert [r["loss"] for r in metrics(first)] == [r["loss"] for r in metrics(second)]

    before = load_file(str(start / "model.safetensors"))
    after = load_file(str(second / "final" / "model.safetensors"))
    llm = [k for k in before if k.startswith("language_model.")]
    connector = [k for k in before if k.startswith("connector.")]
    changed = [k for k in llm if not torch.equal(before[k], after[k])]
    assert llm and not changed, changed  # the MPM setting: the LLM frozen
    assert any(not torch.equal(before[k], after[k]) for k in connector)


def test_a_model_trained_on_raw_prompts_is_aligned_on_them(start, pairs_file, tmp_path):
    from mpm.align.batches import encode_pair
    from mpm.align.data import read_preferences
    from mpm.processor import MPMProcessor

    raw = "<ctx><image> </ctx> {question}"
    processor = MPMProcessor.from_pretrained(start)
    pair = read_preferences(pairs_file).pairs[0]
    encoded = encode_pair(processor, pair, 256, raw_prompt=raw)
    image = Image.open(pairs_file.parent / "images" / "0.png").convert("RGB")
    expected = processor.encode_raw("<ctx><image> </ctx> What colour is the square?", pair.chosen, [image])
    assert encoded.chosen.input_ids == expected.input_ids and encoded.chosen.labels == expected.labels
    assert processor.tokenizer.chat_template is None or "<|im_start|>" not in processor.tokenizer.decode(
        encoded.chosen.input_ids)  # fmt: skip

    out = tmp_path / "raw"
    assert main(args(start, pairs_file, out, "train.max_steps=2", f"data.raw_prompt={raw}")) == 0
    assert [r["pairs"] for r in metrics(out)] == [4, 4]
    # the raw prompt is part of what the cached log-probs depend on: a chat-template run does not reuse them
    assert main(args(start, pairs_file, tmp_path / "chat", "train.max_steps=1")) == 2


def test_an_exported_llava_checkpoint_is_a_starting_point_for_training_and_best_of_n(
    start, pairs_file, save_tiny, tmp_path, capsys
):
    from mpm.export import export_llava

    llava = export_llava(start, tmp_path / "llava")
    out = tmp_path / "from_llava"
    assert main(args(llava, pairs_file, out, "train.max_steps=2", "loss.preset=dpo")) == 0
    assert (out / "imported" / "policy" / "config.json").is_file() and not (out / "imported" / "reference").exists()
    # the same run from the MPM checkpoint the LLaVA one was exported from: the same losses
    same = tmp_path / "from_mpm"
    assert main(args(start, pairs_file, same, "train.max_steps=2", "loss.preset=dpo")) == 2  # refused: other cache
    assert main(args(start, pairs_file, same, "train.max_steps=2", "loss.preset=dpo", "--no-cache")) == 0
    for a, b in zip(metrics(out), metrics(same), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    # best-of-N: the LLaVA policy scored against a LLaVA reference gives the rewards of the MPM models they equal
    other = export_llava(save_tiny("other", seed=1), tmp_path / "other_llava")
    Image.new("RGB", (32, 32), "red").save(tmp_path / "red.png")
    common = ["--best-of", "3", "--image", str(tmp_path / "red.png"), "--max-new-tokens", "4", "--seed", "3"]
    rewards = []
    for policy, reference in ((llava, other), (start, tmp_path / "other")):
        capsys.readouterr()
        assert main(["chat", "--model", str(policy), "--reference", str(reference), *common, "What colour?"]) == 0
        rewards.append([line.split(":")[0] for line in capsys.readouterr().err.splitlines() if "reward" in line])
    assert len(rewards[0]) == 3 and rewards[0] == rewards[1]
    assert any("+0.000" not in r for r in rewards[0])  # another reference: the rewards are not all zero


def test_a_file_of_unusable_pairs_is_refused(start, pairs_file, tmp_path, capsys):
    shutil.rmtree(pairs_file.parent / "images")
    assert main(args(start, pairs_file, tmp_path / "out", "train.max_steps=2")) == 2
    err = capsys.readouterr().err
    assert "no usable pair" in err and "missing_image 8" in err


ALIGN_CONFIGS = sorted(
    p for p in (Path(__file__).parents[3] / "configs" / "align").glob("*.yaml") if p.name != "yes_no.yaml"
)


@pytest.mark.parametrize("path", ALIGN_CONFIGS, ids=[p.name for p in ALIGN_CONFIGS])
def test_every_shipped_align_config_is_valid(path):
    if path.name.startswith("rlaifv_"):
        from mpm.align.rlaifv_config import RlaifvConfig

        cfg = load_config(RlaifvConfig, path)
        assert path.read_text().startswith(f"# mpm align rlaifv --config configs/align/{path.name}")
        assert cfg.dpo.loss.settings().beta > 0
    else:
        cfg = load_config(AlignConfig, path)
        assert path.read_text().startswith(f"# mpm train align --config configs/align/{path.name}")
        assert cfg.loss.settings().beta > 0
    cfg.check_required()
