"""Text-only pretraining of the demo LM: a tiny run, the cache, the context noise and the gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from mpm.core.errors import UserError  # noqa: E402
from mpm.demo import load_world  # noqa: E402
from mpm.demo.pretrain import (  # noqa: E402
    GateFailed,
    PretrainResult,
    PretrainSettings,
    check_gate,
    input_embeddings,
    load_pretrained,
    pretrain_lm,
)

LANGS = ["en", "zh"]


def tiny_settings(**kw) -> PretrainSettings:
    base = dict(
        hidden=32,
        layers=2,
        heads=2,
        kv_heads=2,
        intermediate=64,
        max_steps=30,
        warmup=5,
        batch=16,
        probe_every=15,
        oracle_items=5,
        max_new_tokens=12,
        tokenizer_lines=2000,
        vocab_size=400,
    )
    base.update(kw)
    return PretrainSettings(**base)


@pytest.fixture(scope="module")
def world():
    return load_world(LANGS)


@pytest.fixture(scope="module")
def run(world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm")
    lines: list[str] = []
    result = pretrain_lm(world, LANGS, folder, tiny_settings(), log=lines.append)
    return folder, result, lines


def test_tiny_run_trains_and_saves(run):
    folder, result, lines = run
    assert not result.cached
    assert result.steps == 30
    assert [s for s, _ in result.losses] == [15, 30]
    assert result.losses[1][1] < result.losses[0][1]  # the loss decreases
    assert set(result.oracle) == set(LANGS)
    assert all(0.0 <= v <= 1.0 for v in result.oracle.values())
    assert result.passed == all(v >= result.gate for v in result.oracle.values())
    probes = [line for line in lines if line.startswith("lm step")]
    assert len(probes) == 2 and "loss" in probes[0] and "en " in probes[0] and "elapsed" in probes[0]
    record = json.loads((Path(folder) / "pretrain.json").read_text(encoding="utf-8"))
    assert record["steps"] == 30 and record["langs"] == LANGS and set(record["oracle"]) == set(LANGS)
    assert record["settings"]["hidden"] == 32 and record["passed"] == result.passed
    model, tok = load_pretrained(folder)
    assert model.config.hidden_size == 32 and not model.config.tie_word_embeddings
    assert model.config.vocab_size == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id == 0
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(Path(folder) / "tokenizer.model"))
    line = "<ctx> a small red circle on the left </ctx> 用中文描述: 左边有一个小的红色圆形"
    assert tok.encode(line, add_special_tokens=False) == sp.encode(line)  # the reloaded tokenizer keeps spaces
    assert tok.decode(sp.encode(line)) == line
    assert tok.decode(sp.encode("左边有一个小的红色圆形"), skip_special_tokens=True) == "左边有一个小的红色圆形"
    ids = torch.tensor([[tok.bos_token_id, *tok.encode("a small red circle", add_special_tokens=False)]])
    assert model(input_ids=ids).logits.shape[-1] == len(tok)


def test_passed_run_is_reused(world, run, tmp_path):
    folder, result, _ = run
    record_path = Path(folder) / "pretrain.json"
    original = record_path.read_text(encoding="utf-8")
    record = json.loads(original)
    try:
        record["passed"] = True  # a tiny model does not pass; pretend it did
        record_path.write_text(json.dumps(record), encoding="utf-8")
        lines: list[str] = []
        cached = pretrain_lm(world, LANGS, folder, tiny_settings(), log=lines.append)
        assert cached.cached and cached.passed and cached.steps == result.steps
        assert cached.oracle == pytest.approx(result.oracle)
        assert any("reusing" in line for line in lines) and not any(x.startswith("lm step") for x in lines)
        # other settings are not the same run: it would train (checked without training: no cache hit)
        from mpm.demo.pretrain import _read_cache

        assert _read_cache(Path(folder), LANGS, tiny_settings(seed=1)) is None
        assert _read_cache(Path(folder), ["en"], tiny_settings()) is None
        assert _read_cache(Path(folder), LANGS, tiny_settings(threads=3)) is not None  # runtime-only setting
    finally:
        record_path.write_text(original, encoding="utf-8")
    from mpm.demo.pretrain import _read_cache

    ended = _read_cache(Path(folder), LANGS, tiny_settings())  # a run that used all its steps is final too
    assert ended is not None and not ended.passed and ended.steps == 30
    interrupted = json.loads(original)
    interrupted["steps"] = 20  # a record of a run stopped before its last step (and not passed) is not a cache
    record_path.write_text(json.dumps(interrupted), encoding="utf-8")
    assert _read_cache(Path(folder), LANGS, tiny_settings()) is None
    record_path.write_text(original, encoding="utf-8")


def test_noise_touches_only_context_positions():
    emb = torch.nn.Embedding(20, 8)

    class Model:
        def get_input_embeddings(self):
            return emb

    ids = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 2:5] = True
    mask[2, 1:3] = True  # row 1 has no context at all
    batch = {"input_ids": ids, "context_mask": mask}
    plain = emb(ids)
    noised = input_embeddings(Model(), batch, torch.Generator().manual_seed(1))
    assert torch.equal(noised[~mask], plain[~mask])
    assert not torch.allclose(noised[mask], plain[mask])
    again = input_embeddings(Model(), batch, torch.Generator().manual_seed(1))
    assert torch.equal(noised, again)  # a fixed generator gives the same noise
    assert torch.equal(input_embeddings(Model(), batch, None, noise=False), plain)


def test_check_gate_names_languages_below():
    failed = PretrainResult(Path("x"), 3000, {"en": 1.0, "de": 0.62, "fr": 0.71}, False, 10.0, gate=0.97)
    with pytest.raises(GateFailed) as info:
        check_gate(failed)
    msg = str(info.value)
    assert isinstance(info.value, UserError)
    assert "de (0.62)" in msg and "fr (0.71)" in msg and "en (" not in msg
    assert "0.97" in msg and "3000 steps" in msg and "--lm-steps" in msg and "seed" in msg
    ok = PretrainResult(Path("x"), 1000, {"en": 1.0, "zh": 0.98}, True, 10.0, gate=0.97)
    assert check_gate(ok) is ok
    with pytest.raises(GateFailed, match="never run"):
        check_gate(PretrainResult(Path("x"), 0, {}, False, 0.0))


def test_another_run_in_the_same_folder_reuses_nothing(tmp_path):
    """A folder holding an LM of other languages: its tokenizer (and t2i-layer choice) must not be reused."""
    folder = tmp_path / "lm"
    pretrain_lm(load_world(["en", "zh"]), ["en", "zh"], folder, tiny_settings(max_steps=2, probe_every=2), log=print)
    (folder / "conditioning.json").write_text('{"layer": 1, "langs": ["en", "de"]}', encoding="utf-8")
    world = load_world(["en", "de"])
    pretrain_lm(world, ["en", "de"], folder, tiny_settings(max_steps=2, probe_every=2), log=print)
    _, tok = load_pretrained(folder)
    german = world.caption(world.scene(0, 5), "de")
    assert tok.decode(tok.encode(german, add_special_tokens=False)) == german
    assert not (folder / "conditioning.json").exists()
    assert json.loads((folder / "pretrain.json").read_text(encoding="utf-8"))["langs"] == ["en", "de"]
    assert "用" not in "".join(tok.convert_ids_to_tokens(range(len(tok))))  # the en+zh vocabulary is gone
