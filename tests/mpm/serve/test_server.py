"""`mpm serve` through the official `openai` client on 127.0.0.1: answers, streaming, batching, errors, limits."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from PIL import Image

from mpm.inference import Request, generate, load_model


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


RED = Image.new("RGB", (32, 32), (200, 20, 20))
BLUE = Image.new("RGB", (40, 24), (20, 20, 200))
QUESTIONS = ["What colour?", "Describe it.", "Is it red?", "What shape?", "Say something.", "Where is it?",
             "Name the colour.", "One word please."]  # fmt: skip


def ask(question: str, image: Image.Image | None = None) -> list[dict]:
    content = [{"type": "text", "text": question}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": data_url(image)}})
    return [{"role": "user", "content": content}]


def client(running, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=running.url, api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def expected(folder, question, image=None, max_new_tokens=12) -> str:
    model, processor = load_model(folder, device="cpu")
    images = [image] if image is not None else []
    return generate(model, processor, [Request(images, messages=[{"role": "user", "content": question}])],
                    max_new_tokens=max_new_tokens)[0]  # fmt: skip


def test_chat_plain_and_streaming_with_images_answer_as_generate(chat_folder, serve_app):
    running = serve_app(model=str(chat_folder))
    c = client(running)
    assert [m.id for m in c.models.list().data] == ["tiny-chat"]
    reply = c.chat.completions.create(model="tiny-chat", messages=ask("What colour?", RED), max_tokens=12,
                                      temperature=0)  # fmt: skip
    assert reply.choices[0].message.content == expected(chat_folder, "What colour?", RED) != ""
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens > 0
    chunks = list(c.chat.completions.create(model="tiny-chat", messages=ask("What colour?", RED), max_tokens=12,
                                            temperature=0, stream=True))  # fmt: skip
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert streamed.strip() == reply.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    two = c.chat.completions.create(model="tiny-chat", n=2, temperature=1.0, seed=5, max_tokens=8,
                                    messages=[{"role": "user", "content": [
                                        {"type": "image_url", "image_url": {"url": data_url(RED)}},
                                        {"type": "text", "text": "Compare with"},
                                        {"type": "image_url", "image_url": {"url": data_url(BLUE)}}]}])  # fmt: skip
    assert [ch.index for ch in two.choices] == [0, 1]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(chat_folder, serve_app):
    running = serve_app(model=str(chat_folder), batch_window_ms=300, max_batch=8)
    c = client(running)
    alone = [expected(chat_folder, q, RED if i % 2 else None) for i, q in enumerate(QUESTIONS)]
    assert all(alone) and len(set(alone)) >= 4  # visible answers, different ones: a mix-up would show

    def one(i):
        r = c.chat.completions.create(model="tiny-chat", messages=ask(QUESTIONS[i], RED if i % 2 else None),
                                      max_tokens=12, temperature=0)  # fmt: skip
        return r.choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    assert answers == alone  # batched greedy answers are the one-at-a-time ones, none mixed up
    health = httpx.get(f"{running.base}/health").json()
    assert health["requests"] == 8 and health["batches"] < 8 and health["active"] == 0


def test_a_bounded_load_of_32_clients_each_gets_its_own_answer(chat_folder, serve_app):
    running = serve_app(model=str(chat_folder), max_batch=8, queue_size=64)
    c = client(running, timeout=60)
    want = {q: expected(chat_folder, q, max_new_tokens=6) for q in QUESTIONS}

    def one(i):
        q = QUESTIONS[i % len(QUESTIONS)]
        r = c.chat.completions.create(model="tiny-chat", messages=ask(q), max_tokens=6, temperature=0)
        return q, r.choices[0].message.content

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert all(answer == want[q] for q, answer in results)
    assert httpx.get(f"{running.base}/health").json()["active"] == 0


def slow(running, seconds: float):
    """Every forward pass of the served model takes at least `seconds` (to watch requests while they run)."""
    model = running.app.state.engine.model
    forward = model.forward

    def slowed(*args, **kwargs):
        time.sleep(seconds)
        return forward(*args, **kwargs)

    model.forward = slowed


def test_the_first_chunk_comes_before_generation_ends_and_a_disconnect_frees_the_worker(chat_folder, serve_app):
    running = serve_app(model=str(chat_folder))
    slow(running, 0.05)
    c = client(running)
    start = time.monotonic()
    first = None
    stream = c.chat.completions.create(model="tiny-chat", messages=ask("Describe it."), max_tokens=24,
                                       stream=True, stop=["\u2603"])  # fmt: skip
    for chunk in stream:
        if first is None and chunk.choices[0].delta.content:
            first = time.monotonic() - start
    total = time.monotonic() - start
    assert first is not None and first < total - 0.3

    with httpx.stream("POST", f"{running.url}/chat/completions", timeout=30,
                      json={"model": "tiny-chat", "messages": ask("Describe it."), "max_tokens": 200,
                            "stream": True}) as response:  # fmt: skip
        for line in response.iter_lines():
            if line.startswith("data:") and "content" in line:
                break  # the client goes away mid-stream
    deadline = time.time() + 10
    while httpx.get(f"{running.base}/health").json()["active"] and time.time() < deadline:
        time.sleep(0.05)
    health = httpx.get(f"{running.base}/health").json()
    assert health["active"] == 0 and health["requests"] == 2  # cancelled long before 200 tokens


def test_a_full_queue_answers_503_and_no_request_is_lost_or_mixed_up(chat_folder, serve_app):
    running = serve_app(model=str(chat_folder), queue_size=1, max_batch=1, batch_window_ms=0)
    slow(running, 0.05)
    want = {q: expected(chat_folder, q, max_new_tokens=6) for q in QUESTIONS[:6]}

    def one(q):
        r = httpx.post(f"{running.url}/chat/completions", timeout=60,
                       json={"model": "tiny-chat", "messages": ask(q), "max_tokens": 6, "temperature": 0})  # fmt: skip
        return q, r

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, QUESTIONS[:6]))
    busy = [r for _, r in results if r.status_code == 503]
    done = [(q, r) for q, r in results if r.status_code == 200]
    assert busy and done and len(busy) + len(done) == 6
    assert all(r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "server_busy" for r in busy)
    assert all(r.json()["choices"][0]["message"]["content"] == want[q] for q, r in done)


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "system", "content": "be brief"}]}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                     "image_url": {"url": "https://x.org/a.png"}}]}]},
         400, "messages[0].content[0].image_url.url"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/a.png"}}]}]},
         400, "messages[0].content[0].image_url.url"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                     "image_url": {"url": "data:image/png;base64,AAAA"}}]}]},
         400, "messages[0].content[0].image_url.url"),
        ({"messages": [{"role": "user", "content": "x " * 3000}], "max_tokens": 10}, 400, "messages"),
    ],
    ids=["unknown-model", "empty", "no-user-turn", "max-tokens", "temperature", "http-url", "local-path",
         "corrupt-image", "over-context"],
)  # fmt: skip
def test_bad_requests_get_the_field_named_and_the_server_goes_on(chat_folder, serve_app, body, status, param):
    running = serve_app(model=str(chat_folder))
    r = httpx.post(f"{running.url}/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
    ok = client(running).chat.completions.create(model="tiny-chat", messages=ask("hi"), max_tokens=2)
    assert ok.choices[0].message is not None


def test_malformed_json_an_oversized_image_and_the_client_errors(chat_folder, serve_app):
    from mpm.serve.protocol import Limits

    running = serve_app(model=str(chat_folder), limits=Limits(max_image_pixels=32 * 32))
    r = httpx.post(f"{running.url}/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="over the limit"):
        client(running).chat.completions.create(model="tiny-chat", messages=ask("hi", Image.new("RGB", (64, 64))))
    with pytest.raises(openai.NotFoundError, match="does not exist here"):
        client(running).chat.completions.create(model="gpt-4o", messages=ask("hi"))


def test_an_api_key_is_required_when_set(chat_folder, serve_app, monkeypatch):
    monkeypatch.setenv("MPM_API_KEY", "sesame")
    running = serve_app(model=str(chat_folder))
    with pytest.raises(openai.AuthenticationError):
        client(running, api_key="wrong").models.list()
    assert client(running, api_key="sesame").models.list().data[0].id == "tiny-chat"
    assert httpx.get(f"{running.base}/health").status_code == 200  # health needs no key


def test_images_from_a_chinese_prompt(paint_folder, serve_app):
    running = serve_app(paint_model=str(paint_folder), paint_steps=2)
    c = client(running)
    result = c.images.generate(model="tiny-paint", prompt="一只戴着红帽子的猫", n=2, size="32x32",
                               response_format="b64_json", extra_body={"seed": 3})  # fmt: skip
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in result.data]
    assert len(images) == 2 and all(im.size == (32, 32) for im in images)
    again = c.images.generate(model="tiny-paint", prompt="一只戴着红帽子的猫", n=2, size="32x32",
                              response_format="b64_json", extra_body={"seed": 3})  # fmt: skip
    assert [d.b64_json for d in again.data] == [d.b64_json for d in result.data]  # seeded
    with pytest.raises(openai.BadRequestError, match="size"):
        c.images.generate(model="tiny-paint", prompt="x", size="33x33")
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="tiny-paint", messages=ask("hi"))


def test_sigterm_during_a_request_still_answers_it(chat_folder, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from tests.mpm.serve.conftest import free_port

    port = free_port()
    env = {**os.environ, "MPM_API_KEY": ""}
    server = subprocess.Popen([sys.executable, "-m", "mpm.cli", "serve", "--model", str(chat_folder), "--port",
                               str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline and server.poll() is None, server.stdout.read().decode()
            time.sleep(0.1)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, f"{base}/v1/chat/completions", timeout=120,
                                  json={"messages": ask("Describe it."), "max_tokens": 300, "temperature": 0})  # fmt: skip
            while httpx.get(f"{base}/health").json()["active"] == 0:
                time.sleep(0.01)
            server.send_signal(signal.SIGTERM)
            response = pending.result()
        assert response.status_code == 200
        assert response.json()["choices"][0]["finish_reason"] == "length"  # all 300 tokens, after the signal
        assert server.wait(60) in (0, -signal.SIGTERM)  # uvicorn ends by re-raising the signal once it is done
    finally:
        if server.poll() is None:
            server.kill()


def test_a_non_streaming_client_that_leaves_frees_the_worker(chat_folder, serve_app):
    running = serve_app(model=str(chat_folder))
    slow(running, 0.05)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{running.url}/chat/completions", timeout=0.5,
                   json={"messages": ask("Describe it."), "max_tokens": 200, "temperature": 0})  # fmt: skip
    deadline = time.monotonic() + 3  # 200 tokens would take over 10 s: cancelled long before
    while httpx.get(f"{running.base}/health").json()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{running.base}/health").json()["active"] == 0


def test_stop_strings_n_choices_usage_and_roles_as_the_openai_client_reads_them(chat_folder, serve_app, tmp_path):
    from mpm.serve.protocol import Limits

    running = serve_app(model=str(chat_folder), limits=Limits(allow_local_files=True, max_image_bytes=2000))
    c = client(running)
    full = c.chat.completions.create(model="tiny-chat", messages=ask("Describe it."), max_tokens=12, temperature=0)
    text = full.choices[0].message.content
    cut = c.chat.completions.create(model="tiny-chat", messages=ask("Describe it."), max_tokens=12, temperature=0,
                                    stop=[text[3:5]])  # fmt: skip
    assert cut.choices[0].message.content == text[: text.index(text[3:5])] and cut.choices[0].finish_reason == "stop"
    chunks = list(c.chat.completions.create(model="tiny-chat", messages=ask("Describe it."), max_tokens=6, n=2,
                                            temperature=1.0, seed=1, stream=True,
                                            stream_options={"include_usage": True}))  # fmt: skip
    by_choice = {0: "", 1: ""}
    for ch in chunks[:-1]:
        for choice in ch.choices:
            by_choice[choice.index] += choice.delta.content or ""
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12  # 2 choices x 6 tokens
    plain = c.chat.completions.create(model="tiny-chat", messages=ask("Describe it."), max_tokens=6, n=2,
                                      temperature=1.0, seed=1)  # fmt: skip
    assert [by_choice[0].strip(), by_choice[1].strip()] == [ch.message.content for ch in plain.choices]
    assert plain.usage.prompt_tokens == full.usage.prompt_tokens  # the prompt counted once, whatever n
    developer = [{"role": "developer", "content": "Be brief."}, *ask("Describe it.")]
    assert c.chat.completions.create(model="tiny-chat", messages=developer, max_tokens=2).choices
    RED.save(tmp_path / "red.png")  # a local path is read with --allow-local-files
    local = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(tmp_path / "red.png")}},
                                          {"type": "text", "text": "What colour?"}]}]  # fmt: skip
    assert c.chat.completions.create(model="tiny-chat", messages=local, max_tokens=12, temperature=0).choices[
        0].message.content == expected(chat_folder, "What colour?", RED)  # fmt: skip
    big = Image.effect_noise((40, 40), 100).convert("RGB")  # noise: its PNG is far over 2,000 bytes
    with pytest.raises(openai.BadRequestError, match="over 2000 bytes"):
        c.chat.completions.create(model="tiny-chat", messages=ask("hi", big))
    with pytest.raises(openai.BadRequestError, match="tool calling"):
        c.chat.completions.create(model="tiny-chat", messages=ask("hi"), tools=[{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {}}}}])  # fmt: skip
    r = httpx.post(f"{running.url}/chat/completions", content=b"x" * (10 * 2**20), timeout=30)
    assert r.status_code == 413


def test_a_model_trained_on_raw_prompts_is_asked_in_its_template(chat_folder, serve_app):
    running = serve_app(model=str(chat_folder), raw_prompt="<image> Q: {question} A:")
    model, processor = load_model(chat_folder, device="cpu")
    want = generate(model, processor, [Request([RED], prompt="<image> Q: What colour? A:")], max_new_tokens=8)[0]
    history = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "x"}, *ask("What colour?", RED)]
    got = client(running).chat.completions.create(model="tiny-chat", messages=history, max_tokens=8, temperature=0)
    assert got.choices[0].message.content == want != ""
    with pytest.raises(openai.BadRequestError, match="marker"):  # the template's image, and none sent
        client(running).chat.completions.create(model="tiny-chat", messages=ask("What colour?"), max_tokens=2)
