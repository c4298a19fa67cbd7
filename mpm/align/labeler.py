"""The RLAIF-V labeler: a yes/no question about an image -> the labeler MLLM's probability that the answer is yes.

RLAIF-V (Yu et al. 2024, seeds-notes 4.1, `minicpmv_autocheck.py`) checks each atomic claim of a response by asking
the labeler a general question ("Is there a red car? Please answer yes or no.") and reading the softmax of the
FIRST generated token: the claim is accepted when P(yes) + P(Yes) > P(no) + P(No). Here, for a question q about
image x in language L (one forward pass, no sampling):

    p       = softmax(logits of the next token after the prompt)      the prompt as `mpm.inference` builds it for
                                                                      generation: chat template + generation prompt,
                                                                      ending where the answer starts
    P(yes)  = sum_{t in yes_ids(L)} p_t,   P(no) = sum_{t in no_ids(L)} p_t
    score   = P(yes) / (P(yes) + P(no))   = sigmoid(logsumexp(log p[yes]) - logsumexp(log p[no]))
    accepted  <=>  pairs.claim_accepted(score): score > pairs.ACCEPT_ABOVE (0.5)  <=>  P(yes) > P(no), RLAIF-V's rule

The score is normalised over yes and no only: probability the labeler puts on other tokens ("The", "I") does not
count either way. The question is scored as given: claims.py adds RLAIF-V's " Please answer yes or no." suffix.

Yes / no tokens come from `configs/align/yes_no.yaml` (several surface forms per word and language). Token rule
(`yes_no_token_ids`), per word (the yes side or the no side of a language): each form is tokenized alone (no special
tokens); the forms that are exactly ONE token count by that token, as RLAIF-V reads only the whole tokens yes / Yes /
no / No, and a form the tokenizer splits is then ignored (its first token, "s" of "sí", "y" of "yes" in a byte-level
vocabulary, also begins unrelated words: "se", "you"). Only for a word with no single-token form at all does the
FIRST token of each form count instead, so a vocabulary without the whole word still scores by the token the
labeler would emit first. Either way a candidate that also begins a form of the other word (" yes" and " no" both
starting with a bare-space token; two CJK characters sharing their first byte in a byte-level BPE) counts for
neither: it says nothing about the answer. Unknown-token and special-token candidates are dropped too (they are not
a single-token form). A language left with no yes or no token is refused with every form's tokenization listed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from mpm.core.config import parse_yaml
from mpm.core.errors import ConfigError
from mpm.core.images import open_image
from mpm.decoding import positions
from mpm.inference import Request, placed
from mpm.processor import MPMProcessor

YES_NO_TABLE = Path(__file__).resolve().parents[2] / "configs" / "align" / "yes_no.yaml"
WORDS = ("yes", "no")


@dataclass(frozen=True)
class YesNoIds:
    """The token ids whose probabilities are summed into P(yes) and P(no); disjoint, in the table's form order."""

    yes: tuple[int, ...]
    no: tuple[int, ...]


def load_yes_no_table(path: str | os.PathLike | None = None) -> dict[str, dict[str, list[str]]]:
    """{lang: {"yes": [forms], "no": [forms]}} from `path` (default `configs/align/yes_no.yaml`), checked."""
    path = Path(path) if path is not None else YES_NO_TABLE
    if not path.is_file():
        raise ConfigError(f"yes/no table {str(path)!r} does not exist")
    table = parse_yaml(path.read_text(encoding="utf-8"))
    if not isinstance(table, dict) or not table:
        raise ConfigError(f"{path}: must map each language to its yes and no words, got {type(table).__name__}")
    for lang, entry in table.items():
        if not isinstance(entry, dict) or set(entry) != set(WORDS):
            keys = sorted(map(str, entry)) if isinstance(entry, dict) else type(entry).__name__
            raise ConfigError(f"{path}: language {lang!r} must have exactly the keys 'yes' and 'no', got {keys}")
        for word in WORDS:
            forms = entry[word]
            if not isinstance(forms, list) or not forms or not all(isinstance(f, str) and f for f in forms):
                raise ConfigError(
                    f"{path}: {lang}.{word} must be a non-empty list of non-empty strings, got {forms!r} "
                    "(quote words YAML could read as booleans or numbers)"
                )
    return table


def yes_no_token_ids(tokenizer, lang: str, table: str | os.PathLike | None = None) -> YesNoIds:
    """The yes and no token ids of `lang` for `tokenizer` (the token rule is in the module docstring).

    Raises:
        ConfigError: `lang` is not in the table (the message lists the table's languages), or the tokenizer leaves
            no usable yes or no token (the message lists every form tried and how it tokenized).
    """
    words = load_yes_no_table(table)
    if lang not in words:
        raise ConfigError(
            f"no yes/no words for language {lang!r} in {table or YES_NO_TABLE}; its languages: "
            f"{', '.join(sorted(words))}. Add an entry there, or score the question in one of these"
        )
    special = set(tokenizer.all_special_ids)
    pieces = {w: [(f, tokenizer(f, add_special_tokens=False)["input_ids"]) for f in words[lang][w]] for w in WORDS}
    firsts = {w: {ids[0] for _, ids in pieces[w] if ids} for w in WORDS}
    shared = firsts["yes"] & firsts["no"]
    whole = {w: any(single(ids, special) for _, ids in pieces[w]) for w in WORDS}  # else: the first-token rule
    ids = {
        w: tuple(dict.fromkeys(ids[0] for _, ids in pieces[w] if usable(ids, whole[w], shared, special))) for w in WORDS
    }
    if not ids["yes"] or not ids["no"]:
        lacking = " or ".join(repr(w) for w in WORDS if not ids[w])
        lines = [
            f"  {w} {form!r} -> {tokenizer.convert_ids_to_tokens(t)} "
            f"({verdict(t, whole[w], shared, special, tokenizer)})"
            for w in WORDS
            for form, t in pieces[w]
        ]
        raise ConfigError(
            f"the labeler's tokenizer has no usable {lacking} token for language {lang!r}; the forms tried "
            f"({table or YES_NO_TABLE}) tokenize as:\n" + "\n".join(lines) + "\nAdd a form this tokenizer keeps "
            "whole as one token (not shared with the other word) to the table, or use a labeler whose vocabulary "
            "has these words"
        )
    return YesNoIds(ids["yes"], ids["no"])


