"""Per-step oracle labels and a sweep of predictors trained on them, from one preparation.

The oracle bin of a response step is the most pruning (mask mode, hard bins) whose next-token KL
to the unpruned model stays <= D (`dyrate.learn.oracle.oracle_from_kls`). Computing the per-bin
KLs is the expensive part (one teacher-forced pass per bin and sequence), so this script does it
once and then trains one predictor per (KL threshold D, feature set, arch), each exactly as
`dyrate train-predictor --objective oracle --oracle-kl D --lambda 0 [--features shares,hidden] [--rank R]` would on
the same samples. Prints the oracle histogram per D and writes OUT/<arch>-<features>-kl<D>.safetensors
plus OUT/sweep.json (file names: <arch>-<features>-<rank>-kl<D>; with --decide prefill, one label and
one rate per prompt: <arch>-<features>-<rank>-once-kl<D>; with --decide shrink: ...-shrink-kl<D>).

    python research/dyrate_oracle_sweep.py --out runs/sweep --samples 384 --kl 0.005,0.02 \\
        --features shares,shares+hidden --arch mlp [--rank prefill] [--model DIR] [--threads 2]

Training scenes come from `dyrate.testbed.data.predictor_samples` (a seed range the VLM and the held-out set never use).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dyrate.api import load
from dyrate.learn.soft_mask import mask_bank
from dyrate.learn import TrainConfig, build_cache, train
from dyrate.learn.oracle import label_oracle
from dyrate.testbed.data import predictor_samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory [the shipped testbed model]")
    ap.add_argument("--out", required=True)
    ap.add_argument("--samples", type=int, default=384)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--kl", default="0.005,0.02", help="oracle KL thresholds D, comma separated")
    ap.add_argument("--features", default="shares,shares+hidden", help="feature sets, comma separated ('+' joins)")
    ap.add_argument("--arch", default="mlp", help="mlp, gru or mlp,gru")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--bins", type=int, default=10)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--hidden", type=int, default=32, help="predictor hidden size")
    ap.add_argument("--rank", default="step", choices=("step", "prefill"), help="image-token ranking (see train-predictor)")
    ap.add_argument("--decide", default="step", choices=("step", "prefill", "shrink"),
                    help="a rate per step, one per prompt at prefill, or a shrinking one (prefill, shrink: need --rank prefill; see train-predictor)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, processor = load(args.model)
    samples = predictor_samples(model.config.vision_config.image_size, args.samples)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    base = dict(k=args.k, bins=args.bins, steps=args.steps, batch=args.batch, lr=args.lr, hidden=args.hidden,
                lam=0.0, objective="oracle", rank=args.rank, decide=args.decide)
    thresholds = [float(x) for x in args.kl.split(",")]
    t0 = time.time()
    cache = build_cache(model, processor, samples, TrainConfig(**base, oracle_kl=thresholds[0]),
                        args.max_new_tokens, log=log)
    report = {"samples": args.samples, "steps_total": sum(c.n_steps for c in cache),
              "prepare_s": round(time.time() - t0, 1), "runs": []}
    keep_of_bin = mask_bank(args.bins, len(cache[0].img_cols)).float().mean(1)  # (bins,)
    for d in thresholds:
        for arch in args.arch.split(","):
            for feats in args.features.split(","):
                features = tuple(feats.split("+"))
                cfg = TrainConfig(**base, oracle_kl=d, arch=arch, features=features)
                label_oracle(model, cache, cfg, log)
                labels = torch.cat([c.oracle for c in cache])
                once = {"step": "", "prefill": "-once", "shrink": "-shrink"}[args.decide]
                path = out / f"{arch}-{feats.replace('+', '-')}-{args.rank}{once}-kl{d:g}.safetensors"
                for stale in (path, path.with_name(path.stem + ".train-state.safetensors")):
                    stale.unlink(missing_ok=True)  # a fresh run, not a resume
                summary = train(model, processor, samples, cfg, path, progress=False, cache=cache)
                row = {"kl": d, "arch": arch, "features": list(features), "out": str(path),
                       "oracle_histogram": torch.bincount(labels, minlength=args.bins).tolist(),
                       "oracle_keep": round(float(keep_of_bin[labels].mean()), 4),
                       "last": summary["last"]}
                report["runs"].append(row)
                log(json.dumps(row))
    (out / "sweep.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
