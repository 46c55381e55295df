"""VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467): before the decoder, keep each image's
*dominant* tokens -- those the vision tower's class token attends to most -- and merge the rest
into a few *contextual* tokens.

Restated from the authors' code (dvlab-research/VisionZip, LLaVA-1.5 and LLaVA-NeXT), per tower
pass (tile):
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
LLaVA-NeXT / OneVision (their NeXT code): every pass -- the base image and each crop -- keeps
`dominant + contextual` tokens; the base image's come first, then the crops' dominant patches in the
crop grid's raster order (newlines dropped), then the crops' class tokens, then their contextual
tokens. Crop patches the model unpads away are no candidates (they show padding), and a crop with
fewer patches keeps what it has.
Towers without a class token (OneVision's SigLIP, Qwen2-VL): the top `dominant` units by attention
received (policies/tower.py); Qwen2-VL's unit is a merged 2x2 token, its key the mean of its
patches' keys (docs/methods.md)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PolicySpecError
from .base import PreLLMPolicy, Reduction
from .tower import check_tower, unit_keys, unit_scores


@dataclass(frozen=True)
class VisionZip(PreLLMPolicy):
    dominant: int = 54
    contextual: int = 10
    positions: str | None = None  # renumber | keep (None: renumber on 1-D RoPE, keep on M-RoPE)
    name = "visionzip"
    reads_tower = True

    def __post_init__(self):
        super().__post_init__()
        if self.dominant < 1 or self.contextual < 0:
            raise PolicySpecError(f"{self.spec()}: dominant must be >= 1 (it counts the class token) and contextual >= 0")

    def reduce(self, view) -> Reduction:
        check_tower(self.spec(), view)
        first = view.tiles[0]
        patches = self.dominant - int(first.has_cls) + self.contextual
        if patches > int((first.slots >= 0).sum()):
            raise PolicySpecError(f"{self.spec()}: keeps {patches} patch tokens, more than the image's "
                                  f"{int((first.slots >= 0).sum())}")
        parts = [self._tile(view, tile) for tile in view.tiles]  # (dominant, cls, contextual) each: (states, anchors)
        base, crops = parts[0], parts[1:]
        groups = [base[1], base[0], base[2]]  # the class token first, then dominant, then contextual
        if crops:
            dom_states = torch.cat([c[0][0] for c in crops])
            dom_slots = torch.cat([c[0][1] for c in crops])
            raster = dom_slots.argsort()  # the crops' dominant patches in the crop grid's raster order
            groups.append((dom_states[raster], dom_slots[raster]))
            groups += [c[1] for c in crops] + [c[2] for c in crops]
        states = torch.cat([g[0] for g in groups])
        return Reduction(view.project(states), torch.cat([g[1] for g in groups]))

    def _tile(self, view, tile):
        """One pass's ((dominant states, anchors), (class-token state, anchor), (contextual ...))."""
        cand = (tile.slots >= 0).nonzero()[:, 0]  # (c,) units that are image tokens, original order
        empty = tile.states[:0], tile.slots[:0]
        if not len(cand):  # a crop the model unpads away entirely
            return empty, empty, empty
        q, k = tile.qk(view.feature_layer)  # (T, H, Dh) each
        windows = tile.windows(view.feature_layer) if tile.windows else None
        score = unit_scores(tile, q, k, q.shape[-1] ** -0.5, windows)  # (u,)
        n_dom = min(self.dominant - int(tile.has_cls), len(cand))
        top = cand[score[cand].topk(n_dom).indices].sort().values  # dominant units, original order
        rest = cand[~torch.isin(cand, top)]  # (r,) the others, original order
        states, slots = tile.states, tile.slots
        cls = (tile.cls_state[None], slots[cand[:1]]) if tile.has_cls else empty  # at the first patch's place
        n_ctx = min(self.contextual, len(rest))
        if not n_ctx:
            return (states[top], slots[top]), cls, empty
        metric = unit_keys(tile, k.mean(1))[rest]  # (r, Dh) keys, mean over heads (and a unit's tokens)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        step = max(1, len(rest) // n_ctx)
        targets = torch.arange(0, len(rest), step, device=metric.device)[:n_ctx]
        is_target = torch.zeros(len(rest), dtype=torch.bool, device=metric.device)
        is_target[targets] = True
        others = (~is_target).nonzero()[:, 0]
        assign = (metric[others] @ metric[targets].T).argmax(-1)  # (n_others,) target of each
        rest_states = states[rest]
        sums = torch.zeros(len(targets), states.shape[-1], dtype=states.dtype, device=states.device)
        sums.index_add_(0, assign, rest_states[others])
        counts = torch.bincount(assign, minlength=len(targets)).clamp(min=1).to(states.dtype)[:, None]
        return (states[top], slots[top]), cls, (rest_states[targets] + sums / counts, slots[rest[targets]])

    def static_image_tokens(self, n_img: int, n_layers: int, passes: int = 1) -> list[int]:
        return [min(n_img, passes * (self.dominant + self.contextual))] * n_layers  # per tower pass
