"""`mpm align rlaifv` end to end on tiny models (the offline rule splitter, the policy as its own labeler), and the
loop's parts: instruction reading, resumable stage files, the endpoint splitter stopping with its message."""

import json
from pathlib import Path

import pytest
from PIL import Image

from mpm.cli import main

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange"]


@pytest.fixture
def instructions(tmp_path):
    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    rows, heldout = [], []
    for i, colour in enumerate(COLOURS):
        Image.new("RGB", (32, 32), colour).save(folder / "images" / f"{i}.png")
        row = {"id": f"q{i}", "image": f"images/{i}.png", "question": "Describe the picture.", "lang": "en"}
        (heldout if i >= 4 else rows).append(row)
    (folder / "instructions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout))
    return folder


TRUE = ["The picture is {c}.", "There is a big {c} square."]
INVENTED = ["A dog sits on the left.", "The sky looks {d}.", "A small cat sleeps here.", "Two birds fly over the sea."]


@pytest.fixture
def policy(tiny, tmp_path):
    """A tiny MPM model taught (a few seconds) to describe plain-colour pictures in two or three sentences, some
    invented (a dog, a cat, birds), and to answer "Is it true that <sentence>?" with yes for the true kind and no for
    the invented kind: its sampled answers differ in how many invented claims they make, and as its own labeler
    (RLAIF-V's self-feedback) it can tell them apart."""
    import random

    import torch

    from mpm.data import to_device
    from mpm.inference import with_markers

    torch.manual_seed(0)
    model, processor = tiny()
    rng = random.Random(0)
    images = [Image.new("RGB", (32, 32), c) for c in COLOURS]
    encoded = []

    def add(image, question, answer):
        messages = [{"role": "user", "content": with_markers(processor, question, 1)},
                    {"role": "assistant", "content": answer}]  # fmt: skip
        encoded.append(processor.encode_conversation(messages, [image]))

    for _ in range(48):
        i = rng.randrange(len(COLOURS))
        fill = {"c": COLOURS[i], "d": rng.choice(COLOURS)}
        sentences = rng.sample(TRUE + INVENTED, rng.choice([2, 3]))
        add(images[i], "Describe the picture.", " ".join(t.format(**fill) for t in sentences))
        kind, answer = rng.choice([(TRUE, "yes"), (INVENTED, "no")])
        claim = rng.choice(kind).format(**fill).rstrip(".")
        add(images[i], f"Is it true that {claim}? Please answer yes or no.", answer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(150):
        start = (step * 8) % len(encoded)
        batch = to_device(processor.collate(encoded[start : start + 8]), "cpu")
        loss = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                     attention_mask=batch["attention_mask"], labels=batch["labels"]).loss  # fmt: skip
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = tmp_path / "policy"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def args(policy, data, out, *more):
    return ["align", "rlaifv", "--no-progress", "--config", "configs/align/rlaifv_rule.yaml", f"policy={policy}",
            f"instructions={data / 'instructions.jsonl'}", f"heldout={data / 'heldout.jsonl'}", f"output_dir={out}",
            "labeler.model=null", "iterations=1", "sampling.n=4", "sampling.max_new_tokens=24", "sampling.temperature=0.7",
            "dpo.epochs=1", "dpo.data.max_length=256", "dpo.train.batch_size=2", "dpo.train.mixed_precision=no",
            "dpo.train.gradient_checkpointing=false", "dpo.train.warmup_steps=0", "dpo.train.lr=1e-3",
            "dpo.train.connector_lr=1e-3", "dpo.train.log_every=1", *more]  # fmt: skip


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_iteration_end_to_end_makes_pairs_and_trains(policy, instructions, tmp_path):
    out = tmp_path / "rlaifv"
    assert main(args(policy, instructions, out)) == 0
    it = out / "iter-1"
    responses = lines(it / "responses.jsonl")
    assert len(responses) == 4 * 4 and len({r["text"] for r in responses}) > 4  # 4 seeds per instruction
    claims = {c["response_id"]: c for c in lines(it / "claims.jsonl")}
    scores = {c["response_id"]: c["scores"] for c in lines(it / "scores.jsonl")}
    assert claims.keys() == scores.keys() == {r["response_id"] for r in responses}
    assert all(len(scores[k]) == len(claims[k]["claims"]) for k in claims)
    summary = json.loads((it / "summary.json").read_text())
    assert summary["pairs"] >= 1 and summary["dpo_steps"] >= 1
    assert summary["claims_checked"] == sum(len(v) for v in scores.values()) > summary["claims_rejected"] > 0
    pairs = lines(it / "pairs.jsonl")
    assert len(pairs) == summary["pairs"] and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    assert all(p["lang"] == "en" and Path(p["image"]).is_file() for p in pairs)
    assert (it / "dpo" / "metrics.jsonl").is_file() and (it / "dpo" / "final" / "model.safetensors").is_file()
    for when in ("before", "after"):
        held = summary[f"heldout_{when}"]
        assert held["en"]["answers"] == 2 and held["en"]["fidelity"] is not None
    assert summary["next_policy"] == (summary["trained"] if summary["kept"] == "trained" else str(policy))
    assert "| 1 | en |" in (out / "summary.md").read_text()

    # killed while sampling and while scoring (half-written last lines, no summary): the rerun redoes only what is
    # missing, and a half-written sampling batch is redrawn exactly (its seed depends on the batch, not the run)
    sampled = (it / "responses.jsonl").read_text()
    kept = sampled.splitlines()
    (it / "responses.jsonl").write_text("\n".join(kept[:9]) + "\n" + kept[9][: len(kept[9]) // 2])
    kept = (it / "scores.jsonl").read_text().splitlines()
    (it / "scores.jsonl").write_text("\n".join(kept[:5]) + "\n" + kept[5][: len(kept[5]) // 2])
    (it / "summary.json").unlink()
    assert main(args(policy, instructions, out)) == 0
    assert sorted((it / "responses.jsonl").read_text().splitlines()) == sorted(sampled.splitlines())
    assert {c["response_id"]: c["scores"] for c in lines(it / "scores.jsonl")} == scores
    assert json.loads((it / "summary.json").read_text())["pairs"] == summary["pairs"]

    # a changed setting that the files depend on is refused, naming it
    assert main(args(policy, instructions, out, "sampling.n=3")) == 2


def test_stage_files_keep_line_separators_inside_answers(tmp_path):
    from mpm.align.rlaifv import append_stage, read_stage

    path = tmp_path / "responses.jsonl"
    records = [{"response_id": "a", "text": "one\u2028two\u0085three\u2029"}, {"response_id": "b", "text": "二"}]
    append_stage(path, records)
    assert read_stage(path, "response_id") == {r["response_id"]: r for r in records}


def test_instructions_with_bad_rows_are_counted(tmp_path):
    from mpm.align.rlaifv import read_instructions

    (tmp_path / "a.png").write_bytes(b"not a png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    rows = [{"id": 1, "image": "b.png", "question": "Q?", "lang": "en"},
            {"id": 2, "image": "a.png", "question": "Q?", "lang": "en"},  # does not decode
            {"id": 3, "image": "gone.png", "question": "Q?", "lang": "en"},
            {"id": 1, "image": "b.png", "question": "Q?", "lang": "en"},  # the same id again
            {"id": 4, "image": "b.png", "question": "", "lang": "en"}]  # fmt: skip
    (tmp_path / "i.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept, skipped = read_instructions(tmp_path / "i.jsonl")
    assert [i.id for i in kept] == ["1"]
    assert skipped == {"bad_image": 1, "missing_image": 1, "duplicate_id": 1, "missing_field": 1}


def endpoint_config(url):
    from mpm.align.rlaifv_config import RlaifvConfig
    from mpm.core.config import load_config

    return load_config(RlaifvConfig, "configs/align/rlaifv_endpoint.yaml", overrides=[
        f"splitter.endpoint.base_url={url}", "splitter.endpoint.model=split", "splitter.endpoint.retries=1",
        "splitter.endpoint.api_key_env=null"])  # fmt: skip


def test_an_endpoint_that_keeps_failing_stops_with_its_message_and_keeps_its_replies(chat_server, tmp_path):
    from mpm.align.rlaifv import endpoint_generate
    from mpm.core.errors import EndpointError
    from mpm.core.http import ResponseCache

    def respond(body):
        text = body["messages"][0]["content"]
        return (503, b'{"error": "overloaded"}') if "fails" in text else "1. The cat is red."

    server = chat_server(respond)
    ask = endpoint_generate(endpoint_config(server.base_url), tmp_path / "cache.sqlite")
    assert ask(["it works", "it works too"]) == ["1. The cat is red."] * 2
    with pytest.raises(
        EndpointError, match=r"endpoint http://127.0.0.1:\d+/v1 failed: HTTP 503.*overloaded.*cached in"
    ):
        ask(["this one fails", "but this one works"])
    assert len(ResponseCache(tmp_path / "cache.sqlite")) == 3  # the reply after the failure is kept too
    asked = len(server.requests)
    assert ask(["it works"]) == ["1. The cat is red."] and len(server.requests) == asked  # from the cache


def test_a_local_split_model_answers_each_prompt(tiny_parts):
    from mpm.align.claims import ResponseToSplit, build_splitter
    from mpm.align.rlaifv import local_generate

    ask = local_generate(str(tiny_parts[1]), max_new_tokens=6)
    replies = ask(["Split: the cat is red.", "Split: two dogs."])
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    splitter = build_splitter("llm", ask, questions="template")
    out = splitter.split([ResponseToSplit("Describe.", "The cat is red and the dog is blue.", "en")])
    assert len(out) == 1 and splitter.stats.responses == 1  # a garbage reply is counted, never guessed at
    assert splitter.stats.claims + splitter.stats.empty + splitter.stats.malformed >= 1
