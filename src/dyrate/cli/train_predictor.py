"""Train a rate predictor for `dyrate:predictor=FILE` (mlp) or `dyrate-rnn:predictor=FILE` (gru).

The VLM stays frozen. Each sequence is a prompt plus an answer, teacher-forced. With --objective kl
(the default) the answer is the unpruned model's own greedy one and the fit term is KL(full ||
soft-pruned) on its next-token distributions; with --objective ce it is the reference answer of the
data and the fit term is the soft-pruned model's cross-entropy on it. Plus a compute term (--lambda:
lambda * mean expected kept fraction; --target-keep: a squared budget penalty). See docs/dyrate.md.
Rerunning the same command resumes (state in OUT's .train-state.safetensors file next to it).

Examples:
  dyrate train-predictor --model runs/testbed --testbed --arch gru --lambda 0.1 --out runs/gru.safetensors
  dyrate train-predictor --model runs/testbed --data runs/testbed-data --arch mlp --target-keep 0.4 --out mlp.safetensors
  dyrate train-predictor --model runs/testbed --testbed --arch mlp --objective ce --lambda 0.1 --out runs/ce.safetensors
  dyrate train-predictor --testbed --arch mlp --objective oracle --oracle-kl 0.05 --lambda 0 --rank prefill
      --decide prefill --features shares,hidden --max-new-tokens 64 --out runs/prompt.safetensors   (one command)
  dyrate train-predictor --testbed --arch mlp --objective oracle --oracle-kl 0.001 --lambda 0 --rank prefill
      --decide shrink --features hidden,step --samples 384 --batch 16 --steps 300 --max-new-tokens 64 --out runs/shrink.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys


def _features(text: str) -> tuple[str, ...]:
    from ..learn.predictors import FEATURES

    names = tuple(f.strip() for f in text.split(",") if f.strip())
    if not names or any(n not in FEATURES for n in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct names from {', '.join(FEATURES)}, comma separated")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .common import POSITIVE, SEED, add_model_arguments, float_range, int_range

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_arguments(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", default=None, help="folder with vqa.jsonl / pope_*.jsonl / captions.json (dyrate testbed data)")
    src.add_argument("--testbed", action="store_true", help="procedurally generated testbed scenes and questions")
    p.add_argument("--arch", required=True, choices=("mlp", "gru"), help="mlp (policy dyrate) or gru (policy dyrate-rnn)")
    obj = p.add_mutually_exclusive_group(required=True)
    obj.add_argument("--target-keep", type=float_range(0, 1, lo_open=True), default=None, help="budget: target mean fraction of image tokens kept")
    obj.add_argument("--lambda", dest="lam", type=float_range(0), default=None, help="weight of the mean expected kept fraction")
    p.add_argument("--objective", choices=("kl", "ce", "oracle"), default="kl",
                   help="kl: KL to the unpruned model on its own answers (default); ce: cross-entropy on the data's "
                        "reference answers; oracle: cross-entropy to each step's oracle bin (the most pruning that keeps "
                        "that step's KL <= --oracle-kl), usually with --lambda 0")
    p.add_argument("--oracle-kl", type=float_range(0), default=0.02, help="KL threshold of the oracle objective (default 0.02)")
    p.add_argument("--out", required=True, help="predictor file to write (.safetensors)")
    p.add_argument("--steps", type=POSITIVE, default=200, help="optimizer steps in total (default 200)")
    p.add_argument("--k", type=POSITIVE, default=2, help="first pruned layer K; the probe reads layer K-1 (default 2)")
    p.add_argument("--bins", type=int_range(2, 1000), default=10, help="number of rate bins B (default 10)")
    p.add_argument("--history", type=int_range(0, 100_000), default=8, help="gru: window of share vectors, 0 = unbounded (default 8)")
    p.add_argument("--hidden", type=int_range(1, 8192), default=32, help="hidden size of the predictor (default 32)")
    p.add_argument("--features", default="shares", type=_features,
                   help="comma-separated predictor inputs, in order: shares (the probe's share vector), step "
                        "(log(1 + decode step)), hidden (the newest token's hidden state after layer K-1, RMS-normalised; "
                        "our extension: it tells which token comes next). Without shares and with --rank prefill, no probe "
                        "runs at decode steps (default: shares)")
    p.add_argument("--rank", choices=("step", "prefill"), default="step",
                   help="what ranks the image tokens a bin keeps: each step's probe (default, docs/design.md) or the "
                        "prefill's, as FastV (our extension; stored in the file, used at inference)")
    p.add_argument("--decide", choices=("step", "prefill", "shrink"), default="step",
                   help="step: a rate at every step (default, DyRate); prefill: one rate per prompt, picked at prefill "
                        "and kept (a learned per-image FastV rate); shrink: a rate at every step for the rest of the "
                        "answer, for evict mode (labels: the most pruning that keeps this and every later step's KL "
                        "<= --oracle-kl). prefill and shrink are our extensions and need --objective oracle --rank prefill")
    p.add_argument("--samples", type=POSITIVE, default=64, help="training sequences (default 64)")
    p.add_argument("--batch", type=POSITIVE, default=4, help="sequences per optimizer step (default 4)")
    p.add_argument("--lr", type=float_range(0, lo_open=True), default=3e-3, help="AdamW learning rate (default 3e-3)")
    p.add_argument("--budget-weight", type=float_range(0), default=10.0, help="weight of the --target-keep penalty (default 10)")
    p.add_argument("--tau-start", type=float_range(0, lo_open=True), default=1.0, help="Gumbel-Softmax temperature at the start (default 1)")
    p.add_argument("--tau-end", type=float_range(0, lo_open=True), default=0.1, help="temperature at the last step (default 0.1)")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=24,
                   help="length of the greedy teacher answers, --objective kl only (default 24)")
    p.add_argument("--save-every", type=POSITIVE, default=50, help="training-state checkpoint every N steps (default 50)")
    p.add_argument("--seed", type=SEED, default=0, help="initialisation, data and noise seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print one JSON summary line")


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..evaluation.datasets import training_samples
    from ..learn import TrainConfig, train
    from ..testbed.data import predictor_samples
    from .common import load_model, writable_file

    features = args.features
    cfg = TrainConfig(arch=args.arch, k=args.k, bins=args.bins, history=args.history, hidden=args.hidden,
                      features=features, steps=args.steps, batch=args.batch, lr=args.lr, lam=args.lam,
                      target_keep=args.target_keep, budget_weight=args.budget_weight, tau_start=args.tau_start,
                      tau_end=args.tau_end, seed=args.seed, objective=args.objective,
                      oracle_kl=args.oracle_kl, rank=args.rank, decide=args.decide)
    if not args.out.endswith(".safetensors"):
        raise InputError(f"--out {args.out!r} must end in .safetensors")
    writable_file(args.out, "--out")  # refused now, not after training
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    n_layers = model.config.get_text_config().num_hidden_layers
    if not 1 <= args.k < n_layers:
        raise InputError(f"--k {args.k} must lie in 1..{n_layers - 1} for this {n_layers}-layer decoder")
    if args.testbed:
        # scenes at the vision tower's input size (LLaVA-1.5); families that take any size get the
        # testbed's 96 pixels
        size = getattr(model.config.vision_config, "image_size", None) or 96
        samples = predictor_samples(size, args.samples, args.seed)
    else:
        samples = training_samples(args.data, args.samples)
    log = (lambda msg: print(msg, file=sys.stderr)) if not args.json else None
    summary = train(model, processor, samples, cfg, args.out, max_new_tokens=args.max_new_tokens,
                    save_every=args.save_every, progress=not args.no_progress, log=log)
    if args.json:
        print(json.dumps(summary))
        return 0
    last = summary["last"] or {}
    policy = "dyrate" if args.arch == "mlp" else "dyrate-rnn"
    nan = float("nan")
    print(f"{summary['steps']} steps; last loss {last.get('loss', nan):.4f} ({args.objective.upper()} "
          f"{last.get('fit', last.get('kl', nan)):.4f}, kept {last.get('keep', nan):.3f}); wrote {summary['out']}")
    print(f"use it as --policy {policy}:k={args.k},predictor={summary['out']}")
    return 0
