"""`mpm align rlaifv`: RLAIF-V's AI-feedback loop (Yu et al., CVPR'25; seeds-notes 4.1, 4.3), iterated.

Iteration k lives in OUTPUT_DIR/iter-k/; every stage writes its own file, and a rerun of the same command continues
from the files that exist (a jsonl stage from its last complete line; DPO from its last checkpoint):

    1. responses.jsonl  `sampling.n` answers per instruction from the current policy: the same decoding settings,
                        a different seed each (RLAIF-V's deconfounded candidates)
    2. claims.jsonl     each answer split into atomic claims with a yes/no question each (mpm.align.claims: the
                        offline `rule` splitter, a local LM, or an OpenAI-compatible endpoint), in its language
    3. scores.jsonl     each question scored by the labeler: P(yes) / (P(yes) + P(no)) from one forward step
                        (mpm.align.labeler); a claim is accepted when the score is above 0.5
    4. pairs.jsonl      answer score = -(rejected claims); pairs with a gap >= 1, at most 2 per instruction, then
                        RLAIF-V's length sweep, per language in that language's length unit (words, or characters
                        for zh / ja); the DESIGN.md preference jsonl, + pairs.json with the counts
    5. dpo/             `mpm train align` on the pairs (DPO, beta 0.1: RLAIF-V's settings), the policy its own
                        reference, `dpo.epochs` epochs
    6. heldout_*.json   greedy answers to the held-out instructions of the policy (before) and the trained model
                        (after), checked the same way and by the same judge (the labeler, or with self-feedback the
                        iteration's policy): the hallucination rate (rejected / checked claims; answers with any
                        rejected claim) and the language fidelity (mpm.eval.fidelity) per language
    7. summary.json     the next policy: the trained model when its held-out claim hallucination rate is no worse
                        than the policy's (and both could be measured), else the policy again (RLAIF-V picks the best checkpoint on its
                        hallucination benchmarks as the next base)

OUTPUT_DIR/summary.json and summary.md gather the iterations. The labeler and the splitter can be passed in as
objects (the miniature world's demo labels with the world's truth).
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from mpm.align.batches import prompt_request
from mpm.align.claims import Claim, ClaimStats, ResponseToSplit, build_splitter, load_language
from mpm.align.config import AlignConfig, ModelSection
from mpm.align.config import DataSection as AlignData
from mpm.align.labeler import score_questions, yes_no_token_ids
from mpm.align.pairs import (
    RankedPair,
    ScoredResponse,
    balance_lengths,
    candidate_pairs,
    claim_accepted,
    sample_pairs,
    score_response,
)
from mpm.align.rlaifv_config import RESUMABLE, RlaifvConfig
from mpm.core.config import diff_configs, load_config, save_config
from mpm.core.errors import ConfigError, DataError, EndpointError
from mpm.core.files import atomic_write_json, output_folder
from mpm.core.images import open_image
from mpm.eval.data import read_jsonl
from mpm.export import import_llava_once
from mpm.inference import generate, load_model

logger = logging.getLogger(__name__)

CONFIG_FILE = "rlaifv_config.yaml"


# ---- inputs ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    id: str
    image: str  # an absolute path
    question: str
    lang: str


def read_instructions(path: str | Path, images: str | None = None) -> tuple[list[Instruction], Counter]:
    """The instructions of a jsonl file {"id", "image", "question", "lang"}, and the rows skipped, by reason (a
    missing field, a duplicate id, an image that is not there or does not decode); each is logged with its line."""
    path = Path(path)
    root = Path(images) if images else path.parent
    kept, skipped, seen = [], Counter(), set()
    for line, row in read_jsonl(path):
        reason = None
        fields = [row.get(k) for k in ("id", "image", "question", "lang")]
        if not all(isinstance(v, str | int) and str(v).strip() for v in fields):
            reason = "missing_field"
        elif str(row["id"]) in seen:
            reason = "duplicate_id"
        elif not (root / str(row["image"])).is_file():
            reason = "missing_image"
        elif not _decodes(root / str(row["image"])):
            reason = "bad_image"
        if reason:
            skipped[reason] += 1
            logger.warning("%s:%d skipped (%s): %s", path, line, reason, json.dumps(row, ensure_ascii=False)[:200])
            continue
        seen.add(str(row["id"]))
        kept.append(Instruction(str(row["id"]), str((root / str(row["image"])).resolve()), str(row["question"]),
                                str(row["lang"])))  # fmt: skip
    if not kept:
        raise DataError(f"{path}: no usable instruction ({dict(skipped)}); each line needs id, image, question, lang")
    return kept, skipped


def _decodes(path: Path) -> bool:
    try:
        open_image(path)
    except DataError:
        return False
    return True


# ---- the labeler and the splitter, as the loop uses them ---------------------------------------------------------


class Labeler(Protocol):
    def score(self, items: Sequence[tuple[str, Claim]]) -> list[float]:
        """P(yes) / (P(yes) + P(no)) for each (image path, claim): claim accepted when above 0.5."""


class ModelLabeler:
    """An MLLM labeler (mpm.align.labeler.score_questions), the questions of each language batched together."""

    def __init__(self, model, processor, batch_size: int = 16, table: str | None = None):
        self.model, self.processor, self.batch_size, self.table = model, processor, batch_size, table

    def score(self, items: Sequence[tuple[str, Claim]]) -> list[float]:
        scores: list[float] = [0.0] * len(items)
        by_lang: dict[str, list[int]] = defaultdict(list)
        for i, (_, claim) in enumerate(items):
            by_lang[claim.lang].append(i)
        for lang, index in by_lang.items():
            got = score_questions(self.model, self.processor, [(items[i][0], items[i][1].question) for i in index],
                                  lang, self.batch_size, self.table)  # fmt: skip
            for i, s in zip(index, got, strict=True):
                scores[i] = s
        return scores


def endpoint_generate(cfg, cache_path: Path) -> Callable[[list[str]], list[str]]:
    """prompts -> replies from an OpenAI-compatible endpoint, each reply cached as it arrives. A request that still
    fails after its retries stops the loop with the endpoint's message (the replies so far stay cached: a rerun
    asks only for the rest)."""
    from mpm.core.http import ChatClient, LLMError, ResponseCache

    e = cfg.splitter.endpoint
    client = ChatClient(e.base_url, e.model, e.api_key_env, retries=e.retries, concurrency=e.concurrency,
                        temperature=e.temperature, max_tokens=e.max_tokens)  # fmt: skip
    cache = ResponseCache(cache_path)

    def ask(prompts: list[str]) -> list[str]:
        requests = [(client.cache_key(m), m) for m in ([{"role": "user", "content": p}] for p in prompts)]
        replies, failed = [], None
        for key, reply, cached in client.complete_many(requests, cache):  # every reply that came is kept
            if isinstance(reply, LLMError):
                failed = failed or reply
            elif not cached:
                cache.put(key, reply)
            replies.append(reply)
        if failed is not None:
            raise EndpointError(f"the claim splitter's endpoint {e.base_url} failed: {failed}. The replies that came "
                                f"are cached in {cache_path}; fix the endpoint and rerun to continue")  # fmt: skip
        return replies

    return ask


def local_generate(model_name: str, max_new_tokens: int) -> Callable[[list[str]], list[str]]:
    """prompts -> greedy replies of a local causal LM through its chat template (batched, left-padded)."""
    from mpm.core.llm import load_llm

    model, tokenizer = load_llm(model_name)
    model.eval()
    tokenizer.padding_side = "left"

    @torch.no_grad()
    def ask(prompts: list[str]) -> list[str]:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]  # fmt: skip
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    return ask


def make_splitter(cfg: RlaifvConfig, out: Path):
    folder = cfg.splitter.rules or None
    kwargs = {"folder": folder} if folder else {}
    if cfg.splitter.kind == "rule":
        return build_splitter("rule", **kwargs)
    if cfg.splitter.endpoint.base_url:
        ask = endpoint_generate(cfg, out / "splitter_cache.sqlite")
    else:
        ask = local_generate(cfg.splitter.model, cfg.splitter.max_new_tokens)
    return build_splitter("llm", ask, **kwargs, questions=cfg.splitter.questions)


# ---- resumable jsonl stages --------------------------------------------------------------------------------------


def read_stage(path: Path, key: str) -> dict[str, dict]:
    """The records of a stage file by `key`. A last line cut by a kill is removed from the file (it is redone)."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(data))
    lines = data.decode("utf-8").split("\n")[:-1]  # not splitlines(): it also breaks at U+2028, U+0085 ...
    return {record[key]: record for record in map(json.loads, lines)}


