"""The learned-rate policies `dyrate` (MLP) and `dyrate-rnn` (GRU) through the unchanged engine:
forced bins equal `none` / `fixed`, batches and beams work, foreign predictor files are refused."""

from __future__ import annotations

import json

import pytest
import torch

import dyrate
from dyrate.cli import main
from dyrate.errors import CheckpointError, PolicySpecError
from dyrate.policies import parse_policy
from dyrate.learn.predictors import (
    check_predictor,
    load_predictor,
    new_predictor,
    save_predictor,
)
from tiny import tiny_model

K = 2
ARCH_POLICY = {"mlp": "dyrate", "gru": "dyrate-rnn"}


def forced(model, arch: str, bin_: int, bins: int = 10, k: int = K, history: int = 4, rank: str = "step"):
    """A predictor whose argmax is always `bin_` (huge bias on that logit)."""
    pred = new_predictor(arch, bins=bins, k=k, history=history, model=model, features=("shares", "step"), rank=rank)
    head = pred.net[-1] if arch == "mlp" else pred.head
    with torch.no_grad():
        head.bias.zero_()
        head.bias[bin_] = 1e4
    return pred


def write(pred, path):
    return str(save_predictor(pred, path))


def as_progressive(trace) -> str:
    """The `progressive` spec of the rates a one-row evict run effectively ran at: at each step that
    decided, the largest rate so far (its kept set only shrinks)."""
    schedule, rate = {}, -1.0
    for e in trace:
        if e["rate"][0] is not None and e["rate"][0] > rate + 1e-9:
            rate = schedule[e["step"]] = round(e["rate"][0], 6)
    return f"progressive:k={K}," + ",".join(f"{t}={r:g}" for t, r in schedule.items())


def run(tiny, images, prompts, policy, mode="evict", n=3, **kw):
    model, processor = tiny
    return dyrate.generate(model, processor, images[:n], prompts[:n], policy=policy, mode=mode,
                           max_new_tokens=kw.pop("max_new_tokens", 10), **kw)


@pytest.mark.parametrize("arch", ["mlp", "gru"])
@pytest.mark.parametrize("mode", ["evict", "mask"])
def test_bin0_equals_none(tiny, images, prompts, tmp_path, arch, mode):
    path = write(forced(tiny[0], arch, 0), tmp_path / "p.safetensors")
    ours = run(tiny, images, prompts, f"{ARCH_POLICY[arch]}:k={K},predictor={path}", mode)
    ref = run(tiny, images, prompts, "none", mode)
    assert [r.token_ids for r in ours] == [r.token_ids for r in ref]
    for r in ours:
        assert all(e["rate"][0] == 0.0 for e in r.trace)
        assert r.retained == 1.0


@pytest.mark.parametrize("arch", ["mlp", "gru"])
@pytest.mark.parametrize("mode", ["evict", "mask"])
@pytest.mark.parametrize("bin_", [3, 7])
def test_bin_i_equals_fixed(tiny, images, prompts, tmp_path, arch, mode, bin_):
    path = write(forced(tiny[0], arch, bin_), tmp_path / "p.safetensors")
    ours = run(tiny, images, prompts, f"{ARCH_POLICY[arch]}:k={K},predictor={path}", mode)
    ref = run(tiny, images, prompts, f"fixed:k={K},r={bin_ / 10}", mode)
    assert [r.token_ids for r in ours] == [r.token_ids for r in ref]
    for a, b in zip(ours, ref):
        assert [e["kept"] for e in a.trace] == [e["kept"] for e in b.trace]
        assert [e["shares"] for e in a.trace] == [e["shares"] for e in b.trace]
        assert all(e["rate"][0] == pytest.approx(bin_ / 10) for e in a.trace)
        assert a.flops == b.flops


@pytest.mark.parametrize("arch,history,extra", [("mlp", 1, ()), ("gru", 3, ()), ("gru", 0, ()), ("mlp", 1, ("hidden",)),
                                                ("gru", 3, ("hidden",))])
