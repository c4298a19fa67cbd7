"""LLM generators: the reply parser, a real HTTP server speaking the OpenAI API, a tiny random transformers model."""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mpm.core.config import load_config
from unimm_chat.build import EndpointFailing, build
from unimm_chat.config import BuildConfig
from unimm_chat.llm import ParseError, parse_dialogue

REPO = Path(__file__).parents[2]


def good_reply(body: dict) -> str:
    """What a well-behaved model would answer: a description and the listed questions with their answers."""
    prompt = body["messages"][-1]["content"]
    captions = re.findall(r"^- (?!Q:)(.+)$", prompt, re.MULTILINE)
    turns = [
        {"from": "human", "value": "What do you see?"},
        {"from": "gpt", "value": captions[0] if captions else "A scene."},
    ]
    for question, answer in re.findall(r"^- Q: (.+?) A: (.+?)(?: \(reasoning: .*\))?$", prompt, re.MULTILINE):
        turns += [{"from": "human", "value": question}, {"from": "gpt", "value": f"{answer}."}]
    return json.dumps({"conversation": turns})


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ("I cannot help with that.", "unparseable"),
        ('{"conversation": [{"from": "human", "value": "Hi"}, {"from": "gpt", "val', "unparseable"),
        ('{"conversation": [{"from": "narrator", "value": "Once"}]}', "unparseable"),
        ('{"dialogue": []}', "unparseable"),
        ("<annotations>\nCaptions:\n- a dog\n</annotations>\n\nRules: ...", "prompt_echo"),
    ],
)
def test_parser_rejects_garbage_truncation_and_echoes(reply, reason):
    with pytest.raises(ParseError) as info:
        parse_dialogue(reply)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "reply",
    [
        '<think>The Rules: say JSON [only].</think>{"conversation": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "A dog."}]}',
        'Here it is [as asked]: {"conversation": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "A dog."}]} Note: [done]',
        '{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "A dog."}]}',
        '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A dog."}]}',
    ],
)
def test_parser_finds_the_conversation_around_other_text(reply):
    messages = parse_dialogue(reply)
    assert [m.role for m in messages] == ["user", "assistant"] and messages[1].content == "A dog."


def test_parser_rejects_odd_turns_and_cleans_lone_surrogates():
    with pytest.raises(ParseError, match="turn 0"):
        parse_dialogue('{"conversation": [{"from": ["human"], "value": "x"}]}')
    messages = parse_dialogue(
        '{"conversation": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "A \\ud83d dog."}]}'
    )
    assert messages[1].content == "A ? dog."


def test_parser_accepts_fenced_json_and_places_the_image_marker():
    reply = '```json\n{"conversation": [{"from": "human", "value": "What is <image> this?"}, {"from": "gpt", "value": "A dog."}]}\n```'
    messages = parse_dialogue(reply)
    assert messages[0].content == "<image>\nWhat is  this?" and messages[1].content == "A dog."


def openai_config(annotations, out, base_url, **extra):
    flags = {f"sources.{k}": str(v) for k, v in annotations.items()}
    flags.update({"output": str(out), "generator": "openai", "openai.base_url": base_url, "openai.model": "fake"})
    flags.update({"openai.retries": 2, "openai.backoff_s": 0.01, "openai.timeout_s": 0.6, "openai.concurrency": 4})
    flags.update(extra)
    return load_config(BuildConfig, None, flags)


