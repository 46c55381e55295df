"""Quality against measured cost: every policy's relative quality (from `testbed_table.py`'s
table.json) against its measured wall time per row and its mean KV bytes per row (from
`workload_time.py`'s JSON line), both as ratios to the first policy of the timing run (`none`).

    python benchmarks/workload_time.py ... | tail -1 > runs/time.json
    python benchmarks/pareto_time_kv.py --table runs/table/table.json --time runs/time.json --out docs/img/x.png

Policies are matched by spec string (a predictor path is shortened to its file name in labels).
The y axis is the smallest ratio over the quality columns (min rel.), the figure the bar reads.
Several table / timing pairs (e.g. an evict-mode and a mask-mode run) go in one figure: repeat
--table and --time in the same order; each run's ratios are to its own first policy, and a run
in another mode than evict labels its policies with the mode.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def family(spec: str) -> str:
    name = spec.partition(":")[0]
    return {"dyrate-rnn": "dyrate"}.get(name, name)


def label(spec: str) -> str:
    if "predictor=" not in spec:
        return spec
    head, _, rest = spec.partition("predictor=")
    path, _, tail = rest.partition(",")
    return head + Path(path).stem.replace("-prefill-shrink", "") + ("," + tail if tail else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table", required=True, action="append",
                    help="table.json from benchmarks/testbed_table.py (repeat, paired in order with --time)")
    ap.add_argument("--time", required=True, action="append", help="the JSON line of benchmarks/workload_time.py")
    ap.add_argument("--out", required=True, help="PNG to write")
    args = ap.parse_args()
    if len(args.table) != len(args.time):
        ap.error("give as many --time files as --table files (one timing run per table)")
    points, seen = [], set()
    for table, time_file in zip(args.table, args.time):
        quality = {r["policy"]: r for r in json.loads(Path(table).read_text())["rows"]}
        timing = json.loads(Path(time_file).read_text().strip().splitlines()[-1])
        mode = timing["conditions"].get("mode", "evict")
        base = timing["rows"][0]  # ratios within one timing run, to its first policy
        for row in timing["rows"]:
            q = quality.get(row["policy"])
            name = row["policy"] + (f" ({mode})" if mode != "evict" else "")
            if q is None or name in seen:
                continue
            seen.add(name)
            points.append((name, row["ms_per_row"] / base["ms_per_row"], row["kv_mean"] / base["kv_mean"], q["min_rel"]))
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5), sharey=True)
    colours = {}
    for ax, idx, xlabel in ((axes[0], 1, "wall time per row (x none, measured)"),
                            (axes[1], 2, "mean KV-cache bytes per row (x none)")):
        for n, p in enumerate(points, 1):
            c = colours.setdefault(family(p[0]), f"C{len(colours)}")
            ax.scatter(p[idx], p[3], color=c, marker="*" if family(p[0]) == "dyrate" else "o", s=90,
                       label=f"{n}: {label(p[0])}" if idx == 1 else None)
            ax.annotate(str(n), (p[idx], p[3]), fontsize=7, xytext=(3, 3 + 7 * (n % 3)), textcoords="offset points")
        ax.axhline(0.99, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("min over the six quality figures of (policy / none)")
    fig.legend(loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.suptitle("quality vs measured cost (" + ", ".join(f"{k}={v}" for k, v in timing["conditions"].items()
                                                           if k in ("machine", "threads", "batch", "repeats"))
                 + "; ratios to `none` of the same timing run)", fontsize=9)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out} ({len(points)} policies)")


if __name__ == "__main__":
    main()
