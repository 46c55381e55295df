"""Reports of an evaluation run: summary.json, summary.md (one table row per policy) and
pareto.png (quality vs FLOPs ratio, one panel per FLOPs convention)."""

from __future__ import annotations

import json
import math
from pathlib import Path

CONVENTIONS = ("prefill", "cached", "nocache")
COLUMNS = {
    "caption": [("CIDEr", "CIDEr", 1), ("BLEU-4", "BLEU-4", 1), ("ROUGE-L", "ROUGE-L", 1), ("object_f1", "obj F1", 1)],
    "vqa": [("accuracy", "VQA acc", 100), ("exact_match", "exact", 100)],
    "pope": [
        ("accuracy", "acc", 100),
        ("precision", "prec", 100),
        ("recall", "rec", 100),
        ("f1", "F1", 100),
        ("yes_ratio", "yes", 100),
    ],
}


def write_reports(out: Path, summary: dict) -> None:
    out = Path(out)
    try:
        pareto_plot(summary, out / "pareto.png")
    except ImportError as err:  # matplotlib is a dependency; be kind to stripped installs
        summary["notes"].append(f"no pareto.png: {err}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))


def _fmt(v, scale=1, digits=3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if scale == 100:
        return f"{100 * v:.1f}"
    return f"{v:.{digits}f}"


def markdown(summary: dict) -> str:
    task = summary["task"]
    cols = [c for c in COLUMNS[task] if any(c[0] in p["metrics"] for p in summary["policies"])]
    primary = summary["primary_metric"]
    rows = summary["rows"]
    lines = [
        f"# dyrate eval: {task}",
        "",
        f"- model: `{summary['model']}`",
        f"- data: `{summary['data']}`" + (f" (per-image truth: `{summary['truth']}`)" if summary.get("truth") else ""),
        f"- rows: {rows['evaluated']} evaluated, {rows['skipped']} skipped as unusable"
        + (f" (limit {rows['limit']})" if rows.get("limit") else ""),
        f"- mode: {summary['mode']}, {_decoding(summary.get('decoding'))}, max {summary['max_new_tokens']} new tokens, "
        + (f"prompt {summary['prompt']!r}" if task == "caption" else f"question suffix {summary['suffix']!r}")
        + (f"; {summary['processes']} processes" if summary.get("processes", 1) > 1 else ""),
        "",
    ]
    head = ["policy"] + [c[1] for c in cols]
    if summary.get("baseline"):
        head.append(f"{_label(primary)} / none")
    head += ["FLOPs prefill %", "FLOPs cached %", "FLOPs nocache %", "retained %", "KV MiB mean / peak", "latency s",
             "scored", "errors"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for p in summary["policies"]:
        m = p["metrics"]
        cells = [f"`{p['policy']}`"] + [_fmt(m.get(k), scale) for k, _, scale in cols]
        if summary.get("baseline"):
            cells.append(_fmt((p.get("relative") or {}).get(primary)))
        cells += [_fmt(p["flops"][c]["ratio"], 100) for c in CONVENTIONS]
        kv = p.get("kv_bytes") or {}
        kv_cell = f"{kv['mean'] / 2**20:.2f} / {kv['peak'] / 2**20:.2f}" if kv else "-"
        cells += [_fmt(p["retained"], 100), kv_cell, _fmt(p["latency_s"]), str(p["scored"]), str(p["errors"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Quality: "
        + {
            "caption": "CIDEr-D, BLEU-4, ROUGE-L (pycocoevalcap, PTB tokenizer, whole set in one call)"
            + (
                "; obj F1: mean per-image F1 of parsed objects vs the scene"
                if any(c[0] == "object_f1" for c in cols)
                else ""
            ),
            "vqa": "VQA accuracy min(#matching refs / min(3, #refs), 1) after the official answer normalisation, "
            "and exact match, in %",
            "pope": "POPE accuracy, precision, recall, F1 (yes = positive) and yes-ratio, in %, "
            "from each answer's first word",
        }[task]
        + ". FLOPs: decoder layers, FFN as 2dm, mean of per-sample ratios to the unpruned model "
        "(conventions in docs/flops.md). Retained: image tokens attended, mean over pruned layers and steps. "
        "KV: the bytes a row's KV cache holds (every layer's stored entries), its mean over the steps and its "
        "peak, averaged over rows. "
        "Latency: wall time of the batched generate call divided by its rows.",
    ]
    for note in summary.get("notes", []):
        lines.append(f"\nNote: {note}")
    return "\n".join(lines) + "\n"


def _label(metric: str) -> str:
    return {"accuracy": "acc", "f1": "F1"}.get(metric, metric)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (FLOPs no higher and quality no lower, one of them
    strictly), sorted by FLOPs."""
    idx = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            idx.append(i)
    return sorted(idx, key=lambda i: points[i][0])


def pareto_plot(summary: dict, path: Path) -> bool:
    """Quality (primary metric) against FLOPs ratio, one panel per convention. False if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = summary["primary_metric"]
    pts = [(p["policy"], p["metrics"].get(metric), p["flops"]) for p in summary["policies"]]
    pts = [(name, q, fl) for name, q, fl in pts if q is not None and fl["prefill"]["ratio"] is not None]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), sharey=True)
    for ax, conv in zip(axes, CONVENTIONS):
        xy = [(100 * fl[conv]["ratio"], q) for _, q, fl in pts]
        if xy:
            ax.scatter([x for x, _ in xy], [y for _, y in xy], zorder=3)
            front = pareto_front(xy)
            ax.plot(
                [xy[i][0] for i in front],
                [xy[i][1] for i in front],
                "--",
                color="tab:red",
                zorder=2,
                label="Pareto front",
            )
            for (name, _, _), (x, y) in zip(pts, xy):
                ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            ax.legend(loc="lower right", fontsize=7)
        ax.set_xlabel(f"FLOPs ratio, {conv} convention (%)")
        ax.set_title(conv)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    fig.suptitle(
        f"dyrate eval {summary['task']}: {metric} vs FLOPs ({summary['rows']['evaluated']} rows, "
        f"{summary['mode']} mode)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return bool(pts)


def _decoding(options: dict | None) -> str:
    """'greedy', 'beam search (2 beams)', 'sampling (top_p=0.9, seed=0)'."""
    options = {k: v for k, v in (options or {}).items() if k != "greedy"}
    if not options:
        return "greedy"
    if options.get("num_beams", 1) > 1:
        return f"beam search ({options['num_beams']} beams)"
    rest = ", ".join(f"{k}={v}" for k, v in sorted(options.items()) if k != "do_sample")
    return f"sampling ({rest})" if options.get("do_sample") else "greedy"
