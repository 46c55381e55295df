"""Analytic FLOPs (dyrate.measure.flops) and the `dyrate flops` command. Expected values are computed here
with independent formulas (DESIGN.md section 4), not read back from the module."""

from __future__ import annotations

import json
import math

import pytest

from dyrate import cli
from dyrate.errors import CheckpointError, InputError, PolicySpecError
from dyrate.measure.flops import (
    CONVENTIONS,
    NAMED_SHAPES,
    DecoderShape,
    flops_ratio,
    forward_flops,
    generation_flops,
    kv_cache_bytes,
    layer_flops,
    policy_flops,
    prefill_floor,
    resolve_shape,
)
from dyrate.policies import Policy

LLAVA7B = NAMED_SHAPES["llava-1.5-7b"]
TINY = DecoderShape("tiny", n_layers=3, hidden=4, ffn=8, n_heads=2, n_kv_heads=1, head_dim=2, n_img=6)


def fastv_eq5(L: int, d: int, m: int, K: int, n: int, n_pruned: int) -> float:
    """FastV's Eq. 5: [K F(n) + (L-K) F(n')] / [L F(n)], F(n) = 4nd^2 + 2n^2 d + 2ndm."""

    def F(x):
        return 4 * x * d * d + 2 * x * x * d + 2 * x * d * m

    return (K * F(n) + (L - K) * F(n_pruned)) / (L * F(n))


# --- the seed's Table III (prefill convention, llava-1.5-7b, FFN 2dm) ------------------------------


@pytest.mark.parametrize("k, text, expected", [(2, 40, 55.44), (3, 55, 57.92)])
def test_table_iii_fastv(k, text, expected):
    by_hand = fastv_eq5(32, 4096, 11008, k, 576 + text, 288 + text)
    assert abs(100 * by_hand - expected) < 0.01
    result = policy_flops(LLAVA7B, f"fastv:k={k},r=0.5", text_tokens=text)
    assert result["convention"] == "prefill" and result["ffn"] == "2dm"
    assert result["ratio"] == pytest.approx(by_hand, rel=1e-12)
    assert round(100 * result["ratio"], 2) == expected
    assert result["image_tokens"] == [576] * k + [288] * (32 - k)
    assert result["retained"] == pytest.approx(0.5)


# --- the formulas on a tiny decoder, by explicit loops ----------------------------------------------


def naive_layer(d, m, q, n, c=2):
    return q * (4 * d * d + c * d * m) + 2 * q * n * d


def test_layer_and_forward_flops_by_hand():
    assert layer_flops(TINY, q=3, n=5) == 3 * (4 * 16 + 2 * 32) + 2 * 3 * 5 * 4
    assert layer_flops(TINY, q=3, n=5, ffn="3dm") == 3 * (4 * 16 + 3 * 32) + 2 * 3 * 5 * 4
    assert forward_flops(TINY, [3, 2, 1], [5, 4, 3]) == sum(
        naive_layer(4, 8, q, n) for q, n in [(3, 5), (2, 4), (1, 3)]
    )
    assert forward_flops(TINY, 1, 7) == 3 * naive_layer(4, 8, 1, 7)


def test_generation_conventions_by_hand():
    img, text, T = [6, 3, 0], 5, 4
    prefill = sum(naive_layer(4, 8, i + text, i + text) for i in img)
    decode = sum(naive_layer(4, 8, 1, i + text + t) for t in range(1, T) for i in img)
    nocache = sum(naive_layer(4, 8, i + text + t, i + text + t) for t in range(T) for i in img)
    assert generation_flops(TINY, text, T, img, "prefill") == prefill
    assert generation_flops(TINY, text, T, img, "cached") == prefill + decode
    assert generation_flops(TINY, text, T, img, "nocache") == nocache


def test_per_step_trace():
    img, text = [6, 3, 3], 2
    static = generation_flops(TINY, text, 3, img, "cached")
    assert generation_flops(TINY, text, 3, [img, img, img], "cached") == static
    # a trace whose decode steps keep fewer tokens: only the decode part changes
    trace = [img, [6, 1, 1], [6, 0, 0]]
    expected = sum(naive_layer(4, 8, i + text, i + text) for i in img) + sum(
        naive_layer(4, 8, 1, i + text + t) for t in (1, 2) for i in trace[t]
    )
    assert generation_flops(TINY, text, 3, trace, "cached") == expected
    assert generation_flops(TINY, text, 3, trace, "prefill") == generation_flops(TINY, text, 1, img, "prefill")
    with pytest.raises(InputError, match="steps"):
        generation_flops(TINY, text, 4, trace, "cached")


# --- properties -------------------------------------------------------------------------------------


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_none_is_one_in_every_convention(convention):
    for spec in ("none", "none:k=2", "fastv:k=2,r=0"):
        result = policy_flops(LLAVA7B, spec, text_tokens=40, new_tokens=7, convention=convention)
        assert result["ratio"] == 1.0 and result["flops"] == result["full_flops"]
    assert policy_flops(LLAVA7B, "none", 40)["floor"] is None


