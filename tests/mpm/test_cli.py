"""The `mpm` command line, run as users run it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mpm.cli import build_parser, main

REPO = Path(__file__).parents[2]


def subcommands(parser, prefix=()):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from subcommands(sub, (*prefix, name))


@pytest.mark.parametrize("command", list(subcommands(build_parser())), ids=" ".join)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: mpm" in out and len(out) > 200


def test_console_script_runs_synth_shard_and_stats(tmp_path):
    mpm = [sys.executable, "-m", "mpm.cli"]
    run = subprocess.run(
        [*mpm, "data", "synth", "--output", str(tmp_path / "pairs"), "--num-samples", "40"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stderr
    shard_cmd = [
        *mpm, "data", "shard", "--input", str(tmp_path / "pairs" / "pairs.jsonl"), "--output", str(tmp_path / "shards"),
        "--url-col", "url", "--caption-col", "caption", "--image-size", "64", "--resize-mode", "keep_ratio",
        "--processes", "2", "--threads", "4", "--samples-per-shard", "15", "--no-progress", "filters.min_image_size=32",
    ]  # fmt: skip
    run = subprocess.run(shard_cmd, capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "success" in run.stdout and "filtered_language" in run.stdout and "total" in run.stdout
    stats = json.loads((tmp_path / "shards" / "stats.json").read_text())
    assert stats["count"] == 40 and stats["shards"] == 3 and stats["filtered_empty_caption"] >= 1
    run = subprocess.run([*mpm, "data", "stats", str(tmp_path / "shards")], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0 and run.stdout.splitlines()[0].startswith("status")
    assert f"{stats['successes']:>10,}" in run.stdout


def test_config_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["data", "shard", "--input", str(tmp_path / "missing.parquet"), "--output", str(tmp_path / "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(["data", "shard", "--output", str(tmp_path / "o")]) == 2
    assert "no input: pass --input" in capsys.readouterr().err
    assert main(["data", "shard", "--input", "x", "--output", "y", "resize.nope=1"]) == 2
    assert "resize.nope" in capsys.readouterr().err
    assert main(["data", "stats", str(tmp_path)]) == 2
    assert "holds no complete shard" in capsys.readouterr().err


def test_print_config_shows_flags_and_overrides(capsys):
    assert (
        main(
            [
                "data",
                "shard",
                "--config",
                str(REPO / "configs/data/laion.yaml"),
                "--image-size",
                "300",
                "filters.languages=[en,zh]",
                "--print-config",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "image_size: 300" in out and "url_col: URL" in out and "- zh" in out


def test_version_and_print_config_of_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("mpm-toolkit ")
    for command in (["data", "stats", "some/folder"], ["data", "synth", "--num-samples", "7"], ["unimm", "synth"],
                    ["chat", "--model", "m", "--image", "a.png", "--image", "b.png", "hi"], ["export", "llava"]):  # fmt: skip
        assert main([*command, "--print-config"]) == 0
        out = capsys.readouterr().out
        assert out and "error" not in out
    assert main(["chat", "--model", "m", "--image", "a.png", "--image", "b.png", "hi", "--print-config"]) == 0
    assert "- a.png\n- b.png" in capsys.readouterr().out  # a repeated flag fills a list key


def test_words_are_overrides_only_when_they_name_a_config_key(capsys):
    assert main(["chat", "--model", "m", "x=1?", "max_new_tokens=5", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "prompt: x=1?" in out and "max_new_tokens: 5" in out
    assert main(["data", "stats", "folder=shards/", "--print-config"]) == 0
    assert "folder: shards/" in capsys.readouterr().out
    assert main(["chat", "--model", "m", "two", "words"]) == 2
    assert "expected one prompt, got 2 words" in capsys.readouterr().err


def test_overrides_may_follow_flags_and_unknown_flags_are_refused(capsys):
    args = ["data", "shard", "--input", "x", "resize.image_size=300", "--processes", "2", "filters.min_image_size=5"]
    assert main([*args, "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "image_size: 300" in out and "min_image_size: 5" in out and "processes: 2" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "shard", "--input", "x", "--bogus"])
    assert (
        exit_info.value.code == 2
        and "mpm data shard: error: unrecognized arguments: --bogus" in capsys.readouterr().err
    )


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("")
    assert main(["unimm", "build", "--coco-captions", "x.json", "--output", str(tmp_path / "afile" / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file, not a folder" in err
    assert main(["unimm", "translate", "--input", "c.json", "--langs", "de", "--backend", "openai", "--model", "m",
                 "--base-url", "ftp://x", "--output", str(tmp_path / "t")]) == 2  # fmt: skip
    assert "`openai.base_url` must start with http:// or https://" in capsys.readouterr().err

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("dataproc.synthetic.write_pairs", broken)
    with pytest.raises(RuntimeError, match="a bug"):  # not a UserError: the traceback is the user's bug report
        main(["data", "synth", "--output", str(tmp_path / "pairs")])