def append_stage(path: Path, records: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _seed(*parts) -> int:
    return int(hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:8], 16)


# ---- the stages --------------------------------------------------------------------------------------------------


def sample_responses(model, processor, cfg: RlaifvConfig, instructions: list[Instruction], path: Path,
                     iteration: int, show_progress: bool) -> list[dict]:  # fmt: skip
    """Stage 1. Sample s of every batch draws from its own seed (run seed, iteration, s, batch start), so a
    resumed run redraws a half-written batch exactly."""
    s = cfg.sampling
    done = read_stage(path, "response_id")
    batches = [(k, start) for k in range(s.n) for start in range(0, len(instructions), s.batch_size)]
    todo = [(k, start) for k, start in batches
            if any(f"{i.id}#{k}" not in done for i in instructions[start : start + s.batch_size])]  # fmt: skip
    for k, start in tqdm(todo, desc=f"iter {iteration}: sampling", unit="batch", disable=not show_progress):
        group = instructions[start : start + s.batch_size]
        torch.manual_seed(_seed(cfg.seed, iteration, k, start))
        requests = [prompt_request(i.question, [i.image], cfg.raw_prompt) for i in group]
        answers = generate(model, processor, requests, s.max_new_tokens, do_sample=True, temperature=s.temperature,
                           top_p=s.top_p, batch_size=len(group))  # fmt: skip
        append_stage(path, [{"response_id": f"{i.id}#{k}", "instruction_id": i.id, "sample": k, "text": a}
                            for i, a in zip(group, answers, strict=True) if f"{i.id}#{k}" not in done])  # fmt: skip
    done = read_stage(path, "response_id")
    return [done[f"{i.id}#{k}"] for k in range(s.n) for i in instructions]


