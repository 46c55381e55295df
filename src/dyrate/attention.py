"""The one attention function dyrate installs in the language decoder.

It is SDPA (transformers' own `sdpa_attention_forward`) plus, only when the engine passes a
`ProbeRequest` for the probe layer, the head-averaged attention row of the newest query. Every
other layer and every call without a request is plain SDPA, so `model.generate` on a model with
this function installed behaves exactly as with "sdpa". It is registered under `ATTN_NAME` through
transformers' public `AttentionInterface` / `AttentionMaskInterface` (no library class is patched).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_NAME = "dyrate_sdpa"


@dataclass
class ProbeRequest:
    """Filled by the attention function of the probe layer: `row` is (B, n_keys) float32, the
    attention probabilities of each row's newest query over that layer's keys, averaged over heads."""

    row: torch.Tensor | None = None


def probe_row(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Head-averaged attention of the last query. query: (B, H, q, D); key: (B, Hkv, n, D);
    mask: None or (B, 1, q, n) bool (True = attend). Returns (B, n) float32."""
    q = query[:, :, -1:, :].float()  # (B, H, 1, D)
    k = repeat_kv(key, query.shape[1] // key.shape[1]).float()  # (B, H, n, D)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling  # (B, H, 1, n)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, -1:, :], float("-inf"))
    # The newest query is the last position, so without a mask it sees every key.
    return scores.softmax(dim=-1).mean(dim=1).squeeze(1)  # (B, n)


def dyrate_attention(module, query, key, value, attention_mask, scaling=None, probe: ProbeRequest | None = None, **kwargs):
    if probe is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        probe.row = probe_row(query, key, attention_mask, scale)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


AttentionInterface.register(ATTN_NAME, dyrate_attention)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def install(model) -> None:
    """Make the language decoder of `model` use dyrate's attention (vision tower untouched)."""
    text_config = model.config.get_text_config()
    if text_config._attn_implementation != ATTN_NAME:
        model.set_attn_implementation({"text_config": ATTN_NAME})
