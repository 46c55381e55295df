"""Generation time of dyrate, relative to `model.generate` (DynamicCache), on the same random model.

Every side runs end to end from PIL image + prompt (processor included); dyrate `none` produces the
same tokens as `model.generate` (checked), other `--policies` are timed beside them. Each side is
called once before timing; the timed calls interleave (so drifts hit every side alike) and the
figures are medians over repeats: end to end, with one new token (the time to the first token),
and decode tokens/s from their difference. The last line of the output is one JSON object.

    python benchmarks/engine_overhead.py [--layers 8] [--hidden 512] [--image-size 192] [--batch 1,16]
        [--new-tokens 64] [--policies "none;fastv:k=2,r=0.75"]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

import dyrate
from dyrate.api import build_prompt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the tiny-model fixture lives with the tests
from tiny import tiny_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--image-size", type=int, default=96, help="pixels; patch 8, so (size/8)^2 image tokens")
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--policies", default="none", help="dyrate policies timed beside model.generate (';'); none is "
                    "checked token for token against it")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    def build():
        model, processor = tiny_model(seed=0, n_layers=args.layers, hidden=args.hidden, heads=8, kv_heads=8,
                                      image_size=args.image_size, max_positions=4096)
        model.generation_config.eos_token_id = None  # both sides generate exactly --new-tokens tokens
        return model.to(args.device), processor

    ours, processor = build()
    vanilla, _ = build()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for b in map(int, args.batch.split(",")):
        images = [Image.fromarray((torch.rand(64, 64, 3, generator=gen) * 255).to(torch.uint8).numpy()) for _ in range(b)]
        prompts = [f"Describe picture number {i} in a few words." for i in range(b)]

        def run_hf(n=args.new_tokens):
            batch = processor(images=images, text=[build_prompt(processor, p) for p in prompts], return_tensors="pt",
                              padding=True, padding_side="left").to(args.device)
            with torch.inference_mode():
                out = vanilla.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            return out[:, batch["input_ids"].shape[1]:].tolist()

        def runner(policy):
            def run(n=args.new_tokens):
                res = dyrate.generate(ours, processor, images, prompts, policy=policy, max_new_tokens=n)
                return [r.token_ids for r in res]
            return run

        policies = [p.strip() for p in args.policies.split(";") if p.strip()]
        fns = {"hf": run_hf, **{p: runner(p) for p in policies}}
        if "none" in fns:
            assert run_hf() == fns["none"](), "token mismatch"
        for name, fn in fns.items():
            if name not in ("hf", "none"):
                fn()  # the untimed first call of the other policies too
        times = {name: [] for name in fns}
        first = {name: [] for name in fns}  # one new token: the time to the first token
        for _ in range(args.repeats):  # interleaved, so drifts hit every side alike
            for name, fn in fns.items():
                for n, into in ((args.new_tokens, times), (1, first)):
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    fn(n)
                    if args.device == "cuda":
                        torch.cuda.synchronize()
                    into[name].append(time.perf_counter() - start)
        med = {name: statistics.median(v) for name, v in times.items()}
        ttft = {name: statistics.median(v) for name, v in first.items()}
        tok_s = {name: b * (args.new_tokens - 1) / max(med[name] - ttft[name], 1e-9) for name in fns}
        hf = med["hf"]
        n_img = (args.image_size // 8) ** 2
        for policy in policies:
            t = med[policy]
            rows.append({"batch": b, "policy": policy, "hf_s": round(hf, 4), "dyrate_s": round(t, 4),
                         "ratio": round(t / hf, 4), "speedup": round(hf / t, 4),
                         "hf_ttft_s": round(ttft["hf"], 4), "dyrate_ttft_s": round(ttft[policy], 4),
                         "hf_decode_tok_s": round(tok_s["hf"], 2), "dyrate_decode_tok_s": round(tok_s[policy], 2),
                         "decode_speedup": round(tok_s[policy] / tok_s["hf"], 4)})
            print(f"batch {b}: model.generate {hf:.3f} s, dyrate {policy} {t:.3f} s (speed-up {hf / t:.2f}x); "
                  f"TTFT {ttft['hf']:.3f} / {ttft[policy]:.3f} s; decode {tok_s['hf']:.1f} / {tok_s[policy]:.1f} tok/s "
                  f"({tok_s[policy] / tok_s['hf']:.2f}x); median of {args.repeats}; {n_img} image tokens, "
                  f"{args.new_tokens} new tokens")
    cond = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
        "threads": args.threads, "dtype": str(ours.dtype), "layers": args.layers, "hidden": args.hidden,
        "image_tokens": (args.image_size // 8) ** 2, "new_tokens": args.new_tokens, "torch": torch.__version__,
    }
    print(json.dumps({"conditions": cond, "results": rows}))


if __name__ == "__main__":
    main()
