"""Adapters for the LLaVA families: `LlavaForConditionalGeneration` (LLaVA-1.5 and any
LLaVA-architecture checkpoint with a Llama-style decoder), `LlavaNextForConditionalGeneration`
(anyres crops) and `LlavaOnevisionForConditionalGeneration`.

LLaVA-NeXT / OneVision: the processor expands the image placeholder into one image token per
feature the model's `pack_image_features` returns — the base image's features, the crops' features
(unpadded) and one image-newline feature per row of the crop grid. All of them carry the image
token id, so all are `img` tokens and may be pruned; docs/models.md says why that is right.

Pre-LLM views (`image_views`): one tile per tower pass (the image, or the base image and each
crop). Which image token each tower patch becomes is read from the model's own packing, run on
patch numbers instead of features (`_slots`): unpadding, crop order and newlines exactly as the
model does them. Where OneVision resamples an image's crop features (anyres_max), its crop tokens
are no single patches and the view has no tiles."""

from __future__ import annotations

import torch

from .base import DecoderAdapter, Vision
from .vision import ImageView, Tile


def _clip_qk(layers, states, row: int):
    """q / k of a CLIP / SigLIP encoder layer for tower pass `row`, computed from that layer's input
    (`states[layer]`, normalised) as its attention does: (T, H, Dh) each."""
    def qk(layer: int):
        attn = layers[layer].self_attn
        x = layers[layer].layer_norm1(states[layer][row])  # (T, dv)
        t = x.shape[0]
        return (attn.q_proj(x).view(t, attn.num_heads, attn.head_dim),
                attn.k_proj(x).view(t, attn.num_heads, attn.head_dim))
    return qk


class _TowerViews:
    """Tower passes -> tiles, shared by the LLaVA adapters."""

    def _tower_states(self, pixels: torch.Tensor):
        """(hidden states of every layer, (N, T, dv) each; the encoder layers) for N tower passes,
        or None where the feature layer is a list (concatenated layers: no single tower space)."""
        if not isinstance(self.config.vision_feature_layer, int):
            return None
        tower = self.model.model.vision_tower
        out = tower(pixels.to(self.model.dtype), output_hidden_states=True)
        return out.hidden_states, tower.encoder.layers  # (n_layers + 1) x (N, T, dv): embeddings, then each layer

    def _feature_layer(self, n_layers: int) -> int:
        """The 0-based tower layer whose output the features are (`states[i + 1]`)."""
        return self.config.vision_feature_layer % (n_layers + 1) - 1

    def _tiles(self, states, layers, rows: range, slots: list[torch.Tensor]) -> list[Tile]:
        """One tile per tower pass in `rows`; slots[j]: (u,) image token of each patch of pass rows[j]."""
        hidden = states[self._feature_layer(len(layers)) + 1]  # (N, T, dv)
        has_cls = self.config.vision_feature_select_strategy == "default"
        return [Tile(hidden[r, 1:] if has_cls else hidden[r], s, _clip_qk(layers, states, r),
                     hidden[r, 0] if has_cls else None) for r, s in zip(rows, slots)]

    def _view(self, features, tiles, layers) -> ImageView:
        if tiles is None:
            return ImageView(features)
        n_layers = len(layers)
        return ImageView(features, tiles, n_layers, self._feature_layer(n_layers), self.model.model.multi_modal_projector)


class LlavaAdapter(_TowerViews, DecoderAdapter):
    def image_views(self, vision: Vision, tower: bool = True) -> list[ImageView]:
        """One view per image: one tile (the CLIP-style tower's pass over the image); the features
        are the projector's of that same pass, as get_image_features computes them."""
        got = self._tower_states(vision["pixel_values"]) if tower else None
        if got is None:
            return [ImageView(f) for f in self._image_features(vision)]
        states, layers = got
        n_images, t = states[0].shape[:2]
        u = t - int(self.config.vision_feature_select_strategy == "default")
        tiles = self._tiles(states, layers, range(n_images), [torch.arange(u)] * n_images)
        return [self._view(self.model.model.multi_modal_projector(tile.states), [tile], layers) for tile in tiles]

    def _image_features(self, vision: Vision):
        return self.model.model.get_image_features(
            pixel_values=vision["pixel_values"].to(self.model.dtype),
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            return_dict=True,
        ).pooler_output


