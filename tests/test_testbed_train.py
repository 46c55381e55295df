"""Training on the tiny config: manual forward = HF forward, loss goes down, resume is exact,
the export is an ordinary HF checkpoint."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dyrate.errors import InputError
from dyrate.testbed.configs import SPECS
from dyrate.testbed.data import train_scene_seed
from dyrate.testbed.batches import BatchBuilder
from dyrate.testbed.losses import compute_loss, forward_logits
from dyrate.testbed.train import TrainArgs, build_model, make_optimizer, train

torch.set_num_threads(1)


def tiny_args(out, **kw):
    base = dict(config="tiny", out=str(out), steps=4, batch_size=4, warmup_steps=1, bf16=False, progress=False, save_every_s=1e9)
    base.update(kw)
    return TrainArgs(**base)


def test_manual_forward_equals_model_forward():
    model, _, proc = build_model("tiny", 0)
    model.eval()
    batch = BatchBuilder(proc, "tiny").build([11, 12, 13])
    with torch.no_grad():
        logits, feats, _ = forward_logits(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]).logits
    assert feats.shape == (3, 16, 32)
    assert torch.allclose(logits, ref, atol=1e-5)


def test_labels_cover_answer_only():
    _, _, proc = build_model("tiny", 0)
    b = BatchBuilder(proc, "tiny")
    ids, labels, ends = b.encode("how many objects are there?", "two")
    assert ends == [len(ids) - 3]  # the last prompt token (':'), before 'two </s>'
    answer = [i for i, l in zip(ids, labels) if l != -100]
    assert answer == proc.tokenizer("two", add_special_tokens=False)["input_ids"] + [proc.tokenizer.eos_token_id]
    assert proc.tokenizer.decode(ids[-3:-2]) == ":"  # 'assistant :' right before the answer
    # The same ids as the processor gives for the chat-template text.
    from dyrate.testbed.processing import build_prompt
    from dyrate.testbed.scenes import render, sample_scene

    ref = proc(images=[render(sample_scene(0), 32)], text=[build_prompt("how many objects are there?", "two")])
    assert ref["input_ids"][0] == ids


def test_dialog_encoding_follows_the_chat_template():
    _, _, proc = build_model("tiny", 0)
    b = BatchBuilder(proc, "tiny")
    turns = [("how many objects are there?", "two"), ("is there a red circle in the image?", "no"), ("where is the star?", "top-left")]
    ids, labels, ends = b.encode(*turns[0], more=tuple(turns[1:]))
    assert [labels[e] for e in ends] == [-100] * 3 and all(labels[e + 1] != -100 for e in ends)  # each turn's last prompt token
    answers = [i for i, l in zip(ids, labels) if l != -100]
    eos = proc.tokenizer.eos_token_id
    assert answers == [t for _, a in turns for t in proc.tokenizer(a, add_special_tokens=False)["input_ids"] + [eos]]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": turns[0][0]}]}]
    messages.append({"role": "assistant", "content": turns[0][1]})
    for q, a in turns[1:]:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    from dyrate.testbed.scenes import render, sample_scene

    ref = proc(images=[render(sample_scene(0), 32)], text=[proc.apply_chat_template(messages)])
    assert ref["input_ids"][0] == ids


def test_a_few_steps_lower_the_loss():
    args = tiny_args("unused", lr=3e-3)
    model, aux, proc = build_model("tiny", 0)
    opt = make_optimizer(model, aux, args)
    batch = BatchBuilder(proc, "tiny").build([train_scene_seed(0, 0, 8, i) for i in range(8)])
    losses = []
    for _ in range(12):
        loss, parts = compute_loss(model, aux, batch, aux_weight=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(parts["loss"])
    assert losses[-1] < 0.8 * losses[0]


def test_location_loss_teaches_the_embeddings_where_they_are():
    """The location head's targets are the 3x3 cells of the patch grid, and a few steps lower the
    location loss (gradients reach the tower's position embeddings)."""
    from dyrate.testbed.batches import patch_cells

    assert patch_cells(144).reshape(12, 12)[::4, ::4].tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert torch.bincount(patch_cells(144)).tolist() == [16] * 9
    assert patch_cells(16).tolist() == [0, 0, 1, 2, 0, 0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8]
    args = tiny_args("unused", lr=1e-2, loc_aux_weight=1.0)
    model, aux, proc = build_model("tiny", 0, with_loc=True)
    opt = make_optimizer(model, aux, args)
    batch = BatchBuilder(proc, "tiny").build([train_scene_seed(0, 0, 8, i) for i in range(8)])
    with torch.no_grad():
        embeds = forward_logits(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])[2]  # (B, 16, D)
        manual = torch.nn.functional.cross_entropy(aux.loc(embeds).reshape(-1, 9), patch_cells(16).repeat(8))
    assert torch.allclose(aux.loc_loss(embeds), manual)
    losses = []
    for _ in range(20):
        loss, parts = compute_loss(model, aux, batch, aux_weight=0.0, loc_aux_weight=1.0)
        opt.zero_grad()
        loss.backward()
        assert model.model.vision_tower.embeddings.position_embedding.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(parts["loc_aux"])
    # Location is slow to learn from scratch (a plateau near ln 9 = 2.2 first), but it moves.
    assert min(losses[-5:]) < losses[0] - 0.1
    with pytest.raises(InputError, match="loc-aux-weight"):
        TrainArgs(config="tiny", steps=3, loc_aux_weight=-1).validate()


