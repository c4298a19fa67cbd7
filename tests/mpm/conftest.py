"""Tiny real components for the image-to-text model: tokenizers trained in memory, models built from configs."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    Gemma2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    ResNetConfig,
    SiglipVisionConfig,
)

CORPUS = [
    "A photo of a red circle on the left.", "Describe the image.", "What color is the square?", "It is blue.",
    "一只红色的猫坐在垫子上。", "这是什么颜色？", "蓝色。", "Der Hund spielt im Schnee.", "User: Assistant:",
    "A red picture.", "A green picture.", "A blue picture.", "A yellow picture.",
] * 30  # fmt: skip
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(chat_template: bool = True, pad: bool = True) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=300, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>" if pad else None
    )
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def text_config(kind: str, vocab: int):
    common = {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 2048}  # fmt: skip
    if kind == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if kind == "llama":
        return LlamaConfig(**common)
    return Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=64)


def vision_config(kind: str):
    if kind == "clip":
        return CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    if kind == "siglip":
        return SiglipVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    return ResNetConfig(
        num_channels=3,
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        layer_type="basic",
        downsample_in_first_stage=True,
    )


@pytest.fixture
def tiny():
    """tiny(vision="clip", text="qwen2", connector="mlp", **config) -> (model, processor), random weights."""
    from mpm.modeling import MPMForConditionalGeneration

    def build(vision: str = "clip", text: str = "qwen2", connector: str = "mlp", tokenizer=None, **kwargs):
        tok = tokenizer or make_tokenizer()
        defaults = {"num_queries": 4, "image_size": 32}
        if vision == "resnet":
            defaults["vision_feature_layer"] = -1
        defaults.update(kwargs)
        return MPMForConditionalGeneration.from_parts(
            vision_config(vision), text_config(text, len(tok)), tokenizer=tok, connector_type=connector, **defaults
        )

    return build


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory):
    """Folders holding a tiny CLIP vision tower and a tiny Qwen2 LLM with its tokenizer (as if downloaded)."""
    return make_tiny_parts(tmp_path_factory.mktemp("parts"))


def make_tiny_parts(root):
    import torch
    from transformers import CLIPVisionModel, Qwen2ForCausalLM

    torch.manual_seed(0)
    CLIPVisionModel(vision_config("clip")).save_pretrained(root / "vision")
    tok = make_tokenizer()
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(text_config("qwen2", len(tok)))
    pretrain_text(lm, tok)
    lm.save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    return root / "vision", root / "llm"


def pretrain_text(lm, tok, steps: int = 400) -> None:
    """A little text-only pretraining, so the frozen LLM of stage 1 already speaks the captions' language: then
    only the connector has to tell it which colour (as a real multilingual LLM knows its words)."""
    import random

    import torch

    from mpm.train_config import CAPTION_PROMPTS

    rng = random.Random(0)
    texts = []
    for _ in range(256):
        colour = rng.choice(list(COLOURS))
        # The colour is written where the image will be: the LM learns to read that slot (reference/miniworld-probe.md:
        # an LM that reads a context slot is what lets a frozen LM take what the connector puts there).
        user = f"{colour}\n{rng.choice(CAPTION_PROMPTS)}"
        texts.append(
            tok.apply_chat_template(
                [{"role": "user", "content": user}, {"role": "assistant", "content": f"A {colour} picture."}],
                tokenize=False,
            )
        )
    optimizer = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    for step in range(steps):
        batch = tok(texts[(step * 16) % 256 : (step * 16) % 256 + 16], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = lm(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


@pytest.fixture(scope="session")
def colour_shards(tmp_path_factory):
    """Pair shards written by the real sharder: flat-coloured images captioned with their colour (learnable)."""
    return make_colour_shards(tmp_path_factory.mktemp("colour_pairs"))


def make_colour_shards(root):
    import json
    import random

    from PIL import Image

    from dataproc.sharder import ShardConfig, shard
    from mpm.core.config import load_config

    rng = random.Random(0)
    rows = []
    for i in range(96):
        name = rng.choice(list(COLOURS))
        colour = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[name])
        w, h = rng.choice([(40, 40), (64, 48), (48, 64)])
        Image.new("RGB", (w, h), colour).save(root / f"{i}.png")
        rows.append({"url": str(root / f"{i}.png"), "caption": f"A {name} picture."})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = {
        "input.path": str(root / "pairs.jsonl"), "output.path": str(root / "shards"), "output.samples_per_shard": 24,
        "executor.processes": 1, "resize.image_size": 32, "resize.resize_mode": "keep_ratio", "filters.languages": [],
        "filters.dedup_exact": False, "filters.near_duplicate_max_distance": None, "filters.min_caption_chars": 1,
        "output.encode_format": "png",
    }  # fmt: skip
    shard(load_config(ShardConfig, None, flags), show_progress=False)
    return root / "shards"