def test_vtw_is_its_own_floor():
    floor = prefill_floor(LLAVA7B, 2, text_tokens=40)
    assert policy_flops(LLAVA7B, "vtw:k=2", text_tokens=40)["ratio"] == pytest.approx(floor)
    assert policy_flops(LLAVA7B, "fastv:k=2,r=0.5", text_tokens=40)["floor"] == pytest.approx(floor)
    assert floor == pytest.approx(fastv_eq5(32, 4096, 11008, 2, 616, 40))
    # DESIGN section 4: about K/L + (L-K)/L * text share, ~13% for LLaVA-1.5-7B at K=2
    assert 0.10 < floor < 0.14
    for convention in ("cached", "nocache"):
        result = policy_flops(LLAVA7B, "vtw:k=3", 40, new_tokens=10, convention=convention)
        assert result["ratio"] == pytest.approx(result["floor"])


def test_cached_costs_less_than_nocache():
    for spec in ("none", "fastv:k=2,r=0.5", "vtw:k=8"):
        totals = {c: policy_flops(LLAVA7B, spec, 40, new_tokens=16, convention=c)["flops"] for c in CONVENTIONS}
        assert totals["prefill"] < totals["cached"] < totals["nocache"]
        one = {c: policy_flops(LLAVA7B, spec, 40, new_tokens=1, convention=c)["flops"] for c in CONVENTIONS}
        assert len(set(one.values())) == 1  # one new token: all three count the same prefill


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_monotonic_in_rate(convention):
    ratios = [
        policy_flops(LLAVA7B, f"fastv:k=2,r={r}", 40, new_tokens=5, convention=convention)["ratio"]
        for r in (0, 0.25, 0.5, 0.75, 0.9)
    ]
    assert ratios == sorted(ratios, reverse=True) and len(set(ratios)) == len(ratios)
    assert ratios[-1] > policy_flops(LLAVA7B, "vtw:k=2", 40, new_tokens=5, convention=convention)["ratio"]


def test_ffn_variants_differ():
    two = policy_flops(LLAVA7B, "fastv:k=2,r=0.5", 40)
    three = policy_flops(LLAVA7B, "fastv:k=2,r=0.5", 40, ffn="3dm")
    assert three["full_flops"] > two["full_flops"]
    assert three["full_flops"] - two["full_flops"] == 32 * 616 * 4096 * 11008
    assert three["ratio"] != pytest.approx(two["ratio"], abs=1e-4)


def test_kv_cache_bytes_by_hand():
    tokens = [616] * 2 + [328] * 30
    expected = 2 * 32 * 128 * 2 * (2 * 616 + 30 * 328)
    assert kv_cache_bytes(LLAVA7B, tokens) == expected
    assert kv_cache_bytes(LLAVA7B, tokens, batch=4, dtype_bytes=4) == 8 * expected
    assert kv_cache_bytes(TINY, [1, 2, 3]) == 2 * 1 * 2 * 2 * 6  # one KV head of dim 2
    result = policy_flops(LLAVA7B, "fastv:k=2,r=0.5", 40, new_tokens=11, convention="cached")
    assert result["kv_cache_bytes"] == kv_cache_bytes(LLAVA7B, [626] * 2 + [338] * 30)
    assert result["full_kv_cache_bytes"] == kv_cache_bytes(LLAVA7B, [626] * 32)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: flops_ratio(LLAVA7B, [576] * 32, text_tokens=-1), "text_tokens"),
        (lambda: flops_ratio(LLAVA7B, [576] * 31 + [-2], 40), "layer 31"),
        (lambda: flops_ratio(LLAVA7B, [576] * 31, 40), "31 values"),
        (lambda: flops_ratio(LLAVA7B, [577] * 32, 40), "more image tokens"),
        (lambda: flops_ratio(LLAVA7B, [576] * 32, 40, convention="fastv"), "convention"),
        (lambda: flops_ratio(LLAVA7B, [576] * 32, 40, ffn="4dm"), "FFN"),
        (lambda: flops_ratio(LLAVA7B, [576] * 32, 40, new_tokens=0, convention="cached"), "new_tokens >= 1"),
        (lambda: flops_ratio(LLAVA7B, [576] * 32, 40, new_tokens=-1), "new_tokens"),
        (lambda: prefill_floor(LLAVA7B, 32, 40), "k=32"),
        (lambda: kv_cache_bytes(LLAVA7B, [1] * 32, batch=0), "batch"),
    ],
)
def test_bad_values_raise_input_error(call, match):
    with pytest.raises(InputError, match=match):
        call()


def test_policy_errors():
    with pytest.raises(PolicySpecError, match="< the decoder's 32 layers"):
        policy_flops(LLAVA7B, "fastv:k=32,r=0.5", 40)
    with pytest.raises(PolicySpecError, match=r"\[0, 1\)"):
        policy_flops(LLAVA7B, "fastv:k=2,r=1.0", 40)

    class DataDependent(Policy):
        name = "datadep"

        def keep(self, stage, probe, state):
            return None

        def static_image_tokens(self, n_img, n_layers):
            return None

    with pytest.raises(PolicySpecError, match="dyrate generate --json"):
        policy_flops(LLAVA7B, DataDependent(), 40)


