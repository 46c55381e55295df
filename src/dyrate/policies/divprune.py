"""DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175): before the decoder, keep a diverse subset
of each image's tokens, chosen greedily to maximise the minimum pairwise distance (max-min
diversity), where distance = 1 - cosine similarity of the decoder-ready image features.

Selection, restated from the authors' code (vbdi/divprune): the first token is the one whose
nearest other token is farthest; each next token is the one farthest from its nearest selected
token (ties: the lowest index). The kept tokens enter the decoder in their original order. One
deviation: a token already chosen is never chosen again. Their code can pick one twice once every
remaining token duplicates a chosen one (distance 0 everywhere), e.g. LLaVA-NeXT's identical
image-newline tokens at high kept fractions; it then feeds the decoder a repeated token. It
needs only the features, so it runs on every family. Kept count: ceil((1 - r) * n) (the project's
rule; the paper's default keeps 9.8% of the tokens, r=0.902)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..rates import keep_count
from .base import PreLLMPolicy, Reduction, check_rate


def max_min_subset(features: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min diverse subset of `features` (n, d): k indices in selection order."""
    x = features.float()
    x = x / x.norm(dim=-1, keepdim=True)
    dist = 1.0 - x @ x.T  # (n, n) cosine distance
    n = dist.shape[0]
    chosen = torch.empty(k, dtype=torch.long, device=features.device)
    taken = torch.zeros(n, dtype=torch.bool, device=features.device)
    nearest = None  # (n,) distance of every token to its nearest chosen token
    for i in range(k):
        if i == 0:
            score = dist.topk(min(2, n), dim=0, largest=False).values[-1]  # nearest *other* token
        else:
            nearest = dist[chosen[i - 1]] if nearest is None else torch.minimum(nearest, dist[chosen[i - 1]])
            score = nearest.masked_fill(taken, float("-inf"))  # never a token twice (see the module doc)
        chosen[i] = score.argmax()
        taken[chosen[i]] = True
    return chosen


@dataclass(frozen=True)
class DivPrune(PreLLMPolicy):
    r: float = 0.902
    positions: str | None = None  # renumber | keep (None: renumber on 1-D RoPE, keep on M-RoPE)
    name = "divprune"

    def __post_init__(self):
        super().__post_init__()
        check_rate(self.r)


    def reduce(self, view) -> Reduction:
        k = keep_count(self.r, view.n)
        index = max_min_subset(view.features, k).sort().values  # original order
        return Reduction(view.features[index], index)

    def static_image_tokens(self, n_img: int, n_layers: int, passes: int = 1) -> list[int]:
        return [keep_count(self.r, n_img)] * n_layers
