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
grid.png. Each `mpm` command is run in this process exactly as a user would type it (its config file is written
under DIR/seed<N>/configs/ and the command printed), so the demo proves the toolkit rather than a copy of it.
Every stage is cached: a rerun, or a run that was interrupted, continues where it stopped.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mpm.core.errors import ConfigError, UserError
from mpm.demo import lm, pretrain
from mpm.demo.world import World, load_world

STAGES = ("all", "render", "pretrain-lm", "judge")
QUICK_LANGS = ("en", "zh", "de")
CONTROL_LM_STEPS = 1000  # the English-only control LM's most steps (it stops earlier once its English oracle passes)
TRAIN_SEED_BASE = 100  # training scenes of seed N are the stream world.scene(i, TRAIN_SEED_BASE + N)
RAW_PROMPT = lm.CTX_OPEN + lm.IMAGE + " " + lm.CTX_CLOSE + " {instruction}"  # the image where contexts sat
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

# Pixel space wants a cosine noise schedule (Stable Diffusion's scaled-linear one is made for latents), and 20-step
# sampling wants DPM-Solver++ rather than DDPM. Training reads only the betas, so the same file serves both.
SCHEDULER_CONFIG = {
    "_class_name": "DPMSolverMultistepScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
}


@dataclass(frozen=True)
class Sizes:
    """How much each stage does. `full` is the default run, `quick` the one tests and CI run."""

    train_images: int
    eval_images: int  # held-out scenes, each asked in every language
    paint_prompts: int  # held-out scenes drawn by the t2i model, from the prompt in every language
    lm_steps: int  # the most text-pretraining steps (it stops at the gate)
    i2t_steps: int
    control_i2t_steps: int
    t2i_steps: int
    judge_scenes: int


PRESETS = {
    "full": Sizes(8000, 300, 60, 3000, 1500, 800, 2000, 6000),
    "quick": Sizes(3000, 60, 24, 1500, 500, 300, 400, 4000),
}


@dataclass
class DemoConfig:
    output: str = ""  # the demo folder (every stage caches under it)
    stage: str = "all"  # all | render | pretrain-lm | judge
    quick: bool = False  # en, zh, de and fewer steps: a few minutes (tests, CI)
    langs: list[str] = field(default_factory=list)  # world languages (default: all; quick: en, zh, de)
    seeds: int = 1  # runs with seeds seed .. seed+seeds-1; the table shows their mean and spread
    seed: int = 0
    native: list[str] = field(default_factory=lambda: ["zh"])  # native upper bound languages; "all"; [] for none
    control: bool = True  # the English-only-LM control (i2t and t2i)
    t2i: bool = True
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
        return replace(base, **given)


# ---- the plan: stages, their budgets, the progress line ----------------------------------------------------------

# Seconds per unit on 2 CPU cores (measured; BENCHMARKS.md): what the budget printed at the start is made of.
SECONDS = {
    "lm_step_per_lang": 0.025,  # a text-pretraining step grows with the languages (longer prompts, a bigger vocab)
    "lm_step": 0.06,
    "i2t_step": 0.12,
    "t2i_step": 0.15,
    "caption": 0.02,  # one generated caption
    "paint": 0.05,  # one generated image
    "render": 0.002,
    "judge": 25.0,
}


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


def run_mpm(words: Sequence[str], show_progress: bool) -> None:
    """`mpm WORDS` in this process (mpm.cli.main), as typed; a failure stops the demo naming the command."""
    from mpm.cli import main

    argv = [*words, *([] if show_progress else ["--no-progress"])]
    status = main(argv)
    if status != 0:
        raise UserError(f"`{mpm_command(*words)}` failed (exit status {status}); fix what it says and rerun the demo")


# ---- stage bodies ------------------------------------------------------------------------------------------------


def render_training_set(world: World, langs: Sequence[str], folder: Path, n: int, seed: int) -> Path:
    """`n` scenes of the stream for training seed `seed` as PNGs, each with a json sidecar holding its caption in
    every language (`caption_<lang>`), what `mpm data shard` reads from a folder. A complete folder is kept."""
    done = folder / "render.json"
    settings = {"n": n, "seed": seed, "langs": list(langs), "size": IMAGE_SIZE}
    if done.exists() and json.loads(done.read_text(encoding="utf-8")) == settings:
        return folder
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
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
            "caption_prompts": [raw_prompt(world, lang)],
            "shuffle_buffer": 2000,
            "max_length": 64,
            "num_workers": 0,
        },  # fmt: skip
    }


def raw_prompt(world: World, lang: str) -> str:
    return RAW_PROMPT.format(instruction=world.instruction(lang))


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
        "validation": {"prompts": prompts, "every": 0, "steps": 20, "guidance_scale": 3.0, "seed": 0},
    }


