"""Measured wall time per row of every policy on a mixed workload (captions and questions together,
the way a user runs them), side by side: in each repeat every policy runs the whole workload, in an
order that rotates from repeat to repeat (so drift in the machine's speed hits every policy alike);
the figure is the median over repeats of the workload's time divided by its rows, and the ratio
to the first policy's (`--interleave batch`: the policies take turns on every batch instead, so a
repeat's times are paired batch by batch); beside it the paired ratios (per repeat, the time over the first policy's
in the same repeat: median, min and max). Also the mean and peak KV-cache bytes per row (dyrate.generate's kv_bytes).
The last line of the output is one JSON object.

    python benchmarks/workload_time.py --data runs/heldout300 --captions 64 --questions 64 --repeats 5 \\
        --threads 2 --policies "none;fastv:k=2,r=0.5;dyrate:k=2,predictor=P"

Workload: the first C captions (prompt "describe the image.", up to 64 new tokens), the first Q rows
of vqa.jsonl (10 tokens) and of each POPE split in --pope (5 tokens; default the adversarial one),
in batches of --batch-size within each task, greedy. One untimed warm-up pass of every policy runs
first. Besides the whole workload's figures, the captions' and the questions' times are reported
apart (same runs). Issue 15's bar times the held-out table's rows:
--captions 300 --questions 600 --pope random,popular,adversarial.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from dyrate.adapters.inputs import read_image
from dyrate.api import generate, load
from dyrate.evaluation.datasets import DEFAULT_CAPTION_PROMPT, DEFAULT_MAX_NEW_TOKENS, load_dataset
from dyrate.policies import parse_policy
from dyrate.testbed.language import POPE_SPLITS


def workload(data: Path, captions: int, questions: int,
             pope: tuple[str, ...] = ("adversarial",)) -> list[tuple[str, str, list, list[str]]]:
    """[(task, file stem, images, prompts)] of the mixed workload, images decoded once: the first
    `captions` captions, the first `questions` rows of vqa.jsonl and of each POPE split in `pope`."""
    out = []
    files = [("caption", "captions.json", captions), ("vqa", "vqa.jsonl", questions)]
    files += [("pope", f"pope_{split}.jsonl", questions) for split in pope]
    for task, file, n in files:
        if n < 1:
            continue
        rows = load_dataset(task, data / file, limit=n).rows
        out.append((task, Path(file).stem, [read_image(r.image) for r in rows], [r.question or DEFAULT_CAPTION_PROMPT for r in rows]))
    return out


def kind(task: str) -> str:
    """The part of the workload a task's time is reported under: captions or (short-answer) questions."""
    return "captions" if task == "caption" else "questions"


def run_policy(model, processor, work, policy, mode: str, batch: int) -> tuple[dict[str, float], list]:
    """({"captions": seconds, "questions": seconds} for the whole workload, results); policy: a spec or a Policy."""
    results = []
    seconds = {kind(t): 0.0 for t, _, _, _ in work}
    for task, _, images, prompts in work:
        start = time.perf_counter()
        for i in range(0, len(prompts), batch):
            results += generate(model, processor, images[i:i + batch], prompts[i:i + batch], policy=policy, mode=mode,
                                max_new_tokens=DEFAULT_MAX_NEW_TOKENS[task])
        seconds[kind(task)] += time.perf_counter() - start
    return seconds, results


def run_interleaved(model, processor, work, specs: dict, mode: str, batch: int, offset: int):
    """Every policy runs each batch of the workload in turn, the order rotating from batch to batch:
    ({spec: {"captions": seconds, "questions": seconds}}, {spec: results}). Pairs at the batch level
    (a second or so), so the machine's drift cancels within far shorter spans than whole-workload repeats.
    specs: {spec: its Policy}."""
    built, specs = specs, list(specs)
    seconds = {s: {kind(t): 0.0 for t, _, _, _ in work} for s in specs}
    results = {s: [] for s in specs}
    j = offset
    for task, _, images, prompts in work:
        for i in range(0, len(prompts), batch):
            for spec in specs[j % len(specs):] + specs[: j % len(specs)]:
                start = time.perf_counter()
                results[spec] += generate(model, processor, images[i:i + batch], prompts[i:i + batch], policy=built[spec],
                                          mode=mode, max_new_tokens=DEFAULT_MAX_NEW_TOKENS[task])
                seconds[spec][kind(task)] += time.perf_counter() - start
            j += 1
    return seconds, results


