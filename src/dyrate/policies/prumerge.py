"""PruMerge and PruMerge+ (Shang et al., 2024, arXiv 2403.15388): before the decoder, keep the
image tokens the vision tower's class token attends to as outliers, and merge the others into them.

Restated from the authors' code (42Shawn/LLaVA-PruMerge, `token_prune_merge_advanced[_plus]`):
- attention of the tower's last layer, as one full-width head: softmax(q k^T / sqrt(C)) with q, k
  the layer's whole query / key projections and C the feature width; its class-token row over the
  n patches is the score;
- adaptive count: the share of scores above Q3 + 1.5 IQR (numpy's linear percentiles) gives the
  ratio; the top int(n * ratio) patches are kept, in descending score order (`ratio=` fixes it);
- PruMerge+ adds spatially uniform patches: every int(int(1 / ratio) / 3)-th index from 0 below
  n - 1 that is not kept already, after the kept ones (none when no patch is an outlier, where
  their code would divide by zero);
- merging: each kept token's state becomes itself plus the score-weighted sum of the `neighbours`
  tokens (other kept and pruned ones) whose normalised keys are most similar to its key; one extra
  token, the score-weighted sum of all pruned tokens, is appended (an image with no outlier becomes
  that one token, as in their code); states at the feature layer, then the projector.
Per tower pass (tile): LLaVA-NeXT / OneVision reduce the base image and each crop alike (their code
covers LLaVA-1.5 only), base first, crop patches the model unpads away left out. Towers without a
class token (OneVision's SigLIP, Qwen2-VL): the attention each unit receives replaces the class
token's row (policies/tower.py); Qwen2-VL's unit is a merged 2x2 token (docs/methods.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import PolicySpecError
from .base import PreLLMPolicy, Reduction
from .tower import check_tower, unit_keys, unit_scores


def outlier_ratio(scores: torch.Tensor) -> float:
    """Share of `scores` above Q3 + 1.5 IQR (the interquartile-range rule, numpy percentiles)."""
    values = scores.float().cpu().numpy().ravel()
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    return float((values > q3 + 1.5 * (q3 - q1)).sum()) / len(values)


@dataclass(frozen=True)
class PruMerge(PreLLMPolicy):
    neighbours: int = 32
    ratio: float | None = None  # kept fraction; None: adaptive (IQR outliers)
    positions: str | None = None  # renumber | keep (None: renumber on 1-D RoPE, keep on M-RoPE)
    name = "prumerge"
    reads_tower = True
    plus = False

    def __post_init__(self):
        super().__post_init__()
        if self.neighbours < 0:
            raise PolicySpecError(f"{self.spec()}: neighbours must be >= 0")
        if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
            raise PolicySpecError(f"{self.spec()}: ratio (the kept fraction) must lie in (0, 1]")


    def static_image_tokens(self, n_img: int, n_layers: int, passes: int = 1) -> list[int] | None:
        return None  # the adaptive count depends on the image

    def reduce(self, view) -> Reduction:
        check_tower(self.spec(), view)
        parts = [self._tile(view, tile) for tile in view.tiles]  # base image first, then the crops
        states = torch.cat([p[0] for p in parts])
        return Reduction(view.project(states), torch.cat([p[1] for p in parts]))

    def _tile(self, view, tile):
        """One pass's merged states (m, du) and anchors (m,)."""
        cand = (tile.slots >= 0).nonzero()[:, 0]  # (c,) units that are image tokens
        if not len(cand):  # a crop the model unpads away entirely
            return tile.states[:0], tile.slots[:0]
        layer = view.n_tower_layers - 1
        q, k = tile.qk(layer)  # (T, H, Dh): the last layer's projections
        q, k = q.flatten(1)[:, None], k.flatten(1)[:, None]  # (T, 1, C) one full-width head
        windows = tile.windows(layer) if tile.windows else None
        score = unit_scores(tile, q, k, q.shape[-1] ** -0.5, windows)[cand]  # (c,)
        features = tile.states[cand]  # (c, du) unit states at the feature layer
        keys = F.normalize(unit_keys(tile, k[:, 0])[cand], dim=-1)  # (c, C)
        n = len(cand)
        ratio = outlier_ratio(score) if self.ratio is None else self.ratio
        kept = score.topk(int(n * ratio)).indices  # descending score
        if self.plus and ratio > 0:
            step = int(int(1 / ratio) / 3)
            if step > 0:
                grid = torch.arange(0, n - 1, step, device=kept.device)
                kept = torch.cat([kept, grid[~torch.isin(grid, kept)]])
        pruned = torch.ones(n, dtype=torch.bool, device=kept.device)
        pruned[kept] = False
        pruned = pruned.nonzero()[:, 0]  # ascending, as the authors' complement
        order = torch.cat([kept, pruned])  # the candidates' order in their code
        merged = []
        for i in range(len(kept)):
            others = torch.cat([order[:i], order[i + 1:]])  # every other token, kept ones first
            sim = keys[others] @ keys[kept[i]]
            near = others[sim.topk(min(self.neighbours, len(others))).indices]
            merged.append(features[kept[i]] + (features[near] * score[near, None]).sum(0))
        states, anchors = [m[None] for m in merged], [kept]
        if len(pruned):  # one token from all pruned (none left: no extra token, unlike their code's zero vector)
            states.append((features[pruned] * score[pruned, None]).sum(0, keepdim=True))
            anchors.append(pruned[:1])
        return torch.cat(states), tile.slots[cand[torch.cat(anchors)]]  # no outlier: the extra token alone


@dataclass(frozen=True)
class PruMergePlus(PruMerge):
    name = "prumerge+"
    plus = True
