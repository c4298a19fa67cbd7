"""`MPMForConditionalGeneration`: any vision tower + a connector + any causal LM, in Hugging Face format.

The image placeholders in `input_ids` (one `image_token_id` per visual token) are replaced by the connector's
outputs, in order, and the language model does the rest (LLaVA's scheme, so an `mlp` model without slicing is
exactly a `LlavaForConditionalGeneration`, see mpm/export.py). `pixel_values` holds every image and slice of the
batch in placeholder order: a (N, 3, H, W) tensor when all have one size, else a list of (3, H_i, W_i) tensors.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from mpm.configuration import MPMConfig
from mpm.connectors import Connector, connector_class


class MPMForConditionalGeneration(PreTrainedModel):
    config_class = MPMConfig
    base_model_prefix = "mpm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules: list[str] = []

    def __init__(self, config: MPMConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.connector = build_connector(config)
        # Trainable rows for the tokens this model added, while the LLM's embeddings are frozen (set by the
        # recipe, merged into the embeddings when the final model is saved): None outside training.
        self.added_token_embeddings: AddedTokenEmbeddings | None = None
        # The vision tower stops at the feature layer the connector reads (same features, less work); off only to
        # measure the difference (train.efficiency.vision_early_exit).
        self.vision_early_exit = True
        self.post_init()
        # post_init gathers the parts' no-split classes, some of which are not in this model (CLIPTextEmbeddings
        # for a CLIP vision tower); FSDP's auto wrap policy refuses class names it cannot find.
        present = {type(m).__name__ for m in self.modules()}
        self._no_split_modules = {name for name in self._no_split_modules or () if name in present}

    # The LM owns the embeddings; these make resize_token_embeddings, tying and generation utilities work.
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    # 1. Images -> visual tokens --------------------------------------------------------------------------------
    def image_tokens(self, pixel_values: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
        """One (tokens_i, text_hidden) tensor per image or slice, in input order."""
        images = list(pixel_values) if not isinstance(pixel_values, torch.Tensor) else list(pixel_values.unbind(0))
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)  # same size -> one vision forward
        for i, image in enumerate(images):
            groups[tuple(image.shape[-2:])].append(i)
        out: list[torch.Tensor | None] = [None] * len(images)
        dtype = next(self.vision_tower.parameters()).dtype
        for indices in groups.values():
            batch = torch.stack([images[i] for i in indices]).to(dtype)
            tokens = self.connector(self.vision_tower, batch, self.config, self.vision_early_exit)
            for i, t in zip(indices, tokens.unbind(0)):
                out[i] = t
        return out

    def embed(self, input_ids: torch.LongTensor, pixel_values=None) -> torch.Tensor:
        """Token embeddings with every image placeholder replaced by its visual token. (B, T) -> (B, T, D)."""
        embeds = self.get_input_embeddings()(input_ids)
        if self.added_token_embeddings is not None:
            embeds = self.added_token_embeddings(input_ids, embeds)
        if pixel_values is None or len(pixel_values) == 0:
            if self.training and torch.is_grad_enabled():
                # A text-only batch: touch the trainable visual parameters with weight 0, so that data parallel
                # training sees every parameter used (LLaVA does the same) and does not stop with "unused parameters".
                visual = [p for p in [*self.connector.parameters(), *self.vision_tower.parameters()] if p.requires_grad]
                if visual:
                    embeds = embeds + 0.0 * sum(p.sum() for p in visual).to(embeds.dtype)
            return embeds
        features = torch.cat(self.image_tokens(pixel_values), dim=0).to(embeds.dtype)
        mask = input_ids == self.config.image_token_id
        if int(mask.sum()) != features.shape[0]:
            raise ValueError(
                f"the text holds {int(mask.sum())} image placeholder tokens but the images give {features.shape[0]} "
                "visual tokens: build inputs with this model's MPMProcessor (same slicing, image size and connector)"
            )
        return embeds.masked_scatter(mask.unsqueeze(-1), features)

    # 2. The language model does the rest -----------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values=None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also saves the LLM's generation config (its end-of-turn tokens, e.g. Llama-3's or Gemma's eos lists)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        self.language_model.generation_config.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        with contextlib.suppress(OSError):  # saved without one: the LLM's defaults stay
            model.language_model.generation_config = GenerationConfig.from_pretrained(pretrained_model_name_or_path)
        return model

    @classmethod
    def from_parts(cls, vision, llm, tokenizer=None, connector_type: str = "mlp", **kwargs):
        """(model, processor) from a pretrained vision tower and LLM; see mpm.parts.from_parts."""
        from mpm.parts import from_parts

        return from_parts(vision, llm, tokenizer=tokenizer, connector_type=connector_type, **kwargs)

    @torch.no_grad()
    def generate(
        self, input_ids: torch.LongTensor, pixel_values=None, attention_mask: torch.Tensor | None = None, **kwargs
    ):
        """Like a causal LM's generate; returns only the new tokens (B, new)."""
        embeds = self.embed(input_ids, pixel_values)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)
        if getattr(self.vision_tower, "supports_gradient_checkpointing", False):
            self.vision_tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)


class AddedTokenEmbeddings(nn.Module):
    """Trainable embedding rows for the tokens the model added to the LLM's vocabulary (slice markers, image
    delimiters), added to the output of the frozen embedding matrix (and, when the LM head is tied to it, to the
    head's logits for those tokens): the new tokens learn in stage 1 (LLM frozen) and under LoRA, at the cost of
    K x width parameters, while the 150k-row matrix stays frozen and out of every checkpoint. `merge_into` writes
    them into the matrix."""

    def __init__(self, token_ids: list[int], width: int):
        super().__init__()
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long))
        self.delta = nn.Parameter(torch.zeros(len(token_ids), width))

    def forward(self, input_ids: torch.LongTensor, embeds: torch.Tensor) -> torch.Tensor:
        # (B, T, K) one-hot of which added token sits where, times the (K, D) rows: always computed, so that data
        # parallel training sees the parameter used in every step, even without these tokens
        match = (input_ids.unsqueeze(-1) == self.token_ids).to(embeds.dtype)
        return embeds + match @ self.delta.to(embeds.dtype)

    def attach_to_head(self, head: nn.Linear) -> None:
        """With tied embeddings the LM head's rows for these tokens are the same rows: add the delta there too
        (logits[..., token] += h . delta), so that training sees what `merge_into` will save."""
        self._hook = head.register_forward_hook(self._add_to_logits)

    def _add_to_logits(self, head, args, logits: torch.Tensor) -> torch.Tensor:
        hidden = args[0]  # (B, K, D) -> extra logits (B, K, added tokens)
        return logits.index_add(-1, self.token_ids, (hidden @ self.delta.to(hidden.dtype).T).to(logits.dtype))

    @torch.no_grad()
    def merge_into(self, embedding: nn.Embedding) -> None:
        """Write the rows into the embedding matrix (a tied head shares it) and stop adding them."""
        embedding.weight[self.token_ids] += self.delta.to(embedding.weight)
        if getattr(self, "_hook", None) is not None:
            self._hook.remove()
            self._hook = None


def build_connector(config: MPMConfig) -> Connector:
    return connector_class(config.connector_type)(config)


AutoConfig.register("mpm", MPMConfig)
AutoModel.register(MPMConfig, MPMForConditionalGeneration)
