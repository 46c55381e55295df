"""Training of rate predictors: the soft-masked teacher-forced pass is the engine's mask mode when the
bin probabilities are one-hot, gradients reach the predictor, a few steps lower the loss, resume."""

from __future__ import annotations

import json

import pytest
import torch

from dyrate.adapters import adapter_for
from dyrate.api import build_prompt
from dyrate.cli import main
from dyrate.engine import Engine
from dyrate.policies import parse_policy
from dyrate.learn.predictors import feature_vector, load_predictor, new_predictor
from dyrate.learn.soft_mask import mask_bank
from dyrate.learn import Sample, TrainConfig
from dyrate.learn.objective import evaluate, gumbel_softmax, sequence_loss
from dyrate.learn.samples import greedy_responses, reference_responses
from dyrate.learn.teacher import prepare, pruned_logprobs, shares_of
from dyrate.learn.train import frozen, train

K = 2
ANSWERS = ["a red square", "two blue circles and a green triangle", "yes"]


def samples_of(images, prompts, answers=None):
    return [Sample(im, pr, a) for im, pr, a in zip(images, prompts, answers or [None] * len(prompts))]


@pytest.fixture(scope="module")
def cached(tiny, images, prompts):
    model, processor = tiny
    responses = greedy_responses(model, processor, samples_of(images, prompts), max_new_tokens=8)
    return [prepare(model, processor, im, pr, resp, K) for im, pr, resp in zip(images, prompts, responses)]


