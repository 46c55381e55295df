"""How much one rate per prompt could save: for every row of a `testbed_table.py` run that holds
`none` and FastV at several rates, the largest rate r such that FastV at r and at every smaller rate
of the run gives exactly the unpruned answer (`r = 0` when even the smallest changes it). Prints,
per task file, the mean image tokens such a per-prompt oracle keeps and the histogram of its rates,
and for captions the same grouped by the scene's object count (from `scenes.jsonl` next to the data).

    python research/fastv_prompt_oracle.py --run runs/s6/val --data runs/val100 [--k 2]

A perfect one-rate-per-prompt predictor (`dyrate --decide prefill`) would reach these figures with
every answer unchanged; FastV's single rate has to keep enough for the hardest prompts.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path
from statistics import mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="output folder of benchmarks/testbed_table.py")
    ap.add_argument("--data", required=True, help="the data folder it ran on (dyrate testbed data)")
    ap.add_argument("--k", type=int, default=2, help="FastV's K in the run's specs [2]")
    ap.add_argument("--n-img", type=int, default=144, help="image tokens per image [144: the testbed]")
    args = ap.parse_args()
    spec = re.compile(rf"fastv:k={args.k},r=([0-9.]+)$")
    scenes = {}
    if (Path(args.data) / "scenes.jsonl").is_file():
        for line in (Path(args.data) / "scenes.jsonl").read_text().splitlines():
            s = json.loads(line)
            scenes[s["image_id"]] = len(s["objects"])
    for task in sorted(p for p in Path(args.run).iterdir() if (p / "samples.jsonl").is_file()):
        answers: dict[int, dict[str, str]] = defaultdict(dict)
        for line in (task / "samples.jsonl").read_text().splitlines():
            row = json.loads(line)
            answers[row["id"]][row["policy"]] = row["prediction"]
        rates = sorted({float(m.group(1)) for a in answers.values() for p in a if (m := spec.match(p))})
        if not rates:
            continue
        best: dict[int, float] = {}
        for rid, a in answers.items():
            r_ok = 0.0
            for r in rates:
                if a.get(f"fastv:k={args.k},r={r:g}") != a["none"]:
                    break
                r_ok = r
            best[rid] = r_ok
        kept = {rid: math.ceil(round((1 - r) * args.n_img, 6)) / args.n_img for rid, r in best.items()}
        hist = sorted(Counter(best.values()).items())
        print(f"{task.name}: {len(kept)} rows, mean kept {100 * mean(kept.values()):.1f}% "
              f"(FastV rates tried {rates}); rows per oracle rate {hist}")
        if task.name == "captions" and scenes:
            by_n: dict[int, list[float]] = defaultdict(list)
            for rid, k in kept.items():
                by_n[scenes[rid]].append(k)
            print("  by object count: " + ", ".join(f"{n}: {100 * mean(v):.1f}% ({len(v)})" for n, v in sorted(by_n.items())))


if __name__ == "__main__":
    main()
