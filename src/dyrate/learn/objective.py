"""The training objective: Gumbel-Softmax bin probabilities, the fit term (KL to the full model, CE on
references, or CE to oracle bins) and the compute term (docs/design.md, "Training"; our choices,
the paper's loss is not published)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .predictors import RatePredictor, feature_vector
from .soft_mask import expected_keep, mask_bank
from .teacher import Cached, pruned_logprobs, shares_of, step_hidden


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: torch.Generator | None) -> torch.Tensor:
    """softmax((logits + g) / tau), g ~ Gumbel(0, 1) from `generator` (None: no noise)."""
    if generator is None:
        return (logits / tau).softmax(-1)
    u = torch.rand(logits.shape, generator=generator).clamp(1e-10, 1 - 1e-10).to(logits.device)
    return ((logits - torch.log(-torch.log(u))) / tau).softmax(-1)


def _penalty(cfg: TrainConfig, keep: torch.Tensor) -> torch.Tensor:
    """The compute term: lambda * mean expected kept fraction, or the squared budget penalty."""
    return cfg.lam * keep if cfg.lam is not None else cfg.budget_weight * (keep - cfg.target_keep) ** 2


def sequence_loss(model, predictor: RatePredictor, c: Cached, cfg: TrainConfig, tau: float,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one sequence (differentiable w.r.t. the predictor) and its parts: fit is the term optimised
    (KL or CE, after cfg.objective), kl the KL to the full model in either case."""
    device = next(predictor.parameters()).device
    n_img = len(c.img_cols)
    bank = mask_bank(cfg.bins, n_img, device)
    x = feature_vector(shares_of(c).to(device), torch.arange(c.n_steps, device=device), predictor.config.features,
                       step_hidden(c).to(device))  # (T, F)
    logits = predictor.forward_sequence(x[None])[0]  # (T, B)
    if cfg.objective == "oracle":  # supervised: no pruned pass needed
        logits = logits[: len(c.oracle)]  # decide=prefill: one label, the prefill step's
        fit = F.cross_entropy(logits, c.oracle.to(device))
        keep = expected_keep(logits.softmax(-1), bank).mean()
        loss = fit + _penalty(cfg, keep)
        parts = {"loss": loss, "fit": fit, "kl": torch.tensor(float("nan")), "keep": keep}
        return loss, {key: float(v.detach()) for key, v in parts.items()}
    p = gumbel_softmax(logits, tau, generator)  # (T, B)
    logp = pruned_logprobs(model, c, p, bank, cfg.k, cfg.eps, cfg.rank)  # (T, V)
    teacher = c.teacher.to(logp.device)
    kl = (teacher.exp() * (teacher - logp)).sum(-1).mean()
    if cfg.objective == "ce":
        target = torch.tensor(c.response, device=logp.device)  # (T,)
        fit = -logp.gather(1, target[:, None]).mean()  # (T, 1) log-probabilities of the targets -> mean
    else:
        fit = kl
    keep = expected_keep(p, bank).mean().to(kl.device)
    loss = fit + _penalty(cfg, keep)
    parts = {"loss": loss, "fit": fit, "kl": kl, "keep": keep}
    return loss, {key: float(v.detach()) for key, v in parts.items()}


@torch.no_grad()
def evaluate(model, predictor: RatePredictor, cache: list[Cached], cfg: TrainConfig, tau: float | None = None) -> dict:
    """Noise-free loss (softmax at `tau`, default tau_end) averaged over cached sequences."""
    tau = cfg.tau_end if tau is None else tau
    parts = {"loss": 0.0, "fit": 0.0, "kl": 0.0, "keep": 0.0}
    for c in cache:
        _, info = sequence_loss(model, predictor, c, cfg, tau, None)
        for key in parts:
            parts[key] += info[key] / len(cache)
    return parts
