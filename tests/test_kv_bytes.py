"""The KV bytes a result reports are the bytes its cache really holds."""

from __future__ import annotations

import pytest
import torch

from dyrate.adapters import adapter_for
from dyrate.adapters.inputs import encode
from dyrate.engine import Engine, GenerationOptions, generate_tokens
from dyrate.measure.flops import DecoderShape
from dyrate.measure.trace import host_records, row_trace
from dyrate.policies import parse_policy


@pytest.mark.parametrize("spec,mode", [("none", "evict"), ("fastv:k=2,r=0.75", "evict"), ("fixed:k=2,r=0.5", "mask"),
                                       ("vtw:k=2", "evict"), ("schedule:1=0.5,3=0.9", "evict")])
def test_trace_kv_bytes_equal_the_cache(tiny, images, prompts, spec, mode):
    model, processor = tiny
    engine = Engine(adapter_for(model), parse_policy(spec), mode)
    batch = encode(processor, images[:1], prompts[:1], "cpu")
    eos = [model.generation_config.eos_token_id or 0]
    with torch.inference_mode():
        [out], state = generate_tokens(engine, batch.input_ids, batch.attention_mask, batch.vision,
                                       GenerationOptions(max_new_tokens=5), eos, pad=0)
    shape = DecoderShape.from_config(model.config)
    groups = state.group[0, : batch.input_ids.shape[1]]
    n_img = int((groups == 1).sum())
    trace, _, _, kv = row_trace(engine, host_records(state.records), out.steps, shape, n_img, len(groups) - n_img,
                                next(model.parameters()).element_size())
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in state.cache.layers)
    # the cache after the last forward pass holds the prompt and every new token but the last one
    assert trace[-1]["kv_bytes"] == held
    assert kv["peak"] == max(e["kv_bytes"] for e in trace) and kv["mean"] <= kv["peak"]
    if mode == "mask" or spec == "none":
        assert kv["peak"] == held  # nothing ever leaves: the last step holds the most
