"""CPU: `mpm eval`'s batched generation against one request at a time, and its scoring at XM3600 scale.

    python benchmarks/bench_eval.py [--requests 32] [--batch 8] [--configs mlp:32,resampler:32,mlp:64] [--repeats 3]
                                    [--images 3600] [--score-repeats 2] [--profile] [--threads 1]

(a) generation: `mpm.inference.generate` on the same requests with batch_size=1 and batch_size=8, alternating
    (A/B, then B/A), the median of the repeats; requests/s and the ratio batched / one-at-a-time (target >= 3x).
    The model is a small MPM model with random weights: a CLIP-like tower (4 layers x 256, 224 px, patch 16: 196
    patches), the connector, a Qwen2-like LLM (4 layers x 512, 8 heads / 2 KV heads, tied embeddings) and a
    byte-level BPE of 4,000 words trained on the synthetic captions below. `--configs` lists CONNECTOR:NEW_TOKENS
    runs: mlp (196 image tokens a request, the headline) or resampler (64 queries), and max_new_tokens (32; 64 is
    `mpm eval caption`'s default). Requests are built the way `mpm eval caption` builds them (`request_for_prompts`:
    the language's shipped prompt, one image path each): 8 languages x 4 images of 640x480 JPEG, in the eval's order
    (language-major), so a batch of 8 holds two prompts of different lengths (left padding). Greedy; random weights
    may stop at an end token early, so the LLM's generation_config gets `min_new_tokens = max_new_tokens` for both
    sides alike (the same work: every request gets max_new_tokens new tokens, checked on every `model.generate`
    call). The answers of the two sides are compared (batching must not change them).
(b) scoring: `evaluate_caption` with `--predictions` (no model) on a synthetic Crossmodal-3600-sized set: 3,600
    images x 36 languages x 2 references (captions.jsonl in XM3600's layout, with its `caption/tokenized` fields),
    one prediction per image and language; metrics cider + bleu4; then `write_results` (results.json, items.jsonl,
    table.md, chart.png). Each run is a fresh process; wall-clock and process CPU time, end to end and per stage
    (read references, `request_for_prompts` (it imports `mpm.inference`), read predictions, fidelity, CIDEr-D and
    BLEU-4 each split into tokenizing and the metric, report); target < 60 s. `--profile` adds one cProfile run
    (its top functions are printed and saved).

Synthetic text: per language a vocabulary drawn from the language's script (the letters of its shipped prompt
plus its Unicode block; syllables of a consonant and an optional vowel sign for the Indic scripts; Hangul
syllables for Korean), 2,000 words for space-delimited languages, Zipf-distributed; each image has a few "topic"
words its references and its prediction share. Chinese and Japanese captions are 10-20 characters and Thai 15-30,
written without spaces; the others 8-15 words. One prediction in ten (outside English) is the image's English
prediction, so fidelity and the in-language subset have something to find.

One torch thread by default, as in bench_t2i.py: the box has 2 cores shared with other work. Results:
benchmarks/_work/eval/bench_eval.json.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
WORK = REPO / "benchmarks" / "_work" / "eval"
GEN_LANGS = ["en", "zh", "de", "ar", "hi", "ja", "ru", "th"]  # (a): 8 languages x 4 images
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# -- synthetic text per language ----------------------------------------------------------------------------------------
def _block(start: int, end: int) -> list[str]:
    return [chr(c) for c in range(start, end + 1) if unicodedata.category(chr(c)).startswith(("L", "M"))]


# Extra letters per script, beside those of the language's prompt (the prompt alone has too few for some scripts).
BLOCKS = {
    "ar": _block(0x0621, 0x064A), "fa": _block(0x0621, 0x064A) + list("پچژگکی"), "he": _block(0x05D0, 0x05EA),
    "ru": _block(0x0430, 0x044F), "uk": _block(0x0430, 0x044F) + list("іїєґ"), "el": _block(0x03B1, 0x03C9),
    "hi": _block(0x0915, 0x094C), "bn": _block(0x0995, 0x09CC), "te": _block(0x0C15, 0x0C4C),
}  # fmt: skip
UNSEGMENTED = {"zh", "ja", "th"}


class Language:
    """A synthetic vocabulary for one language and the sentences drawn from it."""

    def __init__(self, code: str, prompt: str, rng: random.Random):
        self.code, self.rng = code, rng
        self.unsegmented = code in UNSEGMENTED
        if code == "zh":
            pool = [chr(c) for c in rng.sample(range(0x4E00, 0x9FA5), 1500)]
            words = ["".join(rng.choices(pool, k=rng.choice((1, 2, 2, 3)))) for _ in range(1200)]
        elif code == "ja":
            kana = _block(0x3041, 0x3093) + _block(0x30A1, 0x30F3)
            kanji = [chr(c) for c in rng.sample(range(0x4E00, 0x9FA5), 600)]
            words = ["".join(rng.choices(kanji, k=rng.choice((1, 2))) + rng.choices(kana, k=rng.randint(1, 3)))
                     for _ in range(1200)]  # fmt: skip
        elif code == "th":
            consonants = _block(0x0E01, 0x0E2E)
            marks = [chr(c) for c in (0x0E31, 0x0E34, 0x0E35, 0x0E36, 0x0E37, 0x0E38, 0x0E39, 0x0E48, 0x0E49)]
            leading = [chr(c) for c in range(0x0E40, 0x0E45)]

            def syllable():
                return rng.choice(["", "", *leading]) + rng.choice(consonants) + rng.choice(["", *marks])

            words = ["".join(syllable() for _ in range(rng.randint(1, 3))) for _ in range(1200)]
        elif code == "ko":
            pool = [chr(c) for c in rng.sample(range(0xAC00, 0xD7A3), 600)]
            words = ["".join(rng.choices(pool, k=rng.randint(1, 4))) for _ in range(2000)]
        else:
            letters = sorted({ch for ch in prompt.lower() if unicodedata.category(ch).startswith(("L", "M"))})
            letters = sorted(set(letters) | set(BLOCKS.get(code, "abcdefghijklmnopqrstuvwxyz")))
            bases = [ch for ch in letters if not unicodedata.category(ch).startswith("M")]
            marks = [ch for ch in letters if unicodedata.category(ch).startswith("M")]
            prompt_words = [w.strip(".,!?।。") for w in prompt.lower().split()]
            words = [w for w in dict.fromkeys(prompt_words) if w]
            while len(words) < 2000:  # syllables: a letter and, for scripts with vowel signs, one half the time
                words.append("".join(rng.choice(bases) + (rng.choice(marks) if marks and rng.random() < 0.5 else "")
                                     for _ in range(rng.randint(2, 5))))  # fmt: skip
        self.words = list(dict.fromkeys(words))
        zipf = [1 / (rank + 1) ** 1.1 for rank in range(len(self.words))]
        self.cumulative = list(itertools.accumulate(zipf))

    def zipf_word(self) -> str:
        return self.words[bisect.bisect(self.cumulative, self.rng.random() * self.cumulative[-1])]

    def topic(self) -> list[str]:
        """An image's content words: a few of the less frequent words."""
        return self.rng.sample(self.words[50:], 6)

    def sentence(self, topic: list[str]) -> str:
        def word():
            return self.rng.choice(topic) if self.rng.random() < 0.35 else self.zipf_word()

        if self.unsegmented:
            low, high = (15, 30) if self.code == "th" else (10, 20)
            length, text = self.rng.randint(low, high), ""
            while len(text) < length:
                text += word()
            return text[:length] + ("。" if self.code != "th" else "")
        text = " ".join(word() for _ in range(self.rng.randint(8, 15)))
        return text[0].upper() + text[1:] + "."


