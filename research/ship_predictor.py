"""Write a predictor file with the policy settings chosen for it on validation data (`defaults`:
q, cap, every), so `dyrate:predictor=FILE` (or the shipped default) runs that setting with no
extra flags. The weights are copied unchanged.

    python research/ship_predictor.py runs/s8/shrink/mlp-hidden-step-prefill-shrink-kl0.001.safetensors \\
        --q 0.05 --cap 0.5 --every 8 --out src/dyrate/assets/testbed/predictors/mlp.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses

from dyrate.learn.predictors import load_predictor, save_predictor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("predictor")
    ap.add_argument("--q", type=float, default=None)
    ap.add_argument("--cap", type=float, default=None)
    ap.add_argument("--every", type=int, default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    pred = load_predictor(args.predictor)
    defaults = {k: getattr(args, k) for k in ("q", "cap", "every") if getattr(args, k) is not None}
    pred.config = dataclasses.replace(pred.config, defaults=defaults or None)
    save_predictor(pred, args.out)
    print(f"{args.out}: {defaults}")


if __name__ == "__main__":
    main()
