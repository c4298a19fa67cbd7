"""The i2t recipe through the real CLI: pretrain on shards, SFT on conversations, exact resume, LoRA, 2 processes."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mpm.cli import main
from mpm.connectors import Connector, register_connector
from mpm.core.config import load_config
from mpm.core.errors import ConfigError
from mpm.modeling import MPMForConditionalGeneration
from mpm.train_config import TrainConfig
from mpm.training import save_final, set_trainable
from mpm.vision import patch_features
from tests.mpm.conftest import COLOURS

REPO = Path(__file__).parents[2]
TINY = str(REPO / "configs" / "i2t" / "tiny.yaml")


def parts(tiny_parts) -> list[str]:
    return [f"model.vision={tiny_parts[0]}", f"model.llm={tiny_parts[1]}"]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_through_the_cli_lowers_the_loss(tiny_parts, colour_shards, tmp_path, caplog, capfd):
    out = tmp_path / "run"
    args = ["train", "i2t", "--config", TINY, "--no-progress", *parts(tiny_parts), f"data.shards=[{colour_shards}]",
            f"train.output_dir={out}", "train.max_steps=60", "train.log_every=10", "train.save_every=30"]  # fmt: skip
    with caplog.at_level("INFO"):
        assert main(args) == 0
    # transformers' notice on resizing the embeddings is not printed on every run (its logger or stderr)
    assert "multivariate" not in capfd.readouterr().err + caplog.text
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert "lr_connector" in row and "lr" not in row and "lr_llm" not in row  # the LLM is frozen: no rate of its own
    curve = losses(out)  # the frozen LLM already writes "A ... picture."; the connector must tell it the colour
    assert len(curve) == 6 and curve[-1] < 0.3 * curve[0], curve
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000030", "step-0000060"]
    model = MPMForConditionalGeneration.from_pretrained(out / "final")
    assert model.config.connector_type == "resampler"
    # the LLM was frozen: its weights are the pretrained ones
    llm = load_file(str(Path(tiny_parts[1]) / "model.safetensors"))
    trained = model.language_model.state_dict()
    assert torch.equal(trained["model.layers.0.mlp.up_proj.weight"], llm["model.layers.0.mlp.up_proj.weight"])
    # intermediate checkpoints hold what trains (the connector, the new tokens' rows), not the frozen LLM and tower
    saved = load_file(str(out / "checkpoints" / "step-0000030" / "model.safetensors"))
    assert any(k.startswith("connector.") for k in saved) and "added_token_embeddings.delta" in saved
    assert not any(k.startswith(("language_model.model.layers", "vision_tower.encoder")) for k in saved)
    assert json.loads((out / "checkpoints" / "step-0000030" / "state.json").read_text())["format"] == 2


def test_pretrain_in_bf16_keeps_frozen_weights_in_bf16_and_learns(tiny_parts, colour_shards, tmp_path):
    from mpm.recipes import i2t

    seen = {}
    original = i2t.store_frozen_in

    def spy(model, dtype):
        original(model, dtype)
        seen.update({n: p.dtype for n, p in model.named_parameters()})

    i2t.store_frozen_in = spy
    try:
        out = tmp_path / "bf16"
        args = ["train", "i2t", "--config", TINY, "--no-progress", *parts(tiny_parts), f"data.shards=[{colour_shards}]",
                f"train.output_dir={out}", "train.max_steps=40", "train.log_every=10", "train.save_every=40",
                "train.mixed_precision=bf16"]  # fmt: skip
        assert main(args) == 0
    finally:
        i2t.store_frozen_in = original
    assert seen["language_model.model.layers.0.mlp.up_proj.weight"] == torch.bfloat16
    assert seen["vision_tower.encoder.layers.0.mlp.fc1.weight"] == torch.bfloat16
    assert seen["connector.query"] == torch.float32  # what trains stays fp32 for the optimizer
    curve = losses(out)
    assert curve[-1] < 0.5 * curve[0], curve
    final = MPMForConditionalGeneration.from_pretrained(out / "final")
    assert {p.dtype for p in final.parameters()} == {torch.float32}  # final/ has one dtype


class MeanPoolConnector(Connector):
    """A connector written outside the project: two tokens per image, the means of its upper and lower halves."""

    def __init__(self, config):
        super().__init__()
        self.proj = torch.nn.Linear(config.vision_width, config.text_config.hidden_size)

    @classmethod
    def tokens_per_image(cls, config, height, width):
        return 2

    def forward(self, tower, pixel_values, config, early_exit=True):
        feats = patch_features(tower, pixel_values, config.vision_feature_layer, "patch", early_exit)  # (B, N, D)
        halves = feats.chunk(2, dim=1)
        return self.proj(torch.stack([h.mean(1) for h in halves], 1))


def test_a_connector_registered_outside_the_project_trains_through_the_recipe(tiny_parts, colour_shards, tmp_path):
    register_connector("mean_pool_test")(MeanPoolConnector)
    out = tmp_path / "pool"
    args = ["train", "i2t", "--config", TINY, "--no-progress", *parts(tiny_parts), f"data.shards=[{colour_shards}]",
            f"train.output_dir={out}", "model.connector_type=mean_pool_test", "train.max_steps=40",
            "train.log_every=10", "train.save_every=40"]  # fmt: skip
    assert main(args) == 0
    curve = losses(out)
    assert curve[-1] < 0.8 * curve[0], curve
    model = MPMForConditionalGeneration.from_pretrained(out / "final")
    assert model.config.connector_type == "mean_pool_test" and isinstance(model.connector, MeanPoolConnector)
    with pytest.raises(ConfigError, match="model.connector_type.*got 'mean_pol_test'"):
        load_config(TrainConfig, TINY, None, ["model.connector_type=mean_pol_test"])  # before any weight loads


def two_answers(folder: Path, broken: bool = False) -> Path:
    """Two conversations whose answers differ 20-fold in length (and optionally one whose image is unreadable)."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), COLOURS["red"]).save(folder / "red.png")
    Image.new("RGB", (30, 40), COLOURS["blue"]).save(folder / "blue.png")
    (folder / "broken.png").write_bytes(b"not a png")
    long = "It is a blue picture. " * 8
    records = [
        {"id": "short", "image": "red.png", "conversations": [
            {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "long", "image": "broken.png" if broken else "blue.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": long.strip()}]},
    ]  # fmt: skip
    (folder / "train.json").write_text(json.dumps(records))
    return folder / "train.json"


