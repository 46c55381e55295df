"""Build the testbed: write evaluation data, train the small LLaVA, evaluate it.

  dyrate testbed data  --seed 1 --n 500 --out runs/testbed-data
  dyrate testbed train --config base --steps 6000 --threads 2 --out runs/testbed --stop-after 1500
  dyrate testbed eval  --model runs/testbed --n 200
  dyrate testbed tiny  --family qwen2.5-vl --out runs/tiny-qwen2.5-vl

Training resumes when the same command is run again (state in OUT/train_state/).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import InputError
from .common import POSITIVE, SEED, float_range, int_range, writable_dir, writable_file

HELD_OUT_SEEDS = int_range(0, 999)  # `testbed data` / `testbed eval` seeds; training never uses these scenes
IMAGE_SIZE = int_range(24, 2048)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = parser.add_subparsers(dest="testbed_command", metavar="SUBCOMMAND")
    sub.required = True

    p = sub.add_parser(
        "data",
        help="write a held-out evaluation set (COCO captions, VQA, POPE, scene specs, PNGs)",
        description=(
            "Write N procedurally generated scenes to OUT: captions.json (COCO caption format, "
            "5 references per image), vqa.jsonl (question_id, image, question, answers, type), "
            "pope_{random,popular,adversarial}.jsonl (question_id, image, text, label), "
            "scenes.jsonl (machine-readable specs) and images/*.png. Same seed, same files."
        ),
    )
    p.add_argument("--seed", type=HELD_OUT_SEEDS, default=1, help="dataset seed (0..999; training never uses these scenes) [1]")
    p.add_argument("--n", type=POSITIVE, default=500, help="number of scenes [500]")
    p.add_argument("--out", type=Path, required=True, help="output directory (created)")
    p.add_argument("--image-size", type=IMAGE_SIZE, default=96, help="image side in pixels, 24..2048 [96, the base model's]")
    p.set_defaults(_testbed_run=_run_data)

    p = sub.add_parser(
        "train",
        help="train the testbed LLaVA from scratch (resumable)",
        description=(
            "Train LlavaForConditionalGeneration from scratch on an endless, deterministic stream "
            "of captions, short answers and POPE questions (loss on response tokens, plus a "
            "per-patch attribute loss on the vision tower). Stops after --steps or --minutes "
            "(totals over resumed runs, whichever comes first). Checkpoints go to "
            "OUT/train_state/ every --save-every seconds; rerunning the same command resumes. "
            "Every run ends by writing an ordinary HF checkpoint (fp16) + processor into OUT."
        ),
    )
    p.add_argument("--config", default="base", help="named model config: tiny (tests) or base [base]")
    p.add_argument("--out", type=Path, default=Path("runs/testbed"), help="output directory [runs/testbed]")
    p.add_argument("--steps", type=POSITIVE, default=None, help="total optimizer steps")
    p.add_argument("--minutes", type=float_range(0, lo_open=True), default=None, help="total training minutes")
    p.add_argument("--seed", type=SEED, default=0, help="initialisation and data-stream seed [0]")
    p.add_argument(
        "--stop-after", type=POSITIVE, default=None, metavar="N",
        help="end this invocation after N more steps (checkpoint + export; rerun to continue, same LR schedule)",
    )
    p.add_argument("--batch-size", type=POSITIVE, default=32, help="examples per step [32]")
    p.add_argument("--lr", type=float_range(0, lo_open=True), default=1e-3, help="peak learning rate of the decoder/projector [1e-3]")
    p.add_argument("--vision-lr-mult", type=float_range(0), default=2.0, help="learning-rate multiplier of the vision tower [2]")
    p.add_argument("--aux-weight", type=float_range(0), default=0.5, help="weight of the per-patch vision loss, 0 = off [0.5]")
    p.add_argument(
        "--proj-aux-weight", type=float_range(0), default=0.5,
        help="weight of the per-patch loss on the projector output (attributes and grid cell), 0 = off [0.5]",
    )
    p.add_argument(
        "--loc-aux-weight", type=float_range(0), default=0.0,
        help="weight of a per-patch location loss on the projector output (the 3x3 grid cell each patch lies "
        "in), so image embeddings carry where they are, not only RoPE order; 0 = off [0]",
    )
    p.add_argument(
        "--drop-prob", type=float_range(0, 1), default=0.0,
        help="image-token dropout: fraction of examples whose image tokens are randomly hidden from a random "
        "decoder layer on (robustness to pruning; 0 = off) [0]",
    )
    p.add_argument("--drop-max-rate", type=float_range(0, 1, hi_open=True), default=0.9, help="largest fraction of image tokens hidden [0.9]")
    p.add_argument(
        "--drop-background-first", type=float_range(0, 1), default=0.0,
        help="fraction of the dropout examples that hide background patches first instead of uniformly random ones [0]",
    )
    p.add_argument("--task-weights", default=None,
                   help="training mixture, e.g. caption=0.2,qa=0.5,pope=0.3 (default caption=0.4,qa=0.4,pope=0.2); "
                        "an optional dialog=W adds multi-turn examples: every question type plus a POPE pair "
                        "(binding negative) about one image")
    p.add_argument(
        "--attn-sup-weight", type=float_range(0), default=0.0,
        help="weight of the attention supervision: head 0 of the --attn-sup-layers should look, from a question's "
        "last prompt token, at the objects the question names (teaches content-addressed lookup); 0 = off [0]",
    )
    p.add_argument("--attn-sup-layers", default="2,3", help="decoder layers (0-based) the attention supervision applies to [2,3]")
    p.add_argument("--attn-sup-sink", action="store_true",
                   help="questions that name no present object (absent POPE category, count zero) should look at the "
                        "first token instead (default: they are left out of the attention supervision)")
    p.add_argument("--attn-sup-count", action="store_true",
                   help="count questions should split that attention evenly over the first token and each counted "
                        "object, so the share left on the first token (1/(n+1)) says the count n (default: all on the "
                        "counted objects' patches)")
    p.add_argument(
        "--query-aux-weight", type=float_range(0), default=0.0,
        help="weight of a per-question loss: linear heads read the attributes a question names (shape, colour, "
        "size, position) off its last prompt token as it enters the first --attn-sup-layers layer, so the lookup's "
        "query knows what to look for; 0 = off [0]",
    )
    p.add_argument(
        "--salience-weight", type=float_range(0), default=0.0,
        help="weight of the salience loss: the head-averaged attention of --salience-layer from every turn's last "
        "prompt token (captions too) should put its image share on object patches, so FastV's ranking at that "
        "layer keeps the objects first; 0 = off [0]",
    )
    p.add_argument("--salience-layer", type=int_range(0), default=1,
                   help="decoder layer (0-based) of the salience loss; FastV at K ranks by layer K-1 [1]")
    p.add_argument(
        "--init", type=Path, default=None,
        help="warm start from the weights of an earlier run's --out, or of an exported checkpoint directory such as "
        "the shipped model (new optimizer and LR schedule)",
    )
    precision = p.add_mutually_exclusive_group()
    precision.add_argument("--bf16", dest="bf16", action="store_true", default=None,
                           help="bf16 autocast (default: only where the CPU has native bf16; elsewhere it is far slower)")
    precision.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in fp32")
    p.add_argument("--save-every", type=float_range(0, lo_open=True), default=300.0, help="seconds between checkpoints [300]")
    p.add_argument("--threads", type=POSITIVE, default=None, help="torch intra-op threads [torch default]")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(_testbed_run=_run_train)

    p = sub.add_parser(
        "eval",
        help="caption F1 / CIDEr, short-answer accuracy and POPE of a checkpoint (greedy generate)",
        description=(
            "Evaluate a testbed checkpoint with plain greedy model.generate on N held-out scenes "
            "(the scenes `dyrate testbed data --seed SEED` writes). Prints JSON."
        ),
    )
    p.add_argument("--model", type=Path, required=True, help="checkpoint directory (from `dyrate testbed train`)")
    p.add_argument("--seed", type=HELD_OUT_SEEDS, default=1, help="held-out dataset seed, 0..999 [1]")
    p.add_argument("--n", type=POSITIVE, default=100, help="number of scenes [100]")
    p.add_argument("--blank", action="store_true", help="replace every image by its empty background")
    p.add_argument("--no-cider", action="store_true", help="skip CIDEr (which needs Java)")
    p.add_argument("--batch-size", type=POSITIVE, default=32, help="generation batch size [32]")
    p.add_argument("--threads", type=POSITIVE, default=None, help="torch intra-op threads [torch default]")
    p.add_argument("--json", type=Path, default=None, help="also write the metrics to this file")
    p.set_defaults(_testbed_run=_run_eval)

    _add_tiny(sub)


def _add_tiny(sub) -> None:
    from ..testbed.families import FAMILIES

    p = sub.add_parser(
        "tiny",
        help="write a tiny random checkpoint of a supported family (to try an adapter offline)",
        description=(
            "Write a tiny random-weight checkpoint of FAMILY (4 layers x 64, a character-level "
            "tokenizer, the family's processor and chat-template layout) to OUT, loadable with "
            "`dyrate generate --model OUT`. Its answers are noise: it is for trying the adapters "
            f"and the pruning policies on every family, not for quality. Families: {', '.join(FAMILIES)}."
        ),
    )
    p.add_argument("--family", required=True, choices=FAMILIES, help="model family")
    p.add_argument("--out", type=Path, required=True, help="output directory (created)")
    p.add_argument("--seed", type=SEED, default=0, help="weight seed [0]")
    p.set_defaults(_testbed_run=_run_tiny)


def _run_tiny(args) -> int:
    from ..testbed.families import save_family

    writable_dir(args.out, "--out")
    save_family(args.family, args.out, seed=args.seed)
    print(json.dumps({"out": str(args.out), "family": args.family}))
    return 0


def run(args: argparse.Namespace) -> int:
    return int(args._testbed_run(args) or 0)


def _threads(n: int | None) -> None:
    if n is not None:
        from ..testbed.train import set_threads

        set_threads(n)


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"{flag} {text!r}: give comma-separated integers, e.g. 2,3") from None


def _run_data(args) -> int:
    from ..testbed.data import write_dataset

    writable_dir(args.out, "--out")
    counts = write_dataset(args.out, args.seed, args.n, args.image_size, progress=sys.stderr.isatty())
    print(json.dumps({"out": str(args.out), **counts}))
    return 0


def _run_train(args) -> int:
    from ..testbed.train import TrainArgs, train

    _threads(args.threads)
    writable_dir(args.out, "--out")
    targs = TrainArgs(
        config=args.config,
        out=str(args.out),
        steps=args.steps,
        minutes=args.minutes,
        seed=args.seed,
        batch_size=args.batch_size,
        lr=args.lr,
        vision_lr_mult=args.vision_lr_mult,
        aux_weight=args.aux_weight,
        proj_aux_weight=args.proj_aux_weight,
        loc_aux_weight=args.loc_aux_weight,
        init=None if args.init is None else str(args.init),
        drop_prob=args.drop_prob,
        drop_max_rate=args.drop_max_rate,
        drop_background_first=args.drop_background_first,
        task_weights=args.task_weights,
        attn_sup_weight=args.attn_sup_weight,
        attn_sup_layers=_int_list(args.attn_sup_layers, "--attn-sup-layers"),
        attn_sup_sink=args.attn_sup_sink,
        attn_sup_count=args.attn_sup_count,
        query_aux_weight=args.query_aux_weight,
        salience_weight=args.salience_weight,
        salience_layer=args.salience_layer,
        bf16=args.bf16,
        save_every_s=args.save_every,
        progress=not args.quiet,
        stop_after_steps=args.stop_after,
    )
    summary = train(targs)
    print(json.dumps({"out": str(args.out), **summary}))
    return 0


def _run_eval(args) -> int:
    import torch

    from ..api import load
    from ..testbed.evaluate import evaluate

    _threads(args.threads)
    if args.json is not None:
        writable_file(args.json, "--json")
    model, processor = load(args.model, dtype=torch.float32)  # safetensors only, a LLaVA config, whole weights
    metrics = evaluate(model, processor, seed=args.seed, n=args.n, blank=args.blank, batch_size=args.batch_size, with_cider=not args.no_cider)
    text = json.dumps(metrics, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0
