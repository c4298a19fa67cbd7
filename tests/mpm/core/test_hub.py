"""A hub id without a network fails in seconds with one line; local folders are never checked."""

import time
from pathlib import Path

import pytest

from mpm.core.errors import ModelLoadError
from mpm.core.hub import check_model_source, unreachable


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """A hub endpoint where nothing listens (a closed port on 127.0.0.1): what a machine without network sees;
    an empty model cache, and the offline switch restored afterwards."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("mpm.core.hub._offline_by_probe", False)
    unreachable.cache_clear()
    yield tmp_path / "hub-cache"
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


def test_a_cached_model_loads_offline_and_an_uncached_one_still_fails(no_hub):
    from huggingface_hub import constants

    snapshot = no_hub / "models--owner--cached" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (no_hub / "models--owner--cached" / "refs").mkdir()
    (no_hub / "models--owner--cached" / "refs" / "main").write_text("abc")
    check_model_source("model.vision", "owner/cached")  # in the cache: offline mode, no error
    assert constants.HF_HUB_OFFLINE
    with pytest.raises(ModelLoadError, match="model.llm='owner/not-cached' is not a local folder"):
        check_model_source("model.llm", "owner/not-cached")  # still checked after the switch


def test_the_probe_goes_through_the_configured_proxy(monkeypatch):
    """Behind a proxy the hub may answer where a direct connection fails: the probe uses huggingface_hub's session."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    class Proxy(BaseHTTPRequestHandler):
        def do_HEAD(self):  # a proxy asked for http://hub.invalid/ answers for it
            self.send_response(200 if self.path.startswith("http://hub.invalid") else 502)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        from huggingface_hub.utils import close_session

        close_session()  # a session made before the variable was set would not know the proxy
        unreachable.cache_clear()
        assert (
            unreachable("http://hub.invalid") is None
        )  # reached through the proxy although hub.invalid resolves nowhere
    finally:
        server.shutdown()
        unreachable.cache_clear()
        close_session()
