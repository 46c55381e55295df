"""Generate text for one prompt about one or more images with a pruning policy.

A prompt that contains the image placeholder (<image>; <|image_pad|> for Qwen2-VL) once per image
is used verbatim; otherwise the processor's chat template builds the prompt with the images first.
Give --image several times for a multi-image prompt. With --json, stdout is exactly one JSON object:
{"text", "token_ids" (new tokens only), "trace" (one entry per generated token: attention shares
at the probe layer (and per image for a multi-image prompt), chosen rate, image tokens kept per
layer, FLOPs of the step), "flops" (ratio,
flops, full_flops per convention: prefill, cached, nocache), "retained"}.

Example:
  dyrate generate --model ./llava-ckpt --image cat.png --prompt "Describe the image." \\
      --policy fastv:k=2,r=0.5 --max-new-tokens 32
  dyrate generate --model ./qwen2.5-vl --image a.png --image b.png --prompt "What differs?"
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .common import NONNEGATIVE, POSITIVE, SEED, add_model_arguments, float_range

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_arguments(p)
    p.add_argument("--image", required=True, action="append",
                   help="image file (PNG, JPEG, ...); repeat for a multi-image prompt")
    p.add_argument("--prompt", required=True,
                   help="question or instruction; with one image placeholder per image it is used verbatim")
    p.add_argument("--policy", default="none", help="pruning policy spec, e.g. none, fastv:k=2,r=0.5, vtw:k=16, "
                   "fixed:k=2,r=0.5, schedule:4=0.5,8=0.75, progressive:k=2,0=0.5,8=0.7, dart:k=2,r=0.77, sparsevlm:3=0.48,7=0.653,16=0.81, dyrate:k=2; before the decoder: divprune:r=0.9, "
                   "visionzip:dominant=54,contextual=10, prumerge, prumerge+ (default: none)")
    p.add_argument("--mode", default="evict", choices=["evict", "mask"],
                   help="evict: remove pruned tokens from the KV cache (default); mask: hide them, keep the cache")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=32, help="tokens to generate at most (default 32)")
    p.add_argument("--num-beams", type=POSITIVE, default=1, help="beam search width (default 1: greedy or sampling)")
    p.add_argument("--length-penalty", type=float_range(), default=1.0, help="beam search length penalty (default 1.0)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float_range(0, lo_open=True), default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-k", type=NONNEGATIVE, default=50, help="sampling top-k, 0 disables (default 50)")
    p.add_argument("--top-p", type=float_range(0, 1, lo_open=True), default=1.0, help="sampling nucleus top-p (default 1.0)")
    p.add_argument("--seed", type=SEED, default=None, help="random seed for sampling")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")


def run(args: argparse.Namespace) -> int:
    from ..adapters.inputs import read_image
    from ..api import generate
    from ..engine import GenerationOptions
    from ..policies import parse_policy
    from .common import load_model

    # Check the cheap things before loading a model.
    images = [read_image(path) for path in args.image]
    parse_policy(args.policy)
    GenerationOptions(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=args.do_sample,
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    [res] = generate(
        model, processor, [images], [args.prompt], policy=args.policy, mode=args.mode,
        max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, length_penalty=args.length_penalty,
        do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
    )
    if args.json:
        payload = {"text": res.text, "token_ids": res.token_ids, "trace": res.trace, "flops": res.flops,
                   "retained": res.retained, "policy": res.policy, "mode": res.mode}
        json.dump(payload, sys.stdout)
        sys.stdout.write("\n")
        return 0
    print(res.text)
    fl = res.flops
    print(
        f"[{res.policy}, {res.mode}] {len(res.token_ids)} tokens; image tokens retained {100 * res.retained:.1f}%; "
        f"FLOPs ratio prefill {100 * fl['prefill']['ratio']:.1f}%, cached {100 * fl['cached']['ratio']:.1f}%, "
        f"nocache {100 * fl['nocache']['ratio']:.1f}%",
        file=sys.stderr,
    )
    return 0
