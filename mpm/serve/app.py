"""The OpenAI-compatible HTTP API of `mpm serve` (FastAPI; uvicorn runs it: mpm/cli/serve.py).

    GET  /health                  {"status": "ok", "batches", "requests", "active", "queued", "largest_batch", ...}
    GET  /v1/models               the chat model and the paint model, by name
    POST /v1/chat/completions     OpenAI's chat schema; `stream: true` answers with server-sent events
    POST /v1/images/generations   a prompt in any language -> `n` PNGs as b64_json

Every error is OpenAI's {"error": {"message", "type", "param", "code"}}: 400 names the field, 401 without the API
key (when the server has one), 404 for an unknown model, 503 with Retry-After when the queue is full. A client that
disconnects cancels its request (its rows stop decoding; the engine's active count goes back down).
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from mpm.decoding import encode
from mpm.inference import image_marker
from mpm.serve.engine import Engine, Job, QueueFull
from mpm.serve.protocol import Limits, ServeError, chat_job, paint_job, raw_request

POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


def create_app(engine: Engine, model_name: str | None, paint_name: str | None = None, api_key: str | None = None,
               limits: Limits | None = None, context_length: int | None = None, ui: bool = False,
               raw_prompt: str | None = None) -> FastAPI:  # fmt: skip
    limits = limits or Limits()

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)  # after uvicorn has finished the open requests

    app = FastAPI(title="mpm serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError):
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    def authorise(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ServeError(401, "a valid API key is required (Authorization: Bearer KEY)", None,
                             "authentication_error")  # fmt: skip

    # A body holds at most max_images images of max_image_bytes (base64: 4/3 larger) and some text.
    max_body = limits.max_images * limits.max_image_bytes * 4 // 3 + 2**20

    async def body_of(request: Request):
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body:
            raise ServeError(413, f"the body is {declared} bytes, over the limit of {max_body}")
        data = bytearray()
        async for piece in request.stream():  # counted as it comes: a chunked body has no declared length
            data += piece
            if len(data) > max_body:
                raise ServeError(413, f"the body is over the limit of {max_body} bytes")
        try:
            return json.loads(bytes(data))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ServeError(400, f"the body is not valid JSON ({exc})") from None

    def submit(work, request: Request) -> Job:
        job = Job(work, asyncio.get_running_loop())
        if not engine.running():
            raise ServeError(503, "the server is stopping (or its worker failed): retry elsewhere", None,
                             "server_unavailable")  # fmt: skip
        try:
            engine.submit(job)
        except QueueFull:
            raise ServeError(
                503, "the server is busy (its queue is full): retry shortly", None, "server_busy"
            ) from None
        return job

    @app.get("/health")
    async def health():
        ok = engine.running()
        body = {"status": "ok" if ok else "unavailable", "model": model_name, "paint_model": paint_name,
                **engine.stats()}  # fmt: skip
        return body if ok else JSONResponse(body, status_code=503)

    @app.get("/v1/models")
    async def models(request: Request):
        authorise(request)
        now = int(time.time())
        names = [n for n in (model_name, paint_name) if n]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": now, "owned_by": "mpm"}
                                           for n in names]}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorise(request)
        body = await body_of(request)
        if model_name is None:
            raise ServeError(404, "this server has no chat model (start it with --model)", "model", "not_found_error")
        # decoding images and tokenizing: off the event loop (other streams go on meanwhile)
        work = await asyncio.to_thread(chat_job, body, model_name, image_marker(engine.processor), limits)
        if raw_prompt is not None:
            work.request = raw_request(work.request, raw_prompt, image_marker(engine.processor))
        work.encoded = await asyncio.to_thread(_encode, engine.processor, work.request)
        prompt = len(work.encoded.input_ids)
        if limits.max_prompt_tokens and prompt > limits.max_prompt_tokens:
            raise ServeError(400, f"the prompt is {prompt} tokens (images included), over the limit of "
                                  f"{limits.max_prompt_tokens}", "messages")  # fmt: skip
        if context_length:
            room = context_length - prompt
            if not work.max_tokens_given and 0 < room < work.sampling.max_new_tokens:
                work.sampling = replace(work.sampling, max_new_tokens=room)  # the default fits what is left
            elif prompt + work.sampling.max_new_tokens > context_length:
                raise ServeError(400, f"the prompt is {prompt} tokens (images included); with max_tokens "
                                      f"{work.sampling.max_new_tokens} that is over the model's context length "
                                      f"{context_length}", "messages")  # fmt: skip
        job = submit(work, request)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if work.stream:
            return StreamingResponse(_sse(job, ident, created, model_name, prompt, work.include_usage),
                                     media_type="text/event-stream")  # fmt: skip
        choices = [{"index": i, "message": {"role": "assistant", "content": ""}, "finish_reason": None}
                   for i in range(work.n)]  # fmt: skip
        while True:
            event = await _next_event(job, request)
            if event[0] == "finish":
                _, index, reason, _, text = event
                choices[index]["message"]["content"] = text
                choices[index]["finish_reason"] = reason
            elif event[0] == "done":
                usage = _usage(prompt, event[1]["completion_tokens"])
                return {"id": ident, "object": "chat.completion", "created": created, "model": model_name,
                        "choices": choices, "usage": usage}  # fmt: skip
            elif event[0] == "error":
                raise ServeError(500, f"generation failed: {event[1]}", None, "server_error")

    @app.post("/v1/images/generations")
    async def images(request: Request):
        authorise(request)
        body = await body_of(request)
        if paint_name is None:
            raise ServeError(404, "this server has no paint model (start it with --paint-model)", "model",
                             "not_found_error")  # fmt: skip
        job = submit(paint_job(body, paint_name, limits), request)
        event = await _next_event(job, request)
        if event[0] == "error":
            raise ServeError(500, f"painting failed: {event[1]}", None, "server_error")
        return {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(png).decode()}
                                                      for png in event[1]]}  # fmt: skip

    if ui:  # the web page at /ui (mpm/serve/ui.py), calling the routes above
        from mpm.serve.ui import mount_ui

        mount_ui(app)
    return app


def _encode(processor, request):
    try:
        return encode(processor, request)
    except ValueError as exc:  # ProcessingError: e.g. more image markers in the text than images
        raise ServeError(400, str(exc), "messages") from None


def _usage(prompt: int, completion: int) -> dict:
    """OpenAI counts the prompt once, whatever n is."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _next_event(job: Job, request: Request):
    """The job's next event; if its client disconnects meanwhile, the job is cancelled (checked every POLL_S
    however many events arrive)."""
    checked = time.monotonic()
    while True:
        if time.monotonic() - checked >= POLL_S:
            checked = time.monotonic()
            if await request.is_disconnected():
                job.cancel()
                raise asyncio.CancelledError
        try:
            return await asyncio.wait_for(job.events.get(), POLL_S)
        except TimeoutError:
            continue


