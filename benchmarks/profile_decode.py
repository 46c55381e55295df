"""Where a decode step's time goes: cProfile of N decode steps of one policy on a random model.

    python benchmarks/profile_decode.py [--config medium] [--batch 16] [--policy none] [--threads 1]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from dyrate.adapters import adapter_for
from dyrate.measure.shapes import make_inputs, random_model
from dyrate.engine import Engine
from dyrate.policies import parse_policy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="medium")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--policy", default="none")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = random_model(args.config)
    inp = make_inputs(model, args.batch, 40, "cpu")
    ids, mask, pixels = inp.input_ids, inp.attention_mask, inp.vision
    engine = Engine(adapter_for(model), parse_policy(args.policy))
    with torch.inference_mode():
        logits, state = engine.prefill(ids, mask, pixels)
        tok = logits.argmax(-1)
        for _ in range(3):  # warm-up
            tok = engine.decode(state, tok).argmax(-1)
        prof = cProfile.Profile()
        start = time.perf_counter()
        prof.enable()
        for _ in range(args.steps):
            tok = engine.decode(state, tok).argmax(-1)
        prof.disable()
    print(f"{args.policy}, batch {args.batch}, {args.threads} thread(s): "
          f"{1000 * (time.perf_counter() - start) / args.steps:.1f} ms per decode step (profiled)")
    pstats.Stats(prof).sort_stats("tottime").print_stats(8)


if __name__ == "__main__":
    main()