class LlavaNextAdapter(_TowerViews, DecoderAdapter):
    def _image_features(self, vision: Vision):
        return self.model.model.get_image_features(
            pixel_values=vision["pixel_values"].to(self.model.dtype),
            image_sizes=vision["image_sizes"],
            vision_feature_layer=self.config.vision_feature_layer,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            return_dict=True,
            **self._extra(vision),
        ).pooler_output

    def _extra(self, vision: Vision) -> dict:
        return {"batch_num_images": vision["batch_num_images"]} if "batch_num_images" in vision else {}

    def _passes(self, vision: Vision) -> list[int]:
        """Tower passes per image: the base image and its crops (1 where OneVision gives a row of
        several images no crops), as the model's get_image_features counts them."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        sizes = vision["image_sizes"]
        patching = [True] * len(sizes)
        if "batch_num_images" in vision:
            patching = [int(n) == 1 for n in vision["batch_num_images"] for _ in range(int(n))]
        return [image_size_to_num_patches(image_size=s, grid_pinpoints=self.config.image_grid_pinpoints,
                                          patch_size=self.config.vision_config.image_size) if p else 1
                for s, p in zip(sizes, patching)]

    def _pack(self, per_image: list[torch.Tensor], vision: Vision, newline: torch.Tensor) -> list[torch.Tensor]:
        """The model's own `pack_image_features` on (passes, per_pass, c) tensors, one per image."""
        kwargs = ({"vision_aspect_ratio": self.config.vision_aspect_ratio} if hasattr(self.config, "vision_aspect_ratio")
                  else {"vision_feature_select_strategy": self.config.vision_feature_select_strategy})
        return self.model.model.pack_image_features(per_image, vision["image_sizes"], image_newline=newline, **kwargs)[0]

    def _slots(self, vision: Vision, passes: list[int], per_pass: int) -> list[torch.Tensor | None]:
        """Per image, (passes, per_pass) long: the image token each tower patch becomes (-1: dropped
        by unpadding), from the model's own packing run on patch numbers; None where the packing
        resamples the crops (OneVision anyres_max)."""
        numbers = [torch.arange(p * per_pass, dtype=torch.float64).view(p, per_pass, 1) for p in passes]
        out = []
        for p, values in zip(passes, self._pack(numbers, vision, torch.tensor([-1.0], dtype=torch.float64))):
            values = values[:, 0]  # (n,) a patch number per image token, -1 for a newline
            if not torch.equal(values, values.round()):
                out.append(None)
                continue
            slots = torch.full((p * per_pass,), -1, dtype=torch.long)
            tokens = (values >= 0).nonzero()[:, 0]
            slots[values[tokens].long()] = tokens
            out.append(slots.view(p, per_pass))
        return out

    def image_views(self, vision: Vision, tower: bool = True) -> list[ImageView]:
        """One view per image; one tile per tower pass (base image first, then the crops). With
        `tower`, one tower run gives both: the features are packed from its states as the model's
        get_image_features packs them (projector, then the model's `pack_image_features`)."""
        got = None
        if tower:
            pixels = vision["pixel_values"]
            passes = self._passes(vision)
            if pixels.dim() == 5:  # (images, max passes, C, H, W) -> the passes, in order
                pixels = torch.cat([px[:p] for px, p in zip(pixels, passes)])
            got = self._tower_states(pixels)
        if got is None:
            return [ImageView(f) for f in self._image_features(vision)]
        states, layers = got
        has_cls = self.config.vision_feature_select_strategy == "default"
        per_pass = states[0].shape[1] - int(has_cls)
        selected = states[self._feature_layer(len(layers)) + 1]  # (N, T, dv) the feature layer
        projected = self.model.model.multi_modal_projector(selected[:, 1:] if has_cls else selected)
        feats = self._pack(list(projected.split(passes)), vision, self.model.model.image_newline)
        views, start = [], 0
        for f, p, slots in zip(feats, passes, self._slots(vision, passes, per_pass)):
            tiles = None if slots is None else self._tiles(states, layers, range(start, start + p), list(slots))
            views.append(self._view(f, tiles, layers))
            start += p
        return views
