"""Run every baseline policy on the built-in model and one generated image, side by side:
the answer, the image tokens retained, FLOPs ratios (prefill / cached conventions) and wall time.

Until the trained testbed model ships, the built-in model is a tiny random-weight LLaVA built in
code: its text is gibberish, but the pruning, the traces and the FLOPs are real.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

DEMO_POLICIES = ["none", "fastv:k=2,r=0.5", "fixed:k=2,r=0.75", "schedule:1=0.25,3=0.75", "vtw:k=2"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .common import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--policies", default=";".join(DEMO_POLICIES),
                   help=f"policy specs separated by ';' (default: {';'.join(DEMO_POLICIES)})")
    p.add_argument("--prompt", default="Describe the image.", help="the question asked (default: 'Describe the image.')")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate per policy (default 16)")
    p.add_argument("--out", default=None, help="directory for the demo image (default: a temporary directory)")


def demo_image(path: Path) -> Path:
    """Draw a small scene (a few coloured shapes on a noisy background) and save it."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    base = (200 + rng.integers(-12, 12, size=(96, 96, 3))).clip(0, 255).astype("uint8")
    img = Image.fromarray(base)
    draw = ImageDraw.Draw(img)
    draw.ellipse((8, 8, 40, 40), fill=(220, 30, 30))
    draw.rectangle((56, 56, 88, 88), fill=(30, 60, 220))
    draw.polygon([(60, 10), (88, 40), (32 + 28, 40)], fill=(30, 180, 60))
    img.save(path)
    return path


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..api import generate
    from ..policies import parse_policy
    from .common import load_model

    specs = [s.strip() for s in args.policies.split(";") if s.strip()]
    policies = [parse_policy(s) for s in specs]  # fail before any work on a bad spec
    console = Console()
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dyrate-demo-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    image = demo_image(out_dir / "scene.png")
    console.print(f"image: [bold]{image}[/]   prompt: [bold]{args.prompt!r}[/]")
    table = Table(title="dyrate demo: one image, every policy (greedy)")
    for col in ("policy", "answer", "image tokens kept", "FLOPs prefill", "FLOPs cached", "time (s)"):
        table.add_column(col, overflow="fold")
    generate(model, processor, [image], [args.prompt], max_new_tokens=2)  # warm-up, not timed
    for policy in policies:
        start = time.perf_counter()
        [res] = generate(model, processor, [image], [args.prompt], policy=policy, max_new_tokens=args.max_new_tokens)
        elapsed = time.perf_counter() - start
        table.add_row(
            res.policy, repr(res.text), f"{100 * res.retained:.0f}%",
            f"{100 * res.flops['prefill']['ratio']:.1f}%", f"{100 * res.flops['cached']['ratio']:.1f}%",
            f"{elapsed:.2f}",
        )
    console.print(table)
    console.print("FLOPs: decoder layers only, FFN counted as 2dm (FastV's convention); see docs/flops.md. "
                  "'image tokens kept' averages over the pruned layers and all steps.")
    return 0
