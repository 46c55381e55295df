"""SparseVLM (Zhang et al., ICML 2025, arXiv 2410.04417, "SparseVLM: Visual Token Sparsification
for Efficient Vision-Language Model Inference"): text *raters* chosen from the prompt score the
image tokens at a few decoder layers; each stage keeps the best scored and *recycles* part of the
rest into a few merged tokens.

Restated from the authors' code (v1, their default `USE_VERSION=1_0`, LLaVA-1.5), per row:
- raters, once from the decoder's input embeddings: m = softmax over text of (V T^T), V the image
  tokens' embeddings, T those of the text after the first image (group `ins`); averaged over the
  image tokens, the text tokens above the mean are the raters;
- at each stage K_i (their pruning layer K_i - 1): the attention probabilities of the raters at
  layer K_i - 1 (heads averaged, then raters averaged) score the image tokens that layer holds;
  the top `keep_count(R_i, n)` are kept (n: the row's image tokens before any pruning);
- recycling: of the deleted tokens, the `int(recycle * deleted) + 1` best scored are clustered
  (density-peak clustering on the L2 distance / sqrt(d) of their states after layer K_i - 1; the
  density uses each token's `clusters` nearest, their code's choice) into
  `int(recycled / per_cluster) + 1` clusters; each cluster's mean state (their sum /
  (count + 1e-6)) becomes one kept token from layer K_i on.

Deviations (docs/methods.md): positions are kept (their v1.5 rule, as every in-LLM policy here;
v1 renumbers each layer's tokens); a merged token sits at its cluster centre's column and position
(their code appends it after the kept image tokens); no 1e-6 noise breaks density ties (ties:
first in their order); a stage whose budget holds every token it sees keeps them as they are (their
code still deletes one and recycles it as a cluster of one). The defaults are their 192-token
setting on LLaVA-1.5 (pruning layers 2, 6, 15 keep 300, 200, 110 of 576): `3=0.48,7=0.653,16=0.81`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..adapters import IMG, INS
from ..errors import PolicySpecError
from ..rates import keep_count
from .base import Policy, Probe, check_stages

DEFAULT_STAGES = ((3, 0.48), (7, 0.653), (16, 0.81))  # keep 300, 200, 110 of 576
KNOBS = ("recycle", "per_cluster")


def rater_weights(embeds: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(B, P) float32: 1 / (number of raters) on each row's rater columns, 0 elsewhere.
    embeds (B, P, d), groups (B, P)."""
    out = torch.zeros(groups.shape, dtype=torch.float32, device=embeds.device)
    for b in range(groups.shape[0]):
        img, txt = (groups[b] == IMG).nonzero()[:, 0], (groups[b] == INS).nonzero()[:, 0]
        if len(img) == 0 or len(txt) == 0:
            continue
        rel = (embeds[b, img].float() @ embeds[b, txt].float().T).softmax(dim=1).mean(dim=0)  # (n_text,)
        raters = txt[rel > rel.mean()]
        out[b, raters] = 1.0 / max(len(raters), 1)
    return out


