"""`mpm demo`: settings, the plan, the render stage, the results files, and the quick run end to end."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")

from mpm.cli import main  # noqa: E402
from mpm.core.errors import ConfigError  # noqa: E402
from mpm.demo.results import CHANCE, markdown, summarise  # noqa: E402
from mpm.demo.run import STAMP, Demo, DemoConfig, Progress, Step, render_training_set  # noqa: E402
from mpm.demo.world import load_world  # noqa: E402


def test_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="unknown demo stage"):
        DemoConfig(output=str(tmp_path), stage="train")
    with pytest.raises(ConfigError, match="seeds"):
        DemoConfig(output=str(tmp_path), seeds=0)
    with pytest.raises(ConfigError, match="give en"):
        Demo(DemoConfig(output=str(tmp_path), langs=["zh", "de"]))
    with pytest.raises(ConfigError, match="at least one other"):
        Demo(DemoConfig(output=str(tmp_path), langs=["en"]))
    with pytest.raises(ConfigError, match="--native fr"):
        Demo(DemoConfig(output=str(tmp_path), langs=["en", "zh"], native=["fr"]))
    with pytest.raises(ConfigError, match="--native en"):
        Demo(DemoConfig(output=str(tmp_path), native=["en"]))
    assert Demo(DemoConfig(output=str(tmp_path), quick=True, native=["zh"])).natives == ["zh"]  # asked for: kept
    assert Demo(DemoConfig(output=str(tmp_path), langs=["en", "zh", "de"])).langs == ["en", "de", "zh"]  # world order
    with pytest.raises(ConfigError, match="no world file"):
        Demo(DemoConfig(output=str(tmp_path), langs=["en", "xx"]))
    with pytest.raises(ConfigError, match="--output"):
        Demo(DemoConfig())


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path), "--langs", "en,xx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "xx" in err and "configs/world" in err


def test_plan_names_every_command(tmp_path):
    quick = Demo(DemoConfig(output=str(tmp_path), quick=True))
    assert quick.langs == ["en", "de", "zh"] and quick.natives == []  # quick: no native bound, no t2i control
    assert not any("t2i control" in s.name for s in quick.plan())
    demo = Demo(DemoConfig(output=str(tmp_path), langs=["en", "zh", "de"], seeds=2, native=["all"], i2t_steps=50))
    assert demo.natives == ["de", "zh"]
    steps = demo.plan()
    commands = [s.command for s in steps]
    assert commands[0] == f"mpm demo judge --output {tmp_path} --langs en,de,zh --i2t-steps 50"
    for seed in (0, 1):
        cfg = tmp_path / f"seed{seed}" / "configs"
        for expected in (f"mpm data shard --config {cfg}/shard_en.yaml", f"mpm train i2t --config {cfg}/i2t.yaml",
                         f"mpm train i2t --config {cfg}/i2t_en.yaml", f"mpm train i2t --config {cfg}/i2t_native_de.yaml",
                         f"mpm eval caption --config {cfg}/eval_i2t.yaml", f"mpm train t2i --config {cfg}/t2i.yaml",
                         f"mpm eval paint --config {cfg}/eval_t2i_en.yaml",
                         f"mpm demo pretrain-lm --output {tmp_path} --seed {seed} --langs en,de,zh --i2t-steps 50"):  # fmt: skip
            assert expected in commands, expected
    assert steps[-1].name == "results"
    assert all(s.budget > 0 for s in steps)
    only = Demo(DemoConfig(output=str(tmp_path), quick=True, stage="render")).plan()
    assert [s.name for s in only] == ["render (seed 0)"]
    no_extras = Demo(DemoConfig(output=str(tmp_path), control=False, t2i=False, native=["none"])).plan()
    assert not any("control" in s.name or "t2i" in s.name or "native" in s.name for s in no_extras)


def test_progress_prints_a_line_per_stage_with_time_left():
    lines, ran = [], []
    steps = [Step("a", 60.0, lambda: ran.append("a"), "mpm x"), Step("b", 30.0, lambda: ran.append("b"))]
    Progress(steps, lines.append).run()
    assert ran == ["a", "b"]
    text = "\n".join(lines)
    assert "plan (estimated" in text and "~1m30s" in text  # the budget table's total
    assert "[1/2] a (0s elapsed, ~1m30s left)" in text and "$ mpm x" in text and "[2/2] b" in text


def test_render_writes_sidecars_the_sharder_reads_and_is_cached(tmp_path):
    world = load_world(["en", "zh"])
    folder = render_training_set(world, ["en", "zh"], tmp_path / "world", 12, seed=3)
    images = sorted((folder / "images").glob("*.png"))
    assert len(images) == 12
    meta = json.loads(images[0].with_suffix(".json").read_text(encoding="utf-8"))
    assert set(meta) >= {"caption_en", "caption_zh", "colour", "shape", "size", "position"}
    parsed = world.parse(meta["caption_zh"], "zh")
    assert {k: parsed[k] for k in ("colour", "shape", "size", "position")} == {
        k: meta[k] for k in ("colour", "shape", "size", "position")
    }
    stamp = images[0].stat().st_mtime_ns
    render_training_set(world, ["en", "zh"], tmp_path / "world", 12, seed=3)  # cached: nothing rewritten
    assert images[0].stat().st_mtime_ns == stamp
    other = render_training_set(world, ["en", "zh"], tmp_path / "world2", 12, seed=4)
    assert (other / "images" / "000000.png").read_bytes() != images[0].read_bytes()  # each seed re-renders
    fewer = render_training_set(world, ["en", "zh"], tmp_path / "world", 8, seed=3)  # other settings: nothing stale
    assert len(list((fewer / "images").glob("*.png"))) == 8 and len(list((fewer / "images").glob("*.json"))) == 8


def test_stages_are_redone_when_their_settings_or_inputs_change(tmp_path):
    """The shard stage through the real `mpm data shard`: skipped when nothing changed; redone from scratch (the old
    output deleted) when its input render changed."""
    lines: list[str] = []
    demo = Demo(DemoConfig(output=str(tmp_path), langs=["en", "zh"], train_images=12), log=lines.append,
                show_progress=False, runner=main)  # fmt: skip
    r = demo.seed_run(0)
    render_training_set(demo.world, demo.langs, r.world, 12, seed=0)
    step = demo.shard_step(r, "en")
    step.run()
    stamp = (r.shards / "en" / STAMP).read_text()
    step.run()
    assert lines[-1].endswith("already made from these settings and inputs, skipped")
    render_training_set(demo.world, demo.langs, r.world, 10, seed=0)
    lines.clear()
    step.run()
    assert any("made again" in line for line in lines)
    assert (r.shards / "en" / STAMP).read_text() != stamp
    from dataproc.shard_layout import total_stats

    assert total_stats(r.shards / "en")["count"] == 10  # nothing of the 12-scene render survived


def test_results_table_reads_spread_and_marks_missing_cells():
    assert summarise([0.5, None, 0.7]) == pytest.approx({"mean": 0.6, "sd": 0.1414, "min": 0.5, "max": 0.7, "n": 2},
                                                         abs=1e-4)  # fmt: skip
    assert summarise([None]) is None
    results = {
        "seeds": [0, 1],
        "table": {"en": {"i2t_all": summarise([0.9, 1.0]), "i2t_ratio": summarise([1.0, 1.0])},
                  "zh": {"i2t_all": summarise([0.8, 0.9]), "i2t_control_all": summarise([0.0, 0.0])}},
        "judge": {"accuracy": {"all": 0.99}},
        "per_seed": [{"seed": 0, "lms": {"lm": {"oracle": {"en": 1.0}, "steps": 750}}},
                     {"seed": 1, "lms": {}}],
    }  # fmt: skip
    text = markdown(results)
    assert "mean ± sd over 2 seeds" in text
    assert "| en | 95.0 ± 7.1 |" in text and "| zh | 85.0 ± 7.1 |" in text
    assert "| 0.0 ± 0.0 |" in text  # the control
    assert f"{CHANCE * 100:.1f}%" in text and "99.0%" in text and "after 750 steps" in text


@pytest.mark.timeout(600)
def test_quick_demo_end_to_end(tmp_path, capsys):
    """The README's main job at quick size: every stage through the real commands, then a cached rerun."""
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "-o", str(out), "--no-progress", "--threads", "2", "--align"]) == 0
    log = capsys.readouterr().out
    for command in ("mpm data shard --config", "mpm train i2t --config", "mpm eval caption --config",
                    "mpm train t2i --config", "mpm eval paint --config", "mpm train align --config"):  # fmt: skip
        assert command in log
    for name in ("results.json", "results.md", "results.png", "grid.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    table = results["table"]
    assert results["judge"]["accuracy"]["all"] >= 0.95
    assert table["en"]["i2t_all"]["mean"] > 0.3  # far above chance (1/240)
    for lang in ("zh", "de"):
        assert table[lang]["i2t_all"]["mean"] > 0.1  # zero-shot: trained on English pairs only
        assert table[lang]["i2t_control_all"]["mean"] <= CHANCE + 0.05  # the English-only LM cannot transfer
        assert table[lang]["i2t_fidelity"] is not None
    assert (out / "eval" / "captions.jsonl").is_file()  # the held-out set, reusable with `mpm eval caption`
    (aligned,) = results["align"]  # --align: hallucination before and after, per language and variant
    for variant in ("before", "ddpo", "ddpo_lora", "rlaifv"):
        assert set(aligned[variant]) == {"en", "zh", "de"} and aligned[variant]["en"]["answers"] == 12
    assert aligned["counts"]["corrections"] > 0 and aligned["counts"]["rlaifv_claims"] > 0
    assert "## Alignment on English feedback only" in (out / "results.md").read_text(encoding="utf-8")
    assert main(["demo", "--quick", "-o", str(out), "--no-progress"]) == 0  # the rerun: every stage cached
    rerun = capsys.readouterr().out
    planned = Demo(DemoConfig(output=str(out), quick=True)).plan()
    commands = sum(1 for s in planned if s.command.startswith("mpm ") and not s.command.startswith("mpm demo "))
    assert commands == 7  # shard, i2t, its eval, the control and its eval, t2i and its eval
    assert rerun.count("already made from these settings and inputs, skipped") == commands
    assert rerun.count("reusing it") == 3  # both LMs and the judge
