"""`mpm eval caption` / `vqa` / `report` end to end: a tiny MPM model (random weights, from configs) on tiny files in
tmp_path; aggregates recomputed from the per-item rows; predictions scored without a model; bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from mpm.cli import main
from mpm.eval.scorers import Scores, TextScorer

REPO = Path(__file__).parents[3]


class ShoutRate(TextScorer):
    """A scorer defined outside the eval code: loaded with --metric tests.mpm.eval.test_caption:ShoutRate."""

    name = "shout_rate"

    def score(self, items, lang):
        shouts = [float(item["output"].isupper()) for item in items]
        return Scores({"shout_rate": sum(shouts) / max(len(shouts), 1)}, per_item=shouts, details={"saw": lang})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from mpm.modeling import MPMForConditionalGeneration
    from tests.mpm.conftest import make_tokenizer, text_config, vision_config

    tok = make_tokenizer()
    model, processor = MPMForConditionalGeneration.from_parts(
        vision_config("clip"), text_config("qwen2", len(tok)), tokenizer=tok, num_queries=4, image_size=32
    )
    folder = tmp_path_factory.mktemp("mpm_model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_data(root: Path, missing: str | None = "3.png") -> tuple[Path, Path]:
    """Four images (one missing from the folder), English, Chinese and German references."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    refs = {
        "en": [
            "a red square on a white page",
            "a green square on a white page",
            "a blue square on a white page",
            "a yellow square on a white page",
        ],
        "zh": ["红色的方块", "绿色的方块", "蓝色的方块", "黄色的方块"],
        "de": [
            "ein rotes Quadrat auf einer weißen Seite",
            "ein grünes Quadrat auf einer weißen Seite",
            "ein blaues Quadrat auf einer weißen Seite",
            "ein gelbes Quadrat auf einer weißen Seite",
        ],
    }
    lines = []
    for i in range(4):
        if f"{i}.png" != missing:
            Image.new("RGB", (32, 32), (60 * i, 100, 200)).save(images / f"{i}.png")
        for lang, texts in refs.items():
            lines.append({"image": f"{i}.png", "lang": lang, "references": [texts[i], texts[i] + "!"], "colour": i})
    data = root / "captions.jsonl"
    data.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    return data, images


def run(capsys, *args) -> tuple[int, str, str]:
    status = main(["eval", *map(str, args)])
    out = capsys.readouterr()
    return status, out.out, out.err


def test_caption_with_a_model_writes_results_whose_aggregates_match_the_items(model_dir, tmp_path, capsys):
    data, images = write_data(tmp_path)
    out = tmp_path / "out"
    status, stdout, err = run(capsys, "caption", "--model", model_dir, "--data", data, "--images", images,
                              "--langs", "en,zh", "-o", out, "--max-new-tokens", 6, "--no-progress",
                              "--metric", "cider", "--metric", "tests.mpm.eval.test_caption:ShoutRate")  # fmt: skip
    assert status == 0, err
    assert "| en |" in stdout and "| zh |" in stdout
    results = json.loads((out / "results.json").read_text())
    items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert results["task"] == "caption" and results["missing_images"] == ["3.png"]
    assert {r["image"] for r in items} == {"0.png", "1.png", "2.png"}  # the missing image is listed, not scored
    for lang in ("en", "zh"):
        summary = results["languages"][lang]
        rows = [r for r in items if r["lang"] == lang]
        assert summary["items"] == 3 and summary["missing_images"] == 1
        # CIDEr-D of a corpus is the mean of its images' scores; the custom scorer's too
        assert summary["cider"] == pytest.approx(sum(r["cider"] for r in rows) / 3)
        assert summary["shout_rate"] == pytest.approx(sum(r["shout_rate"] for r in rows) / 3)
        # fidelity: passes over every output (too short to judge = not passing); fidelity_judged: over the judged
        assert summary["fidelity"] == pytest.approx(sum(r["in_language"] is True for r in rows) / 3)
        judged = [r["in_language"] for r in rows if r["in_language"] is not None]
        assert summary["fidelity_judged"] == (pytest.approx(sum(judged) / len(judged)) if judged else None)
        in_language = [r["cider"] for r in rows if r["in_language"]]
        if in_language:  # the in-language CIDEr averages the whole set's per-item values (one idf)
            assert summary["in_language"]["cider"] == pytest.approx(sum(in_language) / len(in_language))
        assert rows[0]["prompt"] == results["prompts"][lang]
    assert results["prompts"]["zh"] != results["prompts"]["en"]  # asked in each language
    assert results["tokenizers"] == {"en": "words", "zh": "chars"}  # one per language, recorded
    assert results["languages"]["en"]["transfer_ratio"].get("cider") in (1.0, None)
    assert (out / "table.md").is_file() and (out / "chart.png").is_file()


