"""`mpm demo --align`: preference alignment in the miniature world, where every hallucination is known exactly.

The i2t model learnt from one-object scenes. Shown a scene with two objects, it often describes an object that is not
there (one object's colour on the other's shape, a size neither has). Alignment uses ENGLISH feedback only, with the
LM frozen, and the question is MPM's: does the drop in hallucination transfer zero-shot to the other languages?
Per seed, under DIR/seed<N>/align/:

    data/            two-object scenes: `train` (what feedback is collected on) and `heldout` (what is measured;
                     the demo's held-out stream, other scenes), their images and jsonl files
    corrections.jsonl  RLHF-V-style segment corrections, made automatically: `rejected` is the policy's greedy
                     English description, `chosen` the same words with each wrong attribute replaced by the truth of
                     the scene object the description matches best (`correct`): a fine-grained correction, the
                     tokens DDPO weights by gamma
    ddpo/            `mpm train align` (RLHF-V's paper preset: gamma 5, beta 0.5, normalised), the LM frozen: the
                     connector and the vision tower learn (the MPM setting: English feedback changes what the model
                     sees, not the multilingual LM the transfer depends on)
    ddpo_lora/       the same with LoRA on the LM (a variant: the LM itself changes)
    rlaifv/          one RLAIF-V iteration (mpm.align.rlaifv) on English instructions: 4 sampled answers each, the
                     rule splitter, and the world's truth as the labeler (`WorldLabeler`)
    results.json     the held-out hallucination rate per language, before and after each variant

An answer HALLUCINATES when the attribute values it names (the first mention of each, read with its language's
lexicon: `World.parse`) match no object of the scene. An answer naming no attribute value says nothing false and is
counted apart (`silent`).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mpm.align.claims import Claim
from mpm.demo.lm import CTX_CLOSE, CTX_OPEN, IMAGE
from mpm.demo.world import ATTRIBUTES, Scene, SceneObject, World

OBJECTS = 2  # objects per alignment scene
ALIGN_STREAM = 5_551_001  # the scene stream of the feedback scenes (training and evaluation use others)
HELDOUT_STREAM = 7_919_131 + 1  # beside the demo's held-out stream (mpm.demo.scoring.EVAL_SEED)


def raw_prompt() -> str:
    """The prompt the demo model was trained on (mpm.demo.lm.image_prompt) with `{question}` for the instruction."""
    return f"{CTX_OPEN}{IMAGE} {CTX_CLOSE} {{question}}"


def named(world: World, text: str, lang: str) -> dict[str, str]:
    """The attribute values `text` names (the first mention of each), read with `lang`'s lexicon."""
    parsed = world.parse(text, lang)
    return {a: parsed[a] for a in ATTRIBUTES if parsed[a] is not None}


def fits(obj: SceneObject, values: dict[str, str]) -> bool:
    return all(obj.attributes()[a] == v for a, v in values.items())


def hallucinates(world: World, scene: Scene, text: str, lang: str) -> bool | None:
    """True when the values `text` names fit no object of the scene; None when it names none."""
    values = named(world, text, lang)
    if not values:
        return None
    return not any(fits(obj, values) for obj in scene.objects)


def correct(world: World, scene: Scene, text: str) -> str | None:
    """The English `text` with each wrong attribute word replaced by the value of the scene object it matches best
    (most named values equal; the first object on a tie); None when nothing needs correcting (or nothing is named)."""
    values = named(world, text, "en")
    if not values or any(fits(obj, values) for obj in scene.objects):
        return None
    target = max(scene.objects, key=lambda o: sum(o.attributes()[a] == v for a, v in values.items()))
    words = {(attr, value): form for form, (attr, value) in world.langs["en"].forms.items()}
    fixed = text
    for attr, wrong in values.items():
        right = target.attributes()[attr]
        if right != wrong:
            pattern = re.compile(rf"\b{re.escape(words[(attr, wrong)])}\b", re.IGNORECASE)
            fixed = pattern.sub(words[(attr, right)], fixed, count=1)
    return fixed if fixed != text else None


