"""`dyrate analyze`: attention shares per group and step, checked against eager attention of a
plain transformers forward pass; the CLI's files and bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

from dyrate.evaluation.analyze import attention_shares
from dyrate.api import build_prompt
from dyrate.cli import main
from tiny import tiny_model


def test_shares_sum_to_one_and_match_eager_attention(tiny, images, prompts):
    model, processor = tiny
    result = attention_shares(model, processor, images[:2], prompts[:2], layers=[0, 2], max_new_tokens=5, batch_size=2)
    for layer in (0, 2):
        d = result["layers"][layer]
        assert d["count"][0] == 2
        assert d["res"][0] == 0.0  # nothing generated at prefill
        for t in range(len(d["count"])):
            assert sum(d[g][t] for g in ("sys", "img", "ins", "res")) == pytest.approx(1.0, abs=1e-4)

    # step 0 of one row, recomputed from a plain eager forward pass with output_attentions
    (one,) = [attention_shares(model, processor, images[:1], prompts[:1], layers=[1], max_new_tokens=1)["layers"][1]]
    eager, _ = tiny_model(seed=0)
    eager.set_attn_implementation("eager")
    batch = processor(images=images[:1], text=[build_prompt(processor, prompts[0])], return_tensors="pt")
    with torch.no_grad():
        att = eager(**batch, output_attentions=True).attentions[1][0, :, -1].mean(0)  # (T,) newest query, head mean
    is_img = batch["input_ids"][0] == model.config.image_token_id
    first = int(is_img.nonzero()[0])
    assert one["img"][0] == pytest.approx(float(att[is_img].sum()), abs=1e-4)
    assert one["sys"][0] == pytest.approx(float(att[:first].sum()), abs=1e-4)


def _caption_folder(tmp_path, images):
    """A caption data folder (COCO captions.json + images/) with the given images."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    for i, img in enumerate(images):
        img.save(data / "images" / f"{i}.png")
    coco = {"images": [{"id": i, "file_name": f"{i}.png"} for i in range(len(images))],
            "annotations": [{"id": i, "image_id": i, "caption": "noise"} for i in range(len(images))]}
    (data / "captions.json").write_text(json.dumps(coco))
    return data


def test_cli_writes_png_and_json(tmp_path, tiny_dir, images, capsys):
    data = _caption_folder(tmp_path, images)
    out = tmp_path / "shares.png"
    rc = main(["analyze", "--model", str(tiny_dir), "--data", str(data), "--layers", "0,1", "--limit", "2",
               "--max-new-tokens", "4", "--out", str(out)])
    assert rc == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads(out.with_suffix(".json").read_text())
    assert payload["rows"] == 2 and set(payload["layers"]) == {"0", "1"}
    assert "layer 0: img share" in capsys.readouterr().out

    for bad, message in (
        (["--layers", "9"], "probe layer 9 is out of range"),
        (["--layers", "a,b"], "--layers 'a,b'"),
        (["--out", str(tmp_path / "x.pdf")], "expected a .png"),
        (["--limit", "0"], "--limit: must be >= 1"),
    ):
        args = ["analyze", "--model", str(tiny_dir), "--data", str(data), "--out", str(out), *bad]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert message in err[-1]


def test_policy_trace_against_the_generation_trace(tiny, images, prompts, tmp_path, tiny_dir, capsys):
    """--policy: per-step means of the policy's own trace (rate, kept fraction, shares), and the
    example row's rates are that row's trace; the CLI writes PNG + JSON and refuses bad input."""
    from dyrate.evaluation.analyze import policy_trace
    from dyrate.api import generate

    model, processor = tiny
    spec = "fixed:k=2,r=0.5"
    got = policy_trace(model, processor, images, prompts, spec, mode="mask", max_new_tokens=5, batch_size=2)
    ref = generate(model, processor, images, prompts, policy=spec, mode="mask", max_new_tokens=5)
    assert got["count"][0] == 3 and got["rate"][0] == pytest.approx(0.5)
    assert got["kept"][0] == pytest.approx(sum(r.trace[0]["kept"][2] / r.trace[0]["kept"][0] for r in ref) / 3)
    assert got["img"][1] == pytest.approx(sum(r.trace[1]["shares"][0]["img"] for r in ref if len(r.trace) > 1)
                                          / sum(len(r.trace) > 1 for r in ref))
    assert got["example"]["rate"] == [e["rate"][0] for e in ref[0].trace]
    assert len(got["example"]["tokens"]) == len(ref[0].trace)
    with pytest.raises(Exception, match="never probes"):
        policy_trace(model, processor, images, prompts, "none")

    data = _caption_folder(tmp_path, images)
    out = tmp_path / "rate.png"
    base = ["analyze", "--model", str(tiny_dir), "--data", str(data), "--limit", "2", "--max-new-tokens", "4", "--out", str(out)]
    assert main([*base, "--policy", spec, "--mode", "mask"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads(out.with_suffix(".json").read_text())
    assert payload["policy"] == spec and payload["mode"] == "mask" and payload["rows"] == 2
    assert "mean rate 0.500" in capsys.readouterr().out
    for bad, message in ((["--policy", "bogus:k=2"], "bogus"), (["--policy", spec, "--layers", "0"], "exclude each other")):
        assert main([*base, *bad]) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
