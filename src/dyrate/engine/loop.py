"""The decoding engine: one module that owns the decoder-layer loop.

Vocabulary
- column: a position of the padded sequence as it grows (prompt columns 0..P-1, left padded, then
  one column per generated token). Every column has a group (sys/img/ins/res/pad) and a RoPE
  position on each of A axes (the adapter's: `cumsum(attention_mask) - 1` as `model.generate`
  computes it, or 3-D M-RoPE for Qwen2-VL); a generated token's is the previous column's + 1.
- segment: a run of decoder layers [start, end) that share one KV layout. Segment 0 holds the
  layers before the first pruning stage and sees every token; segment s >= 1 starts at the layer
  K_s of pruning stage s. Its probe is the attention of the newest query at layer K_s - 1, the
  last layer of segment s-1.
- slot: an entry of a segment's KV cache. `col[b, j]` is the column slot j of row b holds;
  `valid` is False for left padding and for the holes that ragged eviction leaves; `attend` says
  which keys queries may see (== valid in evict mode; mask mode also hides unkept image tokens).
  Holes are always moved to the front, so the newest token of every row is the last slot.

Evict mode gathers the KV cache of a segment's layers when its kept set shrinks (and, at prefill,
drops pruned image tokens from the hidden states between layers K-1 and K); at decode steps the
dropped slots are hidden first and gathered out once they are a quarter of the segment
(`Engine.COMPACT_AT`); the prefill of a pruned segment with many holes runs packed
(engine/layers.py). Mask mode keeps every slot and hides unkept image keys from the queries of
layers >= K; for nested kept sets it stores them rank-ordered and reads a suffix (`Engine.prefix`).

The per-call `DecodeState` carries everything; nothing is stored on the model or the policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache

from ..adapters import IMG, PAD, RES, ModelAdapter
from ..adapters.attention import ProbeRequest
from ..errors import InputError
from ..policies import Policy, Probe
from .cache import growing_cache
from .columns import as_vision, image_ordinals
from .layers import note_counts, run_packed, slot_mask
from .prellm import shrink_prompt
from .segment import Segment, compact, rank_order

MODES = ("evict", "mask")


@dataclass
class DecodeState:
    """Everything one generate call carries from step to step (B rows)."""

    cache: Cache  # of GrowingLayer (engine/cache.py)
    segments: list[Segment]
    group: torch.Tensor  # (B, C) long, group of every column
    pos: torch.Tensor  # (A, B, C) long, RoPE position of every column on each of A axes
    n_img: torch.Tensor  # (B,) long, image tokens of each row
    policy_state: dict[str, torch.Tensor]
    n_prompt: int = 0  # prompt columns (after any pre-LLM reduction)
    image_of: torch.Tensor | None = None  # (B, P) long: which image of its row a prompt column belongs to, -1 if none
    n_images: int = 1  # the most images any row holds
    raters: torch.Tensor | None = None  # (B, P) float, prefill only: weights of rating queries (Policy.raters)
    step: int = 0
    records: list[dict] = field(default_factory=list)  # one per forward pass (Engine._new_record)

    @property
    def n_cols(self) -> int:
        return self.group.shape[1]

    def reorder(self, index: torch.Tensor) -> None:
        """Reorder rows (beam search): the cache, every segment, the policy state. Records are not
        reordered; a finished hypothesis gathers its own through its beam indices."""
        self.cache.reorder_cache(index)
        for seg in self.segments:
            seg.reorder(index)
        self.group, self.pos, self.n_img = self.group[index], self.pos[:, index], self.n_img[index]
        self.image_of = self.image_of[index] if self.image_of is not None else None
        self.policy_state = {k: v[index] for k, v in self.policy_state.items()}


class Engine:
    """Runs prefill and decode steps of a wrapped model under a policy. Stateless between calls."""

    # Evict mode at decode steps: the slots a decision drops are first only hidden (like mask mode,
    # exactly the same attention) and gathered out of every layer's KV cache once they make up this
    # fraction of a segment's slots, so a rate that shrinks a little at many steps pays for a few
    # gathers, not one per step. The prefill's eviction is immediate (the hidden states shrink).
    COMPACT_AT = 0.25

    def __init__(self, adapter: ModelAdapter, policy: Policy, mode: str = "evict", rank_prefix: bool = True):
        if mode not in MODES:
            raise InputError(f"mode {mode!r} is not one of {', '.join(MODES)}")
        policy.validate(adapter.n_layers)
        policy.check_model(adapter.model)
        self.adapter, self.policy, self.mode = adapter, policy, mode
        self.stages = policy.stages  # first layer of each pruning stage
        self.decides_at_decode = policy.decode_decides  # asked at decode steps without a probe (fixed per policy)
        bounds = [0, *self.stages, adapter.n_layers]
        self.bounds = list(zip(bounds[:-1], bounds[1:]))  # (start, end) of each segment
        # Mask mode with nested kept sets (one stage ranked by the prefill): the pruned segment's
        # image slots are stored least important first, so a decode step reads only the suffix of
        # its KV cache that starts at the first attended slot (docs/design.md, "Modes").
        self.prefix = rank_prefix and mode == "mask" and policy.prefill_ranked and len(self.stages) == 1

    # ------------------------------------------------------------------ prefill
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, vision):
        """Run the prompt. input_ids, attention_mask: (B, P), left padded; vision: the processor's
        other outputs (a mapping; a bare tensor means {"pixel_values": tensor}).
        Returns the logits of the last prompt token (B, V) and the state for decoding."""
        a = self.adapter
        vision = as_vision(vision)
        if self.policy.pre_llm:  # the images' tokens are reduced before the decoder (engine/prellm.py)
            input_ids, attention_mask, pos, hidden, n_img, counts = shrink_prompt(a, self.policy, input_ids,
                                                                                  attention_mask, vision)
        else:
            pos = a.positions(input_ids, attention_mask, vision)  # (A, B, P)
            hidden, counts = a.embed_counts(input_ids, vision)  # (B, P, d), image tokens per image
            n_img = None
        b, p = input_ids.shape
        device = input_ids.device
        valid = attention_mask.bool()
        group = a.token_groups(input_ids, valid)  # (B, P)
        state = DecodeState(
            cache=growing_cache(a.n_layers),
            segments=[],
            group=group,
            pos=pos,
            n_img=(group == IMG).sum(1) if n_img is None else n_img,  # image tokens before any reduction
            policy_state=self.policy.init_state(b, device),
            n_prompt=p,
            image_of=image_ordinals(group, counts),
        )
        state.n_images = max(int(state.image_of.max()) + 1, 1)
        if self.policy.text_raters:
            state.raters = self.policy.raters(hidden, group)  # (B, P), from the decoder's input embeddings
        col = torch.arange(p, device=device).expand(b, p)
        seg = Segment(0, self.bounds[0][1], col, valid, valid)
        self._recount(state, seg)
        record = self._new_record(b, device, state.n_images)
        probed = None  # the probe of the segment before (set by _run_layers)
        for s, (start, end) in enumerate(self.bounds):
            if s > 0:
                seg, hidden = self._next_segment_prefill(state, seg, hidden, probed, s, record, start, end)
            state.segments.append(seg)
            hidden, probed = self._run_layers(state, seg, hidden, q=hidden.shape[1], record=record, s=s)
        state.raters = None
        state.records.append(record)
        logits = a.logits(hidden[:, -1:, :])[:, -1, :]  # (B, V)
        return logits, state

    # ------------------------------------------------------------------ decode
    def decode(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step. tokens: (B,) the tokens chosen last step. Returns logits (B, V)."""
        a = self.adapter
        b = tokens.shape[0]
        state.step += 1
        new_col = state.n_cols
        state.group = torch.cat([state.group, state.group.new_full((b, 1), RES)], dim=1)
        state.pos = torch.cat([state.pos, state.pos[..., -1:] + 1], dim=2)
        hidden = a.embed_tokens(tokens[:, None])  # (B, 1, d)
        record = self._new_record(b, tokens.device, state.n_images)
        position_ids = state.pos[..., -1:]  # (A, B, 1): the new token, the same in every segment
        pos_emb = a.rotary(hidden, position_ids)
        probed = None
        for s, seg in enumerate(state.segments):
            if probed is not None or (s > 0 and self.decides_at_decode and self.policy.decides_at(state.step)):
                # stage s may change its kept set
                self._decide(state, s, probed.row if probed is not None else None, hidden[:, -1], record)
            seg.append(new_col)
            hidden, probed = self._run_layers(state, seg, hidden, q=1, record=record, s=s, pos=(position_ids, pos_emb))
        state.records.append(record)
        return a.logits(hidden)[:, -1, :]

    # ------------------------------------------------------------------ internals
    def _new_record(self, b: int, device, n_images: int = 1) -> dict:
        """One forward pass's record: per segment (lists, one entry per segment) the queries run (an
        int, or (B,) long at prefill), the attended keys, attended image keys and stored KV entries
        ((B,) long, the segment's own counters: they are replaced, never modified, so a reference is a snapshot); per stage
        the share vector (B, n_stage, 4), the image share per image (B, n_stage, n_images; computed only
        when some row has several images) and the rate (B, n_stage), NaN where nothing was decided."""
        n_stage = len(self.stages)
        record = {
            "queries": [], "keys": [], "img": [], "stored": [],
            "shares": torch.full((b, n_stage, 4), float("nan"), device=device),
            "rate": torch.full((b, n_stage), float("nan"), device=device),
        }
        if n_images > 1:  # only multi-image prompts split the image share (kept off the usual decode step)
            record["image_shares"] = torch.full((b, n_stage, n_images), float("nan"), device=device)
        return record

    def _wants_probe(self, state: DecodeState, s: int) -> bool:
        """Does the segment after segment s need a probe of this step?"""
        return s + 1 < len(self.bounds) and (
            state.step == 0 or (self.policy.decode_probe and self.policy.decides_at(state.step)))

    def _run_layers(self, state: DecodeState, seg: Segment, hidden: torch.Tensor, q: int, record, s: int, pos=None):
        """Run the layers of `seg` on its last q slots. Returns the hidden states (B, q, d) and, if the
        next stage needs it this step, the filled ProbeRequest of the segment's last layer (its `row`
        (B, S); else None).
        pos: (position ids, rotary embeddings) of the queries, when the caller has them."""
        a = self.adapter
        request = ProbeRequest() if self._wants_probe(state, s) else None
        if q > 1 and s > 0 and request is None and self.mode == "evict" and self._worth_packing(seg):
            return self._run_packed(state, seg, hidden, record), None
        if pos is None:
            cols = seg.col[:, -q:]  # (B, q)
            position_ids = state.pos.gather(2, cols.expand(state.pos.shape[0], -1, -1))  # (A, B, q)
            pos = (position_ids, a.rotary(hidden, position_ids))
        position_ids, pos_emb = pos
        mask = None if seg.dense else slot_mask(seg, q)
        if q == 1 and not seg.in_order:  # the rank-ordered layout: skip the leading slots no row attends
            read_from = int(seg.attend.int().argmax(dim=1).min())
            mask = mask[..., read_from:]
            for layer in range(seg.start, seg.end):
                state.cache.layers[layer].read_from = read_from
        if request is not None and state.raters is not None:  # prefill: the policy's rating queries
            request.weights = state.raters.gather(1, seg.col).masked_fill(~seg.valid, 0.0)  # (B, S)
        for layer in range(seg.start, seg.end):
            extra = {"probe": request} if request is not None and layer == seg.end - 1 else {}
            hidden = a.layers[layer](
                hidden, attention_mask=mask, position_embeddings=pos_emb, position_ids=position_ids[0],
                use_cache=True, **{a.cache_kwarg: state.cache}, **extra,
            )
        note_counts(record, seg, 1 if q == 1 else seg.valid[:, -q:].sum(1))
        return hidden, request

    PACK_BELOW = 0.9  # a pruned segment's prefill runs packed when its valid slots are below this share

    def _worth_packing(self, seg: Segment) -> bool:
        """Do the holes of a pruned segment's prefill (ragged kept counts, left padding) waste enough
        of the padded batch to run its linear layers on the valid slots only?"""
        return not seg.dense and int(seg.n_stored.sum()) < self.PACK_BELOW * seg.valid.numel()

    def _run_packed(self, state: DecodeState, seg: Segment, hidden: torch.Tensor, record) -> torch.Tensor:
        return run_packed(self.adapter, state, seg, hidden, record)  # engine/layers.py

    @staticmethod
    def _kept_bitmap(state: DecodeState, seg: Segment) -> torch.Tensor:
        """(B, C) bool over columns: True for the image columns `seg` attends and every other column."""
        b, c = state.group.shape
        bitmap = torch.zeros(b, c + 1, dtype=torch.bool, device=seg.col.device)
        bitmap.scatter_(1, torch.where(seg.attend, seg.col, c), True)  # column c collects the rest
        return bitmap[:, :c] | (state.group != IMG)

    def _select(self, state: DecodeState, s: int, row: torch.Tensor, hidden: torch.Tensor, record,
                current: Segment | None, slots: torch.Tensor | None = None, rated: torch.Tensor | None = None):
        """Ask the policy for stage s (segment s). `row` (B, S_prev) is the probe over the slots of
        segment s-1 (None at the decode steps of a policy that decides without a probe: no shares,
        no attention scores) and `hidden` (B, d) the newest query's state after it; `current` is segment s
        as it stands (None at prefill); `slots` (B, S_prev, d) the prefill's states after segment
        s-1 and `rated` (B, S_prev) the raters' attention (Policy.text_raters). Returns a (B, C) bitmap
        of the columns stage s keeps, or None when the policy leaves the kept set as it is, and the
        Probe the policy saw and the rank of every slot (B, S_prev) (0: most important; None when
        nothing was ranked).

        This runs every decode step of a probing policy, so the cheap part (shares, counts, the
        policy's target) comes first and the ranking only when some row must give tokens up."""
        prev = state.segments[s - 1]
        b, device = hidden.shape[0], hidden.device
        shares = None
        if row is not None:
            shares = torch.zeros(b, 5, device=device).scatter_add_(1, prev.groups, row)[:, :4]  # (B, 4)
            record["shares"][:, s - 1] = shares
        if row is not None and state.n_images > 1:  # the image share split per image (multi-image prompts)
            ordinal = state.image_of.gather(1, prev.col.clamp(max=state.image_of.shape[1] - 1)) + 1  # (B, S_prev), 0: none
            ordinal = ordinal.masked_fill(prev.groups != IMG, 0).clamp(max=state.n_images)
            per_image = torch.zeros(b, state.n_images + 1, device=device).scatter_add_(1, ordinal, row)
            record["image_shares"][:, s - 1] = per_image[:, 1:]
        # Candidates: the image tokens the probe layer sees; in evict mode only those stage s still
        # holds (a token that left never returns), so their count is segment s's (nested stages).
        evict_now = self.mode == "evict" and current is not None
        kept = current.n_img if evict_now else prev.n_img  # (B,)
        probe = Probe(shares=shares, img_scores=None, n_img=state.n_img, kept=kept, step=state.step, hidden=hidden)
        if slots is not None and self.policy.needs_slots:  # slots: (B, S_prev, d), the prefill's states
            cand = (prev.groups == IMG) & prev.attend  # (B, S_prev)
            keys = state.cache.layers[self.stages[s - 1] - 1].keys  # (B, Hkv, S_prev, D)
            probe.slot_states = self.adapter.final_norm(slots)
            probe.slot_keys = keys.transpose(1, 2).flatten(2)  # (B, S_prev, Hkv * D)
            probe.slot_groups = prev.groups
            probe.slot_hidden = slots
            probe.candidates = cand
            probe.rated = rated.masked_fill(~cand, 0.0) if rated is not None else None
        target = self.policy.keep(s - 1, probe, state.policy_state)
        if target is None:
            return None, probe, None
        k = torch.minimum(target.to(device), kept).clamp_(min=0)  # (B,)
        record["rate"][:, s - 1] = self.policy.rate(s - 1, probe, k, state.policy_state)
        if evict_now and torch.equal(k, kept):
            return None, probe, None  # every row keeps all it still has: nothing to rank or evict
        cand = (prev.groups == IMG) & prev.attend  # (B, S_prev)
        if evict_now:
            cand &= self._kept_bitmap(state, current).gather(1, prev.col)
        probe.img_scores = (row if row is not None else cand.float()).masked_fill(~cand, 0.0)
        # rank the candidates by the policy's scores (default: attention; ties: earlier slot
        # first) and keep the top k of each row
        ranking = self.policy.scores(s - 1, probe, state.policy_state)  # (B, S_prev)
        order = ranking.masked_fill(~cand, float("-inf")).sort(dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=device).expand_as(order))
        chosen = cand & (rank < k[:, None])  # (B, S_prev)
        c = state.n_cols
        bitmap = torch.zeros(b, c + 1, dtype=torch.bool, device=device)
        bitmap.scatter_(1, torch.where(chosen, prev.col, c), True)
        return bitmap[:, :c] | (state.group != IMG), probe, rank

    def _recount(self, state: DecodeState, seg: Segment) -> Segment:
        """Refresh a segment's slot groups and key counts after its slots or mask changed (not on
        the hot path)."""
        g = state.group.gather(1, seg.col.clamp(max=state.n_cols - 1))
        seg.groups = g.masked_fill(~seg.valid, PAD)  # (B, S)
        seg.n_keys = seg.attend.sum(1)
        seg.n_img = ((seg.groups == IMG) & seg.attend).sum(1)
        seg.n_stored = seg.valid.sum(1)
        return seg

    def _next_segment_prefill(self, state, prev: Segment, hidden, probed, s, record, start, end):
        """Build segment s from segment s-1 between layers K_s - 1 and K_s of the prefill; in evict
        mode the pruned image tokens leave the hidden states here, and a merging policy's merged
        states replace those of the slots that carry them."""
        bitmap, probe, rank = self._select(state, s, probed.row, hidden[:, -1], record, current=None, slots=hidden,
                                           rated=probed.rated)  # -1: the last prompt token
        keep = prev.attend if bitmap is None else prev.attend & bitmap.gather(1, prev.col)  # (B, S_prev)
        merged = self.policy.merged_states(s - 1, probe, state.policy_state) if self.policy.merges else None
        if merged is not None:
            replace, states = merged  # (B, S_prev) bool, (B, S_prev, d)
            hidden = torch.where((replace & keep)[:, :, None], states.to(hidden.dtype), hidden)
        if self.prefix and rank is not None:  # mask mode's rank-ordered layout
            index = rank_order((prev.groups == IMG) & prev.attend, rank)  # (B, S_prev), a permutation
            hidden = hidden.gather(1, index[:, :, None].expand(-1, -1, hidden.shape[-1]))
            seg = Segment(start, end, prev.col.gather(1, index), prev.valid.gather(1, index), keep.gather(1, index),
                          in_order=False)
            return self._recount(state, seg), hidden
        if self.mode == "mask":
            seg = Segment(start, end, prev.col, prev.valid, keep)
            return self._recount(state, seg), hidden
        index, valid = compact(keep)  # (B, S_new)
        hidden = hidden.gather(1, index[:, :, None].expand(-1, -1, hidden.shape[-1]))  # (B, S_new, d)
        seg = Segment(start, end, prev.col.gather(1, index), valid, valid)
        return self._recount(state, seg), hidden

    def _decide(self, state: DecodeState, s: int, row: torch.Tensor, hidden: torch.Tensor, record) -> None:
        """A decode-step decision for stage s: shrink (evict) or re-mask (mask) segments s, s+1, ...
        hidden: (B, d) the new token's state after segment s-1."""
        bitmap, _, _ = self._select(state, s, row, hidden, record, current=state.segments[s])
        if bitmap is None:
            return
        for t in range(s, len(state.segments)):
            seg = state.segments[t]
            keep = seg.valid & bitmap.gather(1, seg.col)  # (B, S)
            if self.mode == "mask":
                seg.set_attend(keep if t == s else keep & seg.attend)
                self._recount(state, seg)
                continue
            keep &= seg.attend  # a slot evict mode hid never comes back
            if bool((keep == seg.attend).all()):
                continue  # nothing leaves this segment
            if int((seg.valid & ~keep).sum(1).max()) < self.COMPACT_AT * seg.n:
                seg.set_attend(keep)  # few dead slots: hidden now, gathered out of the cache later
                self._recount(state, seg)
                continue
            index, valid = compact(keep)  # (B, S_new)
            for layer in range(seg.start, seg.end):
                state.cache.layers[layer].keep_slots(index)  # (B, Hkv, S_new, D) in place
            seg.set_slots(seg.col.gather(1, index), valid, valid)
            self._recount(state, seg)
