"""VTW's layer search: KL against an independent computation, the choice rule, bad input."""

import pytest
import torch

from dyrate.api import build_prompt, generate
from dyrate.errors import InputError, PolicySpecError
from dyrate.measure.findk import find_k


def test_findk_kl_and_choice(tiny, images, prompts):
    model, processor = tiny
    res = find_k(model, processor, images[:2], prompts[:2], eta=1e9, max_new_tokens=4)
    assert set(res.kl) == {1, 2, 3} and res.k == 1 and res.samples == 2
    assert all(v >= -1e-6 for v in res.kl.values())
    # choose eta between the KL values: the first layer under it is picked
    ordered = sorted(res.kl.items())
    mid = (ordered[-1][1] + max(v for _, v in ordered[:-1])) / 2
    if ordered[-1][1] < min(v for _, v in ordered[:-1]):
        assert find_k(model, processor, images[:2], prompts[:2], eta=mid, max_new_tokens=4).k == 3
    assert find_k(model, processor, images[:2], prompts[:2], eta=1e-12, max_new_tokens=4).k is None


def test_findk_kl_matches_direct_computation(tiny, images, prompts):
    """KL(full || vtw:k=3) recomputed with plain HF forwards where layer 3 cannot see image keys."""
    model, processor = tiny
    res = find_k(model, processor, images[:1], prompts[:1], eta=1.0, max_new_tokens=3, layers=[3])
    [full] = generate(model, processor, images[:1], prompts[:1], max_new_tokens=3)
    batch = processor(images=images[:1], text=[build_prompt(processor, prompts[0])], return_tensors="pt")
    ids = torch.cat([batch["input_ids"], torch.tensor([full.token_ids[:-1]])], dim=1)
    n_prompt = batch["input_ids"].shape[1]
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=batch["pixel_values"]).logits[0, n_prompt - 1 :].log_softmax(-1)
        # withdrawn, written out: run the decoder layers by hand, hiding image keys from layer 3 on
        lm = model.model.language_model
        emb = model.model.get_input_embeddings()(ids)
        feats = model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True).pooler_output[0]
        img = ids[0] == model.config.image_token_id
        emb[0, img] = feats
        n = ids.shape[1]
        pos = torch.arange(n)[None]
        pe = lm.rotary_emb(emb, pos)
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        h = emb
        for i, layer in enumerate(lm.layers):
            mask = causal.clone()
            if i >= 3:
                mask[:, img] = False
                mask |= torch.eye(n, dtype=torch.bool)
            h = layer(h, attention_mask=mask[None, None], position_embeddings=pe, position_ids=pos)
        logp = model.lm_head(lm.norm(h))[0, n_prompt - 1 :].log_softmax(-1)
    kl = (ref.exp() * (ref - logp)).sum(-1).mean()
    assert res.kl[3] == pytest.approx(float(kl), rel=1e-3, abs=1e-6)


def test_findk_bad_input(tiny, images, prompts):
    model, processor = tiny
    with pytest.raises(InputError):
        find_k(model, processor, images[:1], prompts[:1], eta=0)
    with pytest.raises(InputError):
        find_k(model, processor, images[:2], prompts[:1])
    with pytest.raises(PolicySpecError):
        find_k(model, processor, images[:1], prompts[:1], layers=[4])


def test_cli_findk(tiny_dir, images, tmp_path, capsys):
    import json

    from dyrate.cli import main

    (tmp_path / "images").mkdir()
    rows = []
    for i, img in enumerate(images):
        img.save(tmp_path / "images" / f"{i}.png")
        rows.append({"question_id": i, "image": f"images/{i}.png", "question": "what colour?", "answers": ["red"]})
    (tmp_path / "vqa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = main(["findk", "--model", str(tiny_dir), "--task", "vqa", "--data", str(tmp_path / "vqa.jsonl"),
               "--limit", "2", "--max-new-tokens", "3", "--eta", "1e9", "--json"])
    assert rc == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["k"] == 1 and payload["samples"] == 2 and set(payload["kl"]) == {"1", "2", "3"}
    assert main(["findk", "--model", str(tiny_dir), "--task", "vqa", "--data", str(tmp_path / "vqa.jsonl"),
                 "--eta", "0"]) == 2
    assert main(["findk", "--task", "vqa", "--data", str(tmp_path / "missing.jsonl")]) == 2
