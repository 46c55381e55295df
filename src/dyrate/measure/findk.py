"""VTW's choice of the withdrawal layer (Lin et al., 2024, arXiv 2405.05803), as a tool.

On a few calibration samples, the unpruned model generates an answer greedily. Then, for every
candidate layer K, the same answer is teacher-forced through the model with every image token
withdrawn from layer K on (`vtw:k=K`), and the KL divergence KL(full || withdrawn) of the
next-token distributions is averaged over the answer's tokens and the samples. The chosen K is
the first (shallowest) layer whose mean KL is below `eta`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..adapters import adapter_for
from ..adapters.inputs import encode
from ..engine import Engine, GenerationOptions, forced_logprobs, generate_tokens
from ..errors import InputError
from ..policies import parse_policy


@dataclass
class FindKResult:
    k: int | None  # the first layer under eta (None if none is)
    eta: float
    kl: dict[int, float]  # mean KL per candidate layer
    samples: int
    tokens: int  # answer tokens the means run over


def find_k(model, processor, images, prompts, eta: float = 0.003, max_new_tokens: int = 16,
           layers: list[int] | None = None, progress=None) -> FindKResult:
    """Mean next-token KL of `vtw:k=K` against the unpruned model for each K; the first K under eta."""
    if not eta > 0 or not math.isfinite(eta):
        raise InputError(f"eta must be a finite number > 0, got {eta}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not prompts or len(images) != len(prompts):
        raise InputError(f"need one image per prompt, got {len(images)} images and {len(prompts)} prompts")
    adapter = adapter_for(model)
    n_layers = adapter.n_layers
    layers = layers or list(range(1, n_layers))
    for k in layers:
        parse_policy(f"vtw:k={k}").validate(n_layers)
    full = Engine(adapter, parse_policy("none"))
    withdrawn = {k: Engine(adapter, parse_policy(f"vtw:k={k}")) for k in layers}
    device = next(model.parameters()).device
    sums = {k: 0.0 for k in layers}
    n_tokens = 0
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    greedy = GenerationOptions(max_new_tokens=max_new_tokens)
    for image, prompt in zip(images, prompts):
        batch = encode(processor, [image], [prompt], device)
        ids, mask, pixels = batch.input_ids, batch.attention_mask, batch.vision
        # the unpruned model's greedy answer (up to EOS), then its distributions along it
        with torch.inference_mode():
            [out], _ = generate_tokens(full, ids, mask, pixels, greedy, eos, pad=eos[0] if eos else 0)
        answer = out.token_ids
        answer_t = torch.tensor(answer, device=device)
        with torch.inference_mode():
            ref = forced_logprobs(full, ids, mask, pixels, answer_t)  # (T, V)
        for k, engine in withdrawn.items():
            with torch.inference_mode():
                logp = forced_logprobs(engine, ids, mask, pixels, answer_t)
            kl = (ref.exp() * (ref - logp)).sum(-1)  # (T,) KL(full || withdrawn)
            sums[k] += float(kl.sum())
            if progress:
                progress()
        n_tokens += len(answer)
    kl = {k: sums[k] / n_tokens for k in layers}
    chosen = next((k for k in layers if kl[k] < eta), None)
    return FindKResult(chosen, eta, kl, len(prompts), n_tokens)