def test_resume_is_exact_and_export_loads(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    straight = train(tiny_args(tmp_path / "a"))
    train(tiny_args(tmp_path / "b", stop_after_steps=2))  # "killed" after 2 steps
    state = json.loads((tmp_path / "b" / "train_state" / "state.json").read_text())
    assert state["step"] == 2
    resumed = train(tiny_args(tmp_path / "b"))  # the same command again continues
    assert straight["steps"] == resumed["steps"] == 4
    wa = load_file(str(tmp_path / "a" / "train_state" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "train_state" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    oa = load_file(str(tmp_path / "a" / "train_state" / "optimizer.safetensors"))
    ob = load_file(str(tmp_path / "b" / "train_state" / "optimizer.safetensors"))
    assert all(torch.equal(oa[k], ob[k]) for k in oa)
    assert not list((tmp_path / "b").rglob("*.bin")) and not list((tmp_path / "b").rglob("*.pt"))

    # The export is a plain HF checkpoint.
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "b")
    proc = AutoProcessor.from_pretrained(tmp_path / "b")
    assert model.dtype == torch.float32  # runs in fp32 on CPU ...
    stored = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.float16}  # ... but ships in fp16
    assert not any(k.startswith("aux") for k in model.state_dict())
    inputs = proc(images=[_image()], text=[proc.apply_chat_template(_msgs(), add_generation_prompt=True)], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] <= inputs["input_ids"].shape[1] + 3


def test_resume_refuses_other_config(tmp_path):
    train(tiny_args(tmp_path, steps=1))
    with pytest.raises(InputError):
        train(tiny_args(tmp_path, config="base", steps=1))


def test_bad_args():
    with pytest.raises(InputError):
        TrainArgs(config="tiny", steps=None, minutes=None).validate()
    with pytest.raises(InputError):
        TrainArgs(config="huge", steps=3).validate()


def test_base_config_size_budget():
    from transformers import LlavaForConditionalGeneration

    from dyrate.testbed.configs import build_config

    config = build_config("base", vocab_size=110, image_token_id=4, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    n = sum(p.numel() for p in model.parameters())
    assert 2 * n <= 16 * 2**20  # fp16 bytes
    assert config.text_config._attn_implementation == "sdpa" or config._attn_implementation == "sdpa"
    assert SPECS["base"].num_image_tokens == 144


def _image():
    from dyrate.testbed.scenes import render, sample_scene

    return render(sample_scene(1), 32)


def _msgs():
    from dyrate.testbed.processing import messages

    return messages("how many objects are there?")


def test_lm_loss_is_mean_over_examples():
    import torch.nn.functional as F

    model, aux, proc = build_model("tiny", 0)
    model.eval()
    batch = BatchBuilder(proc, "tiny").build([21, 22, 23, 24])
    with torch.no_grad():
        _, parts = compute_loss(model, aux, batch, aux_weight=0.0)
        logits, _, _ = forward_logits(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    per_example = [
        F.cross_entropy(logits[b, :-1], batch["labels"][b, 1:], ignore_index=-100).item() for b in range(4)
    ]
    assert parts["lm"] == pytest.approx(sum(per_example) / 4, rel=1e-5)


def test_image_token_dropout_forward():
    """No hidden column: the layer-by-layer decoder equals the model's forward. Hidden columns
    change only the positions after them (causal), and the sampler is a function of (seed, step)."""
    from dyrate.testbed.batches import sample_dropout

    model, _, proc = build_model("tiny", 0)
    model.eval()
    batch = BatchBuilder(proc, "tiny").build([11, 12, 13])
    ids = batch["input_ids"]
    args3 = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    none_hidden = (torch.ones(3, dtype=torch.long), torch.zeros_like(ids, dtype=torch.bool))
    is_img = ids == model.config.image_token_id
    some = is_img & (torch.arange(ids.shape[1]) % 3 == 0)  # every third image column
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]).logits
        same, _, _ = forward_logits(model, *args3, drop=none_hidden)
        dropped, _, _ = forward_logits(model, *args3, drop=(torch.ones(3, dtype=torch.long), some))
    valid = batch["attention_mask"].bool()  # padded positions are never scored
    assert torch.allclose(same[valid], ref[valid], atol=1e-5)
    first = int(some[0].nonzero()[0])
    assert torch.allclose(dropped[0, :first], ref[0, :first], atol=1e-5)
    assert not torch.allclose(dropped[0, -1], ref[0, -1], atol=1e-4)

    args = tiny_args("unused", drop_prob=0.5, drop_max_rate=0.9)
    a = sample_dropout(ids.repeat(20, 1), model.config.image_token_id, 2, args, step=3)
    b = sample_dropout(ids.repeat(20, 1), model.config.image_token_id, 2, args, step=3)
    c = sample_dropout(ids.repeat(20, 1), model.config.image_token_id, 2, args, step=4)
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    assert not (a[1] & ~is_img.repeat(20, 1)).any()  # only image columns are hidden
    assert 0 < a[1].any(1).float().mean() < 1 and (a[0] == 1).all()  # 2 layers: start is layer 1
    assert sample_dropout(ids, model.config.image_token_id, 2, tiny_args("unused"), step=0) is None  # off by default

    # background first: the hidden columns are background patches while there are enough of them
    bg = (batch["patch_targets"][..., 0] == 0).repeat(20, 1)  # (60, P)
    args = tiny_args("unused", drop_prob=1.0, drop_max_rate=0.9, drop_background_first=1.0)
    start, hidden = sample_dropout(ids.repeat(20, 1), model.config.image_token_id, 2, args, step=5, background=bg)
    img = is_img.repeat(20, 1)
    for r in range(60):
        cols = img[r].nonzero()[:, 0]  # image columns in patch order
        n_hidden = int(hidden[r].sum())
        if n_hidden <= int(bg[r].sum()):
            assert bg[r][hidden[r][cols]].all(), r  # only background patches
        else:
            assert bg[r][~hidden[r][cols]].sum() == 0, r  # every background patch went first
    assert hidden.sum() > 0


def test_init_from_earlier_run(tmp_path):
    from dyrate.testbed.checkpoints import init_from

    train(tiny_args(tmp_path / "a"))
    model, aux, _ = build_model("tiny", 1)  # another seed: different weights before init
    counts = init_from(tmp_path / "a", model, aux)
    assert counts["fresh"] == 0 and counts["loaded"] > 0
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "a" / "train_state" / "model.safetensors"))
    for n, p in model.named_parameters():
        assert torch.equal(p, saved[f"model.{n}"])
    with pytest.raises(InputError, match="neither a training state"):
        TrainArgs(config="tiny", out=str(tmp_path / "b"), steps=2, init=str(tmp_path / "missing")).validate()