def split_claims(splitter, responses: list[dict], by_id: dict[str, Instruction], path: Path, batch_size: int,
                 desc: str, show_progress: bool) -> dict[str, dict]:  # fmt: skip
    """Stage 2: {response_id: {"claims": [{"text", "question"}], "problem": "" | "no_claims"}}."""
    done = read_stage(path, "response_id")
    todo = [r for r in responses if r["response_id"] not in done]
    for start in tqdm(range(0, len(todo), batch_size), desc=desc, unit="batch", disable=not show_progress):
        group = todo[start : start + batch_size]
        items = [ResponseToSplit(by_id[r["instruction_id"]].question, r["text"], by_id[r["instruction_id"]].lang)
                 for r in group]  # fmt: skip
        claims = splitter.split(items)
        append_stage(path, [{"response_id": r["response_id"], "problem": "" if c else "no_claims",
                             "claims": [{"text": x.text, "question": x.question} for x in c]}
                            for r, c in zip(group, claims, strict=True)])  # fmt: skip
    return read_stage(path, "response_id")


def score_claims(labeler: Labeler, responses: list[dict], claims: dict[str, dict], by_id: dict[str, Instruction],
                 path: Path, batch_size: int, desc: str, show_progress: bool) -> dict[str, list[float]]:  # fmt: skip
    """Stage 3: {response_id: [labeler score per claim]}; `batch_size` answers' claims per labeler call."""
    done = read_stage(path, "response_id")
    todo = [r for r in responses if r["response_id"] not in done]
    for start in tqdm(range(0, len(todo), batch_size), desc=desc, unit="batch", disable=not show_progress):
        group = todo[start : start + batch_size]
        items = []
        for r in group:
            inst = by_id[r["instruction_id"]]
            items += [
                (inst.image, Claim(c["text"], c["question"], inst.lang)) for c in claims[r["response_id"]]["claims"]
            ]
        scores = iter(labeler.score(items) if items else [])
        append_stage(path, [{"response_id": r["response_id"],
                             "scores": [next(scores) for _ in claims[r["response_id"]]["claims"]]}
                            for r in group])  # fmt: skip
    return {k: v["scores"] for k, v in read_stage(path, "response_id").items()}


def length_of(lang: str, rules_folder: str | None) -> Callable[[str], int]:
    """The language's length unit for the sweep: words, or characters (zh, ja) from its claims/<lang>.yaml."""
    rules = load_language(lang, rules_folder) if rules_folder else load_language(lang)
    return (lambda t: len(t.split())) if rules.length_unit == "words" else (lambda t: len("".join(t.split())))


