"""Cost of the probe and the policy on a decode step: per-step time of `none` (no probe) against
`none:k=K` (probe + policy every step, nothing pruned) and `fixed:k=K,r=0` (probe + policy +
ranking and selection every step, nothing pruned), on the same inputs and cache lengths.

Rounds are interleaved across policies, in alternating order (forward, then reversed), and the
overhead is the median over rounds of the paired ratio (policy / `none` in the same round), so
slow drifts of the machine and order effects hit every policy alike. The last line of output is
one JSON object.

    python benchmarks/probe_overhead.py [--config medium] [--layers L] [--batch 1,16] [--k 2] [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dyrate.adapters import adapter_for
from dyrate.measure.bench import conditions
from dyrate.measure.shapes import make_inputs, random_model
from dyrate.engine import Engine
from dyrate.policies import parse_policy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="medium")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--layers", type=int, default=None, help="truncate the decoder to L layers (big shapes on CPU)")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per round")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = random_model(args.config, layers=args.layers)
    adapter = adapter_for(model)
    specs = ["none", f"none:k={args.k}", f"fixed:k={args.k},r=0"]
    engines = [Engine(adapter, parse_policy(s)) for s in specs]
    results = []
    for b in map(int, args.batch.split(",")):
        inp = make_inputs(model, b, 40, "cpu")
        ids, mask, pixels = inp.input_ids, inp.attention_mask, inp.vision
        times = {s: [] for s in specs}
        with torch.inference_mode():
            for r in range(args.rounds + 1):  # round 0 is warm-up
                pairs = list(zip(specs, engines))
                for spec, engine in (pairs if r % 2 else pairs[::-1]):
                    logits, state = engine.prefill(ids, mask, pixels)
                    tok = logits.argmax(-1)
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        tok = engine.decode(state, tok).argmax(-1)
                    if r:
                        times[spec].append((time.perf_counter() - start) / args.steps)
        row = {"batch": b}
        for spec in specs:
            med = statistics.median(times[spec])
            over = statistics.median(t / n - 1 for t, n in zip(times[spec], times["none"]))  # paired by round
            row[spec] = {"ms_per_step": round(1000 * med, 3), "overhead": round(over, 4)}
            print(f"batch {b:3d}  {spec:16s} {1000 * med:8.2f} ms/step  overhead {100 * over:+.1f}%")
        results.append(row)
    print(json.dumps({"conditions": conditions(model, 40, args.steps + 1, "evict"), "results": results}))


if __name__ == "__main__":
    main()