def test_init_from_exported_checkpoint(tmp_path):
    """--init also takes an exported model directory (the shipped model has no training state)."""
    import shutil

    from transformers import LlavaForConditionalGeneration

    from dyrate.testbed.checkpoints import init_from

    train(tiny_args(tmp_path / "a"))
    shutil.rmtree(tmp_path / "a" / "train_state")
    TrainArgs(config="tiny", out=str(tmp_path / "b"), steps=2, init=str(tmp_path / "a")).validate()
    model, aux, _ = build_model("tiny", 1)
    counts = init_from(tmp_path / "a", model, aux)
    assert counts["fresh"] == len(list(aux.parameters())) and counts["loaded"] == len(list(model.parameters()))
    exported = LlavaForConditionalGeneration.from_pretrained(tmp_path / "a", dtype=torch.float32)
    for (n, p), (n2, p2) in zip(model.named_parameters(), exported.named_parameters()):
        assert n == n2 and torch.equal(p, p2)


def test_question_queries_point_at_the_named_objects():
    from dyrate.testbed import language as L
    from dyrate.testbed.data import sample_example

    _, _, proc = build_model("tiny", 0)
    weights = {"caption": 0.3, "qa": 0.3, "pope": 0.2, "dialog": 0.2}
    builder = BatchBuilder(proc, "tiny", weights)
    seeds = [train_scene_seed(0, 0, 24, i) for i in range(24)]
    batch = builder.build(seeds)
    expected = []
    for b, s in enumerate(seeds):
        ex = sample_example(s, weights)
        for question, _ in ((ex.question, ex.answer), *ex.more):
            if L.question_type(question) is None:
                continue
            cells = {o.cell + 1 for o in L.named_objects(ex.scene, question)}
            expected.append((b, torch.tensor([int(c) in cells for c in batch["patch_targets"][b, :, 3]])))
    assert batch["q_rows"].tolist() == [b for b, _ in expected]
    assert torch.equal(batch["q_mask"], torch.stack([on for _, on in expected]))
    assert batch["q_mask"].any(-1).sum() >= 8 and (~batch["q_mask"].any(-1)).sum() >= 1  # some name nothing present
    ends = batch["q_pos"]
    assert (batch["labels"][batch["q_rows"], ends] == -100).all()  # a prompt token ...
    assert (batch["labels"][batch["q_rows"], ends + 1] != -100).all()  # ... right before an answer
    # A caption is no question: no query.
    only_captions = BatchBuilder(proc, "tiny", {"caption": 1.0, "qa": 0.0, "pope": 0.0}).build(seeds[:4])
    assert len(only_captions["q_rows"]) == 0 and only_captions["q_mask"].shape == (0, 16)


