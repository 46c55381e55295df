"""Progressive FastV (ours): a kept set that shrinks as the answer grows, on a fixed schedule over
decode steps. `progressive:k=2,0=0.5,8=0.75,32=0.9` drops half of the image tokens from layer K on
at prefill (FastV's ranking: the last prompt token's attention at layer K-1), a quarter of them from
decode step 8 on and 90% from step 32 on; each shrink drops the lowest-ranked of the tokens still
kept, by the same prefill ranking, so no probe runs at decode steps (docs/design.md, "Progressive
eviction"). Meant for evict mode, where the KV cache shrinks with the kept set; in mask mode the
same keys are hidden instead. `progressive:k=2,0=0.5` is `fastv:k=2,r=0.5`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PolicySpecError
from ..rates import keep_count, keep_counts
from .base import Policy, Probe, check_layer, check_rate_pairs, prefill_ranking


@dataclass(frozen=True)
class Progressive(Policy):
    k: int = 2
    steps: tuple[tuple[int, float], ...] = ((0, 0.5),)  # (decode step, rate from that step on), step 0 first
    name = "progressive"
    prefill_ranked = True
    decode_probe = False
    decode_decides = True

    def __post_init__(self):
        check_layer(self.k)
        if not self.steps or self.steps[0][0] != 0:
            raise PolicySpecError("progressive: give the prefill's rate as 0=R (then STEP=RATE pairs)")
        check_rate_pairs("progressive", self.steps, "step", "over the steps (the kept set only shrinks)")

    @property
    def stages(self) -> tuple[int, ...]:
        return (self.k,)

    def keep(self, stage: int, probe: Probe, state) -> torch.Tensor | None:
        rate = dict(self.steps).get(probe.step)
        return None if rate is None else keep_counts(rate, probe.n_img)  # only at the schedule's steps

    def decides_at(self, step: int) -> bool:
        return step in dict(self.steps)

    def scores(self, stage: int, probe: Probe, state) -> torch.Tensor:
        return prefill_ranking(probe, state)

    def static_image_tokens(self, n_img: int, n_layers: int) -> list[int] | None:
        if len(self.steps) > 1:
            return None  # the count depends on how long the answer runs
        return [n_img] * self.k + [keep_count(self.steps[0][1], n_img)] * (n_layers - self.k)

    def spec(self) -> str:
        return f"progressive:k={self.k}," + ",".join(f"{t}={r:g}" for t, r in self.steps)

    @classmethod
    def params(cls) -> None:
        return None  # k= and STEP=RATE pairs, parsed below

    @classmethod
    def from_params(cls, params: dict[str, str]) -> "Progressive":
        params = dict(params)
        try:
            k = int(params.pop("k", 2))
            steps = tuple(sorted((int(t), float(r)) for t, r in params.items()))
        except ValueError as err:
            raise PolicySpecError(f"progressive: give k=LAYER and STEP=RATE pairs ({err})") from None
        return cls(k=k, steps=steps)
