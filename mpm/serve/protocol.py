"""The OpenAI request bodies `mpm serve` accepts, checked into jobs; every problem is a `ServeError` naming the field.

chat      {"model", "messages": [{"role": "system" | "developer" | "user" | "assistant", "content": str |
           [parts]}], "max_tokens" (or "max_completion_tokens"), "temperature", "top_p", "stop", "seed", "n",
           "stream", "stream_options": {"include_usage"}}; what the server cannot do (tools, logprobs, a JSON
           response format, penalties) is refused with the field named rather than ignored
          parts: {"type": "text", "text"} and {"type": "image_url", "image_url": {"url"}} where the url is a
          data URL (data:image/png;base64,...) or, with --allow-local-files, a file path (file:///x.png or
          /x.png); the image goes where its part is (the model's image marker), images in message order
images    {"model", "prompt", "n", "size": "WxH", "response_format": "b64_json", "seed"}
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from mpm.core.images import to_rgb
from mpm.decoding import Sampling
from mpm.inference import Request


class ServeError(Exception):
    """An error the client gets as OpenAI's {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass
class Limits:
    max_tokens: int = 1024  # the most a request may ask for
    max_prompt_tokens: int | None = None  # the longest prompt, images included (None: the context length decides)
    default_max_tokens: int = 256
    max_n: int = 8
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_images: int = 8
    allow_local_files: bool = False
    max_paint_size: int = 1024


@dataclass
class ChatJob:
    request: Request
    sampling: Sampling
    n: int
    stop: list[str]
    stream: bool
    max_tokens_given: bool = False  # False: the default, lowered to what the context has room for
    include_usage: bool = False  # stream_options.include_usage: a last streamed chunk with the usage
    encoded: Any = None  # the request tokenized, with its pixels (mpm.decoding.encode): made once, by the server


@dataclass
class PaintJob:
    prompt: str
    n: int
    width: int | None
    height: int | None
    seed: int | None


def _number(body: dict, key: str, kind, low, high, default):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ServeError(400, f"'{key}' must be a number, got {value!r}", key)
    if not low <= value <= high:
        raise ServeError(400, f"'{key}' must be between {low} and {high}, got {value}", key)
    return value


def load_image(url: Any, where: str, limits: Limits) -> Image.Image:
    """A data URL (or, when allowed, a local file) as an RGB image, within the byte and pixel limits."""
    if not isinstance(url, str) or not url:
        raise ServeError(400, f"{where} must be a data URL (data:image/png;base64,...)", where)
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise ServeError(400, f"{where}: only base64 data URLs are read (data:image/png;base64,...)", where)
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise ServeError(400, f"{where}: the image is over {limits.max_image_bytes} bytes", where)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ServeError(400, f"{where}: the data URL is not valid base64", where) from None
    elif url.startswith(("http://", "https://")):
        raise ServeError(400, f"{where}: the server does not download images; send a data URL", where)
    else:
        if not limits.allow_local_files:
            raise ServeError(400, f"{where}: local files are read only when the server runs with "
                                  "--allow-local-files; send a data URL", where)  # fmt: skip
        path = Path(url.removeprefix("file://"))
        if not path.is_file():
            raise ServeError(400, f"{where}: no such file {path}", where)
        if path.stat().st_size > limits.max_image_bytes:
            raise ServeError(400, f"{where}: the image is over {limits.max_image_bytes} bytes", where)
        data = path.read_bytes()
    if len(data) > limits.max_image_bytes:
        raise ServeError(400, f"{where}: the image is over {limits.max_image_bytes} bytes", where)
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > limits.max_image_pixels:
            raise ServeError(400, f"{where}: the image has {image.width}x{image.height} pixels, over the limit of "
                                  f"{limits.max_image_pixels}", where)  # fmt: skip
        image.load()
    except ServeError:
        raise
    except Exception as exc:  # PIL raises many kinds for corrupt data
        raise ServeError(400, f"{where}: not a readable image ({type(exc).__name__})", where) from None
    return to_rgb(image)


