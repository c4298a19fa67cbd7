"""Drawing prompts into a folder (`mpm paint`): PNGs per prompt, a grid when several, optional best-of-N ranking.

    {out}/{id}-{k}.png         image k of prompt `id` (seeded seed + k, so each image can be redrawn alone; with
                               ranking, candidate j of image k is seeded seed + k * candidates + j)
    {out}/{id}-grid.png        the prompt's images side by side, when there are several
    {out}/{id}-scores.json     with ranking: every candidate's score and which were kept
    {out}/index.jsonl          one line per prompt drawn (id, lang, prompt, settings, images, scores): a rerun
                               skips them, and refuses an id drawn from another prompt or with other settings

Ranking is VisCPM-Paint's: draw N candidates, keep the one an image-text model (Chinese-CLIP there) scores highest.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.utils import make_image_grid
from tqdm import tqdm

from mpm.core.errors import DataError
from mpm.core.files import atomic_write_json
from t2i.scoring import pick_best

logger = logging.getLogger(__name__)


@dataclass
class Prompt:
    id: str
    prompt: str
    lang: str | None = None
    extra: dict = field(default_factory=dict, compare=False)  # the line's other fields (an image judge reads them)


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a jsonl file, one `{"id", "lang", "prompt"}` per line (id: the line number when absent)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--prompts {path}: no such file (one JSON object per line: id, lang, prompt)")
    prompts, seen = [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f'{path}:{number}: not JSON ({exc.msg}); each line is {{"id", "lang", "prompt"}}') from None
        text = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{number}: `prompt` must be a non-empty string, got {text!r}")
        pid = str(row.get("id", number))
        if not pid or "/" in pid or pid.startswith("."):
            raise DataError(f"{path}:{number}: id {pid!r} cannot name a file")
        if pid in seen:
            raise DataError(f"{path}:{number}: id {pid!r} appears twice; ids name the output files")
        seen.add(pid)
        prompts.append(Prompt(pid, text, row.get("lang")))
    if not prompts:
        raise DataError(f"{path} holds no prompt")
    return prompts


def paint(pipe, prompts: list[Prompt], out: str | Path, num_images: int = 1, seed: int = 0, steps: int = 50,
          guidance_scale: float = 7.5, height: int | None = None, width: int | None = None,
          negative_prompt: str | None = None, scorer=None, num_candidates: int = 1, batch_size: int = 4,
          show_progress: bool = True) -> list[dict]:  # fmt: skip
    """Draw every prompt not drawn yet into `out`; returns the index rows written now. With a `scorer`
    (t2i.scoring.ImageTextScorer), each kept image is the best of `num_candidates`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index = out / "index.jsonl"
    settings = {"seed": seed, "steps": steps, "guidance_scale": guidance_scale, "height": height, "width": width,
                "negative_prompt": negative_prompt, "num_images": num_images,
                "num_candidates": num_candidates if scorer is not None else None}  # fmt: skip
    done = {}
    if index.exists():
        done = {row["id"]: row for row in map(json.loads, index.read_text(encoding="utf-8").splitlines())}
    for p in prompts:  # the same id drawn from another prompt or with other settings: the files would disagree
        row = done.get(p.id)
        if row is not None and (row["prompt"] != p.prompt or row.get("settings") != settings):
            was = {"prompt": row["prompt"], **(row.get("settings") or {})}
            changed = {k: (was.get(k), v) for k, v in {"prompt": p.prompt, **settings}.items() if was.get(k) != v}
            listing = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise DataError(
                f"{out} already holds prompt id {p.id!r} drawn otherwise ({listing}): use another output folder, or "
                f"delete {index.name} and the images to draw them again"
            )
    todo = [p for p in prompts if p.id not in done]
    if len(todo) < len(prompts):
        logger.warning("%d prompt(s) already drawn in %s are skipped", len(prompts) - len(todo), out)
    per_prompt = num_images * (num_candidates if scorer is not None else 1)
    # The pipeline's own bar (sampling steps, once per batch): off with show_progress=False, and not left behind
    # under the prompts' bar.
    pipe.set_progress_bar_config(disable=not show_progress, leave=False)
    rows = []
    bar = tqdm(total=len(todo), unit=" prompts", disable=not show_progress)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        # One generator per image, seeded seed + k: image k of a prompt is the same whatever the batch.
        generators = [torch.Generator().manual_seed(seed + k) for _ in chunk for k in range(per_prompt)]
        images = pipe([p.prompt for p in chunk], negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
                      num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width,
                      num_images_per_prompt=per_prompt, generator=generators).images  # fmt: skip
        for i, p in enumerate(chunk):
            candidates = images[i * per_prompt : (i + 1) * per_prompt]
            kept, scores = candidates, None
            if scorer is not None:
                kept, scores = [], []
                for k in range(num_images):
                    group = candidates[k * num_candidates : (k + 1) * num_candidates]
                    best, group_scores = pick_best(group, p.prompt, scorer)
                    kept.append(group[best])
                    scores.append({"candidates": group_scores, "kept": best})
            rows.append(_write(out, p, kept, scores, settings))
        bar.update(len(chunk))
    bar.close()
    return rows


def _write(out: Path, p: Prompt, images, scores, settings: dict) -> dict:
    names = []
    for k, image in enumerate(images):
        image.save(out / f"{p.id}-{k}.png")
        names.append(f"{p.id}-{k}.png")
    if len(images) > 1:
        make_image_grid(images, rows=1, cols=len(images)).save(out / f"{p.id}-grid.png")
    row = {"id": p.id, "lang": p.lang, "prompt": p.prompt, "settings": settings, "images": names}
    if scores is not None:
        atomic_write_json(out / f"{p.id}-scores.json", {"prompt": p.prompt, "images": scores})
        row["scores"] = [s["candidates"][s["kept"]] for s in scores]
    with open(out / "index.jsonl", "a", encoding="utf-8") as f:  # last: a prompt counts as drawn once listed
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return row
