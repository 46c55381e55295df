"""What a pre-LLM reduction sees of one image (docs/design.md, "Stages"; docs/methods.md).

An adapter builds one `ImageView` per image: the decoder-ready features of the image's tokens and,
where the family's vision tower allows, one `Tile` per tower pass (the whole image on LLaVA-1.5 and
Qwen2-VL; the base image and each anyres crop on LLaVA-NeXT / OneVision). A tile holds the tower's
q / k of any layer, each unit's state before the projector, and which image token each unit
becomes, so methods that read the tower's attention (VisionZip, PruMerge) and merge in the tower's
space work on every family.

A *unit* is what becomes one decoder token: a CLIP / SigLIP patch, or on Qwen2-VL a 2x2 group of
patches (the merger concatenates their normalised states). A tile's tower tokens are its class
token (if any) at index 0, then each unit's `group` tokens in unit order."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

QK = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # tower layer -> (q, k), each (T, H, Dh)


@dataclass
class Tile:
    states: torch.Tensor  # (u, du) each unit's state at the feature layer, as the projector takes it
    slots: torch.Tensor  # (u,) long: the image token (0..n-1) each unit becomes; -1 where the model drops it
    qk: QK  # q / k of a tower layer over the tile's T tower tokens (after rotary where the tower has it)
    cls_state: torch.Tensor | None = None  # (du,) the class token's state at the feature layer; None: no class token
    group: int = 1  # tower tokens per unit (Qwen2-VL: 4, one 2x2 merge group)
    windows: Callable[[int], torch.Tensor | None] | None = None  # layer -> (T,) window ids (windowed attention) or None

    @property
    def has_cls(self) -> bool:
        return self.cls_state is not None

    @property
    def units(self) -> int:
        return self.states.shape[0]


@dataclass
class ImageView:
    features: torch.Tensor  # (n, d) the image's tokens as the decoder would see them, in order
    tiles: list[Tile] = field(default_factory=list)  # the tower passes; empty: no tower internals
    n_tower_layers: int = 0
    feature_layer: int = -1  # the tower layer whose output the features are (0-based)
    project: Callable[[torch.Tensor], torch.Tensor] | None = None  # (m, du) unit states -> (m, d) features

    @property
    def n(self) -> int:
        return self.features.shape[0]