@pytest.mark.parametrize("mode", ["evict", "mask"])
def test_random_predictor_rows_equal_alone_and_beams(tiny, images, prompts, tmp_path, arch, history, extra, mode):
    """An untrained predictor varies its rate; batch rows must still equal rows alone, beams must run."""
    pred = new_predictor(arch, k=K, history=history, model=tiny[0], features=("shares", "step", *extra), seed=3)
    with torch.no_grad():  # spread the logits so the argmax moves with the shares
        head = pred.net[-1] if arch == "mlp" else pred.head
        head.weight.mul_(50.0)
    path = write(pred, tmp_path / "p.safetensors")
    spec = f"{ARCH_POLICY[arch]}:predictor={path}"  # k from the predictor
    batch = run(tiny, images, prompts, spec, mode)
    for i in range(3):
        alone = run(tiny, images[i:i + 1], prompts[i:i + 1], spec, mode, n=1)[0]
        assert batch[i].token_ids == alone.token_ids
        assert [e["kept"] for e in batch[i].trace] == [e["kept"] for e in alone.trace]
    rates = {e["rate"][0] for r in batch for e in r.trace}
    assert len(rates) > 1, rates  # the rate really is dynamic here
    beams = run(tiny, images, prompts, spec, mode, num_beams=2)
    assert all(len(r.token_ids) > 0 for r in beams)


def test_spec_and_static_tokens(tiny, tmp_path):
    path = write(forced(tiny[0], "mlp", 2), tmp_path / "p.safetensors")
    pol = parse_policy(f"dyrate:predictor={path}")
    assert pol.k == K and pol.spec() == f"dyrate:k={K},predictor={path}"
    assert pol.static_image_tokens(16, 4) is None and pol.decode_probe


def test_refuses_foreign_predictors(tiny, images, prompts, tmp_path):
    model = tiny[0]
    # another K, another B, the wrong arch
    path = write(forced(model, "mlp", 1), tmp_path / "p.safetensors")
    with pytest.raises(PolicySpecError, match="trained for k=2"):
        parse_policy(f"dyrate:k=3,predictor={path}")
    with pytest.raises(PolicySpecError, match="10 rate bins, not 8"):
        check_predictor(model, load_predictor(path), bins=8)
    with pytest.raises(PolicySpecError, match="use dyrate\\b"):
        parse_policy(f"dyrate-rnn:predictor={path}")
    # another model: deeper decoder (validate) and other widths (fingerprint)
    deeper, _ = tiny_model(seed=0, n_layers=6)
    other = write(forced(deeper, "mlp", 1), tmp_path / "deep.safetensors")
    with pytest.raises(PolicySpecError, match="6-layer decoder"):
        run(tiny, images, prompts, f"dyrate:predictor={other}")
    wider, _ = tiny_model(seed=0, hidden=32)
    with pytest.raises(CheckpointError, match="another model: hidden_size=32"):
        check_predictor(model, load_predictor(write(forced(wider, "mlp", 1), tmp_path / "w.safetensors")))
    check_predictor(model, load_predictor(path), k=K, bins=10)  # the right one passes
    # same depth, other widths: the engine checks the fingerprint before generating
    with pytest.raises(CheckpointError, match="another model: hidden_size=32"):
        run(tiny, images, prompts, f"dyrate:predictor={tmp_path / 'w.safetensors'}")
    # another image-token count (same decoder): caught by the fingerprint too
    bigger, _ = tiny_model(seed=0, image_size=40)
    other = write(forced(bigger, "mlp", 1), tmp_path / "img.safetensors")
    with pytest.raises(CheckpointError, match="n_img=25"):
        run(tiny, images, prompts, f"dyrate:predictor={other}")


def test_refuses_non_safetensors(tmp_path, tiny):
    pt = tmp_path / "p.pt"
    torch.save({"x": torch.zeros(1)}, pt)
    with pytest.raises(CheckpointError, match="must be a .safetensors file"):
        parse_policy(f"dyrate:predictor={pt}")
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(pt.read_bytes())  # a pickle renamed
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        parse_policy(f"dyrate:predictor={fake}")
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(1)}, str(bare))
    with pytest.raises(CheckpointError, match="without dyrate predictor metadata"):
        parse_policy(f"dyrate:predictor={bare}")
    with pytest.raises(CheckpointError, match="no such predictor file"):
        parse_policy(f"dyrate:predictor={tmp_path / 'missing.safetensors'}")
    # no predictor=: the one shipped for the built-in model, which refuses another model
    from dyrate.assets import predictor_path

    assert parse_policy("dyrate:k=2").predictor == str(predictor_path("mlp"))
    assert parse_policy("dyrate-rnn").predictor == str(predictor_path("gru"))
    with pytest.raises((PolicySpecError, CheckpointError), match="predictor"):
        parse_policy("dyrate:k=2").check_model(tiny[0])


