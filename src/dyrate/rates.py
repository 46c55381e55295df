"""The one rounding rule from a reduction rate to a kept image-token count, shared by the policies
(what the engine keeps) and the learned rate's mask bank (what training masks), so both always
agree: keep ceil((1 - R) * N) of N image tokens (docs/design.md, "Rate")."""

from __future__ import annotations

import math

import torch


def keep_count(rate: float, n_img: int) -> int:
    """Image tokens kept at reduction rate `rate`: ceil((1 - rate) * n_img), robust to float noise."""
    return int(math.ceil(round((1.0 - rate) * n_img, 6)))


def keep_counts(rate: float | torch.Tensor, n_img: torch.Tensor) -> torch.Tensor:
    """`keep_count` for a batch: rate scalar or (B,), n_img (B,) -> (B,) long, on n_img's device."""
    kept = ((1.0 - torch.as_tensor(rate, dtype=torch.float64, device=n_img.device)) * n_img.double())
    return kept.round(decimals=6).ceil().long()
