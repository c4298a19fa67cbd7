"""The text side of the `mpm demo` language model: tokenizer, text-pretraining mix and the text-oracle check.

The recipe follows the miniworld probe (see the project's reference notes): the LM must learn to *read a context
slot* and re-express it in the language an instruction asks for, robustly (shuffled, noised contexts), before a
visual prefix can take the context's place. Nothing here is language-specific: every language comes from the
world files (`configs/world/<lang>.yaml`), and word segmentation of languages without word boundaries is derived
from the world's segmentation words.

    world = load_world()
    tok = train_tokenizer(world, world.languages, "out/tokenizer")
    items = text_mix(world, world.languages, np.random.default_rng(0), 10_000)
    batch = tok([i.text for i in items], ...); noise_mask = context_token_mask(tok, items)
    oracle = oracle_items(world, world.languages, n=60, seed=1234)
    oracle_accuracy(lambda prompts: my_greedy_generate(prompts), world, oracle)   # {lang: all-correct}
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpm.demo.world import ATTRIBUTES, World

CTX_OPEN, CTX_CLOSE, IMAGE = "<ctx>", "</ctx>", "<image>"
SPECIAL_SYMBOLS = (CTX_OPEN, CTX_CLOSE, IMAGE)
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"

PLAIN_SHARE = 0.25  # share of plain items (monolingual, code-switched, parallel pairs); the rest are context items
SHUFFLE_SHARE = 0.3  # share of contexts that are chunk-shuffled
SWITCH_SHARE = 0.25  # share of contexts that are code-switched captions
TRAIN_SEED = 0  # scene streams: text_mix draws from its rng; the oracle uses world.scene(i, seed) with its own seed


# ---- segmentation ------------------------------------------------------------------------------------------------


def unspaced_words(world: World, langs: Sequence[str] | None = None) -> list[str]:
    """Segmentation words of every language whose file says `word_boundaries: false`, longest first."""
    codes = world.languages if langs is None else list(langs)
    words = {w for c in codes if not world.langs[c].word_boundaries for w in world.segmentation_words(c)}
    return sorted(words, key=lambda w: (-len(w), w))


def context_chunks(world: World, text: str) -> list[str]:
    """Split `text` into word-like chunks: whitespace separates chunks, and a segmentation word of a language
    without word boundaries (longest match first) is a chunk of its own; any other run of characters is a chunk."""
    lexicon = unspaced_words(world)
    chunks: list[str] = []
    cur, i = "", 0
    while i < len(text):
        if text[i].isspace():
            if cur:
                chunks.append(cur)
            cur, i = "", i + 1
            continue
        w = next((w for w in lexicon if text.startswith(w, i)), None)
        if w is not None:
            if cur:
                chunks.append(cur)
            chunks.append(w)
            cur, i = "", i + len(w)
            continue
        cur, i = cur + text[i], i + 1
    if cur:
        chunks.append(cur)
    return chunks


def join_chunks(world: World, chunks: Sequence[str]) -> str:
    """Join chunks: no space between two chunks of languages without word boundaries, one space otherwise."""
    lexicon = set(unspaced_words(world))
    out = ""
    for i, c in enumerate(chunks):
        if i and not (chunks[i - 1] in lexicon and c in lexicon):
            out += " "
        out += c
    return out


# ---- the text mix ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextItem:
    """One pretraining line. `context_span` is the (start, end) character span of the context X in `text`
    (None for plain items); `context_chunks` lists the chunks of a shuffled context in their shuffled order."""

    text: str
    kind: str  # "mono" | "switch" | "parallel" | "context"
    context_span: tuple[int, int] | None = None
    lang: str | None = None  # the instruction's (target) language of a context item
    attributes: dict[str, str] | None = None  # the scene a context item describes
    target: str | None = None  # Y_L of a context item
    source_context: str | None = None  # the context before shuffling
    context_chunks: tuple[str, ...] | None = None  # the shuffled chunks (shuffled items only)

    @property
    def context(self) -> str | None:
        return None if self.context_span is None else self.text[self.context_span[0] : self.context_span[1]]


def _choice(rng: Any, seq: Sequence[Any]) -> Any:
    return seq[min(int(rng.random() * len(seq)), len(seq) - 1)]


def _other(rng: Any, langs: Sequence[str], lang: str) -> str:
    others = [c for c in langs if c != lang]
    return _choice(rng, others) if others else lang


def image_prompt(world: World, lang: str) -> str:
    """The raw prompt that asks for a caption of an image in `lang`: the image where text contexts sat in
    pretraining. `<ctx><image> </ctx> INSTR_L:` tokenizes as `<ctx>` [image] `▁` `</ctx>` ..., exactly how a text
    context `<ctx> a small red circle on the left </ctx>` tokenizes around its words. Training (`mpm train i2t`'s
    caption_prompts) and evaluation (`mpm eval`'s prompt table) both use this one."""
    return f"{CTX_OPEN}{IMAGE} {CTX_CLOSE} {world.instruction(lang)}"


def context_prompt(world: World, context: str, lang: str) -> tuple[str, tuple[int, int]]:
    """`<ctx> X </ctx> INSTR_L:` and the character span of X in it."""
    head = f"{CTX_OPEN} "
    prompt = f"{head}{context} {CTX_CLOSE} {world.instruction(lang)}"
    return prompt, (len(head), len(head) + len(context))


def plain_item(world: World, langs: Sequence[str], rng: Any) -> TextItem:
    """A monolingual caption, a code-switched caption, or a parallel pair `INSTR_A: cap_A INSTR_B: cap_B`."""
    scene = world.sample_scene(rng)
    kind = _choice(rng, ("mono", "switch", "parallel"))
    a = _choice(rng, langs)
    if kind == "mono" or len(langs) < 2:
        return TextItem(world.caption(scene, a, rng), "mono")
    b = _other(rng, langs, a)
    if kind == "switch":
        return TextItem(world.caption(scene, a, rng, switch_to=b), "switch")
    text = (
        f"{world.instruction(a)} {world.caption(scene, a, rng)} {world.instruction(b)} {world.caption(scene, b, rng)}"
    )
    return TextItem(text, "parallel")


def context_item(
    world: World,
    langs: Sequence[str],
    rng: Any,
    shuffle_share: float = SHUFFLE_SHARE,
    switch_share: float = SWITCH_SHARE,
) -> TextItem:
    """`<ctx> X </ctx> INSTR_L: Y_L`: X describes a random scene in a random language (code-switched with
    probability `switch_share`, chunk-shuffled with probability `shuffle_share`), Y_L the same scene in L."""
    scene = world.sample_scene(rng)
    src = _choice(rng, langs)
    if len(langs) > 1 and rng.random() < switch_share:
        x = world.caption(scene, src, rng, switch_to=_other(rng, langs, src))
    else:
        x = world.caption(scene, src, rng)
    chunks = None
    context = x
    if rng.random() < shuffle_share:
        original = context_chunks(world, x)
        order = list(range(len(original)))
        for i in range(len(order) - 1, 0, -1):  # Fisher-Yates with any rng that has .random()
            j = min(int(rng.random() * (i + 1)), i)
            order[i], order[j] = order[j], order[i]
        chunks = tuple(original[k] for k in order)
        context = join_chunks(world, chunks)
    lang = _choice(rng, langs)
    target = world.caption(scene, lang, rng)
    prompt, span = context_prompt(world, context, lang)
    return TextItem(
        text=f"{prompt} {target}",
        kind="context",
        context_span=span,
        lang=lang,
        attributes=scene.attributes(),
        target=target,
        source_context=x,
        context_chunks=chunks,
    )


def text_mix(
    world: World,
    langs: Sequence[str] | None,
    rng: Any,
    n: int,
    plain_share: float = PLAIN_SHARE,
    shuffle_share: float = SHUFFLE_SHARE,
    switch_share: float = SWITCH_SHARE,
) -> list[TextItem]:
    """`n` items of the robust context-slot mix: `plain_share` plain items, the rest context items."""
    codes = world.languages if langs is None else list(langs)
    if not codes:
        raise ValueError("text_mix needs at least one language")
    if isinstance(rng, int):
        rng = np.random.default_rng(rng)
    out = []
    for _ in range(n):
        if rng.random() < plain_share:
            out.append(plain_item(world, codes, rng))
        else:
            out.append(context_item(world, codes, rng, shuffle_share, switch_share))
    return out


def context_token_mask(tokenizer: Any, items: Sequence[TextItem], **kwargs: Any) -> Any:
    """A bool tensor [len(items), seq] marking the tokens of each item's context (the tokens whose input embeddings
    a trainer noises), aligned with `tokenizer([i.text for i in items], padding=True, **kwargs)`."""
    import torch

    enc = tokenizer([i.text for i in items], padding=True, return_offsets_mapping=True, return_tensors="pt", **kwargs)
    offsets = enc["offset_mapping"]
    mask = torch.zeros(offsets.shape[:2], dtype=torch.bool)
    for row, item in enumerate(items):
        if item.context_span is None:
            continue
        start, end = item.context_span
        s, e = offsets[row, :, 0], offsets[row, :, 1]
        mask[row] = (s < end) & (e > start) & (e > s) & enc["attention_mask"][row].bool()
    return mask


# ---- tokenizer -----------------------------------------------------------------------------------------------------


def tokenizer_symbols(world: World, langs: Sequence[str] | None = None) -> list[str]:
    """User-defined symbols: the context/image markers plus every segmentation word of every language without word
    boundaries (kept whole: this is their word segmentation)."""
    return [*SPECIAL_SYMBOLS, *unspaced_words(world, langs)]


def tokenizer_lines(world: World, langs: Sequence[str], lines: int, seed: int = TRAIN_SEED) -> list[str]:
    """Training text for the tokenizer: the instructions plus `lines` lines of the text mix."""
    items = text_mix(world, langs, np.random.default_rng([seed, 7]), lines)
    return [world.instruction(c) for c in langs] + [i.text for i in items]


def train_tokenizer(
    world: World,
    langs: Sequence[str] | None,
    folder: str | Path,
    vocab_size: int = 800,
    lines: int = 20_000,
    seed: int = TRAIN_SEED,
) -> Any:
    """Train a SentencePiece BPE tokenizer in memory on the text mix, write `tokenizer.model` into `folder`,
    convert it to a `PreTrainedTokenizerFast` (ids checked against SentencePiece) and `save_pretrained` it there.

    <pad>=0, <unk>=1, <s>=2, </s>=3. Encoding adds `<s>` (what pretraining puts first, so a raw prompt that
    `mpm train i2t` or `mpm.generate` tokenizes starts as every pretraining line did), never `</s>`."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    codes = world.languages if langs is None else list(langs)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = tokenizer_lines(world, codes, lines, seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        add_dummy_prefix=False,
        user_defined_symbols=tokenizer_symbols(world, codes),
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece=PAD,
        unk_piece=UNK,
        bos_piece=BOS,
        eos_piece=EOS,
        hard_vocab_limit=False,
        max_sentence_length=4096,
        num_threads=1,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "LlamaTokenizer",
                "bos_token": BOS,
                "eos_token": EOS,
                "unk_token": UNK,
                "pad_token": PAD,
                "add_bos_token": True,  # `<s>` first, as every pretraining line starts
                "add_eos_token": False,
                "legacy": True,
                "add_prefix_space": False,
                "clean_up_tokenization_spaces": False,
            },
            indent=1,
        ),
        encoding="utf-8",
    )
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token = PAD, BOS, EOS, UNK
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    check = [*text[: len(codes) + 50], *(world.caption(world.scene(i, seed + 1), c) for i in range(5) for c in codes)]
    for line in check:
        hf, ref = tok.encode(line, add_special_tokens=False), sp.encode(line)
        if hf != ref:
            raise RuntimeError(f"converted tokenizer disagrees with SentencePiece on {line!r}: {hf} != {ref}")
        if tok.decode(hf) != line:
            raise RuntimeError(f"tokenizer does not round-trip {line!r}: {tok.decode(hf)!r}")
    tok.save_pretrained(str(folder))
    return tok


# ---- the text oracle ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OracleItem:
    prompt: str  # "<ctx> EN caption </ctx> INSTR_L:"
    lang: str  # L
    attributes: dict[str, str]
    reference: str  # a caption of the scene in L (what a perfect LM could answer)
    context: str  # the source caption


def oracle_items(
    world: World, langs: Sequence[str] | None, n: int, seed: int = 1234, source: str = "en"
) -> list[OracleItem]:
    """`n` held-out scenes (the stream `world.scene(i, seed)`), each described in `source` in the context slot
    and asked for in every language of `langs`: n * len(langs) items."""
    codes = world.languages if langs is None else list(langs)
    items = []
    for i in range(n):
        scene = world.scene(i, seed)
        rng = np.random.default_rng([seed, i, 1])
        context = world.caption(scene, source, rng)
        for lang in codes:
            prompt, _ = context_prompt(world, context, lang)
            items.append(OracleItem(prompt, lang, scene.attributes(), world.caption(scene, lang, rng), context))
    return items


def oracle_accuracy(
    generate_fn: Callable[[list[str]], Iterable[str]],
    world: World,
    items: Sequence[OracleItem],
    detail: bool = False,
) -> dict[str, Any]:
    """Run `generate_fn(prompts) -> continuations` on the oracle prompts and parse each output with its requested
    language's lexicon. Returns {lang: all-four-attributes-correct accuracy}; with `detail`, {lang: {"all", each
    attribute, "purity", "n"}}."""
    outputs = list(generate_fn([it.prompt for it in items]))
    if len(outputs) != len(items):
        raise ValueError(f"generate_fn returned {len(outputs)} outputs for {len(items)} prompts")
    stats: dict[str, dict[str, float]] = {}
    for it, out in zip(items, outputs, strict=True):
        s = stats.setdefault(it.lang, {"all": 0.0, **{a: 0.0 for a in ATTRIBUTES}, "purity": 0.0, "n": 0})
        parsed = world.parse(out, it.lang)
        ok = [parsed[a] == it.attributes[a] for a in ATTRIBUTES]
        for a, good in zip(ATTRIBUTES, ok, strict=True):
            s[a] += good
        s["all"] += all(ok)
        s["purity"] += world.purity(out, it.lang)
        s["n"] += 1
    report = {lang: {k: (v / s["n"] if k != "n" else int(v)) for k, v in s.items()} for lang, s in stats.items()}
    return report if detail else {lang: r["all"] for lang, r in report.items()}


# ---- batches, context noise and greedy generation (for the pretraining loop and the demo) -----------------------


def encode_batch(tokenizer: Any, items: Sequence[TextItem], max_length: int | None = None) -> dict[str, Any]:
    """`<s> text </s>` per item, right-padded: {input_ids, attention_mask, labels (-100 on padding),
    context_mask (the context tokens, whose input embeddings a trainer noises)}. Sequences longer than
    `max_length` are truncated (the context mask is truncated with them)."""
    import torch

    enc = tokenizer([i.text for i in items], add_special_tokens=False, return_offsets_mapping=True)
    rows, masks = [], []
    for item, ids, offs in zip(items, enc["input_ids"], enc["offset_mapping"], strict=True):
        span = item.context_span
        m = [span is not None and s < span[1] and e > span[0] and e > s for s, e in offs]
        ids = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
        m = [False, *m, False]
        if max_length is not None:
            ids, m = ids[:max_length], m[:max_length]
        rows.append(ids)
        masks.append(m)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    context = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
        input_ids[i, : len(r)] = torch.tensor(r)
        attention[i, : len(r)] = 1
        context[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    labels = input_ids.masked_fill(attention == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "context_mask": context}


def noise_context_embeddings(embeds: Any, context_mask: Any, generator: Any = None, scale: float = 1.0) -> Any:
    """Add Gaussian noise to the context tokens' input embeddings: per sequence sigma ~ U(0, scale) * RMS of that
    sequence's context embeddings. `embeds` [B, T, D], `context_mask` [B, T] bool; returns a new tensor."""
    import torch

    m = context_mask.to(embeds.dtype).unsqueeze(-1)
    count = m.sum(dim=(1, 2)).clamp(min=1.0)
    rms = ((embeds.detach() ** 2) * m).sum(dim=(1, 2)).div(count * embeds.shape[-1]).sqrt()
    u = torch.rand(embeds.shape[0], generator=generator, device=embeds.device, dtype=embeds.dtype)
    sigma = (u * scale * rms).view(-1, 1, 1)
    noise = torch.randn(embeds.shape, generator=generator, device=embeds.device, dtype=embeds.dtype)
    return embeds + noise * sigma * m


def greedy_generator(model: Any, tokenizer: Any, max_new_tokens: int = 22) -> Callable[[list[str]], list[str]]:
    """A `generate_fn` for `oracle_accuracy`: greedy continuations of `<s> prompt` (left-padded batch), cut at
    </s>, decoded without special tokens and stripped."""
    import torch

    def generate(prompts: list[str]) -> list[str]:
        rows = [[tokenizer.bos_token_id, *tokenizer.encode(p, add_special_tokens=False)] for p in prompts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r)
            att[i, width - len(r) :] = 1
        device = next(model.parameters()).device
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=att.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        texts = []
        for row in out[:, width:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts

    return generate
