"""Random pruning: FastV's schedule (drop a fraction R of the image tokens once, at prefill, from
layer K on) with the kept tokens drawn uniformly at random instead of ranked by attention. It is
the control that tells whether attention ranking helps at all: a model whose attention carries
information about which tokens matter should lose less under FastV than under this.

Draws come from a generator seeded with `seed`, one uniform score per image slot and row, so a
run is reproducible for the same batch; a row's draw depends on its place in the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Probe
from .fastv import FastV


@dataclass(frozen=True)
class RandomPruning(FastV):
    seed: int = 0
    name = "random"

    def scores(self, stage: int, probe: Probe, state) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        draws = torch.rand(probe.img_scores.shape, generator=gen)  # (B, S), on CPU for determinism
        return draws.to(probe.img_scores.device)
