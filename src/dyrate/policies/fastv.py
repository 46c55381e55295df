"""FastV (Chen et al., 2024, arXiv 2403.06764): at prefill, rank image tokens by the attention of the
last prompt token at layer K-1 and drop the lowest R of them from layer K on; the kept set stays
fixed for the rest of the generation."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..rates import keep_count, keep_counts
from .base import Policy, Probe, check_layer, check_rate


@dataclass(frozen=True)
class FastV(Policy):
    k: int = 2
    r: float = 0.5
    name = "fastv"
    prefill_ranked = True
    decode_probe = False

    def __post_init__(self):
        check_layer(self.k)
        check_rate(self.r)

    @property
    def stages(self) -> tuple[int, ...]:
        return (self.k,)

    def keep(self, stage: int, probe: Probe, state) -> torch.Tensor | None:
        if probe.step > 0:
            return None
        return keep_counts(self.r, probe.n_img)

    def static_image_tokens(self, n_img: int, n_layers: int) -> list[int]:
        return [n_img] * self.k + [keep_count(self.r, n_img)] * (n_layers - self.k)
