"""Mask mode's rank-ordered prefix path (docs/design.md, "Modes"): for a policy whose kept sets are
nested (one stage, ranked by the prefill), the pruned segment stores its image slots least important
first and a decode step reads the KV cache from the first attended slot on. It equals the plain
mask path token for token (greedy, sampling, beams, ragged batches), batch rows equal rows alone,
and it really skips entries."""

from __future__ import annotations

import pytest
import torch

from dyrate.adapters import IMG, adapter_for
from dyrate.adapters.inputs import encode
from dyrate.engine import Engine, GenerationOptions, generate_tokens
from dyrate.engine.segment import rank_order
from dyrate.policies import parse_policy
from tiny import assert_rows_equal_alone

SPECS = ["fastv:k=2,r=0.5", "progressive:k=2,0=0.25,2=0.5,4=0.875", "vtw:k=3", "random:k=1,r=0.75,seed=3"]
OPTS = [dict(max_new_tokens=8), dict(max_new_tokens=8, do_sample=True, seed=5), dict(max_new_tokens=6, num_beams=2)]


def run(model, processor, images, prompts, spec, opts, rank_prefix):
    batch = encode(processor, images, prompts, "cpu")
    engine = Engine(adapter_for(model), parse_policy(spec), "mask", rank_prefix=rank_prefix)
    with torch.inference_mode():
        rows, state = generate_tokens(engine, batch.input_ids, batch.attention_mask, batch.vision,
                                      GenerationOptions(**opts), eos=[-1], pad=0)
    return engine, [r.token_ids for r in rows], state


def test_rank_order_puts_candidates_first_least_important_first():
    cand = torch.tensor([[False, True, True, True, False, False]])
    rank = torch.tensor([[9, 2, 0, 1, 9, 9]])
    assert rank_order(cand, rank).tolist() == [[1, 3, 2, 0, 4, 5]]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("opts", OPTS, ids=["greedy", "sample", "beam2"])
def test_prefix_path_equals_the_plain_mask_path(tiny, images, prompts, spec, opts):
    model, processor = tiny
    engine, fast, state = run(model, processor, images, prompts, spec, opts, rank_prefix=True)
    _, plain, _ = run(model, processor, images, prompts, spec, opts, rank_prefix=False)
    assert engine.prefix and not state.segments[1].in_order
    assert fast == plain, spec


@pytest.mark.parametrize("arch", ["mlp", "gru"])
def test_a_learned_rate_ranked_by_the_prefill(tiny, images, prompts, tmp_path, arch):
    """A random predictor (its rate goes up and down from step to step) with the prefill's ranking."""
    from dyrate.learn.predictors import new_predictor, save_predictor

    torch.manual_seed(11)
    pred = new_predictor(arch, bins=10, k=2, history=4, model=tiny[0], features=("shares", "step"), rank="prefill")
    spec = f"dyrate{'-rnn' if arch == 'gru' else ''}:k=2,predictor={save_predictor(pred, tmp_path / 'p.safetensors')}"
    for opts in OPTS:
        engine, fast, _ = run(*tiny, images, prompts, spec, opts, rank_prefix=True)
        _, plain, _ = run(*tiny, images, prompts, spec, opts, rank_prefix=False)
        assert engine.prefix and fast == plain, opts


@pytest.mark.parametrize("spec", ["fastv:k=2,r=0.5", "progressive:k=2,0=0.25,2=0.5,4=0.875"])
def test_a_step_reads_only_from_the_first_kept_slot(tiny, images, prompts, spec):
    model, processor = tiny
    _, _, state = run(model, processor, images, prompts, spec, dict(max_new_tokens=6), rank_prefix=True)
    seg = state.segments[1]
    kept = ((seg.groups == IMG) & seg.attend).sum(1)  # (B,)
    read_from = state.cache.layers[seg.start].read_from
    assert read_from == int((16 - kept).min()) > 0  # every row's image slots come first, 16 of them
    # the skipped slots are exactly image slots no row attends
    assert not bool(seg.attend[:, :read_from].any()) and bool((seg.groups[:, :read_from] == IMG).all())


@pytest.mark.parametrize("beams", [1, 2])
def test_rows_equal_rows_alone(tiny, images, prompts, beams):
    assert_rows_equal_alone(*tiny, images, prompts, policy="progressive:k=2,0=0.25,2=0.5,4=0.875", mode="mask",
                            max_new_tokens=6, num_beams=beams)


def test_fresh_rankings_keep_the_plain_path(tiny):
    model, _ = tiny
    for spec in ("fixed:k=2,r=0.5", "schedule:1=0.5,3=0.75", "sparsevlm:2=0.5"):
        assert not Engine(adapter_for(model), parse_policy(spec), "mask").prefix, spec
    assert not Engine(adapter_for(model), parse_policy("fastv:k=2,r=0.5"), "evict").prefix
