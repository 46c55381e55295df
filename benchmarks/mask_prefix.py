"""Mask mode's rank-ordered prefix path against the plain mask path and evict mode, side by side.

For each policy (kept sets nested: one stage ranked by the prefill) and batch size, three engines
run the same inputs on a random-weight model: `evict`, `mask` with the plain layout
(`rank_prefix=False`) and `mask` with the rank-ordered prefix (the default). The prefix path is
checked token for token against the plain one; timed runs interleave the three (median of
repeats). Reported per side: time to first token, decode ms per step in four phases of the answer
(a shrinking kept set shows there), and the ratio of the prefix path's decode time to each other.

    python benchmarks/mask_prefix.py --config medium --batch 1,16 --new-tokens 64 --repeats 3 --threads 2 \
        --policies "progressive:k=2,0=0.5,16=0.75,32=0.9;fastv:k=2,r=0.75"

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

import torch

from dyrate.adapters import adapter_for
from dyrate.engine import Engine
from dyrate.measure.bench import make_inputs, phase_bounds, random_model, run_once
from dyrate.policies import parse_policy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="medium")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--text-tokens", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--policies", default="progressive:k=2,0=0.5,16=0.75,32=0.9;fastv:k=2,r=0.75")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = random_model(args.config, args.layers, dtype=torch.float32, device="cpu")
    adapter = adapter_for(model)
    sides = {"evict": dict(mode="evict"), "mask": dict(mode="mask", rank_prefix=False),
             "mask prefix": dict(mode="mask", rank_prefix=True)}
    out = {"conditions": dict(config=args.config, layers=args.layers, new_tokens=args.new_tokens,
                              text_tokens=args.text_tokens, repeats=args.repeats, threads=args.threads,
                              dtype="float32", machine=platform.processor() or platform.machine(),
                              torch=torch.__version__), "rows": []}
    bounds = phase_bounds(args.new_tokens - 1)
    for spec in filter(None, (p.strip() for p in args.policies.split(";"))):
        engines = {name: Engine(adapter, parse_policy(spec), **kw) for name, kw in sides.items()}
        assert engines["mask prefix"].prefix, f"{spec}: its kept sets are not nested (no prefix path)"
        for b in map(int, args.batch.split(",")):
            inp = make_inputs(model, b, args.text_tokens, "cpu")
            call = (inp.input_ids, inp.attention_mask, inp.vision)
            tokens = {}
            for name, engine in engines.items():  # warm-up and the equality check (greedy)
                with torch.inference_mode():
                    logits, state = engine.prefill(*call)
                    seq = [logits.argmax(-1)]
                    for _ in range(args.new_tokens - 1):
                        seq.append(engine.decode(state, seq[-1]).argmax(-1))
                tokens[name] = torch.stack(seq, 1).tolist()
            assert tokens["mask prefix"] == tokens["mask"], f"{spec}, batch {b}: the prefix path changed the answer"
            runs = {name: [] for name in engines}
            for _ in range(args.repeats):
                for name, engine in engines.items():
                    runs[name].append(run_once(engine, *call, args.new_tokens))
            for name, results in runs.items():
                ttft = statistics.median(r[0] for r in results)
                decode = statistics.median(r[1] for r in results)
                phases = [1000 * statistics.median(r[5][i][0] for r in results) / (hi - lo + 1)
                          for i, (lo, hi) in enumerate(bounds)]
                row = dict(policy=spec, batch=b, side=name, ttft_ms=1000 * ttft,
                           decode_ms_per_step=1000 * decode / (args.new_tokens - 1), phase_ms_per_step=phases)
                out["rows"].append(row)
            by = {r["side"]: r for r in out["rows"] if r["policy"] == spec and r["batch"] == b}
            for name in ("evict", "mask"):
                by["mask prefix"][f"decode_x_{name.replace(' ', '_')}"] = (
                    by["mask prefix"]["decode_ms_per_step"] / by[name]["decode_ms_per_step"])
            print(f"\n{spec}, batch {b} (prefix answer == plain mask answer: yes)")
            print(f"{'side':<12} {'TTFT ms':>8} {'decode ms/step':>15}  phases ms/step "
                  + " ".join(f"{lo}-{hi}" for lo, hi in bounds))
            for name in engines:
                r = by[name]
                print(f"{name:<12} {r['ttft_ms']:8.1f} {r['decode_ms_per_step']:15.2f}  "
                      + " ".join(f"{v:.2f}" for v in r["phase_ms_per_step"]))
            p = by["mask prefix"]
            print(f"prefix decode time x plain mask: {p['decode_x_mask']:.3f}, x evict: {p['decode_x_evict']:.3f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