def engine_forced(model, processor, image, prompt, response, spec, mode):
    """The engine's log-probabilities along a teacher-forced response."""
    engine = Engine(adapter_for(model), parse_policy(spec), mode)
    batch = processor(images=[image], text=[build_prompt(processor, prompt)], return_tensors="pt")
    with torch.inference_mode():
        logits, state = engine.prefill(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        out = [logits.log_softmax(-1)]
        for tok in response[:-1]:
            out.append(engine.decode(state, torch.tensor([tok])).log_softmax(-1))
    return torch.cat(out), state


@pytest.mark.parametrize("bin_", [0, 4, 9])
def test_one_hot_soft_mask_is_engine_mask_mode(tiny, images, prompts, cached, bin_):
    model, processor = tiny
    for c, image, prompt in zip(cached, images, prompts):
        p = torch.nn.functional.one_hot(torch.full((c.n_steps,), bin_), 10).float()
        with torch.no_grad():
            ours = pruned_logprobs(model, c, p, mask_bank(10, len(c.img_cols)), K, eps=0.0)
        ref, state = engine_forced(model, processor, image, prompt, c.response, f"fixed:k={K},r={bin_ / 10}", "mask")
        torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
        shares = torch.stack([r["shares"][0, 0] for r in state.records])  # (T, 4)
        torch.testing.assert_close(shares_of(c), shares, atol=1e-5, rtol=1e-4)
    if bin_ == 0:  # bin 0 is the full model itself
        for c in cached:
            p = torch.nn.functional.one_hot(torch.zeros(c.n_steps, dtype=torch.long), 10).float()
            with torch.no_grad():
                torch.testing.assert_close(pruned_logprobs(model, c, p, mask_bank(10, 16), K, 0.0), c.teacher,
                                           atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["mlp", "gru"])
def test_gradient_reaches_predictor(tiny, cached, arch):
    model = tiny[0]
    cfg = TrainConfig(arch=arch, k=K, history=3, lam=0.5)
    pred = new_predictor(arch, k=K, history=3, model=model)
    with frozen(model):
        loss, info = sequence_loss(model, pred, cached[1], cfg, tau=0.7, generator=torch.Generator().manual_seed(0))
        loss.backward()
    grads = [p.grad for p in pred.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert 0 < info["keep"] <= 1 and info["kl"] >= 0 and info["fit"] == info["kl"]
    assert all(p.grad is None for p in model.parameters())


@pytest.fixture(scope="module")
def ce_cached(tiny, images, prompts):
    model, processor = tiny
    responses = reference_responses(model, processor, ANSWERS)
    return [prepare(model, processor, im, pr, resp, K) for im, pr, resp in zip(images, prompts, responses)]


def test_greedy_responses_are_the_unpruned_answers(tiny, images, prompts):
    """The teacher answers (transformers' model.generate) are dyrate's `none` answers, EOS included."""
    import dyrate

    model, processor = tiny
    ours = [r.token_ids for r in dyrate.generate(model, processor, images, prompts, policy="none", max_new_tokens=8)]
    assert greedy_responses(model, processor, samples_of(images, prompts), max_new_tokens=8, batch=2) == ours


def test_reference_responses(tiny):
    model, processor = tiny
    tok = processor.tokenizer
    for answer, resp in zip(ANSWERS, reference_responses(model, processor, ANSWERS)):
        assert resp == tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_ce_at_bin_0_is_the_plain_models_ce(tiny, images, prompts, ce_cached):
    """A predictor sure of bin 0 keeps everything: the ce fit is the unpruned model's teacher-forced CE."""
    model, processor = tiny
    cfg = TrainConfig(k=K, lam=0.5, objective="ce", eps=0.0)
    pred = new_predictor("mlp", k=K, model=model)
    with torch.no_grad():  # constant logits: bin 0 by a margin that makes the softmax exactly one-hot
        pred.net[-1].weight.zero_()
        pred.net[-1].bias.copy_(torch.tensor([1e4] + [0.0] * 9))
    for c, image, prompt in zip(ce_cached, images, prompts):
        batch = processor(images=[image], text=[build_prompt(processor, prompt)], return_tensors="pt")
        ids = torch.cat([batch["input_ids"], torch.tensor([c.response])], dim=1)  # (1, P + T)
        with torch.no_grad():
            _, info = sequence_loss(model, pred, c, cfg, tau=1.0, generator=None)
            logits = model(input_ids=ids, pixel_values=batch["pixel_values"]).logits[0]  # (P + T, V)
        n_prompt = batch["input_ids"].shape[1]
        logp = logits[n_prompt - 1:-1].float().log_softmax(-1)  # (T, V): the steps predicting the response
        ce = -logp.gather(1, torch.tensor(c.response)[:, None]).mean()
        assert info["fit"] == pytest.approx(float(ce), abs=2e-4)
        assert info["kl"] == pytest.approx(0.0, abs=1e-4)  # bin 0 is the full model
        assert info["keep"] == pytest.approx(1.0) and info["loss"] == pytest.approx(info["fit"] + 0.5)


def test_ce_gradient_reaches_predictor(tiny, ce_cached):
    model = tiny[0]
    cfg = TrainConfig(arch="gru", k=K, history=3, lam=0.5, objective="ce")
    pred = new_predictor("gru", k=K, history=3, model=model)
    with frozen(model):
        loss, info = sequence_loss(model, pred, ce_cached[1], cfg, tau=0.7, generator=torch.Generator().manual_seed(0))
        loss.backward()
    grads = [p.grad for p in pred.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert info["fit"] > 0 and info["kl"] >= 0 and info["fit"] != info["kl"]
    assert all(p.grad is None for p in model.parameters())


def test_ce_training_and_objective_mismatch(tiny, images, prompts, tmp_path):
    from dyrate.errors import CheckpointError, InputError

    model, processor = tiny
    cfg = TrainConfig(arch="mlp", k=K, steps=2, batch=2, hidden=8, lam=0.5, objective="ce")
    out = tmp_path / "ce.safetensors"
    with pytest.raises(InputError, match="ce objective needs a reference answer"):
        train(model, processor, samples_of(images, prompts), cfg, out, progress=False)
    summary = train(model, processor, samples_of(images, prompts, ANSWERS), cfg, out, progress=False)
    assert summary["finished"] and out.is_file() and load_predictor(out).bins == 10
    assert set(summary["last"]) == {"step", "tau", "loss", "fit", "kl", "keep"}
    kl_cfg = TrainConfig(arch="mlp", k=K, steps=4, batch=2, hidden=8, lam=0.5, objective="kl")
    with pytest.raises(CheckpointError, match="objective=ce"):
        train(model, processor, samples_of(images, prompts), kl_cfg, out, max_new_tokens=4, progress=False)
    with pytest.raises(InputError, match="objective"):
        TrainConfig(lam=0.5, objective="x")


def test_gumbel_softmax():
    logits = torch.tensor([[0.0, 5.0, 0.0]])
    assert gumbel_softmax(logits, 1.0, None).argmax().item() == 1
    p = gumbel_softmax(logits, 0.5, torch.Generator().manual_seed(0))
    assert p.shape == (1, 3) and abs(float(p.sum()) - 1) < 1e-6


@pytest.mark.parametrize("arch,budget", [("mlp", False), ("gru", True)])
def test_training_lowers_loss_and_resumes(tiny, images, prompts, tmp_path, arch, budget):
    model, processor = tiny
    kw = {"target_keep": 0.3, "lam": None} if budget else {"lam": 1.0}
    cfg = TrainConfig(arch=arch, k=K, steps=30, batch=3, lr=1e-2, history=3, hidden=16, **kw)
    out = tmp_path / "pred.safetensors"
    half = train(model, processor, samples_of(images, prompts), cfg, out, max_new_tokens=6, progress=False, stop_after=15)
    assert half["steps"] == 15 and not half["finished"]
    full = train(model, processor, samples_of(images, prompts), cfg, out, max_new_tokens=6, progress=False)
    assert full["steps"] == 30 and full["finished"]
    # noise-free loss before vs after training, on the training sequences
    responses = greedy_responses(model, processor, samples_of(images, prompts), 6)
    cache = [prepare(model, processor, im, pr, r, K) for im, pr, r in zip(images, prompts, responses)]
    before = evaluate(model, new_predictor(arch, cfg.bins, K, cfg.features, 3, 16, model, cfg.seed), cache, cfg)
    trained = load_predictor(out)
    after = evaluate(model, trained, cache, cfg)
    assert after["loss"] < before["loss"], (before, after)
    # a resumed run equals an uninterrupted one
    other = tmp_path / "straight.safetensors"
    train(model, processor, samples_of(images, prompts), cfg, other, max_new_tokens=6, progress=False)
    straight = load_predictor(other)
    for a, b in zip(trained.state_dict().values(), straight.state_dict().values()):
        torch.testing.assert_close(a, b)
    # the trained file runs as a policy
    name = "dyrate" if arch == "mlp" else "dyrate-rnn"
    import dyrate

    res = dyrate.generate(model, processor, images[:2], prompts[:2], policy=f"{name}:predictor={out}", max_new_tokens=4)
    assert all(r.trace[0]["rate"][0] is not None for r in res)


def test_cli_train_predictor(tiny_dir, tmp_path, capsys):
    out = tmp_path / "p.safetensors"
    rc = main(["train-predictor", "--model", str(tiny_dir), "--testbed", "--samples", "3", "--arch", "mlp",
               "--lambda", "0.5", "--out", str(out), "--steps", "3", "--batch", "2", "--max-new-tokens", "4",
               "--no-progress", "--json"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and out.is_file()
    ce_out = tmp_path / "ce.safetensors"
    rc = main(["train-predictor", "--model", str(tiny_dir), "--testbed", "--samples", "3", "--arch", "mlp",
               "--lambda", "0.5", "--objective", "ce", "--out", str(ce_out), "--steps", "2", "--batch", "2",
               "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0 and ce_out.is_file() and "(CE " in printed, printed
    for args in (["--arch", "mlp", "--lambda", "1", "--out", str(tmp_path / "x.pt")],
                 ["--arch", "gru", "--target-keep", "1.5", "--out", str(out)],
                 ["--arch", "mlp", "--lambda", "1", "--k", "9", "--out", str(tmp_path / "y.safetensors")],
                 ["--arch", "mlp", "--lambda", "1", "--k", "3", "--out", str(out)]):  # state for other settings
        rc = main(["train-predictor", "--model", str(tiny_dir), "--testbed", "--samples", "2", "--steps", "4",
                   "--no-progress", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("dyrate train-predictor: error:"), err
    rc = main(["train-predictor", "--model", str(tiny_dir), "--testbed", "--arch", "mlp", "--lambda", "1",
               "--objective", "x", "--out", str(out)])  # argparse choices
    assert rc == 2 and "invalid choice: 'x'" in capsys.readouterr().err


def test_folder_samples(tmp_path, images):
    from dyrate.errors import InputError
    from dyrate.evaluation.datasets import training_samples

    (tmp_path / "images").mkdir()
    images[0].save(tmp_path / "images" / "a.png")
    rows = [{"question_id": 1, "image": "a.png", "question": "what colour?", "answers": ["red", "crimson"]}]
    (tmp_path / "vqa.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pope = [{"question_id": 2, "image": "a.png", "question": "is there a cat?", "label": "no"}]
    (tmp_path / "pope_random.jsonl").write_text("\n".join(json.dumps(r) for r in pope) + "\n")
    captions = {"images": [{"id": 3, "file_name": "a.png"}],
                "annotations": [{"image_id": 3, "caption": "a noisy square."}, {"image_id": 3, "caption": "noise."}]}
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    got = training_samples(tmp_path, 5)
    assert [s.prompt for s in got] == ["what colour?", "is there a cat?", "describe the image."]
    assert got[0].image.name == "a.png"
    assert [s.answer for s in got] == ["red", "no", "a noisy square."]
    assert [s.answer for s in training_samples(tmp_path, 2)] == ["red", "no"]
    with pytest.raises(InputError):
        training_samples(tmp_path / "images", 5)


def test_testbed_samples_answers(tiny):
    from dyrate.testbed.data import sample_example, train_scene_seed
    from dyrate.testbed.data import predictor_samples

    got = predictor_samples(tiny[0].config.vision_config.image_size, 3, seed=1)
    assert len(got) == 3
    for i, s in enumerate(got):
        ex = sample_example(train_scene_seed(101, 0, 1, i))
        assert (s.prompt, s.answer) == (ex.question, ex.answer) and s.answer
        assert s.image.size == (tiny[0].config.vision_config.image_size,) * 2


def test_oracle_bins_and_objective(tiny, cached):
    """Oracle bins: every bin passes an infinite KL threshold, none a negative one, and a finite one
    gives per-step bins between; the oracle objective is the cross-entropy to them."""
    from dyrate.learn.oracle import oracle_bins

    model = tiny[0]
    c = cached[1]
    with frozen(model):
        assert (oracle_bins(model, c, 10, K, 1e-6, float("inf")) == 9).all()
        assert (oracle_bins(model, c, 10, K, 1e-6, -1.0) == 0).all()
        mid = oracle_bins(model, c, 10, K, 1e-6, 1e-3)
    assert mid.shape == (c.n_steps,) and ((mid >= 0) & (mid <= 9)).all()
    c.oracle = mid
    cfg = TrainConfig(arch="mlp", k=K, lam=0.0, objective="oracle")
    pred = new_predictor("mlp", k=K, model=model)
    loss, info = sequence_loss(model, pred, c, cfg, tau=1.0, generator=None)
    x = feature_vector(shares_of(c), torch.arange(c.n_steps), pred.config.features)
    want = torch.nn.functional.cross_entropy(pred.forward_sequence(x[None])[0], mid)
    assert info["fit"] == pytest.approx(float(want.detach()), rel=1e-5) and loss.requires_grad
    c.oracle = None


def test_hidden_feature_matches_engine_step_for_step(tiny, images, prompts, cached, tmp_path):
    """Feature `hidden` (the newest token's state after layer K-1): the teacher-forced pass feeds
    the predictor what the engine feeds it at every step, so their decisions agree step for step;
    and with it the rate varies within a sequence, gradients reach the predictor."""
    from dyrate.learn.predictors import save_predictor
    from dyrate.learn.teacher import step_hidden

    model, processor = tiny
    features = ("shares", "step", "hidden")
    pred = new_predictor("mlp", k=K, model=model, features=features, seed=5)
    assert pred.config.model_dim == model.config.get_text_config().hidden_size
    assert pred.config.in_dim == 5 + pred.config.model_dim
    with torch.no_grad():  # spread the logits so the argmax moves with the inputs
        pred.net[-1].weight.mul_(50.0)
    path = save_predictor(pred, tmp_path / "h.safetensors")
    assert load_predictor(path).config == pred.config
    seen = set()
    for c, image, prompt in zip(cached, images, prompts):
        h = step_hidden(c)  # (T, d)
        assert h.shape == (c.n_steps, pred.config.model_dim)
        with torch.no_grad():
            x = feature_vector(shares_of(c), torch.arange(c.n_steps), features, h)
            want = pred(x).argmax(-1).float() / 10  # (T,)
        _, state = engine_forced(model, processor, image, prompt, c.response, f"dyrate:k={K},predictor={path}", "mask")
        got = torch.stack([r["rate"][0, 0] for r in state.records])  # (T,)
        assert torch.equal(got, want)
        seen |= set(want.tolist())
    assert len(seen) > 1, seen
    cfg = TrainConfig(k=K, lam=0.5, features=features)
    with frozen(model):
        loss, _ = sequence_loss(model, pred, cached[0], cfg, tau=0.7, generator=torch.Generator().manual_seed(0))
        loss.backward()
    first = pred.net[0].weight.grad  # (hidden, F)
    assert first is not None and float(first[:, 5:].abs().sum()) > 0  # through the hidden-state inputs


def test_hidden_feature_needs_its_dimension(tiny):
    from dyrate.errors import CheckpointError, PolicySpecError
    from dyrate.learn.predictors import PredictorConfig, check_predictor

    with pytest.raises(PolicySpecError, match="needs the decoder's hidden size"):
        PredictorConfig(features=("shares", "hidden"))
    with pytest.raises(PolicySpecError, match="repeated"):
        PredictorConfig(features=("shares", "step", "step"))
    pred = new_predictor("mlp", k=K, features=("shares", "hidden"), model_dim=7)
    with pytest.raises(PolicySpecError, match="hidden state; none was given"):
        feature_vector(torch.rand(2, 4), 0, pred.config.features)
    # fingerprint of this model but another state width: refused before generating
    import dataclasses

    good = new_predictor("mlp", k=K, features=("shares", "hidden"), model=tiny[0])
    bad = type(good)(dataclasses.replace(good.config, model_dim=good.config.model_dim + 1))
    with pytest.raises(CheckpointError, match="hidden states"):
        check_predictor(tiny[0], bad)
    check_predictor(tiny[0], good)


def test_oracle_from_kls_by_hand():
    from dyrate.learn.oracle import oracle_from_kls

    kls = torch.tensor([[0.0, 0.01, 0.02, 0.5],   # bins 1, 2 within 0.02, bin 3 not -> 2
                        [0.0, 0.03, 0.01, 0.01],  # bin 1 already over -> 0 (later bins do not count)
                        [0.0, 0.0, 0.0, 0.0]])    # every bin -> 3
    assert oracle_from_kls(kls, 0.02).tolist() == [2, 0, 3]
    assert oracle_from_kls(kls, -1.0).tolist() == [0, 0, 0]


def test_train_on_a_shared_cache(tiny, images, prompts, tmp_path):
    """build_cache once, then two oracle thresholds: the per-bin KLs are reused, the labels follow
    the threshold, and train() writes a working predictor from the given cache."""
    from dyrate.learn.oracle import label_oracle
    from dyrate.learn.train import build_cache

    model, processor = tiny
    cfg = TrainConfig(arch="mlp", k=K, lam=0.0, objective="oracle", oracle_kl=float("inf"), steps=3, batch=2,
                      features=("shares", "hidden"))
    cache = build_cache(model, processor, samples_of(images, prompts), cfg, max_new_tokens=6)
    assert all((c.oracle == 9).all() and c.bin_kl.shape == (c.n_steps, 10) for c in cache)
    kls = [c.bin_kl for c in cache]
    cfg2 = TrainConfig(arch="mlp", k=K, lam=0.0, objective="oracle", oracle_kl=-1.0, steps=3, batch=2,
                       features=("shares", "hidden"))
    label_oracle(model, cache, cfg2)
    assert all((c.oracle == 0).all() for c in cache)
    assert all(c.bin_kl is k for c, k in zip(cache, kls))  # not recomputed
    out = train(model, processor, samples_of(images, prompts), cfg, tmp_path / "p.safetensors", progress=False, cache=cache)
    assert out["finished"] and all((c.oracle == 9).all() for c in cache)  # relabelled at cfg's threshold
    pred = load_predictor(out["out"])
    assert pred.config.features == ("shares", "hidden")


@pytest.mark.parametrize("bin_", [4, 9])
def test_prefill_rank_soft_mask_is_engine_fastv_mask_mode(tiny, images, prompts, cached, bin_):
    """Ranking by the prefill's probe: the one-hot training pass equals the engine's mask mode under
    FastV at that rate (the same kept set for every query), teacher-forced."""
    model, processor = tiny
    for c, image, prompt in zip(cached, images, prompts):
        p = torch.nn.functional.one_hot(torch.full((c.n_steps,), bin_), 10).float()
        with torch.no_grad():
            ours = pruned_logprobs(model, c, p, mask_bank(10, len(c.img_cols)), K, eps=0.0, rank_by="prefill")
        ref, _ = engine_forced(model, processor, image, prompt, c.response, f"fastv:k={K},r={bin_ / 10}", "mask")
        torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)
    with pytest.raises(Exception, match="rank"):
        TrainConfig(lam=0.1, rank="sideways")


def test_prompt_oracle_from_kls_by_hand():
    """decide=prefill: one label per prompt, the most pruning whose KL stays within the threshold at
    *every* step (bins 1..i all within, as per step)."""
    from dyrate.learn.oracle import prompt_oracle_from_kls

    kls = torch.tensor([[0.0, 0.01, 0.02, 0.5],
                        [0.0, 0.00, 0.03, 0.01],   # bin 2 over at this step -> the prompt gets 1
                        [0.0, 0.0, 0.0, 0.0]])
    assert prompt_oracle_from_kls(kls, 0.02).tolist() == [1]
    assert prompt_oracle_from_kls(kls, 1.0).tolist() == [3]
    assert prompt_oracle_from_kls(kls, -1.0).tolist() == [0]


def test_decide_prefill_training(tiny, tiny_dir, images, prompts, tmp_path, capsys):
    """decide=prefill trains on one label per prompt (the prefill step's) and writes it into the file;
    settings it cannot use are refused with one line."""
    from dyrate.learn.train import build_cache

    model, processor = tiny
    cfg = TrainConfig(arch="mlp", k=K, lam=0.0, objective="oracle", oracle_kl=1e-3, rank="prefill", decide="prefill",
                      steps=4, batch=2, features=("shares", "hidden"))
    cache = build_cache(model, processor, samples_of(images, prompts), cfg, max_new_tokens=6)
    for c in cache:
        assert c.oracle.shape == (1,) and c.n_steps > 1
        worst = c.bin_kl.max(0).values  # (bins,)
        i = int(c.oracle)
        assert (worst[1 : i + 1] <= 1e-3).all() and (i == 9 or worst[i + 1] > 1e-3)
    loss, info = sequence_loss(model, new_predictor("mlp", k=K, model=model, features=("shares", "hidden")), cache[0],
                               cfg, 1.0, None)
    assert torch.isfinite(loss) and info["fit"] > 0
    out = train(model, processor, samples_of(images, prompts), cfg, tmp_path / "p.safetensors", progress=False, cache=cache)
    assert load_predictor(out["out"]).config.decide == "prefill"
    for bad in ({"objective": "kl", "rank": "prefill"}, {"objective": "oracle", "rank": "step"}, {"decide": "later"}):
        with pytest.raises(Exception, match="decide"):
            TrainConfig(lam=0.0, **{"decide": "prefill", **bad})
    rc = main(["train-predictor", "--model", str(tiny_dir), "--testbed", "--arch", "mlp", "--lambda", "0",
               "--decide", "prefill", "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "decide=prefill" in err[0], err



def test_decide_shrink_training(tiny, images, prompts, tmp_path):
    """decide=shrink labels every step with the suffix minimum of the per-step oracle bins (step 0:
    the per-prompt budget) and trains on all of them; the file records the decision."""
    from dyrate.learn.oracle import oracle_from_kls, prompt_oracle_from_kls
    from dyrate.learn.train import build_cache

    model, processor = tiny
    cfg = TrainConfig(arch="gru", k=K, lam=0.0, objective="oracle", oracle_kl=1e-3, rank="prefill", decide="shrink",
                      steps=3, batch=2, features=("shares", "hidden", "step"), history=3)
    cache = build_cache(model, processor, samples_of(images, prompts), cfg, max_new_tokens=6)
    for c in cache:
        per_step = oracle_from_kls(c.bin_kl, 1e-3).tolist()
        assert c.oracle.tolist() == [min(per_step[t:]) for t in range(c.n_steps)]
        assert int(c.oracle[0]) == int(prompt_oracle_from_kls(c.bin_kl, 1e-3)[0])
    out = train(model, processor, samples_of(images, prompts), cfg, tmp_path / "s.safetensors", progress=False,
                cache=cache)
    assert load_predictor(out["out"]).config.decide == "shrink"
    with pytest.raises(Exception, match="decide=shrink"):
        TrainConfig(lam=0.0, objective="oracle", rank="step", decide="shrink")
