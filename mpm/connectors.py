"""Connectors: images -> the LLM's input embeddings. Chosen by name (`MPMConfig.connector_type`).

A connector owns everything that depends on which connector it is: how it reads the vision tower (which hidden
state, which tokens; the bridge runs its queries through the tower itself), how many tokens an image or slice
gets, which tower modules feed it, and whether its weights are LLaVA's projector. The model, the processor, the
recipe and the export ask the connector; none of them branches on its name. Adding one is a class here (or in
your own module) under `@register_connector("name")`:

    @register_connector("mean_pool")
    class MeanPoolConnector(Connector):
        def __init__(self, config): ...
        @classmethod
        def tokens_per_image(cls, config, height, width): return 16
        def forward(self, tower, pixel_values, config, early_exit=True): ...   # (B, 16, text width)
"""

from __future__ import annotations

import copy
import importlib
from typing import ClassVar

import torch
import torch.utils.checkpoint
from torch import nn

from mpm.vision import blocks, blocks_used, embed, patch_features, stem

CONNECTORS: dict[str, type[Connector]] = {}


def register_connector(name: str):
    """Class decorator: make a Connector subclass available as `connector_type: name`."""

    def register(cls: type[Connector]) -> type[Connector]:
        cls.name = name
        CONNECTORS[name] = cls
        return cls

    return register


def connector_class(name: str) -> type[Connector]:
    """The connector registered as `name`; "package.module:Class" imports that module first (so a connector defined
    outside the project is found in any process, e.g. under torchrun or when a saved model loads)."""
    if name not in CONNECTORS and ":" in name:
        module, _, attribute = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"`connector_type` {name!r} cannot be imported: {exc}") from None
        if not (isinstance(cls, type) and issubclass(cls, Connector)):
            raise ValueError(f"`connector_type` {name!r} is not a subclass of mpm.connectors.Connector")
        CONNECTORS[name] = cls
    if name not in CONNECTORS:
        raise ValueError(
            f"`connector_type` must be one of {sorted(CONNECTORS)}, got {name!r} (a new connector is registered "
            "with mpm.connectors.register_connector, or named as package.module:Class)"
        )
    return CONNECTORS[name]


class Connector(nn.Module):
    """Base of all connectors. `config` is the model's MPMConfig."""

    name: ClassVar[str] = ""
    exports_to_llava: ClassVar[bool] = False  # its weights are exactly LLaVA's multi_modal_projector
    towers: ClassVar[tuple[str, ...]] = ("vit", "conv")  # the kinds of vision tower it can read

    @classmethod
    def check(cls, config) -> None:
        """Raise ValueError when this connector cannot work with the config (e.g. the tower kind)."""
        if config.vision_kind not in cls.towers:
            raise ValueError(
                f"the {cls.name} connector reads {' or '.join(cls.towers)} towers; {config.vision_config.model_type!r} "
                f"is a {config.vision_kind} tower: use another connector_type"
            )

    @classmethod
    def tokens_per_image(cls, config, height: int, width: int) -> int:
        """Visual tokens for one image or slice of height x width pixels."""
        raise NotImplementedError

    def forward(self, tower: nn.Module, pixel_values: torch.Tensor, config, early_exit: bool = True) -> torch.Tensor:
        """(B, 3, H, W) images of one size -> (B, tokens_per_image, text width)."""
        raise NotImplementedError

    def vision_modules(self, tower: nn.Module, config, last_n: int | None) -> list[nn.Module]:
        """The tower modules whose output reaches this connector (what `train.vision` may unfreeze): the last
        `last_n` blocks up to the feature layer, or with None all of them and the stem. Blocks past the feature
        layer, and norms or heads the connector never reads, would get no gradient (yet weight decay would move
        them), so they stay out."""
        used = blocks(tower)[: blocks_used(tower, config.vision_feature_layer)]
        if last_n is not None:
            return list(used[max(len(used) - last_n, 0) :])
        return [*used, *stem(tower)]

    def init_from_tower(self, tower: nn.Module) -> None:
        """Called once when a new model is built from pretrained parts (the bridge's experts copy the tower)."""


