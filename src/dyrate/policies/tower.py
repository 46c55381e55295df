"""What VisionZip and PruMerge share: reading a vision tower's attention from an `ImageView`'s
tiles (adapters/vision.py), with the fallback for towers without a class token.

A patch's importance is the class token's attention to it where the tower has a class token (the
authors' rule, LLaVA-1.5's CLIP); where it has none (SigLIP on OneVision, Qwen2-VL's ViT) the
authors' code has no rule, and dyrate uses the attention the patch *receives*, averaged over every
query of the tile -- the same quantity the class-token row measures, without the class token. A
unit's score is the sum over its tower tokens (Qwen2-VL: its 2x2 patches). Attention stays within a
window where the layer is windowed (Qwen2.5-VL). docs/methods.md, "Vision towers: crops and no class token"."""

from __future__ import annotations

import torch

from ..errors import PolicySpecError

QUERY_CHUNK = 1024  # queries per softmax block for the received-attention score (memory: H x chunk x T)


def check_tower(name: str, view) -> None:
    if not view.tiles or view.project is None:
        raise PolicySpecError(f"{name} needs the vision tower's attention and states, which dyrate cannot read for "
                              "this image (a list-valued vision_feature_layer, or crops the model resamples); "
                              "see docs/methods.md")


def received(q: torch.Tensor, k: torch.Tensor, scale: float, windows: torch.Tensor | None) -> torch.Tensor:
    """(T,) attention each tower token receives, averaged over the T queries and summed over heads.
    q, k: (T, H, Dh); windows: (T,) ids or None (one attention over all tokens)."""
    t = q.shape[0]
    total = torch.zeros(k.shape[1], t, dtype=q.dtype, device=q.device)  # (H, T)
    for lo in range(0, t, QUERY_CHUNK):
        logits = torch.einsum("qhd,khd->hqk", q[lo:lo + QUERY_CHUNK], k) * scale  # (H, c, T)
        if windows is not None:
            apart = windows[lo:lo + QUERY_CHUNK, None] != windows[None, :]  # (c, T)
            logits = logits.masked_fill(apart, float("-inf"))
        total += logits.softmax(-1).sum(1)
    return (total / t).sum(0)


def unit_scores(tile, q: torch.Tensor, k: torch.Tensor, scale: float, windows: torch.Tensor | None) -> torch.Tensor:
    """(u,) each unit's importance: the class token's attention (summed over heads), or without one
    the attention received; q, k: (T, H, Dh) of the tile's tower tokens."""
    if tile.has_cls:
        logits = torch.einsum("hd,thd->ht", q[0], k) * scale
        if windows is not None:
            logits = logits.masked_fill(windows[None] != windows[0], float("-inf"))
        per_token = logits.softmax(-1)[:, 1:].sum(0)  # (T - 1,)
    else:
        per_token = received(q, k, scale, windows)
    return per_token.view(tile.units, tile.group).sum(1)


def unit_keys(tile, k: torch.Tensor) -> torch.Tensor:
    """(u, ...) each unit's key: its tower tokens' keys (class token left out), averaged over the
    unit's tokens (one token per unit on CLIP / SigLIP: unchanged)."""
    k = k[1:] if tile.has_cls else k
    return k.view(tile.units, tile.group, *k.shape[1:]).mean(1)
