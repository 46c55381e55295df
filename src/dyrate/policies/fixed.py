"""Fixed rate (the DyRate paper's FP ablation): the rate R is re-applied at every step from a fresh
probe. In `evict` mode the kept set can only shrink, so with a constant R it equals FastV; in `mask`
mode the top tokens of each step's ranking are attended, so tokens can come back."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..rates import keep_count, keep_counts
from .base import Policy, Probe, check_layer, check_rate


@dataclass(frozen=True)
class FixedRate(Policy):
    k: int = 2
    r: float = 0.5
    name = "fixed"
    decode_probe = True

    def __post_init__(self):
        check_layer(self.k)
        check_rate(self.r)

    @property
    def stages(self) -> tuple[int, ...]:
        return (self.k,)

    def keep(self, stage: int, probe: Probe, state) -> torch.Tensor | None:
        if "keep" not in state:  # the same count every step: computed once per call
            state["keep"] = keep_counts(self.r, probe.n_img)  # (B,)
        return state["keep"]

    def static_image_tokens(self, n_img: int, n_layers: int) -> list[int]:
        return [n_img] * self.k + [keep_count(self.r, n_img)] * (n_layers - self.k)
