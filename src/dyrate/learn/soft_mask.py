"""The differentiable rate mask of training (docs/design.md, "Training").

Mask bank: `M[i, rank] = 1 if rank < (1 - i/B) * N_img else 0`, one row per rate bin i (bin 0 keeps
every image token). With bin probabilities p (from the Gumbel-Softmax), image token j of rank
`rank(j)` (0 = most attended) gets the soft mask `m(j) = sum_i p_i * M[i, rank(j)]`: the probability
that the sampled rate keeps it. With a one-hot p it is the hard mask of that bin, which keeps exactly
`keep_count(i/B, N_img)` tokens, as the policies do at inference.
"""

from __future__ import annotations

import torch

from ..rates import keep_counts


def mask_bank(bins: int, n_img: int, device=None) -> torch.Tensor:
    """(bins, n_img) float32: M[i, r] = 1 if r < ceil((1 - i/B) * n_img) (the policies' keep count)."""
    rates = torch.arange(bins, dtype=torch.float64, device=device) / bins
    keep = keep_counts(rates, torch.full((bins,), n_img, device=device))  # (bins,)
    return (torch.arange(n_img, device=device)[None, :] < keep[:, None]).float()


def ranks(scores: torch.Tensor) -> torch.Tensor:
    """(..., n) scores -> (..., n) long rank of each entry, 0 = highest; ties: earlier entry first
    (as the engine ranks)."""
    order = scores.sort(dim=-1, descending=True, stable=True).indices
    pos = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, pos)


def soft_mask(p: torch.Tensor, rank: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """p: (..., bins) bin probabilities; rank: (..., n) long; bank: (bins, n). Returns m (..., n):
    m[..., j] = sum_i p[..., i] * bank[i, rank[..., j]]."""
    by_rank = p @ bank  # (..., n): kept-probability of each rank position
    return by_rank.gather(-1, rank)


def expected_keep(p: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """(..., bins) -> (...) expected fraction of image tokens kept: sum_i p_i * keep_i / n_img."""
    return p @ bank.mean(-1)
