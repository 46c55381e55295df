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
from PIL import Image, UnidentifiedImageError

from . import flops as flops_model
from .adapters import adapter_for
from .engine import IMG, PAD, Engine
from .errors import CheckpointError, InputError
from .generation import GenerationOptions, decode
from .trace import row_trace
from .policies import Policy, parse_policy

IMAGE_PLACEHOLDER = "<image>"


def load(path: str | Path | None = None, dtype: torch.dtype | str | None = None, device: str | None = None):
    """Load a local LLaVA checkpoint directory (config, safetensors weights, tokenizer, processor);
    no path: the testbed model shipped with dyrate. Weights are read from safetensors only; no
    remote code runs. Returns (model, processor)."""
    from transformers import AutoConfig, AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

    if path is None:
        from .testbed.shipped import model_dir

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
    if not isinstance(config, LlavaConfig):
        raise CheckpointError(f"{path}: a {type(config).__name__} checkpoint, not a LLaVA one (model_type 'llava')")
    if not any(path.glob("*.safetensors")):
        raise CheckpointError(f"{path}: no *.safetensors weights (other weight formats are refused)")
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a tiny checkpoint loads in a blink; keep stderr for real messages
    try:
        model = LlavaForConditionalGeneration.from_pretrained(
            path, local_files_only=True, use_safetensors=True, dtype=dtype or "auto"
        )
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_image(image) -> Image.Image:
    """A path or a PIL image -> RGB PIL image; InputError naming the problem otherwise."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise InputError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise InputError(f"image {str(path)!r} cannot be read ({err.__class__.__name__}: {err})") from None


def build_prompt(processor, prompt: str, template: bool | None = None) -> str:
    """A prompt holding the image placeholder once is used verbatim; one without it goes through the
    processor's chat template (template=True forces the template, False forces verbatim)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("empty prompt")
    n = prompt.count(IMAGE_PLACEHOLDER)
    if n > 1:
        raise InputError(f"prompt has {n} image placeholders {IMAGE_PLACEHOLDER!r}; exactly one image per prompt is supported")
    if template is False or (template is None and n == 1):
        if n != 1:
            raise InputError(f"a verbatim prompt must contain the image placeholder {IMAGE_PLACEHOLDER!r} exactly once")
        return prompt
    if n:
        raise InputError(f"with the chat template, leave the image placeholder {IMAGE_PLACEHOLDER!r} out of the prompt")
    if not getattr(processor, "chat_template", None):
        raise InputError(f"prompt has no image placeholder {IMAGE_PLACEHOLDER!r} and the processor has no chat template")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


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
    """Generate for a batch of (image, prompt) pairs under a pruning policy.

    options: do_sample, temperature, top_k, top_p, seed, num_beams, length_penalty, early_stopping.
    Returns one GenerationResult per row (text, new token ids, per-step trace, FLOPs)."""
    if isinstance(images, (str, Path, Image.Image)) or isinstance(prompts, str):
        raise InputError("images and prompts must be lists (one entry per row)")
    if len(images) != len(prompts) or not prompts:
        raise InputError(f"need one image per prompt, got {len(images)} images and {len(prompts)} prompts")
    unknown = set(options) - set(GenerationOptions.__dataclass_fields__)
    if unknown:
        raise InputError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
    opts = GenerationOptions(max_new_tokens=max_new_tokens, **options)
    pol = parse_policy(policy)
    adapter = adapter_for(model)
    engine = Engine(adapter, pol, mode)  # validates the policy against the model and the mode
    pil = [read_image(img) for img in images]
    texts = [build_prompt(processor, p, template) for p in prompts]
    device = next(model.parameters()).device
    batch = processor(images=pil, text=texts, return_tensors="pt", padding=True, padding_side="left")
    input_ids = batch["input_ids"].to(device)
    attention_mask = batch["attention_mask"].to(device)
    pixel_values = batch["pixel_values"].to(device)
    n_prompt = int(attention_mask.sum(1).max())
    if n_prompt + opts.max_new_tokens > adapter.max_positions:
        raise InputError(
            f"prompt ({n_prompt} tokens) + max_new_tokens ({opts.max_new_tokens}) exceeds the model's "
            f"{adapter.max_positions} positions"
        )
    eos, pad = _special_ids(model, processor)
    with torch.inference_mode():
        outputs, state = decode(engine, input_ids, attention_mask, pixel_values, opts, eos, pad)
    shape = flops_model.DecoderShape.from_config(model.config)
    results = []
    for i, out in enumerate(outputs):
        row_groups = state.group[out.steps[0] if out.steps else i, : input_ids.shape[1]]
        n_img = int((row_groups == IMG).sum())
        n_text = int(((row_groups != IMG) & (row_groups != PAD)).sum())
        trace, fl, retained = row_trace(engine, state.records, out.steps, shape, n_img, n_text)
        text = processor.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        results.append(GenerationResult(text, out.token_ids, trace, fl, retained, pol.spec(), mode))
    return results


def _special_ids(model, processor) -> tuple[list[int], int]:
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else processor.tokenizer.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    pad = gen.pad_token_id if gen.pad_token_id is not None else processor.tokenizer.pad_token_id
    pad = pad if pad is not None else (eos[0] if eos else 0)
    return eos, int(pad)
