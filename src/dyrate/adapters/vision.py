"""What a pre-LLM reduction sees of one image (docs/design.md, "Stages"; docs/methods.md).

An adapter builds one `ImageView` per image: the decoder-ready features of the image's tokens, and
where the family's vision tower allows, the tower's hidden states at the feature layer, the query
and key projections of any tower layer (computed from that layer's input, as its attention does),
and the projector, so merging methods can merge in the tower's space and project afterwards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class ImageView:
    features: torch.Tensor  # (n, d) the image's tokens as the decoder would see them, in order
    hidden: torch.Tensor | None = None  # (T, dv) tower hidden states at the feature layer (class token first if has_cls)
    has_cls: bool = False  # `hidden` holds a class token at 0 that `features` leaves out
    n_tower_layers: int = 0
    feature_layer: int = -1  # the tower layer whose output `hidden` is (0-based)
    qk: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None  # layer -> (q, k), each (T, H, Dh)
    project: Callable[[torch.Tensor], torch.Tensor] | None = None  # (m, dv) tower states -> (m, d) features

    @property
    def n(self) -> int:
        return self.features.shape[0]
