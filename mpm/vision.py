"""Patch tokens from a transformers vision tower: ViTs (CLIP, SigLIP) and convolutional towers (ResNet, ConvNeXt).

Images may be any size divisible by the patch size (slices are): ViT position embeddings are interpolated.
"""

from __future__ import annotations

import torch
from torch import nn


def has_cls_token(tower: nn.Module) -> bool:
    """CLIP prepends a class token to the patches; SigLIP does not."""
    return hasattr(getattr(tower, "embeddings", None), "class_embedding")


def patch_features(tower: nn.Module, pixel_values: torch.Tensor, layer: int, select: str, kind: str) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, D): the tokens of hidden state `layer`, row-major over the (H/p, W/p) grid."""
    if kind == "conv":
        hidden = tower(pixel_values, output_hidden_states=True).hidden_states[layer]  # (B, C, h, w)
        return hidden.flatten(2).transpose(1, 2)
    hidden = tower(pixel_values, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states[layer]
    if select == "patch" and has_cls_token(tower):
        hidden = hidden[:, 1:]
    return hidden


def bridge_features(tower: nn.Module, pixel_values: torch.Tensor, queries: torch.Tensor, layer: int) -> torch.Tensor:
    """Muffin/VisCPM "bridge": learned queries appended to the patch tokens go through every encoder layer with
    them; the outputs at the query positions are the image's tokens. (B, 3, H, W), (Q, D) -> (B, Q, D)."""
    embeddings = tower.embeddings(pixel_values, interpolate_pos_encoding=True)  # (B, N, D)
    hidden = torch.cat([embeddings, queries.unsqueeze(0).expand(embeddings.shape[0], -1, -1).to(embeddings.dtype)], 1)
    if hasattr(tower, "pre_layrnorm"):  # CLIP normalises the embeddings before the encoder
        hidden = tower.pre_layrnorm(hidden)
    states = [hidden]  # as hidden_states: the encoder's input, then each layer's output
    for encoder_layer in tower.encoder.layers:
        hidden = encoder_layer(hidden, None)
        states.append(hidden)
    out = states[layer]
    if layer == -1 or layer == len(states) - 1:
        out = tower.post_layernorm(out)
    return out[:, -queries.shape[0] :]


@torch.no_grad()
def probe_patch_size(tower: nn.Module, image_size: int, layer: int, kind: str) -> int:
    """Pixels per token along a side, measured with one forward pass (for conv towers, whose stride is implied)."""
    param = next(tower.parameters())
    dummy = torch.zeros(1, 3, image_size, image_size, dtype=param.dtype, device=param.device)
    tokens = patch_features(tower, dummy, layer, "full", kind).shape[1]
    side = round(tokens**0.5)
    if side * side != tokens:
        raise ValueError(f"the vision tower gives {tokens} tokens for a square {image_size}px image: not a square grid")
    return image_size // side
