"""Oracle labels: for every response step, the most pruning whose next-token KL to the full model
stays under a threshold (objective `oracle`), one such rate per prompt (`decide prefill`), or per
step the most pruning every *later* step can bear too (`decide shrink`: the kept set of evict
mode only shrinks, so a step's decision must serve the rest of the answer)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .soft_mask import mask_bank
from .teacher import Cached, pruned_logprobs


@torch.no_grad()
def bin_kls(model, c: Cached, bins: int, k: int, eps: float, rank_by: str = "step") -> torch.Tensor:
    """(T, bins) KL of every response step's next-token distribution to the full model's when every
    step is pruned at bin i (hard masks, one pass per bin; column 0, the full model, is 0)."""
    n_img = len(c.img_cols)
    bank = mask_bank(bins, n_img, c.teacher.device)
    teacher = c.teacher
    out = torch.zeros(c.n_steps, bins)
    for i in range(1, bins):
        p = F.one_hot(torch.full((c.n_steps,), i), bins).float()  # (T, B)
        logp = pruned_logprobs(model, c, p, bank, k, eps, rank_by=rank_by).cpu()  # (T, V)
        out[:, i] = (teacher.exp() * (teacher - logp)).sum(-1)
    return out


def oracle_from_kls(kls: torch.Tensor, max_kl: float) -> torch.Tensor:
    """(T,) long: for every step the largest bin i such that bins 1..i all keep its KL <= max_kl
    (0 if even bin 1 does not): how much each step could drop. kls: (T, bins) from `bin_kls`."""
    ok = kls <= max_kl  # (T, bins)
    ok[:, 0] = True  # bin 0 is the full model itself
    return ok.long().cumprod(dim=1).sum(1) - 1  # cumprod: 1 while every bin so far is within


def prompt_oracle_from_kls(kls: torch.Tensor, max_kl: float) -> torch.Tensor:
    """(1,) long: the largest bin i such that bins 1..i keep *every* step's KL <= max_kl when the
    whole answer is pruned at that bin (kls from `bin_kls` with rank "prefill": FastV at r = i/B,
    teacher-forced): how much this prompt could drop with one rate decided at prefill."""
    return oracle_from_kls(kls.max(dim=0, keepdim=True).values, max_kl)  # (1, bins) worst step per bin


def shrink_oracle_from_kls(kls: torch.Tensor, max_kl: float) -> torch.Tensor:
    """(T,) long: for every step t the smallest oracle bin of steps t..T-1 (a suffix minimum, so
    non-decreasing in t): in kept tokens, the largest need of the rest of the answer. Step 0's label
    is the per-prompt oracle (`prompt_oracle_from_kls`); later ones prune more as the needs fall."""
    per_step = oracle_from_kls(kls, max_kl)  # (T,)
    return per_step.flip(0).cummin(0).values.flip(0)


LABELS = {"step": oracle_from_kls, "prefill": prompt_oracle_from_kls, "shrink": shrink_oracle_from_kls}


def oracle_bins(model, c: Cached, bins: int, k: int, eps: float, max_kl: float) -> torch.Tensor:
    """(T,) long oracle bins of one sequence (the target of the "oracle" objective)."""
    return oracle_from_kls(bin_kls(model, c, bins, k, eps), max_kl)


def label_oracle(model, cache: list[Cached], cfg: TrainConfig, log: Callable[[str], None] | None = None) -> None:
    """Set every sequence's oracle bins at cfg.oracle_kl (the per-bin KLs are computed once and kept)."""
    t0 = time.time()
    label = LABELS[cfg.decide]
    for c in cache:
        if c.bin_kl is None or c.bin_kl.shape[1] != cfg.bins or c.bin_kl_rank != cfg.rank:
            c.bin_kl, c.bin_kl_rank = bin_kls(model, c, cfg.bins, cfg.k, cfg.eps, cfg.rank), cfg.rank
        c.oracle = label(c.bin_kl, cfg.oracle_kl)  # (T,), or (1,) for one rate per prompt
    if log:
        bins = torch.cat([c.oracle for c in cache])
        keep = mask_bank(cfg.bins, len(cache[0].img_cols)).float().mean(1)[bins].mean()
        what = {"prefill": "per prompt, every step", "step": "per step", "shrink": "per step, for the rest of the answer"}[cfg.decide]
        log(f"oracle bins ({what} KL <= {cfg.oracle_kl}): mean bin {bins.float().mean():.2f}, kept fraction {keep:.3f}, "
            f"histogram {torch.bincount(bins, minlength=cfg.bins).tolist()} ({time.time() - t0:.1f} s)")