def test_predictions_are_scored_without_a_model_against_hand_computed_values(tmp_path, capsys):
    data, _ = write_data(tmp_path, missing=None)
    predictions = tmp_path / "predictions.jsonl"
    rows = [
        # English: exact copies of a reference -> BLEU 100; in English -> fidelity 1
        *(
            {
                "image": f"{i}.png",
                "lang": "en",
                "output": f"a {['red', 'green', 'blue', 'yellow'][i]} square on a white page",
            }
            for i in range(4)
        ),  # fmt: skip
        # German: two in German, one in English (wrong language), one empty (too short to judge)
        {"image": "0.png", "lang": "de", "output": "ein rotes Quadrat auf einer weißen Seite"},
        {"image": "1.png", "lang": "de", "output": "ein grünes Quadrat auf einer weißen Seite"},
        {"image": "2.png", "lang": "de", "output": "this is a blue square on a white background"},
        {"image": "3.png", "lang": "de", "output": ""},
    ]
    predictions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out"
    status, _, err = run(capsys, "caption", "--predictions", predictions, "--data", data, "--langs", "en,de",
                         "-o", out, "--metric", "bleu4")  # fmt: skip
    assert status == 0, err
    results = json.loads((out / "results.json").read_text())
    en, de = results["languages"]["en"], results["languages"]["de"]
    assert en["bleu4"] == pytest.approx(100.0)
    assert en["fidelity"] == 1.0
    assert de["fidelity"] == pytest.approx(2 / 4)  # 2 of 4 in German (the empty one is too short: not passing)
    assert de["fidelity_judged"] == pytest.approx(2 / 3)  # 3 judged, 2 in German
    assert de["fidelity_detail"]["too_short"] == 1 and de["fidelity_detail"]["wrong"] == 1
    assert de["in_language"]["items"] == 2 and de["in_language"]["bleu4"] == pytest.approx(100.0)
    assert de["transfer_ratio"]["bleu4"] == pytest.approx(de["bleu4"] / 100.0)
    assert results["predictions"] == str(predictions) and results["model"] is None


def test_vqa_jsonl_with_exact_match(tmp_path, capsys):
    data = tmp_path / "vqa.jsonl"
    lines = [
        {"id": "q1", "image": "a.png", "lang": "en", "question": "What colour is it?", "answers": ["Red", "red"]},
        {"id": "q2", "image": "b.png", "lang": "en", "question": "How many?", "answers": ["two"]},
        {"id": "q1", "image": "a.png", "lang": "zh", "question": "这是什么颜色？", "answers": ["红色"]},
    ]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")
    predictions = tmp_path / "p.jsonl"
    outputs = [{"id": "q1", "lang": "en", "output": "red."}, {"id": "q2", "lang": "en", "output": "three"},
               {"id": "q1", "lang": "zh", "output": "红色"}]  # fmt: skip
    predictions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in outputs), encoding="utf-8")
    status, _, err = run(capsys, "vqa", "--predictions", predictions, "--data", data, "--langs", "en,zh", "-o",
                         tmp_path / "out")  # fmt: skip
    assert status == 0, err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["languages"]["en"]["exact_match"] == pytest.approx(0.5)  # "red." normalises to "red"
    assert results["languages"]["zh"]["exact_match"] == pytest.approx(1.0)


def test_report_compares_runs_of_one_benchmark_and_refuses_another(tmp_path, capsys):
    data, _ = write_data(tmp_path, missing=None)
    runs = []
    for name, text in (("copy", None), ("constant", "a square")):
        predictions = tmp_path / f"{name}.jsonl"
        lines = [
            {"image": f"{i}.png", "lang": "en", "output": text or f"a {c} square on a white page"}
            for i, c in enumerate(["red", "green", "blue", "yellow"])
        ]
        predictions.write_text("".join(json.dumps(r) + "\n" for r in lines))
        assert run(capsys, "caption", "--predictions", predictions, "--data", data, "-o", tmp_path / name)[0] == 0
        runs.append(tmp_path / name / "results.json")
    status, stdout, err = run(capsys, "report", *runs)
    assert status == 0, err
    assert "cider [" in stdout and stdout.count("| en |") == 1
    other = json.loads(runs[1].read_text())
    other["task"] = "vqa"
    (tmp_path / "other.json").write_text(json.dumps(other))
    status, _, err = run(capsys, "report", runs[0], tmp_path / "other.json")
    assert status == 2 and "compare results of the same benchmark" in err


