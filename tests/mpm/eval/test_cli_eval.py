"""`mpm eval caption / chair / mmbench / paint / report` through the real CLI entry (mpm.cli.main) on tiny saved
models (a random MPM model, a pixel-space MPMPaintPipeline, a random CLIP) and hand-made files: exit statuses,
the files written, aggregates recomputed from items.jsonl, one-line errors, and every subcommand's --help."""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mpm.cli import main
from tests.conftest import image_bytes
from tests.mpm.eval.test_caption import write_data
from tests.mpm.eval.test_chair import write_coco

UNET_CONFIG = "configs/t2i/unet_tiny_32px.json"
SUBCOMMANDS = ("caption", "vqa", "chair", "mmbench", "paint", "report")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: one thread is faster, and several spin-wait badly on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(capsys, *args) -> tuple[int, str, str]:
    """`mpm eval ARGS`: (exit status, stdout, stderr)."""
    status = main(["eval", *map(str, args)])
    out = capsys.readouterr()
    return status, out.out, out.err


def one_line_error(err: str) -> str:
    """The error of a refused command: one line, `error: ...`, the last of stderr (a loading bar may come first), and
    no traceback."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error")]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("error: "), err
    assert "Traceback" not in err, err
    return errors[0]


def read_items(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "items.jsonl").read_text(encoding="utf-8").splitlines()]


# -- tiny saved models ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random MPM model (CLIP vision, Qwen2 LLM) saved with its processor (test_caption.py's pattern)."""
    from mpm.modeling import MPMForConditionalGeneration
    from tests.mpm.conftest import make_tokenizer, text_config, vision_config

    tok = make_tokenizer()
    torch.manual_seed(0)
    model, processor = MPMForConditionalGeneration.from_parts(
        vision_config("clip"), text_config("qwen2", len(tok)), tokenizer=tok, num_queries=4, image_size=32
    )
    folder = tmp_path_factory.mktemp("mpm_model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def paint_dir(tmp_path_factory) -> Path:
    """A saved pixel-space MPMPaintPipeline: a tiny Qwen2 LLM (64 wide, random) and the tiny UNet config."""
    from transformers import Qwen2ForCausalLM

    from t2i import MPMPaintPipeline
    from tests.mpm.conftest import make_tokenizer, text_config

    llm = tmp_path_factory.mktemp("paint_llm")
    tok = make_tokenizer()
    torch.manual_seed(0)
    config = text_config("qwen2", len(tok))
    config.hidden_size, config.intermediate_size = 64, 128
    Qwen2ForCausalLM(config).save_pretrained(llm)
    tok.save_pretrained(llm)
    folder = tmp_path_factory.mktemp("paint_model")
    torch.manual_seed(0)
    MPMPaintPipeline.from_parts(llm, unet=UNET_CONFIG).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    from tests.t2i.test_scoring import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


# -- paint ---------------------------------------------------------------------------------------------------------------
PAINT_PROMPTS = [  # two ids, each in English and Chinese
    {"id": "0", "lang": "en", "prompt": "A red circle on a white table"},
    {"id": "0", "lang": "zh", "prompt": "白色桌子上的红色圆圈"},
    {"id": "1", "lang": "en", "prompt": "A blue square and a green square"},
    {"id": "1", "lang": "zh", "prompt": "一个蓝色方块和一个绿色方块"},
]


def test_paint_with_a_scorer_then_with_the_clip_score_judge_given_by_a_dotted_option(paint_dir, clip_dir, tmp_path,
                                                                                     capsys):  # fmt: skip
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in PAINT_PROMPTS), encoding="utf-8")
    out = tmp_path / "out"
    base = ["paint", "--model", paint_dir, "--prompts", prompts, "--langs", "en,zh", "--steps", 2, "--size", 16,
            "-o", out, "--no-progress", "device=cpu"]  # fmt: skip
    status, stdout, err = run(capsys, *base, "--scorer", clip_dir)
    assert status == 0, err
    assert " prompts" not in err and "| 2/2 [" not in err  # --no-progress: no prompt bar, no sampling bar
    assert "| en |" in stdout and "| zh |" in stdout
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    rows = read_items(out)
    assert results["task"] == "paint" and list(results["languages"]) == ["en", "zh"]
    assert results["scorer"] == str(clip_dir) and results["model"] == str(paint_dir)
    assert [(r["lang"], r["id"]) for r in rows] == [("en", "0"), ("en", "1"), ("zh", "0"), ("zh", "1")]
    for lang, metrics in results["languages"].items():
        mine = [r for r in rows if r["lang"] == lang]
        assert metrics["images"] == 2 and all((out / r["image"]).is_file() for r in mine)
        assert metrics["clip_score"] == pytest.approx(np.mean([r["clip_score"] for r in mine]), rel=1e-6)
        assert metrics["clip_score_en"] == pytest.approx(np.mean([r["clip_score_en"] for r in mine]), rel=1e-6)
    en, zh = results["languages"]["en"], results["languages"]["zh"]
    assert en["clip_score_en"] == pytest.approx(en["clip_score"])  # English images against their own prompts
    assert "consistency" not in en
    zh_rows = [r for r in rows if r["lang"] == "zh"]
    assert zh["consistency"] == pytest.approx(np.mean([r["consistency"] for r in zh_rows]), rel=1e-6)
    assert -1 <= zh["consistency"] <= 1
    assert (out / "table.md").read_text(encoding="utf-8").count("| zh |") == 1
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # No --scorer: the registered clip_score judge, its model given as a dotted override of metric_options
    status, _, err = run(capsys, *base, "--metric", "clip_score", f"metric_options.clip_score.model={clip_dir}")
    assert status == 0, err
    again = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert again["scorer"] is None and again["judges"]["clip_score"]["details"]["en"]["model"] == str(clip_dir)
    for lang in ("en", "zh"):  # the same images (a rerun draws nothing) scored by the same CLIP
        assert again["languages"][lang]["clip_score"] == pytest.approx(results["languages"][lang]["clip_score"],
                                                                       rel=1e-5)  # fmt: skip
        assert "clip_score_en" not in again["languages"][lang]
    again_rows = read_items(out)
    np.testing.assert_allclose([r["clip_score"] for r in again_rows], [r["clip_score"] for r in rows], rtol=1e-5)

    # the judge without its model option is refused in one line, before anything is drawn
    status, _, err = run(capsys, *base[:11], "-o", tmp_path / "none", "device=cpu", "--metric", "clip_score")
    assert status == 2 and "clip_score" in one_line_error(err) and "model" in err
    assert not (tmp_path / "none").exists()


