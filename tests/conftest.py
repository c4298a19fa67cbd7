"""Shared fixtures: a real HTTP server on 127.0.0.1, real images made with Pillow, sharder configs."""

from __future__ import annotations

import io
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from dataproc.sharder import ShardConfig
from mpm.core.config import load_config


def image_bytes(size=(64, 48), colour=(200, 30, 30), fmt="JPEG", mode="RGB", noise=0, seed=0, **save) -> bytes:
    """A real encoded image: a flat colour (plus optional noise, which makes images distinguishable)."""
    arr = np.full((size[1], size[0], 3), colour, np.float32)
    if noise:
        arr += np.random.default_rng(seed).normal(0, noise, arr.shape)
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def distinct_jpeg(seed: int, size=(96, 72)) -> bytes:
    """JPEGs that are neither exact nor near duplicates of each other: smooth random colour fields.

    Smooth content keeps pHash stable under resizing and re-encoding (near copies stay within ~4 bits) while
    different seeds are >= 14 bits apart (checked over 60 seeds).
    """
    rng = np.random.default_rng(seed)
    field = rng.integers(0, 256, (4, 5, 3)).astype(np.uint8)
    im = Image.fromarray(field, "RGB").resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95)
    return buf.getvalue()


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    headers: dict = field(default_factory=dict)
    delay_s: float = 0.0  # before answering
    fail_first: int = 0  # answer 503 to the first N requests
    chunked: bool = False  # no Content-Length: the client cannot know the size in advance
    hits: int = 0


class FakeWeb:
    """A threaded HTTP/1.1 server with keep-alive that counts connections and logs requests."""

    def __init__(self):
        self.routes: dict[str, Route] = {}
        self.connections = 0
        self.requests: list[tuple[str, float, dict]] = []
        self._lock = threading.Lock()
        web = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                with web._lock:
                    web.connections += 1

            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                with web._lock:
                    web.requests.append((path, time.monotonic(), dict(self.headers)))
                    route = web.routes.get(path)
                    if route is not None:
                        route.hits += 1
                if route is None:
                    return self._send(404, b"not found", {})
                if route.delay_s:
                    time.sleep(route.delay_s)
                if route.hits <= route.fail_first:
                    return self._send(503, b"busy", {})
                self._send(route.status, route.body, route.headers, route.chunked)

            def _send(self, status, body, headers, chunked=False):
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        for value in v if isinstance(v, list) else [v]:
                            self.send_header(k, value)
                    if chunked:
                        self.send_header("Transfer-Encoding", "chunked")
                        self.end_headers()
                        for i in range(0, len(body), 65536):
                            part = body[i : i + 65536]
                            self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                        self.wfile.write(b"0\r\n\r\n")
                    else:
                        self.send_header("Content-Length", str(len(body)))
                        self.end_headers()
                        self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (size cap, timeout): that is what some tests check

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # clients hanging up early (size caps, timeouts) are expected here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, path: str, **kwargs) -> str:
        self.routes[path] = Route(**kwargs)
        return self.base + path

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def web():
    server = FakeWeb()
    yield server
    server.close()


@pytest.fixture
def make_config(tmp_path):
    """Sharder config for tests: fast timeouts, one process, no retries unless asked."""

    def make(input_path, output=None, overrides=(), **flags) -> ShardConfig:
        base = {
            "input.path": str(input_path),
            "output.path": str(output or tmp_path / "out"),
            "executor.processes": 1,
            "fetch.threads": 4,
            "fetch.timeout_s": 1.0,
            "fetch.retries": 0,
            "fetch.backoff_s": 0.01,
            "resize.image_size": 32,
            "resize.resize_mode": "keep_ratio",
        }
        base.update({k.replace("__", "."): v for k, v in flags.items()})
        return load_config(ShardConfig, None, base, list(overrides))

    return make


class FakeChatServer:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1; `respond(request_json) -> reply` decides answers.

    `respond` returns a string (sent as the assistant message), or a tuple (status, body bytes[, headers]).
    """

    def __init__(self, respond, delay_s: float = 0.0):
        self.respond = respond
        self.delay_s = delay_s
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                if server.delay_s:
                    time.sleep(server.delay_s)
                result = server.respond(body)
                if isinstance(result, str):
                    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": result}}]}).encode()
                    status, headers = 200, {}
                else:
                    status, payload, *rest = result
                    headers = rest[0] if rest else {}
                try:
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def chat_server():
    servers = []

    def start(respond, delay_s: float = 0.0) -> FakeChatServer:
        servers.append(FakeChatServer(respond, delay_s))
        return servers[-1]

    yield start
    for s in servers:
        s.close()
