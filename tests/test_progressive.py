"""`progressive`: FastV whose kept set shrinks on a schedule over decode steps, with no probe at
decode steps (the reference equality is in test_engine.py)."""

from __future__ import annotations

import pytest

import dyrate
from dyrate.cli import main
from dyrate.errors import PolicySpecError
from dyrate.policies import parse_policy
from dyrate.rates import keep_count


def run(tiny, images, prompts, policy, mode="evict", n=3, **kw):
    model, processor = tiny
    return dyrate.generate(model, processor, images[:n], prompts[:n], policy=policy, mode=mode,
                           max_new_tokens=kw.pop("max_new_tokens", 10), **kw)


@pytest.mark.parametrize("beams", [1, 2])
@pytest.mark.parametrize("mode", ["evict", "mask"])
def test_one_step_equals_fastv(tiny, images, prompts, beams, mode):
    ours = run(tiny, images, prompts, "progressive:k=2,0=0.5", mode, num_beams=beams)
    ref = run(tiny, images, prompts, "fastv:k=2,r=0.5", mode, num_beams=beams)
    assert [r.token_ids for r in ours] == [r.token_ids for r in ref]
    assert [[e["kept"] for e in r.trace] for r in ours] == [[e["kept"] for e in r.trace] for r in ref]


def test_kept_set_follows_the_schedule_without_a_decode_probe(tiny, images, prompts):
    spec = "progressive:k=2,0=0.25,3=0.5,6=0.75"
    policy = parse_policy(spec)
    assert (policy.decode_probe, policy.decode_decides) == (False, True)
    assert policy.static_image_tokens(100, 4) is None  # depends on the answer's length
    rates = {0: 0.25, 3: 0.5, 6: 0.75}
    for res in run(tiny, images, prompts, spec, max_new_tokens=9):
        n_img = res.trace[0]["kept"][0]
        for e in res.trace:
            now = rates[max(t for t in rates if t <= e["step"])]
            assert e["kept"][2] == keep_count(now, n_img)
            assert e["kept"][1] == n_img  # layers before K see every image token
            assert (e["shares"][0] is None) == (e["step"] > 0)  # no probe at decode steps
            assert (e["rate"][0] is None) == (e["step"] not in rates)
    assert parse_policy("progressive:k=2,0=0.5").static_image_tokens(10, 4) == [10, 10, 5, 5]
    assert parse_policy(spec).spec() == spec
    assert [policy.decides_at(t) for t in range(1, 8)] == [t in rates for t in range(1, 8)]  # the engine asks only then


@pytest.mark.parametrize("spec,match", [
    ("progressive:k=2,4=0.5", "0=R"),
    ("progressive:k=2,0=0.5,4=0.25", "must not decrease"),
    ("progressive:k=2,0=1.5", "rate"),
    ("progressive:k=0,0=0.5", "k=0"),
    ("progressive:k=2,0=0.5,x=0.7", "STEP=RATE"),
    ("progressive:k=2", "0=R"),
])
def test_bad_specs(spec, match):
    with pytest.raises(PolicySpecError, match=match):
        parse_policy(spec)


def test_cli_bad_spec_exits_2(capsys):
    rc = main(["flops", "--config", "llava-1.5-7b", "--text-tokens", "64", "--policy", "progressive:k=2,0=0.5,4=0.25"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "must not decrease" in err[0]


def test_analyze_traces_a_policy_without_a_decode_probe(tiny, images, prompts):
    """`dyrate analyze --policy`: every step counts, at the rate in force; shares only where probed."""
    import math

    from dyrate.evaluation.analyze import policy_trace

    model, processor = tiny
    out = policy_trace(model, processor, images[:2], prompts[:2], "progressive:k=2,0=0.25,3=0.5", max_new_tokens=6)
    assert out["count"][0] == 2 and len(out["count"]) >= 4
    assert out["rate"][:4] == pytest.approx([0.25, 0.25, 0.25, 0.5])
    assert not math.isnan(out["img"][0]) and all(math.isnan(v) for v in out["img"][1:])
