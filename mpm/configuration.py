"""`MPMConfig`: everything needed to rebuild an MPM image-to-text model (saved as config.json beside the weights)."""

from __future__ import annotations

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from mpm.connectors import connector_class

# Vision towers with patch tokens and position embeddings that can be interpolated to other image sizes.
VIT_TYPES = ("clip_vision_model", "siglip_vision_model")
# Convolutional towers: the feature map of a stage, flattened row-major, gives the tokens.
CONV_TYPES = ("resnet", "convnext", "convnextv2")
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


class MPMConfig(PreTrainedConfig):
    """Vision tower + connector + causal LM.

    Args (besides the two sub-configs):
        connector_type: a registered connector (mpm.connectors): "mlp" (LLaVA: Linear-GELU-Linear over patch
            tokens), "resampler" (MiniCPM-V: learned queries, one cross-attention layer with 2D sin-cos key
            positions) or "bridge" (Muffin/VisCPM: learned queries appended to the patch tokens inside the vision
            encoder; only their outputs are kept).
        num_queries: tokens per image (or slice) for the resampler and the bridge.
        bridge_experts: the bridge's queries get their own LayerNorms and MLP in each tower layer (Muffin).
        connector_hidden_size: hidden width of the MLP (default: the LLM's hidden size).
        vision_feature_layer: which hidden state of the vision tower feeds the connector (-2: the penultimate).
        vision_feature_select: "patch" drops a CLS token where the tower has one; "full" keeps every token.
        image_size: side of the square input when slicing is off (default: the vision tower's image_size).
        patch_size: pixels per feature token along each side (ViT patch, or a conv tower's total stride).
        use_slicing / max_slices / scale_resolution: MiniCPM-V adaptive high-resolution slicing.
        delimit_images: wrap each image's placeholders (its overview and slices) in image_start_token ...
            image_end_token, so that several images in one message stay apart (MiniCPM-V does the same). Off in
            the plain LLaVA layout, which `mpm export llava` needs; `from_parts` turns it on for other models.
        *_token_id: set when the tokens are added to a tokenizer.
    """

    model_type = "mpm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    connector_type: str = "mlp"
    num_queries: int = 64
    bridge_experts: bool = False
    connector_hidden_size: int | None = None
    vision_feature_layer: int = -2
    vision_feature_select: str = "patch"
    image_size: int | None = None
    patch_size: int | None = None
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    use_slicing: bool = False
    max_slices: int = 9
    scale_resolution: int = 448
    delimit_images: bool = False
    image_token: str = "<image>"
    slice_start_token: str = "<slice>"
    slice_end_token: str = "</slice>"
    image_start_token: str = "<image_start>"
    image_end_token: str = "<image_end>"
    image_token_id: int | None = None
    slice_start_token_id: int | None = None
    slice_end_token_id: int | None = None
    image_start_token_id: int | None = None
    image_end_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.vision_feature_select not in ("patch", "full"):
            raise ValueError(f"`vision_feature_select` must be 'patch' or 'full', got {self.vision_feature_select!r}")
        vision_type = self.vision_config.model_type
        if vision_type not in VIT_TYPES + CONV_TYPES:
            raise ValueError(
                f"vision towers of type {vision_type!r} are not supported; use one of {VIT_TYPES + CONV_TYPES}"
            )
        connector_class(self.connector_type).check(self)  # the connector's own requirements (e.g. a ViT)
        vc = self.vision_config
        layers = len(vc.depths) if hasattr(vc, "depths") else vc.num_hidden_layers  # hidden states: layers + 1
        if not -(layers + 1) <= self.vision_feature_layer <= layers:
            raise ValueError(
                f"`vision_feature_layer` {self.vision_feature_layer} is outside the {vision_type} tower's hidden states "
                f"(-{layers + 1}..{layers}: 0 is the input of the first layer, -1 the last layer's output)"
            )
        if self.image_size is None:
            self.image_size = getattr(self.vision_config, "image_size", None) or 224
        if self.patch_size is None and vision_type in VIT_TYPES:
            self.patch_size = self.vision_config.patch_size
        if self.image_mean is None:
            self.image_mean, self.image_std = list(CLIP_MEAN), list(CLIP_STD)
        # As LlavaConfig: the LM's own tying decides (a tied LM saved untied would lose its head).
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    @property
    def added_tokens(self) -> list[str]:
        """The tokens this model adds to the LLM's tokenizer."""
        tokens = [self.image_token, self.slice_start_token, self.slice_end_token]
        return tokens + ([self.image_start_token, self.image_end_token] if self.delimit_images else [])

    @property
    def vision_kind(self) -> str:
        return "vit" if self.vision_config.model_type in VIT_TYPES else "conv"

    @property
    def vision_width(self) -> int:
        """Channels of the vision hidden state the connector reads."""
        vc = self.vision_config
        if hasattr(vc, "hidden_sizes"):  # conv towers: hidden_states = (stem output, stage 1, ..., stage N)
            stem = getattr(vc, "embedding_size", vc.hidden_sizes[0])
            return [stem, *vc.hidden_sizes][self.vision_feature_layer]
        return vc.hidden_size
