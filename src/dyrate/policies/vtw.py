"""VTW, visual tokens withdrawal (Lin et al., 2024, arXiv 2405.05803): every image token leaves the
decoder at layer K; layers >= K see text only."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy, Probe, check_layer


@dataclass(frozen=True)
class VTW(Policy):
    k: int = 16
    name = "vtw"
    prefill_ranked = True
    decode_probe = False

    def __post_init__(self):
        check_layer(self.k)

    @property
    def stages(self) -> tuple[int, ...]:
        return (self.k,)

    def keep(self, stage: int, probe: Probe, state) -> torch.Tensor | None:
        if probe.step > 0:
            return None
        return torch.zeros_like(probe.n_img)

    def static_image_tokens(self, n_img: int, n_layers: int) -> list[int]:
        return [n_img] * self.k + [0] * (n_layers - self.k)
