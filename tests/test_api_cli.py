"""The Python API and the CLI on a saved tiny checkpoint: behaviour and bad input."""

from __future__ import annotations

import json

import pytest

import dyrate
from dyrate.cli import main
from dyrate.errors import CheckpointError, InputError, PolicySpecError


@pytest.fixture(scope="module")
def image_path(tmp_path_factory, images):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    images[0].save(path)
    return path


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return dyrate.load(tiny_dir)


def test_load_and_generate_from_checkpoint(loaded, tiny, image_path):
    model, processor = loaded
    [a] = dyrate.generate(model, processor, [image_path], ["What is it?"], policy="fastv:k=2,r=0.5", max_new_tokens=6)
    [b] = dyrate.generate(*tiny, [image_path], ["What is it?"], policy="fastv:k=2,r=0.5", max_new_tokens=6)
    assert a.token_ids == b.token_ids  # the saved checkpoint is the same model
    assert a.text == model_text(processor, a.token_ids)


def model_text(processor, ids):
    return processor.tokenizer.decode(ids, skip_special_tokens=True)


def test_verbatim_prompt_equals_template(loaded, image_path):
    model, processor = loaded
    verbatim = dyrate.api.build_prompt(processor, "What is it?")
    [a] = dyrate.generate(model, processor, [image_path], [verbatim], max_new_tokens=5)
    [b] = dyrate.generate(model, processor, [image_path], ["What is it?"], max_new_tokens=5)
    assert "<image>" in verbatim and a.token_ids == b.token_ids


