"""`mpm demo`: the miniature world end to end, through the toolkit's own commands.

A multilingual LM that has only ever read text learns to see from English image-text pairs alone, then describes
images in every language it reads (MPM, VisCPM); the text-to-image model trained on English captions draws from
prompts in every language. The demo reproduces that claim in minutes on a CPU, with a world whose every attribute
is known, so the transfer is measured exactly. Per seed, under DIR/seed<N>/:

    stage         what runs                                   what it writes
    render        mpm demo render                             world/: training scenes, a json sidecar per image
                                                              holding its caption in every world language
    lm            mpm demo pretrain-lm                        lm/: the multilingual LM (text only, gated by the
                                                              text oracle); lm_en/: the English-only control
    shard         mpm data shard --config configs/shard_*.yaml  shards/en/ (and shards/<lang>/ for --native)
    i2t           mpm train i2t --config configs/i2t*.yaml    i2t/, i2t_en/ (control), i2t_native_<lang>/
    eval i2t      mpm eval caption --config ...               eval/i2t*/results.json (world_attributes, fidelity)
    t2i           mpm train t2i --config configs/t2i*.yaml    t2i/, t2i_en/ (control)
    eval t2i      mpm eval paint --config ...                 eval/t2i*/results.json (world_judge)

and, shared by every seed: DIR/judge/ (`mpm demo judge`, the classifier that scores the t2i images) and DIR/eval/
(the held-out renders as an `mpm eval` data file). The results are DIR/results.json, results.md, results.png and
grid.png. Each `mpm` command is run exactly as a user would type it (its config file is written under
DIR/seed<N>/configs/ and the command printed), so the demo proves the toolkit rather than a copy of it: by the
runner it is given (`mpm demo` gives the CLI's own `main`, in this process; the default is a child process, since
nothing below the CLI imports it).
Every stage is cached: a rerun, or a run that was interrupted, continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mpm.core.errors import ConfigError, UserError
from mpm.demo import lm, pretrain
from mpm.demo.scoring import MANIFEST as EVAL_MANIFEST
from mpm.demo.world import World, load_world

STAGES = ("all", "render", "pretrain-lm", "judge")
STAMP = ".demo_stamp"  # in a stage's output: the digest of the settings and inputs it was made from
QUICK_LANGS = ("en", "zh", "de")
LM_STEPS_EXPECTED = 1000  # the gate passed after 500 (3 languages) and 750 (6) steps in the measured runs
CONTROL_LM_STEPS = 1000  # the English-only control LM's most steps (it stops earlier once its English oracle passes)
TRAIN_SEED_BASE = 100  # training scenes of seed N are the stream world.scene(i, TRAIN_SEED_BASE + N)
IMAGE_SIZE = 64  # renders the image-to-text model reads
PAINT_SIZE = 32  # what the text-to-image model draws (and the judge reads)
# A pixel-space UNet for 32x32 scenes: attention (self and cross, the prompt's way in) only at the 8x8 level, where a
# one-object scene's colour, shape, size and position are all in view; attention at 32x32 made a step 15x slower on
# a CPU (BENCHMARKS.md) for nothing these scenes need.
UNET_CONFIG = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": PAINT_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 1,
    "block_out_channels": [32, 48, 64],
    "down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 128,
    "attention_head_dim": 32,
    "norm_num_groups": 8,
}

# Pixel space wants a cosine noise schedule (Stable Diffusion's scaled-linear one is made for latents), v-prediction
# (as pixel-space Imagen Video and progressive distillation use with it) and samples clipped to [-1, 1], drawn with
# 25 ancestral (DDPM) steps from the last timestep ("trailing"). Measured on English prompts of a development scene
# stream (never the eval set), 1000 training steps: epsilon + 20-step DDIM drew grainy blobs (all-correct 0.19;
# colour 0.45, size 0.57, position 0.78); epsilon + 25-step DDPM 0.34; v + 25-step DDPM 0.38 (colour 1.00, size
# 0.97, position 1.00, shape 0.39: shape is what these steps leave unlearnt). Training reads the betas and the
# prediction type, sampling the rest.
SCHEDULER_CONFIG = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    "clip_sample": True,
    "timestep_spacing": "trailing",
}
PAINT_STEPS = 25


@dataclass(frozen=True)
class Sizes:
    """How much each stage does. `full` is the default run, `quick` the one tests and CI run."""

    train_images: int
    eval_images: int  # held-out scenes, each asked in every language
    paint_prompts: int  # held-out scenes drawn by the t2i model, from the prompt in every language
    lm_steps: int  # the most text-pretraining steps (it stops at the gate)
    i2t_steps: int
    control_i2t_steps: int  # the English-only-LM control only has to show that non-English collapses
    t2i_steps: int
    control_t2i_steps: int
    judge_scenes: int
    t2i_control: bool  # the quick run leaves the t2i control out (its time goes to the i2t control)


PRESETS = {
    "full": Sizes(8000, 300, 60, 3000, 1500, 600, 1000, 300, 6000, True),
    "quick": Sizes(2000, 60, 24, 1500, 400, 150, 150, 100, 4000, False),
}


@dataclass
class DemoConfig:
    output: str = ""  # the demo folder (every stage caches under it)
    stage: str = "all"  # all | render | pretrain-lm | judge
    quick: bool = False  # en, zh, de and fewer steps: a few minutes (tests, CI)
    langs: list[str] = field(default_factory=list)  # world languages (default: all; quick: en, zh, de)
    seeds: int = 1  # runs with seeds seed .. seed+seeds-1; the table shows their mean and spread
    seed: int = 0
    native: list[str] | None = None  # native upper bound: codes, "all" or "none" (default: none)
    control: bool = True  # the English-only-LM control (i2t and t2i)
    t2i: bool = True
    align: bool = False  # alignment on English feedback (mpm.demo.align): DDPO, DDPO with LoRA, one RLAIF-V iteration
    world: str | None = None  # a folder of world files (default: configs/world)
    # sizes (0: the preset's)
    train_images: int = 0
    eval_images: int = 0
    paint_prompts: int = 0
    lm_steps: int = 0
    i2t_steps: int = 0
    t2i_steps: int = 0
    threads: int | None = None  # torch threads (default: torch's)

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ConfigError(f"unknown demo stage {self.stage!r}; stages: {', '.join(STAGES)}")
        if self.seeds < 1:
            raise ConfigError(f"--seeds must be at least 1, got {self.seeds}")
        for name in ("train_images", "eval_images", "paint_prompts", "lm_steps", "i2t_steps", "t2i_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0: the preset's), got {getattr(self, name)}")

    def sizes(self) -> Sizes:
        base = PRESETS["quick" if self.quick else "full"]
        given = {k: getattr(self, k) for k in ("train_images", "eval_images", "paint_prompts", "lm_steps",
                                               "i2t_steps", "t2i_steps") if getattr(self, k)}  # fmt: skip
        if "i2t_steps" in given:
            given["control_i2t_steps"] = min(base.control_i2t_steps, given["i2t_steps"])
        if "t2i_steps" in given:
            given["control_t2i_steps"] = min(base.control_t2i_steps, given["t2i_steps"])
        return replace(base, **given)


# ---- the plan: stages, their budgets, the progress line ----------------------------------------------------------

# Seconds per unit on 2 CPU cores (measured; BENCHMARKS.md): what the budget printed at the start is made of.
SECONDS = {
    "lm_step_per_lang": 0.012,  # a text-pretraining step grows with the languages (longer prompts, a bigger vocab)
    "lm_step": 0.045,
    "i2t_step": 0.13,
    "t2i_step": 0.35,
    "caption": 0.02,  # one generated caption
    "paint": 0.05,  # one generated image
    "render": 0.002,
    "judge": 25.0,
    "align_answer": 0.004,  # one greedy or sampled answer in a batch of 64 (alignment stage)
    "align_step": 0.03,  # a DPO step of 16 pairs (both answers, one forward pass), the vision tower training
}
ALIGN_SIZES = {"full": (400, 100, 100), "quick": (48, 12, 8)}  # feedback scenes, held-out scenes, DDPO steps


@dataclass
class Step:
    name: str
    budget: float  # seconds (estimate)
    run: Callable[[], Any]
    command: str = ""  # the `mpm` command this stage runs (or corresponds to)


class Progress:
    """One line per stage: what it does, the command, the time elapsed and the plan's estimate of what is left."""

    def __init__(self, steps: Sequence[Step], log: Callable[[str], Any]):
        self.steps, self.log = list(steps), log
        self.start = time.monotonic()
        self.timings: dict[str, float] = {}

    def table(self) -> str:
        rows = [f"  {s.name:<34} ~{_duration(s.budget)}" for s in self.steps]
        total = sum(s.budget for s in self.steps)
        return "\n".join(["plan (estimated on 2 CPU cores):", *rows, f"  {'total':<34} ~{_duration(total)}"])

    def run(self) -> None:
        self.log(self.table())
        for i, s in enumerate(self.steps):
            left = sum(x.budget for x in self.steps[i:])
            elapsed = time.monotonic() - self.start
            self.log(f"[{i + 1}/{len(self.steps)}] {s.name} ({_duration(elapsed)} elapsed, ~{_duration(left)} left)")
            if s.command:
                self.log(f"  $ {s.command}")
            began = time.monotonic()
            s.run()
            self.timings[s.name] = round(time.monotonic() - began, 1)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ---- running an `mpm` command in this process --------------------------------------------------------------------


