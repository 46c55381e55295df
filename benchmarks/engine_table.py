"""One engine table, side by side in one run: `model.generate` with transformers' DynamicCache, with
its static cache (where it runs), dyrate `none` and a pruning policy, on a named random-weight shape
(`dyrate bench`'s configs, the decoder optionally truncated). For every batch: time to the first
token, decode tokens/s, end to end, the process RSS after the side's runs and the KV bytes held at
the end (dyrate: its buffers, spare room included; static cache: its preallocated length); for the
pruning policy also its TTFT speed-up over dyrate `none` beside the one its prefill FLOPs imply.

Inputs are token ids and random pixels (no processor), the same for every side; greedy, exactly
--new-tokens tokens (no EOS). Every side is called once, then the timed calls (N tokens and 1
token) interleave over --repeats rounds; figures are medians; on CUDA every timing synchronises.
Dyrate `none` is checked token for token against `model.generate`. One JSON line per row, then a
markdown table.

    python benchmarks/engine_table.py --config medium --batch 1,16,64 --new-tokens 64 --repeats 3 --threads 2
    python benchmarks/engine_table.py --config llava-1.5-7b --layers 4 --batch 1,16 --threads 2
    bash benchmarks/gpu.sh                 # the GPU table (fp16, CUDA), one command
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time

import psutil
import torch

from dyrate.adapters import adapter_for
from dyrate.engine import Engine, GenerationOptions, generate_tokens
from dyrate.measure.shapes import make_inputs, random_model
from dyrate.measure.flops import DecoderShape, policy_flops
from dyrate.policies import parse_policy


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss() -> int:
    return psutil.Process().memory_info().rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="medium", help="a `dyrate bench` shape: medium, llava-1.5-7b, ...")
    ap.add_argument("--layers", type=int, default=None, help="truncate the decoder to L layers")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--text-tokens", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--policy", default="fastv:k=2,r=0.75", help="the pruning policy beside dyrate none")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                    help="default: float16 on CUDA, float32 on CPU")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--image-side", type=int, default=None,
                    help="image side in pixels for the families whose token count depends on it (default per family)")
    ap.add_argument("--no-static", action="store_true", help="leave out model.generate with the static cache")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if args.device.startswith("cuda") else torch.float32)
    model = random_model(args.config, args.layers, dtype=dtype, device=args.device)
    model.generation_config.eos_token_id = None  # exactly --new-tokens tokens on every side
    adapter = adapter_for(model)
    engines = {"dyrate none": Engine(adapter, parse_policy("none")),
               f"dyrate {args.policy}": Engine(adapter, parse_policy(args.policy))}
    probe = make_inputs(model, 1, args.text_tokens, args.device, image_side=args.image_side)
    n_img = probe.n_img
    shape = dataclasses.replace(DecoderShape.from_config(model.config), n_img=n_img)  # this image's token count
    ideal = 1 / policy_flops(shape, args.policy, args.text_tokens)["ratio"]  # prefill FLOPs-implied TTFT speed-up
    rows = []
    for b in map(int, args.batch.split(",")):
        inp = make_inputs(model, b, args.text_tokens, args.device, image_side=args.image_side)
        ids, mask, vision = inp.input_ids, inp.attention_mask, inp.vision

        def hf(n, cache=None):
            kw = {"cache_implementation": cache} if cache else {}
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, **vision, max_new_tokens=n,
                                     min_new_tokens=n, do_sample=False, return_dict_in_generate=True, **kw)
            kv = out.past_key_values
            held = sum(layer.keys.nbytes + layer.values.nbytes for layer in kv.layers if layer.keys is not None)
            return out.sequences[:, ids.shape[1]:].tolist(), held

        def ours(engine):
            def run(n):
                with torch.inference_mode():
                    outs, state = generate_tokens(engine, ids, mask, vision, GenerationOptions(max_new_tokens=n), [], 0)
                held = sum(getattr(layer, "reserved_bytes", 0) for layer in state.cache.layers)
                return [o.token_ids for o in outs], held
            return run

        sides = {"model.generate (DynamicCache)": lambda n: hf(n)}
        if not args.no_static:
            sides["model.generate (static cache)"] = lambda n: hf(n, "static")
        sides.update({name: ours(engine) for name, engine in engines.items()})
        reference = None
        for name, fn in list(sides.items()):  # untimed first calls; a side that cannot run is left out
            try:
                tokens, _ = fn(args.new_tokens)
            except Exception as err:  # noqa: BLE001 (a transformers cache option that does not run here)
                print(f"{name}: left out ({type(err).__name__}: {str(err).splitlines()[0][:120]})", file=sys.stderr)
                del sides[name]
                continue
            if name.startswith("model.generate (Dynamic"):
                reference = tokens
            if name == "dyrate none" and reference is not None and tokens != reference:
                raise SystemExit("dyrate none differs from model.generate: the table would compare different work")
        e2e = {name: [] for name in sides}
        first = {name: [] for name in sides}
        held = {}
        rss = {name: 0 for name in sides}  # process RSS right after the side's runs (the largest seen)
        for _ in range(args.repeats):
            for name, fn in sides.items():
                for n, into in ((args.new_tokens, e2e), (1, first)):
                    _sync(args.device)
                    start = time.perf_counter()
                    _, kv_bytes = fn(n)
                    _sync(args.device)
                    into[name].append(time.perf_counter() - start)
                    rss[name] = max(rss[name], _rss())
                    if n == args.new_tokens:
                        held[name] = kv_bytes
        ref_ttft = statistics.median(first["dyrate none"])
        for name in sides:
            total, ttft = statistics.median(e2e[name]), statistics.median(first[name])
            row = {"config": args.config, "layers": shape.n_layers, "batch": b, "side": name,
                   "ttft_s": ttft, "decode_tok_s": b * (args.new_tokens - 1) / max(total - ttft, 1e-9),
                   "e2e_s": total, "rss_bytes": rss[name], "kv_bytes": held[name]}
            if name == f"dyrate {args.policy}":
                row.update(ttft_speedup=ref_ttft / ttft, flops_ideal=ideal, of_ideal=ref_ttft / ttft / ideal)
            rows.append(row)
            print(json.dumps(row), flush=True)
    cond = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda")
            else f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)",
            "dtype": str(dtype).replace("torch.", ""), "config": args.config, "layers": shape.n_layers,
            "image_tokens": n_img, "text_tokens": args.text_tokens, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "torch": torch.__version__}
    print(f"\nconditions: {cond}\n")
    print("| batch | side | TTFT s | decode tok/s | x DynamicCache | e2e s | RSS GiB | KV MiB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        base = next(x for x in rows if x["batch"] == r["batch"] and x["side"].startswith("model.generate (Dynamic"))
        extra = f" (TTFT {r['ttft_speedup']:.2f}x none, {r['of_ideal']:.2f} of the FLOPs ideal {r['flops_ideal']:.2f}x)" \
            if "ttft_speedup" in r else ""
        print(f"| {r['batch']} | {r['side']}{extra} | {r['ttft_s']:.3f} | {r['decode_tok_s']:.1f} | "
              f"{r['decode_tok_s'] / base['decode_tok_s']:.2f} | {r['e2e_s']:.2f} | {r['rss_bytes'] / 2**30:.2f} | "
              f"{r['kv_bytes'] / 2**20:.1f} |")


if __name__ == "__main__":
    main()
