"""The shipped testbed model: a plain transformers checkpoint, small, the default of every command,
and as good on a few held-out scenes as docs/testbed.md says it is on many."""

from __future__ import annotations

import json

import pytest
import torch

from dyrate.assets import ASSET_DIR, model_dir, predictor_path

QUALITY = ASSET_DIR / "quality.json"


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = model_dir()
    model = LlavaForConditionalGeneration.from_pretrained(path)  # plain transformers, no dyrate code
    processor = AutoProcessor.from_pretrained(path)
    return model.eval(), processor


def test_plain_checkpoint_small_and_fp32_at_runtime(shipped):
    model, processor = shipped
    assert next(model.parameters()).dtype == torch.float32  # config dtype: run in fp32 on CPUs
    weights = ASSET_DIR / "model.safetensors"
    assert weights.stat().st_size <= 16 * 2**20
    assert model.config.vision_config.image_size == 96 and model.config.image_seq_length == 144
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], add_generation_prompt=True
    )
    assert text.startswith("a chat between") and "USER: <image>" in text and text.rstrip().endswith("ASSISTANT:")


def test_quality_on_20_held_out_scenes(shipped):
    """>= 80% of the recorded figures (docs/testbed.md, 300 scenes) on the first 20 scenes."""
    from dyrate.testbed.evaluate import evaluate

    recorded = json.loads(QUALITY.read_text())
    model, processor = shipped
    torch.manual_seed(0)
    with torch.inference_mode():
        got = evaluate(model, processor, seed=recorded["seed"], n=20, with_cider=False)
    # Per question type there are only 20 questions here (a binomial spread of +-0.1), so the
    # short answers are checked overall (~100 questions); POPE splits have ~100 questions each.
    checks = {
        "caption object F1": (got["caption"]["object_f1"], recorded["caption"]["object_f1"]),
        "short answers, all types": (got["qa"]["all"], recorded["qa"]["all"]),
    }
    for split, v in recorded["pope"].items():
        checks[f"POPE {split} accuracy"] = (got["pope"][split]["accuracy"], v["accuracy"])
    low = {k: f"{g:.3f} < 0.8 x {r:.3f}" for k, (g, r) in checks.items() if g < 0.8 * r}
    assert not low, low


def test_default_model_of_api_and_cli(capsys):
    import dyrate
    from dyrate.cli import main

    model, processor = dyrate.load()
    assert model.config.image_seq_length == 144
    assert main(["generate", "--image", str(_scene_png()), "--prompt", "how many objects are there?",
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()


def test_shipped_predictors_match_the_model(shipped):
    from dyrate.policies import parse_policy

    model, _ = shipped
    for arch, name in (("mlp", "dyrate"), ("gru", "dyrate-rnn")):
        policy = parse_policy(f"{name}:predictor={predictor_path(arch)}")
        policy.check_model(model)  # fingerprint: this exact model
        per_token = parse_policy(f"{name}:predictor={predictor_path(arch, 'hidden-prefill')},q=0.15")
        per_token.check_model(model)
        assert per_token.net.config.features == ("shares", "hidden") and per_token.net.config.rank == "prefill"
    # the defaults: progressive eviction on hidden state + step, no decode probe, settings in the file
    mlp, gru = parse_policy("dyrate:k=2"), parse_policy("dyrate-rnn:k=2")
    for policy in (mlp, gru):
        c = policy.net.config
        assert (c.features, c.rank, c.decide) == (("hidden", "step"), "prefill", "shrink")
        assert policy.decode_decides and not policy.decode_probe
    assert (mlp.q, mlp.cap, mlp.every) == (0.05, 0.5, 8) and (gru.q, gru.cap, gru.every) == (0.05, 0.6, None)
    strict = parse_policy(f"dyrate-rnn:predictor={predictor_path('gru', 'hidden-prefill-kl0.001')},q=0.15")
    strict.check_model(model)
    assert strict.net.config.features == ("shares", "hidden") and strict.net.config.rank == "prefill"


def _scene_png():
    import tempfile
    from pathlib import Path

    from dyrate.testbed.data import eval_scene_seed
    from dyrate.testbed.scenes import render, sample_scene

    path = Path(tempfile.mkdtemp()) / "scene.png"
    render(sample_scene(eval_scene_seed(1, 0)), 96).save(path)
    return path
