"""The engine's KV cache: transformers' cache contract, with buffers that do not reallocate per step.

`DynamicCache` grows every layer's keys and values with `torch.cat` at every step, a copy of the
whole cache per step and layer. `GrowingLayer` keeps them in buffers with spare room on the
sequence axis: an update writes the new entries in place and returns a view of the used part; a
full buffer doubles. Eviction (`keep_slots`) writes into the same buffer unless it would be less
than half used (then into a smaller one: evicting must give memory back); beam reordering
(`reorder_cache`) copies each buffer once. The decoder layers see an ordinary `Cache` whose
layers honour `CacheLayerMixin`'s contract (update, get_seq_length, get_mask_sizes, ...): no
library class is patched.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

SPARE = 64  # room for this many more tokens after the prompt before the first doubling


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys / values live in (B, H, capacity, D) buffers; `keys` and `values`
    are views of the first `n` slots (assigning them replaces the buffers, as `DynamicLayer` users
    expect)."""

    def __init__(self, **kwargs):
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._n = 0
        self.read_from = 0  # `update` returns the entries from this slot on (the rank-ordered prefix path)
        self.pack = None  # a Packing (adapters/attention.py) while the engine runs a packed prefill
        super().__init__(**kwargs)  # sets keys = values = None through the properties below

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, : self._n]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        self._k = value
        self._n = 0 if value is None or value.dim() < 3 else value.shape[2]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, : self._n]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._v = value

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append (B, H, q, D) new entries in place; return views of every entry so far from slot
        `read_from` on (the engine's mask-mode prefix path skips the image entries no row attends)."""
        if not self.is_initialized:
            self.device, self.is_initialized = key_states.device, True
        if self.pack is not None:  # packed (1, H, N, D) entries of a padded (B, S) prefill: store them padded
            key_states, value_states = self.pack.unpack(key_states), self.pack.unpack(value_states)
        q = key_states.shape[2]
        if self._k is None or self._k.dim() < 3:  # the first update (the prefill): room for the answer too
            self._k = self._alloc(key_states, q + SPARE)
            self._v = self._alloc(value_states, q + SPARE)
        elif self._n + q > self._k.shape[2]:  # full: double
            cap = max(2 * self._k.shape[2], self._n + q)
            self._k = self._grow(self._k, key_states, cap)
            self._v = self._grow(self._v, value_states, cap)
        self._k[:, :, self._n : self._n + q] = key_states
        self._v[:, :, self._n : self._n + q] = value_states
        self._n += q
        if self.read_from:
            return self._k[:, :, self.read_from : self._n], self._v[:, :, self.read_from : self._n]
        return self.keys, self.values

    def _alloc(self, like: torch.Tensor, cap: int) -> torch.Tensor:
        b, h, _, d = like.shape
        return like.new_empty(b, h, cap, d)

    def _grow(self, buf: torch.Tensor, like: torch.Tensor, cap: int) -> torch.Tensor:
        new = self._alloc(like, cap)
        new[:, :, : self._n] = buf[:, :, : self._n]
        return new

    def keep_slots(self, index: torch.Tensor) -> None:
        """Eviction: keep, per row, the slots `index` (B, S_new) in that order. Written into the same
        buffers while they stay at least half used (the next appends need no reallocation); into
        smaller ones otherwise, so that evicting really gives the memory back."""
        n_new = index.shape[1]
        shrink = n_new + SPARE < self._k.shape[2] // 2
        bufs = []
        for buf in (self._k, self._v):
            idx = index[:, None, :, None].expand(-1, buf.shape[1], -1, buf.shape[-1])  # (B, H, S_new, D)
            kept = buf[:, :, : self._n].gather(2, idx)
            if shrink:
                new = self._alloc(buf, n_new + SPARE)
                new[:, :, :n_new] = kept
                bufs.append(new)
            else:
                buf[:, :, :n_new] = kept
                bufs.append(buf)
        self._k, self._v = bufs
        self._n = n_new

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: rows from `beam_idx` (one copy per buffer; the capacity stays)."""
        if self._n:
            idx = beam_idx.to(self._k.device)
            self._k, self._v = self._k.index_select(0, idx), self._v.index_select(0, idx)

    @property
    def reserved_bytes(self) -> int:
        """Bytes the buffers take, spare room included (the used part is `keys.nbytes + values.nbytes`)."""
        return 0 if self._k is None else self._k.nbytes + self._v.nbytes


def growing_cache(n_layers: int) -> Cache:
    """A cache of `n_layers` `GrowingLayer`s, one per decoder layer (created up front, so the engine
    can set a layer's `read_from` / `pack` before its first update)."""
    return Cache(layers=[GrowingLayer() for _ in range(n_layers)])
