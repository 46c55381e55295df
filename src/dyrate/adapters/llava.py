"""Adapter for `LlavaForConditionalGeneration` (LLaVA-1.5 and any LLaVA-architecture checkpoint
whose language model is a Llama-style decoder)."""

from __future__ import annotations

import inspect

import torch

from . import IMG, INS, PAD, SYS
from .attention import install


class LlavaAdapter:
    def __init__(self, model):
        install(model)  # dyrate's attention in the language decoder (plain SDPA unless probed)
        self.model = model
        self.config = model.config
        lm = model.model.language_model
        text = model.config.get_text_config()
        self.n_layers = text.num_hidden_layers
        self.layers = lm.layers
        # transformers 5.24 renamed the decoder layer's `past_key_values=` to `cache=` (the old name
        # warns until its removal in 5.40); 5.23 knows only the old one.
        params = inspect.signature(lm.layers[0].forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._norm, self._rotary, self._head = lm.norm, lm.rotary_emb, model.lm_head
        self._embed = model.get_input_embeddings()
        self.image_token_id = model.config.image_token_id
        self.max_positions = getattr(text, "max_position_embeddings", None) or 2**31

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._embed(input_ids)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        embeds = self._embed(input_ids)  # (B, P, d)
        feats = self.model.model.get_image_features(
            pixel_values=pixel_values.to(self.model.dtype),
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            return_dict=True,
        ).pooler_output
        feats = torch.cat(list(feats), dim=0).to(embeds.device, embeds.dtype)  # (B * n_img, d)
        slots = (input_ids == self.image_token_id).unsqueeze(-1)  # (B, P, 1)
        return embeds.masked_scatter(slots, feats)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        return self._rotary(hidden, position_ids=position_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._head(self._norm(hidden)).float()

    def token_groups(self, input_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        is_img = input_ids == self.image_token_id  # (B, P)
        after_first_img = is_img.long().cumsum(1) > 0
        groups = torch.where(after_first_img, INS, SYS)  # ins after the first image token, sys before
        groups = torch.where(is_img, IMG, groups)
        return groups.masked_fill(~valid, PAD)
