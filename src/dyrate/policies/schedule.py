"""Depth schedule: several stages `K1=R1,K2=R2,...`, each dropping image tokens from layer Ki on so
that a fraction Ri of *all* image tokens is gone there (rates non-decreasing with depth). Each stage
ranks the tokens the previous stage kept by the attention at its own probe layer Ki-1, at prefill;
the sets stay fixed afterwards. The DyRate paper's depth-based ablation (DP) and PDrop-like
pyramids (arXiv 2410.17247) are instances, e.g. `schedule:8=0.5,16=0.75,24=0.875`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PolicySpecError
from ..rates import keep_count, keep_counts
from .base import Policy, Probe, check_stages


@dataclass(frozen=True)
class DepthSchedule(Policy):
    steps: tuple[tuple[int, float], ...] = ((2, 0.5),)
    name = "schedule"
    decode_probe = False

    def __post_init__(self):
        check_stages("schedule", self.steps)

    @property
    def stages(self) -> tuple[int, ...]:
        return tuple(k for k, _ in self.steps)

    def keep(self, stage: int, probe: Probe, state) -> torch.Tensor | None:
        if probe.step > 0:
            return None
        r = self.steps[stage][1]
        return keep_counts(r, probe.n_img)

    def static_image_tokens(self, n_img: int, n_layers: int) -> list[int]:
        counts = [n_img] * n_layers
        for k, r in self.steps:
            for layer in range(k, n_layers):
                counts[layer] = keep_count(r, n_img)
        return counts

    def spec(self) -> str:
        return "schedule:" + ",".join(f"{k}={r:g}" for k, r in self.steps)

    @classmethod
    def params(cls) -> None:
        return None  # the keys are layers: LAYER=RATE pairs, parsed below

    @classmethod
    def from_params(cls, params: dict[str, str]) -> "DepthSchedule":
        try:
            steps = tuple((int(k), float(v)) for k, v in params.items())
        except ValueError as err:
            raise PolicySpecError(f"schedule: stages are LAYER=RATE pairs ({err})") from None
        return cls(steps=steps)