def test_openai_generator_survives_bad_servers_and_counts_every_failure(annotations, chat_server, tmp_path):
    order: dict[str, int] = {}
    attempts: dict[str, int] = {}
    lock = threading.Lock()
    behaviours = [
        "garbage",
        "truncated",
        "echo",
        "always_500",
        "500_once",
        "malformed",
        "429_once",
        "slow_once",
        "bad_request",
    ]

    def respond(body):
        prompt = body["messages"][-1]["content"]
        with lock:
            index = order.setdefault(prompt, len(order))
            attempts[prompt] = attempts.get(prompt, 0) + 1
            first = attempts[prompt] == 1
        kind = behaviours[index % len(behaviours)] if index < 3 * len(behaviours) else "good"
        if kind == "garbage":
            return "Sure! Here is a lovely conversation about the picture."
        if kind == "truncated":
            return good_reply(body)[:60]
        if kind == "echo":
            return prompt
        if kind == "always_500" or (kind == "500_once" and first):
            return 500, b'{"error": "overloaded"}'
        if kind == "malformed":
            return 200, b'{"choices": []}'
        if kind == "429_once" and first:
            return 429, b'{"error": "slow down"}', {"Retry-After": "0.05"}
        if kind == "slow_once" and first:
            time.sleep(1.0)  # longer than the client's 0.6 s timeout: the retry gets the answer
        if kind == "bad_request":
            return 400, b'{"error": "context length exceeded"}'
        return good_reply(body)

    server = chat_server(respond)
    stats = build(openai_config(annotations, tmp_path / "out", server.base_url), show_progress=False)
    rejected = stats["rejections"]
    assert rejected["unparseable"] == 6 and rejected["prompt_echo"] == 3
    assert rejected["llm_error"] == 9  # always 500 (3), malformed (3), HTTP 400 (3, not retried)
    assert stats["dialogues"] == 40 - 18
    assert (
        "HTTP 400" in stats["rejection_examples"]["llm_error"]
        or "after 3 attempts" in stats["rejection_examples"]["llm_error"]
    )
    bad_request_prompts = [p for p, i in order.items() if i < 27 and behaviours[i % 9] == "bad_request"]
    assert all(attempts[p] == 1 for p in bad_request_prompts)  # a 400 is final
    assert all(attempts[p] == 3 for p, i in order.items() if i < 27 and behaviours[i % 9] == "always_500")
    conversations = json.loads((tmp_path / "out" / "llava.json").read_text())
    assert all(c["conversations"][0]["value"].startswith("<image>\n") for c in conversations)

    # Only accepted replies are cached: a rerun asks again for the 18 failed or rejected images, not the 22 others.
    before = len(server.requests)
    again = build(openai_config(annotations, tmp_path / "out", server.base_url), show_progress=False)
    assert again["cache"] == {"cached_replies_used": 22, "new_requests": 18}
    assert len(server.requests) - before == 3 + 3 + 3 + 3 * 3 + 3 * 3 + 3  # garbage, truncated, echo once; 500s and
    # malformed replies with their 2 retries; the 400 once


def test_killed_openai_run_resumes_without_asking_again(annotations, chat_server, tmp_path):
    server = chat_server(good_reply, delay_s=0.05)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mpm.cli", "unimm", "build", "--generator", "openai", "--base-url", server.base_url,
           "--model", "fake", "--concurrency", "2", "--output", str(out), "--no-progress"]  # fmt: skip
    cmd += [arg for name, path in annotations.items() for arg in (f"--{name.replace('_', '-')}", str(path))]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(server.requests) < 12 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with sqlite3.connect(out / "cache.sqlite") as db:
        cached = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    assert 0 < cached < 40 and not (out / "llava.json").exists()
    asked = len(server.requests)
    stats = build(openai_config(annotations, out, server.base_url), show_progress=False)
    assert stats["dialogues"] == 40 and stats["cache"]["cached_replies_used"] == cached
    assert len(server.requests) - asked == 40 - cached  # nothing in the cache is asked again


def test_hf_generator_with_a_tiny_random_model(annotations, tiny_chat_model, tmp_path):
    """A random model writes garbage: every dialogue is rejected with a reason, none crashes the run."""
    flags = {f"sources.{k}": str(v) for k, v in annotations.items()}
    flags.update({"output": str(tmp_path / "out"), "generator": "hf", "hf.model": str(tiny_chat_model)})
    flags.update({"hf.max_new_tokens": 12, "hf.batch_size": 8, "hf.temperature": 0.0})
    cfg = load_config(BuildConfig, None, flags)
    stats = build(cfg, show_progress=False)
    assert stats["dialogues"] == 0 and sum(stats["rejections"].values()) == 40
    assert set(stats["rejections"]) <= {"unparseable", "prompt_echo"}
    again = build(cfg, show_progress=False)  # rejected replies are not cached: a rerun asks again
    assert again["cache"] == {"cached_replies_used": 0, "new_requests": 40}


def test_a_misconfigured_endpoint_stops_the_build_early(annotations, chat_server, tmp_path):
    server = chat_server(lambda body: (401, b'{"error": "invalid api key"}'))
    with pytest.raises(EndpointFailing, match="HTTP 401.*check the URL, the model name and the API key"):
        build(openai_config(annotations, tmp_path / "out", server.base_url), show_progress=False)
    assert len(server.requests) <= 8  # the requests already in flight, not one per image
    assert not (tmp_path / "out" / "llava.json").exists()

    down = chat_server(lambda body: (503, b"down"))
    with pytest.raises(EndpointFailing, match="25 requests in a row failed"):
        build(
            openai_config(annotations, tmp_path / "out2", down.base_url, **{"openai.retries": 0}), show_progress=False
        )
