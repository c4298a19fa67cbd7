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
