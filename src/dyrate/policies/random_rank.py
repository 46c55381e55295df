"""Random pruning: FastV's schedule (drop a fraction R of the image tokens once, at prefill, from
layer K on) with the kept tokens drawn uniformly at random instead of ranked by attention. It is
the control that tells whether attention ranking helps at all: a model whose attention carries
information about which tokens matter should lose less under FastV than under this.

Draws come from a generator seeded with `seed`, one uniform score per image slot and row, so a
run is reproducible for the same batch; a row's draw depends on its place in the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy, Probe, check_layer, check_rate, keep_count, keep_counts


@dataclass(frozen=True)
class RandomPruning(Policy):
    k: int = 2
    r: float = 0.5
    seed: int = 0
    PARAMS = ("k", "r", "seed")
    name = "random"
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

    def scores(self, stage: int, probe: Probe, state) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        draws = torch.rand(probe.img_scores.shape, generator=gen)  # (B, S), on CPU for determinism
        return draws.to(probe.img_scores.device)

    def static_image_tokens(self, n_img: int, n_layers: int) -> list[int]:
        return [n_img] * self.k + [keep_count(self.r, n_img)] * (n_layers - self.k)

    def spec(self) -> str:
        return f"random:k={self.k},r={self.r:g},seed={self.seed}"

    @classmethod
    def from_params(cls, params: dict[str, str]) -> "RandomPruning":
        return cls(k=int(params.get("k", 2)), r=float(params.get("r", 0.5)), seed=int(params.get("seed", 0)))
