"""Settings of a predictor training run (one dataclass; validated on construction)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InputError
from .predictors import DECIDES, RANKS

OBJECTIVES = ("kl", "ce", "oracle")


@dataclass
class TrainConfig:
    arch: str = "mlp"
    k: int = 2
    bins: int = 10
    history: int = 8
    hidden: int = 32
    features: tuple[str, ...] = ("shares",)
    steps: int = 200
    batch: int = 4  # sequences per optimizer step
    lr: float = 3e-3
    lam: float | None = 0.1  # compute term weight (None: budget mode)
    target_keep: float | None = None  # budget mode: target mean kept fraction
    budget_weight: float = 10.0
    tau_start: float = 1.0
    tau_end: float = 0.1
    eps: float = 1e-6
    seed: int = 0
    objective: str = "kl"  # fit term: "kl" to the full model on its own answers, "ce" on reference answers,
    # or "oracle": cross-entropy to each step's oracle bin (the most pruning whose KL stays <= oracle_kl)
    oracle_kl: float = 0.02
    rank: str = "step"  # image-token ranking: each step's probe ("step") or the prefill's ("prefill")
    decide: str = "step"  # a rate per step, one per prompt at prefill ("prefill"), or a shrinking one ("shrink")

    def __post_init__(self):
        self.features = tuple(self.features)
        if self.rank not in RANKS:
            raise InputError(f"rank must be one of {', '.join(RANKS)}, got {self.rank!r}")
        if self.decide not in DECIDES:
            raise InputError(f"decide must be one of {', '.join(DECIDES)}, got {self.decide!r}")
        if self.decide in ("prefill", "shrink") and (self.objective != "oracle" or self.rank != "prefill"):
            raise InputError(f"decide={self.decide} needs the oracle objective and rank=prefill "
                             "(its labels are measured under the prefill's ranking, which evict mode keeps)")
        if self.objective not in OBJECTIVES:
            raise InputError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if (self.lam is None) == (self.target_keep is None):
            raise InputError("give exactly one of lambda (compute penalty) and target_keep (budget)")
        if self.target_keep is not None and not 0.0 < self.target_keep <= 1.0:
            raise InputError(f"target keep fraction must lie in (0, 1], got {self.target_keep}")
        numbers = {name: getattr(self, name) for name in ("lr", "lam", "target_keep", "budget_weight", "tau_start",
                                                           "tau_end", "eps", "oracle_kl")}
        # every value a number; only the oracle's KL threshold may be infinite (no limit: every bin allowed)
        bad = [f"{k}={v}" for k, v in numbers.items()
               if v is not None and (math.isnan(v) or (math.isinf(v) and k != "oracle_kl"))]
        if bad:
            raise InputError(f"need finite numbers, got {', '.join(bad)}")
        if self.steps < 1 or self.batch < 1 or self.lr <= 0:
            raise InputError(f"steps, batch and lr must be positive (got {self.steps}, {self.batch}, {self.lr})")
        if (self.lam is not None and self.lam < 0) or self.budget_weight < 0 or self.eps < 0:
            raise InputError("lambda, budget weight and eps must be >= 0")
        if not 0 < self.tau_end <= self.tau_start:
            raise InputError(f"need 0 < tau_end <= tau_start, got {self.tau_end}, {self.tau_start}")

    def tau(self, step: int) -> float:
        """Exponential annealing from tau_start (step 0) to tau_end (last step)."""
        frac = step / max(1, self.steps - 1)
        return self.tau_start * (self.tau_end / self.tau_start) ** frac
