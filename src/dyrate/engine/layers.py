"""Running a segment's decoder layers (docs/design.md, "Layers and the probe", "Modes"): the
attention mask of its slots, the per-pass counters a record keeps, and the packed prefill of a
pruned segment whose holes would waste the padded batch."""

from __future__ import annotations

import torch

from ..adapters import ModelAdapter
from ..adapters.attention import Packing
from .segment import Segment


def slot_mask(seg: Segment, q: int) -> torch.Tensor:
    """Boolean SDPA mask (B, 1, q, S) for the last q slots: attended keys at or before the query's
    column, plus the query itself (so no row is empty)."""
    s = seg.col.shape[1]
    q_col = seg.col[:, -q:, None]  # (B, q, 1)
    k_col = seg.col[:, None, :]  # (B, 1, S)
    allowed = seg.attend[:, None, :] & (k_col <= q_col)  # (B, q, S)
    diag = torch.arange(s - q, s, device=seg.col.device)[:, None] == torch.arange(s, device=seg.col.device)
    return (allowed | diag).unsqueeze(1)


def note_counts(record: dict, seg: Segment, queries) -> None:
    """One segment's counters in a forward pass's record (engine/loop.Engine._new_record)."""
    record["queries"].append(queries)
    record["keys"].append(seg.n_keys)
    record["img"].append(seg.n_img)
    record["stored"].append(seg.n_stored)


def run_packed(adapter: ModelAdapter, state, seg: Segment, hidden: torch.Tensor, record: dict) -> torch.Tensor:
    """The prefill of a pruned segment with no probe in it, on packed tokens: the valid slots of
    every row in one (1, N, d) sequence, so the linear layers cost the kept tokens, not rows x the
    largest row; attention and the KV cache stay padded per row (adapters/attention.Packing).
    `state`: the engine's DecodeState. hidden (B, S, d) -> the layers' output, padded (B, S, d)."""
    b, n, d = hidden.shape
    pack = Packing(seg.valid.reshape(-1).nonzero()[:, 0], b, n)
    packed = hidden.reshape(b * n, d)[pack.flat][None]  # (1, N, d)
    rows = torch.arange(b, device=seg.col.device)[:, None] * state.n_cols
    cols = (seg.col + rows).reshape(-1)[pack.flat]  # (N,) into the (B, C) columns, row-major
    position_ids = state.pos.reshape(state.pos.shape[0], -1)[:, cols][:, None]  # (A, 1, N)
    pos_emb = adapter.rotary(packed, position_ids)
    mask = slot_mask(seg, n)
    for layer in range(seg.start, seg.end):
        state.cache.layers[layer].pack = pack  # the cache stores this layer's keys and values padded
        packed = adapter.layers[layer](
            packed, attention_mask=mask, position_embeddings=pos_emb, position_ids=position_ids[0],
            use_cache=True, pack=pack, **{adapter.cache_kwarg: state.cache},
        )
        state.cache.layers[layer].pack = None
    note_counts(record, seg, seg.valid.sum(1))
    out = packed.new_zeros(b * n, d)
    out[pack.flat] = packed[0]
    return out.view(b, n, d)
