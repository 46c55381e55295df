"""Speed and memory of every policy, side by side, on one model and one set of inputs.

For each batch size and policy: time to first token (prefill, vision tower included), decode
throughput, end-to-end time, the peak bytes held by the KV cache, FLOPs in the three conventions
and retained image tokens. Warm-up runs are excluded, times are medians over repeats, and CUDA is
synchronised around every timed region. Inputs are LLaVA-shaped (system text, the image tokens,
an instruction) with random pixels; decoding runs exactly `new_tokens` steps (no EOS) so every
policy does the same amount of work.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from . import flops as flops_model
from ..adapters import adapter_for
from ..engine import Engine
from ..errors import InputError
from ..policies import parse_policy
from .trace import host_records, row_trace

# Random-weight configs: (vision tower, decoder, vocab). The LLaVA-1.5 ones are shape-faithful
# (CLIP ViT-L/14 at 336 px -> 576 image tokens; Vicuna-7B / 13B decoders).
RANDOM_CONFIGS = {
    "medium": dict(
        vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                    image_size=336, patch_size=14),
        text=dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=4096),
    ),
    "llava-1.5-7b": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14),
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32064),
    ),
    "llava-1.5-13b": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14),
        text=dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                  num_key_value_heads=40, vocab_size=32064),
    ),
}


def random_llava(name: str, layers: int | None = None, dtype=torch.float32, device="cpu", seed: int = 0):
    """A random-weight LLaVA of a named shape, the decoder optionally truncated to `layers` layers."""
    if name not in RANDOM_CONFIGS:
        raise InputError(f"unknown config {name!r}; known: {', '.join(RANDOM_CONFIGS)}")
    spec = RANDOM_CONFIGS[name]
    text = dict(spec["text"])
    if layers is not None:
        if not 1 <= layers <= text["num_hidden_layers"]:
            raise InputError(f"--layers {layers}: {name} has 1..{text['num_hidden_layers']} decoder layers")
        text["num_hidden_layers"] = layers
    vision = CLIPVisionConfig(**spec["vision"], projection_dim=spec["vision"]["hidden_size"])
    n_img = (vision.image_size // vision.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**text, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        image_token_id=text["vocab_size"] - 1, image_seq_length=n_img,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    return model.eval()


@dataclass
class BenchRow:
    policy: str
    batch: int
    ttft_s: float  # median time to first token (prefill incl. vision tower + first argmax)
    decode_tok_s: float  # generated tokens per second over the decode steps (all rows)
    e2e_s: float  # median end-to-end time
    peak_kv_bytes: int  # largest KV cache held during the run
    flops: dict  # per convention: ratio, flops, full_flops
    retained: float


def lengths(model, text_tokens: int) -> tuple[int, int, int]:
    """(system tokens, image tokens, instruction tokens) of a LLaVA-1.5-like prompt."""
    cfg = model.config
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    n_sys = (3 * text_tokens) // 4
    return n_sys, n_img, text_tokens - n_sys


def make_inputs(model, batch: int, text_tokens: int, device, seed: int = 0):
    """input_ids (B, P) with sys / image / instruction tokens, attention mask, random pixels."""
    cfg = model.config
    n_sys, n_img, n_ins = lengths(model, text_tokens)
    gen = torch.Generator().manual_seed(seed)
    vocab = cfg.text_config.vocab_size
    sys_ids = torch.randint(3, vocab - 1, (batch, n_sys), generator=gen)
    ins_ids = torch.randint(3, vocab - 1, (batch, n_ins), generator=gen)
    img_ids = torch.full((batch, n_img), cfg.image_token_id)
    ids = torch.cat([sys_ids, img_ids, ins_ids], dim=1).to(device)  # (B, P)
    size = cfg.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=gen).to(device, model.dtype)
    return ids, torch.ones_like(ids), pixels


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _kv_bytes(cache) -> int:
    return sum(getattr(layer, "reserved_bytes", layer.keys.nbytes + layer.values.nbytes)
               for layer in cache.layers if layer.is_initialized)


@torch.inference_mode()
def run_once(engine: Engine, ids, mask, pixels, new_tokens: int):
    device = ids.device
    _sync(device)
    start = time.perf_counter()
    logits, state = engine.prefill(ids, mask, pixels)
    tok = logits.argmax(-1)
    _sync(device)
    first = time.perf_counter()
    peak = _kv_bytes(state.cache)
    for _ in range(new_tokens - 1):
        logits = engine.decode(state, tok)
        tok = logits.argmax(-1)
        peak = max(peak, _kv_bytes(state.cache))
    _sync(device)
    end = time.perf_counter()
    return first - start, end - first, end - start, peak, state


def bench(model, policies: list[str], batches: list[int], new_tokens: int = 64, text_tokens: int = 40,
          repeats: int = 3, mode: str = "evict", progress=None) -> list[BenchRow]:
    """Benchmark every policy at every batch size on `model`. Returns one BenchRow per pair."""
    if new_tokens < 2:
        raise InputError("--new-tokens must be >= 2 (one prefill token plus decode steps)")
    if repeats < 1:
        raise InputError("--repeats must be >= 1")
    adapter = adapter_for(model)
    engines = [Engine(adapter, parse_policy(p), mode) for p in policies]  # validates every spec first
    shape = flops_model.DecoderShape.from_config(model.config)
    device = next(model.parameters()).device
    n_sys, n_img, n_ins = lengths(model, text_tokens)
    rows = []
    for b in batches:
        ids, mask, pixels = make_inputs(model, b, text_tokens, device)
        for engine in engines:
            run_once(engine, ids, mask, pixels, min(new_tokens, 4))  # warm-up, not timed
        runs: list[list[tuple]] = [[] for _ in engines]
        for _ in range(repeats):  # interleaved, so slow drifts of the machine hit every policy alike
            for i, engine in enumerate(engines):
                runs[i].append(run_once(engine, ids, mask, pixels, new_tokens))
                if progress:
                    progress()
        for engine, results in zip(engines, runs):
            ttft, dec, e2e, peaks, states = zip(*results)
            _, fl, retained, _ = row_trace(engine, host_records(states[-1].records), [0] * new_tokens, shape, n_img, n_sys + n_ins)
            rows.append(BenchRow(engine.policy.spec(), b, statistics.median(ttft),
                                 b * (new_tokens - 1) / statistics.median(dec), statistics.median(e2e),
                                 max(peaks), fl, retained))
    return rows


def conditions(model, text_tokens: int, new_tokens: int, mode: str) -> dict:
    device = next(model.parameters()).device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"
    cfg = model.config.text_config
    n_sys, n_img, n_ins = lengths(model, text_tokens)
    return {
        "device": name, "dtype": str(model.dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
        "ffn": cfg.intermediate_size, "heads": cfg.num_attention_heads, "image_tokens": n_img,
        "text_tokens": n_sys + n_ins, "new_tokens": new_tokens, "mode": mode,
    }