class WorldLabeler:
    """RLAIF-V's labeler with the world's truth: a claim is accepted (1.0) when the values it names fit some object
    of its image's scene, or when it names none (nothing false); else rejected (0.0)."""

    def __init__(self, world: World, scenes: dict[str, Scene]):
        self.world, self.scenes = world, scenes  # image path -> its scene

    def score(self, items: Sequence[tuple[str, Claim]]) -> list[float]:
        return [0.0 if hallucinates(self.world, self.scenes[str(Path(image).resolve())], claim.text, claim.lang)
                else 1.0 for image, claim in items]  # fmt: skip


def write_scenes(world: World, folder: Path, n: int, stream: int, langs: Sequence[str], size: int) -> dict[str, Scene]:
    """`n` two-object scenes rendered into `folder`/images, and `folder`/instructions.jsonl with one instruction per
    (scene, language) (the demo's per-language instruction); returns {image path: scene}."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    scenes, rows = {}, []
    for i in range(n):
        scene = world.sample_scene(np.random.default_rng([stream, i]), objects=OBJECTS)
        path = images / f"{i:05d}.png"
        if not path.is_file():
            world.render(scene, size).save(path)
        scenes[str(path.resolve())] = scene
        for lang in langs:
            rows.append({"id": f"{folder.name}-{i:05d}-{lang}", "image": f"images/{i:05d}.png", "question": world.instruction(lang),
                         "lang": lang})  # fmt: skip
    (folder / "instructions.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                               encoding="utf-8")  # fmt: skip
    return scenes


def describe(model_dir: Path, items: list[tuple[str, str]], batch_size: int = 64) -> list[str]:
    """Greedy answers of the model in `model_dir` to (image path, instruction) items, asked in the raw prompt."""
    from mpm.align.batches import prompt_request
    from mpm.inference import generate, load_model

    model, processor = load_model(model_dir, device="cpu")
    requests = [prompt_request(q, [image], raw_prompt()) for image, q in items]
    return generate(model, processor, requests, max_new_tokens=24, batch_size=batch_size)


def hallucination_rates(world: World, scenes: dict[str, Scene], model_dir: Path, langs: Sequence[str],
                        answers_file: Path) -> dict[str, dict]:  # fmt: skip
    """Per language: the share of held-out answers that hallucinate (of those naming anything), how many were
    silent, and the language fidelity (`mpm eval`'s check: alignment must not be bought with answers drifting into
    English). The answers are kept in `answers_file` (read back when it exists)."""
    from mpm.eval.fidelity import fidelity

    items = [(image, world.instruction(lang), lang) for image in scenes for lang in langs]
    if answers_file.is_file():
        answers = json.loads(answers_file.read_text(encoding="utf-8"))
    else:
        answers = describe(model_dir, [(image, q) for image, q, _ in items])
        answers_file.write_text(json.dumps(answers, ensure_ascii=False), encoding="utf-8")
    rates = {}
    for lang in langs:
        mine = [(image, a) for (image, _, code), a in zip(items, answers, strict=True) if code == lang]
        verdicts = [hallucinates(world, scenes[image], a, lang) for image, a in mine]
        spoken = [v for v in verdicts if v is not None]
        rates[lang] = {"rate": sum(spoken) / len(spoken) if spoken else None, "answers": len(verdicts),
                       "silent": len(verdicts) - len(spoken),
                       "fidelity": fidelity([a for _, a in mine], lang).strict_pass_rate}  # fmt: skip
    return rates


def corrections(world: World, scenes: dict[str, Scene], model_dir: Path, path: Path) -> int:
    """The RLHF-V-style pairs (module docstring) for the English instruction of each feedback scene; returns how
    many scenes needed a correction."""
    images = list(scenes)
    answers = describe(model_dir, [(image, world.instruction("en")) for image in images])
    rows = []
    for i, (image, answer) in enumerate(zip(images, answers, strict=True)):
        fixed = correct(world, scenes[image], answer)
        if fixed is not None:
            rows.append({"id": f"c{i:05d}", "image": image, "question": world.instruction("en"), "chosen": fixed,
                         "rejected": answer, "lang": "en"})  # fmt: skip
    partial = path.with_name(path.name + ".partial")  # renamed when complete: its presence means "made"
    partial.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    partial.replace(path)
    return len(rows)


def ddpo_config(policy: Path, pairs: Path, out: Path, steps: int, seed: int, lora: bool) -> dict:
    """`mpm train align`'s config: RLHF-V's paper preset; the LM frozen (or LoRA on it)."""
    # The rates were picked on a development scene stream of seed 0 (never the held-out scenes): vision + connector
    # at 2e-5 (1e-4 undid the i2t training: hallucination 74-83%), LoRA at 3e-5 (1e-4 worse than 1e-5 and 3e-5).
    train = {"output_dir": str(out), "max_steps": steps, "batch_size": 16, "lr": 3e-5 if lora else 2e-5,
             "connector_lr": 2e-5, "warmup_steps": max(1, steps // 10), "train_llm": lora, "vision": "full",
             "mixed_precision": "no", "seed": seed, "log_every": 10, "save_every": steps, "keep_last": 1}  # fmt: skip
    if lora:
        train["lora"] = {"enabled": True, "r": 8, "alpha": 16}
    return {"model": {"init_from": str(policy)},
            "data": {"preferences": str(pairs), "raw_prompt": raw_prompt(), "max_length": 96},
            "loss": {"preset": "rlhfv_paper"}, "train": train}  # fmt: skip


def rlaifv_config(policy: Path, data: Path, heldout: Path, out: Path, seed: int, lr: float = 2e-5) -> dict:
    """One RLAIF-V iteration on the English feedback scenes (RLAIF-V's DPO: beta 0.1, 4 epochs; the rate as the
    DDPO run's), held-out answers in every language."""
    return {"policy": str(policy), "instructions": str(data / "instructions.jsonl"),
            "heldout": str(heldout / "instructions.jsonl"), "raw_prompt": raw_prompt(), "output_dir": str(out),
            "iterations": 1, "seed": seed,
            "sampling": {"n": 4, "temperature": 0.7, "max_new_tokens": 24, "batch_size": 64},
            "splitter": {"kind": "rule", "batch_size": 256}, "labeler": {"batch_size": 256},
            "dpo": {"epochs": 4, "data": {"max_length": 96}, "loss": {"preset": "dpo"},
                    "train": {"batch_size": 16, "lr": lr, "connector_lr": lr, "train_llm": False, "vision": "full",
                              "mixed_precision": "no", "seed": seed, "log_every": 10, "save_every": 100000}}}  # fmt: skip


def run_align(demo, r, feedback_scenes: int, heldout_scenes: int, steps: int) -> dict:
    """The whole alignment stage of one seed (module docstring); every piece is kept, a rerun continues. Returns
    (and writes to align/results.json) the held-out hallucination rates per language and variant."""
    from mpm.align.rlaifv import run as run_rlaifv
    from mpm.align.rlaifv_config import RlaifvConfig
    from mpm.core.config import load_config
    from mpm.demo.run import IMAGE_SIZE, STAMP, mpm_command, run_mpm, stamp_of, write_config

    world, langs, log = demo.world, demo.langs, demo._indent
    out = r.root / "align"
    policy = r.i2t / "final"
    settings = {"feedback": feedback_scenes, "heldout": heldout_scenes, "langs": list(langs),
                "ddpo": [ddpo_config(policy, out / "corrections.jsonl", out / n, steps, r.seed, lora)
                         for n, lora in (("ddpo", False), ("ddpo_lora", True))],
                "rlaifv": rlaifv_config(policy, out / "data" / "train", out / "data" / "heldout", out / "rlaifv",
                                        r.seed)}  # fmt: skip
    key = stamp_of(settings, [r.i2t / STAMP])  # another i2t model, size or setting: everything is made again
    if (out / STAMP).is_file() and (out / STAMP).read_text() != key:
        log(f"{out}: made from another i2t model or other sizes, made again")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / STAMP).write_text(key)
    feedback = write_scenes(world, out / "data" / "train", feedback_scenes, ALIGN_STREAM + r.seed, ["en"], IMAGE_SIZE)
    heldout = write_scenes(world, out / "data" / "heldout", heldout_scenes, HELDOUT_STREAM + r.seed, langs,
                           IMAGE_SIZE)  # fmt: skip
    results = {"before": hallucination_rates(world, heldout, policy, langs, out / "before_answers.json")}
    log(f"before alignment: {_rates_line(results['before'])}")

    pairs = out / "corrections.jsonl"
    if not pairs.is_file():
        made = corrections(world, feedback, policy, pairs)
        log(f"{made} of {feedback_scenes} English descriptions corrected into RLHF-V-style pairs ({pairs})")
    for name, lora in (("ddpo", False), ("ddpo_lora", True)):
        run = out / name
        path = r.configs / f"align_{name}.yaml"
        words = ["train", "align", "--config", str(path)]
        if not (run / "final" / "config.json").is_file():
            write_config(path, ddpo_config(policy, pairs, run, steps, r.seed, lora))
            log(mpm_command(*words))
            run_mpm(words, demo.show_progress, demo.runner)
        results[name] = hallucination_rates(world, heldout, run / "final", langs, run / "heldout_answers.json")
        log(f"after {name}: {_rates_line(results[name])}")

    # RLAIF-V: the world's truth as the labeler is an object, not a model folder: the loop runs through its Python
    # API (`mpm align rlaifv` with a model labeler is the same loop).
    path = r.configs / "align_rlaifv.yaml"
    write_config(path, settings["rlaifv"])
    log(f"RLAIF-V, one iteration, the world's truth as labeler: mpm.align.rlaifv.run(load_config(RlaifvConfig, "
        f"'{path}'), labeler=WorldLabeler(...))")  # fmt: skip
    result = run_rlaifv(load_config(RlaifvConfig, path), labeler=WorldLabeler(world, {**feedback, **heldout}),
                        show_progress=demo.show_progress)  # fmt: skip
    summary = result.iterations[0]
    trained = Path(summary["trained"]) if summary["trained"] else policy
    results["rlaifv"] = hallucination_rates(world, heldout, trained, langs, out / "rlaifv" / "heldout_answers.json")
    results["counts"] = {"corrections": len(pairs.read_text(encoding="utf-8").splitlines()),
                         "rlaifv_pairs": summary["pairs"], "rlaifv_claims": summary["claims_checked"],
                         "feedback_scenes": feedback_scenes, "heldout_scenes": heldout_scenes}  # fmt: skip
    log(f"after rlaifv ({summary['pairs']} pairs): {_rates_line(results['rlaifv'])}")
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    return results


