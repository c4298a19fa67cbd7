"""Loading the multilingual LLM and its tokenizer: the one place both the image-to-text and the text-to-image
models get their language model from (t2i imports this; it never copies it)."""

from __future__ import annotations

import os

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig, PreTrainedModel

from mpm.core.hub import check_model_source


def load_llm(
    llm: str | PreTrainedModel | PreTrainedConfig,
    tokenizer=None,
    dtype=None,
    trust_remote_code: bool = False,
):
    """(causal LM, tokenizer) from a folder or hub id, a loaded model, or a config (random weights, for tests).

    A tokenizer without a pad token gets its end-of-sequence token as pad (for batching; padding is masked).
    """
    if isinstance(llm, PreTrainedConfig):
        model = AutoModelForCausalLM.from_config(llm)
    elif isinstance(llm, PreTrainedModel):
        model = llm
    else:
        check_model_source("llm", llm)
        model = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype or "auto", trust_remote_code=trust_remote_code)
    if tokenizer is None:
        if not isinstance(llm, str | os.PathLike):
            raise ValueError("`tokenizer` is needed when the LLM is given as a config or a model object")
        tokenizer = AutoTokenizer.from_pretrained(llm, trust_remote_code=trust_remote_code)
    elif isinstance(tokenizer, str | os.PathLike):
        check_model_source("tokenizer", tokenizer)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an end-of-sequence token; give it one of them")
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
