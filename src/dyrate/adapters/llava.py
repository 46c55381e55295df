"""Adapters for the LLaVA families: `LlavaForConditionalGeneration` (LLaVA-1.5 and any
LLaVA-architecture checkpoint with a Llama-style decoder), `LlavaNextForConditionalGeneration`
(anyres crops) and `LlavaOnevisionForConditionalGeneration`.

LLaVA-NeXT / OneVision: the processor expands the image placeholder into one image token per
feature the model's `pack_image_features` returns — the base image's features, the crops' features
(unpadded) and one image-newline feature per row of the crop grid. All of them carry the image
token id, so all are `img` tokens and may be pruned; docs/models.md says why that is right."""

from __future__ import annotations

from .base import DecoderAdapter, Vision
from .vision import ImageView


class LlavaAdapter(DecoderAdapter):
    def image_views(self, vision: Vision) -> list[ImageView]:
        """One view per image: the CLIP-style tower's states at the feature layer (class token at 0
        when the strategy drops it from the features), its layers' q / k, and the projector."""
        tower = self.model.model.vision_tower
        layers = tower.encoder.layers  # transformers 5: CLIPVisionModel holds the encoder directly
        out = tower(vision["pixel_values"].to(self.model.dtype), output_hidden_states=True)
        states = out.hidden_states  # (n_layers + 1) x (N, T, dv): embeddings, then each layer's output
        n_layers = len(layers)
        feature_layer = self.config.vision_feature_layer % (n_layers + 1) - 1  # 0-based layer index
        hidden = states[feature_layer + 1]  # (N, T, dv)
        has_cls = self.config.vision_feature_select_strategy == "default"
        projector = self.model.model.multi_modal_projector
        features = projector(hidden[:, 1:] if has_cls else hidden)  # (N, n, d)

        def qk_of(i):
            def qk(layer: int):
                attn = layers[layer].self_attn
                x = layers[layer].layer_norm1(states[layer][i])  # the layer's input, normalised (T, dv)
                t = x.shape[0]
                return (attn.q_proj(x).view(t, attn.num_heads, attn.head_dim),
                        attn.k_proj(x).view(t, attn.num_heads, attn.head_dim))
            return qk

        return [ImageView(features[i], hidden[i], has_cls, n_layers, feature_layer, qk_of(i), projector)
                for i in range(hidden.shape[0])]

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
