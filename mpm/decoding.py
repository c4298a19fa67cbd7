"""Step-by-step batched decoding: what streaming needs when several requests share one generation batch.

transformers' `generate` runs a batch to the end and its streamers follow one sequence; a server that streams
every request of a batch as it is produced needs the loop itself:

    prefill   the batch's prompts (left-padded, images placed as `mpm.inference.generate` places them) in one
              forward pass with the KV cache on; positions count from each row's first real token
    step      each live row picks its next token from the last logits with ITS OWN settings: greedy (temperature 0)
              or sampled (logits / temperature, nucleus top_p, from the row's own seeded generator, so a row's
              tokens do not depend on what it is batched with); the chosen tokens go through one forward pass
              with the cache (a finished row keeps feeding a pad token)
    finish    a row stops at one of the stop tokens (the LLM's eos, the chat template's end of turn: not part of
              the answer), at its `max_new_tokens`, or when `cancelled(row)` says so (a client that went away);
              the loop ends when every row has stopped

After every step `decode` yields the step's `Token`s (one per row that was live), so the caller can stream each
row's text while the others continue. Greedy decoding gives the tokens `mpm.inference.generate` gives. MPM models
only (a LLaVA checkpoint is served as the MPM model it equals: `mpm.export.from_llava`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from mpm.core.images import open_image
from mpm.inference import Request, placed, stop_tokens
from mpm.processor import Encoded


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # the row's own generator (None: from torch's global generator)


@dataclass(frozen=True)
class Token:
    row: int
    id: int | None  # None when the row stopped without a new token (a stop token, or cancelled)
    finish: str | None  # None while the row goes on; "stop" (a stop token), "length", "cancelled"


def positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids 0, 1, ... from each row's first real token (padding: 0), as generation counts them."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def encode(processor, request: Request) -> Encoded:
    """A request as `decode` feeds it: images opened and placed, the prompt tokenized with the placeholders
    expanded and the pixels made. A server does this once per request, off the decoding thread (its length is
    what the context check reads)."""
    request = placed(request, processor)
    images = [open_image(i) for i in request.images]
    return processor.encode_prompt(request.prompt if request.prompt is not None else request.messages, images)


def _pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token of one row from its (V,) logits."""
    if sampling.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:  # nucleus: the smallest set of tokens whose mass reaches top_p
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < sampling.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def decode(model, processor, requests: Sequence[Request | Encoded], samplings: Sequence[Sampling],
           cancelled: Callable[[int], bool] = lambda row: False) -> Iterator[list[Token]]:  # fmt: skip
    """Decode the rows of `requests` (Requests, or what `encode` made of them) together, one step at a time (module
    docstring)."""
    if len(requests) != len(samplings) or not requests:
        raise ValueError(f"one Sampling per request, and at least one: got {len(requests)} and {len(samplings)}")
    device = next(model.parameters()).device
    encoded = [r if isinstance(r, Encoded) else encode(processor, r) for r in requests]
    inputs = processor.collate(encoded, padding_side="left")
    pixels = inputs["pixel_values"]
    if pixels is not None:
        pixels = pixels.to(device) if isinstance(pixels, torch.Tensor) else [p.to(device) for p in pixels]
    mask = inputs["attention_mask"].to(device)
    stops = set(stop_tokens(model, processor))
    pad = processor.tokenizer.pad_token_id
    generators = []
    for s in samplings:
        g = None
        if s.seed is not None and s.temperature > 0:
            g = torch.Generator().manual_seed(s.seed)
        generators.append(g)
    out = model(inputs["input_ids"].to(device), pixels, mask, position_ids=positions(mask), use_cache=True,
                logits_to_keep=1)  # fmt: skip
    cache, logits = _cache_of(out), out.logits[:, -1].cpu()
    cache_arg = _cache_argument(model)
    position = positions(mask)[:, -1:]
    made = [0] * len(requests)
    live = [True] * len(requests)
    while True:
        step, chosen = [], []
        for row in range(len(requests)):
            token = pad
            if live[row]:
                if cancelled(row):
                    live[row] = False
                    step.append(Token(row, None, "cancelled"))
                else:
                    token = _pick(logits[row], samplings[row], generators[row])
                    made[row] += 1
                    if token in stops:
                        live[row] = False
                        step.append(Token(row, None, "stop"))
                    else:
                        done = made[row] >= samplings[row].max_new_tokens
                        live[row] = not done
                        step.append(Token(row, token, "length" if done else None))
            chosen.append(token)
        yield step
        if not any(live):
            return
        mask = torch.cat([mask, mask.new_ones(len(requests), 1)], dim=1)
        position = position + 1
        ids = torch.tensor(chosen, device=device).unsqueeze(1)
        out = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True, **{cache_arg: cache})
        cache, logits = _cache_of(out), out.logits[:, -1].cpu()


def _cache_argument(model) -> str:
    """transformers 5.2x names the KV cache `cache`; earlier versions `past_key_values`."""
    lm = getattr(model, "language_model", model)
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class TextStream:
    """A row's tokens as text, delta by delta: the text is decoded whole each time (so multi-token characters and
    byte-level merges come out right) and a delta is held back while it ends in an incomplete character. `stop`
    strings end the text before them."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def add(self, token: int | None) -> str:
        """The new text after `token` (None: the end: whatever was held back)."""
        if token is not None:
            self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                text, self.stopped = text[:at], True
        if token is not None and not self.stopped:
            if text.endswith("\ufffd"):
                return ""  # an incomplete character: wait for its other bytes
            held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[: len(text) - held]  # the start of a stop string is sent only once it is not one
        delta = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent = text if text.startswith(self.sent) else self.sent
        return delta
