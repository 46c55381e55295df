"""Benchmark policies side by side: time to first token, decode tokens/s, end-to-end time, peak
KV-cache memory, FLOPs (three conventions) and retained image tokens, at several batch sizes.

Warm-up is excluded; times are medians over --repeats; the conditions (device, dtype, threads,
shapes) are printed, and the last line of output is one JSON object. Uses CUDA when present.

A second table per batch splits the decode steps into four phases (ms per step, KV bytes held at
each phase's end), so a kept set that shrinks as the answer grows (`progressive`, a `dyrate`
predictor with decide "shrink") shows its decode steps getting cheaper.

Examples:
  dyrate bench --config medium --random-weights --batch 1,16
  dyrate bench --config medium --random-weights --policies "none;fastv:k=2,r=0.5;progressive:k=2,0=0.5,16=0.75,32=0.9"
  dyrate bench --config llava-1.5-7b --random-weights --layers 4 --batch 1 --new-tokens 16
  dyrate bench --config qwen2.5-vl-7b --random-weights --layers 4 --image-side 896 --batch 1
  dyrate bench --model ./llava-ckpt --policies "none;fastv:k=2,r=0.5" --batch 1,8
"""

from __future__ import annotations

import argparse
import json

DEFAULT_POLICIES = "none;fastv:k=2,r=0.5;fastv:k=2,r=0.75;vtw:k=2"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..measure.bench import RANDOM_CONFIGS
    from .common import NONNEGATIVE as NONNEG, POSITIVE, int_range

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="local HF checkpoint directory (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL)")
    src.add_argument("--config", choices=sorted(RANDOM_CONFIGS), help="a named random-weight shape (with --random-weights)")
    p.add_argument("--random-weights", action="store_true", help="build --config with random weights (no download)")
    p.add_argument("--layers", type=POSITIVE, default=None, help="truncate the random model's decoder to L layers")
    p.add_argument("--image-side", type=int_range(28, 4096), default=None, metavar="PX",
                   help="side of the square input image for the families that give larger images more tokens "
                   "(default: Qwen2-VL 448, LLaVA-NeXT 672, OneVision 384; LLaVA-1.5 always its tower's size)")
    p.add_argument("--policies", default=DEFAULT_POLICIES, help=f"specs separated by ';' (default: {DEFAULT_POLICIES})")
    p.add_argument("--batch", default="1,16", help="comma-separated batch sizes (default 1,16)")
    p.add_argument("--new-tokens", type=POSITIVE, default=64, help="tokens generated per row (default 64)")
    p.add_argument("--text-tokens", type=NONNEG, default=40, help="non-image prompt tokens (default 40)")
    p.add_argument("--repeats", type=POSITIVE, default=3, help="timed repeats; the median is reported (default 3)")
    p.add_argument("--mode", default="evict", choices=["evict", "mask"], help="pruning mode (default evict)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="weights dtype (default: float16 on CUDA, float32 on CPU)")
    p.add_argument("--threads", type=POSITIVE, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--json", action="store_true", help="print only the JSON line")


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from ..measure.bench import bench, conditions, random_model
    from ..errors import InputError
    from .common import check_device, policy_list

    specs = policy_list(args.policies)
    try:
        batches = [int(b) for b in args.batch.split(",") if b.strip()]
    except ValueError:
        raise InputError(f"--batch {args.batch!r}: give comma-separated integers, e.g. 1,16") from None
    if not batches or min(batches) < 1:
        raise InputError(f"--batch {args.batch!r}: batch sizes must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = check_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    if args.model:
        from ..api import load

        model, _ = load(args.model, dtype=dtype, device=device)
    elif args.config:
        if not args.random_weights:
            raise InputError("--config needs --random-weights (named shapes are built with random weights)")
        model = random_model(args.config, args.layers, dtype=dtype, device=device)
    else:
        raise InputError("give --model DIR or --config NAME --random-weights")
    console = Console(stderr=args.json, width=None if Console().is_terminal else 150)
    cond = conditions(model, args.text_tokens, args.new_tokens, args.mode, args.image_side)
    console.print("conditions: " + ", ".join(f"{k}={v}" for k, v in cond.items()))
    total = len(specs) * len(batches) * args.repeats
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=total)
        rows = bench(model, specs, batches, args.new_tokens, args.text_tokens, args.repeats, args.mode,
                     progress=lambda: progress.advance(task), image_side=args.image_side)
    base = {r.batch: r for r in rows if r.policy == "none"}
    for b in batches:
        table = Table(title=f"batch {b}")
        for col in ("policy", "TTFT ms", "x", "decode tok/s", "x", "e2e s", "peak KV MiB",
                    "FLOPs prefill", "cached", "nocache", "img kept"):
            table.add_column(col, justify="right", no_wrap=True)
        for r in (r for r in rows if r.batch == b):
            ref = base.get(b)
            table.add_row(
                r.policy, f"{1000 * r.ttft_s:.1f}", f"{ref.ttft_s / r.ttft_s:.2f}" if ref else "-",
                f"{r.decode_tok_s:.1f}", f"{r.decode_tok_s / ref.decode_tok_s:.2f}" if ref else "-",
                f"{r.e2e_s:.2f}", f"{r.peak_kv_bytes / 2**20:.1f}",
                *(f"{100 * r.flops[c]['ratio']:.1f}%" for c in ("prefill", "cached", "nocache")),
                f"{100 * r.retained:.0f}%",
            )
        console.print(table)
        phases = Table(title=f"batch {b}: decode steps by phase (ms per step / KV MiB held at the phase's end)")
        phases.add_column("policy", no_wrap=True)
        for lo, hi, _, _ in rows[0].phases:
            phases.add_column(f"steps {lo}-{hi}", justify="right", no_wrap=True)
        for r in (r for r in rows if r.batch == b):
            phases.add_row(r.policy, *(f"{ms:.2f} / {kv / 2**20:.1f}" for _, _, ms, kv in r.phases))
        console.print(phases)
    console.print("x = speed-up over `none` at the same batch; FLOPs: decoder layers, 2dm FFN (docs/flops.md)")
    payload = {"conditions": cond, "results": [
        {"policy": r.policy, "batch": r.batch, "ttft_s": r.ttft_s, "decode_tok_s": r.decode_tok_s, "e2e_s": r.e2e_s,
         "peak_kv_bytes": r.peak_kv_bytes, "retained": r.retained,
         "flops_ratio": {c: r.flops[c]["ratio"] for c in r.flops},
         "phases": [{"steps": [lo, hi], "ms_per_step": ms, "kv_bytes": kv} for lo, hi, ms, kv in r.phases]}
        for r in rows]}
    print(json.dumps(payload))
    return 0
