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
of vqa.jsonl (10 tokens) and of pope_adversarial.jsonl (5 tokens), in batches of --batch-size
within each task, greedy. One untimed warm-up pass of every policy runs first.
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


def workload(data: Path, captions: int, questions: int) -> list[tuple[str, list, list[str]]]:
    """[(task, images, prompts)] of the mixed workload, images decoded once."""
    out = []
    for task, file, n in (("caption", "captions.json", captions), ("vqa", "vqa.jsonl", questions),
                          ("pope", "pope_adversarial.jsonl", questions)):
        if n < 1:
            continue
        rows = load_dataset(task, data / file, limit=n).rows
        out.append((task, [read_image(r.image) for r in rows], [r.question or DEFAULT_CAPTION_PROMPT for r in rows]))
    return out


def run_policy(model, processor, work, policy: str, mode: str, batch: int) -> tuple[float, list]:
    """(seconds for the whole workload, results)."""
    results = []
    start = time.perf_counter()
    for task, images, prompts in work:
        for i in range(0, len(prompts), batch):
            results += generate(model, processor, images[i:i + batch], prompts[i:i + batch], policy=policy, mode=mode,
                                max_new_tokens=DEFAULT_MAX_NEW_TOKENS[task])
    return time.perf_counter() - start, results


def run_interleaved(model, processor, work, specs: list[str], mode: str, batch: int, offset: int):
    """Every policy runs each batch of the workload in turn, the order rotating from batch to batch:
    ({spec: seconds for the whole workload}, {spec: results}). Pairs at the batch level (a second
    or so), so the machine's drift cancels within far shorter spans than whole-workload repeats."""
    seconds = {s: 0.0 for s in specs}
    results = {s: [] for s in specs}
    j = offset
    for task, images, prompts in work:
        for i in range(0, len(prompts), batch):
            for spec in specs[j % len(specs):] + specs[: j % len(specs)]:
                start = time.perf_counter()
                results[spec] += generate(model, processor, images[i:i + batch], prompts[i:i + batch], policy=spec,
                                          mode=mode, max_new_tokens=DEFAULT_MAX_NEW_TOKENS[task])
                seconds[spec] += time.perf_counter() - start
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
    ap.add_argument("--questions", type=int, default=64, help="rows of vqa.jsonl and of pope_adversarial.jsonl")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--interleave", choices=("workload", "batch"), default="workload",
                    help="workload: each policy runs the whole workload in turn per repeat; batch: the "
                         "policies take turns on every batch (finer pairing, less drift)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [parse_policy(s).spec() for s in args.policies.split(";") if s.strip()]
    model, processor = load(args.model)
    work = workload(Path(args.data), args.captions, args.questions)
    n_rows = sum(len(p) for _, _, p in work)
    times: dict[str, list[float]] = {s: [] for s in specs}
    kv: dict[str, dict] = {}
    retained: dict[str, float] = {}
    with torch.inference_mode():
        for spec in specs:  # warm-up
            run_policy(model, processor, work[:1], spec, args.mode, args.batch_size)
        for r in range(args.repeats):
            if args.interleave == "batch":
                done = run_interleaved(model, processor, work, specs, args.mode, args.batch_size, r)
            else:
                done = ({}, {})
                for spec in specs[r % len(specs):] + specs[: r % len(specs)]:
                    done[0][spec], done[1][spec] = run_policy(model, processor, work, spec, args.mode, args.batch_size)
            for spec in specs:
                seconds, results = done[0][spec], done[1][spec]
                times[spec].append(seconds)
                print(f"repeat {r + 1}/{args.repeats} {spec}: {1000 * seconds / n_rows:.1f} ms/row", file=sys.stderr)
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
        rows.append({"policy": spec, "ms_per_row": 1000 * med / n_rows, "time_ratio": med / ref,
                     "paired_ratios": paired, "times_s": times[spec], **{f"kv_{k}": v for k, v in kv[spec].items()},
                     "retained": retained[spec]})
        print(f"| `{spec}` | {1000 * med / n_rows:.1f} | {med / ref:.3f} | {statistics.median(paired):.3f} "
              f"[{min(paired):.3f}, {max(paired):.3f}] | {kv[spec]['mean'] / 2**20:.3f} / "
              f"{kv[spec]['peak'] / 2**20:.3f} | {kv[spec]['mean'] / kv[specs[0]]['mean']:.3f} | "
              f"{100 * retained[spec]:.1f} |")
    cond = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "dtype": str(next(model.parameters()).dtype), "mode": args.mode, "batch": args.batch_size,
            "rows": {t: len(p) for t, _, p in work}, "repeats": args.repeats, "interleave": args.interleave,
            "torch": torch.__version__}
    print(f"\nconditions: {cond}")
    print(json.dumps({"conditions": cond, "rows": rows}))


if __name__ == "__main__":
    main()
