"""Slot bookkeeping of the engine (docs/design.md, "Layers and the probe"): a `Segment` is a run of
decoder layers sharing one KV layout, and `compact` moves kept slots together (holes first)."""

from __future__ import annotations

import torch

from ..adapters import RES


class Segment:
    """A run of decoder layers [start, end) sharing one KV layout, and the per-slot bookkeeping of
    that layout. `col`, `valid`, `attend` and `groups` are (B, S) views of buffers with spare
    room at the end, pre-filled the way a generated token's slot looks (valid, attended, RES), so
    `append` (every segment, every decode step) writes one column id instead of growing four
    tensors."""

    def __init__(self, start: int, end: int, col: torch.Tensor, valid: torch.Tensor, attend: torch.Tensor,
                 in_order: bool = True):
        self.start, self.end = start, end  # first decoder layer, one past the last
        # False: the slots are not in column order (mask mode's rank-ordered layout), so even a
        # fully attended segment needs a mask for causality
        self.in_order = in_order
        self.n_keys: torch.Tensor | None = None  # (B,) attended keys, kept up to date (see Engine._recount)
        self.n_img: torch.Tensor | None = None  # (B,) attended image keys
        self.n_stored: torch.Tensor | None = None  # (B,) valid slots: the KV entries this row's cache holds
        self.set_slots(col, valid, attend)

    def set_slots(self, col: torch.Tensor, valid: torch.Tensor, attend: torch.Tensor, spare: int = 32) -> None:
        """New slots: col (B, S) long column of each slot, valid (B, S) bool (False for left padding and
        eviction holes), attend (B, S) bool (keys the queries may see). Copies into fresh buffers."""
        b, n = col.shape
        self.n = n
        self._col = torch.cat([col, col.new_zeros(b, spare)], dim=1)  # (B, cap)
        self._valid = torch.cat([valid, valid.new_ones(b, spare)], dim=1)
        self._attend = torch.cat([attend, attend.new_ones(b, spare)], dim=1)
        self._groups = col.new_full((b, n + spare), RES)  # the first n are set by Engine._recount
        self.dense = self.in_order and bool(attend.all())  # attend <= valid: every slot valid and attended

    col = property(lambda self: self._col[:, : self.n])  # (B, S)
    valid = property(lambda self: self._valid[:, : self.n])  # (B, S)
    attend = property(lambda self: self._attend[:, : self.n])  # (B, S)

    @property
    def groups(self) -> torch.Tensor:
        """(B, S) long group of every slot (PAD for invalid slots)."""
        return self._groups[:, : self.n]

    @groups.setter
    def groups(self, value: torch.Tensor) -> None:
        self._groups[:, : self.n] = value

    def set_attend(self, attend: torch.Tensor) -> None:
        """Mask mode: new attended keys (B, S) over the same slots."""
        self._attend[:, : self.n] = attend
        self.dense = self.in_order and bool(attend.all())

    def append(self, new_col: int) -> None:
        """Add the slot of a new token (valid, attended, RES) at the end."""
        if self.n == self._col.shape[1]:  # out of room: double it
            groups = self.groups
            self.set_slots(self.col, self.valid, self.attend, spare=max(32, self.n))
            self.groups = groups
        self._col[:, self.n] = new_col
        self.n += 1
        self.n_keys = self.n_keys + 1  # a generated token is never an image token
        self.n_stored = self.n_stored + 1

    def reorder(self, index: torch.Tensor) -> None:
        self._col, self._valid, self._attend = self._col[index], self._valid[index], self._attend[index]
        self._groups = self._groups[index]
        self.n_keys, self.n_img, self.n_stored = self.n_keys[index], self.n_img[index], self.n_stored[index]


def rank_order(cand: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """The rank-ordered layout (docs/design.md, "Modes"): index (B, S) into the slots, putting each
    row's candidate image slots first, least important first (so the kept top-k of any step are the
    last k of them), then every other slot in its order. cand: (B, S) bool; rank: (B, S) long, 0 =
    most important (only candidates' ranks are read)."""
    s = cand.shape[1]
    slot = torch.arange(s, device=cand.device).expand_as(cand)
    key = torch.where(cand, s - 1 - rank, s + slot)  # candidates: 0.. by falling rank; the rest after, in order
    return key.argsort(dim=1)


def compact(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order-preserving compaction of kept slots with holes moved to the front.
    keep: (B, S) bool. Returns index (B, S_new) into the old slots and the new valid mask (B, S_new),
    where S_new = the largest kept count of any row."""
    n_new = int(keep.sum(1).max())
    order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices  # unkept first, then kept in order
    index = order[:, keep.shape[1] - n_new :]  # (B, S_new)
    return index, keep.gather(1, index)