def make_pairs(cfg: RlaifvConfig, responses: list[dict], scores: dict[str, list[float]],
               by_id: dict[str, Instruction], iteration: int, path: Path) -> dict:  # fmt: skip
    """Stage 4: the preference pairs (the DESIGN.md jsonl) and their counts."""
    scored = [ScoredResponse(r["instruction_id"], r["response_id"], r["text"],
                             score_response([claim_accepted(s) for s in scores[r["response_id"]]]))
              for r in responses]  # fmt: skip
    candidates, unscored = candidate_pairs(scored, cfg.pairs.min_gap)
    sampled = sample_pairs(candidates, cfg.pairs.max_per_instruction, seed=_seed(cfg.seed, iteration))
    by_lang: dict[str, list[RankedPair]] = defaultdict(list)
    for p in sampled:
        by_lang[by_id[p.instruction_id].lang].append(p)
    kept, sweeps = [], {}
    for lang, pairs in sorted(by_lang.items()):
        balanced, sweep = balance_lengths(pairs, length_of(lang, cfg.splitter.rules))
        kept += balanced
        sweeps[lang] = asdict(sweep)
    rows = []
    for n, p in enumerate(kept):
        inst = by_id[p.instruction_id]
        rows.append({"id": f"iter{iteration}-{n}", "image": inst.image, "question": inst.question, "lang": inst.lang,
                     "chosen": p.chosen.text, "rejected": p.rejected.text, "chosen_score": p.chosen.score,
                     "rejected_score": p.rejected.score, "instruction_id": p.instruction_id})  # fmt: skip
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return {"responses": len(responses), "unscored_responses": unscored, "candidate_pairs": len(candidates),
            "sampled_pairs": len(sampled), "pairs": len(rows), "length_sweep": sweeps}  # fmt: skip


def hallucination(answers: list[dict], claims: dict[str, dict], scores: dict[str, list[float]],
                  by_id: dict[str, Instruction]) -> dict:  # fmt: skip
    """Per language and overall: claims checked and rejected, the claim hallucination rate (rejected / checked),
    the response hallucination rate (answers with a rejected claim / answers with claims), answers without claims."""
    from mpm.eval.fidelity import fidelity

    groups: dict[str, list[dict]] = defaultdict(list)
    for a in answers:
        groups[by_id[a["instruction_id"]].lang].append(a)
    result = {}
    for lang, group in [*sorted(groups.items()), ("all", answers)]:
        verdicts = [[claim_accepted(s) for s in scores[a["response_id"]]] for a in group]
        checked = sum(len(v) for v in verdicts)
        rejected = sum(v.count(False) for v in verdicts)
        with_claims = [v for v in verdicts if v]
        row = {"answers": len(group), "claims": checked, "rejected": rejected,
               "claim_rate": rejected / checked if checked else None,
               "response_rate": sum(not all(v) for v in with_claims) / len(with_claims) if with_claims else None,
               "no_claims": len(group) - len(with_claims)}  # fmt: skip
        if lang != "all":
            row["fidelity"] = fidelity([a["text"] for a in group], lang).pass_rate
        result[lang] = row
    return result


def heldout_answers(model, processor, cfg: RlaifvConfig, heldout: list[Instruction], path: Path) -> list[dict]:
    """Greedy answers of `model` to the held-out instructions, kept in `path` (a rerun reads them back)."""
    done = read_stage(path, "response_id")
    todo = [i for i in heldout if i.id not in done]
    for start in range(0, len(todo), cfg.sampling.batch_size):
        group = todo[start : start + cfg.sampling.batch_size]
        texts = generate(model, processor, [prompt_request(i.question, [i.image], cfg.raw_prompt) for i in group],
                         cfg.sampling.max_new_tokens, batch_size=len(group))  # fmt: skip
        append_stage(path, [{"response_id": i.id, "instruction_id": i.id, "text": t}
                            for i, t in zip(group, texts, strict=True)])  # fmt: skip
    done = read_stage(path, "response_id")
    return [done[i.id] for i in heldout]


def check_heldout(answers: list[dict], heldout: list[Instruction], splitter, judge: Labeler, cfg: RlaifvConfig,
                  path: Path, show_progress: bool) -> dict:  # fmt: skip
    """The held-out answers split and labelled (files beside `path`), and their rates (written to `path`)."""
    by_id = {i.id: i for i in heldout}
    claims = split_claims(splitter, answers, by_id, path.with_name(path.stem + ".claims.jsonl"),
                          cfg.splitter.batch_size, f"{path.stem}: claims", show_progress)  # fmt: skip
    scores = score_claims(judge, answers, claims, by_id, path.with_name(path.stem + ".scores.jsonl"),
                          cfg.splitter.batch_size, f"{path.stem}: labeler", show_progress)  # fmt: skip
    result = hallucination(answers, claims, scores, by_id)
    atomic_write_json(path, result)
    return result


