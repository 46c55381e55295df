"""`none`: no pruning. `none:k=K` also probes layer K-1 every step (for attention analysis) but keeps
every image token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Policy, Probe, check_layer


@dataclass(frozen=True)
class NoPruning(Policy):
    k: int | None = None
    name = "none"

    def __post_init__(self):
        if self.k is not None:
            check_layer(self.k)

    @property
    def decode_probe(self) -> bool:  # type: ignore[override]
        return self.k is not None

    @property
    def stages(self) -> tuple[int, ...]:
        return () if self.k is None else (self.k,)

    def keep(self, stage: int, probe: Probe, state) -> torch.Tensor | None:
        return probe.n_img  # the engine does not modify it
