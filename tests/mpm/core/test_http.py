"""The OpenAI-compatible client, against a real server on 127.0.0.1."""

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
    dead = ChatClient("http://127.0.0.1:1/v1", "m", retries=1, backoff_s=0.01)
    with pytest.raises(LLMError, match="after 2 attempts"):
        dead.complete([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="base_url"):
        ChatClient("localhost:8000", "m")