VARIANTS = {"before": "before", "ddpo": "DDPO, LM frozen", "ddpo_lora": "DDPO, LoRA on the LM",
            "rlaifv": "RLAIF-V, 1 iteration"}  # fmt: skip


def _rates_line(rates: dict[str, dict]) -> str:
    return ", ".join(f"{lang} {100 * v['rate']:.0f}%" if v["rate"] is not None else f"{lang} -"
                     for lang, v in rates.items())  # fmt: skip


def results_table(per_seed: list[dict], langs: Sequence[str]) -> str:
    """Markdown: held-out hallucination % per language (rows) and variant (columns), mean over seeds."""
    head = "| lang | " + " | ".join(VARIANTS.values()) + " |"
    lines = ["## Alignment on English feedback only: hallucination on held-out two-object scenes (%, lower is "
             "better)", "", head, "|---" * (len(VARIANTS) + 1) + "|"]  # fmt: skip
    for lang in langs:
        cells = []
        for variant in VARIANTS:
            values = [s[variant][lang]["rate"] for s in per_seed if s[variant][lang]["rate"] is not None]
            cell = f"{100 * np.mean(values):.1f}" if values else "-"
            if len(values) > 1:
                cell += f" ± {100 * np.std(values):.1f}"
            fidelities = [s[variant][lang].get("fidelity") for s in per_seed]
            if None not in fidelities:  # the answers stayed in the language (or drifted: shown beside the rate)
                cell += f" ({100 * np.mean(fidelities):.0f})"
            cells.append(cell)
        lines.append(f"| {lang} | " + " | ".join(cells) + " |")

    def span(key: str) -> str:
        low, high = min(s["counts"][key] for s in per_seed), max(s["counts"][key] for s in per_seed)
        return str(low) if low == high else f"{low}-{high}"

    lines += ["", f"An answer hallucinates when the attribute values it names fit no object of the scene. Feedback: "
              f"{span('feedback_scenes')} English two-object scenes per seed ({span('corrections')} corrected "
              f"descriptions for DDPO; {span('rlaifv_pairs')} RLAIF-V pairs from {span('rlaifv_claims')} claims "
              f"labelled by the world's truth); evaluated on {span('heldout_scenes')} other scenes in every "
              "language. Only English answers were ever corrected or labelled. Mean ± sd over seeds; in brackets "
              "the language fidelity (% of answers in the asked language, fastText)."]  # fmt: skip
    return "\n".join(lines) + "\n"
