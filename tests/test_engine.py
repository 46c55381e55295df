"""Engine correctness: equality with `model.generate` when nothing is pruned, equality with the
independent uncached reference when something is, and the structural invariants of DESIGN §2."""

from __future__ import annotations

import pytest
import torch

from dyrate.adapters import adapter_for
from dyrate.api import build_prompt, generate
from dyrate.adapters import IMG
from dyrate.engine import Engine
from dyrate.engine import GenerationOptions, generate_tokens
from dyrate.policies import Policy, parse_policy

from reference import reference_generate

POLICIES = [
    "fastv:k=2,r=0.5",
    "fastv:k=1,r=0.75",
    "vtw:k=2",
    "fixed:k=2,r=0.5",
    "fixed:k=1,r=0.75",
    "schedule:1=0.25,3=0.75",
    "progressive:k=2,0=0.25,2=0.5,4=0.8",
    "none:k=2",
]


def batch_inputs(processor, images, prompts):
    texts = [build_prompt(processor, p) for p in prompts]
    return processor(images=images, text=texts, return_tensors="pt", padding=True, padding_side="left")


def run_engine(model, batch, spec, mode="evict", **opts):
    engine = Engine(adapter_for(model), parse_policy(spec), mode)
    with torch.inference_mode():
        outs, state = generate_tokens(engine, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                             GenerationOptions(**opts), eos=[3], pad=0)
    return engine, outs, state


def kept_columns(state, seg_index, row=0):
    """Image columns a segment attends (sorted)."""
    seg = state.segments[seg_index]
    cols = seg.col[row][seg.attend[row]]
    return sorted(int(c) for c in cols if int(state.group[row, c]) == IMG)