def cluster_and_merge(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering of x (N, C) into `clusters` groups. Returns the centres (clusters,)
    long indices into x (their order: highest score first) and the merged states (clusters, C):
    each cluster's sum / (members + 1e-6)."""
    n, c = x.shape
    xf = x.float()
    dist = (xf[:, None, :] - xf[None, :, :]).norm(dim=-1) / c ** 0.5  # (N, N)
    nearest = dist.topk(clusters, dim=-1, largest=False).values  # (N, clusters), self included
    density = (-(nearest ** 2).mean(dim=-1)).exp()  # (N,)
    denser = (density[None, :] > density[:, None]).float()  # [i, j]: j is denser than i
    parent = (dist * denser + dist.max() * (1 - denser)).min(dim=-1).values  # (N,)
    centres = (parent * density).topk(clusters).indices  # (clusters,)
    member = dist[centres].argmin(dim=0)  # (N,) nearest centre of each token
    member[centres] = torch.arange(clusters, device=x.device)
    count = torch.zeros(clusters, device=x.device).index_add_(0, member, torch.ones(n, device=x.device)) + 1e-6
    merged = torch.zeros(clusters, c, device=x.device).index_add_(0, member, xf / count[member, None])
    return centres, merged.to(x.dtype)


def stage_counts(n_cur: int, budget: int, recycle: float, per_cluster: int) -> tuple[int, int]:
    """(kept by score, merged tokens) of a stage that sees n_cur tokens with this budget."""
    if budget >= n_cur:
        return n_cur, 0
    deleted = n_cur - budget
    if recycle <= 0:
        return budget, 0
    recycled = min(int(deleted * recycle) + 1, deleted)
    return budget, min(int(recycled / per_cluster) + 1, recycled)


@dataclass(frozen=True)
class SparseVLM(Policy):
    steps: tuple[tuple[int, float], ...] = DEFAULT_STAGES
    recycle: float = 0.3
    per_cluster: int = 10
    name = "sparsevlm"
    needs_slots = True
    text_raters = True
    merges = True

    def __post_init__(self):
        check_stages("sparsevlm", self.steps)
        if not 0.0 <= self.recycle <= 1.0:
            raise PolicySpecError(f"sparsevlm: recycle={self.recycle:g} must lie in [0, 1]")
        if self.per_cluster < 1:
            raise PolicySpecError(f"sparsevlm: per_cluster={self.per_cluster} must be >= 1")

    @property
    def stages(self) -> tuple[int, ...]:
        return tuple(k for k, _ in self.steps)

    def raters(self, embeds: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        return rater_weights(embeds, groups)

    def keep(self, stage: int, probe: Probe, state) -> torch.Tensor | None:
        if probe.step > 0:
            return None
        chosen = torch.zeros_like(probe.candidates)  # (B, S)
        replace = torch.zeros_like(probe.candidates)
        merged = torch.zeros_like(probe.slot_hidden)  # (B, S, d)
        for b in range(chosen.shape[0]):
            cand = probe.candidates[b].nonzero()[:, 0]  # slot order
            budget = keep_count(self.steps[stage][1], int(probe.n_img[b]))
            _, n_merged = stage_counts(len(cand), budget, self.recycle, self.per_cluster)
            if budget >= len(cand):
                chosen[b, cand] = True
                continue
            rel = probe.rated[b, cand]
            order = rel.sort(descending=True, stable=True).indices  # ties: earlier slot first
            chosen[b, cand[order[:budget]]] = True
            if n_merged:
                deleted = cand[order[budget:]]  # best scored first
                recycled = deleted[: min(int(len(deleted) * self.recycle) + 1, len(deleted))]
                centres, states = cluster_and_merge(probe.slot_hidden[b, recycled], n_merged)
                slots = recycled[centres]
                chosen[b, slots] = replace[b, slots] = True
                merged[b, slots] = states
        state["sparsevlm_chosen"] = chosen
        state["sparsevlm_merged"] = (replace, merged)
        return chosen.sum(1)

    def scores(self, stage: int, probe: Probe, state) -> torch.Tensor:
        return state["sparsevlm_chosen"].float()  # the engine keeps the top `keep`: exactly the chosen

    def merged_states(self, stage: int, probe: Probe, state):
        state.pop("sparsevlm_chosen", None)
        return state.pop("sparsevlm_merged", None)

    def static_image_tokens(self, n_img: int, n_layers: int) -> list[int]:
        counts, n_cur = [n_img] * n_layers, n_img
        for k, r in self.steps:
            kept, n_merged = stage_counts(n_cur, keep_count(r, n_img), self.recycle, self.per_cluster)
            n_cur = kept + n_merged
            for layer in range(k, n_layers):
                counts[layer] = n_cur
        return counts

    def spec(self) -> str:
        items = [f"{k}={r:g}" for k, r in self.steps] + [f"recycle={self.recycle:g}", f"per_cluster={self.per_cluster}"]
        return "sparsevlm:" + ",".join(items)

    @classmethod
    def params(cls) -> None:
        return None  # LAYER=RATE pairs and the named knobs, parsed below

    @classmethod
    def from_params(cls, params: dict[str, str]) -> "SparseVLM":
        knobs = {k: params.pop(k) for k in KNOBS if k in params}
        try:
            steps = tuple((int(k), float(v)) for k, v in params.items())
            kwargs = {"recycle": float(knobs["recycle"])} if "recycle" in knobs else {}
            if "per_cluster" in knobs:
                kwargs["per_cluster"] = int(knobs["per_cluster"])
        except ValueError as err:
            raise PolicySpecError(f"sparsevlm: stages are LAYER=RATE pairs, knobs {', '.join(KNOBS)} ({err})") from None
        return cls(steps=steps or DEFAULT_STAGES, **kwargs)
