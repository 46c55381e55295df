"""SparseVLM (policies/sparsevlm.py): the raters, the clustering and merging, the kept sets and the
greedy answer equal an independent restatement of the authors' code (tests/reference_sparsevlm.py)
in evict and mask mode; batch rows equal rows alone; pruning nothing equals `none`; the FLOPs
counts; bad parameters are one line."""

from __future__ import annotations

import pytest
import torch

import dyrate
from dyrate.adapters import IMG, adapter_for
from dyrate.adapters.inputs import encode
from dyrate.engine import Engine, GenerationOptions, generate_tokens
from dyrate.errors import PolicySpecError
from dyrate.policies import parse_policy
from dyrate.policies.sparsevlm import cluster_and_merge, rater_weights

import reference_sparsevlm as ref
from tiny import assert_rows_equal_alone

SPECS = ["sparsevlm:1=0.5,2=0.75,3=0.9", "sparsevlm:2=0.4,3=0.8,recycle=0.6,per_cluster=2",
         "sparsevlm:1=0.6,recycle=0"]


def test_clustering_and_merging_equal_their_batch_form():
    gen = torch.Generator().manual_seed(3)
    for n, clusters in [(7, 1), (12, 2), (30, 4), (5, 5)]:
        x = torch.randn(n, 16, generator=gen)
        centres, merged = cluster_and_merge(x, clusters)
        want_centres, want_merged = ref.cluster_and_merge(x[None], clusters)
        assert centres.tolist() == want_centres[0].tolist()
        torch.testing.assert_close(merged, want_merged[0])
    # a cluster of one is the token itself (up to their 1e-6); every member is in some cluster
    centres, merged = cluster_and_merge(x, 5)
    torch.testing.assert_close(merged, x[centres] / (1 + 1e-6))


def test_raters_equal_the_reference(tiny, images, prompts):
    model, processor = tiny
    a = adapter_for(model)
    for image, prompt in zip(images, prompts):
        batch = encode(processor, [image], [prompt], "cpu")
        with torch.no_grad():
            emb, _ = a.embed_counts(batch.input_ids, batch.vision)
        groups = a.token_groups(batch.input_ids, batch.attention_mask.bool())
        w = rater_weights(emb, groups)[0]
        img = (groups[0] == IMG).nonzero()[:, 0]
        start = int(img[-1]) + 1
        want = ref.select_raters(emb[0, img], emb[0, start:]) + start
        assert w.nonzero()[:, 0].tolist() == want.tolist()
        assert float(w.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("mode", ["evict", "mask"])
def test_kept_sets_and_answer_equal_the_reference(tiny, vanilla, images, prompts, spec, mode):
    model, processor = tiny
    pol = parse_policy(spec)
    for image, prompt in zip(images, prompts):
        batch = encode(processor, [image], [prompt], "cpu")
        want_tokens, want_kept = ref.sparsevlm_generate(vanilla[0], batch.input_ids, batch.vision["pixel_values"],
                                                        pol.steps, pol.recycle, pol.per_cluster, 6, eos=-1)
        engine = Engine(adapter_for(model), pol, mode)
        with torch.inference_mode():
            tokens, state = generate_tokens(engine, batch.input_ids, batch.attention_mask, batch.vision,
                                            GenerationOptions(max_new_tokens=6), eos=[-1], pad=0)
        assert tokens[0].token_ids == want_tokens, (spec, mode, prompt)
        for s, want in enumerate(want_kept):
            seg = state.segments[s + 1]
            kept = sorted(int(c) for c in seg.col[0][seg.attend[0]] if int(state.group[0, c]) == IMG)
            assert kept == want, (spec, mode, s)


@pytest.mark.parametrize("beams", [1, 2])
def test_rows_equal_rows_alone(tiny, images, prompts, beams):
    assert_rows_equal_alone(*tiny, images, prompts, policy=SPECS[0], max_new_tokens=6, num_beams=beams)


def test_pruning_nothing_equals_none(tiny, images, prompts):
    none = dyrate.generate(*tiny, images, prompts, max_new_tokens=6)
    everything = dyrate.generate(*tiny, images, prompts, policy="sparsevlm:1=0,3=0", max_new_tokens=6)
    assert [r.token_ids for r in everything] == [r.token_ids for r in none]
    assert all(r.retained == 1.0 for r in everything)


def test_counts_flops_and_spec(tiny, images):
    from dyrate.measure.flops import NAMED_SHAPES, policy_flops

    pol = parse_policy("sparsevlm")  # their 192-token setting: 300, 200, 110 (+ merged tokens)
    assert pol.spec() == "sparsevlm:3=0.48,7=0.653,16=0.81,recycle=0.3,per_cluster=10"
    assert parse_policy(pol.spec()) == pol
    counts = pol.static_image_tokens(576, 32)
    # 276 deleted -> 83 recycled -> 9 merged; 309: 109 -> 33 -> 4; 204: 94 -> 29 -> 3
    assert counts[:3] == [576] * 3 and counts[3] == 309 and counts[7] == 204 and counts[16] == 113
    assert policy_flops(NAMED_SHAPES["llava-1.5-7b"], "sparsevlm", 40)["image_tokens"] == counts
    [res] = dyrate.generate(*tiny, images[:1], ["What is it?"], policy=SPECS[0], max_new_tokens=2)
    assert res.trace[0]["kept"] == [16, 9, 5, 3] == parse_policy(SPECS[0]).static_image_tokens(16, 4)


@pytest.mark.parametrize("spec", ["sparsevlm:0=0.5", "sparsevlm:3=0.5,2=0.6", "sparsevlm:2=0.8,3=0.5",
                                  "sparsevlm:2=1.0", "sparsevlm:2=0.5,recycle=1.5", "sparsevlm:2=0.5,per_cluster=0",
                                  "sparsevlm:2=0.5,colour=3", "sparsevlm:2=x"])
def test_bad_parameters_are_one_line(spec):
    with pytest.raises(PolicySpecError) as err:
        parse_policy(spec)
    assert "\n" not in str(err.value)


def test_a_stage_past_the_decoder_is_refused(tiny, images):
    with pytest.raises(PolicySpecError, match="must be <"):
        dyrate.generate(*tiny, images[:1], ["Hi"], policy="sparsevlm", max_new_tokens=2)