# ---------------------------------------------------------------- pruning off == model.generate
@pytest.mark.parametrize("n_rows", [1, 3])
@pytest.mark.parametrize(
    "opts",
    [
        dict(do_sample=False),
        dict(do_sample=True, seed=7),
        dict(do_sample=True, seed=3, temperature=0.7, top_k=20, top_p=0.9),
        dict(num_beams=3),
        dict(num_beams=2, length_penalty=0.5),
    ],
    ids=["greedy", "sample", "sample-warped", "beam3", "beam2-lp"],
)
def test_no_pruning_matches_generate(tiny, vanilla, images, prompts, n_rows, opts):
    model, processor = tiny
    ref_model, _ = vanilla
    batch = batch_inputs(processor, images[:n_rows], prompts[:n_rows])
    opts = dict(opts)
    seed = opts.pop("seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    expected = ref_model.generate(**batch, max_new_tokens=10, **opts)[:, batch["input_ids"].shape[1]:]
    results = generate(model, processor, images[:n_rows], prompts[:n_rows], policy="none",
                       max_new_tokens=10, seed=seed, **opts)
    for row, res in enumerate(results):
        want = expected[row].tolist()
        assert res.token_ids == want[: len(res.token_ids)]
        # HF pads finished rows (beam search fills with `pad_token_id or eos`, i.e. EOS when pad is 0)
        assert all(tok in (0, 3) for tok in want[len(res.token_ids):])


def test_sampling_depends_on_seed(tiny, images, prompts):
    model, processor = tiny
    a = generate(model, processor, images[:1], prompts[:1], max_new_tokens=12, do_sample=True, seed=1, temperature=2.0)
    b = generate(model, processor, images[:1], prompts[:1], max_new_tokens=12, do_sample=True, seed=2, temperature=2.0)
    c = generate(model, processor, images[:1], prompts[:1], max_new_tokens=12, do_sample=True, seed=1, temperature=2.0)
    assert a[0].token_ids == c[0].token_ids
    assert a[0].token_ids != b[0].token_ids


# ---------------------------------------------------------------- pruned == independent reference
@pytest.mark.parametrize("mode", ["evict", "mask"])
@pytest.mark.parametrize("spec", POLICIES)
def test_matches_reference(tiny, images, prompts, spec, mode):
    model, processor = tiny
    for row in (0, 1):
        batch = batch_inputs(processor, images[row : row + 1], prompts[row : row + 1])
        want_tokens, want_kept = reference_generate(model, batch["input_ids"], batch["pixel_values"], spec, mode, 6, eos=3)
        for n_new in (1, len(want_tokens)):
            _, outs, state = run_engine(model, batch, spec, mode, max_new_tokens=n_new)
            assert outs[0].token_ids == want_tokens[:n_new]
            for s in range(1, len(state.segments)):
                assert kept_columns(state, s) == want_kept[n_new - 1][s - 1], (spec, mode, n_new, s)


# ---------------------------------------------------------------- batch rows == rows alone
@pytest.mark.parametrize("mode", ["evict", "mask"])
@pytest.mark.parametrize("spec", ["fastv:k=2,r=0.5", "fixed:k=1,r=0.75", "schedule:1=0.25,3=0.75", "vtw:k=1",
                                  "progressive:k=1,0=0.25,2=0.5,4=0.8"])
@pytest.mark.parametrize("beams", [1, 2])
def test_batch_equals_rows_alone(tiny, images, prompts, spec, mode, beams):
    model, processor = tiny
    together = generate(model, processor, images, prompts, policy=spec, mode=mode, max_new_tokens=6, num_beams=beams)
    for i in range(3):
        alone = generate(model, processor, images[i : i + 1], prompts[i : i + 1], policy=spec, mode=mode,
                         max_new_tokens=6, num_beams=beams)[0]
        assert together[i].token_ids == alone.token_ids
        assert [s["kept"] for s in together[i].trace] == [s["kept"] for s in alone.trace]
        assert together[i].flops == alone.flops
        for a, b in zip(together[i].trace, alone.trace):
            for sa, sb in zip(a["shares"], b["shares"]):
                assert (sa is None) == (sb is None)
                if sa is not None:
                    assert sa == pytest.approx(sb, abs=1e-5)


# ---------------------------------------------------------------- invariants
class Zigzag(Policy):
    """Test policy: alternates a large and a small target every step."""

    name = "zigzag"
    decode_probe = True

    @property
    def stages(self):
        return (2,)

    def keep(self, stage, probe, state):
        frac = 0.9 if probe.step % 2 == 0 else 0.4
        return (probe.n_img.float() * frac).long() - probe.step


def test_evict_only_shrinks_mask_follows_target(tiny, images, prompts):
    model, processor = tiny
    ev = generate(model, processor, images[:2], prompts[:2], policy=Zigzag(), mode="evict", max_new_tokens=6)
    mk = generate(model, processor, images[:2], prompts[:2], policy=Zigzag(), mode="mask", max_new_tokens=6)
    for res in ev:
        kept = [step["kept"][2] for step in res.trace]
        assert all(a >= b for a, b in zip(kept, kept[1:])), kept
    for res in mk:
        kept = [step["kept"][2] for step in res.trace]
        assert kept == [int(16 * (0.9 if t % 2 == 0 else 0.4)) - t for t in range(len(kept))]


def test_kv_lengths_equal_kept_plus_text(tiny, images, prompts):
    model, processor = tiny
    batch = batch_inputs(processor, images[:1], prompts[:1])
    n_prompt = batch["input_ids"].shape[1]
    for spec, kept in [("fastv:k=2,r=0.5", 8), ("vtw:k=2", 0), ("fixed:k=1,r=0.75", 4)]:
        engine, outs, state = run_engine(model, batch, spec, max_new_tokens=5)
        k = engine.stages[0]
        n_steps = len(outs[0].token_ids) - 1  # the last token is never fed back
        for layer in range(4):
            length = state.cache.layers[layer].keys.shape[2]
            full = n_prompt + n_steps
            assert length == (full if layer < k else full - 16 + kept), (spec, layer)


def test_mask_equals_evict_for_fastv(tiny, images, prompts):
    model, processor = tiny
    for spec in ("fastv:k=2,r=0.5", "vtw:k=1", "schedule:1=0.25,3=0.75"):
        ev = generate(model, processor, images, prompts, policy=spec, mode="evict", max_new_tokens=8)
        mk = generate(model, processor, images, prompts, policy=spec, mode="mask", max_new_tokens=8)
        assert [r.token_ids for r in ev] == [r.token_ids for r in mk]


def test_fixed_rate_in_evict_mode_equals_fastv(tiny, images, prompts):
    model, processor = tiny
    a = generate(model, processor, images, prompts, policy="fixed:k=2,r=0.5", max_new_tokens=8)
    b = generate(model, processor, images, prompts, policy="fastv:k=2,r=0.5", max_new_tokens=8)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_pruning_changes_something(tiny, images, prompts):
    """Guard against a reference and an engine that both ignore the policy."""
    model, processor = tiny
    base = generate(model, processor, images, prompts, policy="none", max_new_tokens=8)
    pruned = generate(model, processor, images, prompts, policy="vtw:k=1", max_new_tokens=8)
    assert [r.token_ids for r in base] != [r.token_ids for r in pruned]
    assert all(r.retained == 0.0 for r in pruned)
    assert all(r.flops["prefill"]["ratio"] < 1.0 for r in pruned)


def test_trace_contents(tiny, images, prompts):
    model, processor = tiny
    (res,) = generate(model, processor, images[:1], prompts[:1], policy="fixed:k=2,r=0.5", max_new_tokens=5)
    assert len(res.trace) == len(res.token_ids)
    for step in res.trace:
        shares = step["shares"][0]
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-4)
        assert step["rate"][0] == pytest.approx(0.5)
        assert step["kept"] == [16, 16, 8, 8]
        assert step["flops"] > 0
    assert res.trace[0]["shares"][0]["res"] == 0.0  # nothing generated yet at prefill
    assert res.trace[-1]["shares"][0]["res"] > 0.0
    assert res.retained == pytest.approx(0.5)
    for conv in ("prefill", "cached", "nocache"):
        assert 0 < res.flops[conv]["ratio"] < 1


