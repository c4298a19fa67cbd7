"""A hub id without a network fails in seconds with one line; local folders are never checked."""

import time
from pathlib import Path

import pytest

from mpm.core.errors import ModelLoadError
from mpm.core.hub import check_model_source, unreachable


@pytest.fixture
def no_hub(monkeypatch):
    """A hub endpoint where nothing listens (a closed port on 127.0.0.1): what a machine without network sees."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")
    unreachable.cache_clear()
    yield
    unreachable.cache_clear()


def test_an_unreachable_hub_id_is_one_line_in_seconds(no_hub):
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        check_model_source("model.llm", "Qwen/Qwen2.5-0.5B-Instruct")
    message = str(info.value)
    assert time.monotonic() - start < 5 and "\n" not in message
    assert message.startswith("model.llm='Qwen/Qwen2.5-0.5B-Instruct' is not a local folder, and the model hub")
    assert "refused" in message and "/path/to/model" in message and "HF_HUB_OFFLINE=1" in message


def test_local_folders_pass_and_missing_paths_are_named(no_hub, tmp_path):
    check_model_source("model.llm", tmp_path)  # a folder: nothing to check
    check_model_source("model.llm", str(tmp_path))
    with pytest.raises(ModelLoadError, match="model.vision='./nowhere/at/all': no such folder"):
        check_model_source("model.vision", "./nowhere/at/all")


def test_the_cli_fails_fast_on_an_unreachable_hub_id(no_hub, tmp_path, capsys):
    from mpm.cli import main

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "00000.tar").write_bytes(b"")
    start = time.monotonic()
    tiny = Path(__file__).parents[3] / "configs" / "i2t" / "tiny.yaml"
    args = ["train", "i2t", "--config", str(tiny), "model.vision=google/siglip-base-patch16-224",
            "model.llm=Qwen/Qwen2.5-0.5B", f"data.shards=[{tmp_path / 'shards'}]", f"train.output_dir={tmp_path / 'o'}"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - start < 10 and err.count("\n") == 1
    assert "model.vision='google/siglip-base-patch16-224' is not a local folder" in err
