"""DART (Wen et al., 2025, arXiv 2502.11494, "Stop looking for important tokens in multimodal
language models: duplication matters more"): at prefill, between layers K-1 and K, keep a few
*pivot* tokens and the image tokens least similar to them, i.e. remove the duplicates.

Restated from the authors' code (`get_retained_image_token`, LLaVA-1.5), per row:
- pivots: the `pivots_image` image tokens and the `pivots_text` tokens after the image with the
  largest L1 norm of layer K-1's keys (all heads concatenated; the keys as cached, after RoPE);
- the states are layer K-1's outputs with the decoder's final norm applied;
- every pivot, in the order a Python set of the tokens' sequence indices iterates (their code's
  order: each pivot removes its picks before the next one chooses), takes the `per_pivot` image
  tokens (non-pivot, not taken yet) with the lowest cosine similarity to it, where
  per_pivot = (kept - pivots_image) // (pivots_image + pivots_text) and kept = ceil((1 - r) n);
- kept: the image pivots and every token a pivot took; original positions (as their code).
The defaults (k=2, r=0.77, 4 + 4 pivots) keep 4 + 8 * 16 = 132 of LLaVA-1.5's 576 tokens, their
default. The kept set is fixed after the prefill (FastV's schedule)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..adapters import IMG, INS, PAD
from ..errors import PolicySpecError
from ..rates import keep_count
from .base import Policy, Probe, check_layer, check_rate


def per_pivot(kept: int, image_pivots: int, pivots: int) -> int:
    """Image tokens each of `pivots` pivots takes so that about `kept` remain besides the image pivots."""
    return max(kept - image_pivots, 0) // max(pivots, 1)


def dart_choice(states: torch.Tensor, keys: torch.Tensor, groups: torch.Tensor, kept: int, pivots_image: int,
                pivots_text: int) -> list[int]:
    """One row: slot indices (into the row's slots) DART keeps. states (S, d), keys (S, C), groups (S,)."""
    offset = int((groups == PAD).sum())  # left padding: a token's sequence index is its slot - offset
    image = (groups == IMG).nonzero()[:, 0]
    query = (groups == INS).nonzero()[:, 0]
    pi, pt = min(pivots_image, len(image)), min(pivots_text, len(query))
    take = per_pivot(kept, pi, pivots_image + pivots_text)
    l1 = keys.float().abs().sum(-1)  # (S,)
    image_pivots = (image[l1[image].topk(pi).indices] - offset).tolist()
    query_pivots = (query[l1[query].topk(pt).indices] - offset).tolist()
    chosen = set(image_pivots + query_pivots)
    valid = set((image - offset).tolist())
    valid.difference_update(image_pivots)
    for item in list(chosen):  # their order: a Python set of sequence indices
        pool = list(valid)
        if not pool:
            break
        sim = F.cosine_similarity(states[item + offset][None].float(), states[torch.tensor(pool) + offset].float(), dim=-1)
        picks = [pool[i] for i in (-sim).topk(min(take, len(pool))).indices.tolist()]
        chosen.update(picks)
        valid.difference_update(picks)
    chosen.difference_update(query_pivots)
    return sorted(c + offset for c in chosen)


@dataclass(frozen=True)
class DART(Policy):
    k: int = 2
    r: float = 0.77
    pivots_image: int = 4
    pivots_text: int = 4
    name = "dart"
    needs_slots = True

    def __post_init__(self):
        check_layer(self.k)
        check_rate(self.r)
        if self.pivots_image < 1 or self.pivots_text < 0:
            raise PolicySpecError(f"{self.spec()}: pivots_image must be >= 1 and pivots_text >= 0")

    @property
    def stages(self) -> tuple[int, ...]:
        return (self.k,)

    def keep(self, stage: int, probe: Probe, state) -> torch.Tensor | None:
        if probe.step > 0:
            return None
        chosen = torch.zeros_like(probe.slot_groups, dtype=torch.bool)  # (B, S)
        for b in range(chosen.shape[0]):
            kept = keep_count(self.r, int(probe.n_img[b]))
            index = dart_choice(probe.slot_states[b], probe.slot_keys[b], probe.slot_groups[b], kept,
                                self.pivots_image, self.pivots_text)
            chosen[b, index] = True
        state["dart_chosen"] = chosen
        return chosen.sum(1)

    def scores(self, stage: int, probe: Probe, state) -> torch.Tensor:
        return state["dart_chosen"].float()  # the engine keeps the top `keep`: exactly the chosen

    def static_image_tokens(self, n_img: int, n_layers: int) -> list[int]:
        pi = min(self.pivots_image, n_img)
        take = per_pivot(keep_count(self.r, n_img), pi, self.pivots_image + self.pivots_text)
        kept = min(n_img, pi + (self.pivots_image + self.pivots_text) * take)  # enough text tokens assumed
        return [n_img] * self.k + [kept] * (n_layers - self.k)
