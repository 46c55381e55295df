"""Analytic FLOPs of a pruning policy, as a ratio to the unpruned model, without loading weights.

The decoder shape comes from a named shape (llava-1.5-7b, llava-1.5-13b, qwen2.5-vl-7b,
llava-next-7b, llava-onevision-7b) or from the config.json of a local checkpoint directory of a
supported family; --image-tokens sets the image tokens of one image where they depend on its size. Every figure names its convention:
  prefill  one forward over the prompt (FastV's Eq. 5, the papers' usual figure)
  cached   prefill plus the decode steps with a KV cache, as generation runs them
  nocache  every generated token recomputes the whole sequence
Beside the ratio it prints its floor: the first K layers are never pruned, so even with every
image token gone from layer K on the ratio cannot go lower. Only policies whose image-token
counts do not depend on the data (e.g. none, fastv, vtw, schedule) are computed here; run the
others with `dyrate generate --json` to get their measured FLOPs. See docs/flops.md."""

from __future__ import annotations

import argparse
import dataclasses
import json

from ..measure.flops import CONVENTIONS, FFN_VARIANTS, MAX_TOKENS, NAMED_SHAPES, policy_flops, resolve_shape
from .common import int_range

EPILOG = """examples:
  dyrate flops --config llava-1.5-7b --policy fastv:k=2,r=0.5 --text-tokens 40
  dyrate flops --config llava-1.5-7b --policy vtw:k=16 --text-tokens 60 --new-tokens 30 --convention cached
  dyrate flops --config qwen2.5-vl-7b --image-tokens 1024 --policy fastv:k=2,r=0.75 --text-tokens 40
  dyrate flops --config path/to/checkpoint --policy schedule:8=0.5,16=0.75 --text-tokens 40 --json"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument(
        "--config", required=True, metavar="NAME|DIR",
        help=f"a named decoder shape ({', '.join(NAMED_SHAPES)}) or a local checkpoint directory",
    )
    parser.add_argument(
        "--image-tokens", type=int_range(1, MAX_TOKENS), default=None, metavar="N",
        help="image tokens of the image (default: the shape's; Qwen2-VL, LLaVA-NeXT and OneVision "
        "give more tokens to larger images, see docs/models.md)",
    )
    parser.add_argument("--policy", required=True, metavar="SPEC", help="policy spec, e.g. fastv:k=2,r=0.5 or vtw:k=16")
    parser.add_argument(
        "--text-tokens", required=True, type=int_range(0, MAX_TOKENS), metavar="N",
        help="prompt tokens that are not image tokens (system prompt and instruction)",
    )
    parser.add_argument(
        "--new-tokens", type=int_range(1, MAX_TOKENS), default=1, metavar="N",
        help="generated tokens (default 1; used by the cached and nocache conventions)",
    )
    parser.add_argument(
        "--convention", default="prefill", metavar="|".join(CONVENTIONS),
        help="what is counted (default prefill, FastV's convention)",
    )
    parser.add_argument(
        "--ffn", default="2dm", metavar="|".join(FFN_VARIANTS),
        help="FFN FLOPs per token: 2dm (default, FastV's paper) or 3dm (a gated FFN's three matrices)",
    )
    parser.add_argument(
        "--json", action="store_true",
        help='print one JSON object {"ratio", "flops", "full_flops", "convention", ...} instead of text',
    )


def _flops(x: float) -> str:
    for unit, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} FLOPs"


def run(args: argparse.Namespace) -> int:
    shape = resolve_shape(args.config)
    if args.image_tokens is not None:
        shape = dataclasses.replace(shape, n_img=args.image_tokens)
    result = policy_flops(shape, args.policy, args.text_tokens, args.new_tokens, args.convention, args.ffn)
    result.update(shape=shape.name, text_tokens=args.text_tokens, new_tokens=args.new_tokens)
    if args.json:
        print(json.dumps(result))
        return 0
    k, n_layers = result["k"], shape.n_layers
    print(
        f"{result['policy']} on {shape.name} ({n_layers} layers), {args.text_tokens} text + {shape.n_img} "
        f"image tokens, {args.new_tokens} new token{'s' if args.new_tokens != 1 else ''}"
    )
    print(
        f"FLOPs ratio {100 * result['ratio']:.2f}% ({args.convention} convention, FFN {args.ffn}): "
        f"{_flops(result['flops'])} of {_flops(result['full_flops'])}"
    )
    if k is None:
        print("no layer is pruned: floor not applicable")
        return 0
    print(f"first {k} layers never pruned: floor {100 * result['floor']:.2f}%" if k else
          f"pre-LLM: every layer sees the reduced image; floor (text only) {100 * result['floor']:.2f}%")
    print(
        f"image tokens retained in layers {k}..{n_layers - 1}: {100 * result['retained']:.2f}% "
        f"(mean {result['retained'] * shape.n_img:.1f} of {shape.n_img})"
    )
    mib = 2**20
    print(
        f"KV cache at the end (fp16, batch 1): {result['kv_cache_bytes'] / mib:.1f} MiB "
        f"of {result['full_kv_cache_bytes'] / mib:.1f} MiB"
    )
    return 0
