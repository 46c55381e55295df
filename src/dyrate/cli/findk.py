"""VTW's choice of the withdrawal layer: on a few calibration samples, the mean KL divergence of the
next-token distribution with and without every image token withdrawn from layer K on (the
unpruned model's greedy answer teacher-forced through both), for every K; the chosen K is the
first layer whose mean KL is below --eta (VTW, Lin et al. 2024, uses eta = 0.003 on ~20 samples).

Example:
  dyrate findk --model runs/testbed --task vqa --data data/vqa.jsonl --limit 20 --eta 0.003
"""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..evaluation.datasets import DEFAULT_CAPTION_PROMPT, TASKS
    from .common import POSITIVE, add_model_arguments, float_range

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_arguments(p)
    p.add_argument("--task", required=True, choices=TASKS, help="format of --data (as in dyrate eval)")
    p.add_argument("--data", required=True, help="calibration data file (caption JSON, VQA or POPE JSONL)")
    p.add_argument("--images", default=None, help="image folder (default: next to the data file)")
    p.add_argument("--limit", type=POSITIVE, default=20, help="calibration samples (default 20)")
    p.add_argument("--eta", type=float_range(0, lo_open=True), default=0.003, help="KL threshold (default 0.003, as in VTW)")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=16, help="answer tokens per sample (default 16)")
    p.add_argument("--prompt", default=DEFAULT_CAPTION_PROMPT, help="instruction for caption data")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from ..errors import InputError
    from ..evaluation.datasets import load_dataset
    from ..measure.findk import find_k
    from .common import load_model

    if args.limit < 1:
        raise InputError(f"--limit must be >= 1, got {args.limit}")
    data = load_dataset(args.task, args.data, args.images, args.limit)
    if not data.rows:
        raise InputError(f"{args.data}: no usable rows ({len(data.bad)} skipped)")
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    images = [row.image for row in data.rows]
    prompts = [row.question or args.prompt for row in data.rows]
    console = Console(stderr=True)
    n_layers = model.config.get_text_config().num_hidden_layers
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("KL per layer", total=len(prompts) * (n_layers - 1))
        res = find_k(model, processor, images, prompts, eta=args.eta, max_new_tokens=args.max_new_tokens,
                     progress=lambda: progress.advance(task))
    if args.json:
        print(json.dumps({"k": res.k, "eta": res.eta, "kl": res.kl, "samples": res.samples, "tokens": res.tokens}))
        return 0
    for k, kl in res.kl.items():
        mark = "  <- first under eta" if k == res.k else ""
        print(f"K={k:3d}  mean KL {kl:.6f}{mark}")
    verdict = f"vtw:k={res.k}" if res.k is not None else f"no layer under eta={res.eta:g}"
    print(f"{res.samples} samples, {res.tokens} answer tokens: {verdict}")
    return 0
