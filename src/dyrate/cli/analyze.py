"""Where does the newest token look? The mean attention share of the system prompt (sys), image
(img), instruction (ins) and response so far (res) at the probe layer, against generation step,
for several layers: the seed's central figure. Writes a PNG and the numbers as JSON.
With --policy SPEC: the share vector that policy's probe saw, the rate it chose and the image
tokens it kept, against generation step (mean over rows, and one row token by token).

Examples:
  dyrate analyze --data runs/heldout --out docs/img/shares.png
  dyrate analyze --model runs/testbed --data runs/heldout --task vqa --layers 0,1,3 --out shares.png
  dyrate analyze --data runs/heldout --policy dyrate:k=2 --mode mask --out rate.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..evaluation.datasets import DEFAULT_CAPTION_PROMPT, TASKS
    from .common import POSITIVE, add_model_arguments

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="testbed data folder or a caption / VQA / POPE file (see `dyrate eval`)")
    p.add_argument("--task", default="caption", choices=TASKS, help="which file of the folder and which prompts [caption]")
    p.add_argument("--prompt", default=DEFAULT_CAPTION_PROMPT, help=f"caption instruction [{DEFAULT_CAPTION_PROMPT!r}]")
    p.add_argument("--layers", default=None, help="probe layers, comma-separated (default: every layer 0..L-2)")
    p.add_argument("--limit", type=POSITIVE, default=50, help="rows to analyse [50]")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=48, help="generation steps at most [48]")
    p.add_argument("--batch-size", type=POSITIVE, default=8, help="rows per generate call [8]")
    p.add_argument("--policy", default=None, help="plot this pruning policy's chosen rate and shares instead (e.g. dyrate:k=2)")
    p.add_argument("--mode", default="evict", choices=("evict", "mask"), help="with --policy: inference mode [evict]")
    p.add_argument("--out", type=Path, required=True, help="PNG to write (the numbers go next to it as .json)")
    p.add_argument("--json", type=Path, default=None, help="where the JSON goes [OUT with suffix .json]")


def _layers(text: str | None, n_layers: int) -> list[int]:
    from ..errors import InputError

    if text is None:
        return list(range(n_layers - 1))
    try:
        layers = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise InputError(f"--layers {text!r}: give comma-separated integers, e.g. 0,1,3") from None
    if not layers:
        raise InputError("--layers is empty")
    return layers


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..evaluation.analyze import attention_shares, plot_policy, plot_shares, policy_trace
    from ..errors import InputError
    from ..evaluation.datasets import load_dataset
    from .common import load_model, writable_file

    if args.out.suffix.lower() != ".png":
        raise InputError(f"--out {args.out}: expected a .png path")
    json_path = args.json or args.out.with_suffix(".json")
    if json_path.resolve() == args.out.resolve():
        raise InputError(f"--json {json_path} is the --out image itself; give another file")
    writable_file(args.out, "--out")
    writable_file(json_path, "--json")
    if args.policy is not None and args.layers is not None:
        raise InputError("--layers and --policy exclude each other (a policy probes its own layer K-1)")
    if args.policy is not None:
        from ..policies import parse_policy

        parse_policy(args.policy)  # a bad spec fails before the model loads
    data = load_dataset(args.task, args.data, limit=args.limit)
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    prompts = [args.prompt if args.task == "caption" else r.question for r in data.rows]
    images = [r.image for r in data.rows]
    model_name = args.model or "built-in testbed model"
    if args.policy is not None:
        with tqdm(total=len(prompts), unit="row", desc="analyze", file=sys.stderr) as bar:
            result = policy_trace(model, processor, images, prompts, args.policy, args.mode, args.max_new_tokens,
                                  args.batch_size, bar.update)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        plot_policy(result, args.out, title=f"{model_name}: {result['policy']} ({args.mode}), {args.task}, {len(prompts)} rows")
        json_path.write_text(json.dumps({"model": model_name, "data": str(data.path), "task": args.task,
                                         "rows": len(prompts), **result}, indent=1) + "\n")
        n = len(result["count"])
        print(f"{result['policy']} ({args.mode}): mean rate {sum(result['rate']) / max(n, 1):.3f} over {n} steps, "
              f"from {min(result['rate']):.2f} to {max(result['rate']):.2f}; mean kept after layer K-1 "
              f"{sum(result['kept']) / max(n, 1):.3f}")
        print(f"wrote {args.out} and {json_path}")
        return 0
    layers = _layers(args.layers, model.config.get_text_config().num_hidden_layers)
    with tqdm(total=len(layers) * len(prompts), unit="row", desc="analyze", file=sys.stderr) as bar:
        result = attention_shares(model, processor, images, prompts, layers, args.max_new_tokens, args.batch_size, bar.update)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_shares(result, args.out, title=f"{model_name}: {args.task}, {len(prompts)} rows")
    payload = {
        "model": model_name,
        "data": str(data.path),
        "task": args.task,
        "rows": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "layers": {str(k): v for k, v in result["layers"].items()},
    }
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    for layer in layers:
        d = result["layers"][layer]
        n = len(d["count"])
        first, later = {g: d[g][0] for g in ("img", "res")}, {g: sum(d[g][1:]) / max(n - 1, 1) for g in ("img", "res")}
        print(f"layer {layer}: img share {first['img']:.3f} at prefill, {later['img']:.3f} mean over {n - 1} decode steps; res {later['res']:.3f}")
    print(f"wrote {args.out} and {json_path}")
    return 0