def single(ids: list[int], special: set[int]) -> bool:
    """A form the tokenizer keeps whole: exactly one token, not a special or unknown one."""
    return len(ids) == 1 and ids[0] not in special


def usable(ids: list[int], whole: bool, shared: set[int], special: set[int]) -> bool:
    """Whether a form counts, by its first token: `whole` (its word has a single-token form) admits only those."""
    if not ids or ids[0] in special or ids[0] in shared:
        return False
    return len(ids) == 1 or not whole


def verdict(ids: list[int], whole: bool, shared: set[int], special: set[int], tokenizer) -> str:
    if not ids:
        return "no tokens"
    first = tokenizer.convert_ids_to_tokens(ids[0])
    if len(ids) > 1 and whole:
        return f"{len(ids)} tokens, not used: other forms of the word are one token"
    if ids[0] in special:
        return f"first token {first!r} is a special (or unknown) token"
    if ids[0] in shared:
        return f"first token {first!r} also begins a form of the other word"
    return "used" if len(ids) == 1 else f"first token {first!r} used (no form of the word is one token)"


@torch.no_grad()
def score_questions(
    model,
    processor,
    items: Sequence[tuple[Image.Image | str | os.PathLike | None, str]],
    lang: str,
    batch_size: int = 8,
    table: str | os.PathLike | None = None,
) -> list[float]:
    """P(yes) / (P(yes) + P(no)) for each (image, question), in order, from one forward pass per batch.

    Args:
        model, processor: the labeler, as `mpm.inference.load_model` returns it (an MPM or a LLaVA checkpoint).
        items: (image, question) pairs; the image a PIL image or a path (None: a text-only question). The image
            goes where the question's `<image>` marker is, else first, as `mpm chat` places it.
        lang: the questions' language, a key of the yes/no table.
        batch_size: questions per forward pass (left-padded); 1 scores one at a time. Same scores either way.
        table: another yes/no table (default `configs/align/yes_no.yaml`).
    Returns:
        One score in [0, 1] per item; the claim behind a question is accepted when
        `mpm.align.pairs.claim_accepted(score)`: score > 0.5, P(yes) > P(no).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"`batch_size` must be an integer of at least 1, got {batch_size!r}")
    for i, item in enumerate(items):
        if not (isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[1], str) and item[1].strip()):
            raise ConfigError(f"item {i} must be an (image, question) pair with a non-empty question, got {item!r}")
    ids = yes_no_token_ids(processor.tokenizer, lang, table)
    yes, no = torch.tensor(ids.yes), torch.tensor(ids.no)
    scores: list[float] = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        requests = [
            placed(Request([] if image is None else [image], [{"role": "user", "content": q}]), processor)
            for image, q in batch
        ]
        logits = next_token_logits(model, processor, requests).float()  # (B, V)
        logp = logits.log_softmax(-1)
        margin = logp[:, yes].logsumexp(-1) - logp[:, no].logsumexp(-1)  # log P(yes) - log P(no), (B,)
        scores += margin.sigmoid().tolist()  # P(yes) / (P(yes) + P(no))
    return scores


def next_token_logits(model, processor, requests: list[Request]) -> torch.Tensor:
    """(B, V) logits of the token after each request's generation prompt: the step `generate` samples first.
    Left padding, and positions counted from each row's first real token, as `generate` does (so a row's logits do
    not depend on what it is batched with)."""
    device = next(model.parameters()).device
    images = [[open_image(i) for i in r.images] for r in requests]
    if isinstance(processor, MPMProcessor):
        encoded = [processor.encode_prompt(r.messages, imgs) for r, imgs in zip(requests, images)]
        inputs = processor.collate(encoded, padding_side="left")
        pixels = inputs["pixel_values"]
        if pixels is not None:
            pixels = pixels.to(device) if isinstance(pixels, torch.Tensor) else [p.to(device) for p in pixels]
        mask = inputs["attention_mask"].to(device)
        out = model(inputs["input_ids"].to(device), pixels, mask, position_ids=positions(mask), logits_to_keep=1)
    else:  # a LLaVA checkpoint with its own processor: its chat template writes the special tokens
        texts = [processor.apply_chat_template(r.messages, add_generation_prompt=True) for r in requests]
        flat = [im for imgs in images for im in imgs]
        side, processor.tokenizer.padding_side = processor.tokenizer.padding_side, "left"
        try:
            inputs = processor(
                images=flat or None, text=texts, return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
        finally:
            processor.tokenizer.padding_side = side
        out = model(**inputs, position_ids=positions(inputs["attention_mask"]), logits_to_keep=1)
    return out.logits[:, -1]
