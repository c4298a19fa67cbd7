"""Text-only pretraining of the `mpm demo` language model: a tiny multilingual Llama trained on the robust
context-slot mix (`mpm.demo.lm.text_mix`, noised contexts) until it can restate an English context in every world
language (the text oracle), then saved in Hugging Face format.

The recipe is the miniworld probe's (0.67M parameters, AdamW 3e-3, cosine to 3000 steps, early stop once the oracle
reaches the gate in every language). Stage 1 of the demo must not start from an LM below the gate: no image would
transfer through a context slot the LM cannot read, so `check_gate` turns a failed run into a `UserError`.

    world = load_world(["en", "zh"])
    result = pretrain_lm(world, ["en", "zh"], "out/lm", PretrainSettings())
    check_gate(result)          # GateFailed names the languages below the gate
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpm.core.errors import UserError
from mpm.demo import lm
from mpm.demo.world import ATTRIBUTES, World

RESULT_FILE = "pretrain.json"
CONDITION_FILE = "conditioning.json"  # the t2i layer chosen for this LM (condition_layer)
ORACLE_SOURCE = "en"  # the oracle's contexts are English captions, restated in every language


@dataclass
class PretrainSettings:
    """Model shape, optimiser, schedule, probe and gate of the text pretraining (defaults: the probe's recipe)."""

    hidden: int = 128
    layers: int = 3
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 384
    max_positions: int = 128
    # untied: with tied embeddings the two size words ("small"/"big"), which fill the same slot in every line, stay
    # too close for the LM to copy which one a context holds (the oracle sat at chance on size for 3000 steps);
    # untied, a 3-language LM passes the gate in about 500 steps (docs/decisions.md)
    tied_embeddings: bool = False
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    warmup: int = 100
    max_steps: int = 3000
    batch: int = 64
    clip: float = 1.0
    probe_every: int = 250
    gate: float = 0.97  # all-correct accuracy needed in EVERY language on the English-context oracle
    oracle_items: int = 40  # held-out scenes per language
    oracle_seed: int = 1234
    max_new_tokens: int = 22
    seed: int = 0
    noise: bool = True  # sigma per sequence ~ U(0, noise_scale) * RMS of the context embeddings
    noise_scale: float = 1.0
    context_loss: bool = False  # also predict the (noised, shuffled) context's own tokens: guessing, and slower
    vocab_size: int = 800  # tokenizer
    tokenizer_lines: int = 20_000
    threads: int | None = None  # torch.set_num_threads; None leaves it alone
    device: str = "cpu"

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


@dataclass
class PretrainResult:
    folder: Path
    steps: int
    oracle: dict[str, float]
    passed: bool
    seconds: float
    gate: float = 0.97
    langs: list[str] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since the previous probe)
    cached: bool = False  # True when read from `folder/pretrain.json` without training


class GateFailed(UserError):
    """The text-only oracle stayed below the gate in some language: the LM cannot be used for stage 1."""


def below_gate(result: PretrainResult) -> dict[str, float]:
    return {lang: acc for lang, acc in result.oracle.items() if acc < result.gate}


def check_gate(result: PretrainResult) -> PretrainResult:
    """Raise `GateFailed` unless every language's oracle accuracy reaches the gate; return `result` otherwise."""
    low = below_gate(result)
    if not result.oracle:
        raise GateFailed(
            f"the text-only oracle was never run ({result.steps} steps): the LM's ability to restate an English "
            "context is unknown; rerun with more LM steps (--lm-steps)"
        )
    if low or not result.passed:
        names = ", ".join(f"{lang} ({acc:.2f})" for lang, acc in low.items()) or "some language"
        raise GateFailed(
            f"the text-only oracle is below {result.gate:g} for {names} after {result.steps} steps: the LM cannot yet "
            "restate an English context in every language, so no image would transfer; rerun with more LM steps "
            "(--lm-steps) or another seed"
        )
    return result


# ---- pieces of the loop ------------------------------------------------------------------------------------------


def load_or_train_tokenizer(world: World, langs: Sequence[str], folder: Path, settings: PretrainSettings) -> Any:
    """The tokenizer in `folder` if one is there, else `lm.train_tokenizer` into `folder`."""
    if (folder / "tokenizer.model").exists() and (folder / "tokenizer_config.json").exists():
        return load_tokenizer(folder)
    return lm.train_tokenizer(
        world, langs, folder, vocab_size=settings.vocab_size, lines=settings.tokenizer_lines, seed=settings.seed
    )


