"""Evaluate pruning policies on a caption, VQA or POPE dataset: quality beside cost, in one run.

Every (row, policy) pair is generated greedily with dyrate.generate and written to
OUT/samples.jsonl as it goes (id, policy, prediction, retained image tokens, FLOPs per convention,
latency, error); rerunning the same command resumes where a killed run stopped. At the end the
whole set is scored in one pass and OUT gets summary.json, summary.md (one row per policy, with
ratios to `none` when it was run) and pareto.png (quality vs FLOPs ratio).

Data formats (docs/eval.md):
  caption  COCO caption JSON (images[].id/file_name, annotations[].image_id/caption);
           CIDEr-D, BLEU-4, ROUGE-L (pycocoevalcap, PTB tokenizer: needs Java), plus object F1
           when a testbed scenes.jsonl sits next to the file
  vqa      JSONL: question_id, image, question, answers (list), [type]; VQA accuracy, exact match
  pope     JSONL: question_id, image, text, label (yes/no); accuracy, precision, recall, F1, yes-ratio
Images are looked up relative to --images, or to the data file's folder, then its images/ folder.
Unusable rows are reported (stderr and OUT/eval.log), skipped and counted.

Examples:
  dyrate eval --model runs/testbed --task caption --data data/captions.json \\
      --policies 'none;fastv:k=2,r=0.5;vtw:k=2' --limit 200 --out runs/eval-caption
  accelerate launch --multi_gpu --num_processes 2 -m dyrate eval --model runs/testbed --task pope \\
      --data data/pope_adversarial.jsonl --policies 'none;fixed:k=2,r=0.75' --out runs/eval-pope
Data parallel: every process takes every N-th row and writes OUT/samples.rank{r}.jsonl; the main
process merges them and scores. On a CPU-only machine use --multi_gpu (it starts N processes that
talk through gloo) or torchrun --nproc_per_node N -m dyrate eval ...; accelerate's --cpu flag
starts a single process unless an MPI hostfile is given.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..evaluation.datasets import DEFAULT_CAPTION_PROMPT, DEFAULT_MAX_NEW_TOKENS, TASKS
    from .common import NONNEGATIVE, POSITIVE, SEED, add_model_arguments, float_range

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_model_arguments(p)
    p.add_argument("--task", required=True, choices=TASKS, help="what the data is and how it is scored")
    p.add_argument("--data", required=True, help="dataset file (a folder works for captions.json / vqa.jsonl)")
    p.add_argument("--images", default=None, help="image folder (default: next to the data file, or its images/)")
    p.add_argument(
        "--policies",
        default="none",
        help="policy specs separated by ';', e.g. 'none;fastv:k=2,r=0.5;vtw:k=2' (default: none)",
    )
    p.add_argument("--out", required=True, help="output folder (created; an existing run in it is resumed)")
    p.add_argument("--limit", type=POSITIVE, default=None, help="evaluate the first N usable rows only")
    p.add_argument("--batch-size", type=POSITIVE, default=8, help="rows per generate call (default 8)")
    defaults = ", ".join(f"{t} {n}" for t, n in DEFAULT_MAX_NEW_TOKENS.items())
    p.add_argument("--max-new-tokens", type=POSITIVE, default=None, help=f"tokens to generate at most (default: {defaults})")
    p.add_argument(
        "--mode",
        default="evict",
        choices=["evict", "mask"],
        help="evict: remove pruned tokens from the KV cache (default); mask: hide them",
    )
    p.add_argument(
        "--prompt", default=DEFAULT_CAPTION_PROMPT, help=f"caption instruction (default: {DEFAULT_CAPTION_PROMPT!r})"
    )
    p.add_argument(
        "--suffix",
        default="",
        help="text appended to every VQA / POPE question, e.g. 'Answer with one word.' (default: none)",
    )
    dec = p.add_argument_group("decoding (default: greedy)")
    dec.add_argument("--num-beams", type=POSITIVE, default=None, help="beam search with N beams")
    dec.add_argument("--do-sample", action="store_true", help="sample instead of greedy / beam search")
    dec.add_argument("--top-p", type=float_range(0, 1, lo_open=True), default=None, help="nucleus sampling threshold (with --do-sample)")
    dec.add_argument("--top-k", type=NONNEGATIVE, default=None, help="top-k sampling (with --do-sample)")
    dec.add_argument("--temperature", type=float_range(0, lo_open=True), default=None, help="sampling temperature (with --do-sample)")
    dec.add_argument("--seed", type=SEED, default=None, help="sampling seed (with --do-sample) [0]")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _state(device: str | None):
    """accelerate's PartialState when started by a multi-process launcher (WORLD_SIZE > 1), else None.
    Processes on CPUs (no CUDA, or --device cpu) talk through gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    return PartialState(cpu=(device or "").startswith("cpu") or not torch.cuda.is_available())


def run(args: argparse.Namespace) -> int:
    from ..evaluation import EvalConfig, prepare, run_eval
    from ..testbed.scoring import SceneObjects
    from .common import load_model

    from ..errors import InputError

    decoding = {}
    if args.num_beams is not None:
        if args.num_beams < 1:
            raise InputError(f"--num-beams must be >= 1, got {args.num_beams}")
        decoding["num_beams"] = args.num_beams
    sampling = {k: getattr(args, k) for k in ("top_p", "top_k", "temperature", "seed") if getattr(args, k) is not None}
    if sampling and not args.do_sample:
        raise InputError(f"--{next(iter(sampling)).replace('_', '-')} needs --do-sample")
    if args.do_sample:
        if args.num_beams not in (None, 1):
            raise InputError("--do-sample and --num-beams > 1 cannot be combined")
        decoding.update({"do_sample": True, "seed": 0, **sampling})
    state = _state(args.device)
    config = EvalConfig(
        task=args.task,
        data=args.data,
        policies=args.policies,
        out=args.out,
        images=args.images,
        limit=args.limit,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        mode=args.mode,
        prompt=args.prompt,
        suffix=args.suffix,
        progress=not args.quiet,
        model_name=str(Path(args.model).resolve()) if args.model else "builtin",
        decoding=decoding,
        truth=SceneObjects(),  # testbed captions (scenes.jsonl beside the file): object F1 too
    )
    plan = prepare(config)  # data and policies are checked before the model loads
    device = args.device
    if device is None and state is not None:
        device = "cpu" if state.device.type == "cpu" else str(state.device)
    model, processor = load_model(args.model, device=device, dtype=args.dtype)
    summary = run_eval(model, processor, plan, state=state)
    if summary is not None:
        sys.stdout.write((Path(config.out) / "summary.md").read_text())
        print(f"\nwrote {config.out}/samples.jsonl, summary.json, summary.md, pareto.png", file=sys.stderr)
    return 0
