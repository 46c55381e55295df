"""The packed prefill of pruned segments (docs/design.md, "Modes"): when a pruned segment's slots
have holes (ragged kept counts, left padding), its linear layers run on the valid slots only. It
equals the padded prefill token for token (greedy, sampling, beams; per-row budgets, several
stages, merging), and it really runs."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from dyrate.adapters import adapter_for
from dyrate.adapters.attention import Packing
from dyrate.adapters.inputs import encode
from dyrate.engine import Engine, GenerationOptions, generate_tokens
from dyrate.policies import parse_policy
from dyrate.policies.fastv import FastV


class Never(Engine):
    PACK_BELOW = 0.0  # the padded prefill everywhere


class Counting(Engine):
    PACK_BELOW = 1.01  # packed wherever a pruned segment has a hole

    def _run_packed(self, *args):
        self.packed = getattr(self, "packed", 0) + 1
        return super()._run_packed(*args)


def run(cls, model, processor, images, prompts, spec, opts):
    batch = encode(processor, images, prompts, "cpu")
    engine = cls(adapter_for(model), parse_policy(spec), "evict")
    with torch.inference_mode():
        rows, state = generate_tokens(engine, batch.input_ids, batch.attention_mask, batch.vision,
                                      GenerationOptions(**opts), eos=[-1], pad=0)
    return engine, [r.token_ids for r in rows], state


def test_packing_round_trip():
    pack = Packing(torch.tensor([1, 2, 3, 5]), batch=2, slots=3)
    x = torch.arange(8.0).view(1, 2, 4, 1)  # (1, H=2, N=4, D=1)
    out = pack.unpack(x)  # (B=2, H=2, S=3, D=1)
    assert out[:, 0, :, 0].tolist() == [[0, 0, 1], [2, 0, 3]] and out[:, 1, :, 0].tolist() == [[0, 4, 5], [6, 0, 7]]


@pytest.mark.parametrize("spec", ["fastv:k=2,r=0.5", "schedule:1=0.5,3=0.75", "sparsevlm:1=0.5,2=0.75,recycle=0.5,per_cluster=2",
                                  "dart:k=2,r=0.5,pivots_image=2,pivots_text=2"])
@pytest.mark.parametrize("opts", [dict(max_new_tokens=6), dict(max_new_tokens=6, do_sample=True, seed=3),
                                  dict(max_new_tokens=5, num_beams=2)], ids=["greedy", "sample", "beam2"])
def test_packed_equals_padded(tiny, images, prompts, spec, opts):
    model, processor = tiny
    engine, packed, _ = run(Counting, model, processor, images, prompts, spec, opts)
    _, padded, _ = run(Never, model, processor, images, prompts, spec, opts)
    assert engine.packed >= 1  # ragged prompts: left padding leaves holes
    assert packed == padded, spec


@dataclass(frozen=True)
class RowBudgets(FastV):
    """FastV with its own kept count per row (a stand-in for a learned per-prompt budget)."""

    name = "row-budgets"

    def keep(self, stage, probe, state):
        if probe.step > 0:
            return None
        return torch.tensor([4, 9, 13]).repeat_interleave(probe.n_img.shape[0] // 3)  # beams: rows repeated


@pytest.mark.parametrize("opts", [dict(max_new_tokens=6), dict(max_new_tokens=5, num_beams=2)], ids=["greedy", "beam2"])
def test_per_row_budgets(tiny, images, opts):
    """Rows with their own kept counts (equal prompt lengths, so only the budgets make holes)."""
    texts = ["What is it?", "Tell me now", "Count these"]
    pol = RowBudgets(k=2, r=0.5)
    engine, packed, state = run(Counting, *tiny, images, texts, pol, opts)
    _, padded, _ = run(Never, *tiny, images, texts, pol, opts)
    assert packed == padded
    assert state.records[0]["img"][1].unique().tolist() == [4, 9, 13] and engine.packed == 1


def test_dense_segments_are_not_packed(tiny, images):
    engine, _, _ = run(Counting, *tiny, [images[0]] * 2, ["Hi", "Yo"], "fastv:k=2,r=0.5", dict(max_new_tokens=3))
    assert not hasattr(engine, "packed")  # equal lengths, equal kept counts: no hole, nothing to pack
