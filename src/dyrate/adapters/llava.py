"""Adapters for the LLaVA families: `LlavaForConditionalGeneration` (LLaVA-1.5 and any
LLaVA-architecture checkpoint with a Llama-style decoder), `LlavaNextForConditionalGeneration`
(anyres crops) and `LlavaOnevisionForConditionalGeneration`.

LLaVA-NeXT / OneVision: the processor expands the image placeholder into one image token per
feature the model's `pack_image_features` returns — the base image's features, the crops' features
(unpadded) and one image-newline feature per row of the crop grid. All of them carry the image
token id, so all are `img` tokens and may be pruned; docs/models.md says why that is right."""

from __future__ import annotations

from .base import DecoderAdapter, Vision


class LlavaAdapter(DecoderAdapter):
    def _image_features(self, vision: Vision):
        return self.model.model.get_image_features(
            pixel_values=vision["pixel_values"].to(self.model.dtype),
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            return_dict=True,
        ).pooler_output


class LlavaNextAdapter(DecoderAdapter):
    def _image_features(self, vision: Vision):
        extra = {}
        if "batch_num_images" in vision:  # OneVision: single-image rows get anyres crops
            extra["batch_num_images"] = vision["batch_num_images"]
        return self.model.model.get_image_features(
            pixel_values=vision["pixel_values"].to(self.model.dtype),
            image_sizes=vision["image_sizes"],
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            return_dict=True,
            **extra,
        ).pooler_output
