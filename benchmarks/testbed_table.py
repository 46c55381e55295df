"""Every policy on the testbed's held-out tasks, in one table: quality (caption object F1 and
CIDEr, short-answer accuracy, POPE F1 per split) beside cost (image tokens retained, FLOPs in the
three conventions, latency). It runs `dyrate eval` (the Python API, so every run is resumable and
keeps its samples) once per task and merges the summaries.

    python benchmarks/testbed_table.py --data runs/heldout --out runs/table \\
        --policies "none;fastv:k=2,r=0.5;fixed:k=2,r=0.75;vtw:k=2" [--model DIR] [--mode mask] \\
        [--captions 100 --questions 300] [--num-beams 2 | --top-p 0.9]

`--replot` redraws OUT/pareto.png from OUT/table.json without running anything.

Writes OUT/table.md (markdown, also printed), OUT/table.json and OUT/pareto.png (relative
quality against retained tokens and against FLOPs in each convention), and OUT/<task>/ per task
(samples.jsonl, summary.json, ...). The data folder is `dyrate testbed data --seed 1 ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dyrate.api import load
from dyrate.evaluation import EvalConfig, prepare, run_eval
from dyrate.testbed.scoring import SceneObjects

# (task, file, column label, metric key in summary.json)
TASKS = [
    ("caption", "captions.json", "obj F1", "object_f1"),
    ("caption", "captions.json", "CIDEr", "CIDEr"),
    ("vqa", "vqa.jsonl", "VQA acc", "accuracy"),
    ("pope", "pope_random.jsonl", "POPE-r F1", "f1"),
    ("pope", "pope_popular.jsonl", "POPE-p F1", "f1"),
    ("pope", "pope_adversarial.jsonl", "POPE-a F1", "f1"),
]
CONVENTIONS = ("prefill", "cached", "nocache")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory [the shipped testbed model]")
    ap.add_argument("--data", required=True, help="held-out folder from `dyrate testbed data`")
    ap.add_argument("--policies", required=True, help="specs separated by ';' (put none first for ratios)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", default="evict", choices=("evict", "mask"))
    ap.add_argument("--captions", type=int, default=100, help="caption rows [100]")
    ap.add_argument("--questions", type=int, default=300, help="rows of the VQA file and of each POPE split [300]")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--num-beams", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None, help="nucleus sampling (seed 0)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--replot", action="store_true", help="only redraw OUT/pareto.png from OUT/table.json")
    args = ap.parse_args()
    if not args.replot and (args.captions < 1 or args.questions < 1):
        sys.exit(f"--captions {args.captions} --questions {args.questions}: the table needs >= 1 row of each "
                 "(time captions or questions alone with benchmarks/workload_time.py)")
    if args.replot:
        plot(json.loads((Path(args.out) / "table.json").read_text())["rows"], Path(args.out) / "pareto.png")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    decoding: dict = {}
    if args.num_beams:
        decoding["num_beams"] = args.num_beams
    if args.top_p is not None:
        decoding.update(do_sample=True, top_p=args.top_p, seed=0)

    model, processor = load(args.model)
    out = Path(args.out)
    results: dict[str, dict[str, dict]] = {}  # policy -> column -> policy summary
    runs = {}
    for task, file, label, key in TASKS:
        run_dir = out / Path(file).stem
        if run_dir not in runs:
            config = EvalConfig(
                task=task, data=Path(args.data) / file, policies=args.policies, out=run_dir, mode=args.mode,
                limit=args.captions if task == "caption" else args.questions, batch_size=args.batch_size,
                model_name=args.model or "builtin", decoding=decoding, progress=True, truth=SceneObjects(),
            )
            print(f"{task}: {file}", file=sys.stderr)
            runs[run_dir] = run_eval(model, processor, prepare(config), log=None)
        for pol in runs[run_dir]["policies"]:
            results.setdefault(pol["policy"], {})[label] = {"value": pol["metrics"].get(key), **pol}

    labels = [label for _, _, label, _ in TASKS]
    base = results.get(next(iter(results)))
    lines = [
        "| policy | " + " | ".join(labels) + " | mean rel. | min rel. | retained % | retained % VQA / POPE | " +
        " | ".join(f"FLOPs {c} %" for c in CONVENTIONS) + " | KV MiB mean / peak | latency ms |",
        "|---|" + "---:|" * (len(labels) + 4 + len(CONVENTIONS) + 2),
    ]
    table = []
    for policy, cols in results.items():
        vals = [cols[label]["value"] for label in labels]
        rel = [v / base[label]["value"] for v, label in zip(vals, labels) if v is not None and base[label]["value"]]
        caption = cols["obj F1"]  # cost columns: the caption run (longest answers)
        cost = {c: caption["flops"][c]["ratio"] for c in CONVENTIONS}
        # KV bytes on the mixed workload: every run's rows (captions, VQA, the POPE splits), row-weighted
        one_per_run = {file: cols[label] for _, file, label, _ in TASKS}.values()  # (captions give two columns)
        kv_rows = [(r["kv_bytes"], r["scored"]) for r in one_per_run if r.get("kv_bytes")]
        n_kv = sum(n for _, n in kv_rows)
        kv = {k: sum(v[k] * n for v, n in kv_rows) / n_kv for k in ("mean", "peak")} if n_kv else None
        row = {"policy": policy, **dict(zip(labels, vals)), "mean_rel": sum(rel) / len(rel) if rel else None,
               "min_rel": min(rel) if rel else None, "kv_bytes": kv,
               "retained": caption["retained"], **{f"flops_{c}": v for c, v in cost.items()},
               "latency_ms": 1000 * caption["latency_s"],
               # a per-step rate keeps a different share on one-word answers than on captions
               "retained_vqa": cols["VQA acc"]["retained"],
               "retained_pope": sum(cols[f"POPE-{s} F1"]["retained"] for s in "rpa") / 3}
        table.append(row)
        lines.append(
            f"| `{policy}` | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals)
            + f" | {row['mean_rel']:.3f} | {row['min_rel']:.3f} | {100 * row['retained']:.1f} | "
            + f"{100 * row['retained_vqa']:.1f} / {100 * row['retained_pope']:.1f} | "
            + " | ".join(f"{100 * cost[c]:.1f}" for c in CONVENTIONS)
            + (f" | {kv['mean'] / 2**20:.3f} / {kv['peak'] / 2**20:.3f}" if kv else " | -")
            + f" | {row['latency_ms']:.1f} |"
        )
    md = "\n".join(lines) + "\n"
    note = (f"\nmode {args.mode}, decoding {decoding or 'greedy'}; captions: {args.captions} rows, VQA and each POPE "
            f"split: {args.questions} rows; cost columns from the caption run (retained image tokens, mean over pruned "
            "layers and steps; the VQA run's and the mean of the POPE runs' beside it; FLOPs ratios to the "
            "unpruned model, decoder only, FFN 2dm); mean rel. / min rel. = mean / smallest over the quality "
            "columns of the ratio to the first policy; KV: the bytes a row's KV cache holds, its mean over the steps "
            "and its peak, averaged over every run's rows (captions and questions: the mixed workload).\n")
    (out / "table.md").write_text(md + note)
    (out / "table.json").write_text(json.dumps({"args": vars(args), "rows": table}, indent=1))
    plot(table, out / "pareto.png")
    print(md + note)


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [("retained", "image tokens retained")] + [(f"flops_{c}", f"FLOPs ratio ({c})") for c in CONVENTIONS]
    fig, axes = plt.subplots(1, len(xs), figsize=(4 * len(xs) + 2.5, 3.4), sharey=True, layout="constrained")
    families: dict[str, list[dict]] = {}
    for row in table:
        name = row["policy"].split(":")[0] + (" (positions=keep)" if "positions=keep" in row["policy"] else "")
        families.setdefault(name, []).append(row)
    colours = plt.cm.tab20.colors  # more series than tab10's ten colours
    for ax, (key, title) in zip(axes, xs):
        for i, (name, rows) in enumerate(families.items()):
            rows = sorted(rows, key=lambda r: r[key])
            ax.plot([r[key] for r in rows], [r["mean_rel"] for r in rows], marker="o", label=name,
                    color=colours[i % len(colours)])
        ax.set_xlabel(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean relative quality")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
