"""Preference pairs as model inputs, and the per-token log-probs of their responses (policy and reference alike).

    pair -> two conversations, [user: <image> question, assistant: chosen] and [..., assistant: rejected],
            encoded by the model's own processor (`MPMProcessor.encode_conversation`: only the answer and what
            closes its turn are labelled, as in supervised fine-tuning); or, for a model trained on raw prompts
            (the miniature world's), the raw prompt followed by each answer (`MPMProcessor.encode_raw`)
         -> one padded batch: the B chosen rows, then the B rejected rows (one forward pass for both)
         -> per-token log-probs of the labelled tokens (`losses.token_logps`)

A pair longer than `max_length` on either side is skipped and counted, never cut: a truncated answer would be
compared with a whole one, and the corrected segments of the two would no longer line up.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from mpm.align.data import PreferencePair, open_image
from mpm.align.losses import segment_weights, target_logps
from mpm.inference import Request, with_markers
from mpm.processor import IGNORE_INDEX, Encoded, MPMProcessor, ProcessingError


@dataclass
class EncodedPair:
    id: str
    chosen: Encoded
    rejected: Encoded

    def response_ids(self) -> tuple[list[int], list[int]]:
        """The labelled (scored) token ids of each side, in order: what the diff and the caches are over."""
        return _scored(self.chosen), _scored(self.rejected)


def _scored(encoded: Encoded) -> list[int]:
    return [label for label in encoded.labels if label != IGNORE_INDEX]


def raw_text(raw_prompt: str, question: str) -> str:
    """A raw prompt template filled: `{question}` replaced by the question (a plain replace: braces in the
    question stay as they are)."""
    return raw_prompt.replace("{question}", question)


def prompt_request(question: str, images: list, raw_prompt: str | None = None) -> Request:
    """The generation request that asks `question` the way the model was trained: through its chat template, or,
    for a model trained on raw prompts, the template `raw_prompt` filled with the question."""
    if raw_prompt is not None:
        return Request(images, prompt=raw_text(raw_prompt, question))
    return Request(images, messages=[{"role": "user", "content": question}])


def encode_answer(processor: MPMProcessor, question: str, answer: str, images: list,
                  raw_prompt: str | None = None) -> Encoded:  # fmt: skip
    """`answer` to `question` as training inputs, only the answer (and what closes it) labelled: a chat turn, or
    after the filled raw prompt (`MPMProcessor.encode_raw`, as `mpm train i2t` encodes caption prompts)."""
    if raw_prompt is not None:
        return processor.encode_raw(with_markers(processor, raw_text(raw_prompt, question), len(images)), answer,
                                    images)  # fmt: skip
    question = with_markers(processor, question, len(images))
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return processor.encode_conversation(messages, images)


def encode_pair(processor: MPMProcessor, pair: PreferencePair, max_length: int, key: str | None = None,
                raw_prompt: str | None = None) -> EncodedPair:  # fmt: skip
    """The pair's two answers as training inputs, named `key` (default: the pair's id); `raw_prompt` as in
    `encode_answer`. Raises ProcessingError (too long, nothing to learn) or a DataError (the image is missing or
    undecodable): the caller counts the pair as skipped."""
    images = [open_image(pair)] if pair.image is not None else []
    sides = []
    for answer in (pair.chosen, pair.rejected):
        encoded = encode_answer(processor, pair.question, answer, images, raw_prompt)
        if len(encoded.input_ids) > max_length:
            raise ProcessingError(
                f"longer than max_length={max_length} ({len(encoded.input_ids)} tokens with the image): raise "
                "data.max_length or shorten the pair"
            )
        sides.append(encoded)
    return EncodedPair(key if key is not None else pair.id, *sides)


def collate_pairs(processor: MPMProcessor, pairs: list[EncodedPair]) -> dict:
    """One right-padded batch of 2B rows: rows [0, B) the chosen sides, rows [B, 2B) the rejected ones."""
    batch = processor.collate([p.chosen for p in pairs] + [p.rejected for p in pairs])
    batch["ids"] = [p.id for p in pairs]
    return batch


def pair_weights(pairs: list[EncodedPair], gamma: float, min_match: int) -> list[torch.Tensor]:
    """Per-token weights of each row of `collate_pairs` (chosen rows, then rejected): gamma on corrected tokens."""
    chosen, rejected = [], []
    for pair in pairs:
        c, r = segment_weights(*pair.response_ids(), gamma=gamma, min_match=min_match)
        chosen.append(c)
        rejected.append(r)
    return chosen + rejected


def response_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps (2B, T - 1), mask (2B, T - 1)) of the labelled tokens: one forward pass over both sides. Position t
    predicts token t + 1; the LM head runs only where some row's next token is scored (the answers: a fraction of
    a sequence that holds an image's tokens), as `mpm train i2t` does."""
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    keep = mask.any(0).nonzero().squeeze(1)  # (K,) positions
    logits = model(
        input_ids=batch["input_ids"],
        pixel_values=batch["pixel_values"],
        attention_mask=batch["attention_mask"],
        logits_to_keep=keep,
        use_cache=False,
    ).logits  # (2B, K, V)
    logps = torch.zeros(mask.shape, dtype=torch.float32, device=logits.device)
    logps[:, keep] = target_logps(logits, targets[:, keep])
    return logps, mask


def response_hash(pair: EncodedPair) -> str:
    """A digest of both sides' scored token ids: the reference cache checks it, so a pair encoded otherwise than
    when its log-probs were cached (another tokenizer, a changed image, data edited in place) is refused."""
    chosen, rejected = pair.response_ids()
    return hashlib.sha1(json.dumps([chosen, rejected]).encode()).hexdigest()[:12]


def unpadded(logps: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each row's scored log-probs alone (float32, on the CPU): what the reference cache stores."""
    return [row[keep].detach().float().cpu() for row, keep in zip(logps, mask, strict=True)]