def languages(seed: int = 0) -> dict[str, Language]:
    from mpm.eval.languages import LANGUAGES

    rng = random.Random(seed)
    return {code: Language(code, lang.prompt, random.Random(rng.random())) for code, lang in LANGUAGES.items()}


def write_xm3600(folder: Path, images: int) -> tuple[Path, Path]:
    """captions.jsonl (XM3600's layout) and predictions.jsonl for `images` images x 36 languages; written once."""
    captions, predictions = folder / f"captions_{images}.jsonl", folder / f"predictions_{images}.jsonl"
    if captions.exists() and predictions.exists():
        return captions, predictions
    folder.mkdir(parents=True, exist_ok=True)
    langs = languages()
    rng = random.Random(1)
    with open(captions, "w", encoding="utf-8") as caps, open(predictions, "w", encoding="utf-8") as preds:
        for i in range(images):
            key = f"{i:016x}"
            row = {"image/key": key, "image/locale": rng.choice(list(langs))}
            outputs = {}
            for code, lang in langs.items():
                topic = lang.topic()
                refs = [lang.sentence(topic) for _ in range(2)]
                row[code] = {"caption": refs, "caption/tokenized": refs,
                             "caption/tokenized/lowercase": [r.lower() for r in refs]}  # fmt: skip
                outputs[code] = lang.sentence(topic)
            caps.write(json.dumps(row, ensure_ascii=False) + "\n")
            for code, output in outputs.items():
                if code != "en" and rng.random() < 0.1:  # answered in English
                    output = outputs["en"]
                preds.write(json.dumps({"id": key, "image": f"{key}.jpg", "lang": code, "output": output},
                                       ensure_ascii=False) + "\n")  # fmt: skip
    return captions, predictions