def test_supervised_attention_equals_eager_attention():
    """The recomputed head-0 row equals transformers' own eager attention probabilities."""
    from dyrate.testbed.losses import _forward, attention_supervision_loss, supervised_attention

    model, _, proc = build_model("tiny", 0)
    model.eval()
    batch = BatchBuilder(proc, "tiny", {"caption": 0.0, "qa": 0.5, "pope": 0.0, "dialog": 0.5}).build(list(range(40, 46)))
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    model.set_attn_implementation("eager")
    lm, image_id = model.model.language_model, model.config.image_token_id
    with torch.no_grad():
        layer_inputs = _forward(model, *args)[3]
        att = model(input_ids=args[0], attention_mask=args[1], pixel_values=args[2], output_attentions=True).attentions
        rows, pos = batch["q_rows"].tolist(), batch["q_pos"].tolist()
        refs = []
        for layer in (0, 1):
            ref = torch.stack([att[layer][r, 0, p] for r, p in zip(rows, pos)])  # (N, T)
            got = supervised_attention(lm, layer_inputs, batch, layer)
            assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-6)
            refs.append(ref)
        def on_objects(ref, j):
            return (ref[j][batch["input_ids"][rows[j]] == image_id] * batch["q_mask"][j]).sum()

        # The loss's mass: on the named objects' patches, or (sink) on bos when none is present.
        none = ~batch["q_mask"].any(-1)
        assert none.any() and (~none).any()
        for sink in (False, True):
            on = torch.stack([(ref[batch["input_ids"][rows] == image_id].view(len(rows), -1) * batch["q_mask"]).sum(-1) for ref in refs])
            want = torch.where(none, torch.stack(refs)[..., 0], on) if sink else on[:, ~none]
            loss, mass = attention_supervision_loss(lm, layer_inputs, batch, (0, 1), image_id, sink=sink)
            assert abs(mass - want.mean().item()) < 1e-6 and abs(loss.item() + (want + 1e-6).log().mean().item()) < 1e-5
        # count: a count question with n counted objects is scored against the uniform split over
        # bos and each object (its patches pooled); written here per query, independently.
        counts = batch["q_count"] & ~none
        assert counts.any()
        per_layer = []
        for ref in refs:
            row_losses = []
            for j, r in enumerate(rows):
                if not counts[j]:
                    row_losses.append(-torch.log(torch.where(none[j], ref[j, 0], on_objects(ref, j)) + 1e-6))
                    continue
                img = ref[j][batch["input_ids"][r] == image_id]  # (P,)
                cells = batch["patch_targets"][r, :, 3]
                objs = sorted({int(c) for c, m in zip(cells, batch["q_mask"][j]) if m})
                terms = [torch.log(ref[j, 0] + 1e-6)] + [torch.log(img[(cells == c) & batch["q_mask"][j]].sum() + 1e-6) for c in objs]
                row_losses.append(-torch.stack(terms).mean())
            per_layer.append(torch.stack(row_losses))
        want_loss = torch.stack(per_layer).mean()
        loss, _ = attention_supervision_loss(lm, layer_inputs, batch, (0, 1), image_id, sink=True, count=True)
        assert abs(loss.item() - want_loss.item()) < 1e-5


