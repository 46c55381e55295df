"""Testbed training checkpoints: the resumable state under OUT/train_state/ (model + aux heads and
AdamW moments as safetensors, state.json; no pickle anywhere), warm starts from an exported model,
and the export of an ordinary HF checkpoint (fp16 weights + processor)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

from ..errors import CheckpointError
from .train_args import STATE_DIR


def _named_params(model, aux) -> dict[str, torch.Tensor]:
    out = {f"model.{n}": p for n, p in model.named_parameters()}
    out.update({f"aux.{n}": p for n, p in aux.named_parameters()})
    return out

def save_state(out: Path, model, aux, opt: torch.optim.AdamW, state: dict) -> None:
    """Write OUT/train_state atomically (tmp dir, then rename)."""
    final = out / STATE_DIR
    tmp = out / (STATE_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    params = _named_params(model, aux)
    save_file({n: p.detach().contiguous() for n, p in params.items()}, str(tmp / "model.safetensors"))
    moments, steps = {}, {}
    by_id = {id(p): n for n, p in params.items()}
    for p, st in opt.state.items():
        n = by_id[id(p)]
        moments[f"{n}.exp_avg"] = st["exp_avg"].contiguous()
        moments[f"{n}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
        steps[n] = float(st["step"])
    save_file(moments, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "adam_steps": steps}, indent=1))
    old = out / (STATE_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)

def load_state(out: Path, model, aux, opt: torch.optim.AdamW) -> dict | None:
    """Restore weights and optimizer from OUT/train_state; None if there is none."""
    d = out / STATE_DIR
    if not (d / "state.json").exists():
        return None
    try:
        state = json.loads((d / "state.json").read_text())
        weights = load_file(str(d / "model.safetensors"))
        moments = load_file(str(d / "optimizer.safetensors"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{d} is not a usable training state: {err}") from err
    params = _named_params(model, aux)
    missing = set(params) - set(weights)
    if missing:
        raise CheckpointError(f"{d}: training state lacks {len(missing)} tensors (e.g. {sorted(missing)[0]})")
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != weights[n].shape:
                raise CheckpointError(f"{d}: {n} has shape {tuple(weights[n].shape)}, model wants {tuple(p.shape)}")
            p.copy_(weights[n])
    for n, p in params.items():
        if n in state["adam_steps"]:
            opt.state[p] = {
                "step": torch.tensor(state["adam_steps"][n]),
                "exp_avg": moments[f"{n}.exp_avg"].clone(),
                "exp_avg_sq": moments[f"{n}.exp_avg_sq"].clone(),
            }
    return state

def init_from(run: Path, model, aux) -> dict[str, int]:
    """Copy the weights of an earlier run's training state (or, without one, of an exported
    checkpoint such as the shipped model: its fp16 weights, no auxiliary heads) into a fresh model
    (a warm start: new optimizer, new LR schedule). Tensors the earlier run lacks, or with another
    shape, keep their initialisation. Returns counts of loaded and kept-fresh tensors."""
    path = run / STATE_DIR / "model.safetensors"
    try:
        if path.is_file():
            weights = load_file(str(path))
        else:  # an exported checkpoint: transformers maps its (possibly legacy) key names
            path = run
            exported = LlavaForConditionalGeneration.from_pretrained(run, dtype=torch.float32)
            weights = {f"model.{n}": p.detach() for n, p in exported.named_parameters()}
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a usable training state or checkpoint: {err}") from err
    params = _named_params(model, aux)
    if not any(n.startswith("model.") and n in weights for n in params):
        raise CheckpointError(f"{path} holds no weights of this model")
    loaded = 0
    with torch.no_grad():
        for n, p in params.items():
            if n in weights and weights[n].shape == p.shape:
                p.copy_(weights[n])
                loaded += 1
    return {"loaded": loaded, "fresh": len(params) - loaded}

def export(model: LlavaForConditionalGeneration, processor, out: Path, summary: dict) -> None:
    """Write an ordinary HF checkpoint directory: fp16 weights, config, generation config,
    processor, and `testbed.json` (how it was trained)."""
    half = copy.deepcopy(model).to(torch.float16)
    half.generation_config.update(
        bos_token_id=processor.tokenizer.bos_token_id,
        eos_token_id=processor.tokenizer.eos_token_id,
        pad_token_id=processor.tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=96,
    )
    half.save_pretrained(out)
    # The file stores fp16 (small enough to ship), but the model should *run* in fp32 on CPUs
    # (fp16 CPU matmuls are slow): config "dtype" is what from_pretrained(dtype="auto") uses.
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    for sub in ("text_config", "vision_config"):
        if isinstance(config.get(sub), dict) and "dtype" in config[sub]:
            config[sub]["dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    processor.save_pretrained(out)
    (out / "testbed.json").write_text(json.dumps(summary, indent=1))