def dpo_config(cfg: RlaifvConfig, policy: str, pairs: Path, count: int, out: Path) -> AlignConfig:
    """`mpm train align`'s config for this iteration: the policy its own reference, `dpo.epochs` over the pairs."""
    t = copy.deepcopy(cfg.dpo.train)
    t.batch_size = min(t.batch_size, count)  # a handful of pairs still trains
    t.output_dir = str(out)
    t.max_steps = max(1, math.ceil(cfg.dpo.epochs * count / (t.batch_size * t.grad_accum)))
    t.warmup_steps = math.ceil(cfg.dpo.warmup_ratio * t.max_steps)
    data = AlignData(preferences=str(pairs), format="mpm", max_length=cfg.dpo.data.max_length,
                     raw_prompt=cfg.raw_prompt)  # fmt: skip
    return AlignConfig(ModelSection(init_from=policy), data, copy.deepcopy(cfg.dpo.loss),
                       copy.deepcopy(cfg.dpo.reference), t)  # fmt: skip


# ---- the loop ----------------------------------------------------------------------------------------------------


@dataclass
class RlaifvResult:
    policy: str  # the policy after the last iteration
    iterations: list[dict]  # each iteration's summary


def run(cfg: RlaifvConfig, labeler: Labeler | None = None, splitter=None, show_progress: bool = True) -> RlaifvResult:
    """Run (or continue) `cfg.iterations` iterations. `labeler` / `splitter`: objects to use instead of the ones
    the config describes (the demo's world-truth labeler)."""
    from mpm.recipes.align import train as train_align

    cfg.check_required()
    out = output_folder(cfg.output_dir, "output_dir")
    _check_same_run(out, cfg)
    instructions, skipped = read_instructions(cfg.instructions, cfg.images)
    heldout, heldout_skipped = read_instructions(cfg.heldout, cfg.images)
    by_id = {i.id: i for i in [*instructions, *heldout]}
    if len(by_id) < len(instructions) + len(heldout):
        raise DataError(f"{cfg.heldout}: held-out ids must differ from the instructions' ids")
    if labeler is None and cfg.raw_prompt is not None and not cfg.labeler.model:
        raise ConfigError("a policy trained on raw prompts cannot label its own claims (the labeler asks through a "
                          "chat template): set labeler.model")  # fmt: skip
    langs = sorted({i.lang for i in by_id.values()})
    for lang in langs:  # a language without claim rules fails now, not after an hour of sampling
        length_of(lang, cfg.splitter.rules)
    # A LLaVA policy is converted once, so that every stage (and DPO) sees the same model and pixels.
    policy = import_llava_once(cfg.policy, out / "imported" / "policy")
    splitter = splitter or make_splitter(cfg, out)
    summaries = []
    for k in range(1, cfg.iterations + 1):
        folder = out / f"iter-{k}"
        folder.mkdir(exist_ok=True)
        summary_path = folder / "summary.json"
        if summary_path.is_file():  # this iteration is finished
            summary = json.loads(summary_path.read_text())
            summaries.append(summary)
            policy = summary["next_policy"]
            continue
        logger.info("RLAIF-V iteration %d: policy %s", k, policy)
        stats_before = _stats(splitter)
        model, processor = load_model(policy)
        judge = labeler or _model_labeler(cfg, model, processor, langs)  # one judge for the whole iteration
        # 1-3: sample, split, score
        responses = sample_responses(model, processor, cfg, instructions, folder / "responses.jsonl", k,
                                     show_progress)  # fmt: skip
        claims = split_claims(splitter, responses, by_id, folder / "claims.jsonl", cfg.splitter.batch_size,
                              f"iter {k}: claims", show_progress)  # fmt: skip
        scores = score_claims(judge, responses, claims, by_id, folder / "scores.jsonl", cfg.splitter.batch_size,
                              f"iter {k}: labeler", show_progress)  # fmt: skip
        # 4: pairs
        counts = make_pairs(cfg, responses, scores, by_id, k, folder / "pairs.jsonl")
        counts["claims_checked"] = sum(len(v) for v in scores.values())
        counts["claims_rejected"] = sum(not claim_accepted(s) for v in scores.values() for s in v)
        counts["no_claims"] = sum(1 for c in claims.values() if c["problem"])
        atomic_write_json(folder / "pairs.json", counts)
        # 6 (before): the policy's held-out answers, checked by this iteration's judge
        answers = heldout_answers(model, processor, cfg, heldout, folder / "heldout_before.answers.jsonl")
        before = check_heldout(answers, heldout, splitter, judge, cfg, folder / "heldout_before.json", show_progress)
        del model, processor, judge
        gc.collect()
        # 5: DPO, then the trained model's held-out answers, checked by the same judge
        trained, after, steps = None, None, 0
        if counts["pairs"]:
            align = dpo_config(cfg, policy, folder / "pairs.jsonl", counts["pairs"], folder / "dpo")
            steps = align.train.max_steps
            trained = str(train_align(align, show_progress=show_progress).final)
            gc.collect()
            model, processor = load_model(trained)
            answers = heldout_answers(model, processor, cfg, heldout, folder / "heldout_after.answers.jsonl")
            del model, processor
            gc.collect()
            judge = labeler or _model_labeler(cfg, *load_model(policy), langs)
            after = check_heldout(answers, heldout, splitter, judge, cfg, folder / "heldout_after.json", show_progress)
            del judge
            gc.collect()
        else:
            logger.warning("iteration %d made no preference pair: the policy stays %s", k, policy)
        # 7: the next policy: the trained model unless it hallucinates more on the held-out set (or cannot be told)
        better = None not in (_rate(before), _rate(after)) and _rate(after) <= _rate(before)
        summary = {"iteration": k, "policy": policy, "trained": trained, "dpo_steps": steps, **counts,
                   "instructions_skipped": dict(skipped), "heldout_skipped": dict(heldout_skipped),
                   "heldout_before": before, "heldout_after": after,
                   "kept": "trained" if better else "policy", "next_policy": trained if better else policy,
                   "heldout_next": after if better else before,
                   "splitter": {k: v - stats_before.get(k, 0) for k, v in _stats(splitter).items()}}  # fmt: skip
        atomic_write_json(summary_path, summary)
        summaries.append(summary)
        policy = summary["next_policy"]
    atomic_write_json(out / "summary.json", {"policy": policy, "iterations": summaries})
    (out / "summary.md").write_text(summary_table(summaries), encoding="utf-8")
    return RlaifvResult(policy, summaries)


