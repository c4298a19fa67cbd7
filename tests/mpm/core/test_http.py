"""The OpenAI-compatible client, against a real server on 127.0.0.1."""

import time

import pytest

from mpm.core.http import ChatClient, LLMError


def test_chat_client_sends_the_key_and_reports_unreachable_servers(chat_server, monkeypatch):
    seen = {}

    def respond(body):
        seen.update(body)
        return "ok"

    server = chat_server(respond)
    monkeypatch.setenv("TEST_KEY", "sk-test")
    client = ChatClient(server.base_url, "m", api_key_env="TEST_KEY", retries=0)
    assert client.headers["Authorization"] == "Bearer sk-test"
    assert client.complete([{"role": "user", "content": "hi"}]) == "ok" and seen["model"] == "m"
    dead = ChatClient("http://127.0.0.1:1/v1", "m", retries=4, backoff_s=2.0)
    start = time.monotonic()
    with pytest.raises(LLMError, match=r"cannot connect to http://127.0.0.1:1/v1/chat/completions \(.*refused") as info:
        dead.complete([{"role": "user", "content": "hi"}])
    assert info.value.fatal and time.monotonic() - start < 2  # refused: no 2 + 4 + 8 + 16 s of backoff
    with pytest.raises(LLMError, match="cannot connect") as info:  # without retries, at once
        ChatClient("http://127.0.0.1:1/v1", "m", retries=0).complete([{"role": "user", "content": "hi"}])
    assert info.value.fatal
    with pytest.raises(ValueError, match="base_url"):
        ChatClient("localhost:8000", "m")
