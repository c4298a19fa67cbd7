"""Loading a model for inference and the one batched generation function that chat, eval and the demo use."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from mpm.core.errors import ModelLoadError, model_errors
from mpm.core.images import open_image
from mpm.modeling import MPMForConditionalGeneration
from mpm.processor import PLAIN_CHAT_TEMPLATE, MPMProcessor, end_of_turn_ids


def load_model(
    path: str | os.PathLike,
    device: str = "auto",
    dtype=None,
    trust_remote_code: bool = False,
    quantize: str | None = None,
):
    """(model, processor) from an MPM checkpoint or a LLaVA one (exported by `mpm export llava`, or native).
    `quantize`: "int8" or "int4" stores the LLM's Linear weights quantised (mpm.quantize.quantize_model)."""
    if quantize is not None:
        from mpm.quantize import check_mode

        check_mode(quantize)  # an unknown mode or a missing library fails before the model loads
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path}: no config.json: not a saved model folder")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (ValueError, AttributeError) as exc:
        raise ModelLoadError(f"{config_file} is not a JSON object ({exc}): not a saved model folder") from None
    device = device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if model_type == "mpm":
        with model_errors("model", path):
            model = MPMForConditionalGeneration.from_pretrained(path, dtype=dtype or "auto")
            processor = MPMProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    elif model_type == "llava":
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        with model_errors("model", path):
            model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype or "auto")
            processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
            processor.image_processor = pil_image_processor(path)
    else:
        raise ModelLoadError(
            f"{path} holds a {model_type!r} model, not an MPM ('mpm') or LLaVA ('llava') image-to-text checkpoint"
        )
    model = model.to(device).eval()
    if quantize is not None:
        from mpm.quantize import quantize_model

        model = quantize_model(model, quantize)
    return model, processor


def pil_image_processor(path):
    """The checkpoint's image processor with the PIL backend: the pixels MPM's processor gives (transformers 5
    picks the torchvision backend when torchvision is installed, whatever the saved file says)."""
    import transformers
    from transformers import AutoImageProcessor

    if int(transformers.__version__.split(".")[0]) >= 5:
        return AutoImageProcessor.from_pretrained(path, backend="pil")
    return AutoImageProcessor.from_pretrained(path, use_fast=False)


@dataclass
class Request:
    """One generation: images plus chat messages (the chat template is applied) or a raw prompt string with
    `<image>` markers (no template: for models trained on raw prompts). Without any marker, the images go first
    (at the start of the first user message, or of the prompt), as `mpm chat` places them."""

    images: list[Image.Image | str] = field(default_factory=list)
    messages: list[dict] | None = None
    prompt: str | None = None


def image_marker(processor) -> str:
    """The marker a message uses for an image: this model's image token (LLaVA processors name theirs too)."""
    if isinstance(processor, MPMProcessor):
        return processor.config.image_token
    return getattr(processor, "image_token", "<image>")


def with_markers(processor, text: str, images: int) -> str:
    """Text without image markers gets one per image at its start."""
    marker = image_marker(processor)
    if images and marker not in text:
        return marker * images + "\n" + text
    return text


def placed(request: Request, processor) -> Request:
    """The request with its images' markers placed: unchanged when any message (or the prompt) has a marker, else
    the markers at the start of the first user message (or of the prompt)."""
    if request.prompt is not None:
        return Request(request.images, prompt=with_markers(processor, request.prompt, len(request.images)))
    marker = image_marker(processor)
    contents = [m.get("content", "") for m in request.messages]
    if not request.images or any(not isinstance(c, str) or marker in c for c in contents):
        return request  # markers placed already, or content parts ([{"type": "image"}, ...]) the template places
    messages = [dict(m) for m in request.messages]
    first = next((m for m in messages if m.get("role") == "user"), None)
    if first is not None:
        first["content"] = with_markers(processor, first["content"], len(request.images))
    return Request(request.images, messages=messages)


