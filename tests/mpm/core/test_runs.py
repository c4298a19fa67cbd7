"""Run folders: the metrics log rewinds to a checkpoint; resume checks (the recipes test checkpoints end to end)."""

from types import SimpleNamespace

from mpm.core.runs import Metrics


def test_metrics_rewind_to_the_checkpoint_and_survive_a_row_cut_by_a_kill(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    Metrics(tmp_path, SimpleNamespace(is_main_process=True), resumed_at=2)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
    Metrics(tmp_path, SimpleNamespace(is_main_process=True), resumed_at=None)  # a new run: a new file
    assert (tmp_path / "metrics.jsonl").read_text() == ""