class Projector(nn.Module):
    """Linear - GELU - Linear (names match LlavaMultiModalProjector)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden or out_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(hidden or out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in_dim) -> (..., out_dim)
        return self.linear_2(self.act(self.linear_1(x)))


@register_connector("mlp")
class MLPConnector(Connector):
    """LLaVA's projector applied to every patch token: an `mlp` model without slicing is a LLaVA model."""

    exports_to_llava = True

    def __init__(self, config):
        super().__init__()
        self.linear_1 = nn.Linear(config.vision_width, config.connector_hidden_size or config.text_config.hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(self.linear_1.out_features, config.text_config.hidden_size)

    @classmethod
    def tokens_per_image(cls, config, height: int, width: int) -> int:
        cls_token = config.vision_feature_select == "full" and config.vision_config.model_type == "clip_vision_model"
        return (height // config.patch_size) * (width // config.patch_size) + cls_token

    def forward(self, tower, pixel_values, config, early_exit=True):
        feats = patch_features(
            tower, pixel_values, config.vision_feature_layer, config.vision_feature_select, early_exit
        )
        return self.linear_2(self.act(self.linear_1(feats)))


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


@register_connector("resampler")
class ResamplerConnector(Connector):
    """MiniCPM-V's resampler: `num_queries` learned queries attend once to an image's patch tokens.

    Keys are the projected patch tokens plus a 2D sin-cos embedding of each token's place in its own slice grid
    (slices have different grids); values carry no position. Padding keys are masked. LayerNorms on queries, keys
    and output, then an output projection. Heads: width / 128 as MiniCPM-V (the largest divisor of the width not
    above it, for widths such as 960).
    """

    def __init__(self, config):
        super().__init__()
        in_dim, out_dim, num_queries = config.vision_width, config.text_config.hidden_size, config.num_queries
        self.num_queries = num_queries
        self.query = nn.Parameter(torch.randn(num_queries, out_dim) * 0.02)
        self.kv_proj = nn.Linear(in_dim, out_dim, bias=False) if in_dim != out_dim else nn.Identity()
        heads = max(h for h in range(1, max(1, out_dim // 128) + 1) if out_dim % h == 0)
        self.attn = nn.MultiheadAttention(out_dim, heads, batch_first=True)
        self.ln_q, self.ln_kv, self.ln_post = nn.LayerNorm(out_dim), nn.LayerNorm(out_dim), nn.LayerNorm(out_dim)
        self.proj = nn.Parameter(out_dim**-0.5 * torch.randn(out_dim, out_dim))

    @classmethod
    def tokens_per_image(cls, config, height: int, width: int) -> int:
        return config.num_queries

    def forward(self, tower, pixel_values, config, early_exit=True):
        feats = patch_features(
            tower, pixel_values, config.vision_feature_layer, config.vision_feature_select, early_exit
        )
        grid = (pixel_values.shape[-2] // config.patch_size, pixel_values.shape[-1] // config.patch_size)
        if feats.shape[1] == grid[0] * grid[1] + 1:  # a CLS token ("full" selection): it has no grid place
            feats = feats[:, 1:]
        return self.resample(list(feats.unbind(0)), [grid] * feats.shape[0])

    def resample(self, features: list[torch.Tensor], grids: list[tuple[int, int]]) -> torch.Tensor:
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


class QueryExpert(nn.Module):
    """The query positions' own LayerNorms and MLP in one tower layer (BEiT-3's language expert, which Muffin's
    queries go through); the attention stays the layer's, shared with the patches."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer_norm1 = copy.deepcopy(layer.layer_norm1)
        self.mlp = copy.deepcopy(layer.mlp)
        self.layer_norm2 = copy.deepcopy(layer.layer_norm2)


@register_connector("bridge")
class BridgeConnector(Connector):
    """Muffin/VisCPM: `num_queries` learned queries appended to the patch tokens go through the tower's encoder
    layers with them; the outputs at the query positions, through an MLP to the LLM width, are the image's tokens.

    `bridge_experts: false` (default): the queries share every weight with the patches.
    `bridge_experts: true` (as Muffin built it on BEiT-3): in each layer the queries get their own LayerNorms and
    MLP (`QueryExpert`, initialised from the layer's own; one for each layer up to the feature layer), trainable with the connector while the patch path can
    stay frozen; attention is shared, so queries still read the patches.
    Queries start as truncated normals (std 0.02); VisCPM seeds the first and last from BEiT-3's BOS/EOS text
    embeddings, which CLIP/SigLIP vision towers do not have.
    """

    towers = ("vit",)

    def __init__(self, config):
        super().__init__()
        width = config.vision_width
        self.queries = nn.Parameter(nn.init.trunc_normal_(torch.empty(config.num_queries, width), std=0.02))
        self.mlp = Projector(width, config.text_config.hidden_size, config.connector_hidden_size)
        if config.bridge_experts:
            # Shaped like the tower's layers (a tower skeleton on the meta device, never allocated); the weights
            # come from `init_from_tower` (a new model) or the checkpoint (a saved one).
            from transformers import AutoModel

            self.feature_layer = config.vision_feature_layer
            with torch.device("meta"):
                layers = self._used_layers(AutoModel.from_config(config.vision_config))
            self.experts = nn.ModuleList(QueryExpert(layer) for layer in layers).to_empty(device="cpu")
            for module in self.experts.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()

    @classmethod
    def check(cls, config) -> None:
        if config.vision_kind != "vit":
            raise ValueError(
                f"the bridge connector runs its queries through a ViT encoder; {config.vision_config.model_type!r} is "
                "convolutional: use connector_type 'mlp' or 'resampler'"
            )

    @classmethod
    def tokens_per_image(cls, config, height: int, width: int) -> int:
        return config.num_queries

    def _used_layers(self, tower: nn.Module) -> nn.ModuleList:
        """The layers the queries go through: up to the feature layer (one expert each)."""
        return blocks(tower)[: blocks_used(tower, self.feature_layer)]

    def init_from_tower(self, tower: nn.Module) -> None:
        if hasattr(self, "experts"):
            self.experts = nn.ModuleList(QueryExpert(layer) for layer in self._used_layers(tower)).to(self.queries)

    def forward(self, tower, pixel_values, config, early_exit=True):
        """(B, 3, H, W), (Q, D) queries -> (B, Q, text width). Only the layers up to the feature layer run (the
        bridge always stops there: its output is the queries at that layer)."""
        patches = embed(tower, pixel_values)  # (B, N, D), after CLIP's pre-norm
        n = patches.shape[1]
        queries = self.queries.unsqueeze(0).expand(patches.shape[0], -1, -1).to(patches.dtype)
        hidden = torch.cat([patches, queries], 1)
        used = blocks_used(tower, config.vision_feature_layer)
        checkpointing = self.training and getattr(blocks(tower)[0], "gradient_checkpointing", False)
        for i, layer in enumerate(blocks(tower)[:used]):
            if not hasattr(self, "experts"):
                hidden = layer(hidden, None)  # (a GradientCheckpointingLayer: checkpointed when the tower is)
            elif checkpointing:
                hidden = torch.utils.checkpoint.checkpoint(
                    self._expert_layer, layer, self.experts[i], hidden, n, use_reentrant=False
                )
            else:
                hidden = self._expert_layer(layer, self.experts[i], hidden, n)
        if used == len(blocks(tower)):  # the last layer's output: the tower normalises it
            hidden = tower.post_layernorm(hidden)
        return self.mlp(hidden[:, n:])

    @staticmethod
    def _expert_layer(layer: nn.Module, expert: QueryExpert, hidden: torch.Tensor, n: int) -> torch.Tensor:
        """One pre-norm transformer layer where positions n: (the queries) use the expert's norms and MLP."""

        def split(x, patch_fn, query_fn):  # x: (B, N + Q, D)
            return torch.cat([patch_fn(x[:, :n]), query_fn(x[:, n:])], 1)

        normed = split(hidden, layer.layer_norm1, expert.layer_norm1)
        attended, _ = layer.self_attn(hidden_states=normed, attention_mask=None)
        hidden = hidden + attended
        return hidden + split(
            hidden, lambda x: layer.mlp(layer.layer_norm2(x)), lambda x: expert.mlp(expert.layer_norm2(x))
        )

    def vision_modules(self, tower, config, last_n):
        modules = super().vision_modules(tower, config, last_n)
        if blocks_used(tower, config.vision_feature_layer) == len(blocks(tower)):  # it normalises the last layer
            modules.append(tower.post_layernorm)
        return modules
