"""Run folders: the metrics log rewinds to a checkpoint; resume checks (the recipes test checkpoints end to end)."""

from types import SimpleNamespace

from mpm.core.runs import Metrics


def test_metrics_rewind_to_the_checkpoint_and_survive_a_row_cut_by_a_kill(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    Metrics(tmp_path, SimpleNamespace(is_main_process=True), resumed_at=2)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    Metrics(tmp_path, SimpleNamespace(is_main_process=True), resumed_at=None)  # a new run: a new file
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_a_checkpoint_of_an_earlier_format_is_refused_with_the_reason(tmp_path):
    import json

    import pytest

    from mpm.core.errors import ConfigError
    from mpm.core.runs import Checkpoints

    folder = tmp_path / "checkpoints" / "step-0000010"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"step": 10, "epoch": 0, "batches_in_epoch": 10, "processes": 1}))
    assert Checkpoints(tmp_path, 2).latest() == folder
    with pytest.raises(ConfigError, match="earlier version .* format 1, now 2: checkpoints hold only the trainable"):
        Checkpoints.load(SimpleNamespace(num_processes=1), folder)