# ---------------------------------------------------------------- random pruning (the control)
def test_random_pruning_keeps_the_seeded_draw(tiny, images, prompts):
    """random:k,r,seed keeps the image tokens with the highest seeded uniform draws, not the
    most attended ones; the kept set is fixed after prefill."""
    model, processor = tiny
    batch = batch_inputs(processor, images[:1], prompts[:1])
    ids = batch["input_ids"][0]
    img_cols = [c for c, t in enumerate(ids.tolist()) if t == model.config.image_token_id]
    for seed in (0, 1):
        _, outs, state = run_engine(model, batch, f"random:k=2,r=0.75,seed={seed}", max_new_tokens=4)
        draws = torch.rand((1, len(ids)), generator=torch.Generator().manual_seed(seed))[0]
        top = sorted(img_cols, key=lambda c: -float(draws[c]))[: len(img_cols) // 4]
        assert kept_columns(state, 1) == sorted(top), seed
    fastv_state = run_engine(model, batch, "fastv:k=2,r=0.75", max_new_tokens=4)[2]
    assert kept_columns(fastv_state, 1) != kept_columns(state, 1)
    with pytest.raises(Exception, match="r=1.5"):
        parse_policy("random:r=1.5")


# ---------------------------------------------------------------- long decodes (segment buffers grow)
@pytest.mark.parametrize("spec", ["none", "fastv:k=2,r=0.5", "none:k=2"])
def test_long_forced_decode_matches_full_forward(tiny, vanilla, images, prompts, spec):
    """70 forced decode steps (past the segments' spare room, so their buffers grow): the engine's
    logits equal plain transformers' forward over the whole sequence (unpruned specs), and every
    segment's slot bookkeeping stays consistent."""
    from dyrate.adapters import RES
    from dyrate.engine import Segment

    model, processor = tiny
    batch = batch_inputs(processor, images[:1], prompts[:1])
    forced = torch.randint(5, model.config.get_text_config().vocab_size, (70,), generator=torch.Generator().manual_seed(0))
    assert model.config.image_token_id not in forced  # text tokens only
    engine = Engine(adapter_for(model), parse_policy(spec))
    with torch.inference_mode():
        logits, state = engine.prefill(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        steps = [logits]
        for tok in forced:
            steps.append(engine.decode(state, tok[None]))
    for seg in state.segments:
        assert isinstance(seg, Segment) and seg.col.shape[1] == seg.n
        assert seg.col[0, -1] == state.n_cols - 1 and bool((seg.col[0, 1:] > seg.col[0, :-1]).all())
        assert bool((seg.groups[0, -70:] == RES).all()) and bool(seg.valid[0, -70:].all())
        assert int(seg.n_keys[0]) == int(seg.attend[0].sum())
    if spec.startswith("fastv"):
        return
    ids = torch.cat([batch["input_ids"], forced[None, :-1]], dim=1)
    with torch.no_grad():
        full = vanilla[0](input_ids=ids, pixel_values=batch["pixel_values"]).logits[0, batch["input_ids"].shape[1] - 1:]
    torch.testing.assert_close(torch.cat(steps[:-1]), full.float(), atol=2e-4, rtol=1e-4)


def test_decoder_layers_get_the_cache_under_their_own_name(tiny, images, prompts):
    """transformers 5.24 renamed the layers' cache argument; the old name warns on every layer call."""
    import warnings

    model, processor = tiny
    assert adapter_for(model).cache_kwarg in ("cache", "past_key_values")
    batch = batch_inputs(processor, images[:1], prompts[:1])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        _, outs, _ = run_engine(model, batch, "fastv:k=2,r=0.5", max_new_tokens=3)
    assert outs is not None


class Shrinking(Policy):
    """Test policy: drops one more image token at every step (a rate that shrinks a little, often)."""

    name = "shrinking"
    decode_probe = True

    @property
    def stages(self):
        return (2,)

    def keep(self, stage, probe, state):
        return probe.n_img - 1 - probe.step


def test_lazy_compaction_equals_eager_and_gathers_seldom(tiny, images, prompts, monkeypatch):
    """Evict mode hides the slots a decode step drops and gathers them out of the KV cache only once
    they are a quarter of the segment: the same tokens and kept sets as gathering at every step,
    with fewer cache rewrites, and the cache holds exactly the valid slots."""
    model, processor = tiny
    batch = batch_inputs(processor, images, prompts)

    def lengths_and_outputs(compact_at):
        monkeypatch.setattr(Engine, "COMPACT_AT", compact_at)
        engine = Engine(adapter_for(model), Shrinking(), "evict")
        lengths = []
        real_decode = engine.decode

        def decode(state, tokens):
            logits = real_decode(state, tokens)
            lengths.append(state.cache.layers[2].keys.shape[2])
            return logits

        engine.decode = decode
        with torch.inference_mode():
            outs, state = generate_tokens(engine, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                          GenerationOptions(max_new_tokens=10), eos=[3], pad=0)
        seg = state.segments[1]
        assert state.cache.layers[2].keys.shape[2] == seg.n and bool((seg.valid.sum(1) == seg.n_stored).all())
        return lengths, outs, [kept_columns(state, 1, row) for row in range(len(prompts))]

    default = Engine.COMPACT_AT
    eager_lengths, eager, eager_kept = lengths_and_outputs(0.0)
    lazy_lengths, lazy, lazy_kept = lengths_and_outputs(default)
    assert [o.token_ids for o in lazy] == [o.token_ids for o in eager] and lazy_kept == eager_kept
    rewrites = lambda ls: sum(b < a + 1 for a, b in zip(ls, ls[1:]))  # noqa: E731  (a step that did not just grow by one)
    assert rewrites(lazy_lengths) < rewrites(eager_lengths), (lazy_lengths, eager_lengths)