# --- shapes from configs ------------------------------------------------------------------------------


def tiny_llava_config(**kwargs):
    from transformers import LlavaConfig

    vision = dict(model_type="clip_vision_model", image_size=32, patch_size=8, hidden_size=16,
                  intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    text = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    return LlavaConfig(vision_config=vision, text_config=text, **kwargs)


def test_from_config():
    shape = DecoderShape.from_config(tiny_llava_config(image_seq_length=16), name="tiny")
    assert shape == DecoderShape("tiny", n_layers=4, hidden=32, ffn=64, n_heads=4, n_kv_heads=2,
                                 head_dim=8, n_img=16, vocab=100)
    full = DecoderShape.from_config(tiny_llava_config(image_seq_length=17, vision_feature_select_strategy="full"))
    assert full.n_img == 17
    with pytest.warns(UserWarning, match="image_seq_length=576"):
        assert DecoderShape.from_config(tiny_llava_config()).n_img == 16  # the vision tower wins


def test_resolve_shape(tmp_path):
    from transformers import LlamaConfig

    assert resolve_shape("LLaVA-1.5-13B") is NAMED_SHAPES["llava-1.5-13b"]
    tiny_llava_config(image_seq_length=16).save_pretrained(tmp_path / "llava")
    shape = resolve_shape(tmp_path / "llava")
    assert (shape.n_layers, shape.hidden, shape.n_img) == (4, 32, 16)
    assert resolve_shape(tmp_path / "llava" / "config.json") == shape

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4).save_pretrained(
        tmp_path / "llama"
    )
    with pytest.raises(CheckpointError, match="'llama' is not supported"):
        resolve_shape(tmp_path / "llama")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        resolve_shape(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="llava-1.5-7b, llava-1.5-13b"):
        resolve_shape("llava-9b")


# --- the command ----------------------------------------------------------------------------------------


@pytest.fixture
def flops_cli(monkeypatch):
    """cli.main with only the flops command wired (the other commands' modules are not under test)."""
    monkeypatch.setattr(cli, "COMMANDS", {"flops": cli.COMMANDS["flops"]})
    return cli.main


def test_cli_human(flops_cli, capsys):
    assert flops_cli(["flops", "--config", "llava-1.5-7b", "--policy", "fastv:k=2,r=0.5", "--text-tokens", "40"]) == 0
    out = capsys.readouterr().out
    assert "55.44%" in out and "prefill convention" in out and "TFLOPs" in out
    assert "first 2 layers never pruned: floor 12.16%" in out


def test_cli_json(flops_cli, capsys, tmp_path):
    argv = ["flops", "--config", "llava-1.5-7b", "--policy", "fastv:k=3,r=0.5", "--text-tokens", "55", "--json"]
    assert flops_cli(argv) == 0
    out = capsys.readouterr().out
    result = json.loads(out)  # exactly one JSON object, nothing else
    assert out.strip().count("\n") == 0
    assert {"ratio", "flops", "full_flops", "convention", "ffn", "floor", "policy", "shape"} <= set(result)
    assert round(100 * result["ratio"], 2) == 57.92 and result["convention"] == "prefill"

    tiny_llava_config(image_seq_length=16).save_pretrained(tmp_path)
    argv = ["flops", "--config", str(tmp_path), "--policy", "vtw:k=2", "--text-tokens", "10",
            "--new-tokens", "5", "--convention", "nocache", "--ffn", "3dm", "--json"]
    assert flops_cli(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["convention"] == "nocache" and result["ffn"] == "3dm"
    assert result["ratio"] == pytest.approx(result["floor"]) and not math.isnan(result["ratio"])


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--config", "llava-9b", "--policy", "fastv:k=2,r=0.5", "--text-tokens", "40"], "llava-1.5-7b"),
        (["--config", "llava-1.5-7b", "--policy", "fastv:k=32,r=0.5", "--text-tokens", "40"], "32 layers"),
        (["--config", "llava-1.5-7b", "--policy", "fastv:k=2,r=1.0", "--text-tokens", "40"], "[0, 1)"),
        (["--config", "llava-1.5-7b", "--policy", "fastv:k=2,r=0.5", "--text-tokens", "-5"], "--text-tokens"),
        (["--config", "llava-1.5-7b", "--policy", "none", "--text-tokens", "40", "--convention", "fast"], "convention"),
        (["--config", "llava-1.5-7b", "--policy", "none", "--text-tokens", "4", "--ffn", "2"], "FFN"),
        (["--config", "llava-1.5-7b", "--policy", "none", "--text-tokens", "4", "--new-tokens", "0",
          "--convention", "cached"], "--new-tokens"),
    ],
)
def test_cli_bad_input(flops_cli, capsys, extra, match):
    assert flops_cli(["flops", *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dyrate flops: error:") and match in lines[0]


def test_cli_help(flops_cli, capsys):
    with pytest.raises(SystemExit) as exit_info:
        flops_cli(["flops", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "dyrate flops --config llava-1.5-7b --policy fastv:k=2,r=0.5" in out and "nocache" in out