async def _sse(job: Job, ident: str, created: int, model: str, prompt: int, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a role chunk per choice, content deltas as they come, a finish chunk per choice, [DONE]."""

    def chunk(index: int, delta: dict, finish: str | None = None) -> str:
        data = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}  # fmt: skip
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    started: set[int] = set()
    try:
        while True:
            event = await job.events.get()
            if event[0] in ("delta", "finish") and event[1] not in started:
                started.add(event[1])
                yield chunk(event[1], {"role": "assistant", "content": ""})
            if event[0] == "delta":
                yield chunk(event[1], {"content": event[2]})
            elif event[0] == "finish":
                yield chunk(event[1], {}, event[2])
            elif event[0] == "done":
                if include_usage:  # stream_options.include_usage: a last chunk with the usage and no choices
                    data = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [], "usage": _usage(prompt, event[1]["completion_tokens"])}  # fmt: skip
                    yield f"data: {json.dumps(data)}\n\n"
                yield "data: [DONE]\n\n"
                return
            elif event[0] == "error":
                error = {"error": {"message": f"generation failed: {event[1]}", "type": "server_error"}}
                yield f"data: {json.dumps(error)}\n\n"
                return
    finally:  # the client went away (the response is cancelled) or the stream ended: either way nothing more runs
        job.cancel()
