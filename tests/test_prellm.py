"""Pre-LLM methods (DivPrune, VisionZip, PruMerge, PruMerge+): their tokens equal an independent
restatement of each published algorithm (tests/reference_prellm.py); generation on the shorter
prompt equals `model.generate` given the same reduced input embeddings; batch rows equal rows
alone; pruning nothing equals `none`; bad parameters are one line."""

from __future__ import annotations

import pytest
import torch

import dyrate
from dyrate.adapters import adapter_for
from dyrate.adapters.inputs import encode
from dyrate.errors import PolicySpecError
from dyrate.policies import parse_policy

import reference_prellm as ref
from tiny import assert_rows_equal_alone

SPECS = ["divprune:r=0.75", "visionzip:dominant=5,contextual=3", "prumerge", "prumerge+", "prumerge:ratio=0.25,neighbours=4",
         "prumerge+:ratio=0.2"]


def reduced_tokens(model, processor, image, spec):
    batch = encode(processor, [image], ["Hi"], "cpu")
    view = adapter_for(model).image_views(batch.vision)[0]
    return view, parse_policy(spec).reduce(view), batch


def reference_tokens(model, view, batch, spec):
    pol = parse_policy(spec)
    pixels = batch.vision["pixel_values"]
    if pol.name == "divprune":
        kept = ref.divprune(view.features, int(torch.tensor((1 - pol.r) * view.n).ceil()))
        return view.features[kept]
    if pol.name == "visionzip":
        return ref.visionzip(model, pixels, pol.dominant, pol.contextual)
    return ref.prumerge(model, pixels, pol.neighbours, plus=pol.name == "prumerge+", ratio=pol.ratio)


@pytest.mark.parametrize("spec", SPECS)
def test_tokens_equal_the_reference(tiny, images, spec):
    model, processor = tiny
    with torch.no_grad():
        for image in images:
            view, red, batch = reduced_tokens(model, processor, image, spec)
            want = reference_tokens(model, view, batch, spec)
            assert red.features.shape == want.shape, spec
            torch.testing.assert_close(red.features, want, rtol=1e-5, atol=1e-5)
            assert len(red.anchors) == red.features.shape[0] and int(red.anchors.max()) < view.n


@pytest.mark.parametrize("spec", SPECS)
def test_generation_equals_model_generate_on_the_reduced_prompt(tiny, vanilla, images, prompts, spec):
    """The engine's answer equals transformers' own generate fed the reduced prompt's embeddings (the
    methods' code hands the language model fewer image features; positions are numbered afresh)."""
    model, processor = tiny
    ref_model, _ = vanilla
    for image, prompt in zip(images[:2], prompts[:2]):
        [res] = dyrate.generate(model, processor, [image], [prompt], policy=spec, max_new_tokens=8)
        batch = encode(processor, [image], [prompt], "cpu")
        with torch.no_grad():
            view = adapter_for(model).image_views(batch.vision)[0]
            want_img = reference_tokens(model, view, batch, spec)
            ids = batch.input_ids[0]
            img = (ids == model.config.image_token_id).nonzero()[:, 0]
            emb = ref_model.get_input_embeddings()(ids)
            embeds = torch.cat([emb[: img[0]], want_img, emb[img[-1] + 1:]])[None]
            out = ref_model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                     max_new_tokens=8, do_sample=False)
        want = out[0].tolist()
        assert res.token_ids == want[: len(res.token_ids)], spec
        assert res.trace[0]["kept"] == [want_img.shape[0]] * len(res.trace[0]["kept"])
        assert res.retained == pytest.approx(want_img.shape[0] / view.n)


@pytest.mark.parametrize("spec", ["divprune:r=0.5", "visionzip:dominant=6,contextual=2", "prumerge:ratio=0.25"])
@pytest.mark.parametrize("beams", [1, 2])
def test_batch_rows_equal_rows_alone(tiny, images, prompts, spec, beams):
    model, processor = tiny
    together = dyrate.generate(model, processor, images, prompts, policy=spec, max_new_tokens=6, num_beams=beams)
    for i in range(3):
        alone = dyrate.generate(model, processor, images[i:i + 1], prompts[i:i + 1], policy=spec, max_new_tokens=6,
                                num_beams=beams)[0]
        assert together[i].token_ids == alone.token_ids
        assert together[i].flops == alone.flops


def test_pruning_nothing_equals_none(tiny, images, prompts):
    model, processor = tiny
    none = dyrate.generate(model, processor, images, prompts, max_new_tokens=8)
    kept_all = dyrate.generate(model, processor, images, prompts, policy="divprune:r=0", max_new_tokens=8)
    assert [r.token_ids for r in kept_all] == [r.token_ids for r in none]