def write_config(path: Path, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def mpm_command(*words: str) -> str:
    return "mpm " + " ".join(shlex.quote(w) for w in words)


Runner = Callable[[list[str]], int]  # runs `mpm ARGV`, returns the exit status


def subprocess_runner(argv: list[str]) -> int:
    """`python -m mpm.cli ARGV` in a child process. `mpm demo` passes the CLI's own `main` instead, which runs the
    command in this process (the same code, without a start-up per stage); nothing below the CLI imports it."""
    import subprocess
    import sys

    return subprocess.call([sys.executable, "-m", "mpm.cli", *argv])


def run_mpm(words: Sequence[str], show_progress: bool, runner: Runner = subprocess_runner) -> None:
    """`mpm WORDS`, as typed; a failure stops the demo naming the command."""
    argv = [*words, *([] if show_progress else ["--no-progress"])]
    status = runner(argv)
    if status != 0:
        raise UserError(f"`{mpm_command(*words)}` failed (exit status {status}); fix what it says and rerun the demo")


# ---- stage bodies ------------------------------------------------------------------------------------------------


def render_training_set(world: World, langs: Sequence[str], folder: Path, n: int, seed: int) -> Path:
    """`n` scenes of the stream for training seed `seed` as PNGs, each with a json sidecar holding its caption in
    every language (`caption_<lang>`), what `mpm data shard` reads from a folder. A complete folder is kept."""
    done = folder / "render.json"
    settings = {"n": n, "seed": seed, "langs": list(langs), "size": IMAGE_SIZE, "world": world_digest(world)}
    if done.exists() and json.loads(done.read_text(encoding="utf-8")) == settings:
        return folder
    done.unlink(missing_ok=True)  # written last: a folder without it is incomplete
    images = folder / "images"
    if images.exists():
        shutil.rmtree(images)  # nothing of another render may stay
    images.mkdir(parents=True)
    stream = TRAIN_SEED_BASE + seed
    for i in range(n):
        scene = world.scene(i, stream)
        rng = np.random.default_rng([stream, i, 2])
        world.render(scene, IMAGE_SIZE).save(images / f"{i:06d}.png")
        meta = {f"caption_{c}": world.caption(scene, c, rng) for c in langs}
        meta.update(scene.attributes())
        (images / f"{i:06d}.json").write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    done.write_text(json.dumps(settings), encoding="utf-8")
    return folder


def world_digest(world: World) -> str:
    """What the world files say, for cache keys: a change in a lexicon re-renders and retrains."""
    files = {c: {k: v for k, v in vars(world.langs[c]).items() if k != "path"} for c in world.languages}
    text = json.dumps(files, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def stamp_of(config: dict, inputs: Sequence[Path]) -> str:
    """A digest of a stage's settings and of the files that identify its inputs (their stamps and manifests)."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode("utf-8"))
    for path in inputs:
        h.update(str(path).encode("utf-8"))
        h.update(path.read_bytes() if path.is_file() else b"<missing>")
    return h.hexdigest()


def shard_config(images: Path, out: Path, lang: str, n: int) -> dict:
    """`mpm data shard` settings for renders: every caption kept (no language filter: a native run shards Chinese),
    no deduplication (renders of the same attributes are near duplicates by design), no resizing, lossless PNG."""
    return {
        "input": {"path": str(images), "format": "folder", "caption_col": f"caption_{lang}"},
        "output": {"path": str(out), "samples_per_shard": max(1, -(-n // 4)), "encode_format": "png"},
        "resize": {"image_size": IMAGE_SIZE, "resize_mode": "no"},
        "filters": {
            "languages": [],
            "dedup_exact": False,
            "near_duplicate_max_distance": None,
            "min_caption_chars": 1,
        },  # fmt: skip
        "executor": {"processes": 2},
        "fetch": {"threads": 4},
    }


def save_vision_tower(folder: Path, seed: int) -> Path:
    """A small convolutional tower (ResNet from a config, random weights; stage 1 trains it with the connector),
    saved as a transformers folder: what `model.vision` of an i2t config names."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(seed)
    config = ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128], depths=[1, 1, 1], layer_type="basic")
    ResNetModel(config).save_pretrained(str(folder))
    return folder


