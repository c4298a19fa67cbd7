"""Sharder filter blocks that need the t2i scorer: drop training pairs whose image and caption disagree.

dataproc does not import t2i, so a config names the block by its import path (every worker process can import it):

    filters:
      extra:
        - {name: "t2i.filters:ClipScoreFilter", model: OFA-Sys/chinese-clip-vit-base-patch16, min_score: 0.2}
"""

from __future__ import annotations

from dataproc.sharder.filters import Filter, Sample, register_filter
from mpm.core.errors import ConfigError
from t2i.scoring import ImageTextScorer


@register_filter
class ClipScoreFilter(Filter):
    """Rejects a pair whose image-caption cosine similarity (ImageTextScorer.score) is below `min_score`.

    Taiyi-Diffusion kept Chinese pairs whose Chinese-CLIP score was above 0.2; the right threshold depends on the
    model (SigLIP's cosines run lower), so score a sample of the data first and read it off the distribution.

    Args:
        model: folder or hub id of a CLIP / Chinese-CLIP / SigLIP model (with its tokenizer and image processor).
        min_score: the lowest cosine similarity kept, in [-1, 1]; a pair exactly at it is kept.
        device: where the model runs in each worker process; every worker loads its own copy.
    """

    name, reason, stage = "clip_score", "clip_score", "image"

    def __init__(self, model: str, min_score: float, device: str = "cpu"):
        if not isinstance(model, str) or not model:
            raise ConfigError(f"`{self.name}.model` must be a folder or hub id, got {model!r}")
        if isinstance(min_score, bool) or not isinstance(min_score, int | float) or not -1 <= min_score <= 1:
            raise ConfigError(f"`{self.name}.min_score` is a cosine similarity in [-1, 1], got {min_score!r}")
        self.model, self.min_score, self.device = model, min_score, device
        # Loaded at the first check, in the worker process that runs it: building the blocks (each worker does, and
        # so does code that only inspects a config's blocks) stays cheap, and a worker none of whose samples reach
        # the image stage never loads it.
        self.scorer: ImageTextScorer | None = None

    def check(self, sample: Sample) -> str | None:
        if self.scorer is None:
            self.scorer = ImageTextScorer(self.model, self.device, key=f"{self.name}.model")
        score = self.scorer.score([sample.image], [sample.caption])[0].item()
        if score < self.min_score:
            return f"CLIP score {score:.3f} below the minimum {self.min_score}"
        return None