def finished(run: Path) -> bool:
    return (run / "final").is_dir() and any((run / "final").iterdir())


def has_results(folder: Path) -> bool:
    return (folder / "results.json").is_file()


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
    def __init__(self, cfg: DemoConfig, log: Callable[[str], Any] = print, show_progress: bool = True):
        if not cfg.output:
            raise ConfigError("give --output DIR (the demo's folder: every stage caches under it)")
        self.cfg, self.log, self.show_progress = cfg, log, show_progress
        self.sizes = cfg.sizes()
        all_langs = load_world(None, cfg.world).languages
        langs = list(cfg.langs) or (list(QUICK_LANGS) if cfg.quick else all_langs)
        unknown = [c for c in langs if c not in all_langs]
        if unknown:
            raise ConfigError(f"--langs {unknown}: no world file for them (add configs/world/<lang>.yaml); "
                              f"known: {', '.join(all_langs)}")  # fmt: skip
        if "en" not in langs:
            raise ConfigError("--langs must include en: it is the pivot the images are described in for training")
        self.langs = ["en", *[c for c in langs if c != "en"]]
        self.world = load_world(self.langs, cfg.world)
        natives = {"all": self.langs[1:], "none": []}.get(",".join(cfg.native), list(cfg.native))
        self.natives = [c for c in natives if c in self.langs and c != "en"]
        self.dir = Path(cfg.output)
        self.seeds = [cfg.seed + k for k in range(cfg.seeds)]

    # -- paths and settings --
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

        return Step("judge: a classifier of rendered scenes", SECONDS["judge"], go,
                    f"mpm demo judge --output {self.dir}")  # fmt: skip

    def render_step(self, r: SeedRun) -> Step:
        from mpm.demo.scoring import write_eval_set

        n = self.sizes.train_images

        def go():
            render_training_set(self.world, self.langs, r.world, n, r.seed)
            write_eval_set(self.world, self.langs, self.eval_dir, n=self.sizes.eval_images,
                           image_size=IMAGE_SIZE, paint_prompts=self.sizes.paint_prompts)  # fmt: skip
            self.log(f"  {n} training scenes in {r.world}; held-out set in {self.eval_dir}")

        budget = SECONDS["render"] * (n + self.sizes.eval_images) * 2
        return Step(f"render (seed {r.seed})", budget, go,
                    f"mpm demo render --output {self.dir} --seed {r.seed}")  # fmt: skip

    def lm_steps(self, r: SeedRun) -> list[Step]:
        out = []
        for langs, folder, label in self._lms(r):
            settings = self.lm_settings(langs, r.seed)
            budget = settings.max_steps * (SECONDS["lm_step"] + SECONDS["lm_step_per_lang"] * len(langs)) * 0.6

            def go(langs=langs, folder=folder, settings=settings, control=label != "multilingual"):
                world = load_world(langs, self.cfg.world)
                result = pretrain.pretrain_lm(world, langs, folder, settings, log=self._indent)
                if control:  # it only has to be an English LM: non-English must collapse whatever its oracle
                    self.log(f"  English-only LM: oracle {_accuracy_line(result.oracle)} after {result.steps} steps")
                    return
                pretrain.check_gate(result)
                self.log(f"  text oracle passed after {result.steps} steps: {_accuracy_line(result.oracle)}")

            langs_flag = "" if label == "multilingual" else " --langs en"
            out.append(Step(f"pretrain-lm: {label} LM, text only (seed {r.seed})", budget, go,
                            f"mpm demo pretrain-lm --output {self.dir} --seed {r.seed}{langs_flag}"))  # fmt: skip
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
        if self.cfg.t2i:
            steps.append(self.t2i_step(r, r.lm, r.t2i, "t2i (English pairs, LM frozen)"))
            steps.append(self.paint_eval_step(r, r.t2i, "t2i"))
            if self.cfg.control:
                steps.append(self.t2i_step(r, r.lm_en, r.t2i_en, "t2i control (English-only LM)"))
                steps.append(self.paint_eval_step(r, r.t2i_en, "t2i_en"))
        return steps

    def shard_step(self, r: SeedRun, lang: str) -> Step:
        out = r.shards / lang
        path = r.configs / f"shard_{lang}.yaml"
        words = ["data", "shard", "--config", str(path)]

        def go():
            write_config(path, shard_config(r.world / "images", out, lang, self.sizes.train_images))
            run_mpm(words, self.show_progress)

        return Step(f"shard {lang} captions (seed {r.seed})", 0.004 * self.sizes.train_images + 5, go,
                    mpm_command(*words))  # fmt: skip

    def i2t_step(self, r: SeedRun, llm: Path, lang: str, out: Path, steps: int, label: str) -> Step:
        path = r.configs / f"{out.name}.yaml"
        words = ["train", "i2t", "--config", str(path)]

        def go():
            if finished(out):
                self.log(f"  {out}/final exists: skipped")
                return
            vision = save_vision_tower(r.vision, r.seed)
            config = i2t_config(llm, vision, r.shards / lang, out, lang, steps, r.seed, self.world)
            write_config(path, config)
            run_mpm(words, self.show_progress)

        return Step(f"{label} (seed {r.seed})", steps * SECONDS["i2t_step"], go, mpm_command(*words))

    def caption_eval_step(self, r: SeedRun, run: Path, name: str, langs: Sequence[str]) -> Step:
        out = r.eval / name
        path = r.configs / f"eval_{name}.yaml"
        words = ["eval", "caption", "--config", str(path)]

        def go():
            if has_results(out):
                self.log(f"  {out}/results.json exists: skipped")
                return
            write_config(path, {
                "model": str(run / "final"), "data": str(self.eval_dir / "captions.jsonl"),
                "images": str(self.eval_dir / "images"), "langs": list(langs),
                "prompts": str(self.eval_dir / "prompts.yaml"), "output": str(out),
                "metrics": ["world_attributes"], "batch_size": 64, "max_new_tokens": 24, "device": "cpu",
            })  # fmt: skip
            run_mpm(words, self.show_progress)

        budget = SECONDS["caption"] * self.sizes.eval_images * len(langs)
        return Step(f"eval {name}: captions in {', '.join(langs)} (seed {r.seed})", budget, go, mpm_command(*words))

    def t2i_step(self, r: SeedRun, llm: Path, out: Path, label: str) -> Step:
        path = r.configs / f"{out.name}.yaml"
        words = ["train", "t2i", "--config", str(path)]
        steps = self.sizes.t2i_steps

        def go():
            if finished(out):
                self.log(f"  {out}/final exists: skipped")
                return
            layer = self.condition_layer(llm)
            unet = write_json(r.configs / "unet_32px.json", UNET_CONFIG)
            scheduler = write_json(r.configs / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG).parent
            scene = self.world.scene(0, TRAIN_SEED_BASE + r.seed)
            prompts = [self.world.caption(scene, c, np.random.default_rng(0)) for c in self.langs]
            write_config(path, t2i_config(llm, r.shards / "en", out, steps, r.seed, layer, unet, scheduler, prompts))
            run_mpm(words, self.show_progress)

        return Step(f"{label} (seed {r.seed})", steps * SECONDS["t2i_step"], go, mpm_command(*words))

    def condition_layer(self, llm: Path) -> int:
        """The LM layer the UNet reads, chosen by a text-only measurement (lm.cross_lingual_retrieval): never by
        looking at images drawn from non-English prompts."""
        choice = pretrain.condition_layer(llm, load_world(None, self.cfg.world))
        self.log(f"  t2i conditioning: LM layer {choice['layer']} (text-only cross-lingual retrieval per layer: "
                 f"{', '.join(f'{k}: {v:.2f}' for k, v in choice['retrieval'].items())})")  # fmt: skip
        return int(choice["layer"])

    def paint_eval_step(self, r: SeedRun, run: Path, name: str) -> Step:
        out = r.eval / name
        path = r.configs / f"eval_{name}.yaml"
        words = ["eval", "paint", "--config", str(path)]

        def go():
            if has_results(out):
                self.log(f"  {out}/results.json exists: skipped")
                return
            write_config(path, {
                "model": str(run / "final"), "prompts": str(self.eval_dir / "paint_prompts.jsonl"),
                "langs": list(self.langs), "metrics": ["world_judge"],
                "metric_options": {"world_judge": {"model": str(self.judge_dir)}},
                "num_images": 1, "seed": 0, "steps": 20, "guidance": 3.0, "size": str(PAINT_SIZE),
                "batch_size": 32, "output": str(out), "device": "cpu",
            })  # fmt: skip
            run_mpm(words, self.show_progress)

        budget = SECONDS["paint"] * self.sizes.paint_prompts * len(self.langs)
        return Step(f"eval {name}: paint from prompts in {', '.join(self.langs)} (seed {r.seed})", budget, go,
                    mpm_command(*words))  # fmt: skip

    def write_results(self) -> None:
        from mpm.demo.results import collect, write_all

        results = collect(self)
        paths = write_all(results, self.dir, self)
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


def run_demo(cfg: DemoConfig, log: Callable[[str], Any] = print, show_progress: bool = True) -> Path:
    demo = Demo(cfg, log, show_progress)
    demo.run()
    return demo.dir


__all__ = ["DemoConfig", "Demo", "PRESETS", "run_demo"]