def _model_labeler(cfg: RlaifvConfig, policy_model, policy_processor, langs: list[str]) -> ModelLabeler:
    if cfg.labeler.model:
        model, processor = load_model(cfg.labeler.model)
    else:  # self-feedback: the policy labels its own answers
        model, processor = policy_model, policy_processor
    for lang in langs:  # a vocabulary without a language's yes / no tokens is refused before any scoring
        yes_no_token_ids(processor.tokenizer, lang, cfg.labeler.yes_no)
    return ModelLabeler(model, processor, cfg.labeler.batch_size, cfg.labeler.yes_no)


def _rate(result: dict | None) -> float | None:
    return None if result is None else result["all"]["claim_rate"]


def _stats(splitter) -> dict:
    stats = getattr(splitter, "stats", None)
    return asdict(stats) if isinstance(stats, ClaimStats) else {}


def _check_same_run(out: Path, cfg: RlaifvConfig) -> None:
    """A rerun continues only with the settings it started with (except RESUMABLE): its files depend on them."""
    saved = out / CONFIG_FILE
    if saved.is_file() and any(out.glob("iter-*")):
        changes = diff_configs(load_config(type(cfg), saved), cfg, ignore=RESUMABLE)
        if changes:
            listing = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes)
            raise ConfigError(f"{out} holds iterations of a run with other settings ({listing}): use a new "
                              "output_dir, or delete its iter-* folders to start over")  # fmt: skip
    save_config(cfg, saved)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def summary_table(summaries: list[dict]) -> str:
    """A Markdown table: per iteration and language, hallucination and fidelity before and after."""
    lines = ["# RLAIF-V iterations", "",
             "| iter | lang | pairs | claims checked | claim halluc. % before -> after | answers with one % before "
             "-> after | fidelity % before -> after | kept |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in summaries:
        before, after = s["heldout_before"], s["heldout_after"] or {}
        for lang in before:
            b, a = before[lang], after.get(lang, {})
            lines.append(
                f"| {s['iteration']} | {lang} | {s['pairs']} | {s['claims_checked']} | "
                f"{_pct(b['claim_rate'])} -> {_pct(a.get('claim_rate'))} | "
                f"{_pct(b['response_rate'])} -> {_pct(a.get('response_rate'))} | "
                f"{_pct(b.get('fidelity'))} -> {_pct(a.get('fidelity'))} | {s['kept']} |"
            )
    return "\n".join(lines) + "\n"
