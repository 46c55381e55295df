"""Scoring of an evaluation run: the samples of a plan's rows x policies -> one summary dict with the
settings, row counts and, per policy, quality metrics, ratios to `none`, FLOPs in three
conventions, retained image tokens, latency."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from . import metrics as M
from .datasets import CaptionTruth, Row

if TYPE_CHECKING:
    from .runner import Plan

CONVENTIONS = ("prefill", "cached", "nocache")
PRIMARY_METRIC = {"caption": "CIDEr", "vqa": "accuracy", "pope": "f1"}


def summarize(plan: Plan, samples: list[dict] | dict) -> dict:
    """Score the samples of the plan's rows x policies: one dict with the settings, row counts and,
    per policy, quality metrics, ratios to `none`, FLOPs in three conventions, retained, latency."""
    from .store import sample_key

    config, ds = plan.config, plan.dataset
    found = samples if isinstance(samples, dict) else {sample_key(s): s for s in samples}
    per_policy: dict[str, list[tuple[Row, dict]]] = {}
    counts: dict[str, dict[str, int]] = {}
    for p in plan.policies:
        ok, errors, missing = [], 0, 0
        for row in plan.rows:
            s = found.get((row.key, p))
            if s is None:
                missing += 1
            elif s.get("error") or s.get("prediction") is None:
                errors += 1
            else:
                ok.append((row, s))
        per_policy[p] = ok
        counts[p] = {"scored": len(ok), "errors": errors, "missing": missing, "skipped": len(ds.bad)}

    notes: list[str] = []
    quality = _quality(config.task, per_policy, notes, config.truth)
    baseline = next((p for p in plan.policies if p.split(":")[0] == "none"), None)
    policies = []
    for p in plan.policies:
        ok = per_policy[p]
        entry: dict[str, Any] = {"policy": p, "metrics": quality.get(p, {}), **counts[p]}
        flops = {}
        for c in CONVENTIONS:
            fl = [s["flops"][c] for _, s in ok if "flops" in s]
            tot, full = sum(f["flops"] for f in fl), sum(f["full_flops"] for f in fl)
            flops[c] = {
                "ratio": M.mean(f["ratio"] for f in fl),
                "ratio_of_totals": tot / full if full else None,
                "flops": tot,
                "full_flops": full,
            }
        entry["flops"] = flops
        entry["retained"] = M.mean(s["retained"] for _, s in ok)
        kv = [s["kv_bytes"] for _, s in ok if s.get("kv_bytes")]  # (samples from before it was recorded have none)
        entry["kv_bytes"] = {k: M.mean(x[k] for x in kv) for k in ("mean", "peak")} if kv else None
        entry["latency_s"] = M.mean(s["latency_s"] for _, s in ok)
        entry["new_tokens"] = M.mean(s["n_tokens"] for _, s in ok)
        policies.append(entry)
    if baseline is not None:
        base = next(e for e in policies if e["policy"] == baseline)["metrics"]
        for e in policies:
            e["relative"] = {
                k: (
                    v / base[k]
                    if isinstance(v, (int, float)) and isinstance(base.get(k), (int, float)) and base[k]
                    else None
                )
                for k, v in e["metrics"].items()
                if isinstance(v, (int, float))
            }
    missing = sum(c["missing"] for c in counts.values())
    if missing:
        notes.append(f"{missing} (row, policy) pairs have no sample yet: rerun the same command to finish")
    return {
        "task": config.task,
        "data": str(ds.path),
        "model": config.model_name,
        "mode": config.mode,
        "decoding": config.decoding or {"greedy": True},
        "max_new_tokens": config.max_new_tokens,
        "prompt": config.prompt if config.task == "caption" else None,
        "suffix": config.suffix if config.task != "caption" else None,
        "truth": None if ds.truth_file is None else str(ds.truth_file),
        "rows": {"evaluated": len(ds.rows), "skipped": len(ds.bad), "read": ds.n_read, "limit": config.limit},
        "primary_metric": PRIMARY_METRIC[config.task],
        "baseline": baseline,
        "policies": policies,
        "notes": notes,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _quality(task: str, per_policy: dict[str, list[tuple[Row, dict]]], notes: list[str],
             truth: CaptionTruth | None = None) -> dict[str, dict]:
    out: dict[str, dict] = {p: {} for p in per_policy}
    if task == "caption":
        refs = {}
        for ok in per_policy.values():
            for row, _ in ok:
                refs[row.key] = row.references
        preds = {p: {row.key: s["prediction"] for row, s in ok} for p, ok in per_policy.items() if ok}
        try:
            scores = M.caption_metrics_many(preds, refs) if preds else {}
        except M.JavaMissing as err:
            notes.append(f"CIDEr, BLEU-4 and ROUGE-L not computed: {err}")
            scores = {}
        for p, ok in per_policy.items():
            out[p].update(scores.get(p, {}))
            with_truth = [(s["prediction"], row.truth) for row, s in ok if row.truth is not None]
            if with_truth and truth is not None:
                out[p].update(truth.score(with_truth))
    elif task == "vqa":
        for p, ok in per_policy.items():
            if ok:
                out[p] = M.vqa_metrics(
                    [s["prediction"] for _, s in ok], [r.references for r, _ in ok], [r.type for r, _ in ok]
                )
    else:
        for p, ok in per_policy.items():
            if ok:
                out[p] = M.pope_metrics([s["prediction"] for _, s in ok], [r.label for r, _ in ok])
    return out
