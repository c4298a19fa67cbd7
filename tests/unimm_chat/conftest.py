"""Fixtures for unimm_chat: official-schema annotation files, a tiny real models (the fake OpenAI-compatible server is in tests/conftest.py)."""

from __future__ import annotations

import io
import json

import pytest

from unimm_chat.synthetic import write_annotations


@pytest.fixture
def annotations(tmp_path):
    """{source name: path} of small synthetic files in the official schemas (40 images)."""
    return write_annotations(tmp_path / "ann", 40)


CORPUS = [
    "A man riding a wave on a surfboard.", "Is it daytime?", "Yes, definitely.", "What color is the bus?",
    '{"conversation": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}',
    "一只猫坐在垫子上。", "Der Hund spielt im Schnee.", "Captions: Questions and answers: Rules: reasoning",
] * 20  # fmt: skip


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    """A randomly initialised 1-layer Qwen2 with a small byte-level BPE tokenizer and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("tiny_chat")
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    bpe.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    config = Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=4096, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_m2m100(tmp_path_factory):
    """A randomly initialised 1-layer M2M100 (the NLLB architecture) with a small sentencepiece vocabulary."""
    import sentencepiece as spm
    from transformers import M2M100Config, M2M100ForConditionalGeneration, M2M100Tokenizer

    folder = tmp_path_factory.mktemp("tiny_m2m100")
    model_proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=model_proto, vocab_size=100, hard_vocab_limit=False,
        character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    (folder / "spm.model").write_bytes(model_proto.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model_proto.getvalue())
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    for token in ["<s>", "<pad>", "</s>", "<unk>"]:
        vocab.setdefault(token, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    tok = M2M100Tokenizer(str(folder / "vocab.json"), str(folder / "spm.model"), src_lang="en", tgt_lang="zh")
    config = M2M100Config(
        vocab_size=max(tok.lang_token_to_id.values()) + 1, d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_position_embeddings=128, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id,
    )  # fmt: skip
    M2M100ForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