def paired_ratios(times: list[float], ref: list[float]) -> list[float]:
    """Per repeat, a policy's time over the reference's in the same repeat: every policy runs once
    per repeat, so the machine's slow drift cancels within a pair (the median of these is less
    noisy than the ratio of medians)."""
    return [t / r for t, r in zip(times, ref)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory [the shipped testbed model]")
    ap.add_argument("--data", required=True, help="folder from `dyrate testbed data`")
    ap.add_argument("--policies", required=True, help="specs separated by ';' (the first is the reference)")
    ap.add_argument("--mode", default="evict", choices=("evict", "mask"))
    ap.add_argument("--captions", type=int, default=64)
    ap.add_argument("--questions", type=int, default=64, help="rows of vqa.jsonl and of each POPE split in --pope")
    ap.add_argument("--pope", default="adversarial",
                    help="POPE splits in the workload, comma separated [adversarial]; issue 15's bar: "
                         "random,popular,adversarial (the held-out table's rows)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--interleave", choices=("workload", "batch"), default="workload",
                    help="workload: each policy runs the whole workload in turn per repeat; batch: the "
                         "policies take turns on every batch (finer pairing, less drift)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pope = tuple(x.strip() for x in args.pope.split(",") if x.strip())
    if not set(pope) <= set(POPE_SPLITS) or len(set(pope)) != len(pope):
        sys.exit(f"--pope {args.pope!r}: expected distinct splits out of {','.join(POPE_SPLITS)}")
    if args.captions < 0 or args.questions < 0 or args.captions + args.questions < 1:
        sys.exit("--captions and --questions: expected counts >= 0, not both 0")
    built = {p.spec(): p for p in (parse_policy(s) for s in args.policies.split(";") if s.strip())}  # parsed once,
    specs = list(built)  # as a user's loop would: a predictor file is read once, not per batch
    model, processor = load(args.model)
    work = workload(Path(args.data), args.captions, args.questions, pope)
    n_rows = sum(len(p) for _, _, _, p in work)
    rows_of = {k: sum(len(p) for t, _, _, p in work if kind(t) == k) for k in ("captions", "questions")}
    parts = [k for k in rows_of if rows_of[k]]
    times: dict[str, list[float]] = {s: [] for s in specs}  # whole workload, per repeat
    part_times: dict[str, dict[str, list[float]]] = {s: {k: [] for k in parts} for s in specs}
    kv: dict[str, dict] = {}
    retained: dict[str, float] = {}
    with torch.inference_mode():
        for spec in specs:  # warm-up
            run_policy(model, processor, work[:1], built[spec], args.mode, args.batch_size)
        for r in range(args.repeats):
            if args.interleave == "batch":
                done = run_interleaved(model, processor, work, built, args.mode, args.batch_size, r)
            else:
                done = ({}, {})
                for spec in specs[r % len(specs):] + specs[: r % len(specs)]:
                    done[0][spec], done[1][spec] = run_policy(model, processor, work, built[spec], args.mode, args.batch_size)
            for spec in specs:
                seconds, results = done[0][spec], done[1][spec]
                times[spec].append(sum(seconds.values()))
                for k in parts:
                    part_times[spec][k].append(seconds[k])
                print(f"repeat {r + 1}/{args.repeats} {spec}: {1000 * times[spec][-1] / n_rows:.1f} ms/row", file=sys.stderr)
                kv[spec] = {k: statistics.mean(x.kv_bytes[k] for x in results) for k in ("mean", "peak")}
                retained[spec] = statistics.mean(x.retained for x in results)
    ref = statistics.median(times[specs[0]])
    rows = []
    print(f"| policy | ms / row (median of {args.repeats}) | x {specs[0]} | paired x {specs[0]}: median [min, max] "
          f"| KV MiB mean / peak | x KV mean | retained % |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for spec in specs:
        med = statistics.median(times[spec])
        paired = paired_ratios(times[spec], times[specs[0]])
        by_part = {k: {"ms_per_row": 1000 * statistics.median(part_times[spec][k]) / rows_of[k],
                       "paired_ratios": paired_ratios(part_times[spec][k], part_times[specs[0]][k]),
                       "times_s": part_times[spec][k]} for k in parts}
        rows.append({"policy": spec, "ms_per_row": 1000 * med / n_rows, "time_ratio": med / ref,
                     "paired_ratios": paired, "times_s": times[spec], **{f"kv_{k}": v for k, v in kv[spec].items()},
                     "retained": retained[spec], "parts": by_part})
        print(f"| `{spec}` | {1000 * med / n_rows:.1f} | {med / ref:.3f} | {_range(paired)} | "
              f"{kv[spec]['mean'] / 2**20:.3f} / {kv[spec]['peak'] / 2**20:.3f} | "
              f"{kv[spec]['mean'] / kv[specs[0]]['mean']:.3f} | {100 * retained[spec]:.1f} |")
    if len(parts) > 1:  # where the time goes: captions and questions apart, from the same runs
        print("\n| policy | " + " | ".join(f"{k}: ms / row | {k}: paired x {specs[0]}" for k in parts) + " |")
        print("|---|" + "---:|---|" * len(parts))
        for row in rows:
            print(f"| `{row['policy']}` | " + " | ".join(
                f"{row['parts'][k]['ms_per_row']:.1f} | {_range(row['parts'][k]['paired_ratios'])}" for k in parts) + " |")
    cond = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "dtype": str(next(model.parameters()).dtype), "mode": args.mode, "batch": args.batch_size,
            "rows": {name: len(p) for _, name, _, p in work}, "repeats": args.repeats,
            "interleave": args.interleave, "torch": torch.__version__}
    print(f"\nconditions: {cond}")
    print(json.dumps({"conditions": cond, "rows": rows}))


def _range(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}]"


if __name__ == "__main__":
    main()