def test_cli_generate_json(tiny_dir, image_path, capsys):
    rc = main(["generate", "--model", str(tiny_dir), "--image", str(image_path), "--prompt", "What is it?",
               "--policy", "fastv:k=2,r=0.5", "--max-new-tokens", "4", "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    payload = json.loads(out)  # exactly one JSON object
    assert {"text", "token_ids", "trace", "flops"} <= set(payload)
    assert len(payload["trace"]) == len(payload["token_ids"]) <= 4
    assert set(payload["flops"]) == {"prefill", "cached", "nocache"}
    assert payload["trace"][0]["kept"] == [16, 16, 8, 8]


def test_cli_generate_beam_and_sampling(tiny_dir, image_path, capsys):
    for extra in (["--num-beams", "2"], ["--do-sample", "--seed", "1", "--top-p", "0.9", "--temperature", "0.8"]):
        rc = main(["generate", "--model", str(tiny_dir), "--image", str(image_path), "--prompt", "Hi",
                   "--max-new-tokens", "3", "--mode", "mask", "--policy", "fixed:k=1,r=0.5", *extra])
        assert rc == 0
    assert capsys.readouterr().out.strip()


def test_help_texts(capsys):
    for cmd in (["--help"], ["generate", "--help"], ["flops", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(cmd)
        assert exc.value.code == 0
    assert "--policy" in capsys.readouterr().out


# ---------------------------------------------------------------- bad input: API
@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(policy="magic:k=2"), PolicySpecError, "unknown policy"),
        (dict(policy="fastv:k=0,r=0.5"), PolicySpecError, "k=0"),
        (dict(policy="fastv:k=4,r=0.5"), PolicySpecError, "4 layers"),
        (dict(policy="fastv:k=2,r=1.0"), PolicySpecError, "[0, 1)"),
        (dict(policy="fastv:k=2,r=-0.1"), PolicySpecError, "[0, 1)"),
        (dict(policy="fastv:k=2,x=3"), PolicySpecError, "unknown parameter"),
        (dict(policy="fastv:k=two"), PolicySpecError, "bad parameter"),
        (dict(policy="schedule:3=0.5,1=0.7"), PolicySpecError, "ascending"),
        (dict(max_new_tokens=0), InputError, "max_new_tokens"),
        (dict(max_new_tokens=-3), InputError, "max_new_tokens"),
        (dict(mode="drop"), InputError, "mode"),
        (dict(num_beams=2, do_sample=True), InputError, "beam"),
        (dict(top_p=0.0, do_sample=True), InputError, "top_p"),
        (dict(bogus=1), InputError, "bogus"),
    ],
)
def test_api_bad_options(tiny, image_path, kwargs, error, words):
    with pytest.raises(error, match=None) as exc:
        dyrate.generate(*tiny, [image_path], ["What is it?"], **kwargs)
    assert words in str(exc.value)
    assert "\n" not in str(exc.value)


def test_api_bad_images_and_prompts(tiny, image_path, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    cases = [
        ([tmp_path / "missing.png"], ["Hi"], "does not exist"),
        ([corrupt], ["Hi"], "cannot be read"),
        ([image_path], ["<image> and <image>"], "2 image placeholders"),
        ([image_path], ["   "], "empty prompt"),
        ([image_path, image_path], ["Hi"], "one list of images) per prompt"),
    ]
    for imgs, prompts, words in cases:
        with pytest.raises(InputError) as exc:
            dyrate.generate(*tiny, imgs, prompts)
        assert words in str(exc.value)
    with pytest.raises(InputError, match="one placeholder per image"):
        dyrate.generate(*tiny, [image_path], ["no placeholder here"], template=False)


def test_prompt_longer_than_positions(tiny, image_path):
    with pytest.raises(InputError, match="positions"):
        dyrate.generate(*tiny, [image_path], ["word " * 120], max_new_tokens=4)


def test_load_rejects_unsupported_dirs(tmp_path):
    from transformers import LlamaConfig

    with pytest.raises(CheckpointError, match="not a directory"):
        dyrate.load(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="config.json"):
        dyrate.load(tmp_path)
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not supported .supported: LlavaForConditionalGeneration, .*Qwen2_5_VL"):
        dyrate.load(tmp_path)


def test_load_refuses_pickle_weights(tiny_dir, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, ckpt)
    for f in ckpt.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(CheckpointError, match="safetensors"):
        dyrate.load(ckpt)


# ---------------------------------------------------------------- bad input: CLI (exit 2, one line)
@pytest.mark.parametrize(
    "args",
    [
        ["--image", "{missing}", "--prompt", "Hi"],
        ["--image", "{corrupt}", "--prompt", "Hi"],
        ["--image", "{img}", "--prompt", "<image><image> twice"],
        ["--image", "{img}", "--prompt", "Hi", "--policy", "nope"],
        ["--image", "{img}", "--prompt", "Hi", "--policy", "fastv:k=0,r=0.5"],
        ["--image", "{img}", "--prompt", "Hi", "--policy", "fastv:k=9,r=0.5"],
        ["--image", "{img}", "--prompt", "Hi", "--policy", "fastv:k=2,r=1"],
        ["--image", "{img}", "--prompt", "Hi", "--max-new-tokens", "0"],
        ["--image", "{img}", "--prompt", "word " * 120],
        ["--image", "{img}", "--prompt", "Hi", "--model", "{notllava}"],
    ],
)
def test_cli_bad_input(tiny_dir, image_path, tmp_path, capsys, args):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"garbage")
    notllava = tmp_path / "notllava"
    notllava.mkdir()
    (notllava / "config.json").write_text(json.dumps({"model_type": "bert"}))
    fill = {"{missing}": str(tmp_path / "missing.png"), "{corrupt}": str(corrupt), "{img}": str(image_path),
            "{notllava}": str(notllava)}
    args = [fill.get(a, a) for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny_dir)]
    rc = main(["generate", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("dyrate generate: error:"), err


def test_demo_runs_on_a_given_model(tmp_path, tiny_dir, capsys):
    rc = main(["demo", "--model", str(tiny_dir), "--policies", "none;fastv:k=2,r=0.5;random:k=2,r=0.75",
               "--max-new-tokens", "3", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "truth" in out and "fastv:k=2,r=0.5" in out and "random:k=2,r=0.75,seed=0" in out
    assert (tmp_path / "scene-0.png").is_file()
    assert main(["demo", "--model", str(tiny_dir), "--scene", "-1"]) == 2
    assert "--scene: must be >= 0" in capsys.readouterr().err
    assert main(["demo", "--model", str(tiny_dir), "--policies", "fastv:k=9"]) == 2


def test_demo_mode_reaches_every_generate_call(tiny_dir, capsys, monkeypatch):
    import dyrate.api

    seen = []
    real = dyrate.api.generate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("mode"))
        return real(*args, **kwargs)

    monkeypatch.setattr(dyrate.api, "generate", spy)
    assert main(["demo", "--model", str(tiny_dir), "--mode", "mask", "--policies", "none;fixed:k=2,r=0.5",
                 "--max-new-tokens", "2"]) == 0
    assert "cost (mask mode)" in capsys.readouterr().out
    assert seen == ["mask"] * 4  # warm-up + timed call per policy
    assert main(["demo", "--model", str(tiny_dir), "--mode", "sideways"]) == 2
    assert "invalid choice: 'sideways'" in capsys.readouterr().err