def one_step(tiny_parts, conversations, out, *extra) -> tuple[dict, dict]:
    """(the metrics row, the final weights) of a one-step SFT run."""
    args = sft_args(tiny_parts, conversations, out, "train.max_steps=1", "train.log_every=1", "train.save_every=1",
                    "train.warmup_steps=0", "train.lr=1e-3", *extra)  # fmt: skip
    assert main(args) == 0
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    return row, load_file(str(out / "final" / "model.safetensors"))


def same_step(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    (row_a, weights_a), (row_b, weights_b) = a, b
    assert row_a["tokens"] == row_b["tokens"] and row_a["samples"] == row_b["samples"]
    assert row_a["loss"] == pytest.approx(row_b["loss"], rel=1e-4)
    assert row_a["grad_norm"] == pytest.approx(row_b["grad_norm"], rel=1e-4)  # the same gradient, not only its sign
    # AdamW's first step is lr * g / (|g| + eps): near-zero gradients amplify float noise, so 1e-4 (lr 1e-2)
    assert all(torch.allclose(weights_a[k], weights_b[k], atol=1e-4) for k in weights_a)


def test_a_token_weighs_the_same_in_every_batch_layout(tiny_parts, tmp_path):
    data = two_answers(tmp_path / "data")
    accumulated = one_step(tiny_parts, data, tmp_path / "accum", "train.grad_accum=2", "train.batch_size=1")
    batched = one_step(tiny_parts, data, tmp_path / "batch", "train.grad_accum=1", "train.batch_size=2",
                       "train.efficiency.pack_sequences=never")  # fmt: skip
    packed = one_step(tiny_parts, data, tmp_path / "packed", "train.grad_accum=1", "train.batch_size=2",
                      "train.efficiency.pack_sequences=always")  # fmt: skip
    assert accumulated[0]["tokens"] > 20  # the long answer's tokens count one by one
    same_step(accumulated, batched)
    same_step(accumulated, packed)
    # and as 2 processes x 1 sample (a 2-process run: torchrun)
    out = tmp_path / "ddp"
    overrides = [*parts(tiny_parts), "train.stage=sft", f"data.conversations=[{data}]", f"data.image_folder={data.parent}",
                 f"train.output_dir={out}", "train.max_steps=1", "train.log_every=1", "train.save_every=1",
                 "train.warmup_steps=0", "train.lr=1e-3", "train.batch_size=1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          str(REPO / "tests" / "mpm" / "ddp_train.py"), TINY, *overrides],
                         cwd=REPO, capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    same_step(
        accumulated,
        (json.loads((out / "metrics.jsonl").read_text()), load_file(str(out / "final" / "model.safetensors"))),
    )


def test_a_filler_micro_batch_leaves_the_update_unchanged(tiny_parts, tmp_path):
    with_filler = one_step(tiny_parts, two_answers(tmp_path / "a", broken=True), tmp_path / "a_run",
                           "train.grad_accum=2", "train.batch_size=1")  # fmt: skip
    records = json.loads(two_answers(tmp_path / "b").read_text())[:1]
    (tmp_path / "b" / "train.json").write_text(json.dumps(records))  # the short conversation alone
    alone = one_step(
        tiny_parts, tmp_path / "b" / "train.json", tmp_path / "b_run", "train.grad_accum=1", "train.batch_size=1"
    )
    assert with_filler[0]["skipped"] == 1
    same_step(with_filler, alone)


def test_new_token_rows_learn_while_the_llm_is_frozen(tiny):
    model, processor = tiny(connector="resampler")  # not the LLaVA layout: images are delimited
    set_trainable(model, load_config(TrainConfig, None, None, ["train.stage=pretrain"]).train)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("connector.")]
    assert trainable == ["added_token_embeddings.delta"]
    batch = processor.collate([processor.encode_conversation(
        [{"role": "user", "content": "<image>\nHi"}, {"role": "assistant", "content": "Red."}], [Image.new("RGB", (32, 32))])])  # fmt: skip
    model(**batch).loss.backward()
    delta = dict(model.named_parameters())[trainable[0]]
    assert delta.shape[0] == 4 and delta.grad[2:].abs().sum() > 0  # <image_start>, <image_end> got gradients


def write_conversations(folder: Path, sliced: bool = False) -> Path:
    """Conversations about coloured images; one refers to a missing image, one to a corrupt file."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    size = (64, 64) if sliced else (40, 30)
    for i in range(16):
        name = list(COLOURS)[i % 4]
        Image.new("RGB", size, COLOURS[name]).save(folder / f"{i}.png")
        records.append({"id": str(i), "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is this?"}, {"from": "gpt", "value": f"It is {name}."},
            {"from": "human", "value": "用中文说。"}, {"from": "gpt", "value": "这是颜色。"}]})  # fmt: skip
    (folder / "broken.png").write_bytes(b"not a png")
    records.append({"id": "missing", "image": "nowhere.png", "conversations": records[0]["conversations"]})
    records.append({"id": "broken", "image": "broken.png", "conversations": records[0]["conversations"]})
    (folder / "train.json").write_text(json.dumps(records, ensure_ascii=False))
    return folder / "train.json"


def sft_args(tiny_parts, conversations, out, *extra):
    return ["train", "i2t", "--config", TINY, "--no-progress", *parts(tiny_parts), "train.stage=sft",
            f"data.conversations=[{conversations}]", f"data.image_folder={conversations.parent}", f"train.output_dir={out}",
            "train.max_steps=12", "train.log_every=4", "train.save_every=6", *extra]  # fmt: skip


def test_sft_with_lora_skips_bad_images_and_slices(tiny_parts, tmp_path):
    conversations = write_conversations(tmp_path / "data", sliced=True)
    out = tmp_path / "sft"
    extra = ["train.lora.enabled=true", "train.lora.r=4", "train.lora.alpha=8", "model.use_slicing=true",
             "model.scale_resolution=32", "train.lr=5e-3", "train.report_to=[tensorboard]"]  # fmt: skip
    assert main(sft_args(tiny_parts, conversations, out, *extra)) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lr_llm"] > 0 and rows[0]["lr_connector"] > rows[0]["lr_llm"]  # each rate under its own name
    assert sum(r["skipped"] for r in rows) > 0  # the missing and the corrupt image, each time they come up
    assert rows[-1]["loss"] < 0.95 * rows[0]["loss"], [r["loss"] for r in rows]  # LoRA learns the dialogues
    assert (out / "final" / "lora_adapter" / "adapter_config.json").exists()
    assert list(out.rglob("events.out.tfevents.*"))  # TensorBoard got the metrics too
    model = MPMForConditionalGeneration.from_pretrained(out / "final")
    assert model.config.use_slicing and not any("lora" in n for n, _ in model.named_parameters())
    from mpm.processor import MPMProcessor

    pixels, _ = MPMProcessor.from_pretrained(out / "final").image_inputs(Image.open(conversations.parent / "0.png"))
    assert len(pixels) == 1 + 2 * 2  # the training images were sliced: an overview and a 2x2 grid


def test_lora_checkpoint_reloads_to_identical_logits(tiny, tmp_path):
    model, processor = tiny()
    cfg = load_config(TrainConfig, None, None, ["train.stage=sft", "train.lora.enabled=true", "train.lora.r=4"]).train
    set_trainable(model, cfg)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # LoRA starts as a no-op (B = 0): make it do something
            param.data.normal_(0, 0.5)
    batch = processor.collate([processor.encode_conversation(
        [{"role": "user", "content": "<image>\nHi"}, {"role": "assistant", "content": "Red."}], [Image.new("RGB", (32, 32))])])  # fmt: skip
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    save_final(model, processor, tmp_path / "final")
    reloaded = MPMForConditionalGeneration.from_pretrained(tmp_path / "final").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, before, atol=1e-4)


def test_exact_resume_on_weighted_streamed_shards_with_two_workers(tiny_parts, colour_shards, tmp_path):
    common = [*parts(tiny_parts), f"data.shards=[{colour_shards},{colour_shards}]", "data.weights=[0.7,0.3]",
              "data.num_workers=2", "train.max_steps=7", "train.save_every=3", "train.log_every=2",
              "train.keep_last=5"]  # fmt: skip
    # resuming at batch 3 (odd): the next batch comes from the second DataLoader worker; the checkpoint falls
    # between two logs, so the row at step 4 also counts step 3, from before the kill
    straight = tmp_path / "straight"
    assert main(["train", "i2t", "--config", TINY, "--no-progress", *common, f"train.output_dir={straight}"]) == 0

    resumed = tmp_path / "resumed"
    cmd = [
        sys.executable,
        "-m",
        "mpm.cli",
        "train",
        "i2t",
        "--config",
        TINY,
        "--no-progress",
        *common,
        f"train.output_dir={resumed}",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (resumed / "checkpoints" / "step-0000003" / "state.json").exists() and time.monotonic() < deadline:
        if proc.poll() is not None:  # it ran to the end between two looks: undo what came after step 3
            assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
            break
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # killed mid-run, after its step-3 checkpoint
    proc.wait()
    # what a kill right after the step-3 checkpoint leaves (keep_last keeps it): no later checkpoint, no final/
    for later in [p for p in (resumed / "checkpoints").glob("step-*") if p.name > "step-0000003"]:
        shutil.rmtree(later)
    shutil.rmtree(resumed / "final", ignore_errors=True)
    assert main(["train", "i2t", "--config", TINY, "--no-progress", *common, f"train.output_dir={resumed}"]) == 0

    a, b = (
        load_file(str(straight / "final" / "model.safetensors")),
        load_file(str(resumed / "final" / "model.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    assert losses(straight) == losses(resumed)  # the rows logged after the checkpoint were rewound, then redone


def test_resume_with_other_settings_is_refused(tiny_parts, tmp_path, caplog):
    conversations = write_conversations(tmp_path / "data")
    out = tmp_path / "sft"
    assert main(sft_args(tiny_parts, conversations, out, "train.max_steps=6")) == 0
    # the LLM trains, so checkpoints hold its tied head: accelerate's notice about it is not printed on every save
    assert not [r for r in caplog.records if "shared tensor" in r.getMessage()]
    args = sft_args(tiny_parts, conversations, out, "train.max_steps=6", "train.log_every=3")
    assert main(args) == 0  # how often to log may change: resumes (and finds the run done)
    from mpm.recipes.i2t import train

    for change, message in (("train.lr=0.01", "train.lr: 0.001 -> 0.01"), ("train.max_steps=8", "max_steps: 6 -> 8")):
        with pytest.raises(ConfigError, match=message + ".*new train.output_dir"):
            train(
                load_config(
                    TrainConfig, TINY, None, sft_args(tiny_parts, conversations, out, "train.max_steps=6", change)[5:]
                ),
                show_progress=False,
            )


def test_init_from_a_checkpoint_of_another_model_type_is_a_clear_error(colour_shards, tmp_path, capsys):
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text('{"model_type": "qwen2"}')
    args = [
        "train",
        "i2t",
        "--config",
        TINY,
        f"model.init_from={tmp_path / 'llm'}",
        f"data.shards=[{colour_shards}]",
        f"train.output_dir={tmp_path / 'o'}",
    ]
    assert main(args) == 2
    assert "holds a 'qwen2' model, not an MPM checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_two_processes_keep_identical_weights(tiny_parts, colour_shards, tmp_path, stage):
    out = tmp_path / "ddp"
    script = REPO / "tests" / "mpm" / "ddp_train.py"
    overrides = [*parts(tiny_parts), f"train.output_dir={out}", "train.max_steps=4", "train.save_every=4"]
    if stage == "pretrain":
        overrides += [f"data.shards=[{colour_shards}]", "train.batch_size=2"]
    else:  # one sample per rank and micro-batch: the missing and the broken image leave one rank with nothing
        conversations = write_conversations(tmp_path / "data")
        overrides += ["train.stage=sft", f"data.conversations=[{conversations}]", f"data.image_folder={conversations.parent}",
                      "train.batch_size=1", "train.max_steps=10", "train.save_every=5", "train.vision=last_n"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), TINY, *overrides],
                         cwd=REPO, capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    digests = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert digests[0]["world"] == digests[1]["world"] == 2
    assert digests[0]["weights"] == digests[1]["weights"]
    assert digests[0]["step"] == (4 if stage == "pretrain" else 10)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if stage == "pretrain":  # the samples of both ranks are counted: 2 per rank and step, a log every 2 steps
        assert [r["samples"] for r in rows] == [8, 8]
    if stage == "sft":
        assert "skipping conversation missing" in run.stderr and "skipping conversation broken" in run.stderr


def trainable_vision(model) -> set[str]:
    return {n.split(".")[1] + ("." + n.split(".")[3] if ".layers." in n or ".stages." in n else "")
            for n, p in model.named_parameters() if p.requires_grad and n.startswith("vision_tower.")}  # fmt: skip


@pytest.mark.parametrize(
    ("build", "vision", "expected"),
    [
        ({}, "last_n", {"encoder.0"}),  # hidden state -2 of 2 blocks: block 2 never reaches the connector
        ({}, "full", {"embeddings", "pre_layrnorm", "encoder.0"}),
        ({"vision_feature_layer": -1}, "last_n", {"encoder.0", "encoder.1"}),
        ({"connector": "bridge", "vision_feature_layer": -1}, "full",
         {"embeddings", "pre_layrnorm", "encoder.0", "encoder.1", "post_layernorm"}),  # the bridge normalises
        ({"vision": "resnet"}, "last_n", {"encoder.0", "encoder.1"}),
        ({"vision": "resnet"}, "full", {"embedder", "encoder.0", "encoder.1"}),
    ],
)  # fmt: skip
def test_only_the_vision_layers_that_feed_the_connector_train(tiny, build, vision, expected):
    model, _ = tiny(**build)
    set_trainable(
        model, load_config(TrainConfig, None, None, [f"train.vision={vision}", "train.vision_last_n=2"]).train
    )
    assert trainable_vision(model) == expected


def test_data_that_gives_nothing_is_a_clear_error(tiny_parts, tmp_path, capsys):
    conversations = write_conversations(tmp_path / "data")
    records = json.loads(conversations.read_text())
    assert main(sft_args(tiny_parts, conversations, tmp_path / "big", "train.batch_size=32")) == 2
    assert "18 conversations give no whole batch of train.batch_size 32 x 1 processes" in capsys.readouterr().err
    for record in records:
        record["image"] = "nowhere.png"
    conversations.write_text(json.dumps(records))
    assert main(sft_args(tiny_parts, conversations, tmp_path / "none")) == 2
    assert "a whole pass over the training data gave no usable sample" in capsys.readouterr().err
    # an endless (weighted) shard stream where no image decodes: an error, not a run that never yields a batch
    shards = tmp_path / "bad_shards"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for i in range(8):
            for ext, payload in [("jpg", b"not a jpeg"), ("txt", b"A red picture.")]:
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    args = ["train", "i2t", "--config", TINY, "--no-progress", *parts(tiny_parts), f"data.shards=[{shards}]",
            "data.weights=[1.0]", f"train.output_dir={tmp_path / 'bad'}"]  # fmt: skip
    assert main(args) == 2  # 8 steps of 4 samples
    assert "the run ended without a single usable training sample (32 skipped" in capsys.readouterr().err
    assert main([*args, "train.max_steps=300", f"train.output_dir={tmp_path / 'bad_long'}"]) == 2
    assert "no usable training sample among the last 1000" in capsys.readouterr().err


def test_a_step_with_nothing_usable_is_logged_and_skipped_not_fatal(tiny_parts, tmp_path):
    conversations = write_conversations(tmp_path / "data")  # 16 good, a missing and a broken image
    out = tmp_path / "run"
    extra = ["train.batch_size=1", "train.max_steps=18", "train.log_every=1", "train.save_every=1",
             "train.keep_last=100", "data.group_by_length=false"]  # fmt: skip
    assert main(sft_args(tiny_parts, conversations, out, *extra)) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 19))
    empty = [r["step"] for r in rows if r["samples"] == 0]
    assert len(empty) == 2 and all(rows[s - 1]["skipped"] == 1 for s in empty)
    for s in empty:  # no optimizer step: a zero gradient would still move the weights through AdamW's momentum
        before = load_file(str(out / "checkpoints" / f"step-{s - 1:07d}" / "model.safetensors")) if s > 1 else None
        after = load_file(str(out / "checkpoints" / f"step-{s:07d}" / "model.safetensors"))
        assert before is None or all(torch.equal(before[k], after[k]) for k in after)


def test_a_resumed_run_whose_remaining_steps_have_nothing_usable_finishes(tiny_parts, tmp_path):
    conversations = write_conversations(tmp_path / "data")
    extra = ["train.batch_size=1", "train.log_every=1", "train.save_every=1", "train.keep_last=100",
             "data.group_by_length=false"]  # fmt: skip
    probe = tmp_path / "probe"
    assert main(sft_args(tiny_parts, conversations, probe, *extra, "train.max_steps=18")) == 0
    rows = [json.loads(line) for line in (probe / "metrics.jsonl").read_text().splitlines()]
    empty = next(r["step"] for r in rows if r["samples"] == 0 and r["step"] > 1)  # the same order in every run
    out = tmp_path / "run"  # a run that ends on that step, killed just before it
    assert main(sft_args(tiny_parts, conversations, out, *extra, f"train.max_steps={empty}")) == 0
    shutil.rmtree(out / "checkpoints" / f"step-{empty:07d}")
    shutil.rmtree(out / "final")
    assert main(sft_args(tiny_parts, conversations, out, *extra, f"train.max_steps={empty}")) == 0
    assert (out / "final" / "model.safetensors").exists()  # it learned before the checkpoint: not "nothing usable"


def test_bad_paths_are_clear_errors_before_the_model_loads(tiny_parts, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")  # no network: the hub id fails in seconds
    conversations = write_conversations(tmp_path / "data")
    missing = tmp_path / "nowhere.json"
    assert main(sft_args(tiny_parts, missing, tmp_path / "a")) == 2
    assert "data.conversations: " in capsys.readouterr().err
    args = sft_args(tiny_parts, conversations, tmp_path / "b", f"data.image_folder={tmp_path / 'no_images'}")
    assert main(args) == 2
    assert "is not a folder" in capsys.readouterr().err
    args = ["train", "i2t", "--config", TINY, "model.vision=no/such-tower", f"model.llm={tiny_parts[1]}",
            f"data.shards=[{tmp_path}]", f"train.output_dir={tmp_path / 'c'}"]  # fmt: skip
    assert main(args) == 2
    assert "no .tar shards match" in capsys.readouterr().err  # the data is checked first
    args[-2] = f"data.shards=[{tmp_path / 'data'}]"
    (tmp_path / "data" / "00000.tar").write_bytes(b"")
    assert main(args) == 2
    assert "model.vision='no/such-tower' is not a local folder, and the model hub" in capsys.readouterr().err
    args[-2] = f"data.shards=[{tmp_path / 'data'},{tmp_path / 'data'}]"  # pretraining's data checked first too
    assert main([*args, "data.weights=[1.0]"]) == 2
    assert "data.weights has 1 values for 2 shard sets" in capsys.readouterr().err


def test_a_moved_run_resumes_and_another_process_count_is_refused(tiny_parts, tmp_path):
    from types import SimpleNamespace

    from mpm.core.runs import Checkpoints

    conversations = write_conversations(tmp_path / "data")
    assert main(sft_args(tiny_parts, conversations, tmp_path / "run", "train.max_steps=6")) == 0
    shutil.copytree(tmp_path / "run", tmp_path / "moved")
    assert main(sft_args(tiny_parts, conversations, tmp_path / "moved", "train.max_steps=6")) == 0  # done: resumes
    latest = Checkpoints(tmp_path / "moved", 2).latest()
    with pytest.raises(ConfigError, match="written by 1 processes, this run has 2"):
        Checkpoints.load(SimpleNamespace(num_processes=2), latest)


def test_a_frozen_convolutional_tower_keeps_its_batch_norm_statistics(tiny):
    from mpm.training import keep_frozen_norm_statistics

    model, processor = tiny(vision="resnet")
    set_trainable(model, load_config(TrainConfig, None, None, ["train.vision=frozen"]).train)
    before = {k: v.clone() for k, v in model.vision_tower.state_dict().items() if "running" in k}
    model.train()
    keep_frozen_norm_statistics(model)
    batch = processor.collate([processor.encode_conversation(
        [{"role": "user", "content": "<image>\nHi"}, {"role": "assistant", "content": "Red."}],
        [Image.new("RGB", (32, 32), (200, 10, 10))])])  # fmt: skip
    model(**batch).loss.backward()
    after = model.vision_tower.state_dict()
    assert before and all(torch.equal(before[k], after[k]) for k in before)
    # a norm without parameters (affine=False) follows the module that holds it
    block = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4, affine=False))
    block.train()
    keep_frozen_norm_statistics(block)
    assert block[1].training
    block.requires_grad_(False)
    keep_frozen_norm_statistics(block)
    assert not block[1].training


def test_the_recipe_builds_models_with_delimiters_and_the_llava_layout_without(tiny_parts):
    from mpm.training import build_model

    resampler = load_config(TrainConfig, TINY, None, parts(tiny_parts)).model
    model, processor = build_model(resampler)
    assert model.config.delimit_images and "<image_start>" in processor.tokenizer.get_vocab()
    llava, _ = build_model(load_config(TrainConfig, TINY, None, [*parts(tiny_parts), "model.connector_type=mlp"]).model)
    assert llava.config.delimit_images is False


def test_a_tied_head_trains_what_is_saved_for_the_added_tokens(tiny, tmp_path):
    model, processor = tiny(connector="resampler")  # Qwen2 tiny: tied embeddings
    set_trainable(model, load_config(TrainConfig, None, None, []).train)
    with torch.no_grad():
        model.added_token_embeddings.delta.normal_(0, 0.5)
    batch = processor.collate([processor.encode_conversation(
        [{"role": "user", "content": "<image>\nHi"}, {"role": "assistant", "content": "Red."}], [Image.new("RGB", (32, 32))])])  # fmt: skip
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits
    final = save_final(model, processor, tmp_path / "final")
    reloaded = MPMForConditionalGeneration.from_pretrained(tmp_path / "final").eval()
    with torch.no_grad():
        assert torch.allclose(final(**batch).logits, trained, atol=1e-4)
        assert torch.allclose(reloaded(**batch).logits, trained, atol=1e-4)


def test_lora_merges_in_fp32_after_training_with_bf16_frozen_weights(tiny, tmp_path):
    from mpm.training import store_frozen_in

    model, processor = tiny()
    set_trainable(model, load_config(TrainConfig, None, None, ["train.stage=sft", "train.lora.enabled=true"]).train)
    store_frozen_in(model, torch.bfloat16)
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 1e-3)  # small updates: rounded away if merged into bf16 weights
    layer = model.language_model.base_model.model.model.layers[0].self_attn.q_proj
    expected = layer.base_layer.weight.float() + layer.get_delta_weight("default").float()
    final = save_final(model, processor, tmp_path / "final")
    assert torch.allclose(final.language_model.model.layers[0].self_attn.q_proj.weight, expected, atol=1e-6)


def test_a_frozen_resnet_trains_in_bf16(tiny_parts, colour_shards, tmp_path):
    from transformers import ResNetModel

    from tests.mpm.conftest import vision_config

    ResNetModel(vision_config("resnet")).save_pretrained(tmp_path / "resnet")
    args = ["train", "i2t", "--config", TINY, "--no-progress", f"model.vision={tmp_path / 'resnet'}",
            f"model.llm={tiny_parts[1]}", "model.vision_feature_layer=-1", f"data.shards=[{colour_shards}]",
            f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.mixed_precision=bf16"]  # fmt: skip
    assert main(args) == 0  # batch norms keep fp32 weights beside their fp32 statistics


def test_the_lm_head_runs_everywhere_without_logits_to_keep(tiny):
    from mpm.recipes.i2t import nll_sum

    model, processor = tiny()
    forward = model.language_model.forward

    def old_style(*args, logits_to_keep=None, **kwargs):  # an LLM whose forward predates logits_to_keep
        assert logits_to_keep is None, "logits_to_keep passed with supervised_logits_only off"
        return forward(*args, **kwargs)

    model.language_model.forward = old_style
    batch = processor.collate([processor.encode_conversation(
        [{"role": "user", "content": "<image>\nHi"}, {"role": "assistant", "content": "Red."}], [Image.new("RGB", (32, 32))])])  # fmt: skip
    nll, tokens = nll_sum(model, batch, supervised_logits_only=False)
    expected = model(**batch).loss  # the model's own mean over the same tokens
    assert torch.allclose(nll / tokens, expected, rtol=1e-5)


def test_accelerate_accumulating_another_number_is_refused(tiny_parts, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    conversations = write_conversations(tmp_path / "data")
    assert main(sft_args(tiny_parts, conversations, tmp_path / "run", "train.grad_accum=2")) == 2


def test_a_raw_caption_prompt_places_the_image_inside_it_and_is_asked_the_same_way(
    tiny, tiny_parts, colour_shards, tmp_path
):
    from PIL import Image

    from mpm.inference import Request, generate
    from mpm.processor import IGNORE_INDEX

    model, processor = tiny(connector="resampler")
    prompt = "User: <image> Describe the image. Assistant:"
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    encoded = processor.encode_raw(prompt, "A red picture.", [image])
    asked = processor.encode_prompt(prompt, [image])  # what generation feeds: the same prefix
    assert encoded.input_ids[: len(asked.input_ids)] == asked.input_ids
    supervised = [t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX]
    assert supervised[-1] == processor.tokenizer.eos_token_id  # the answer, then the end token: generation stops
    assert processor.tokenizer.decode(supervised[:-1]).strip() == "A red picture."
    assert all(label == IGNORE_INDEX for label in encoded.labels[: len(asked.input_ids)])
    assert isinstance(generate(model, processor, [Request(images=[image], prompt=prompt)], max_new_tokens=3)[0], str)

    out = tmp_path / "raw"  # stage 1 with the raw prompt, through the recipe
    args = ["train", "i2t", "--config", TINY, "--no-progress", *parts(tiny_parts), f"data.shards=[{colour_shards}]",
            f"train.output_dir={out}", "train.max_steps=20", "train.log_every=10", "train.save_every=20",
            f"data.caption_prompts=['{prompt}']"]  # fmt: skip
    assert main(args) == 0
    curve = losses(out)
    assert len(curve) == 2 and curve[-1] < curve[0], curve