def load_tokenizer(folder: str | Path) -> Any:
    """The tokenizer of `folder`, converted from its `tokenizer.model` + `tokenizer_config.json` (as
    `lm.train_tokenizer` does). The `tokenizer.json` that `save_pretrained` writes is ignored: with transformers 5
    it reloads as a tokenizer that drops the spaces (ids differ from SentencePiece), and the saved config's special
    tokens would make `decode(skip_special_tokens=True)` drop the segmentation words."""
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(folder / "tokenizer.model", Path(tmp) / "tokenizer.model")
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        for key in ("extra_special_tokens", "additional_special_tokens", "added_tokens_decoder"):
            config.pop(key, None)  # a saved config lists the segmentation words as special: decoding drops them
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        tok = AutoTokenizer.from_pretrained(tmp)
    tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token = lm.PAD, lm.BOS, lm.EOS, lm.UNK
    return tok


def build_model(tokenizer: Any, settings: PretrainSettings) -> Any:
    """A freshly initialised `LlamaForCausalLM` with the settings' shape and the tokenizer's vocabulary and ids.
    (Llama, not Qwen2: transformers picks the tokenizer class from the model type, and Qwen2's byte-level tokenizer
    class would reload our SentencePiece tokenizer without its word-boundary marks.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.kv_heads,
        intermediate_size=settings.intermediate,
        max_position_embeddings=settings.max_positions,
        tie_word_embeddings=settings.tied_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def batches(world: World, langs: Sequence[str], tokenizer: Any, settings: PretrainSettings) -> Iterator[dict[str, Any]]:
    """An endless stream of fresh, seeded `text_mix` batches, encoded by `lm.encode_batch`."""
    rng = np.random.default_rng([settings.seed, 1])
    while True:
        items = lm.text_mix(world, langs, rng, settings.batch)
        yield lm.encode_batch(tokenizer, items, max_length=settings.max_positions)


def input_embeddings(
    model: Any, batch: dict[str, Any], generator: Any = None, noise: bool = True, scale: float = 1.0
) -> Any:
    """The model's input embeddings of `batch["input_ids"]`, with Gaussian noise on the context positions only
    (`lm.noise_context_embeddings`); every other position is the plain token embedding."""
    embeds = model.get_input_embeddings()(batch["input_ids"])
    if not noise:
        return embeds
    return lm.noise_context_embeddings(embeds, batch["context_mask"], generator=generator, scale=scale)


RUNTIME_ONLY = ("threads", "device")  # settings that do not change what is trained


def _same_run(record: dict[str, Any], langs: Sequence[str], settings: PretrainSettings) -> bool:
    def key(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if k not in RUNTIME_ONLY}

    saved = record.get("settings")
    finished = bool(record.get("passed")) or record.get("steps") == settings.max_steps  # a run that ended
    return (
        finished
        and isinstance(saved, dict)
        and key(saved) == key(settings.to_json())
        and record.get("langs") == list(langs)
    )


def _read_cache(folder: Path, langs: Sequence[str], settings: PretrainSettings) -> PretrainResult | None:
    path = folder / RESULT_FILE
    if not path.exists() or not (folder / "config.json").exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not _same_run(record, langs, settings):
        return None
    return PretrainResult(
        folder=folder,
        steps=int(record["steps"]),
        oracle={k: float(v) for k, v in record["oracle"].items()},
        passed=bool(record["passed"]),
        seconds=float(record["seconds"]),
        gate=float(record["settings"]["gate"]),
        langs=list(record["langs"]),
        losses=[(int(s), float(v)) for s, v in record.get("losses", [])],
        cached=True,
    )


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ---- the loop ----------------------------------------------------------------------------------------------------


def pretrain_lm(
    world: World,
    langs: Sequence[str] | None,
    folder: str | Path,
    settings: PretrainSettings | None = None,
    log: Callable[[str], Any] = print,
) -> PretrainResult:
    """Train the tokenizer (unless `folder` has one) and a fresh Llama LM on the robust text mix of `langs`,
    probing the English-context oracle every `probe_every` steps and stopping once every language reaches the gate
    (or at `max_steps`). Saves model + tokenizer (`save_pretrained`) and `pretrain.json` to `folder`.

    A `folder/pretrain.json` of a run that ended (passed, or ran all its steps) with the same languages and
    settings is returned as is (`cached`)."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    settings = settings or PretrainSettings()
    codes = world.languages if langs is None else list(langs)
    if ORACLE_SOURCE not in world.langs:
        raise UserError(f"the text oracle restates English contexts, but the world has no '{ORACLE_SOURCE}' language")
    folder = Path(folder)
    cached = _read_cache(folder, codes, settings)
    if cached is not None:
        verdict = "passed" if cached.passed else "did not pass"
        log(f"lm: {folder} already holds this LM, which {verdict} the text oracle ({_oracle_line(cached.oracle)}); "
            "reusing it")  # fmt: skip
        return cached

    start = time.monotonic()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    folder.mkdir(parents=True, exist_ok=True)
    # not this run's (other languages or settings, or interrupted): nothing of it may be reused, the tokenizer and
    # the t2i layer choice included; the record goes first, so a folder without it is never taken as done
    for name in (RESULT_FILE, CONDITION_FILE, "tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink(missing_ok=True)
    tok = load_or_train_tokenizer(world, codes, folder, settings)
    torch.manual_seed(settings.seed)
    device = torch.device(settings.device)
    model = build_model(tok, settings).to(device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=tuple(settings.betas),
    )
    schedule = get_cosine_schedule_with_warmup(optimizer, settings.warmup, settings.max_steps)
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    oracle_set = lm.oracle_items(world, codes, settings.oracle_items, seed=settings.oracle_seed, source=ORACLE_SOURCE)
    generate = lm.greedy_generator(model, tok, settings.max_new_tokens)
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"lm: pretraining a {n_params / 1e6:.2f}M-parameter LM on {'+'.join(codes)} text, up to {settings.max_steps} "
        f"steps of {settings.batch}; gate {settings.gate:g} on the English-context oracle in every language"
    )

    oracle: dict[str, float] = {}
    losses: list[tuple[int, float]] = []
    window: list[float] = []
    passed = False
    step = 0
    stream = batches(world, codes, tok, settings)
    while step < settings.max_steps:
        batch = {k: v.to(device) for k, v in next(stream).items()}
        embeds = input_embeddings(model, batch, generator, settings.noise, settings.noise_scale)
        labels = batch["labels"] if settings.context_loss else batch["labels"].masked_fill(batch["context_mask"], -100)
        out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=labels)
        loss = out.loss
        if not torch.isfinite(loss):
            raise RuntimeError(f"lm pretraining: the loss is {loss.item()} at step {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip)
        optimizer.step()
        schedule.step()
        step += 1
        window.append(loss.item())
        if step % settings.probe_every == 0 or step == settings.max_steps:
            mean = float(np.mean(window))
            losses.append((step, mean))
            window = []
            model.eval()
            detail = lm.oracle_accuracy(generate, world, oracle_set, detail=True)
            oracle = {k: float(v["all"]) for k, v in detail.items()}
            weakest = min(ATTRIBUTES, key=lambda a: min(v[a] for v in detail.values()))
            model.train()
            passed = all(oracle.get(c, 0.0) >= settings.gate for c in codes)
            elapsed = time.monotonic() - start
            left = 0.0 if passed else elapsed / step * (settings.max_steps - step)
            log(
                f"lm step {step}/{settings.max_steps}: loss {mean:.3f}, oracle {_oracle_line(oracle)} (weakest "
                f"attribute: {weakest} {min(v[weakest] for v in detail.values()):.2f}), "
                f"{_duration(elapsed)} elapsed, {'gate passed' if passed else f'~{_duration(left)} left at most'}"
            )
            if passed:
                break
    model.eval()
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    check_reload(folder, tok, [it.prompt for it in oracle_set[: 2 * len(codes)]])
    seconds = time.monotonic() - start
    record = {
        "langs": codes,
        "settings": settings.to_json(),
        "steps": step,
        "oracle": oracle,
        "passed": passed,
        "seconds": round(seconds, 2),
        "losses": losses,
    }
    (folder / RESULT_FILE).write_text(json.dumps(record, indent=1, ensure_ascii=False), encoding="utf-8")
    return PretrainResult(folder, step, oracle, passed, seconds, settings.gate, codes, losses)


def check_reload(folder: Path, tokenizer: Any, lines: Sequence[str]) -> None:
    """The saved folder must give the same token ids through plain `AutoTokenizer.from_pretrained`, which is how
    `mpm train i2t`, `mpm train t2i` and `mpm eval` load an LLM's tokenizer."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(folder))
    for line in lines:
        ours, theirs = tokenizer(line)["input_ids"], reloaded(line)["input_ids"]
        if ours != theirs:
            raise RuntimeError(
                f"{folder}: the saved tokenizer reloads as {type(reloaded).__name__} and tokenizes {line!r} "
                f"differently ({theirs} != {ours})"
            )


def _oracle_line(oracle: dict[str, float]) -> str:
    return " ".join(f"{lang} {acc:.2f}" for lang, acc in oracle.items()) or "-"


def load_pretrained(folder: str | Path) -> tuple[Any, Any]:
    """The (model, tokenizer) a `pretrain_lm` run saved in `folder`, in eval mode."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    model.eval()
    return model, tok


# ---- which layer the text-to-image model reads (a text-only measurement) -----------------------------------------


def cross_lingual_retrieval(
    model: Any, tokenizer: Any, world: World, langs: Sequence[str], n: int = 100, seed: int = 4321
) -> dict[int, float]:
    """Per hidden layer (0 = the input embeddings), how often the mean-pooled state of an English caption is
    nearest (cosine, after centring each language's states) to the caption of the same scene in another language,
    among `n` scenes; averaged over the other languages of `langs`. Chance is 1/n. Text only: this is how the demo
    picks the t2i conditioning layer without looking at any image drawn from a non-English prompt."""
    import torch

    others = [c for c in langs if c != ORACLE_SOURCE]
    if not others:
        raise ValueError("cross-lingual retrieval needs a language besides English")
    scenes = [world.scene(i, seed) for i in range(n)]

    def pooled(lang: str) -> list[Any]:
        rng = np.random.default_rng([seed, 3])
        texts = [world.caption(s, lang, rng) for s in scenes]
        rows = [[*tokenizer.encode(t, add_special_tokens=False), tokenizer.eos_token_id] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        with torch.no_grad():
            states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        m = mask.unsqueeze(-1).float()
        out = []
        for h in states:
            v = (h.float() * m).sum(1) / m.sum(1)
            v = v - v.mean(0, keepdim=True)
            out.append(torch.nn.functional.normalize(v, dim=-1))
        return out

    english = pooled(ORACLE_SOURCE)
    scores = {layer: 0.0 for layer in range(len(english))}
    for lang in others:
        theirs = pooled(lang)
        for layer, (a, b) in enumerate(zip(english, theirs, strict=True)):
            hits = (a @ b.T).argmax(dim=1) == torch.arange(n)
            scores[layer] += hits.float().mean().item() / len(others)
    return scores


def condition_layer(folder: str | Path, world: World) -> dict[str, Any]:
    """{"layer", "retrieval": {layer: score}} for the LM in `folder`: the layer with the best text-only
    cross-lingual retrieval (the lowest on a tie), measured on the world's languages. Cached in
    `folder/conditioning.json`."""
    folder = Path(folder)
    path = folder / CONDITION_FILE
    if path.exists():
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("langs") == world.languages:  # pretrain_lm deletes this file when it trains the LM again
            return record
    model, tok = load_pretrained(folder)
    scores = cross_lingual_retrieval(model, tok, world, world.languages)
    best = max(scores, key=lambda layer: (round(scores[layer], 6), -layer))
    record = {"layer": best, "retrieval": {str(k): round(v, 4) for k, v in scores.items()}, "langs": world.languages}
    path.write_text(json.dumps(record, indent=1), encoding="utf-8")
    return record


__all__ = [
    "GateFailed",
    "condition_layer",
    "cross_lingual_retrieval",
    "PretrainResult",
    "PretrainSettings",
    "check_gate",
    "input_embeddings",
    "load_pretrained",
    "pretrain_lm",
]