def test_cli_generate_errors(tiny_dir, images, tmp_path, capsys):
    img = tmp_path / "img.png"
    images[0].save(img)
    pt = tmp_path / "p.pt"
    torch.save({"x": torch.zeros(1)}, pt)
    deeper, _ = tiny_model(seed=0, n_layers=6)
    other = write(forced(deeper, "mlp", 1), tmp_path / "deep.safetensors")
    for spec in [f"dyrate:predictor={pt}", f"dyrate:predictor={other}", "dyrate-rnn:k=2"]:
        rc = main(["generate", "--model", str(tiny_dir), "--image", str(img), "--prompt", "Hi", "--policy", spec])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("dyrate generate: error:"), err
    path = write(forced(tiny_model(seed=0)[0], "gru", 2), tmp_path / "ok.safetensors")
    rc = main(["generate", "--model", str(tiny_dir), "--image", str(img), "--prompt", "Hi", "--json",
               "--policy", f"dyrate-rnn:predictor={path}", "--max-new-tokens", "4"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out  # the JSON parses


def test_hidden_feature_reads_the_state_after_layer_k_minus_1(tiny, vanilla, images, prompts, tmp_path):
    """A predictor that looks only at the hidden state decides at prefill from the last prompt
    token's output of layer K-1, computed here independently by plain transformers."""
    from dyrate.api import build_prompt
    from dyrate.learn.predictors import feature_vector

    model, processor = tiny
    pred = new_predictor("mlp", k=K, model=model, features=("shares", "hidden"), seed=6)
    with torch.no_grad():
        pred.net[0].weight[:, :4].zero_()  # blind to the shares
        pred.net[0].weight.mul_(20.0)
        pred.net[-1].weight.mul_(50.0)
    path = write(pred, tmp_path / "h.safetensors")
    ours = run(tiny, images, prompts, f"dyrate:predictor={path}", "evict", n=3, max_new_tokens=2)
    vmodel, vproc = vanilla
    wants = []
    for r, image, prompt in zip(ours, images, prompts):
        batch = vproc(images=[image], text=[build_prompt(vproc, prompt)], return_tensors="pt")
        with torch.no_grad():
            states = vmodel(**batch, output_hidden_states=True).hidden_states  # embeddings, then one per layer
            x = feature_vector(torch.zeros(1, 4), 0, pred.config.features, states[K][:, -1])
            want = float(pred(x).argmax(-1)) / 10
        assert r.trace[0]["rate"][0] == pytest.approx(want)
        wants.append(want)
    assert len(set(wants)) > 1, wants  # the decision really follows the hidden state


@pytest.mark.parametrize("arch", ["mlp", "gru"])
@pytest.mark.parametrize("mode", ["evict", "mask"])
@pytest.mark.parametrize("bin_", [3, 7])
def test_prefill_rank_at_bin_i_equals_fastv(tiny, images, prompts, tmp_path, arch, mode, bin_):
    """rank "prefill": the prefill's probe ranks the image tokens at every step, so a constant bin
    is FastV at that rate (in mask mode too, where "step" ranking re-ranks every step)."""
    path = write(forced(tiny[0], arch, bin_, rank="prefill"), tmp_path / "p.safetensors")
    assert load_predictor(path).config.rank == "prefill"
    ours = run(tiny, images, prompts, f"{ARCH_POLICY[arch]}:k={K},predictor={path}", mode, num_beams=1)
    ref = run(tiny, images, prompts, f"fastv:k={K},r={bin_ / 10}", mode)
    assert [r.token_ids for r in ours] == [r.token_ids for r in ref]
    for a, b in zip(ours, ref):
        assert [e["kept"] for e in a.trace] == [e["kept"] for e in b.trace]
    beams = run(tiny, images, prompts, f"{ARCH_POLICY[arch]}:k={K},predictor={path}", mode, num_beams=2)
    ref_beams = run(tiny, images, prompts, f"fastv:k={K},r={bin_ / 10}", mode, num_beams=2)
    assert [r.token_ids for r in beams] == [r.token_ids for r in ref_beams]


def test_quantile_bin(tiny, images, prompts, tmp_path):
    """q=Q picks the lowest bin whose cumulative predicted probability reaches Q (checked against
    the predictor's own logits on the trace's inputs); q near 0 keeps everything, q near 1 prunes
    the most; bad q values are refused."""
    from dyrate.policies.dyrate import DyRate
    from dyrate.learn.predictors import feature_vector

    pred = new_predictor("mlp", k=K, model=tiny[0], features=("shares", "step"), seed=3)
    with torch.no_grad():
        pred.net[-1].bias.copy_(torch.linspace(-1.0, 1.0, 10))  # a spread distribution
    path = write(pred, tmp_path / "p.safetensors")
    for q in (0.05, 0.5, 0.95):
        out = run(tiny, images, prompts, f"dyrate:predictor={path},q={q}", "mask", n=2, max_new_tokens=4)
        for r in out:
            for t, e in enumerate(r.trace):
                shares = torch.tensor([[e["shares"][0][g] for g in ("sys", "img", "ins", "res")]])
                with torch.no_grad():
                    cdf = pred(feature_vector(shares, t, pred.config.features)).softmax(-1).cumsum(-1)[0]
                want = int((cdf < q).sum().clamp(max=9))
                assert e["rate"][0] == pytest.approx(want / 10), (q, t)
    lo = run(tiny, images, prompts, f"dyrate:predictor={path},q=0.001", "evict", n=1, max_new_tokens=3)[0]
    hi = run(tiny, images, prompts, f"dyrate:predictor={path},q=0.999", "evict", n=1, max_new_tokens=3)[0]
    assert lo.retained > hi.retained
    assert parse_policy(f"dyrate:predictor={path},q=0.2").spec().endswith(",q=0.2")
    assert isinstance(parse_policy(f"dyrate:predictor={path}"), DyRate)
    for bad in ("q=0", "q=1.5", "q=abc"):
        with pytest.raises(PolicySpecError, match="q="):
            parse_policy(f"dyrate:predictor={path},{bad}")


@pytest.mark.parametrize("arch", ["mlp", "gru"])
@pytest.mark.parametrize("mode", ["evict", "mask"])
def test_decide_prefill_is_fastv_at_the_prefills_rate(tiny, images, prompts, tmp_path, arch, mode):
    """decide "prefill": the predictor picks one rate per prompt at prefill and it holds for the whole
    answer (no decode-step probe), so each row equals FastV at that row's prefill rate, beams too;
    the same weights deciding at every step do vary the rate."""
    pred = new_predictor(arch, k=K, history=4, model=tiny[0], features=("shares", "step"), seed=3, rank="prefill",
                         decide="prefill")
    with torch.no_grad():  # spread the logits so the argmax moves with the shares and the step
        for p in pred.parameters():
            p.mul_(40.0)
    path = write(pred, tmp_path / "p.safetensors")
    assert load_predictor(path).config.decide == "prefill"
    policy = f"{ARCH_POLICY[arch]}:k={K},predictor={path}"
    assert parse_policy(policy).decode_probe is False
    for i in range(3):
        [ours] = run(tiny, images[i:], prompts[i:], policy, mode, n=1)
        rate = round(ours.trace[0]["rate"][0], 6)
        for beams in (1, 2):
            [ref] = run(tiny, images[i:], prompts[i:], f"fastv:k={K},r={rate}", mode, n=1, num_beams=beams)
            [got] = run(tiny, images[i:], prompts[i:], policy, mode, n=1, num_beams=beams)
            assert got.token_ids == ref.token_ids
            assert [e["kept"] for e in got.trace] == [e["kept"] for e in ref.trace]
    per_step = new_predictor(arch, k=K, history=4, model=tiny[0], features=("shares", "step"), rank="prefill")
    per_step.load_state_dict(pred.state_dict())
    step_path = write(per_step, tmp_path / "s.safetensors")
    rates = {e["rate"][0] for r in run(tiny, images, prompts, f"{ARCH_POLICY[arch]}:k={K},predictor={step_path}", mode)
             for e in r.trace}
    assert len(rates) > 1, rates  # the test predictor is not constant: deciding once is what made the rows equal


@pytest.mark.parametrize("arch,features", [("mlp", ("shares", "step")), ("gru", ("shares", "step")),
                                           ("mlp", ("hidden", "step")), ("gru", ("hidden", "step"))])
def test_decide_shrink_decides_every_step_and_only_shrinks_in_evict(tiny, images, prompts, tmp_path, arch, features):
    """decide "shrink": a decision at every step (with a probe when the features read the share
    vector; without one on hidden + step); in evict mode the kept count of layer K at step t is the
    running minimum of the counts the predictor asked for (the kept set never grows back), each
    row of a batch equals the row alone, and a row equals `progressive` (tested against the
    independent reference) at the rates it chose."""
    from dyrate.rates import keep_count

    pred = new_predictor(arch, k=K, history=4, model=tiny[0], features=features, seed=7, rank="prefill",
                         decide="shrink")
    with torch.no_grad():  # spread the logits so the argmax moves with the features
        for p in pred.parameters():
            p.mul_(40.0)
    path = write(pred, tmp_path / "shrink.safetensors")
    policy = f"{ARCH_POLICY[arch]}:k={K},predictor={path}"
    probed = "shares" in features
    assert parse_policy(policy).decode_probe is probed
    assert parse_policy(policy).decode_decides is not probed
    batch = run(tiny, images, prompts, policy, "evict", max_new_tokens=12)
    asked_varies, regrowth_refused = False, False
    for i, res in enumerate(batch):
        n_img = res.trace[0]["kept"][0]
        asked = [keep_count(e["rate"][0], n_img) for e in res.trace]
        kept = [e["kept"][K] for e in res.trace]
        assert kept == [min(asked[: t + 1]) for t in range(len(asked))], (asked, kept)
        asked_varies |= len(set(asked)) > 1
        regrowth_refused |= any(asked[t] > kept[t] for t in range(len(asked)))
        [alone] = run(tiny, images[i:], prompts[i:], policy, "evict", n=1, max_new_tokens=12)
        assert alone.token_ids == res.token_ids
        assert all((e["shares"][0] is None) == (not probed and e["step"] > 0) for e in res.trace)
        [same] = run(tiny, images[i:], prompts[i:], as_progressive(res.trace), "evict", n=1, max_new_tokens=12)
        assert same.token_ids == res.token_ids
        assert [e["kept"] for e in same.trace] == [e["kept"] for e in res.trace]
    assert asked_varies and regrowth_refused  # the test predictor is not constant, and asked to grow back once


def test_shrink_labels_are_suffix_minima():
    from dyrate.learn.oracle import oracle_from_kls, prompt_oracle_from_kls, shrink_oracle_from_kls

    gen = torch.Generator().manual_seed(0)
    kls = torch.rand(7, 10, generator=gen).cumsum(1) * 0.01  # KL grows with the bin
    kls[:, 0] = 0.0
    per_step = oracle_from_kls(kls, 0.02)
    shrink = shrink_oracle_from_kls(kls, 0.02)
    assert shrink.tolist() == [min(per_step[t:].tolist()) for t in range(7)]
    assert all(a <= b for a, b in zip(shrink.tolist(), shrink.tolist()[1:]))  # prunes more as the answer goes on
    assert int(shrink[0]) == int(prompt_oracle_from_kls(kls, 0.02)[0])  # step 0: the per-prompt budget


def test_cap_and_every(tiny, images, prompts, tmp_path):
    """cap=C: no step keeps more than ceil(C * n_img) (a capped run whose predictor asks for bin 0 equals
    fastv at r = 1 - C); every=N: decisions at the prefill and every N-th decode step only (MLP), and
    an MLP shrink predictor at every=N equals `progressive` at the rates those steps chose."""
    from dyrate.policies.dyrate import DyRate

    path = write(forced(tiny[0], "mlp", 0, rank="prefill"), tmp_path / "p0.safetensors")
    capped = run(tiny, images, prompts, f"dyrate:k={K},predictor={path},cap=0.5", "evict")
    ref = run(tiny, images, prompts, f"fastv:k={K},r=0.5", "evict")
    assert [r.token_ids for r in capped] == [r.token_ids for r in ref]
    assert [[e["kept"] for e in r.trace] for r in capped] == [[e["kept"] for e in r.trace] for r in ref]
    pred = new_predictor("mlp", k=K, model=tiny[0], features=("hidden", "step"), seed=7, rank="prefill",
                         decide="shrink")
    with torch.no_grad():
        for p in pred.parameters():
            p.mul_(40.0)
    spath = write(pred, tmp_path / "s.safetensors")
    for i in range(3):
        [res] = run(tiny, images[i:], prompts[i:], f"dyrate:k={K},predictor={spath},every=3", n=1, max_new_tokens=12)
        decided = [e["step"] for e in res.trace if e["rate"][0] is not None]
        assert decided == [t for t in range(len(res.trace)) if t % 3 == 0]
        [same] = run(tiny, images[i:], prompts[i:], as_progressive(res.trace), n=1, max_new_tokens=12)
        assert same.token_ids == res.token_ids and [e["kept"] for e in same.trace] == [e["kept"] for e in res.trace]
    # between decisions the engine does not ask the policy (decides_at): the predictor runs only at
    # the decided steps, also when its features read the share vector (no probe between)
    for features in (("hidden", "step"), ("shares", "hidden")):
        p = new_predictor("mlp", k=K, model=tiny[0], features=features, seed=7, rank="prefill", decide="shrink")
        pol = parse_policy(f"dyrate:k={K},predictor={write(p, tmp_path / 'c.safetensors')},every=3")
        calls, real_step = [], pol.net.step
        pol.net.step = lambda x, st: calls.append(x.shape[0]) or real_step(x, st)
        [res] = run(tiny, images, prompts, pol, n=1, max_new_tokens=12)
        assert len(calls) == len([t for t in range(len(res.trace)) if t % 3 == 0]) and len(res.trace) > 6
        assert pol.decides_at(3) and not pol.decides_at(4)
    for bad, match in (("cap=0", "cap="), ("cap=1.5", "cap="), ("every=0", "every=")):
        with pytest.raises(PolicySpecError, match=match):
            parse_policy(f"dyrate:predictor={spath},{bad}")
    gru = write(new_predictor("gru", k=K, model=tiny[0], features=("hidden", "step"), rank="prefill", decide="shrink"),
                tmp_path / "g.safetensors")
    with pytest.raises(PolicySpecError, match="every=2 needs an MLP"):
        parse_policy(f"dyrate-rnn:predictor={gru},every=2")
    assert isinstance(parse_policy(f"dyrate:predictor={spath},cap=0.5,every=4"), DyRate)
    assert parse_policy(f"dyrate:predictor={spath},cap=0.5,every=4").spec().endswith(",cap=0.5,every=4")


def test_predictor_file_carries_its_policy_settings(tiny, tmp_path):
    """`defaults` in the file (q, cap, every) apply where the spec is silent; the spec wins; anything
    else in `defaults` is refused with one line."""
    import dataclasses

    pred = new_predictor("mlp", k=K, model=tiny[0], features=("hidden", "step"), rank="prefill", decide="shrink")
    pred.config = dataclasses.replace(pred.config, defaults={"q": 0.05, "cap": 0.5, "every": 8})
    path = write(pred, tmp_path / "d.safetensors")
    assert load_predictor(path).config.defaults == {"q": 0.05, "cap": 0.5, "every": 8}
    policy = parse_policy(f"dyrate:predictor={path}")
    assert (policy.q, policy.cap, policy.every) == (0.05, 0.5, 8)
    policy = parse_policy(f"dyrate:predictor={path},q=0.2,every=2")
    assert (policy.q, policy.cap, policy.every) == (0.2, 0.5, 2)
    with pytest.raises(PolicySpecError, match="defaults"):
        dataclasses.replace(pred.config, defaults={"lambda": 1.0})
    with pytest.raises(PolicySpecError, match="defaults"):
        dataclasses.replace(pred.config, defaults={"q": "high"})
