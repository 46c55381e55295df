"""Every supported family (docs/models.md) on tiny random checkpoints built from their config
classes, saved with save_pretrained and loaded through `dyrate.load`: pruning off equals
`model.generate` token for token; pruned runs equal the independent reference (3-D positions for
Qwen2-VL); batch rows equal rows alone; multi-image prompts; bad inputs are one clear line."""

from __future__ import annotations

import json
import pytest
import torch
from PIL import Image

import dyrate
from dyrate.adapters import IMG, adapter_for
from dyrate.adapters.inputs import encode
from dyrate.engine import Engine, GenerationOptions, generate_tokens
from dyrate.errors import CheckpointError, DyrateError, InputError, PolicySpecError
from dyrate.policies import parse_policy
from dyrate.testbed.families import FAMILIES, save_family

from reference import reference_generate

@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(name, checkpoint dir, (model, processor) through dyrate.load, an untouched model.generate copy)."""
    path = save_family(request.param, tmp_path_factory.mktemp(request.param) / "ckpt")
    model, processor = dyrate.load(path)
    vanilla, _ = dyrate.load(path)  # never given to an adapter: plain SDPA
    return request.param, path, model, processor, vanilla


@pytest.fixture(scope="module")
def pictures():
    """Three noise images of different sizes and aspect ratios (different image-token counts for
    Qwen2-VL and for LLaVA-NeXT's anyres crops)."""
    gen = torch.Generator().manual_seed(5)
    sizes = [(56, 84), (112, 56), (70, 70)]
    return [Image.fromarray((torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()) for h, w in sizes]


PROMPTS = ["What is it?", "Describe the picture in detail please, every part of it.", "Hi"]


def _eos_pad(model):
    return model.generation_config.eos_token_id, model.generation_config.pad_token_id


@pytest.mark.parametrize("opts", [dict(do_sample=False), dict(do_sample=True, seed=7), dict(num_beams=3)],
                         ids=["greedy", "sample", "beam3"])
def test_no_pruning_matches_generate(family, pictures, opts):
    name, _, model, processor, vanilla = family
    eos, pad = _eos_pad(model)
    batch = encode(processor, pictures, PROMPTS, "cpu")
    n_img = (batch.input_ids == model.config.image_token_id).sum(1).tolist()
    if name != "llava":  # LLaVA-1.5 resizes every image to one grid
        assert len(set(n_img)) == 3, n_img  # rows really differ in image tokens (sizes, crop grids)
    opts = dict(opts)
    seed = opts.pop("seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    expected = vanilla.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.vision,
                                max_new_tokens=8, **opts)[:, batch.input_ids.shape[1]:]
    results = dyrate.generate(model, processor, pictures, PROMPTS, policy="none", max_new_tokens=8, seed=seed, **opts)
    for row, res in enumerate(results):
        want = expected[row].tolist()
        assert res.token_ids == want[: len(res.token_ids)], (name, row)
        assert all(tok in (pad, eos) for tok in want[len(res.token_ids):])


POLICIES = ["fastv:k=2,r=0.5", "vtw:k=2", "fixed:k=1,r=0.75", "schedule:1=0.25,3=0.75"]


@pytest.mark.parametrize("mode", ["evict", "mask"])
@pytest.mark.parametrize("spec", POLICIES)
def test_matches_reference(family, pictures, spec, mode):
    name, _, model, processor, _ = family
    eos, _ = _eos_pad(model)
    adapter = adapter_for(model)
    for row in (0, 1):
        batch = encode(processor, pictures[row:row + 1], PROMPTS[row:row + 1], "cpu")
        want_tokens, want_kept = reference_generate(model, batch.input_ids, batch.vision, spec, mode, 5, eos=eos)
        engine = Engine(adapter, parse_policy(spec), mode)
        with torch.inference_mode():
            [out], state = generate_tokens(engine, batch.input_ids, batch.attention_mask, batch.vision,
                                           GenerationOptions(max_new_tokens=5), eos=[eos], pad=0)
        assert out.token_ids == want_tokens, (name, spec, mode, row)
        for s in range(1, len(state.segments)):
            seg = state.segments[s]
            cols = seg.col[0][seg.attend[0]]
            kept = sorted(int(c) for c in cols if int(state.group[0, c]) == IMG)
            assert kept == want_kept[len(want_tokens) - 1][s - 1], (name, spec, mode, s)


@pytest.mark.parametrize("spec,mode,beams", [("fastv:k=2,r=0.5", "evict", 1), ("schedule:1=0.25,3=0.75", "mask", 1),
                                             ("fixed:k=1,r=0.75", "evict", 2)])
def test_batch_rows_equal_rows_alone(family, pictures, spec, mode, beams):
    _, _, model, processor, _ = family
    together = dyrate.generate(model, processor, pictures, PROMPTS, policy=spec, mode=mode, max_new_tokens=5,
                               num_beams=beams)
    for i in range(3):
        alone = dyrate.generate(model, processor, pictures[i:i + 1], PROMPTS[i:i + 1], policy=spec, mode=mode,
                                max_new_tokens=5, num_beams=beams)[0]
        assert together[i].token_ids == alone.token_ids
        assert [s["kept"] for s in together[i].trace] == [s["kept"] for s in alone.trace]


def test_kv_lengths_of_pruned_layers(family, pictures):
    """Evict mode: a pruned layer stores the kept image tokens plus the text, nothing else."""
    _, _, model, processor, _ = family
    batch = encode(processor, pictures[:1], PROMPTS[:1], "cpu")
    engine = Engine(adapter_for(model), parse_policy("fastv:k=2,r=0.5"), "evict")
    with torch.inference_mode():
        [out], state = generate_tokens(engine, batch.input_ids, batch.attention_mask, batch.vision,
                                       GenerationOptions(max_new_tokens=4), eos=[-1], pad=0)
    n_img = int((batch.input_ids == model.config.image_token_id).sum())
    n_text = batch.input_ids.shape[1] - n_img
    kept = (n_img + 1) // 2  # ceil(0.5 * n_img)
    new = len(out.token_ids) - 1  # the last token is chosen but not yet run
    for layer in range(adapter_for(model).n_layers):
        stored = state.cache.layers[layer].get_seq_length()
        assert stored == (n_img if layer < 2 else kept) + n_text + new, layer


def test_cli_generate(family, pictures, tmp_path, capsys):
    from dyrate.cli import main

    name, path, *_ = family
    image = tmp_path / "a.png"
    pictures[0].save(image)
    assert main(["generate", "--model", str(path), "--image", str(image), "--prompt", "What?",
                 "--policy", "fastv:k=2,r=0.5", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_predictor_for_another_model_is_refused(family):
    _, _, model, _, _ = family
    from dyrate.assets import predictor_path

    with pytest.raises(DyrateError, match="trained for") as err:
        Engine(adapter_for(model), parse_policy(f"dyrate:k=2,predictor={predictor_path()}"), "evict")
    assert "\n" not in str(err.value)


def test_unsupported_model_class_names_the_supported_ones():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(CheckpointError, match="Qwen2_5_VLForConditionalGeneration"):
        adapter_for(model)


# ---------------------------------------------------------------- multi-image prompts
MULTI_PROMPTS = ["Compare them.", "Hi"]


def test_multi_image_groups(family, pictures):
    """sys before the first image token, img for every image's tokens, ins for the text between and after."""
    from dyrate.adapters import INS, SYS

    _, _, model, processor, _ = family
    batch = encode(processor, [pictures[:2]], ["Compare them."], "cpu")
    assert batch.images_per_row == [2]
    ids = batch.input_ids[0]
    groups = adapter_for(model).token_groups(batch.input_ids, batch.attention_mask.bool())[0]
    img = (ids == model.config.image_token_id).nonzero()[:, 0]
    first, last = int(img[0]), int(img[-1])
    assert bool((groups[:first] == SYS).all())
    assert bool((groups[img] == IMG).all())
    gap = [c for c in range(first, last) if int(ids[c]) != model.config.image_token_id]
    assert gap and all(int(groups[c]) == INS for c in gap)  # text between the two images is ins


@pytest.mark.parametrize("opts", [dict(do_sample=False), dict(do_sample=True, seed=3)], ids=["greedy", "sample"])
def test_multi_image_matches_generate(family, pictures, opts):
    name, _, model, processor, vanilla = family
    rows = [pictures[:2], [pictures[2]]]  # a two-image row beside a one-image row
    batch = encode(processor, rows, MULTI_PROMPTS, "cpu")
    opts = dict(opts)
    seed = opts.pop("seed", None)
    if seed is not None:
        torch.manual_seed(seed)
    expected = vanilla.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **batch.vision,
                                max_new_tokens=6, **opts)[:, batch.input_ids.shape[1]:]
    results = dyrate.generate(model, processor, rows, MULTI_PROMPTS, max_new_tokens=6, seed=seed, **opts)
    eos, pad = _eos_pad(model)
    for row, res in enumerate(results):
        want = expected[row].tolist()
        assert res.token_ids == want[: len(res.token_ids)], (name, row)
        assert all(tok in (pad, eos) for tok in want[len(res.token_ids):])


@pytest.mark.parametrize("spec", ["fastv:k=2,r=0.5", "schedule:1=0.25,3=0.75"])
def test_multi_image_matches_reference(family, pictures, spec):
    name, _, model, processor, _ = family
    eos, _ = _eos_pad(model)
    batch = encode(processor, [pictures[:2]], ["Compare them."], "cpu")
    want_tokens, want_kept = reference_generate(model, batch.input_ids, batch.vision, spec, "evict", 5, eos=eos)
    engine = Engine(adapter_for(model), parse_policy(spec), "evict")
    with torch.inference_mode():
        [out], state = generate_tokens(engine, batch.input_ids, batch.attention_mask, batch.vision,
                                       GenerationOptions(max_new_tokens=5), eos=[eos], pad=0)
    assert out.token_ids == want_tokens, (name, spec)
    seg = state.segments[-1]
    kept = sorted(int(c) for c in seg.col[0][seg.attend[0]] if int(state.group[0, c]) == IMG)
    assert kept == want_kept[len(want_tokens) - 1][-1]


@pytest.mark.parametrize("spec", ["fastv:k=2,r=0.5", "sparsevlm:1=0.5,3=0.75,recycle=0.5,per_cluster=2"])
def test_multi_image_beams_rows_alone(family, pictures, spec):
    """Beam search repeats each row's images as a block: batch rows equal rows alone (SparseVLM: its
    raters include the text between the images, its candidates every image's tokens)."""
    _, _, model, processor, _ = family
    rows = [[pictures[2]], pictures[:2], [pictures[1]]]
    prompts = ["Hi", "Compare them.", "What?"]
    together = dyrate.generate(model, processor, rows, prompts, policy=spec, max_new_tokens=5, num_beams=2)
    for i in range(3):
        alone = dyrate.generate(model, processor, rows[i:i + 1], prompts[i:i + 1], policy=spec,
                                max_new_tokens=5, num_beams=2)[0]
        assert together[i].token_ids == alone.token_ids, i


def test_image_count_must_match_placeholders(family, pictures):
    _, _, model, processor, _ = family
    mark = processor.image_token
    with pytest.raises(InputError, match="2 image placeholders .* but 1 image was given"):
        dyrate.generate(model, processor, [pictures[:1]], [f"{mark} a {mark} b"], max_new_tokens=2)
    with pytest.raises(InputError, match="1 image placeholders .* but 2 images were given"):
        dyrate.generate(model, processor, [pictures[:2]], [f"{mark} a"], max_new_tokens=2)
    with pytest.raises(InputError, match="empty list of images"):
        dyrate.generate(model, processor, [[]], ["Hi"], max_new_tokens=2)


# ---------------------------------------------------------------- DyRate on every family
@pytest.mark.parametrize("arch", ["mlp", "gru"])
def test_predictor_forced_to_one_bin_equals_fixed(family, pictures, tmp_path, arch):
    """A predictor made for this model whose argmax is always bin 6 equals fixed:k=2,r=0.6."""
    from dyrate.learn.predictors import new_predictor, save_predictor

    _, _, model, processor, _ = family
    pred = new_predictor(arch, bins=10, k=2, history=3, model=model, features=("shares", "step", "hidden"))
    head = pred.net[-1] if arch == "mlp" else pred.head
    with torch.no_grad():
        head.bias.zero_()
        head.bias[6] = 1e4
    path = save_predictor(pred, tmp_path / "p.safetensors")
    policy = {"mlp": "dyrate", "gru": "dyrate-rnn"}[arch]
    ours = dyrate.generate(model, processor, pictures, PROMPTS, policy=f"{policy}:k=2,predictor={path}", max_new_tokens=5)
    ref = dyrate.generate(model, processor, pictures, PROMPTS, policy="fixed:k=2,r=0.6", max_new_tokens=5)
    assert [r.token_ids for r in ours] == [r.token_ids for r in ref]
    assert [[e["kept"] for e in r.trace] for r in ours] == [[e["kept"] for e in r.trace] for r in ref]


def test_train_predictor_for_the_family(family, tmp_path, capsys):
    """`dyrate train-predictor` on the family's checkpoint writes a predictor that `dyrate generate`
    runs; another family's checkpoint refuses it with one line."""
    from dyrate.cli import main

    name, path, *_ = family
    out = tmp_path / "p.safetensors"
    assert main(["train-predictor", "--model", str(path), "--testbed", "--arch", "mlp", "--target-keep", "0.5",
                 "--steps", "3", "--samples", "3", "--max-new-tokens", "4", "--no-progress", "--out", str(out)]) == 0
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 48), "red").save(image)
    args = ["generate", "--image", str(image), "--prompt", "What?", "--policy", f"dyrate:k=2,predictor={out}",
            "--max-new-tokens", "3"]
    assert main([*args, "--model", str(path)]) == 0
    other = save_family("qwen2.5-vl" if name == "qwen2-vl" else "qwen2-vl", tmp_path / "other")
    capsys.readouterr()
    assert main([*args, "--model", str(other)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dyrate generate: error")]
    assert len(errors) == 1 and "trained for another model" in errors[0]


@pytest.mark.parametrize("mode", ["evict", "mask"])
def test_every_policy_runs(family, pictures, mode):
    """none, fastv, vtw, fixed, schedule, random, DART, DivPrune and SparseVLM on every family: each keeps
    what its rule says."""
    _, _, model, processor, _ = family
    specs = {"none": 1.0, "fastv:k=2,r=0.5": 0.5, "vtw:k=2": 0.0, "fixed:k=2,r=0.75": 0.25,
             "schedule:1=0.5,3=0.9": None, "random:k=2,r=0.5": 0.5,
             "dart:k=2,r=0.5,pivots_image=1,pivots_text=1": None, "divprune:r=0.5": 0.5,
             "sparsevlm:1=0.5,3=0.75": None}
    for spec, kept in specs.items():
        [res] = dyrate.generate(model, processor, pictures[2:], PROMPTS[2:], policy=spec, mode=mode, max_new_tokens=3)
        assert len(res.token_ids) >= 1
        if kept is not None:
            assert res.retained == pytest.approx(kept, abs=0.13), spec  # ceil of a few image tokens


def test_packed_prefill_equals_padded(family, pictures):
    """The packed prefill of pruned segments (ragged image-token counts and prompt lengths) equals
    the padded one on every family (M-RoPE positions included), and really runs."""
    _, _, model, processor, _ = family

    class Padded(Engine):
        PACK_BELOW = 0.0

    class Packed(Engine):
        PACK_BELOW = 1.01
        packed = 0

        def _run_packed(self, *args):
            self.packed += 1
            return super()._run_packed(*args)

    batch = encode(processor, pictures, PROMPTS, "cpu")
    eos, pad = _eos_pad(model)
    out = []
    for cls in (Packed, Padded):
        engine = cls(adapter_for(model), parse_policy("fastv:k=2,r=0.5"), "evict")
        with torch.inference_mode():
            rows, _ = generate_tokens(engine, batch.input_ids, batch.attention_mask, batch.vision,
                                      GenerationOptions(max_new_tokens=5), eos=[-1], pad=pad)
        out.append([r.token_ids for r in rows])
        if cls is Packed:
            assert engine.packed == 1
    assert out[0] == out[1]


def test_sparsevlm_rows_equal_rows_alone(family, pictures):
    """SparseVLM reads only the decoder: on every family, batch rows with different image-token
    counts equal rows alone, and each row keeps its static count."""
    _, _, model, processor, _ = family
    spec = "sparsevlm:1=0.5,3=0.75,recycle=0.5,per_cluster=2"
    together = dyrate.generate(model, processor, pictures, PROMPTS, policy=spec, max_new_tokens=5)
    for i in range(3):
        alone = dyrate.generate(model, processor, pictures[i:i + 1], PROMPTS[i:i + 1], policy=spec, max_new_tokens=5)[0]
        assert together[i].token_ids == alone.token_ids
        n = alone.trace[0]["kept"][0]
        assert alone.trace[0]["kept"] == parse_policy(spec).static_image_tokens(n, len(alone.trace[0]["kept"]))


# ---------------------------------------------------------------- pre-LLM methods on every family
def test_divprune_on_every_family(family, pictures):
    """DivPrune needs only the decoder-ready features: it runs on every family; keeping everything
    equals `none`; batch rows (different image-token counts) equal rows alone."""
    _, _, model, processor, _ = family
    none = dyrate.generate(model, processor, pictures, PROMPTS, max_new_tokens=5)
    everything = dyrate.generate(model, processor, pictures, PROMPTS, policy="divprune:r=0", max_new_tokens=5)
    assert [r.token_ids for r in everything] == [r.token_ids for r in none]
    together = dyrate.generate(model, processor, pictures, PROMPTS, policy="divprune:r=0.5", max_new_tokens=5)
    for i in range(3):
        alone = dyrate.generate(model, processor, pictures[i:i + 1], PROMPTS[i:i + 1], policy="divprune:r=0.5",
                                max_new_tokens=5)[0]
        assert together[i].token_ids == alone.token_ids
        assert together[i].retained == pytest.approx(0.5, abs=0.13)


def test_divprune_keeps_original_positions_on_mrope(family, pictures):
    """Qwen2-VL: the kept tokens keep their 3-D positions (a 2-D grid cannot be renumbered); the
    LLaVA families number the shorter prompt afresh."""
    from dyrate.policies import parse_policy

    name, _, model, processor, _ = family
    batch = encode(processor, pictures[:1], PROMPTS[:1], "cpu")
    adapter = adapter_for(model)
    engine = Engine(adapter, parse_policy("divprune:r=0.5"), "evict")
    with torch.inference_mode():
        _, state = engine.prefill(batch.input_ids, batch.attention_mask, batch.vision)
    full = adapter.positions(batch.input_ids, batch.attention_mask, batch.vision)[:, 0]  # (A, P)
    pos = state.pos[:, 0]
    if name.startswith("qwen"):
        text = batch.input_ids[0] != model.config.image_token_id
        # text tokens keep theirs, in order; every kept image token holds one of the image's positions
        assert torch.equal(pos[:, state.group[0] != IMG], full[:, text])
        img_pos = {tuple(full[:, c].tolist()) for c in (~text).nonzero()[:, 0]}
        assert all(tuple(pos[:, c].tolist()) in img_pos for c in (state.group[0] == IMG).nonzero()[:, 0])
    else:
        assert torch.equal(pos[0], torch.arange(pos.shape[1]))


TOWER_SPECS = ["visionzip:dominant=3,contextual=2", "prumerge", "prumerge+:ratio=0.3", "prumerge:ratio=0.25,neighbours=4"]


def _tower_reference(name, model, view, vision, spec):
    import reference_tower as rt

    pol = parse_policy(spec)
    images, n_layers = (rt.qwen_tiles if name.startswith("qwen") else rt.llava_next_tiles)(model, vision)
    if pol.name == "visionzip":
        return rt.visionzip(images[0], view.project, n_layers - 1, pol.dominant, pol.contextual)
    return rt.prumerge(images[0], view.project, n_layers, pol.neighbours, pol.name == "prumerge+", pol.ratio)


@pytest.mark.parametrize("windowed", [False, True], ids=["full", "windowed"])
def test_tower_methods_equal_the_reference(family, pictures, windowed):
    """VisionZip and PruMerge(+) read the tower through tiles: the base image and each crop
    (LLaVA-NeXT, OneVision), attention received where there is no class token (SigLIP, Qwen2-VL),
    merged 2x2 units and attention windows (Qwen2.5-VL, its last block made windowed) -- equal to
    tests/reference_tower.py (LLaVA-1.5: tests/test_prellm.py)."""
    name, _, model, processor, _ = family
    if name == "llava" or (windowed and name != "qwen2.5-vl"):
        pytest.skip("LLaVA-1.5 is checked in test_prellm.py; only Qwen2.5-VL has windows")
    gen = torch.Generator().manual_seed(6)
    square = Image.fromarray((torch.rand(112, 112, 3, generator=gen) * 255).to(torch.uint8).numpy())  # 16 Qwen units
    visual = getattr(model.model, "visual", None)
    full = getattr(visual, "fullatt_block_indexes", None)
    if windowed:
        visual.fullatt_block_indexes = [0]  # the last block (the one read) attends within windows
    try:
        for picture in [*pictures[:2], square]:
            batch = encode(processor, [picture], ["Hi"], "cpu")
            with torch.no_grad():
                [view] = adapter_for(model).image_views(batch.vision)
                [plain] = adapter_for(model).image_views(batch.vision, tower=False)  # DivPrune's: no tiles
                assert not plain.tiles and view.tiles
                torch.testing.assert_close(plain.features, view.features)
                if windowed:
                    assert view.tiles[0].windows(view.feature_layer) is not None
                for spec in TOWER_SPECS:
                    red = parse_policy(spec).reduce(view)
                    want = _tower_reference(name, model, view, batch.vision, spec)
                    assert red.features.shape == want.shape, (spec, picture.size)
                    torch.testing.assert_close(red.features, want, rtol=1e-5, atol=1e-5)
                    assert len(red.anchors) == len(red.features) and 0 <= int(red.anchors.min())
                    assert int(red.anchors.max()) < view.n
    finally:
        if windowed:
            visual.fullatt_block_indexes = full


@pytest.mark.parametrize("spec", ["visionzip:dominant=2,contextual=1", "prumerge:ratio=0.25"])
def test_tower_methods_rows_equal_rows_alone(family, pictures, spec):
    """Rows with different image-token counts (crop grids, Qwen image sizes) equal rows alone;
    VisionZip keeps dominant + contextual tokens per tower pass."""
    name, _, model, processor, _ = family
    together = dyrate.generate(model, processor, pictures, PROMPTS, policy=spec, max_new_tokens=4)
    for i in range(3):
        alone = dyrate.generate(model, processor, pictures[i:i + 1], PROMPTS[i:i + 1], policy=spec, max_new_tokens=4)[0]
        assert together[i].token_ids == alone.token_ids
        if spec.startswith("visionzip"):
            batch = encode(processor, pictures[i:i + 1], ["Hi"], "cpu")
            [view] = adapter_for(model).image_views(batch.vision)
            assert alone.trace[0]["kept"][0] == 3 * len(view.tiles)


def test_tower_methods_from_the_cli(family, tmp_path, capsys):
    """`dyrate generate --policy visionzip|prumerge+` on each saved checkpoint: the JSON reports the
    reduced image."""
    from dyrate.cli import main

    _, path, *_ = family
    image = tmp_path / "a.png"
    Image.new("RGB", (96, 64), "red").save(image)
    for spec in ("visionzip:dominant=2,contextual=1", "prumerge+"):
        capsys.readouterr()
        assert main(["generate", "--model", str(path), "--image", str(image), "--prompt", "What?", "--policy", spec,
                     "--max-new-tokens", "2", "--json"]) == 0
        [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        assert 0 < row["retained"] < 1, spec


def test_tower_methods_refuse_with_one_line(family, pictures):
    """More kept patches than the (base) image holds; OneVision crops the model resamples
    (anyres_max) are no tower patches -- one line each."""
    name, _, model, processor, _ = family
    with pytest.raises(PolicySpecError, match="more than the image") as err:
        dyrate.generate(model, processor, pictures[:1], PROMPTS[:1], policy="visionzip:dominant=20,contextual=5",
                        max_new_tokens=2)
    assert "\n" not in str(err.value)
    if name != "llava-onevision":
        return
    batch = encode(processor, pictures[:1], ["Hi"], "cpu")
    ratio = model.config.vision_aspect_ratio
    model.config.vision_aspect_ratio = "anyres_max_1"  # the crops' 8x8 patches resampled to fit one tile
    try:
        [view] = adapter_for(model).image_views(batch.vision)
    finally:
        model.config.vision_aspect_ratio = ratio
    assert not view.tiles
    for spec in ("visionzip", "prumerge"):
        with pytest.raises(PolicySpecError, match="resamples") as err:
            parse_policy(spec).reduce(view)
        assert "\n" not in str(err.value)


def test_multi_image_shares_split_the_image_share(family, pictures):
    """The trace reports each image's share of the probe's attention; together they are the img share."""
    _, _, model, processor, _ = family
    [res] = dyrate.generate(model, processor, [pictures[:2]], ["Compare them."], policy="fastv:k=2,r=0.5",
                            max_new_tokens=2)
    per_image, shares = res.trace[0]["image_shares"][0], res.trace[0]["shares"][0]
    assert len(per_image) == 2 and all(v > 0 for v in per_image)
    assert sum(per_image) == pytest.approx(shares["img"], rel=1e-5)
    [single] = dyrate.generate(model, processor, pictures[:1], ["Hi"], policy="fastv:k=2,r=0.5", max_new_tokens=2)
    assert single.trace[0]["image_shares"] == [None]  # one image: its share is shares["img"]
