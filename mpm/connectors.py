"""Connectors: vision tokens -> LLM embeddings. Chosen by `MPMConfig.connector_type`."""

from __future__ import annotations

import torch
from torch import nn


class MLPConnector(nn.Module):
    """LLaVA's projector: Linear - GELU - Linear, applied to every patch token (names match LlavaMultiModalProjector)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden or out_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden or out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in_dim) -> (..., out_dim)
        return self.linear_2(self.act(self.linear_1(x)))


def sincos_2d(dim: int, h: int, w: int) -> torch.Tensor:
    """2D sin-cos position embedding of a (h, w) grid, row-major: (h*w, dim). Half the channels encode the row,
    half the column (MAE / MiniCPM-V `get_2d_sincos_pos_embed`)."""
    if dim % 4:
        raise ValueError(f"2D sin-cos positions need a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def encode(pos: torch.Tensor) -> torch.Tensor:  # (n,) -> (n, dim/2)
        angles = pos[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float64).repeat(h)
    return torch.cat([encode(cols), encode(rows)], dim=1).float()


class ResamplerConnector(nn.Module):
    """MiniCPM-V's resampler: `num_queries` learned queries attend once to an image's patch tokens.

    Keys are the projected patch tokens plus a 2D sin-cos embedding of each token's place in its own slice grid
    (slices have different grids); values carry no position. Padding keys are masked. LayerNorms on queries, keys
    and output, then an output projection. Heads: width / 128 as MiniCPM-V (the largest divisor of the width not
    above it, for widths such as 960).
    """

    def __init__(self, in_dim: int, out_dim: int, num_queries: int = 64):
        super().__init__()
        self.num_queries = num_queries
        self.query = nn.Parameter(torch.randn(num_queries, out_dim) * 0.02)
        self.kv_proj = nn.Linear(in_dim, out_dim, bias=False) if in_dim != out_dim else nn.Identity()
        heads = max(
            h for h in range(1, max(1, out_dim // 128) + 1) if out_dim % h == 0
        )  # width/128, or a divisor below
        self.attn = nn.MultiheadAttention(out_dim, heads, batch_first=True)
        self.ln_q, self.ln_kv, self.ln_post = nn.LayerNorm(out_dim), nn.LayerNorm(out_dim), nn.LayerNorm(out_dim)
        self.proj = nn.Parameter(out_dim**-0.5 * torch.randn(out_dim, out_dim))

    def forward(self, features: list[torch.Tensor], grids: list[tuple[int, int]]) -> torch.Tensor:
        """features[i]: (h_i * w_i, in_dim) of image i on grid (h_i, w_i) -> (len(features), num_queries, out_dim)."""
        n = max(f.shape[0] for f in features)
        dim = self.query.shape[1]
        x = torch.nn.utils.rnn.pad_sequence(features, batch_first=True)  # (B, n, in)
        x = self.ln_kv(self.kv_proj(x))
        pos = torch.zeros(len(features), n, dim, dtype=x.dtype, device=x.device)
        padding = torch.ones(len(features), n, dtype=torch.bool, device=x.device)  # True = ignore this key
        for i, ((h, w), f) in enumerate(zip(grids, features)):
            pos[i, : h * w] = sincos_2d(dim, h, w).to(x)
            padding[i, : f.shape[0]] = False
        q = self.ln_q(self.query).unsqueeze(0).expand(len(features), -1, -1)
        out, _ = self.attn(q, x + pos, x, key_padding_mask=padding, need_weights=False)
        return self.ln_post(out) @ self.proj


class BridgeConnector(nn.Module):
    """Muffin/VisCPM: `num_queries` queries in the vision tower's width (run inside the tower, see
    vision.bridge_features), then an MLP to the LLM width. Queries start as truncated normals (std 0.02); VisCPM
    seeds the first and last from BEiT-3's BOS/EOS text embeddings, which CLIP/SigLIP vision towers do not have."""

    def __init__(self, vision_dim: int, out_dim: int, num_queries: int = 64, hidden: int | None = None):
        super().__init__()
        self.queries = nn.Parameter(nn.init.trunc_normal_(torch.empty(num_queries, vision_dim), std=0.02))
        self.mlp = MLPConnector(vision_dim, out_dim, hidden)

    def forward(self, query_outputs: torch.Tensor) -> torch.Tensor:  # (B, Q, vision_dim) -> (B, Q, out_dim)
        return self.mlp(query_outputs)
