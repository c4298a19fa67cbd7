"""Loading the models `mpm serve` serves, and running the app with uvicorn."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from mpm.core.errors import ConfigError, ModelLoadError
from mpm.serve.protocol import Limits

API_KEY_ENV = "MPM_API_KEY"


@dataclass
class ServeConfig:
    model: str | None = None  # an MPM checkpoint, or a LLaVA one (served as the MPM model it equals)
    paint_model: str | None = None  # an MPMPaintPipeline folder (the final/ of mpm train t2i)
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None  # the name clients ask for (default: the folder's name)
    # A chat model trained on raw prompts (no chat template, as the miniature world's): the last user message's
    # text goes where `{question}` is (its images where `<image>` is); earlier turns are not part of such a prompt.
    raw_prompt: str | None = None
    paint_name: str | None = None
    api_key: str | None = None  # default: the MPM_API_KEY environment variable; none: no key needed
    device: str = "auto"
    quantize: str | None = None  # int8 | int4: the chat LLM's weights quantised (weight-only, mpm.quantize)
    max_batch: int = 16  # rows decoded together (a request with n = 2 is 2 rows)
    batch_window_ms: float = 20.0  # how long the first request of a batch waits for others
    queue_size: int = 64  # requests waiting at most; more are answered 503 with Retry-After
    paint_steps: int = 25
    guidance: float = 3.0
    graceful_timeout_s: int = 60  # on SIGTERM / Ctrl-C: how long running requests get to finish
    ui: bool = False  # also serve a web page at /ui for chatting and painting (mpm/serve/ui.py)
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self):
        if not self.model and not self.paint_model:
            raise ConfigError("give a model to serve: --model DIR (chat) and/or --paint-model DIR (images)")
        if self.raw_prompt is not None and "{question}" not in self.raw_prompt:
            raise ConfigError(f"--raw-prompt {self.raw_prompt!r} has no {{question}}: put it where the question goes")
        for name in ("max_batch", "queue_size", "paint_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")


def load_chat_model(folder: str, device: str, quantize: str | None = None):
    """(model, processor): an MPM checkpoint, or a LLaVA one converted to the MPM model it equals (the decode loop
    reads MPM's processor); `quantize` as `mpm.inference.load_model`'s."""
    from mpm.export import load_as_mpm

    model, processor = load_as_mpm(folder, device, quantize)
    if not hasattr(processor, "encode_prompt"):
        raise ModelLoadError(f"{folder}: not an MPM or LLaVA checkpoint")
    return model, processor


def load_paint_model(folder: str, device: str):
    import torch

    from t2i import MPMPaintPipeline

    if not (Path(folder) / "model_index.json").is_file():
        raise ModelLoadError(f"--paint-model {folder} is not a saved MPMPaintPipeline (no model_index.json)")
    device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        pipe = MPMPaintPipeline.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load --paint-model {folder}: {str(exc).strip().splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def default_name(folder: str) -> str:
    """The folder's name, or its run's for a training run's final/ (runs/sft/final -> "sft")."""
    path = Path(folder).resolve()
    return path.parent.name if path.name == "final" else path.name


def build_app(cfg: ServeConfig):
    """The FastAPI app with its engine (the models loaded)."""
    from mpm.serve.app import create_app
    from mpm.serve.engine import Engine

    model = processor = paint = None
    context = None
    if cfg.model:
        model, processor = load_chat_model(cfg.model, cfg.device, cfg.quantize)
        context = getattr(model.config.text_config, "max_position_embeddings", None)
    if cfg.paint_model:
        paint = load_paint_model(cfg.paint_model, cfg.device)
    engine = Engine(model, processor, paint, cfg.max_batch, cfg.batch_window_ms / 1000, cfg.queue_size,
                    cfg.paint_steps, cfg.guidance)  # fmt: skip
    name = cfg.model_name or (default_name(cfg.model) if cfg.model else None)
    paint_name = cfg.paint_name or (default_name(cfg.paint_model) if cfg.paint_model else None)
    if name is not None and name == paint_name:
        raise ConfigError(f"the chat and paint models are both named {name!r}: give --model-name / --paint-name")
    key = cfg.api_key or os.environ.get(API_KEY_ENV) or None
    return create_app(engine, name, paint_name, key, cfg.limits, context, raw_prompt=cfg.raw_prompt, ui=cfg.ui)


def serve(cfg: ServeConfig) -> None:
    import uvicorn

    app = build_app(cfg)
    print(f"serving on http://{cfg.host}:{cfg.port}/v1 (OpenAI-compatible; health: /health)", flush=True)
    if cfg.ui:
        print(f"web page: http://{cfg.host}:{cfg.port}/ui", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, timeout_graceful_shutdown=cfg.graceful_timeout_s,
                log_level="warning")  # fmt: skip


class ThreadedServer:
    """The app served by uvicorn in a background thread of this process (tests, benchmarks, notebooks): `.url` is
    the /v1 base URL; `close()` stops it as SIGTERM would (running requests finish first)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 60.0):
        import socket
        import threading
        import time

        import uvicorn

        if port == 0:
            with socket.socket() as probe:
                probe.bind((host, 0))
                port = probe.getsockname()[1]
        self.app, self.port = app, port
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="mpm-serve-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start on {host}:{port}")
            time.sleep(0.02)
        self.base = f"http://{host}:{port}"
        self.url = f"{self.base}/v1"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)
