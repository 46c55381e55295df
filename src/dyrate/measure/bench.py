"""Speed and memory of every policy, side by side, on one model and one set of inputs.

For each batch size and policy: time to first token (prefill, vision tower included), decode
throughput, end-to-end time, the peak bytes held by the KV cache, FLOPs in the three conventions
and retained image tokens. Warm-up runs are excluded, times are medians over repeats, and CUDA is
synchronised around every timed region. Inputs (measure/shapes.py) are a system text, one image
and an instruction in the family's layout, with random pixels; decoding runs exactly `new_tokens` steps (no EOS) so every
policy does the same amount of work.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass

import torch

from . import flops as flops_model
from ..adapters import adapter_for
from ..engine import Engine
from ..errors import InputError
from ..policies import parse_policy
from .shapes import RANDOM_CONFIGS, make_inputs, random_model
from .trace import host_records, row_trace


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
    # the decode steps in (up to) four equal phases: (first step, last step, median ms per step, KV
    # bytes the cache holds at the phase's end): a shrinking kept set shows here as tokens leave
    phases: list[tuple[int, int, float, int]]


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _kv_bytes(cache) -> int:
    return sum(getattr(layer, "reserved_bytes", layer.keys.nbytes + layer.values.nbytes)
               for layer in cache.layers if layer.is_initialized)


def _kv_held(cache) -> int:
    """Bytes of the KV entries the cache holds now (spare room not counted)."""
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.is_initialized)


def phase_bounds(n_steps: int, n_phases: int = 4) -> list[tuple[int, int]]:
    """Decode steps 1..n_steps cut into up to n_phases runs of near-equal length: [(first, last)]."""
    n = min(n_phases, n_steps)
    cuts = [1 + (n_steps * i) // n for i in range(n + 1)]
    return [(cuts[i], cuts[i + 1] - 1) for i in range(n)]


@torch.inference_mode()
def run_once(engine: Engine, ids, mask, vision, new_tokens: int):
    device = ids.device
    _sync(device)
    start = time.perf_counter()
    logits, state = engine.prefill(ids, mask, vision)
    tok = logits.argmax(-1)
    _sync(device)
    first = time.perf_counter()
    peak = _kv_bytes(state.cache)
    phases = []  # (seconds, KV bytes held at the end) per phase
    t0 = first
    for lo, hi in phase_bounds(new_tokens - 1):
        for _ in range(lo, hi + 1):
            logits = engine.decode(state, tok)
            tok = logits.argmax(-1)
            peak = max(peak, _kv_bytes(state.cache))
        _sync(device)
        t1 = time.perf_counter()
        phases.append((t1 - t0, _kv_held(state.cache)))
        t0 = t1
    end = t0
    return first - start, end - first, end - start, peak, state, phases


def bench(model, policies: list[str], batches: list[int], new_tokens: int = 64, text_tokens: int = 40,
          repeats: int = 3, mode: str = "evict", progress=None, image_side: int | None = None) -> list[BenchRow]:
    """Benchmark every policy at every batch size on `model`. Returns one BenchRow per pair."""
    if new_tokens < 2:
        raise InputError("--new-tokens must be >= 2 (one prefill token plus decode steps)")
    if repeats < 1:
        raise InputError("--repeats must be >= 1")
    adapter = adapter_for(model)
    engines = [Engine(adapter, parse_policy(p), mode) for p in policies]  # validates every spec first
    shape = flops_model.DecoderShape.from_config(model.config)
    device = next(model.parameters()).device
    rows = []
    for b in batches:
        inp = make_inputs(model, b, text_tokens, device, image_side=image_side)
        args = (inp.input_ids, inp.attention_mask, inp.vision)
        for engine in engines:
            run_once(engine, *args, min(new_tokens, 4))  # warm-up, not timed
        runs: list[list[tuple]] = [[] for _ in engines]
        for _ in range(repeats):  # interleaved, so slow drifts of the machine hit every policy alike
            for i, engine in enumerate(engines):
                runs[i].append(run_once(engine, *args, new_tokens))
                if progress:
                    progress()
        for engine, results in zip(engines, runs):
            ttft, dec, e2e, peaks, states, phase_runs = zip(*results)
            _, fl, retained, _ = row_trace(engine, host_records(states[-1].records), [0] * new_tokens, shape,
                                           inp.n_img, inp.n_sys + inp.n_ins)
            phases = [(lo, hi, 1000 * statistics.median(run[i][0] for run in phase_runs) / (hi - lo + 1),
                       phase_runs[-1][i][1]) for i, (lo, hi) in enumerate(phase_bounds(new_tokens - 1))]
            rows.append(BenchRow(engine.policy.spec(), b, statistics.median(ttft),
                                 b * (new_tokens - 1) / statistics.median(dec), statistics.median(e2e),
                                 max(peaks), fl, retained, phases))
    return rows


def conditions(model, text_tokens: int, new_tokens: int, mode: str, image_side: int | None = None) -> dict:
    device = next(model.parameters()).device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"
    cfg = model.config.get_text_config()
    inp = make_inputs(model, 1, text_tokens, device, image_side=image_side)
    return {
        "device": name, "dtype": str(model.dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "model_type": model.config.model_type, "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size, "ffn": cfg.intermediate_size, "heads": cfg.num_attention_heads,
        "kv_heads": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        "image_tokens": inp.n_img, "text_tokens": inp.n_sys + inp.n_ins, "new_tokens": new_tokens, "mode": mode,
    }


__all__ = ["RANDOM_CONFIGS", "BenchRow", "bench", "conditions", "make_inputs", "phase_bounds", "random_model",
           "run_once"]