# -- chair ---------------------------------------------------------------------------------------------------------------
def test_chair_from_predictions_by_hand_and_model_xor_predictions(tmp_path, capsys):
    instances, captions = write_coco(tmp_path)  # image 1: dog, frisbee (+ person from its captions); 2: cat, couch
    predictions = tmp_path / "predictions.jsonl"
    lines = [
        {"image": "COCO_val2014_000000000001.jpg", "lang": "en", "output": "A man and two dogs play with a frisbee."},
        {"image": "COCO_val2014_000000000001.jpg", "lang": "en", "output": "A dog sits on a bench next to a cat."},
        {"image": "COCO_val2014_000000000002.jpg", "lang": "en", "output": "A kitten sleeps on the sofa."},
    ]  # fmt: skip
    predictions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    status, stdout, err = run(capsys, "chair", "--predictions", predictions, "--instances", instances,
                              "--captions", captions, "-o", out)  # fmt: skip
    assert status == 0, err
    # mentions: (man, dogs, frisbee) all present; (dog, bench, cat): bench and cat hallucinated; (kitten, sofa) present
    # CHAIR_s = 1 hallucinating description of 3; CHAIR_i = 2 hallucinated mentions of 3 + 3 + 2 = 8
    en = json.loads((out / "results.json").read_text())["languages"]["en"]
    assert en["chair_s"] == pytest.approx(1 / 3) and en["chair_i"] == pytest.approx(2 / 8)
    assert (en["captions"], en["mentions"], en["hallucinated"], en["missing_images"]) == (3, 8, 2, 0)
    assert [r["chair_s"] for r in read_items(out)] == [0, 1, 0]
    assert "| en |" in stdout and (out / "table.md").is_file()

    both = ["--model", tmp_path / "model", "--predictions", predictions]
    for given in (both, []):
        status, _, err = run(capsys, "chair", *given, "--instances", instances, "-o", tmp_path / "refused")
        assert status == 2 and "--model" in one_line_error(err) and "--predictions" in err
    assert not (tmp_path / "refused").exists()


# -- mmbench -------------------------------------------------------------------------------------------------------------
RED = base64.b64encode(image_bytes((40, 30), (220, 30, 30), "PNG")).decode()
BLUE = base64.b64encode(image_bytes((30, 40), (30, 30, 220), "PNG")).decode()


