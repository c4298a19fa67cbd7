"""`MPMProcessor`: images and conversations -> model inputs, with labels on assistant tokens only.

Images: resized to `image_size` (or sliced MiniCPM-V style, see mpm/slicing.py), normalised with the vision
tower's mean/std. Text: every `<image>` marker in a message becomes that image's placeholders
    overview:  <image> x n                                  (n visual tokens: patches, or the connector's queries)
    slices:    \\n <slice><image> x n</slice><slice>...</slice> \\n <slice>...       (rows separated by newlines)
Chat formatting uses the tokenizer's chat template when it has one, else this plain template (PLAIN_CHAT_TEMPLATE,
also written into exported checkpoints):
    [bos]{system}\\n\\nUser: {text}\\nAssistant: {text}{eos}\\nUser: ...
(the generation prompt ends with "Assistant:", so the space before an answer is the answer's first token).
Labels are built turn by turn: the tokens of assistant turn i are those that rendering turns 0..i adds to
rendering turns 0..i-1 plus the generation prompt; nothing is found by splitting strings on separators (LLaVA's
"tokenization mismatch" bug). Templates that render a turn differently once later turns follow (Qwen3 gives only
the last answer its empty <think> block) are handled by finding the answer's text after its generation prompt in
the full rendering; a template for which even that fails is refused with a clear error.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer

from mpm.configuration import MPMConfig
from mpm.connectors import connector_class
from mpm.core.errors import DataError
from mpm.slicing import slice_image

IGNORE_INDEX = -100
PROCESSOR_FILE = "mpm_processor.json"
PLAIN_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\\n' }}"
    "{% else %}{{ 'Assistant: ' + m['content'] + eos_token + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


class ProcessingError(DataError):
    """A sample cannot be turned into model inputs (the message says why); training counts and skips it."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    pixel_values: list[torch.Tensor]  # (3, H, W) per overview / slice, in placeholder order