def chat_job(body: Any, model_name: str, marker: str, limits: Limits) -> ChatJob:
    """A chat completion request body as a job (the prompt's length is checked by the server, which tokenizes)."""
    if not isinstance(body, dict):
        raise ServeError(400, "the body must be a JSON object")
    _model(body, model_name)
    _unsupported(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ServeError(400, "'messages' must be a non-empty list of messages", "messages")
    turns, images = [], []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
            raise ServeError(400, f"{where} needs a role of system, developer, user or assistant", f"{where}.role")
        content = message.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            pieces = []
            for j, part in enumerate(content):
                at = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    pieces.append(part["text"])
                elif kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if len(images) == limits.max_images:
                        raise ServeError(400, f"at most {limits.max_images} images a request", at)
                    images.append(load_image(url, f"{at}.image_url.url", limits))
                    pieces.append(marker)
                else:
                    raise ServeError(400, f"{at} must be a text or image_url part", at)
            text = "".join(pieces)
        else:
            raise ServeError(400, f"{where}.content must be a string or a list of parts", f"{where}.content")
        role = "system" if message["role"] == "developer" else message["role"]  # OpenAI's newer name for system
        turns.append({"role": role, "content": text})
    if not any(t["role"] == "user" for t in turns):
        raise ServeError(400, "'messages' has no user message", "messages")
    if turns[-1]["role"] == "assistant":
        raise ServeError(400, "the last message is the assistant's: end with a user message", "messages")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, int, 1, limits.max_tokens, limits.default_max_tokens)
    temperature = _number(body, "temperature", (int, float), 0, 2, 1.0)
    top_p = _number(body, "top_p", (int, float), 0, 1, 1.0)
    if top_p == 0:
        raise ServeError(400, "'top_p' must be above 0", "top_p")
    seed = _number(body, "seed", int, -(2**63), 2**63 - 1, None)
    n = _number(body, "n", int, 1, limits.max_n, 1)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ServeError(400, "'stop' must be a string or a list of at most 4 strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ServeError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ServeError(400, "'stream_options' must be an object", "stream_options")
    sampling = Sampling(max_tokens, float(temperature), float(top_p), seed)
    return ChatJob(Request(images, messages=turns), sampling, n, stop, stream,
                   max_tokens_given=body.get(key) is not None, include_usage=bool(options.get("include_usage")))  # fmt: skip


def raw_request(request: Request, raw_prompt: str, marker: str) -> Request:
    """The request for a model trained on raw prompts: the last user message's text (its image markers taken out)
    where `{question}` is in `raw_prompt`; the images go where the template's markers are (else first)."""
    last = next(m for m in reversed(request.messages) if m["role"] == "user")
    question = " ".join(last["content"].replace(marker, " ").split())
    return Request(request.images, prompt=raw_prompt.replace("{question}", question))


def paint_job(body: Any, model_name: str, limits: Limits) -> PaintJob:
    if not isinstance(body, dict):
        raise ServeError(400, "the body must be a JSON object")
    _model(body, model_name)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ServeError(400, "'prompt' must be a non-empty string (in any language the model's LLM knows)", "prompt")
    n = _number(body, "n", int, 1, limits.max_n, 1)
    if body.get("response_format", "b64_json") != "b64_json":
        raise ServeError(400, "'response_format' must be b64_json (the server keeps no files to link to)",
                         "response_format")  # fmt: skip
    width = height = None
    size = body.get("size")
    if size not in (None, "auto"):
        parts = size.split("x") if isinstance(size, str) else []
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ServeError(400, f"'size' must be WIDTHxHEIGHT (e.g. 512x512), got {size!r}", "size")
        width, height = int(parts[0]), int(parts[1])
        if (
            not (8 <= width <= limits.max_paint_size and 8 <= height <= limits.max_paint_size)
            or width % 8
            or height % 8
        ):
            raise ServeError(400, f"'size' sides must be multiples of 8 from 8 to {limits.max_paint_size}, got {size}",
                             "size")  # fmt: skip
    seed = _number(body, "seed", int, 0, 2**63 - 1, None)
    return PaintJob(prompt, n, width, height, seed)


def _unsupported(body: dict) -> None:
    """Options the server cannot honour are refused, naming them (a client relying on them must know)."""
    for key in ("tools", "functions", "tool_choice", "function_call"):
        if body.get(key):
            raise ServeError(400, f"'{key}': tool calling is not supported by this server", key)
    if body.get("logprobs") or body.get("top_logprobs"):
        key = "logprobs" if body.get("logprobs") else "top_logprobs"
        raise ServeError(400, f"'{key}' is not supported by this server", key)
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise ServeError(400, '\'response_format\': only plain text answers ({"type": "text"})', "response_format")
    for key in ("frequency_penalty", "presence_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise ServeError(400, f"'{key}' is not supported by this server (send 0 or leave it out)", key)
    if body.get("logit_bias"):
        raise ServeError(400, "'logit_bias' is not supported by this server", "logit_bias")


def _model(body: dict, name: str) -> None:
    model = body.get("model")
    if model not in (None, name):
        raise ServeError(404, f"the model {model!r} does not exist here; this server has {name!r} (GET /v1/models)",
                         "model", "not_found_error")  # fmt: skip