def write_tsv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, ["index", "question", "A", "B", "C", "answer", "category", "image"], delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_mmbench_in_english_and_chinese_gives_the_transfer_ratio(model_dir, tmp_path, capsys):
    en = write_tsv(tmp_path / "en.tsv", [
        {"index": "1", "question": "What colour is it?", "A": "red", "B": "blue", "C": "green", "answer": "A",
         "category": "colour", "image": RED},
        {"index": "2", "question": "What colour is it?", "A": "red", "B": "blue", "answer": "B", "image": BLUE},
    ])  # fmt: skip
    zh = write_tsv(tmp_path / "zh.tsv", [
        {"index": "1", "question": "这是什么颜色？", "A": "红色", "B": "蓝色", "C": "绿色", "answer": "A",
         "category": "colour", "image": RED},
        {"index": "2", "question": "这是什么颜色？", "A": "红色", "B": "蓝色", "answer": "B", "image": BLUE},
    ])  # fmt: skip
    out = tmp_path / "out"
    status, stdout, err = run(capsys, "mmbench", "--model", model_dir, "--data", en, "--data", zh, "--langs", "en,zh",
                              "-o", out, "device=cpu", "max_new_tokens=3")  # fmt: skip
    assert status == 0, err
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert list(results["languages"]) == ["en", "zh"] and results["data"] == [str(en), str(zh)]
    items = read_items(out)
    assert [(r["lang"], r["index"]) for r in items] == [("en", "1"), ("en", "2"), ("zh", "1"), ("zh", "2")]
    for lang in ("en", "zh"):
        summary, rows = results["languages"][lang], [r for r in items if r["lang"] == lang]
        assert (summary["questions"], summary["answers"]) == (2, 5)
        assert summary["accuracy"] == sum(r["correct"] for r in rows) / 2
        assert summary["unparsed"] == sum(a["predicted"] is None for r in rows for a in r["rotations"])
    assert items[2]["prompt"].startswith("这是什么颜色？\nA. 红色\nB. 蓝色\nC. 绿色\n请直接回答")
    en_accuracy, zh_accuracy = results["languages"]["en"]["accuracy"], results["languages"]["zh"]["accuracy"]
    # a random model mostly scores 0 in English: then the ratio is None, never a division by zero
    expected = zh_accuracy / en_accuracy if en_accuracy else None
    assert results["languages"]["zh"]["transfer_ratio"] == {"accuracy": expected}
    assert "transfer_ratio" not in results["languages"]["en"]
    assert "| zh |" in stdout and (out / "table.md").is_file()

    status, _, err = run(capsys, "mmbench", "--model", model_dir, "--data", en, "--langs", "en,zh",
                         "-o", tmp_path / "refused")  # fmt: skip
    assert status == 2 and "1 files for 2 languages" in one_line_error(err)
    assert not (tmp_path / "refused").exists()


# -- caption -------------------------------------------------------------------------------------------------------------
def test_caption_with_a_raw_prompt_file_and_an_unknown_language_in_it(model_dir, tmp_path, capsys):
    from mpm.eval.languages import LANGUAGES

    data, images = write_data(tmp_path, missing=None)
    prompts = tmp_path / "prompts.yaml"
    raw = "<image>用中文描述："
    prompts.write_text(f'zh: "{raw}"\n', encoding="utf-8")
    out = tmp_path / "out"
    status, _, err = run(capsys, "caption", "--model", model_dir, "--data", data, "--images", images,
                         "--langs", "en,zh", "--prompts", prompts, "--max-images", 2, "--max-new-tokens", 4,
                         "--device", "cpu", "-o", out, "--no-progress")  # fmt: skip
    assert status == 0, err
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["prompts"] == {"en": LANGUAGES["en"].prompt, "zh": raw}  # only zh overridden
    rows = read_items(out)
    assert [r["prompt"] for r in rows if r["lang"] == "zh"] == [raw, raw]
    assert all(isinstance(r["output"], str) for r in rows) and results["languages"]["zh"]["items"] == 2

    prompts.write_text('zh: "用中文描述。"\nxx: "?"\n', encoding="utf-8")
    status, _, err = run(capsys, "caption", "--model", model_dir, "--data", data, "--images", images,
                         "--langs", "en,zh", "--prompts", prompts, "-o", tmp_path / "refused")  # fmt: skip
    assert status == 2 and "unknown language code 'xx'" in one_line_error(err)
    assert not (tmp_path / "refused").exists()


# -- report, --help ------------------------------------------------------------------------------------------------------
def test_report_of_a_missing_file_is_a_one_line_error(tmp_path, capsys):
    status, stdout, err = run(capsys, "report", tmp_path / "nope" / "results.json")
    assert status == 2 and stdout == ""
    assert "nope" in one_line_error(err) and "not a results file" in err


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", command, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse rewraps the epilog
    assert f"usage: mpm eval {command}" in text and f"example: mpm eval {command} " in text
