"""Run the pruning policies side by side on the built-in testbed model and a held-out scene:
the caption and two short answers each policy produces (greedy), the image tokens it retained,
its FLOPs ratio (prefill and cached conventions) and wall time, next to the scene's truth.

Examples:
  dyrate demo
  dyrate demo --scene 3 --policies 'none;fastv:k=2,r=0.75;random:k=2,r=0.75'
  dyrate demo --model runs/testbed --out demo/
  dyrate demo --mode mask --policies 'none;fastv:k=2,r=0.7;dyrate:k=2,predictor=src/dyrate/assets/testbed/predictors/mlp-hidden-prefill.safetensors,q=0.15'
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

BASELINES = ["none", "fastv:k=2,r=0.5", "fastv:k=2,r=0.75", "vtw:k=3"]
CAPTION_PROMPT = "describe the image."


def default_policies() -> list[str]:
    """The baselines, plus DyRate with the shipped MLP predictor when this install has one."""
    from ..assets import predictor_path
    from ..errors import CheckpointError

    try:
        return [*BASELINES, f"dyrate:k=2,predictor={predictor_path('mlp')}"]
    except CheckpointError:
        return list(BASELINES)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .common import NONNEGATIVE, POSITIVE, add_model_arguments

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_arguments(p)
    p.add_argument("--policies", default=None,
                   help=f"policy specs separated by ';' (default: {';'.join(BASELINES)}, and DyRate with the shipped predictor)")
    p.add_argument("--mode", default="evict", choices=("evict", "mask"),
                   help="evict (default) or mask, for every policy (the per-token DyRate predictors need mask)")
    p.add_argument("--scene", type=NONNEGATIVE, default=0, help="which held-out scene (seed-1 set, index >= 0) [0]")
    p.add_argument("--max-new-tokens", type=POSITIVE, default=48, help="tokens to generate per answer at most [48]")
    p.add_argument("--out", default=None, help="directory for the scene image (default: a temporary directory)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..api import generate
    from ..policies import parse_policy
    from ..testbed.data import eval_scene_seed
    from ..testbed.language import caption, short_questions
    from ..testbed.scenes import render, sample_scene
    from .common import load_model, policy_list, writable_dir

    specs = policy_list(args.policies) if args.policies is not None else default_policies()
    policies = [parse_policy(s) for s in specs]  # fail before any work on a bad spec
    if args.out:
        writable_dir(args.out, "--out")
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # logs and pipes: wide enough for a readable caption column
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)
    for pol in policies:
        pol.validate(model.config.get_text_config().num_hidden_layers)
        pol.check_model(model)

    scene = sample_scene(eval_scene_seed(1, args.scene))
    image_size = model.config.vision_config.image_size
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="dyrate-demo-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    image = out_dir / f"scene-{args.scene}.png"
    render(scene, image_size).save(image)
    by_type = {q.type: q for q in short_questions(scene)}
    questions = [by_type[t] for t in ("colour", "count", "shape", "size") if t in by_type][:2]
    prompts = [CAPTION_PROMPT] + [q.question for q in questions]

    console.print(f"image: [bold]{image}[/] ({image_size}x{image_size}, held-out scene {args.scene})")
    answers = Table(title="answers (greedy)")
    answers.add_column("policy", no_wrap=True)
    answers.add_column(f"'{CAPTION_PROMPT}'", ratio=3)
    for q in questions:
        answers.add_column(f"'{q.question}'", ratio=1)
    answers.add_row("[italic]truth[/]", caption(scene), *(q.answer for q in questions), end_section=True)
    cost = Table(title=f"cost ({args.mode} mode)")
    for col in ("policy", "image tokens kept", "FLOPs prefill", "FLOPs cached", "time (s)"):
        cost.add_column(col, no_wrap=col == "policy", justify="left" if col == "policy" else "right")
    images = [image] * len(prompts)
    for policy in policies:
        generate(model, processor, images, prompts, policy=policy, mode=args.mode, max_new_tokens=args.max_new_tokens)  # warm-up
        start = time.perf_counter()
        results = generate(model, processor, images, prompts, policy=policy, mode=args.mode,
                           max_new_tokens=args.max_new_tokens)
        elapsed = time.perf_counter() - start
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        name = _short(results[0].policy)
        answers.add_row(name, *(r.text for r in results))
        cost.add_row(
            name,
            f"{100 * mean([r.retained for r in results]):.0f}%",
            f"{100 * mean([r.flops['prefill']['ratio'] for r in results]):.1f}%",
            f"{100 * mean([r.flops['cached']['ratio'] for r in results]):.1f}%",
            f"{elapsed:.2f}",
        )
    console.print(answers)
    console.print(cost)
    console.print(
        "Time: one generate call per policy (the three prompts as a batch of 3), after an untimed warm-up call. "
        "'image tokens kept': image tokens "
        "retained, averaged over the pruned layers and all steps; FLOPs: decoder only, FFN as 2dm, mean over the "
        "three rows (docs/flops.md)."
    )
    return 0


def _short(spec: str) -> str:
    """A policy spec with a predictor path shortened to its file name."""
    if "predictor=" not in spec:
        return spec
    head, _, path = spec.partition("predictor=")
    return head + "predictor=" + Path(path).name
