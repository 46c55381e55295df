"""VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467): before the decoder, keep each image's
*dominant* tokens -- those the vision tower's class token attends to most -- and merge the rest
into a few *contextual* tokens.

Restated from the authors' code (dvlab-research/VisionZip, LLaVA-1.5):
- the tower layer whose output is the feature layer gives the attention: its class-token row,
  summed over heads, ranks the patches; the class token itself plus the top `dominant - 1`
  patches are the dominant tokens, in original order (the class token's state enters the decoder,
  as in their code);
- the remaining tokens, in order, are compared by that layer's keys (mean over heads, L2
  normalised): every (len // contextual)-th one is a target (the first `contextual` of those),
  each other token joins its most similar target, and a contextual token is the target's state
  plus the mean of the states that joined it;
- merging happens on the tower's states at the feature layer, then the projector maps dominant and
  contextual tokens to the decoder; they enter the decoder dominant first, then contextual.
Needs a vision tower with a class token and exposed attention (LLaVA-1.5 here); other families are
refused with one line (docs/methods.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PolicySpecError
from .base import PreLLMPolicy, Reduction


def _check_tower(name: str, view) -> None:
    if view.qk is None or view.hidden is None or not view.has_cls:
        raise PolicySpecError(f"{name} needs a vision tower with a class token whose attention dyrate can read "
                              "(LLaVA-1.5 checkpoints); this model's tower has none")


@dataclass(frozen=True)
class VisionZip(PreLLMPolicy):
    dominant: int = 54
    contextual: int = 10
    positions: str | None = None  # renumber | keep (None: renumber on 1-D RoPE, keep on M-RoPE)
    name = "visionzip"

    def __post_init__(self):
        super().__post_init__()
        if self.dominant < 1 or self.contextual < 0:
            raise PolicySpecError(f"{self.spec()}: dominant must be >= 1 (it counts the class token) and contextual >= 0")


    def reduce(self, view) -> Reduction:
        _check_tower(self.spec(), view)
        n = view.n  # patches; the tower's states hold the class token at 0 besides
        if self.dominant - 1 + self.contextual > n:
            raise PolicySpecError(f"{self.spec()}: keeps {self.dominant - 1 + self.contextual} patch tokens, "
                                  f"more than the image's {n}")
        q, k = view.qk(view.feature_layer)  # (T, H, Dh) each, T = n + 1
        scale = q.shape[-1] ** -0.5
        attn = torch.einsum("hd,thd->ht", q[0], k).mul(scale).softmax(-1)  # (H, T): the class token's row
        cls_attn = attn[:, 1:].sum(0)  # (n,)
        top = cls_attn.topk(self.dominant - 1).indices + 1  # tower indices of the dominant patches
        dominant = torch.cat([top.new_zeros(1), top]).sort().values  # class token first, original order
        rest = torch.ones(n + 1, dtype=torch.bool, device=top.device)
        rest[dominant] = False
        rest_idx = rest.nonzero()[:, 0]  # (n_rest,) tower indices, original order
        hidden = view.hidden  # (T, dv)
        states = [hidden[dominant]]
        anchors = [(dominant - 1).clamp(min=0)]  # the class token stands at the first patch's place
        if self.contextual and len(rest_idx):
            metric = k.mean(1)[rest_idx]  # (n_rest, Dh) keys, mean over heads
            metric = metric / metric.norm(dim=-1, keepdim=True)
            step = max(1, len(rest_idx) // self.contextual)
            targets = torch.arange(0, len(rest_idx), step, device=metric.device)[: self.contextual]
            is_target = torch.zeros(len(rest_idx), dtype=torch.bool, device=metric.device)
            is_target[targets] = True
            others = (~is_target).nonzero()[:, 0]
            assign = (metric[others] @ metric[targets].T).argmax(-1)  # (n_others,) target of each
            rest_states = hidden[rest_idx]
            sums = torch.zeros(len(targets), hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
            sums.index_add_(0, assign, rest_states[others])
            counts = torch.bincount(assign, minlength=len(targets)).clamp(min=1).to(hidden.dtype)[:, None]
            states.append(rest_states[targets] + sums / counts)
            anchors.append(rest_idx[targets] - 1)
        features = view.project(torch.cat(states))  # (m, d)
        return Reduction(features, torch.cat(anchors))

    def static_image_tokens(self, n_img: int, n_layers: int) -> list[int]:
        return [self.dominant + self.contextual] * n_layers
