"""Step-by-step batched decoding (mpm.decoding): the tokens of `mpm.inference.generate`, each row its own settings."""

import torch
from PIL import Image

from mpm.decoding import Sampling, TextStream, decode
from mpm.inference import Request, generate

RED = Image.new("RGB", (32, 32), (200, 20, 20))
BLUE = Image.new("RGB", (48, 24), (20, 20, 200))


def run(model, processor, requests, samplings, cancelled=lambda row: False):
    tokens = [[] for _ in requests]
    finish = [None] * len(requests)
    steps = 0
    for step in decode(model, processor, requests, samplings, cancelled):
        steps += 1
        for t in step:
            if t.id is not None:
                tokens[t.row].append(t.id)
            if t.finish:
                assert finish[t.row] is None  # a row finishes once
                finish[t.row] = t.finish
    return tokens, finish, steps


def test_greedy_rows_decode_as_generate_alone_and_batched(tiny):
    torch.manual_seed(0)
    model, processor = tiny()
    model.eval()
    requests = [Request([RED], messages=[{"role": "user", "content": "What colour?"}]),
                Request([BLUE], messages=[{"role": "user", "content": "Describe the picture in a few words."}]),
                Request([], prompt="a red")]  # fmt: skip
    expected = generate(model, processor, requests, max_new_tokens=12, batch_size=1)
    tokens, finish, _ = run(model, processor, requests, [Sampling(12)] * 3)
    texts = [processor.tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]
    assert texts == expected
    assert all(f in ("stop", "length") for f in finish)
    alone = [run(model, processor, [r], [Sampling(12)])[0][0] for r in requests]
    assert alone == tokens


def test_each_row_samples_with_its_own_seed_whatever_it_is_batched_with(tiny):
    torch.manual_seed(0)
    model, processor = tiny()
    model.eval()
    request = Request([RED], messages=[{"role": "user", "content": "What colour?"}])
    other = Request([BLUE], messages=[{"role": "user", "content": "Something else entirely, please."}])
    hot = Sampling(10, temperature=1.5, top_p=0.95, seed=7)
    alone, _, _ = run(model, processor, [request], [hot])
    batched, _, _ = run(model, processor, [other, request, request], [Sampling(10), hot, Sampling(10, 1.5, 0.95, 8)])
    assert batched[1] == alone[0]
    assert batched[2] != batched[1]  # another seed, another draw


def test_a_cancelled_row_stops_and_the_others_go_on(tiny):
    torch.manual_seed(0)
    model, processor = tiny()
    model.eval()
    requests = [Request([], prompt="a red"), Request([], prompt="a blue")]
    long = Sampling(20)
    processor.tokenizer.eos_token_id  # noqa: B018
    tokens, finish, steps = run(model, processor, requests, [long, long], cancelled=lambda row: row == 0)
    assert finish[0] == "cancelled" and tokens[0] == []
    assert finish[1] in ("stop", "length") and (finish[1] == "stop" or len(tokens[1]) == 20)


def test_text_streams_hold_back_incomplete_characters_and_stop_strings(tiny):
    _, processor = tiny()
    tok = processor.tokenizer
    ids = tok("红色 the END here", add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, stop=["END"])
    deltas = [stream.add(i) for i in ids] + [stream.add(None)]
    assert "".join(deltas) == "红色 the " and stream.stopped
    assert all("\ufffd" not in d for d in deltas)
    plain = TextStream(tok)
    assert "".join([plain.add(i) for i in ids] + [plain.add(None)]) == "红色 the END here"
