"""Train the testbed LLaVA from scratch on the procedural scene mixture.

The loop reads top to bottom: build a batch (deterministic from seed and step), run the vision
tower, projector and decoder by hand (the same computation as `LlavaForConditionalGeneration`,
tests check it), add an auxiliary per-patch loss on the vision tower, step AdamW.

Loss = cross-entropy on response tokens only + `aux_weight` x per-patch attribute loss: a small
head reads each patch feature of the tower's output and predicts the (shape, colour, size) of
the object covering the patch (or background). It gives the tower a direct signal about shapes,
which a prototype trained on the caption loss alone never learned (shape stayed at chance).
The head is training-only and is not part of the exported model.

Checkpoints: `OUT/train_state/` holds `model.safetensors` (fp32 weights + aux head),
`optimizer.safetensors` (AdamW moments) and `state.json` (step, elapsed time, arguments);
no pickle anywhere. Rerunning the same command resumes from it. Every invocation ends by
exporting an ordinary HF checkpoint into OUT (fp16 weights + processor).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

from ..errors import InputError
from .batches import BatchBuilder, sample_dropout
from .checkpoints import export, init_from, load_state, save_state
from .configs import build_config, get_spec
from .data import parse_task_weights, train_scene_seed
from .losses import Aux, compute_loss
from .processing import IMAGE, build_processor
from .train_args import STATE_DIR, TrainArgs, lr_factor


def make_optimizer(model, aux: Aux, args: TrainArgs) -> torch.optim.AdamW:
    """AdamW with two learning rates (vision tower + aux head higher) and no decay on
    biases, norms and embeddings of size-1 dims."""
    groups: dict[tuple[float, float], list] = {}
    named = [(f"model.{n}", p) for n, p in model.named_parameters()] + [(f"aux.{n}", p) for n, p in aux.named_parameters()]
    for name, p in named:
        mult = args.vision_lr_mult if ("vision_tower" in name or name.startswith("aux.")) else 1.0
        decay = args.weight_decay if p.ndim >= 2 and "embed" not in name else 0.0
        groups.setdefault((mult, decay), []).append(p)
    param_groups = [{"params": ps, "lr_mult": m, "weight_decay": d, "lr": args.lr * m} for (m, d), ps in groups.items()]
    return torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-8)

def build_model(config_name: str, seed: int, with_loc: bool = False, with_query: bool = False):
    """(model, aux heads, processor) of a named config, initialised from `seed`."""
    spec = get_spec(config_name)
    processor = build_processor(spec.image_size, spec.patch_size)
    tok = processor.tokenizer
    config = build_config(
        config_name,
        vocab_size=len(tok),
        image_token_id=tok.convert_tokens_to_ids(IMAGE),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    aux = Aux(config.vision_config.hidden_size, config.text_config.hidden_size, with_loc, with_query)
    return model, aux, processor

def train(args: TrainArgs) -> dict:
    """Train (or resume) and export. Returns a summary dict."""
    from tqdm import tqdm

    args.validate()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, aux, processor = build_model(args.config, args.seed, with_loc=args.loc_aux_weight > 0, with_query=args.query_aux_weight > 0)
    opt = make_optimizer(model, aux, args)
    state_json = out / STATE_DIR / "state.json"
    if state_json.exists():
        previous = json.loads(state_json.read_text())["args"]["config"]
        if previous != args.config:
            raise InputError(f"{out} holds a training state of config {previous!r}, not {args.config!r}; use another --out")
    state = load_state(out, model, aux, opt)
    if state is None and args.init is not None:
        counts = init_from(Path(args.init), model, aux)
        print(f"initialised from {args.init}: {counts['loaded']} tensors loaded, {counts['fresh']} new", flush=True)
    step = state["step"] if state else 0
    elapsed = state["elapsed_s"] if state else 0.0
    builder = BatchBuilder(processor, args.config, None if args.task_weights is None else parse_task_weights(args.task_weights))
    log_path = out / "train_log.jsonl"

    def progress() -> float:
        fr = []
        if args.steps:
            fr.append(step / args.steps)
        if args.minutes:
            fr.append(elapsed / (60 * args.minutes))
        return max(fr)

    def state_dict() -> dict:
        return {"step": step, "elapsed_s": elapsed, "args": {k: v for k, v in asdict(args).items() if k != "stop_after_steps"}}

    bf16 = args.use_bf16()
    model.train()
    aux.train()
    bar = tqdm(total=args.steps, initial=step, disable=not args.progress, unit="step", desc=f"train {args.config}")
    last_save = time.monotonic()
    ema = None
    start_step = step
    while progress() < 1.0:
        if args.stop_after_steps is not None and step - start_step >= args.stop_after_steps:
            break
        t0 = time.monotonic()
        seeds = [train_scene_seed(args.seed, step, args.batch_size, i) for i in range(args.batch_size)]
        batch = builder.build(seeds)
        factor = lr_factor(step, progress(), args)
        for g in opt.param_groups:
            g["lr"] = args.lr * g["lr_mult"] * factor
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            drop = sample_dropout(batch["input_ids"], model.config.image_token_id, model.config.text_config.num_hidden_layers,
                                  args, step, background=batch["patch_targets"][..., 0] == 0)
            loss, parts = compute_loss(model, aux, batch, args.aux_weight, args.proj_aux_weight, drop, args.loc_aux_weight,
                                       args.attn_sup_weight, args.attn_sup_layers, args.query_aux_weight, args.attn_sup_sink,
                                       args.attn_sup_count, args.salience_weight, args.salience_layer)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(aux.parameters()), 1.0)
        opt.step()
        step += 1
        dt = time.monotonic() - t0
        elapsed += dt
        ema = parts["loss"] if ema is None else 0.95 * ema + 0.05 * parts["loss"]
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", lm=f"{parts['lm']:.3f}", s_step=f"{dt:.2f}", min=f"{elapsed / 60:.1f}")
        if step % args.log_every == 0 or step == 1:
            with log_path.open("a") as f:
                f.write(json.dumps({"step": step, "elapsed_s": round(elapsed, 1), "lr": args.lr * factor, "s_step": round(dt, 3), **parts}) + "\n")
        if time.monotonic() - last_save >= args.save_every_s:
            save_state(out, model, aux, opt, state_dict())
            last_save = time.monotonic()
    bar.close()
    save_state(out, model, aux, opt, state_dict())
    summary = {
        "config": args.config,
        "steps": step,
        "train_minutes": round(elapsed / 60, 2),
        "batch_size": args.batch_size,
        "seed": args.seed,
        "init": args.init,
        "proj_aux_weight": args.proj_aux_weight,
        "loc_aux_weight": args.loc_aux_weight,
        "drop_prob": args.drop_prob,
        "drop_max_rate": args.drop_max_rate,
        "drop_background_first": args.drop_background_first,
        "task_weights": args.task_weights,
        "attn_sup_weight": args.attn_sup_weight,
        "attn_sup_layers": list(args.attn_sup_layers),
        "attn_sup_sink": args.attn_sup_sink,
        "attn_sup_count": args.attn_sup_count,
        "query_aux_weight": args.query_aux_weight,
        "salience_weight": args.salience_weight,
        "salience_layer": args.salience_layer,
        "bf16": bf16,
        "final_loss_ema": ema,
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch_threads": torch.get_num_threads(),
    }
    export(model, processor, out, summary)
    return summary

def set_threads(n: int) -> None:
    """Pin intra-op threads (and OMP for child code) before any heavy work."""
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    torch.set_num_threads(n)
