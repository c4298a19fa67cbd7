"""`mpm serve`: an OpenAI-compatible server for chat and painting (mpm/serve/)."""

from __future__ import annotations

from mpm.cli.options import Flag, add_command

FLAGS = [
    Flag("--model", "model", str, "chat model: an MPM checkpoint or a LLaVA one"),
    Flag("--paint-model", "paint_model", str, "text-to-image model: an MPMPaintPipeline folder"),
    Flag(
        "--model-name",
        "model_name",
        str,
        "the chat model's name for clients (default: its folder's, or its run's for a final/ folder)",
    ),
    Flag("--paint-name", "paint_name", str, "the paint model's name for clients (default: as --model-name)"),
    Flag(
        "--raw-prompt",
        "raw_prompt",
        str,
        "a model trained on raw prompts: the template, {question} for the last "
        "user message (e.g. the demo's '<ctx><image> </ctx> {question}')",
    ),
    Flag("--host", "host", str, "address to listen on (default: 127.0.0.1)"),
    Flag("--port", "port", int, "port (default: 8000)"),
    Flag("--api-key", "api_key", str, "require this key (Authorization: Bearer KEY); default: $MPM_API_KEY if set"),
    Flag("--device", "device", str, "auto|cpu|cuda (default: auto)"),
    Flag("--quantize", "quantize", str, "int8|int4: the chat LLM's weights quantised (weight-only, for CPUs)"),
    Flag("--max-batch", "max_batch", int, "rows decoded together (default: 16)"),
    Flag("--batch-window-ms", "batch_window_ms", float, "how long a request waits for others to batch with (20)"),
    Flag("--queue-size", "queue_size", int, "requests waiting at most; more get 503 (default: 64)"),
    Flag("--allow-local-files", "limits.allow_local_files", "const", "read image_url file paths too", const=True),
    Flag("--max-tokens-limit", "limits.max_tokens", int, "the most max_tokens a request may ask for (default: 1024)"),
    Flag(
        "--max-prompt-tokens",
        "limits.max_prompt_tokens",
        int,
        "the longest prompt, images included (default: the model's context length)",
    ),
    Flag("--max-image-bytes", "limits.max_image_bytes", int, "an image's largest encoded size (default: 20 MiB)"),
    Flag("--max-image-pixels", "limits.max_image_pixels", int, "an image's most pixels (default: 4096 x 4096)"),
    Flag("--ui", "ui", "const", "also serve a web page at /ui: chat with images, paint from prompts", const=True),
]


def serve_command(cfg, args) -> int:
    from mpm.serve.server import serve

    serve(cfg)
    return 0


def register(groups) -> None:
    add_command(
        groups,
        "serve",
        serve_command,
        "mpm.serve.server:ServeConfig",
        FLAGS,
        help="an OpenAI-compatible server: /v1/chat/completions (images, streaming) and /v1/images/generations",
        description=(
            "Serve an image-to-text model (MPM or LLaVA checkpoint) and/or a text-to-image pipeline behind the "
            "OpenAI API. Requests arriving within --batch-window-ms share one generation batch; `stream: true` "
            "streams every request of a batch as it is decoded. A full queue answers 503 with Retry-After; "
            "SIGTERM finishes running requests first."
        ),
        epilog="example: mpm serve --model runs/sft/final --paint-model runs/t2i/final --port 8000",
    )
