"""`mpm eval paint`: how well text-to-image transfers across languages, English being the pivot.

The same prompts, written in each language (parallel: one prompts line per (id, lang), the same `id` across
languages), are drawn with the same seeds (image k of every prompt seeded seed + k, so the English and the Chinese
image k of a prompt start from the same noise). Per language:

    clip_score      cosine(image, its own prompt) from a CLIP-style scorer (CLIP, Chinese-CLIP, SigLIP, ...)
    clip_score_en   cosine(image, the ENGLISH prompt of the same id): the prompts are parallel, so an English-only
                    scorer measures every language on one scale
    consistency     cosine(image features, the English image of the same id and index): how close the picture is
                    to what the English prompt drew from the same noise (scorer's image encoder, else the feature
                    model's features); not reported for English itself
    frechet         Fréchet distance between the generated images' features and a folder of reference images'
                    (feature model: CLIP / SigLIP image embeddings, or DINOv2's CLS token: FD_DINOv2 of Stein et al.
                    2023, https://arxiv.org/abs/2306.04675); replaces FID, whose libraries need torchvision
    <judge values>  every ImageJudge given (`--metric NAME` or `package.module:Class`, mpm/eval/scorers.py)

and `transfer_ratio[lang][metric] = value / English value` (for `frechet`, lower is better, so a ratio above 1 is
worse). Files under `out_dir`:

    images/{lang}/{id}-{k}.png, images/{lang}/index.jsonl    t2i.paint's layout: a rerun draws only what is missing
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

import mpm.demo.judge  # noqa: F401  registers world_judge (the miniature world of `mpm demo`)
from mpm.core.errors import ConfigError, DataError, ModelLoadError, model_errors
from mpm.core.images import open_image
from mpm.eval.data import read_jsonl
from mpm.eval.languages import parse_langs
from mpm.eval.scorers import ImageJudge, Scores, build_scorer, register_scorer
from t2i.paint import Prompt, paint
from t2i.scoring import ImageTextScorer

logger = logging.getLogger(__name__)

PIVOT = "en"  # the language every other one is compared with
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
BUILT_IN_METRICS = ("clip_score", "clip_score_en", "consistency", "frechet")
COUNTS = ("images", "prompts", "missing_en")  # per-language counts, not metrics: no transfer ratio


def read_parallel_prompts(path: str | Path) -> list[Prompt]:
    """Parallel prompts from a jsonl file, one `{"id", "lang", "prompt"}` per (id, lang): the same `id` in every
    language it is written in. Other fields of a line are kept in `Prompt.extra` and given to the image judges. (t2i.paint.read_prompts reads one language's prompts, where ids are unique.)"""
    prompts, seen = [], {}
    for number, row in read_jsonl(path):
        pid, lang, text = row.get("id"), row.get("lang"), row.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{number}: `prompt` must be a non-empty string, got {text!r}")
        if not isinstance(lang, str) or not lang.strip():
            raise DataError(f'{path}:{number}: `lang` must name the prompt\'s language (e.g. "zh"), got {lang!r}')
        if not isinstance(pid, str | int) or not str(pid) or "/" in str(pid) or str(pid).startswith("."):
            raise DataError(f"{path}:{number}: `id` {pid!r} cannot name a file; parallel prompts share one id")
        key = (str(pid), lang)
        if key in seen:
            raise DataError(f"{path}:{number}: id {key[0]!r} in {lang!r} also appears on line {seen[key]}")
        seen[key] = number
        extra = {k: v for k, v in row.items() if k not in ("id", "lang", "prompt")}  # e.g. the world's attributes
        prompts.append(Prompt(str(pid), text, lang, extra))
    return prompts


def evaluate_paint(
    pipe,
    prompts: list[Prompt],
    langs: str | Sequence[str],
    out_dir: str | Path,
    scorer_path: str | None = None,
    feature_model: str | None = None,
    reference_images: str | Path | None = None,
    num_images: int = 1,
    seed: int = 0,
    steps: int = 30,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    judges: Sequence[ImageJudge | str] = (),
    batch_size: int = 4,
    device: str = "cpu",
    encode_batch_size: int = 32,
    model: str | None = None,
    show_progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Draw `prompts` in each of `langs` with `pipe` (an MPMPaintPipeline, run where it is) and score the images.

    Args:
        prompts: parallel prompts (`read_parallel_prompts`); English ones are needed (clip_score_en, consistency)
            even when "en" is not drawn. Prompts in other languages than `langs` and English are ignored.
        scorer_path: a CLIP-style dual encoder (folder or hub id) for clip_score / clip_score_en / consistency.
        feature_model: an image model (CLIP, SigLIP, DINOv2) for `frechet`, and for consistency without a scorer.
        reference_images: a folder of reference images (searched recursively) for `frechet`.
        judges: ImageJudge instances, or their names / "package.module:Class" (built without options).
        device: where the scorer and the feature model run. `model`: what results["model"] says (default: the
            pipeline's folder).
    Returns:
        (results, per_item): results as in the module docstring, `languages[lang]` holding the metrics and the
        counts `images`, `prompts`, `missing_en` (ids without an English prompt, listed in results["missing_en"]);
        per_item one row per image: id, lang, index, prompt, image (relative to out_dir), clip_score,
        clip_score_en, consistency (None when not measured) and each judge's per-image value under its name.
    """
    # -- 1. inputs, checked before anything is drawn ------------------------------------------------------------------
    langs = parse_langs(langs if isinstance(langs, str) else ",".join(langs))  # known codes, repeats dropped
    judges = [build_scorer(j, kind="image") if isinstance(j, str) else j for j in judges]
    by_lang, english = _group_prompts(prompts, langs)
    _check_settings(num_images, reference_images, feature_model, judges, scorer_path)
    references = reference_image_paths(reference_images) if reference_images is not None else None
    if references is not None:
        for lang in langs:  # a covariance needs two images per set
            if len(by_lang[lang]) * num_images < 2:
                raise ConfigError(
                    f"frechet: language {lang!r} has {len(by_lang[lang])} prompt(s) x num_images={num_images} image(s); "
                    "a Fréchet distance needs at least 2 images per set: give more prompts or a larger num_images"
                )
    out_dir = Path(out_dir)
    notes: list[str] = []

    # -- 2. drawing (t2i.paint skips what an earlier run drew with the same settings) -----------------------------------
    rows: list[dict] = []
    for lang in langs:
        folder = out_dir / "images" / lang
        paint(pipe, by_lang[lang], folder, num_images=num_images, seed=seed, steps=steps,
              guidance_scale=guidance_scale, height=height, width=width, batch_size=batch_size,
              show_progress=show_progress)  # fmt: skip
        for p in by_lang[lang]:
            for k in range(num_images):
                image = folder / f"{p.id}-{k}.png"
                if not image.is_file():
                    raise DataError(
                        f"{folder / 'index.jsonl'} lists prompt {p.id!r} as drawn but {image.name} is missing: delete "
                        "the index to draw the language again"
                    )
                rows.append({"id": p.id, "lang": lang, "index": k, "prompt": p.prompt,
                             "image": image.relative_to(out_dir).as_posix(), "clip_score": None,
                             "clip_score_en": None, "consistency": None})  # fmt: skip
    rows_of = defaultdict(list)
    for row in rows:
        rows_of[row["lang"]].append(row)
    missing_en = {lang: [p.id for p in by_lang[lang] if p.id not in english] for lang in langs}
    for lang, ids in missing_en.items():
        if ids:
            logger.warning("%d %s prompt id(s) have no English prompt (no clip_score_en, no consistency): %s", len(ids), lang,
                           ", ".join(ids[:10]) + (" ..." if len(ids) > 10 else ""))  # fmt: skip

    # -- 3. image-text scores, image embeddings for consistency --------------------------------------------------------
    embeddings: dict[str, torch.Tensor] = {}  # lang -> (N, D) unit-norm image embeddings, in rows_of[lang] order
    if scorer_path is not None:
        scorer = ImageTextScorer(scorer_path, device, key="scorer")
        texts = sorted({row["prompt"] for row in rows} | {english[row["id"]] for row in rows if row["id"] in english})
        text_embeddings = dict(zip(texts, scorer.encode_texts(texts, encode_batch_size), strict=True))
        for lang in langs:
            embeddings[lang] = _encode_files(scorer.encode_images, out_dir, rows_of[lang], encode_batch_size)
            for row, image in zip(rows_of[lang], embeddings[lang], strict=True):
                row["clip_score"] = float(image @ text_embeddings[row["prompt"]])
                if row["id"] in english:
                    row["clip_score_en"] = float(image @ text_embeddings[english[row["id"]]])
        del scorer

    # -- 4. feature-model features: Fréchet distance to the references, consistency without a scorer -------------------
    frechet: dict[str, float] = {}
    if feature_model is not None:
        features_model = ImageFeatureModel(feature_model, device)
        features = {lang: _encode_files(features_model.encode, out_dir, rows_of[lang], encode_batch_size)
                    for lang in langs}  # fmt: skip
        if not embeddings:
            embeddings = {lang: torch.nn.functional.normalize(f, dim=-1) for lang, f in features.items()}
        if references is not None:
            reference_features = features_model.encode_paths(references, encode_batch_size)
            for lang in langs:
                frechet[lang] = frechet_distance(features[lang].numpy(), reference_features.numpy(), notes=notes)
        del features_model

    if embeddings and PIVOT in langs:
        english_image = {(row["id"], row["index"]): e for row, e in zip(rows_of[PIVOT], embeddings[PIVOT], strict=True)}
        for lang in langs:
            if lang == PIVOT:
                continue
            for row, e in zip(rows_of[lang], embeddings[lang], strict=True):
                pivot = english_image.get((row["id"], row["index"]))
                if pivot is not None:
                    row["consistency"] = float(e.double() @ pivot.double())

    # -- 5. judges -------------------------------------------------------------------------------------------------------
    judged: dict[str, dict[str, float]] = defaultdict(dict)
    judge_details: dict[str, dict] = {}
    extras = {(p.id, p.lang): p.extra for p in prompts}  # the prompt line's other fields go to the judges too
    for judge in judges:
        details = {}
        for lang in langs:
            items = [{**extras.get((r["id"], lang), {}), "id": r["id"], "lang": lang, "prompt": r["prompt"], "index": r["index"],
                      "image": str(out_dir / r["image"]), **({"prompt_en": english[r["id"]]} if r["id"] in english else {})}
                     for r in rows_of[lang]]  # fmt: skip
            images = [open_image(out_dir / r["image"]) for r in rows_of[lang]]
            scores = judge.score(images, items, lang)
            _merge_judge(judge, scores, lang, rows_of[lang], judged[lang])
            details[lang] = scores.details
        judge_details[judge.name] = {
            "class": f"{type(judge).__module__}:{type(judge).__qualname__}",
            "details": details,
        }

    # -- 6. aggregates and transfer ratios -------------------------------------------------------------------------------
    languages = {}
    for lang in langs:
        metrics = {}
        for name in ("clip_score", "clip_score_en", "consistency"):
            values = [row[name] for row in rows_of[lang] if row[name] is not None]
            if values:
                metrics[name] = float(np.mean(values))
        if lang in frechet:
            metrics["frechet"] = frechet[lang]
        metrics.update(judged[lang])
        metrics.update(images=len(rows_of[lang]), prompts=len(by_lang[lang]), missing_en=len(missing_en[lang]))
        languages[lang] = metrics
    transfer_ratio = {}
    if PIVOT in languages:
        pivot = languages[PIVOT]
        for lang in langs:
            if lang != PIVOT:
                transfer_ratio[lang] = {name: value / pivot[name] for name, value in languages[lang].items()
                                        if name not in COUNTS and pivot.get(name)}  # fmt: skip
    if any(missing_en.values()):
        notes.append("prompt ids without an English prompt have no clip_score_en or consistency: see `missing_en`")
    results = {
        "task": "paint",
        "model": model if model is not None else (getattr(pipe, "name_or_path", None) or None),
        "languages": languages,
        "transfer_ratio": transfer_ratio,
        "missing_en": {lang: ids for lang, ids in missing_en.items() if ids},
        "settings": {
            "seed": seed,
            "steps": steps,
            "guidance_scale": guidance_scale,
            "height": height,
            "width": width,
            "num_images": num_images,
            "seeds": f"image k of every prompt: seed + k = {seed}..{seed + num_images - 1}",
            "consistency_from": ("scorer" if scorer_path is not None else "feature_model") if embeddings else None,
            "reference_images": str(reference_images) if reference_images is not None else None,
            "reference_count": len(references) if references is not None else None,
        },  # fmt: skip
        "scorer": scorer_path,
        "feature_model": feature_model,
        "judges": judge_details,
        "notes": list(dict.fromkeys(notes)),
    }
    return results, rows


def _group_prompts(prompts: list[Prompt], langs: list[str]) -> tuple[dict[str, list[Prompt]], dict[str, str]]:
    """({lang: its prompts, in file order} for the requested languages, {id: English prompt})."""
    by_lang: dict[str, list[Prompt]] = defaultdict(list)
    seen = set()
    for p in prompts:
        if not p.lang:
            raise DataError(
                f"prompt id {p.id!r} has no `lang`: each line of a parallel prompts file names its language"
            )
        if (p.id, p.lang) in seen:
            raise DataError(f"prompt id {p.id!r} appears twice in {p.lang!r}; one line per (id, lang)")
        seen.add((p.id, p.lang))
        by_lang[p.lang].append(p)
    for lang in langs:
        if not by_lang.get(lang):
            raise DataError(
                f"language {lang!r} has no prompt; the prompts hold {', '.join(sorted(by_lang)) or 'none'}: add its "
                f'lines ({{"id", "lang": "{lang}", "prompt"}}) or drop it from langs'
            )
    english = {p.id: p.prompt for p in by_lang.get(PIVOT, [])}
    if not english:
        raise DataError(
            'the prompts hold no English one (lang "en"): clip_score_en and consistency compare every language with '
            "the English prompt of the same id; add them"
        )
    return {lang: by_lang[lang] for lang in langs}, english


def _check_settings(num_images, reference_images, feature_model, judges, scorer_path) -> None:
    if not isinstance(num_images, int) or num_images < 1:
        raise ConfigError(f"num_images must be a whole number >= 1, got {num_images!r}")
    if reference_images is not None and feature_model is None:
        raise ConfigError("reference_images is given without feature_model: the Fréchet distance compares the "
                          "features of a feature model (a CLIP, SigLIP or DINOv2 folder or hub id); give one")  # fmt: skip
    taken = set(BUILT_IN_METRICS) | set(COUNTS) | {"id", "lang", "index", "prompt", "image"}
    for judge in judges:
        if not isinstance(judge, ImageJudge):
            raise ConfigError(f"judge {judge!r} is not an ImageJudge (mpm.eval.scorers)")
        if judge.name == "clip_score" and scorer_path is None:
            pass  # the built-in judge stands in for the scorer: it fills the clip_score rows and value
        elif judge.name in taken:
            hint = ": it is computed with scorer already, give one of the two" if judge.name == "clip_score" else ""
            raise ConfigError(f"--metric {judge.name!r} would overwrite a value of the same name{hint}")
        taken.add(judge.name)


def _merge_judge(judge: ImageJudge, scores: Scores, lang: str, rows: list[dict], into: dict) -> None:
    if scores.per_item is not None:
        if len(scores.per_item) != len(rows):
            raise ValueError(
                f"judge {judge.name!r} returned {len(scores.per_item)} per-item values for {len(rows)} images"
            )
        for row, value in zip(rows, scores.per_item, strict=True):
            row[judge.name] = value
    for name, value in scores.values.items():
        if name in into or name in COUNTS or (name in BUILT_IN_METRICS and name != judge.name):
            raise ConfigError(f"--metric {judge.name!r} returns {name!r} for {lang!r}, a value another metric has")
        into[name] = float(value)


def _encode_files(encode, out_dir: Path, rows: list[dict], batch_size: int) -> torch.Tensor:
    """encode(images) over the rows' image files, opened a batch at a time (a large eval does not fit in memory)."""
    chunks = []
    for start in range(0, len(rows), batch_size):
        images = [open_image(out_dir / row["image"]) for row in rows[start : start + batch_size]]
        chunks.append(torch.as_tensor(encode(images, batch_size)))
    return torch.cat(chunks)


# -- image features and the Fréchet distance ---------------------------------------------------------------------------
class ImageFeatureModel:
    """Image features from any transformers image model, loaded with AutoModel + AutoImageProcessor:

        CLIP / SigLIP (any model with get_image_features)   the image embedding (projected for CLIP)
        DINOv2, ViT, CLIPVisionModel (no get_image_features)   pooler_output (DINOv2: the layer-normed CLS token),
                                                              else the first token of last_hidden_state

    Features are returned as they come (not normalised), float64 on the CPU: the Fréchet distance is computed on them.
    """

    def __init__(self, path: str, device: str = "cpu", key: str = "feature_model"):
        with model_errors(key, path):
            self.model = AutoModel.from_pretrained(path, dtype=torch.float32).to(device).eval()
            self.processor = AutoImageProcessor.from_pretrained(path)
        self.device = torch.device(device)
        self._forward = getattr(self.model, "get_image_features", None) or self.model.forward
        self._inputs = set(inspect.signature(self._forward).parameters)
        if "pixel_values" not in self._inputs:
            raise ModelLoadError(
                f"{key}={path!r} is a {type(self.model).__name__}, which takes no images; give an image model (CLIP, "
                "SigLIP, DINOv2)"
            )

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """(N, D) float64 features."""
        if not images:
            raise ValueError("`images` is empty: there is nothing to encode")
        chunks = []
        for start in range(0, len(images), batch_size):
            inputs = self.processor(images=[im.convert("RGB") for im in images[start : start + batch_size]],
                                    return_tensors="pt")  # fmt: skip
            inputs = {k: v.to(self.device) for k, v in inputs.items() if k in self._inputs}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            out = self._forward(**inputs)
            if not isinstance(out, torch.Tensor):  # transformers 5's get_image_features, or a plain forward
                pooled = getattr(out, "pooler_output", None)
                out = pooled if pooled is not None else out.last_hidden_state[:, 0]
            chunks.append(out.reshape(out.shape[0], -1).double().cpu())
        return torch.cat(chunks)

    def encode_paths(self, paths: Sequence[Path], batch_size: int = 32) -> torch.Tensor:
        return torch.cat([self.encode([open_image(p) for p in paths[s : s + batch_size]], batch_size)
                          for s in range(0, len(paths), batch_size)])  # fmt: skip


def image_features(model_path: str, images: Sequence[Image.Image | str | Path], device: str = "cpu",
                   batch_size: int = 32) -> np.ndarray:  # fmt: skip
    """(N, D) float64 features of `images` (PIL images or files) from the image model at `model_path`
    (see ImageFeatureModel)."""
    model = ImageFeatureModel(model_path, device)
    features = [model.encode([open_image(im) for im in images[s : s + batch_size]], batch_size)
                for s in range(0, len(images), batch_size)]  # fmt: skip
    return torch.cat(features).numpy()


def reference_image_paths(folder: str | Path) -> list[Path]:
    """The image files under `folder` (recursively, sorted), at least 2 of them."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"reference_images {str(folder)!r} is not a folder; give a folder of reference images")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(paths) < 2:
        raise DataError(
            f"reference_images {str(folder)!r} holds {len(paths)} image(s) ({', '.join(sorted(IMAGE_SUFFIXES))}); the "
            "Fréchet distance needs at least 2 per set (a covariance), and thousands for a stable value"
        )
    return paths


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray, notes: list[str] | None = None) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D):

        d^2 = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))

    (Dowson & Landau 1982; FID: Heusel et al. 2017, https://arxiv.org/abs/1706.08500), S the unbiased (N - 1)
    covariances, as pytorch-fid computes it. Caveats are appended to `notes`: with fewer images than dimensions the
    covariances are singular and the value is biased upward (FID needs thousands of images; compare only values
    from the same counts); a matrix square root with an imaginary part (numerically negative eigenvalues) keeps
    its real part.
    """
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with the same D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"a Fréchet distance needs at least 2 feature vectors per set (a covariance), got {len(a)} "
                         f"and {len(b)}")  # fmt: skip
    try:
        from scipy import linalg
    except ImportError:
        raise ConfigError("the Fréchet distance needs scipy: pip install scipy") from None
    notes = notes if notes is not None else []
    dim = a.shape[1]
    mu_a, mu_b = a.mean(0), b.mean(0)  # (D,)
    sigma_a, sigma_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))  # (D, D)
    if min(len(a), len(b)) <= dim:
        notes.append(
            f"frechet: {len(a)} and {len(b)} images for {dim}-dimensional features: the covariances are singular "
            "(rank < D) and the distance is biased upward with few images; compare values only between runs with the "
            "same image counts (FID-style numbers need thousands)"
        )
    with warnings.catch_warnings():  # scipy warns on singular products; the checks below decide
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(sigma_a @ sigma_b)
        if not np.isfinite(covmean).all():  # singular product: shift both covariances by eps*I (as pytorch-fid)
            offset = np.eye(dim) * 1e-6
            covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
            notes.append("frechet: the covariance product was singular; 1e-6 was added to their diagonals")
    if np.iscomplexobj(covmean):
        imaginary = float(np.abs(np.diagonal(covmean).imag).max())
        if imaginary > 1e-3:
            notes.append(f"frechet: the matrix square root had imaginary parts up to {imaginary:.2g} (numerically "
                         "negative eigenvalues, usually too few images); its real part was used")  # fmt: skip
        covmean = covmean.real
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(covmean))


# -- the built-in image judge --------------------------------------------------------------------------------------------
@register_scorer
class ClipScoreJudge(ImageJudge):
    """`--metric clip_score metric_options.clip_score.model=PATH`: cosine(image, its prompt) from a CLIP-style dual encoder
    (t2i.scoring.ImageTextScorer: CLIP, Chinese-CLIP, SigLIP, ...). Not x100 and not clipped (see t2i/scoring.py)."""

    name = "clip_score"

    def __init__(self, model: str | None = None, device: str = "cpu", batch_size: int | str = 32):
        if not model:
            raise ConfigError(
                "--metric clip_score needs metric_options.clip_score.model=PATH (a CLIP or SigLIP folder or hub id)"
            )
        self.model_path = model
        self.batch_size = int(batch_size)
        self.scorer = ImageTextScorer(model, device, key="clip_score model")

    def score(self, images: list, items: list[dict], lang: str) -> Scores:
        values = self.scorer.score(images, [item["prompt"] for item in items], self.batch_size).tolist()
        return Scores({"clip_score": float(np.mean(values)) if values else float("nan")}, per_item=values,
                      details={"model": self.model_path, "measure": "cosine(image, own prompt)"})  # fmt: skip
