"""A tiny chat model and paint pipeline, and `mpm serve`'s app running on 127.0.0.1 in a thread."""

from __future__ import annotations

import socket

import pytest
import torch


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    """A tiny MPM model whose tokens that are not printable on their own (blank, control, a partial UTF-8 byte,
    special: the stop tokens too) have zero embedding rows, tied to the head (logit 0 while other tokens' are not):
    its greedy answers are visible text running to max_tokens, and differ between prompts: answers to compare."""
    from mpm.modeling import MPMForConditionalGeneration
    from tests.mpm.conftest import make_tokenizer, text_config, vision_config

    torch.manual_seed(0)
    tok = make_tokenizer()
    model, processor = MPMForConditionalGeneration.from_parts(vision_config("clip"), text_config("qwen2", len(tok)),
                                                              tokenizer=tok, num_queries=4, image_size=32)  # fmt: skip
    tokenizer = processor.tokenizer
    with torch.no_grad():
        for i in range(len(tokenizer)):
            text = tokenizer.decode([i], skip_special_tokens=True).strip()
            if not text or not text.isprintable() or "\ufffd" in text:
                model.get_input_embeddings().weight[i] = 0.0
    folder = tmp_path_factory.mktemp("serve") / "tiny-chat"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def paint_folder(tmp_path_factory):
    from transformers import Qwen2ForCausalLM

    from t2i import MPMPaintPipeline
    from tests.mpm.conftest import make_tokenizer, text_config

    root = tmp_path_factory.mktemp("paint")
    tok = make_tokenizer()
    torch.manual_seed(0)
    config = text_config("qwen2", len(tok))
    config.hidden_size, config.intermediate_size = 64, 128
    Qwen2ForCausalLM(config).save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    pipe = MPMPaintPipeline.from_parts(root / "llm", unet="configs/t2i/unet_tiny_32px.json")
    pipe.save_pretrained(root / "tiny-paint")
    return root / "tiny-paint"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve_app():
    """serve_app(**ServeConfig fields) -> a ThreadedServer, stopped after the test."""
    from mpm.serve.server import ServeConfig, ThreadedServer, build_app

    running = []

    def start(**kwargs):
        running.append(ThreadedServer(build_app(ServeConfig(**kwargs))))
        return running[-1]

    yield start
    for r in running:
        r.close()
