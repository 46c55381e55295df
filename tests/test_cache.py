"""The engine's KV cache (engine/cache.py): buffers with spare room behave exactly like transformers'
DynamicLayer, past their initial room too, and generation through them still equals model.generate
and the independent reference."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from dyrate.api import generate
from dyrate.engine.cache import SPARE, GrowingLayer

from reference import reference_generate
from test_engine import batch_inputs, run_engine


def kv(gen, b=2, h=3, q=5, d=4):
    return torch.randn(b, h, q, d, generator=gen), torch.randn(b, h, q, d, generator=gen)


def test_growing_layer_equals_dynamic_layer_past_its_room():
    gen = torch.Generator().manual_seed(0)
    ours, ref = GrowingLayer(), DynamicLayer()
    for q in (7, *[1] * (SPARE + 10), 3):  # a prefill, more single steps than the spare room, a chunk
        k, v = kv(gen, q=q)
        got, want = ours.update(k, v), ref.update(k, v)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    assert ours.get_seq_length() == ref.get_seq_length() == 7 + SPARE + 13
    assert ours.reserved_bytes > ours.keys.nbytes + ours.values.nbytes  # it did grow, with room to spare
    assert ours.get_mask_sizes(1) == ref.get_mask_sizes(1)


def test_keep_slots_and_reorder_equal_gather_and_index_select():
    gen = torch.Generator().manual_seed(1)
    ours = GrowingLayer()
    k, v = kv(gen, b=3, q=9)
    ours.update(k, v)
    index = torch.tensor([[0, 2, 5, 8], [1, 2, 3, 4], [8, 7, 6, 5]])  # (B, S_new) per-row slots
    ours.keep_slots(index)
    idx = index[:, None, :, None].expand(-1, 3, -1, 4)
    torch.testing.assert_close(ours.keys, k.gather(2, idx), rtol=0, atol=0)
    torch.testing.assert_close(ours.values, v.gather(2, idx), rtol=0, atol=0)
    k2, v2 = kv(gen, b=3, q=1)  # appending after an eviction writes after the kept slots
    ours.update(k2, v2)
    torch.testing.assert_close(ours.keys, torch.cat([k.gather(2, idx), k2], 2), rtol=0, atol=0)
    beams = torch.tensor([2, 2, 0])
    before = ours.keys.clone()
    ours.reorder_cache(beams)
    torch.testing.assert_close(ours.keys, before.index_select(0, beams), rtol=0, atol=0)


def test_long_generation_past_the_spare_room_equals_generate(tiny, vanilla, images, prompts):
    """More new tokens than the buffers' first room: every layer's buffer doubles mid-generation."""
    model, processor = tiny
    n_new = SPARE + 16
    batch = batch_inputs(processor, images, prompts)
    expected = vanilla[0].generate(**batch, max_new_tokens=n_new, do_sample=False)[:, batch["input_ids"].shape[1]:]
    results = generate(model, processor, images, prompts, policy="none", max_new_tokens=n_new)
    assert max(len(r.token_ids) for r in results) > SPARE  # the growth path ran
    for row, res in enumerate(results):
        assert res.token_ids == expected[row].tolist()[: len(res.token_ids)]


@pytest.mark.parametrize("spec", ["fixed:k=2,r=0.5", "fastv:k=1,r=0.75"])
def test_eviction_then_decoding_equals_the_reference(tiny, images, prompts, spec):
    model, processor = tiny
    batch = batch_inputs(processor, images[:1], prompts[:1])
    want, _ = reference_generate(model, batch["input_ids"], batch["pixel_values"], spec, "evict", 12, eos=3)
    _, outs, _ = run_engine(model, batch, spec, "evict", max_new_tokens=12)
    assert outs[0].token_ids == want


def test_evicting_most_of_a_buffer_gives_the_memory_back():
    gen = torch.Generator().manual_seed(2)
    layer = GrowingLayer()
    k, v = kv(gen, b=2, q=300)
    layer.update(k, v)
    before = layer.reserved_bytes
    index = torch.arange(10).expand(2, 10)
    layer.keep_slots(index)  # 10 of 300 slots stay
    assert layer.reserved_bytes < before // 2
    torch.testing.assert_close(layer.keys, k[:, :, :10], rtol=0, atol=0)
    layer.update(*kv(gen, b=2, q=1))
    assert layer.get_seq_length() == 11