@pytest.mark.parametrize("spec,words", [
    ("visionzip:dominant=0", "dominant must be >= 1"),
    ("visionzip:dominant=10,contextual=-1", "contextual >= 0"),
    ("visionzip:dominant=12,contextual=10", "more than the image's 16"),
    ("divprune:r=1.5", "[0, 1)"),
    ("divprune:r=-0.1", "[0, 1)"),
    ("prumerge:ratio=0", "(0, 1]"),
    ("prumerge:neighbours=-1", ">= 0"),
    ("divprune:k=2", "unknown parameter"),
])
def test_bad_parameters(tiny, images, spec, words):
    model, processor = tiny
    with pytest.raises(PolicySpecError) as err:
        dyrate.generate(model, processor, images[:1], ["Hi"], policy=spec, max_new_tokens=2)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_static_flops(tiny):
    from dyrate.measure.flops import NAMED_SHAPES, policy_flops

    shape = NAMED_SHAPES["llava-1.5-7b"]
    zip64 = policy_flops(shape, "visionzip:dominant=54,contextual=10", 40)
    assert zip64["k"] == 0 and zip64["image_tokens"] == [64] * 32
    # LLaVA-NeXT's stated 672x672 image: the base image and 4 crops, 64 tokens each pass
    assert policy_flops(NAMED_SHAPES["llava-next-7b"], "visionzip", 40)["image_tokens"] == [5 * 64] * 32
    assert policy_flops(NAMED_SHAPES["llava-onevision-7b"], "visionzip", 40)["image_tokens"] == [2 * 64] * 28
    with pytest.raises(PolicySpecError, match="depend on the data"):
        policy_flops(shape, "prumerge", 40)


def test_flops_floor_of_a_pre_llm_method(capsys):
    """A pre-LLM method prunes every layer: its floor is the text alone (k=0), below FastV's."""
    from dyrate.cli import main
    from dyrate.measure.flops import NAMED_SHAPES, floor_ratio, policy_flops

    shape = NAMED_SHAPES["llava-1.5-7b"]
    zip64 = policy_flops(shape, "visionzip:dominant=54,contextual=10", 40)
    assert zip64["k"] == 0 and zip64["floor"] == pytest.approx(floor_ratio(shape, 0, 40))
    assert zip64["floor"] < floor_ratio(shape, 2, 40) < zip64["ratio"] < 1
    assert main(["flops", "--config", "llava-1.5-7b", "--policy", "divprune:r=0.9", "--text-tokens", "40"]) == 0
    assert "pre-LLM" in capsys.readouterr().out


def test_bench_runs_pre_llm_methods(tiny):
    from dyrate.measure.bench import bench

    rows = bench(tiny[0], ["none", "divprune:r=0.75", "visionzip:dominant=3,contextual=1"], [2], new_tokens=3,
                 text_tokens=8, repeats=1)
    none, div, zipped = rows
    assert div.retained == pytest.approx(0.25) and zipped.retained == pytest.approx(0.25)
    assert none.peak_kv_bytes > div.peak_kv_bytes
    assert div.flops["prefill"]["ratio"] < 0.5


@pytest.mark.parametrize("spec,words", [("divprune:positions=shuffle", "positions must be one of")])
def test_bad_position_rule(spec, words):
    with pytest.raises(PolicySpecError, match=words):
        parse_policy(spec)


# ---------------------------------------------------------------- DART (in-LLM, at layer K)
@pytest.mark.parametrize("spec,trunc", [("dart:k=2,r=0.5,pivots_image=2,pivots_text=2", 6),
                                        ("dart:k=1,r=0.75,pivots_image=1,pivots_text=3", 3)])
@pytest.mark.parametrize("mode", ["evict", "mask"])
def test_dart_kept_set_equals_the_reference(tiny, vanilla, images, prompts, spec, trunc, mode):
    """The image tokens DART keeps from layer K on equal the restatement of the authors' selection
    (max_num_truncation = kept - image pivots, as dyrate derives it from r)."""
    from dyrate.engine import Engine, GenerationOptions, generate_tokens

    model, processor = tiny
    pol = parse_policy(spec)
    for image, prompt in zip(images, prompts):
        batch = encode(processor, [image], [prompt], "cpu")
        with torch.no_grad():
            want = ref.dart(vanilla[0], batch.input_ids, batch.vision["pixel_values"], pol.k, trunc,
                            pol.pivots_image, pol.pivots_text)
        engine = Engine(adapter_for(model), pol, mode)
        with torch.inference_mode():
            _, state = generate_tokens(engine, batch.input_ids, batch.attention_mask, batch.vision,
                                       GenerationOptions(max_new_tokens=3), eos=[3], pad=0)
        seg = state.segments[1]
        kept = sorted(int(c) for c in seg.col[0][seg.attend[0]] if int(state.group[0, c]) == 1)
        assert kept == want, (spec, mode)


@pytest.mark.parametrize("beams", [1, 2])
def test_dart_rows_equal_rows_alone(tiny, images, prompts, beams):
    assert_rows_equal_alone(*tiny, images, prompts, policy="dart:k=2,r=0.5,pivots_image=2,pivots_text=2",
                            max_new_tokens=6, num_beams=beams)


def test_dart_static_counts_and_bad_parameters(tiny, images):
    from dyrate.measure.flops import NAMED_SHAPES, policy_flops

    assert policy_flops(NAMED_SHAPES["llava-1.5-7b"], "dart", 40)["image_tokens"][2] == 132  # their default
    [res] = dyrate.generate(*tiny, images[:1], ["What is it?"], policy="dart:k=2,r=0.5,pivots_image=2,pivots_text=2",
                            max_new_tokens=2)
    assert res.trace[0]["kept"][2] == 2 + 4 * ((8 - 2) // 4)  # 16 tokens: kept 8 -> 2 pivots + 4 x 1
    for spec in ("dart:pivots_image=0", "dart:k=0", "dart:r=1"):
        with pytest.raises(PolicySpecError):
            parse_policy(spec)
