"""The one attention function dyrate installs in the language decoder.

It is SDPA (transformers' own `sdpa_attention_forward`) plus, only when the engine passes a
`ProbeRequest` for the probe layer, the head-averaged attention row of the newest query (and, at
prefill, for a policy that rates image tokens by chosen text queries, their weighted rows). Every
other layer and every call without a request is plain SDPA, so `model.generate` on a model with
this function installed behaves exactly as with "sdpa". It is registered under `ATTN_NAME` through
transformers' public `AttentionInterface` / `AttentionMaskInterface` (no library class is patched).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_NAME = "dyrate_sdpa"


@dataclass
class ProbeRequest:
    """Filled by the attention function of the probe layer: `row` is (B, n_keys) float32, the
    attention probabilities of each row's newest query over that layer's keys, averaged over heads.
    With `weights` (B, q) (prefill only; each row's weights over its queries), `rated` is also
    filled: (B, n_keys) float32, the weighted sum over queries of their head-averaged rows."""

    row: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    rated: torch.Tensor | None = None


@dataclass
class Packing:
    """A prefill run on packed tokens (the engine's pruned segments, docs/design.md "Modes"): the
    layer's hidden states are (1, N, d), the valid slots of a padded (B, S) batch in row-major
    order (`flat`: their (N,) indices into B * S). The linear layers then cost N tokens, not B * S;
    the cache stores keys and values padded (B, H, S, D), and attention runs padded per row."""

    flat: torch.Tensor  # (N,) long
    batch: int
    slots: int

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(1, H, N, D) -> (B, H, S, D), zeros in the holes."""
        _, h, n, d = x.shape
        out = x.new_zeros(self.batch * self.slots, h, d)
        out[self.flat] = x[0].transpose(0, 1)
        return out.view(self.batch, self.slots, h, d).transpose(1, 2)


def _scores(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Attention probabilities of the last query, per head. query: (B, H, q, D); key: (B, Hkv, n, D);
    mask: None or (B, 1, q, n) bool (True = attend). Returns (B, Hkv, rep, n) float32, rep = H / Hkv.

    Scores are computed in the model's dtype and normalised in float32, as eager attention does;
    grouped query heads are scored against their shared key head without copying the keys."""
    b, h, _, d = query.shape
    h_kv = key.shape[1]
    q = query[:, :, -1, :].reshape(b, h_kv, h // h_kv, d)  # (B, Hkv, rep, D)
    scores = torch.matmul(q, key.transpose(-1, -2)).float().mul_(scaling)  # (B, Hkv, rep, n), a fresh tensor
    if mask is not None:
        scores.masked_fill_(~mask[:, :, -1, None, :], float("-inf"))  # mask row: (B, 1, 1, n)
    # The newest query is the last position, so without a mask it sees every key.
    return scores.softmax(dim=-1)


def probe_row(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """Head-averaged attention of the last query: (B, n) float32 (shapes as in `_scores`)."""
    return _scores(query, key, mask, scaling).flatten(1, 2).mean(dim=1)


def rated_row(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float,
              weights: torch.Tensor) -> torch.Tensor:
    """sum_i weights[b, i] * (head-averaged attention row of query i): (B, n) float32. Prefill only
    (q == n, the causal mask is applied when `mask` is None). Only the queries from the first one
    any row weighs are scored. query: (B, H, q, D); key: (B, Hkv, n, D); weights: (B, q)."""
    b, h, q_len, d = query.shape
    h_kv, n = key.shape[1], key.shape[2]
    used = (weights != 0).any(0).nonzero()
    first = int(used[0]) if len(used) else q_len
    qs = query[:, :, first:, :].reshape(b, h_kv, h // h_kv, q_len - first, d)  # (B, Hkv, rep, q', D)
    scores = torch.matmul(qs, key[:, :, None].transpose(-1, -2)).float().mul_(scaling)  # (B, Hkv, rep, q', n)
    if mask is None:  # causal: query i (column first + i of n) sees keys <= its own column
        rows = torch.arange(first, q_len, device=query.device)[:, None] + (n - q_len)
        allowed = torch.arange(n, device=query.device)[None, :] <= rows  # (q', n)
        scores.masked_fill_(~allowed, float("-inf"))
    else:
        scores.masked_fill_(~mask[:, :, None, first:, :], float("-inf"))  # (B, 1, 1, q', n)
    p = scores.softmax(dim=-1).flatten(1, 2).mean(dim=1)  # (B, q', n), head-averaged
    return torch.einsum("bqn,bq->bn", p, weights[:, first:].float())


def dyrate_attention(module, query, key, value, attention_mask, scaling=None, probe: ProbeRequest | None = None,
                     pack: Packing | None = None, **kwargs):
    if pack is not None:  # packed queries (1, H, N, D), padded keys: attend padded, return packed (1, N, H, D)
        out, _ = sdpa_attention_forward(module, pack.unpack(query), key, value, attention_mask, scaling=scaling, **kwargs)
        return out.reshape(pack.batch * pack.slots, *out.shape[2:])[pack.flat][None], None
    if probe is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if query.shape[2] > 1:  # prefill: SDPA for the layer, plus the one probe row
        probe.row = probe_row(query, key, attention_mask, scale)
        if probe.weights is not None:
            probe.rated = rated_row(query, key, attention_mask, scale, probe.weights)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    # Decode (one query): the probabilities the probe needs are the layer's own, so compute the
    # attention once from them instead of reading the keys twice.
    b, h, _, d = query.shape
    p = _scores(query, key, attention_mask, scale)  # (B, Hkv, rep, n)
    probe.row = p.flatten(1, 2).mean(dim=1)  # (B, n)
    out = torch.matmul(p.to(value.dtype), value)  # (B, Hkv, rep, D)
    return out.reshape(b, 1, h, d), None  # (B, q=1, H, D), as sdpa_attention_forward returns


AttentionInterface.register(ATTN_NAME, dyrate_attention)
AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def install(model) -> None:
    """Make the language decoder of `model` use dyrate's attention (vision tower untouched)."""
    text_config = model.config.get_text_config()
    if text_config._attn_implementation != ATTN_NAME:
        model.set_attn_implementation({"text_config": ATTN_NAME})