def test_attention_supervision_raises_the_mass_on_named_objects(tmp_path):
    kw = dict(task_weights="caption=0,qa=0.5,pope=0.2,dialog=0.3", attn_sup_weight=5.0, attn_sup_layers=(1,), lr=1e-2, batch_size=8)
    train(tiny_args(tmp_path, steps=30, **kw))
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 30 and "attn_mass" in log[0]
    assert log[-1]["attn_mass"] > 2 * log[0]["attn_mass"]
    with pytest.raises(InputError, match="--attn-sup-layers"):
        tiny_args(tmp_path / "x", attn_sup_weight=1.0, attn_sup_layers=(2,)).validate()  # tiny has layers 0..1
    with pytest.raises(InputError, match="--attn-sup-weight"):
        tiny_args(tmp_path / "x", attn_sup_weight=-1.0).validate()
    with pytest.raises(InputError, match="--attn-sup-count"):
        tiny_args(tmp_path / "x", attn_sup_count=True).validate()  # without --attn-sup-weight it does nothing


def test_bf16_default_follows_the_cpu():
    assert TrainArgs().use_bf16() == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert TrainArgs(bf16=False).use_bf16() is False and TrainArgs(bf16=True).use_bf16() is True


def test_question_targets_name_the_question_attributes():
    from dyrate.testbed.scenes import COLOUR_NAMES, POSITIONS, SHAPES, SIZES
    from dyrate.testbed.batches import question_targets

    def t(shape=None, colour=None, size=None, pos=None):
        return [0 if v is None else names.index(v) + 1 for v, names in ((shape, SHAPES), (colour, COLOUR_NAMES), (size, SIZES), (pos, POSITIONS))]

    assert question_targets("where is the large red circle?") == t("circle", "red", "large")
    assert question_targets("how many crosses are there?") == t("cross")
    assert question_targets("what colour is the object at the top-left?") == t(pos="top-left")
    assert question_targets("is there a blue star in the image?") == t("star", "blue")
    assert question_targets("how many objects are there?") == t()