class MPMProcessor:
    def __init__(self, tokenizer, config: MPMConfig):
        self.tokenizer = tokenizer
        self.config = config
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        vocab = tokenizer.get_vocab()
        for token in config.added_tokens:
            if token not in vocab:
                raise ValueError(f"the tokenizer has no {token!r} token: build the model with from_parts()")
        self.mean = torch.tensor(config.image_mean).view(3, 1, 1)
        self.std = torch.tensor(config.image_std).view(3, 1, 1)

    # saving ----------------------------------------------------------------------------------------------------
    def save_pretrained(self, folder: str | os.PathLike) -> None:
        self.tokenizer.save_pretrained(folder)
        Path(folder, PROCESSOR_FILE).write_text(json.dumps({"processor": "MPMProcessor"}) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, trust_remote_code: bool = False) -> MPMProcessor:
        config = MPMConfig.from_pretrained(folder)
        return cls(AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code), config)

    # images ----------------------------------------------------------------------------------------------------
    def tokens_per_image(self, height: int, width: int) -> int:
        return connector_class(self.config.connector_type).tokens_per_image(self.config, height, width)

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        arr = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (arr - self.mean) / self.std  # (3, H, W)

    def image_inputs(self, image: Image.Image) -> tuple[list[torch.Tensor], str]:
        """(pixel tensors, placeholder text) of one image: its overview, then its rows of slices; wrapped in the
        image delimiters when the model has them (several images in a message stay apart)."""
        cfg = self.config
        tok = cfg.image_token
        if not cfg.use_slicing:
            pixels = self.to_tensor(
                image.convert("RGB").resize((cfg.image_size, cfg.image_size), Image.Resampling.BICUBIC)
            )
            return [pixels], self._delimited(tok * self.tokens_per_image(cfg.image_size, cfg.image_size))
        sliced = slice_image(image.convert("RGB"), cfg.scale_resolution, cfg.max_slices, cfg.patch_size)
        tensors = [self.to_tensor(sliced.overview)]
        text = tok * self.tokens_per_image(sliced.overview.height, sliced.overview.width)
        rows = []
        for row in sliced.slices:
            cells = []
            for piece in row:
                tensors.append(self.to_tensor(piece))
                cells.append(
                    cfg.slice_start_token + tok * self.tokens_per_image(piece.height, piece.width) + cfg.slice_end_token
                )
            rows.append("".join(cells))
        if rows:
            text += "\n" + "\n".join(rows)
        return tensors, self._delimited(text)

    def _delimited(self, placeholders: str) -> str:
        cfg = self.config
        return cfg.image_start_token + placeholders + cfg.image_end_token if cfg.delimit_images else placeholders

    def _expand(
        self, messages: list[dict], images: list[Image.Image]
    ) -> tuple[list[dict], list[torch.Tensor], list[int]]:
        """Messages with markers replaced by placeholders; pixels; visual tokens per image (for truncation)."""
        marker = self.config.image_token
        found = sum(m["content"].count(marker) for m in messages)
        if found != len(images):
            raise ProcessingError(
                f"the conversation has {found} {marker} marker{'s' * (found != 1)} but {len(images)} "
                f"image{'s' * (len(images) != 1)}"
            )
        pixels: list[torch.Tensor] = []
        per_image: list[tuple[int, int]] = []  # (tensors, placeholder tokens) of each image
        expanded, k = [], 0
        for m in messages:
            parts = m["content"].split(marker)
            text = parts[0]
            for part in parts[1:]:
                tensors, placeholder = self.image_inputs(images[k])
                pixels += tensors
                per_image.append((len(tensors), placeholder.count(marker)))
                text += placeholder + part
                k += 1
            expanded.append({"role": m["role"], "content": text})
        return expanded, pixels, per_image

    # text ------------------------------------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        tok = self.tokenizer
        try:
            return tok.apply_chat_template(
                messages,
                chat_template=tok.chat_template or PLAIN_CHAT_TEMPLATE,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
        except Exception as exc:  # jinja2.TemplateError: the template refuses (e.g. Gemma: no system role)
            raise ProcessingError(f"the chat template refuses this conversation: {exc}") from None

    def end_of_turn_ids(self) -> list[int]:
        """The token that closes an assistant turn in this model's chat format (see `end_of_turn_ids`)."""
        return end_of_turn_ids(self.tokenizer, self.tokenizer.chat_template or PLAIN_CHAT_TEMPLATE)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_conversation(
        self, messages: list[dict], images: list[Image.Image], max_length: int | None = None
    ) -> Encoded:
        """Training inputs: every assistant turn supervised, nothing else. Raises ProcessingError."""
        if not messages or messages[-1]["role"] != "assistant":
            raise ProcessingError("the conversation must end with an assistant turn")
        expanded, pixels, per_image = self._expand(messages, images)
        full = self.render(expanded, add_generation_prompt=False)
        input_ids = self._ids(full)
        labels = [IGNORE_INDEX] * len(input_ids)
        for i, message in enumerate(expanded):
            if message["role"] != "assistant":
                continue
            if not message["content"].strip():
                raise ProcessingError(f"assistant turn {i} is empty")
            prompt = self.render(expanded[:i], add_generation_prompt=True)
            alone = self.render(expanded[: i + 1], add_generation_prompt=False)
            start, end = self._ids(prompt), self._ids(alone)
            if input_ids[: len(end)] != end:  # rendered otherwise when more turns follow: find the answer's text
                end = self._answer_end(full, prompt, alone, message["content"], input_ids)
            if end[: len(start)] != start or input_ids[: len(end)] != end:
                raise ProcessingError(
                    f"the chat template does not render assistant turn {i} after its generation prompt, so its "
                    "tokens cannot be found exactly; use a template without history-dependent rewriting"
                )
            labels[len(start) : len(end)] = input_ids[len(start) : len(end)]
        if max_length is not None and len(input_ids) > max_length:
            input_ids, labels, pixels = self._truncate(input_ids, labels, pixels, per_image, max_length)
        return Encoded(input_ids, labels, pixels)

    def encode_raw(self, prompt: str, answer: str, images: list[Image.Image], max_length: int | None = None) -> Encoded:
        """Training inputs for a raw prompt (no chat template; `<image>` markers anywhere, e.g.
        "<ctx><image></ctx> Describe in English:") followed by `answer`: the answer's tokens and the end-of-sequence
        token are supervised. Tokenized as `encode_prompt` tokenizes a raw prompt at generation (the tokenizer's
        own special tokens), so a model trained this way is asked the same way. Raises ProcessingError."""
        if not answer.strip():
            raise ProcessingError("the answer is empty")
        expanded, pixels, per_image = self._expand([{"role": "user", "content": prompt}], images)
        text = expanded[0]["content"]
        start = self.tokenizer(text)["input_ids"]
        full = self.tokenizer(f"{text} {answer.strip()}")["input_ids"]
        if full[: len(start)] != start:
            raise ProcessingError(
                "the raw prompt's tokens change when the answer follows it: end it with a space-free mark"
            )
        if self.tokenizer.eos_token_id is not None and full[-1:] != [self.tokenizer.eos_token_id]:
            full = [*full, self.tokenizer.eos_token_id]
        labels = [IGNORE_INDEX] * len(start) + full[len(start) :]
        input_ids = full
        if max_length is not None and len(input_ids) > max_length:
            input_ids, labels, pixels = self._truncate(input_ids, labels, pixels, per_image, max_length)
        return Encoded(input_ids, labels, pixels)

    def _answer_end(self, full: str, prompt: str, alone: str, content: str, input_ids: list[int]) -> list[int]:
        """The tokens of `full` up to the end of this answer and what closes it (as when the turn is rendered last:
        `alone`). The answer must follow its generation prompt directly; [] when it does not (refused)."""
        text = content.strip()
        at = full.find(text, len(prompt)) if full.startswith(prompt) else -1
        if at < 0 or full[len(prompt) : at].strip():
            return []
        closing = alone[alone.rfind(text) + len(text) :]  # e.g. "<|im_end|>\n"
        end = at + len(text)
        if not full.startswith(closing, end):
            return []
        upto = self._ids(full[: end + len(closing)])
        return upto if input_ids[: len(upto)] == upto else []

    def _truncate(self, input_ids, labels, pixels, per_image, max_length):
        """Cut to max_length without cutting an image's placeholders (or its delimiters): an image that does not
        fit whole is dropped, with everything after it."""
        cfg = self.config
        positions = [i for i, t in enumerate(input_ids) if t == cfg.image_token_id]
        cut, seen, kept_tensors = max_length, 0, 0
        for n_tensors, n_tokens in per_image:
            first, last = positions[seen], positions[seen + n_tokens - 1]
            if cfg.delimit_images:  # <image_start> just before the placeholders, <image_end> after the last slice
                first -= 1
                last = input_ids.index(cfg.image_end_token_id, last)
            if last >= cut:
                cut = min(cut, first)
                break
            seen += n_tokens
            kept_tensors += n_tensors
        input_ids, labels = input_ids[:cut], labels[:cut]
        if all(label == IGNORE_INDEX for label in labels):
            raise ProcessingError(
                f"longer than max_length={max_length}: nothing to learn from remains after truncation"
            )
        return input_ids, labels, pixels[:kept_tensors]

    def encode_prompt(self, messages: list[dict] | str, images: list[Image.Image]) -> Encoded:
        """Generation inputs: chat messages (template + generation prompt) or a raw prompt with <image> markers."""
        if isinstance(messages, str):  # raw text: tokenized as the tokenizer does by default (its BOS included)
            expanded, pixels, _ = self._expand([{"role": "user", "content": messages}], images)
            return Encoded(self.tokenizer(expanded[0]["content"])["input_ids"], [], pixels)
        expanded, pixels, _ = self._expand(messages, images)
        return Encoded(self._ids(self.render(expanded, add_generation_prompt=True)), [], pixels)

    # batching --------------------------------------------------------------------------------------------------
    def collate(self, items: list[Encoded], padding_side: str = "right") -> dict:
        """Pad to the longest; labels padded with -100; pixels concatenated in order (stacked when all one size)."""
        length = max(len(x.input_ids) for x in items)
        pad = self.tokenizer.pad_token_id
        ids, mask, labels = [], [], []
        for x in items:
            n = length - len(x.input_ids)
            fill = [pad] * n
            if padding_side == "left":
                ids.append(fill + x.input_ids)
                mask.append([0] * n + [1] * len(x.input_ids))
                labels.append([IGNORE_INDEX] * n + (x.labels or [IGNORE_INDEX] * len(x.input_ids)))
            else:
                ids.append(x.input_ids + fill)
                mask.append([1] * len(x.input_ids) + [0] * n)
                labels.append((x.labels or [IGNORE_INDEX] * len(x.input_ids)) + [IGNORE_INDEX] * n)
        return {
            "input_ids": torch.tensor(ids),
            "attention_mask": torch.tensor(mask),
            "labels": torch.tensor(labels),
            "pixel_values": _stacked([p for x in items for p in x.pixel_values]),
        }

    def collate_packed(self, items: list[Encoded]) -> dict:
        """All samples in one row, no attention mask: `position_ids` restart at 0 for each sample, which tells the
        LLM's attention (transformers' packed-sequence masks; flash attention's variable-length kernels, which
        see packing only in a single row) to keep samples apart, so each sample's logits and loss are what they
        would be alone. The first token of each sample is never a target: the previous sample's last token must
        not predict it."""
        ids, labels, positions = [], [], []
        for x in items:
            ids += x.input_ids
            labels += [IGNORE_INDEX] + (x.labels or [IGNORE_INDEX] * len(x.input_ids))[1:]
            positions += list(range(len(x.input_ids)))
        return {
            "input_ids": torch.tensor([ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]),
            "pixel_values": _stacked([p for x in items for p in x.pixel_values]),  # placeholder order
        }


def end_of_turn_ids(tokenizer, chat_template: str) -> list[int]:
    """[id] of the special token that closes an assistant turn in `chat_template` (found by rendering one turn:
    ChatML's <|im_end|>, Llama-3's <|eot_id|>, Gemma's <end_of_turn>, the plain template's eos), or [] when the
    turn ends in plain text (nothing safe to stop on)."""
    answer = "Hello there"
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer}],
            chat_template=chat_template,
            tokenize=False,
        )
    except Exception:  # jinja2.TemplateError: a template that refuses this minimal exchange has no answer to read
        return []
    closing = rendered[rendered.rfind(answer) + len(answer) :]
    ids = tokenizer(closing, add_special_tokens=False)["input_ids"] if closing.strip() else []
    special = set(tokenizer.all_special_ids) | {
        i
        for t, i in tokenizer.get_added_vocab().items()
        if getattr(tokenizer.added_tokens_decoder.get(i), "special", False)
    }
    return ids[:1] if ids and ids[0] in special else []


def _stacked(pixels: list[torch.Tensor]):
    """One (N, 3, H, W) tensor when every image or slice has one size, else the list; None without images."""
    if not pixels:
        return None
    return torch.stack(pixels) if len({tuple(p.shape) for p in pixels}) == 1 else pixels
