"""The Python API: `load` a checkpoint, `generate` with a pruning policy.

    model, processor = dyrate.load("path/to/llava")
    out = dyrate.generate(model, processor, ["cat.png"], ["What is in the image?"], policy="fastv:k=2,r=0.5")
    out[0].text, out[0].token_ids, out[0].trace, out[0].flops
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from .adapters import IMG, PAD, adapter_for
from .adapters.inputs import IMAGE_PLACEHOLDER, build_prompt, encode, read_image
from .engine import Engine, GenerationOptions, generate_tokens
from .errors import CheckpointError, InputError
from .measure import flops as flops_model
from .measure.trace import host_records, row_trace
from .policies import Policy, parse_policy

__all__ = ["IMAGE_PLACEHOLDER", "GenerationResult", "build_prompt", "check_request", "generate", "load", "read_image"]


def load(path: str | Path | None = None, dtype: torch.dtype | str | None = None, device: str | None = None):
    """Load a local checkpoint directory (config, safetensors weights, tokenizer, processor) of a
    supported family (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL; docs/models.md);
    no path: the testbed model shipped with dyrate. Weights are read from safetensors only; no
    remote code runs. Returns (model, processor)."""
    from safetensors import SafetensorError
    from transformers import AutoConfig

    from .adapters import model_class_for, supported_names
    from .adapters.processors import load_processor

    if path is None:
        from .assets import model_dir

        path = model_dir()
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a local HF checkpoint directory)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json, so not a HF checkpoint directory")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable config.json ({str(err).splitlines()[0]})") from None
    model_class = model_class_for(config)
    if model_class is None:
        raise CheckpointError(f"{path}: a {type(config).__name__} checkpoint (model_type {config.model_type!r}) is not "
                              f"supported (supported: {', '.join(supported_names())})")
    if not any(path.glob("*.safetensors")):
        raise CheckpointError(f"{path}: no *.safetensors weights (other weight formats are refused)")
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a tiny checkpoint loads in a blink; keep stderr for real messages
    try:
        model = model_class.from_pretrained(path, local_files_only=True, use_safetensors=True, dtype=dtype or "auto")
        processor = load_processor(path)
    except (OSError, ValueError, ImportError, SafetensorError) as err:
        raise CheckpointError(f"{path}: cannot load the checkpoint ({str(err).splitlines()[0]})") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if device:
        model = model.to(device)
    return model.eval(), processor


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # new tokens only
    trace: list[dict[str, Any]]  # one entry per generated token (step 0 = prefill)
    flops: dict[str, dict[str, float]]  # per convention: ratio, flops, full_flops
    retained: float  # fraction of image tokens attended, mean over pruned layers and steps
    policy: str = ""
    mode: str = "evict"
    stats: dict[str, Any] = field(default_factory=dict)
    kv_bytes: dict[str, float] = field(default_factory=dict)  # the row's KV cache over the steps: mean, peak

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def generate(
    model,
    processor,
    images: Sequence,
    prompts: Sequence[str],
    policy: str | Policy = "none",
    mode: str = "evict",
    max_new_tokens: int = 32,
    template: bool | None = None,
    **options,
) -> list[GenerationResult]:
    """Generate for a batch of (image, prompt) pairs under a pruning policy. A row's image may be a
    list of images (multi-image prompt: one placeholder per image in a verbatim prompt, or the chat
    template puts them first).

    options: do_sample, temperature, top_k, top_p, seed, num_beams, length_penalty, early_stopping.
    Returns one GenerationResult per row (text, new token ids, per-step trace, FLOPs)."""
    if isinstance(images, (str, Path, Image.Image)) or isinstance(prompts, str):
        raise InputError("images and prompts must be lists (one entry per row)")
    if len(images) != len(prompts) or not prompts:
        raise InputError(f"need one image (or one list of images) per prompt, got {len(images)} image entries "
                         f"and {len(prompts)} prompts")
    unknown = set(options) - set(GenerationOptions.__dataclass_fields__)
    if unknown:
        raise InputError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
    opts = GenerationOptions(max_new_tokens=max_new_tokens, **options)
    pol = parse_policy(policy)
    adapter = adapter_for(model)
    engine = Engine(adapter, pol, mode)  # validates the policy against the model and the mode
    device = next(model.parameters()).device
    batch = encode(processor, images, prompts, device, template)
    input_ids = batch.input_ids
    n_prompt = batch.n_prompt
    if n_prompt + opts.max_new_tokens > adapter.max_positions:
        raise InputError(
            f"prompt ({n_prompt} tokens) + max_new_tokens ({opts.max_new_tokens}) exceeds the model's "
            f"{adapter.max_positions} positions"
        )
    check_request(model, len(prompts), n_prompt + opts.max_new_tokens, opts.num_beams)
    shape = flops_model.DecoderShape.from_config(model.config)
    elem = next(model.parameters()).element_size()  # KV entries are stored in the weights' dtype
    eos, pad = _special_ids(model, processor)
    with torch.inference_mode():
        outputs, state = generate_tokens(engine, input_ids, batch.attention_mask, batch.vision, opts, eos, pad,
                                         batch.images_per_row)
    records = host_records(state.records)
    results = []
    for i, out in enumerate(outputs):
        first_row = out.steps[0] if out.steps else i
        row_groups = state.group[first_row, : state.n_prompt]
        n_img = int(state.n_img[first_row])  # before any pre-LLM reduction
        n_text = int(((row_groups != IMG) & (row_groups != PAD)).sum())
        trace, fl, retained, kv = row_trace(engine, records, out.steps, shape, n_img, n_text, elem)
        text = processor.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        results.append(GenerationResult(text, out.token_ids, trace, fl, retained, pol.spec(), mode, kv_bytes=kv))
    return results


def check_request(model, batch: int, seq: int, num_beams: int = 1) -> None:
    """Refuse, before allocating any of it, a generate call of `batch` prompts x `num_beams` beams
    growing to `seq` tokens: more beams than the vocabulary has tokens (after the first step no
    more distinct hypotheses exist), or an estimated memory (`measure.flops.request_bytes`) above
    what the model's device has free. InputError naming the figures."""
    vocab = model.config.get_text_config().vocab_size
    if num_beams > vocab:
        raise InputError(f"num_beams {num_beams} exceeds the vocabulary ({vocab} tokens); beams beyond it stay empty")
    param = next(model.parameters())
    shape = flops_model.DecoderShape.from_config(model.config)
    need = flops_model.request_bytes(shape, batch * num_beams, seq, param.element_size())
    if param.device.type == "cuda":
        free = torch.cuda.mem_get_info(param.device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    if need > free:
        gib = 2**30
        raise InputError(f"this request needs about {need / gib:.1f} GiB (KV cache of batch x beams rows, activations, "
                         f"logits), more than the {free / gib:.1f} GiB free on {param.device}; ask for fewer rows, "
                         "beams or tokens")


def _special_ids(model, processor) -> tuple[list[int], int]:
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else processor.tokenizer.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    pad = gen.pad_token_id if gen.pad_token_id is not None else processor.tokenizer.pad_token_id
    pad = pad if pad is not None else (eos[0] if eos else 0)
    return eos, int(pad)
