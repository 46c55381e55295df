"""Turn the engine's per-step records into a per-token trace, FLOPs ratios and retained tokens."""

from __future__ import annotations

import math

import torch

from . import flops as flops_model
from ..adapters import GROUPS
from ..engine import Engine


def host_records(records: list[dict]) -> list[dict]:
    """The engine's records with every tensor turned into Python lists, once for the whole batch (a
    per-row lookup in a tensor costs more than the row's arithmetic)."""
    return [{k: v.tolist() if torch.is_tensor(v) else [x if isinstance(x, int) else x.tolist() for x in v]
             for k, v in rec.items()} for rec in records]


BATCH_FIRST = ("shares", "image_shares", "rate")  # (B, ...) tensors in a record; the other entries are per-segment lists


def _row(key: str, value: list, row: int) -> list:
    """One row of a host record entry: a (B, ...) nested list, or a per-segment list of ints / (B,) lists."""
    if key in BATCH_FIRST:
        return value[row]
    return [v if isinstance(v, int) else v[row] for v in value]


def row_trace(engine: Engine, records, steps: list[int], shape, n_img: int, n_text: int, dtype_bytes: int = 2):
    """Per-step trace of one output row, its FLOPs in the three conventions, retained tokens and the
    KV-cache bytes the row holds ({"mean", "peak"} over the steps, after each step's forward pass:
    every layer's stored entries x 2 (K, V) x kv heads x head dim x `dtype_bytes`).

    records: the engine's per-step records as `host_records` returns them; steps[t]: the engine row
    that produced new token t."""
    bounds, stages = engine.bounds, engine.stages
    trace, img_per_step, kv_per_step = [], [], []
    entry_bytes = 2 * shape.n_kv_heads * shape.head_dim * dtype_bytes
    for t, row in enumerate(steps):
        rec = {k: _row(k, v, row) for k, v in records[t].items()}
        img_layers = [rec["img"][s] for s, (a, b) in enumerate(bounds) for _ in range(a, b)]
        kv_per_step.append(entry_bytes * sum((b - a) * rec["stored"][s] for s, (a, b) in enumerate(bounds)))
        step_flops = sum(
            (b - a) * flops_model.layer_flops(shape, rec["queries"][s], rec["keys"][s]) for s, (a, b) in enumerate(bounds)
        )
        trace.append({
            "step": t,
            "shares": [None if math.isnan(v[0]) else dict(zip(GROUPS, v)) for v in rec["shares"]],
            # multi-image prompts: the img share split per image, in prompt order (None: not computed)
            "image_shares": [None if not v or math.isnan(v[0]) else v for v in rec.get("image_shares", [[]] * len(stages))],
            "rate": [None if math.isnan(v) else v for v in rec["rate"]],
            "kept": img_layers,  # image tokens attended by each decoder layer
            "flops": step_flops,
            "kv_bytes": kv_per_step[-1],  # the row's KV cache after this step
        })
        img_per_step.append(img_layers)
    fl = {}
    n_new = max(len(steps), 1)
    for conv in ("prefill", "cached", "nocache"):
        steps = img_per_step[:1] if conv == "prefill" else img_per_step
        fl[conv] = flops_model.flops_ratio(shape, steps, n_text, n_new, conv, full_image_tokens=n_img)
    first = 0 if engine.policy.pre_llm else stages[0] if stages else engine.adapter.n_layers
    pruned = [step[first:] for step in img_per_step if step[first:]]
    retained = (sum(map(sum, pruned)) / (len(pruned) * len(pruned[0]) * n_img)) if pruned and n_img else 1.0
    kv = {"mean": sum(kv_per_step) / len(kv_per_step), "peak": max(kv_per_step)} if kv_per_step else {}
    return trace, fl, retained, kv