# -- (a) generation -----------------------------------------------------------------------------------------------------
def build_model(vocab: int, connector: str):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import CLIPVisionConfig, PreTrainedTokenizerFast, Qwen2Config

    from mpm.eval.languages import LANGUAGES
    from mpm.modeling import MPMForConditionalGeneration

    langs = languages()
    texts = [lang.sentence(lang.topic()) for lang in langs.values() for _ in range(300)]
    texts += [lang.prompt for lang in LANGUAGES.values()] * 20
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=special,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                              image_size=224, patch_size=16)  # fmt: skip
    text = Qwen2Config(vocab_size=len(tok), hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                       tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    extra = {"num_queries": 64} if connector == "resampler" else {}
    model, processor = MPMForConditionalGeneration.from_parts(vision, text, tokenizer=tok, connector_type=connector,
                                                              image_size=224, **extra)  # fmt: skip
    return model.float().eval(), processor


def generation(args, connector: str, max_new: int) -> dict:
    """Requests/s of `generate` with batch_size 1 and `args.batch`, alternating; the median of `args.repeats`."""
    import numpy as np
    from PIL import Image

    from mpm.core.images import open_image
    from mpm.eval.caption import request_for_prompts
    from mpm.eval.languages import prompt_table
    from mpm.inference import generate, placed

    model, processor = build_model(args.vocab, connector)
    config = model.language_model.generation_config
    config.min_new_tokens = max_new  # both sides alike: every request gets max_new_tokens new tokens
    new_tokens: list[tuple[int, int]] = []  # (rows, new tokens) of every model.generate call
    inner = model.generate

    def counted(*a, **k):
        out = inner(*a, **k)
        new_tokens.append(tuple(out.shape))
        return out

    model.generate = counted
    folder = WORK / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per_lang = max(1, args.requests // len(GEN_LANGS))
    for i in range(per_lang):
        path = folder / f"img{i}.jpg"
        if not path.exists():  # a smooth colour field with noise, like a photo for the JPEG coder
            base = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
            picture = Image.fromarray(base).resize((640, 480), Image.BILINEAR)
            noise = rng.integers(-20, 20, (480, 640, 3))
            Image.fromarray(np.clip(np.asarray(picture) + noise, 0, 255).astype(np.uint8)).save(path, quality=90)
    request_for = request_for_prompts(prompt_table())
    items = [{"image": f"img{i}.jpg", "lang": lang} for lang in GEN_LANGS for i in range(per_lang)]
    requests = [request_for(item, folder)[0] for item in items]
    params = sum(p.numel() for p in model.parameters())
    encoded = [processor.encode_prompt(placed(r, processor).messages, [open_image(r.images[0])]) for r in requests]
    lengths = [len(e.input_ids) for e in encoded]
    image_tokens = int(sum(1 for t in encoded[0].input_ids if t == model.config.image_token_id))
    print(f"(a) {connector}, {max_new} new tokens: {params / 1e6:.1f}M parameters, vocabulary {len(processor.tokenizer)}, prompts "
          f"{min(lengths)}-{max(lengths)} tokens ({image_tokens} image tokens), {len(requests)} requests",
          flush=True)  # fmt: skip

    sides = {"one at a time": 1, f"batch {args.batch}": args.batch}
    answers = {}
    for name, size in sides.items():  # warm-up, and the answers compared below
        answers[name] = generate(model, processor, requests, max_new_tokens=max_new, batch_size=size)
    assert all(shape[1] == max_new for shape in new_tokens), f"short generations: {set(new_tokens)}"
    same = sum(a == b for a, b in zip(*answers.values())) / len(requests)
    times = {name: {"wall": [], "cpu": []} for name in sides}
    for repeat in range(args.repeats):
        order = list(sides.items())
        for name, size in order if repeat % 2 == 0 else order[::-1]:
            new_tokens.clear()
            wall, cpu = time.perf_counter(), time.process_time()
            generate(model, processor, requests, max_new_tokens=max_new, batch_size=size)
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
            made = sum(rows * new for rows, new in new_tokens)
            assert made == len(requests) * max_new, f"{made} new tokens, expected {len(requests)} x {max_new}"
        print(f"[generation {connector}:{max_new} {repeat + 1}/{args.repeats}] "
              + ", ".join(f"{k} {len(requests) / v['wall'][-1]:.2f} requests/s (CPU {v['cpu'][-1]:.2f} s)"
                          for k, v in times.items()), flush=True)  # fmt: skip
    median = {k: {c: statistics.median(v[c]) for c in ("wall", "cpu")} for k, v in times.items()}
    single, batched = median["one at a time"], median[f"batch {args.batch}"]
    return {
        "connector": connector, "parameters": params, "vocabulary": len(processor.tokenizer), "requests": len(requests),
        "prompt_tokens": [min(lengths), max(lengths)], "image_tokens": image_tokens, "new_tokens": max_new,
        "times": times, "median_s": median, "same_answers": same,
        "requests_per_s": {k: len(requests) / v["wall"] for k, v in median.items()},
        "ratio": {c: single[c] / batched[c] for c in ("wall", "cpu")},
    }  # fmt: skip


# -- (b) scoring: one run per process -----------------------------------------------------------------------------------
def score_child(spec: dict) -> dict:
    """evaluate_caption + write_results, timed end to end and per stage (functions wrapped in this process only)."""
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    import mpm.eval.caption as caption
    import mpm.eval.generative as generative
    import mpm.eval.metrics as metrics
    import mpm.eval.report as report
    from mpm.eval.languages import LANGUAGES

    imports = (time.perf_counter() - start_wall, time.process_time() - start_cpu)
    stages: dict[str, list[float]] = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                total = stages.setdefault(name, [0.0, 0.0])
                total[0] += time.perf_counter() - wall
                total[1] += time.process_time() - cpu

        return wrapper

    if not spec["profile"]:
        caption.read_captions = timed("read references", caption.read_captions)
        # the predictions route builds a Request per item for its prompt: `mpm.inference` (torch, transformers) loads
        caption.request_for_prompts = timed("request_for_prompts (import)", caption.request_for_prompts)
        generative._outputs = timed("read predictions", generative._outputs)
        generative.fidelity = timed("fidelity (lid.176)", generative.fidelity)
        metrics.CiderScorer.score = timed("cider", metrics.CiderScorer.score)
        metrics.Bleu4Scorer.score = timed("bleu4", metrics.Bleu4Scorer.score)
        metrics.cider_d = timed("cider: metric", metrics.cider_d)
        metrics.bleu4 = timed("bleu4: metric", metrics.bleu4)
        report.chart = timed("report: chart", report.chart)
    cfg = caption.CaptionEvalConfig(predictions=spec["predictions"], data=spec["captions"], langs=list(LANGUAGES),
                                    metrics=["cider", "bleu4"], output=spec["output"])  # fmt: skip

    def run():
        results, items = caption.evaluate_caption(cfg, show_progress=False)
        wall, cpu = time.perf_counter(), time.process_time()
        report.write_results(results, items, cfg.output)
        stages["report"] = [time.perf_counter() - wall, time.process_time() - cpu]
        return results, items

    wall, cpu = time.perf_counter(), time.process_time()
    if spec["profile"]:
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        results, items = profiler.runcall(run)
        profiler.dump_stats(spec["profile"])
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text).sort_stats("tottime")
        stats.print_stats(30)
        stats.sort_stats("cumulative").print_stats(45)
        Path(spec["profile"]).with_suffix(".txt").write_text(text.getvalue())
    else:
        results, items = run()
    total = (time.perf_counter() - wall, time.process_time() - cpu)
    for name in ("cider", "bleu4"):  # the scorer's time less its metric: tokenizing (and gathering references)
        if name in stages:
            metric = stages.pop(f"{name}: metric")
            stages[f"{name}: tokenize"] = [stages[name][0] - metric[0], stages[name][1] - metric[1]]
            stages[f"{name}: metric"] = metric
    if "report" in stages and "report: chart" in stages:
        stages["report: results, items, table"] = [a - b for a, b in zip(stages["report"], stages["report: chart"])]
    langs = results["languages"]
    summary = {
        "items": sum(s["items"] for s in langs.values()),
        "references": sum(len(i["references"]) for i in items),
        "in_language_items": sum(s["in_language"]["items"] for s in langs.values()),
        "cider_mean": statistics.mean(s["cider"] for s in langs.values()),
        "bleu4_mean": statistics.mean(s["bleu4"] for s in langs.values()),
        "fidelity": {k: s["fidelity"] for k, s in langs.items()},
    }
    return {"imports_s": imports, "total_s": total, "stages": stages, "summary": summary,
            "peak_rss_mb": _peak_rss_mb()}  # fmt: skip


TOP = [
    "read references",
    "request_for_prompts (import)",
    "read predictions",
    "fidelity (lid.176)",
    "cider",
    "bleu4",
    "report",
]
STAGES = ["imports", "read references", "request_for_prompts (import)", "read predictions", "fidelity (lid.176)", "cider: tokenize", "cider: metric",
          "cider", "bleu4: tokenize", "bleu4: metric", "bleu4", "report: results, items, table", "report: chart",
          "report", "other", "total (evaluate + report)"]  # fmt: skip


def stage_row(run: dict, name: str) -> list[float] | None:
    """(wall, CPU) seconds of one stage of a scoring run; "other": the total less the top-level stages."""
    if name == "imports":
        return run["imports_s"]
    if name == "total (evaluate + report)":
        return run["total_s"]
    if name == "other":
        return [run["total_s"][i] - sum(run["stages"].get(k, [0, 0])[i] for k in TOP) for i in (0, 1)]
    return run["stages"].get(name)


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env)  # fmt: skip
    if proc.returncode:
        raise SystemExit(f"scoring run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def scoring(args) -> dict:
    wall = time.perf_counter()
    captions, predictions = write_xm3600(WORK, args.images)
    print(f"(b) data: {captions} ({captions.stat().st_size / 1e6:.1f} MB), {predictions} "
          f"({predictions.stat().st_size / 1e6:.1f} MB), written in {time.perf_counter() - wall:.0f} s (once)",
          flush=True)  # fmt: skip
    runs = []
    for repeat in range(args.score_repeats):
        out = WORK / "report"
        shutil.rmtree(out, ignore_errors=True)
        spec = {"captions": str(captions), "predictions": str(predictions), "output": str(out), "profile": None}
        runs.append(run_child(spec))
        one = runs[-1]
        print(f"[scoring {repeat + 1}/{args.score_repeats}] {one['total_s'][0]:.1f} s (CPU {one['total_s'][1]:.1f} s), "
              f"imports {one['imports_s'][0]:.1f} s, peak RSS {one['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
    result = {"runs": runs, "images": args.images}
    if args.profile:
        out = WORK / "report"
        shutil.rmtree(out, ignore_errors=True)
        spec = {"captions": str(captions), "predictions": str(predictions), "output": str(out),
                "profile": str(WORK / "scoring.prof")}  # fmt: skip
        result["profile_run"] = run_child(spec)
        result["profile"] = str(WORK / "scoring.txt")
    shutil.rmtree(WORK / "report", ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--configs", default="mlp:32,resampler:32,mlp:64",
                        help="generation: CONNECTOR:MAX_NEW_TOKENS, comma-separated (the first is the headline)")  # fmt: skip
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=3, help="generation: alternating runs of each side")
    parser.add_argument("--images", type=int, default=3600, help="scoring: images (x 36 languages x 2 references)")
    parser.add_argument("--score-repeats", type=int, default=2, help="scoring: runs, each a fresh process")
    parser.add_argument("--profile", action="store_true", help="scoring: one more run under cProfile")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--skip-scoring", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(score_child(json.loads(args.child))))
        return
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                     "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                     "load_average_start": os.getloadavg()[0]}  # fmt: skip
    if not args.skip_generation:
        results["generation"] = []
        for config in args.configs.split(","):
            connector, max_new = config.split(":")
            results["generation"].append(generation(args, connector, int(max_new)))
    if not args.skip_scoring:
        results["scoring"] = scoring(args)
    results["load_average_end"] = os.getloadavg()[0]
    print(f"\nmachine: {results['machine']}, torch {torch.__version__}, {torch.get_num_threads()} torch threads; "
          f"load average {results['load_average_start']:.2f} at the start, {results['load_average_end']:.2f} at the "
          "end (other work shares the machine)")  # fmt: skip
    if results.get("generation"):
        first = results["generation"][0]
        print(
            f"\n(a) generation: {first['requests']} requests, greedy, every request to max_new_tokens; median of "
            f"{args.repeats} alternating runs of each side; ratio = batch {args.batch} / one at a time (target >= 3x)"
        )
        print(
            f"{'connector:new':<15} {'prompt':>8} {'1-at-a-time s':>14} {'CPU s':>6} {'req/s':>6} "
            f"{'batch ' + str(args.batch) + ' s':>10} {'CPU s':>6} {'req/s':>6} {'ratio':>6} {'CPU':>6} {'same':>5}"
        )
        for g in results["generation"]:
            (_, m1), (_, m8) = g["median_s"].items()
            print(
                f"{g['connector'] + ':' + str(g['new_tokens']):<15} {'-'.join(map(str, g['prompt_tokens'])):>8} "
                f"{m1['wall']:>14.2f} {m1['cpu']:>6.2f} {g['requests'] / m1['wall']:>6.2f} {m8['wall']:>10.2f} "
                f"{m8['cpu']:>6.2f} {g['requests'] / m8['wall']:>6.2f} {g['ratio']['wall']:>5.2f}x "
                f"{g['ratio']['cpu']:>5.2f}x {g['same_answers']:>5.0%}"
            )
        print(
            "(prompt: tokens per request, image tokens included; same: share of requests whose batched answer equals "
            "the one-at-a-time answer)"
        )
    if results.get("scoring", {}).get("runs"):
        s = results["scoring"]
        best = min(s["runs"], key=lambda r: r["total_s"][0])
        print(f"\n(b) scoring: {best['summary']['items']:,} outputs, {best['summary']['references']:,} references, "
              f"36 languages; {len(s['runs'])} runs (fresh processes); mean CIDEr {best['summary']['cider_mean']:.3f}, "
              f"BLEU-4 {best['summary']['bleu4_mean']:.2f}; {best['summary']['in_language_items']:,} outputs pass "
              "fidelity (the in-language set)")  # fmt: skip
        print(
            f"{'stage':<34} " + " ".join(f"{'run ' + str(i + 1) + ' s':>9} {'CPU s':>7}" for i in range(len(s["runs"])))
        )
        for name in STAGES:
            cells = []
            for r in s["runs"]:
                v = stage_row(r, name)
                cells.append(f"{v[0]:>9.2f} {v[1]:>7.2f}" if v else f"{'-':>9} {'-':>7}")
            print(f"{name:<34} " + " ".join(cells))
        print(f"target < 60 s: {'met' if best['total_s'][0] < 60 else 'NOT met'} ({best['total_s'][0]:.1f} s best run)")
    if "profile" in results.get("scoring", {}):
        s = results["scoring"]
        print(f"cProfile: {s['profile']} ({s['profile_run']['total_s'][0]:.1f} s under the profiler)")
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "bench_eval.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    print(f"\nwritten: {WORK / 'bench_eval.json'}")


if __name__ == "__main__":
    main()