def stop_tokens(model, processor) -> list[int]:
    """Generation ends at the LLM's own end tokens (a list for Llama-3 or Gemma), at the tokenizer's eos, and at
    the token that closes an assistant turn in the chat template (a base checkpoint's eos is <|endoftext|> while
    its template closes turns with <|im_end|>; checkpoints saved before this was recorded still stop there)."""
    config = model.language_model.generation_config if isinstance(model, MPMForConditionalGeneration) else None
    eos = (config or model.generation_config).eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    tokenizer = processor.tokenizer
    template = tokenizer.chat_template or getattr(processor, "chat_template", None) or PLAIN_CHAT_TEMPLATE
    extra = [tokenizer.eos_token_id, *end_of_turn_ids(tokenizer, template)]
    return ids + [i for i in dict.fromkeys(extra) if i is not None and i not in ids]


@torch.no_grad()
def generate(
    model,
    processor,
    requests: list[Request],
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    show_progress: bool = False,
) -> list[str]:
    """Answers to `requests`, in order: batched, left-padded, greedy unless `do_sample`. A reasoning block the
    model opens its answer with (Qwen3's `<think>...</think>`) is left out of the answer. `show_progress`: a bar
    over the requests (long evaluations)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for i, r in enumerate(requests):
        if (r.messages is None) == (r.prompt is None):
            raise ValueError(
                f"request {i} must have either `messages` or `prompt`, not {'both' if r.prompt else 'neither'}"
            )
    requests = [placed(r, processor) for r in requests]
    sampling = {"do_sample": do_sample, **({"temperature": temperature, "top_p": top_p} if do_sample else {})}
    sampling["eos_token_id"] = stop_tokens(model, processor)
    answers: list[str] = []
    device = next(model.parameters()).device
    bar = tqdm(total=len(requests), unit=" requests", disable=not show_progress)
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        images = [[open_image(i) for i in r.images] for r in batch]
        if isinstance(processor, MPMProcessor):
            encoded = [
                processor.encode_prompt(r.prompt if r.prompt is not None else r.messages, imgs)
                for r, imgs in zip(batch, images)
            ]
            inputs = processor.collate(encoded, padding_side="left")
            pixels = inputs["pixel_values"]
            if pixels is not None:
                pixels = pixels.to(device) if isinstance(pixels, torch.Tensor) else [p.to(device) for p in pixels]
            new = model.generate(
                inputs["input_ids"].to(device),
                pixels,
                inputs["attention_mask"].to(device),
                max_new_tokens=max_new_tokens,
                pad_token_id=processor.tokenizer.pad_token_id,
                **sampling,
            )
            tokenizer = processor.tokenizer
        else:  # a LLaVA checkpoint with its own processor
            tokenizer = processor.tokenizer
            tokenizer.padding_side = "left"
            # A chat template writes its own special tokens (BOS included); a raw prompt gets the tokenizer's, as
            # when tokenized alone, even when it shares the batch with templated requests.
            texts = [
                r.prompt
                if r.prompt is not None
                else processor.apply_chat_template(r.messages, add_generation_prompt=True)
                for r in batch
            ]
            bos = tokenizer.bos_token if tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id] else None
            texts = [
                bos + t if r.prompt is not None and bos and not t.startswith(bos) else t for r, t in zip(batch, texts)
            ]
            flat = [im for imgs in images for im in imgs]
            inputs = processor(
                images=flat or None, text=texts, return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            out = model.generate(
                **inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
            )
            new = out[:, inputs["input_ids"].shape[1] :]
        answers += [without_reasoning(t) for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
        bar.update(len(batch))
    bar.close()
    return answers


def without_reasoning(text: str) -> str:
    """The answer after a leading `<think>...</think>` block (kept whole when the block is never closed)."""
    text = text.strip()
    if text.startswith("<think>") and "</think>" in text:
        text = text.split("</think>", 1)[1].strip()
    return text
