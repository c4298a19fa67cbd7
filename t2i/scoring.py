"""Image-text scores from a CLIP-style dual encoder: ranking generated candidates, filtering training pairs, eval.

    image -> image processor -> model.get_image_features -> L2-normalise -> (D,)
    text  -> tokenizer (truncated to the text tower's positions) -> model.get_text_features -> L2-normalise -> (D,)
    score = cosine similarity of the two, in [-1, 1]

Any transformers dual encoder loads: CLIP, Chinese-CLIP (what VisCPM-Paint and Taiyi rank and filter with),
SigLIP / SigLIP 2, AltCLIP. The score returned is the plain cosine. The "CLIPScore" of papers (Hessel et al. 2021,
https://arxiv.org/abs/2104.08718) is 100 * max(cosine, 0) (or 2.5 * max(cosine, 0)); multiply when reporting
one. Thresholds are per model: Taiyi kept Chinese-CLIP pairs above 0.2, SigLIP's cosines run lower (its logit
adds a learned scale and bias), so read a model's thresholds off its own scores.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

from mpm.core.errors import ModelLoadError, model_errors


class ImageTextScorer:
    """A dual encoder, its tokenizer and its image processor, loaded from one folder or hub id.

    The tokenizer and the image processor are loaded on their own (not with AutoProcessor), so a folder whose
    tokenizer has no matching processor class (a Chinese-CLIP with a BERT tokenizer, a converted checkpoint)
    loads as well.

    Args:
        path: a folder or hub id holding the model, its tokenizer and its image processor config.
        device: where the model runs ("cpu", "cuda", "cuda:1").
        key: the config key that named `path`, for error messages.
        dtype: the model's weights; float32 by default (CPU kernels for half precision are slow or missing),
            torch.float16 / bfloat16 on a GPU halves the memory. Scores are returned in float32 either way.
    """

    def __init__(self, path: str, device: str = "cpu", key: str = "rank_with", dtype: torch.dtype = torch.float32):
        with model_errors(key, path):
            self.model = AutoModel.from_pretrained(path, dtype=dtype).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.image_processor = AutoImageProcessor.from_pretrained(path)
        if not (hasattr(self.model, "get_image_features") and hasattr(self.model, "get_text_features")):
            raise ModelLoadError(
                f"{key}={path!r} is a {type(self.model).__name__}, not an image-text dual encoder; give a CLIP, "
                "Chinese-CLIP or SigLIP model (one with get_image_features and get_text_features)"
            )
        self.device = torch.device(device)
        # Positions beyond the text tower's embeddings would fail (CLIP has 77); a tokenizer without a limit of its
        # own reports a huge model_max_length.
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        # SigLIP was trained on texts padded to max_length without a mask, and pools the last position: padding to
        # the batch's longest would change its scores with the batch. CLIP pools the end-of-text token and
        # Chinese-CLIP the first one, under the attention mask, so the shortest padding gives the same scores.
        self.padding = "max_length" if self.model.config.model_type.startswith("siglip") else True
        # The tokenizer and processor outputs each method takes: a BERT tokenizer's token_type_ids are for
        # Chinese-CLIP only, SigLIP 2's processor adds pixel_attention_mask and spatial_shapes.
        self._text_inputs = set(inspect.signature(self.model.get_text_features).parameters)
        self._image_inputs = set(inspect.signature(self.model.get_image_features).parameters)

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """(N, D) L2-normalised image features, float32 on the CPU."""
        if not images:
            raise ValueError("`images` is empty: there is nothing to encode")
        features = []
        for start in range(0, len(images), batch_size):
            batch = [im.convert("RGB") for im in images[start : start + batch_size]]  # RGBA, greyscale: 3 channels
            inputs = self.image_processor(images=batch, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items() if k in self._image_inputs}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            features.append(_normalised(self.model.get_image_features(**inputs)))
        return torch.cat(features)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """(N, D) L2-normalised text features, float32 on the CPU; texts longer than `max_length` tokens are cut."""
        if not texts:
            raise ValueError("`texts` is empty: there is nothing to encode")
        features = []
        for start in range(0, len(texts), batch_size):
            inputs = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding=self.padding,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            inputs = {k: v.to(self.device) for k, v in inputs.items() if k in self._text_inputs}
            features.append(_normalised(self.model.get_text_features(**inputs)))
        return torch.cat(features)

    def score(self, images: Sequence[Image.Image], texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """(N,) float32 on the CPU: the cosine similarity of image i and text i, in [-1, 1] (not x100, not clipped)."""
        if len(images) != len(texts):
            raise ValueError(f"`images` and `texts` pair up one to one, but there are {len(images)} and {len(texts)}")
        if not images:
            return torch.empty(0)
        return (self.encode_images(images, batch_size) * self.encode_texts(texts, batch_size)).sum(-1)

    def score_one_text(self, images: Sequence[Image.Image], text: str, batch_size: int = 32) -> torch.Tensor:
        """(N,) cosine similarity of each image with one text (encoded once)."""
        if not images:
            return torch.empty(0)
        return self.encode_images(images, batch_size) @ self.encode_texts([text])[0]


def _normalised(output) -> torch.Tensor:
    """Features from get_*_features, as (B, D) float32 on the CPU with unit L2 norm.

    transformers 4 returns the projected features as a tensor; transformers 5 returns a BaseModelOutputWithPooling
    whose `pooler_output` holds them (for CLIP the projection is applied to it; its last_hidden_state is the
    tower's, unprojected)."""
    features = output if isinstance(output, torch.Tensor) else output.pooler_output
    return torch.nn.functional.normalize(features.float(), dim=-1).cpu()


def pick_best(images: Sequence[Image.Image], prompt: str, scorer: ImageTextScorer) -> tuple[int, list[float]]:
    """The index of the image that `scorer` finds closest to `prompt` (the first of equal scores), and every
    image's score (cosine similarity), as VisCPM-Paint keeps the best of N candidates by its Chinese-CLIP score."""
    if not images:
        raise ValueError("`images` is empty: there is no candidate to pick")
    scores = scorer.score_one_text(images, prompt).tolist()
    return max(range(len(scores)), key=scores.__getitem__), scores