def test_bad_input_gets_one_line_errors(model_dir, tmp_path, capsys):
    data, images = write_data(tmp_path)
    status, _, err = run(
        capsys, "caption", "--model", model_dir, "--data", data, "--langs", "en,xx", "-o", tmp_path / "o"
    )
    assert status == 2 and "xx" in err and "zh" in err  # the unknown code, and the known ones listed
    status, _, err = run(
        capsys, "caption", "--model", model_dir, "--data", data, "--langs", "en,fr", "-o", tmp_path / "o"
    )
    assert status == 2 and "no references for fr" in err and "de, en, zh" in err
    status, _, err = run(capsys, "caption", "--data", data, "--langs", "en", "-o", tmp_path / "o")
    assert status == 2 and "--model" in err and "--predictions" in err
    (tmp_path / "bad.jsonl").write_text('{"image": "0.png", "lang": "en", "references": ["x"]}\nnot json\n')
    status, _, err = run(
        capsys, "caption", "--model", model_dir, "--data", tmp_path / "bad.jsonl", "-o", tmp_path / "o"
    )
    assert status == 2 and "bad.jsonl:2: not JSON" in err


def test_xm3600_captions_are_read_natively(tmp_path):
    from mpm.eval.data import read_captions

    path = tmp_path / "captions.jsonl"
    lines = [
        {"image/key": "000411001ff7dd4f", "image/locale": "en", "en": {"caption": ["A dog.", "A brown dog."]},
         "zh": {"caption": ["一只狗。"]}, "de": {"caption": ["Ein Hund."]}},
        {"image/key": "0004be5bf9c6ed6a", "image/locale": "zh", "en": {"caption": ["A cat."]},
         "zh": {"caption": ["一只猫。"]}, "de": {"caption": ["Eine Katze."]}},
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")
    items = read_captions(path, ["en", "zh"])
    assert [i["image"] for i in items["en"]] == ["000411001ff7dd4f.jpg", "0004be5bf9c6ed6a.jpg"]
    assert items["en"][0]["references"] == ["A dog.", "A brown dog."] and items["zh"][1]["references"] == ["一只猫。"]


def test_training_logs_per_language_scores_at_every_checkpoint(tiny_parts, colour_shards, tmp_path):
    data, images = write_data(tmp_path, missing=None)
    out = tmp_path / "run"
    args = ["train", "i2t", "--config", str(REPO / "configs" / "i2t" / "tiny.yaml"), "--no-progress",
            f"model.vision={tiny_parts[0]}", f"model.llm={tiny_parts[1]}", f"data.shards=[{colour_shards}]",
            f"train.output_dir={out}", "train.max_steps=4", "train.save_every=2", f"eval.data={data}",
            f"eval.images={images}", "eval.langs=[en,zh]", "eval.max_images=2", "eval.max_new_tokens=4"]  # fmt: skip
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_cider_en" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all("eval_cider_zh" in r and "eval_fidelity_en" in r for r in evals)
    assert all(math.isfinite(r["eval_cider_zh"]) for r in evals)

    # a held-out set without the languages asked for fails before the first step, not at the first checkpoint
    args = [a for a in args if not a.startswith(("eval.langs", "train.output_dir"))]
    assert main([*args, "eval.langs=[en,fr]", f"train.output_dir={tmp_path / 'other'}"]) == 2
    assert not (tmp_path / "other" / "checkpoints").exists()


def test_languages_scored_in_worker_processes_give_the_same_results(tmp_path, capsys, monkeypatch):
    import mpm.eval.generative as generative

    data, _ = write_data(tmp_path, missing=None)
    predictions = tmp_path / "p.jsonl"
    lines = [{"image": f"{i}.png", "lang": lang, "output": text}
             for i in range(4) for lang, text in (("en", f"a square number {i} on a page"), ("zh", "红色的方块在页面上"),
                                                  ("de", "ein Quadrat auf einer weißen Seite"))]  # fmt: skip
    predictions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")
    runs = {}
    for name, threshold in (("serial", 10**9), ("workers", 1)):
        monkeypatch.setattr(generative, "PARALLEL_FROM", threshold)
        status, _, err = run(capsys, "caption", "--predictions", predictions, "--data", data, "--langs", "en,zh,de",
                             "-o", tmp_path / name)  # fmt: skip
        assert status == 0, err
        results = json.loads((tmp_path / name / "results.json").read_text())
        runs[name] = (results["languages"], (tmp_path / name / "items.jsonl").read_text())
    assert runs["serial"] == runs["workers"]