def test_query_aux_reads_the_question_off_its_last_prompt_token(tmp_path):
    _, _, proc = build_model("tiny", 0)
    weights = {"caption": 0.3, "qa": 0.3, "pope": 0.2, "dialog": 0.2}
    seeds = [train_scene_seed(0, 0, 16, i) for i in range(16)]
    batch = BatchBuilder(proc, "tiny", weights).build(seeds)
    from dyrate.testbed import language as L
    from dyrate.testbed.data import sample_example
    from dyrate.testbed.batches import question_targets

    turns = [(b, q) for b, s in enumerate(seeds) for q, _ in ((sample_example(s, weights).question, None), *sample_example(s, weights).more)
             if L.question_type(q) is not None]
    assert batch["q_rows"].tolist() == [b for b, _ in turns]
    assert batch["q_targets"].tolist() == [question_targets(q) for _, q in turns]
    assert (batch["labels"][batch["q_rows"], batch["q_pos"] + 1] != -100).all()  # the answer follows
    kw = dict(task_weights="caption=0,qa=0.5,pope=0.2,dialog=0.3", query_aux_weight=1.0, attn_sup_layers=(1,), lr=1e-2, batch_size=8)
    train(tiny_args(tmp_path, steps=20, **kw))
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["query_aux"] < 0.8 * log[0]["query_aux"]


def test_salience_loss_equals_a_per_turn_reference_over_all_heads():
    """query_attention over all heads equals eager attention; the salience loss is -log of the
    head-averaged image attention's share on object patches, for every turn (captions too)."""
    from dyrate.testbed.losses import _forward, query_attention, salience_loss

    model, _, proc = build_model("tiny", 0)
    model.eval()
    batch = BatchBuilder(proc, "tiny", {"caption": 0.4, "qa": 0.2, "pope": 0.2, "dialog": 0.2}).build(list(range(60, 68)))
    assert len(batch["t_rows"]) > len(batch["q_rows"])  # captions count as turns here
    model.set_attn_implementation("eager")
    lm, image_id = model.model.language_model, model.config.image_token_id
    with torch.no_grad():
        layer_inputs = _forward(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"])[3]
        att = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                    output_attentions=True).attentions
        rows, pos = batch["t_rows"].tolist(), batch["t_pos"].tolist()
        for layer in (0, 1):
            ref = torch.stack([att[layer][r, :, p] for r, p in zip(rows, pos)])  # (K, H, T)
            got = query_attention(lm, layer_inputs, batch["t_rows"], batch["t_pos"], batch["attention_mask"], layer)
            assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-6)
            shares = []
            for j, r in enumerate(rows):
                img = ref[j].mean(0)[batch["input_ids"][r] == image_id]  # (P,) head mean
                obj = batch["patch_targets"][r, :, 0] > 0
                shares.append(img[obj].sum() / img.sum())
            shares = torch.stack(shares)
            loss, share = salience_loss(lm, layer_inputs, batch, layer, image_id)
            assert abs(share - shares.mean().item()) < 1e-6
            assert abs(loss.item() + (shares + 1e-6).log().mean().item()) < 1e-5


def test_salience_loss_raises_the_object_share(tmp_path):
    kw = dict(task_weights="caption=0.5,qa=0.5,pope=0,dialog=0", salience_weight=5.0, salience_layer=0, lr=1e-2, batch_size=8)
    train(tiny_args(tmp_path, steps=30, **kw))
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 30 and "salience_share" in log[0]
    assert log[-1]["salience_share"] > log[0]["salience_share"] + 0.2
    with pytest.raises(InputError, match="--salience-layer"):
        tiny_args(tmp_path / "x", salience_weight=1.0, salience_layer=2).validate()  # tiny has layers 0..1
    with pytest.raises(InputError, match="--salience-weight"):
        tiny_args(tmp_path / "x", salience_weight=-1.0).validate()