def i2t_config(llm: Path, vision: Path, shards: Path, out: Path, lang: str, steps: int, seed: int,
               world: World) -> dict:  # fmt: skip
    return {
        "model": {
            "vision": str(vision),
            "llm": str(llm),
            "connector_type": "resampler",
            "num_queries": 4,
            "image_size": IMAGE_SIZE,
            "vision_feature_layer": -1,
            "delimit_images": False,
        },  # fmt: skip
        "train": {
            "stage": "pretrain",
            "output_dir": str(out),
            "max_steps": steps,
            "batch_size": 64,
            "lr": 1.0e-3,
            "connector_lr": 1.0e-3,
            "weight_decay": 0.01,
            "warmup_steps": 50,
            "vision": "full",
            "seed": seed,
            "log_every": 50,
            "save_every": max(100, steps // 3),
            "keep_last": 1,
        },  # fmt: skip
        "data": {
            "shards": [str(shards)],
            "caption_prompts": [lm.image_prompt(world, lang)],
            "shuffle_buffer": 2000,
            "max_length": 64,
            "num_workers": 0,
        },  # fmt: skip
    }


def t2i_config(llm: Path, shards: Path, out: Path, steps: int, seed: int, layer: int, unet: Path, scheduler: Path,
               prompts: list[str]) -> dict:  # fmt: skip
    return {
        "model": {
            "llm": str(llm),
            "unet": str(unet),
            "scheduler": str(scheduler),
            "hidden_layer": layer,
            "max_length": 32,
        },  # fmt: skip
        "train": {
            "stage": "full",
            "output_dir": str(out),
            "max_steps": steps,
            "batch_size": 32,
            "lr": 1.0e-3,
            "warmup_steps": 50,
            "seed": seed,
            "log_every": 50,
            "save_every": max(100, steps // 3),
            "keep_last": 1,
            "ema": {"decay": 0.995},
        },  # fmt: skip
        # no flips: a mirrored scene would contradict "on the left"
        "data": {
            "shards": [str(shards)],
            "resolution": PAINT_SIZE,
            "random_flip": False,
            "caption_dropout": 0.1,
            "shuffle_buffer": 2000,
            "num_workers": 0,
        },  # fmt: skip
        "validation": {"prompts": prompts, "every": 0, "steps": PAINT_STEPS, "guidance_scale": 3.0, "seed": 0},
    }


# ---- the demo ----------------------------------------------------------------------------------------------------


@dataclass
class SeedRun:
    """The folders of one seed's run."""

    root: Path
    seed: int

    def __getattr__(self, name: str) -> Path:  # lm, lm_en, world, shards, vision, i2t, ..., configs
        if name.startswith("_"):
            raise AttributeError(name)
        return self.root / name


class Demo:
    def __init__(
        self,
        cfg: DemoConfig,
        log: Callable[[str], Any] = print,
        show_progress: bool = True,
        runner: Runner = subprocess_runner,
    ):
        if not cfg.output:
            raise ConfigError("give --output DIR (the demo's folder: every stage caches under it)")
        self.cfg, self.log, self.show_progress, self.runner = cfg, log, show_progress, runner
        self.sizes = cfg.sizes()
        all_langs = load_world(None, cfg.world).languages
        langs = list(cfg.langs) or (list(QUICK_LANGS) if cfg.quick else all_langs)
        unknown = [c for c in langs if c not in all_langs]
        if unknown:
            raise ConfigError(f"--langs {unknown}: no world file for them (add configs/world/<lang>.yaml); "
                              f"known: {', '.join(all_langs)}")  # fmt: skip
        if "en" not in langs or len(set(langs)) < 2:
            raise ConfigError(f"--langs {','.join(langs)}: give en (the pivot the training images are described in) "
                              "and at least one other world language")  # fmt: skip
        self.langs = ["en", *[c for c in all_langs if c in langs and c != "en"]]  # the world's order: one cache key
        self.world = load_world(self.langs, cfg.world)
        native = cfg.native if cfg.native is not None else []  # each bound costs an i2t training (~4 min)
        self.natives = {"all": self.langs[1:], "none": []}.get(",".join(native), list(native))
        wrong = [c for c in self.natives if c not in self.langs[1:]]
        if wrong:
            raise ConfigError(f"--native {','.join(wrong)}: a native upper bound needs a language of --langs other "
                              f"than en ({','.join(self.langs[1:])}), or 'all' / 'none'")  # fmt: skip
        self.dir = Path(cfg.output)
        self.seeds = [cfg.seed + k for k in range(cfg.seeds)]

    # -- paths and settings --
    def demo_command(self, stage: str, seed: int | None = None) -> str:
        """`mpm demo STAGE` with this run's settings: what reruns one stage by hand."""
        c, default = self.cfg, DemoConfig()
        words = ["demo", stage, "--output", str(self.dir)]
        if seed is not None:
            words += ["--seed", str(seed)]
        if c.quick:
            words.append("--quick")
        if c.langs:
            words += ["--langs", ",".join(self.langs)]
        if c.world:
            words += ["--world", c.world]
        for name in ("train_images", "eval_images", "paint_prompts", "lm_steps", "i2t_steps", "t2i_steps", "threads"):
            if getattr(c, name) != getattr(default, name):
                words += [f"--{name.replace('_', '-')}", str(getattr(c, name))]
        if not c.control:
            words.append("--no-control")
        return mpm_command(*words)

    def seed_run(self, seed: int) -> SeedRun:
        return SeedRun(self.dir / f"seed{seed}", seed)

    @property
    def judge_dir(self) -> Path:
        return self.dir / "judge"

    @property
    def eval_dir(self) -> Path:
        return self.dir / "eval"

    def lm_settings(self, langs: Sequence[str], seed: int) -> pretrain.PretrainSettings:
        steps = self.sizes.lm_steps if len(langs) > 1 else min(self.sizes.lm_steps, CONTROL_LM_STEPS)
        return pretrain.PretrainSettings(max_steps=steps, seed=seed, threads=self.cfg.threads)

    # -- the plan --
    def plan(self) -> list[Step]:
        stage = self.cfg.stage
        steps: list[Step] = []
        if stage in ("all", "judge"):
            steps.append(self.judge_step())
        for seed in self.seeds:
            r = self.seed_run(seed)
            if stage in ("all", "render"):
                steps.append(self.render_step(r))
            if stage in ("all", "pretrain-lm"):
                steps += self.lm_steps(r)
            if stage == "all":
                steps += self.model_steps(r)
        if stage == "all":
            steps.append(Step("results", 2.0, self.write_results))
        return steps

    def judge_step(self) -> Step:
        from mpm.demo.judge import train_judge

        def go():
            result = train_judge(self.world, self.judge_dir, resolution=PAINT_SIZE,
                                 train_scenes=self.sizes.judge_scenes, log=self._indent)  # fmt: skip
            self.log(f"  judge: {_accuracy_line(result.accuracy)} on held-out renders ({self.judge_dir})")

        return Step("judge: a classifier of rendered scenes", SECONDS["judge"], go, self.demo_command("judge"))

    def render_step(self, r: SeedRun) -> Step:
        from mpm.demo.scoring import write_eval_set

        n = self.sizes.train_images

        def go():
            render_training_set(self.world, self.langs, r.world, n, r.seed)
            write_eval_set(self.world, self.langs, self.eval_dir, n=self.sizes.eval_images,
                           image_size=IMAGE_SIZE, paint_prompts=self.sizes.paint_prompts)  # fmt: skip
            self.log(f"  {n} training scenes in {r.world}; held-out set in {self.eval_dir}")

        budget = SECONDS["render"] * (n + self.sizes.eval_images) * 2
        return Step(f"render (seed {r.seed})", budget, go, self.demo_command("render", r.seed))

    def lm_steps(self, r: SeedRun) -> list[Step]:
        out = []
        for langs, folder, label in self._lms(r):
            settings = self.lm_settings(langs, r.seed)
            expected = min(settings.max_steps, LM_STEPS_EXPECTED)  # it stops at the gate
            budget = expected * (SECONDS["lm_step"] + SECONDS["lm_step_per_lang"] * len(langs))

            def go(langs=langs, folder=folder, settings=settings, control=label != "multilingual"):
                world = load_world(langs, self.cfg.world)
                result = pretrain.pretrain_lm(world, langs, folder, settings, log=self._indent)
                if control:  # it only has to be an English LM: non-English must collapse whatever its oracle
                    self.log(f"  English-only LM: oracle {_accuracy_line(result.oracle)} after {result.steps} steps")
                    return
                pretrain.check_gate(result)
                self.log(f"  text oracle passed after {result.steps} steps: {_accuracy_line(result.oracle)}")

            out.append(Step(f"pretrain-lm: {label} LM, text only (seed {r.seed})", budget, go,
                            self.demo_command("pretrain-lm", r.seed)))  # fmt: skip
        return out

    def _lms(self, r: SeedRun) -> list[tuple[list[str], Path, str]]:
        lms = [(self.langs, r.lm, "multilingual")]
        if self.cfg.control:
            lms.append((["en"], r.lm_en, "English-only (control)"))
        return lms

    def model_steps(self, r: SeedRun) -> list[Step]:
        s = self.sizes
        steps = [self.shard_step(r, "en")] + [self.shard_step(r, c) for c in self.natives]
        steps.append(self.i2t_step(r, r.lm, "en", r.i2t, s.i2t_steps, "i2t (English pairs, LM frozen)"))
        steps.append(self.caption_eval_step(r, r.i2t, "i2t", self.langs))
        if self.cfg.control:
            steps.append(
                self.i2t_step(r, r.lm_en, "en", r.i2t_en, s.control_i2t_steps, "i2t control (English-only LM)")
            )
            steps.append(self.caption_eval_step(r, r.i2t_en, "i2t_en", self.langs))
        for c in self.natives:
            run = r.root / f"i2t_native_{c}"
            steps.append(self.i2t_step(r, r.lm, c, run, s.i2t_steps, f"i2t native upper bound ({c} pairs)"))
            steps.append(self.caption_eval_step(r, run, f"i2t_native_{c}", [c]))
        if self.cfg.align:
            steps.append(self.align_step(r))
        if self.cfg.t2i:
            steps.append(self.t2i_step(r, r.lm, r.t2i, s.t2i_steps, "t2i (English pairs, LM frozen)"))
            steps.append(self.paint_eval_step(r, r.t2i, "t2i"))
            if self.cfg.control and s.t2i_control:
                steps.append(self.t2i_step(r, r.lm_en, r.t2i_en, s.control_t2i_steps, "t2i control (English-only LM)"))
                steps.append(self.paint_eval_step(r, r.t2i_en, "t2i_en"))
        return steps

    def run_stage(self, out: Path, path: Path, config: dict, words: list[str], inputs: Sequence[Path]) -> None:
        """`mpm WORDS` with `config` written to `path`, unless `out` was made from these settings and inputs (its
        stamp says so). Output made from other settings or inputs is deleted first, so nothing stale survives; a
        run interrupted with the same settings is continued by the command itself (training resumes from its
        last checkpoint). The stamp is written last."""
        key = stamp_of(config, inputs)
        stamp = out / STAMP
        if stamp.is_file() and stamp.read_text(encoding="utf-8") == key:
            self.log(f"  {out}: already made from these settings and inputs, skipped")
            return
        text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
        previous = path.read_text(encoding="utf-8") if path.is_file() else None
        if out.exists() and (stamp.is_file() or previous != text):
            self.log(f"  {out}: made from other settings or inputs, made again")
            shutil.rmtree(out)
        write_config(path, config)
        run_mpm(words, self.show_progress, self.runner)
        stamp.write_text(key, encoding="utf-8")

    def shard_step(self, r: SeedRun, lang: str) -> Step:
        out = r.shards / lang
        path = r.configs / f"shard_{lang}.yaml"
        words = ["data", "shard", "--config", str(path)]

        def go():
            config = shard_config(r.world / "images", out, lang, self.sizes.train_images)
            self.run_stage(out, path, config, words, [r.world / "render.json"])

        return Step(f"shard {lang} captions (seed {r.seed})", 0.004 * self.sizes.train_images + 5, go,
                    mpm_command(*words))  # fmt: skip

    def i2t_step(self, r: SeedRun, llm: Path, lang: str, out: Path, steps: int, label: str) -> Step:
        path = r.configs / f"{out.name}.yaml"
        words = ["train", "i2t", "--config", str(path)]

        def go():
            vision = save_vision_tower(r.vision, r.seed)
            config = i2t_config(llm, vision, r.shards / lang, out, lang, steps, r.seed, self.world)
            inputs = [llm / pretrain.RESULT_FILE, r.shards / lang / STAMP, vision / "config.json"]
            self.run_stage(out, path, config, words, inputs)

        return Step(f"{label} (seed {r.seed})", steps * SECONDS["i2t_step"], go, mpm_command(*words))

    def caption_eval_step(self, r: SeedRun, run: Path, name: str, langs: Sequence[str]) -> Step:
        out = r.eval / name
        path = r.configs / f"eval_{name}.yaml"
        words = ["eval", "caption", "--config", str(path)]

        def go():
            config = {
                "model": str(run / "final"), "data": str(self.eval_dir / "captions.jsonl"),
                "images": str(self.eval_dir / "images"), "langs": list(langs),
                "prompts": str(self.eval_dir / "prompts.yaml"), "output": str(out),
                "metrics": ["world_attributes"], "batch_size": 64, "max_new_tokens": 24, "device": "cpu",
            }  # fmt: skip
            self.run_stage(out, path, config, words, [run / STAMP, self.eval_dir / EVAL_MANIFEST])

        budget = SECONDS["caption"] * self.sizes.eval_images * len(langs)
        return Step(f"eval {name}: captions in {', '.join(langs)} (seed {r.seed})", budget, go, mpm_command(*words))

    def align_step(self, r: SeedRun) -> Step:
        from mpm.demo.align import run_align

        feedback, heldout, steps = ALIGN_SIZES["quick" if self.cfg.quick else "full"]

        def go():
            run_align(self, r, feedback, heldout, steps)

        # answers: held-out ones before and after each variant (and RLAIF-V's own before / after), the corrections'
        # and RLAIF-V's 4 samples per feedback scene; three DPO trainings of `steps` (RLAIF-V's about as long)
        answers = heldout * len(self.langs) * 5 + feedback * 5
        budget = answers * SECONDS["align_answer"] + 3 * steps * SECONDS["align_step"]
        return Step(f"align on English feedback: DDPO, DDPO + LoRA, RLAIF-V (seed {r.seed})", budget, go,
                    self.demo_command("all", r.seed) + " --align")  # fmt: skip

    def t2i_step(self, r: SeedRun, llm: Path, out: Path, steps: int, label: str) -> Step:
        path = r.configs / f"{out.name}.yaml"
        words = ["train", "t2i", "--config", str(path)]

        def go():
            layer = self.condition_layer(llm)
            unet = write_json(r.configs / "unet_32px.json", UNET_CONFIG)
            scheduler = write_json(r.configs / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG).parent
            scene = self.world.scene(0, TRAIN_SEED_BASE + r.seed)
            prompts = [self.world.caption(scene, c, np.random.default_rng(0)) for c in self.langs]
            config = t2i_config(llm, r.shards / "en", out, steps, r.seed, layer, unet, scheduler, prompts)
            inputs = [llm / pretrain.RESULT_FILE, r.shards / "en" / STAMP, unet, scheduler / "scheduler_config.json"]
            self.run_stage(out, path, config, words, inputs)

        return Step(f"{label} (seed {r.seed})", steps * SECONDS["t2i_step"], go, mpm_command(*words))

    def condition_layer(self, llm: Path) -> int:
        """The LM layer the UNet reads, chosen by a text-only measurement (lm.cross_lingual_retrieval): never by
        looking at images drawn from non-English prompts."""
        choice = pretrain.condition_layer(llm, self.world)  # the demo's languages, for the control LM too
        self.log(f"  t2i conditioning: LM layer {choice['layer']} (text-only cross-lingual retrieval per layer: "
                 f"{', '.join(f'{k}: {v:.2f}' for k, v in choice['retrieval'].items())})")  # fmt: skip
        return int(choice["layer"])

    def paint_eval_step(self, r: SeedRun, run: Path, name: str) -> Step:
        out = r.eval / name
        path = r.configs / f"eval_{name}.yaml"
        words = ["eval", "paint", "--config", str(path)]

        def go():
            config = {
                "model": str(run / "final"), "prompts": str(self.eval_dir / "paint_prompts.jsonl"),
                "langs": list(self.langs), "metrics": ["world_judge"],
                "metric_options": {"world_judge": {"model": str(self.judge_dir)}},
                "num_images": 1, "seed": 0, "steps": PAINT_STEPS, "guidance": 3.0, "size": str(PAINT_SIZE),
                "batch_size": 32, "output": str(out), "device": "cpu",
            }  # fmt: skip
            inputs = [run / STAMP, self.eval_dir / EVAL_MANIFEST, self.judge_dir / "judge.json"]
            self.run_stage(out, path, config, words, inputs)

        budget = SECONDS["paint"] * self.sizes.paint_prompts * len(self.langs)
        return Step(f"eval {name}: paint from prompts in {', '.join(self.langs)} (seed {r.seed})", budget, go,
                    mpm_command(*words))  # fmt: skip

    def write_results(self) -> None:
        from mpm.demo.results import collect, write_all

        results = collect(self)
        paths = write_all(results, self.dir, self)
        if self.cfg.align:
            from mpm.demo.align import results_table

            per_seed = [json.loads((self.seed_run(s).root / "align" / "results.json").read_text()) for s in self.seeds]
            with open(self.dir / "results.md", "a", encoding="utf-8") as f:
                f.write("\n" + results_table(per_seed, self.langs))
            everything = json.loads((self.dir / "results.json").read_text(encoding="utf-8"))
            write_json(self.dir / "results.json", {**everything, "align": per_seed})
        self.log("")
        self.log((self.dir / "results.md").read_text(encoding="utf-8"))
        self.log("files: " + ", ".join(str(p) for p in paths))

    def _indent(self, message: str) -> None:
        self.log(f"  {message}")

    def run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.show_progress:  # also the loading / saving bars of transformers and diffusers
            import diffusers
            import transformers

            diffusers.utils.logging.disable_progress_bar()
            transformers.utils.logging.disable_progress_bar()
        if self.cfg.threads:
            import torch

            torch.set_num_threads(self.cfg.threads)
        self.log(f"mpm demo: {', '.join(self.langs)}; seeds {', '.join(map(str, self.seeds))}; "
                 f"{'quick' if self.cfg.quick else 'full'} sizes; folder {self.dir}")  # fmt: skip
        progress = Progress(self.plan(), self.log)
        self.timings = progress.timings  # the results stage writes them into results.json
        progress.run()


def write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return path


def _accuracy_line(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in values.items())


def run_demo(
    cfg: DemoConfig, log: Callable[[str], Any] = print, show_progress: bool = True, runner: Runner = subprocess_runner
) -> Path:
    demo = Demo(cfg, log, show_progress, runner)
    demo.run()
    return demo.dir


__all__ = ["DemoConfig", "Demo", "PRESETS", "run_demo"]
