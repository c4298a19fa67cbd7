"""Hidden states of a transformers vision tower: ViTs (CLIP, SigLIP) and convolutional towers (ResNet, ConvNeXt).

Images may be any size divisible by the patch size (slices are): ViT position embeddings are interpolated.
`hidden_states` indexing follows transformers: 0 is the input of the first block (CLIP: after its pre-norm; conv
towers: the stem's output), i is block i's output, -1 the last block's. The tower's own forward runs every block
and then its final norm and pooling head (SigLIP's attention-pooling head is a whole extra block) even when the
connector reads an earlier layer; with `early_exit` only the blocks up to that layer run, with the same result.
"""

from __future__ import annotations

import torch
from torch import nn


def has_cls_token(tower: nn.Module) -> bool:
    """CLIP prepends a class token to the patches; SigLIP does not."""
    return hasattr(getattr(tower, "embeddings", None), "class_embedding")


def blocks(tower: nn.Module) -> nn.ModuleList:
    """The tower's blocks, in order: ViT encoder layers, or conv stages."""
    encoder = tower.encoder
    return encoder.layers if hasattr(encoder, "layers") else encoder.stages


def blocks_used(tower: nn.Module, layer: int) -> int:
    """How many blocks run before hidden state `layer` (hidden_states = (input, block 1, ..., block N))."""
    return layer % (len(blocks(tower)) + 1)


def stem(tower: nn.Module) -> list[nn.Module]:
    """What runs before the first block: patch embeddings (+ CLIP's pre-norm), or a conv tower's stem."""
    names = ("embeddings", "embedder", "pre_layrnorm")
    return [getattr(tower, n) for n in names if getattr(tower, n, None) is not None]


def embed(tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Hidden state 0: the input of the first block. ViT: (B, N, D); conv: (B, C, h, w)."""
    if hasattr(tower, "embedder"):  # ResNet
        return tower.embedder(pixel_values)
    if not hasattr(tower.embeddings, "patch_embedding"):  # ConvNeXt
        return tower.embeddings(pixel_values)
    hidden = tower.embeddings(pixel_values, interpolate_pos_encoding=True)
    if hasattr(tower, "pre_layrnorm"):  # CLIP normalises the embeddings before the encoder
        hidden = tower.pre_layrnorm(hidden)
    return hidden


def hidden_state(tower: nn.Module, pixel_values: torch.Tensor, layer: int, early_exit: bool = True) -> torch.Tensor:
    """Hidden state `layer` of the tower: (B, N, D) for a ViT, (B, C, h, w) for a conv tower."""
    if not early_exit:
        kwargs = (
            {}
            if not hasattr(getattr(tower, "embeddings", None), "patch_embedding")
            else {"interpolate_pos_encoding": True}
        )
        return tower(pixel_values, output_hidden_states=True, **kwargs).hidden_states[layer]
    hidden = embed(tower, pixel_values)
    for block in blocks(tower)[: blocks_used(tower, layer)]:
        hidden = block(hidden, None) if hidden.dim() == 3 else block(hidden)  # ViT layers take an attention mask
    return hidden


def patch_features(
    tower: nn.Module, pixel_values: torch.Tensor, layer: int, select: str = "patch", early_exit: bool = True
) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, D): the tokens of hidden state `layer`, row-major over the (H/p, W/p) grid (CLIP's
    class token first, unless `select` is "patch")."""
    hidden = hidden_state(tower, pixel_values, layer, early_exit)
    if hidden.dim() == 4:  # conv: (B, C, h, w) -> (B, h*w, C)
        return hidden.flatten(2).transpose(1, 2)
    if select == "patch" and has_cls_token(tower):
        hidden = hidden[:, 1:]
    return hidden


@torch.no_grad()
def probe_patch_size(tower: nn.Module, image_size: int, layer: int) -> int:
    """Pixels per token along a side, measured with one forward pass (for conv towers, whose stride is implied)."""
    param = next(tower.parameters())
    dummy = torch.zeros(1, 3, image_size, image_size, dtype=param.dtype, device=param.device)
    tokens = patch_features(tower, dummy, layer, "full").shape[1]
    side = round(tokens**0.5)
    if side * side != tokens:
        raise ValueError(f"the vision tower gives {tokens} tokens for a square {image_size}px image: not a square grid")
    return image_size // side
