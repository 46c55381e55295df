"""Hostile-but-realistic inputs to every command: each is refused with exit code 2 and one line on
stderr naming the problem (no traceback), before any work that would be lost. docs/bad_inputs.md
counts these cases per command (test_the_docs_table_counts_these_cases keeps the two in sync)."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from dyrate.cli import main

NAN = "nan"


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_dir, images):
    """Broken checkpoints, predictor files, an image and a data folder, built once."""
    from dyrate.learn.predictors import META_KEY, new_predictor, save_predictor
    from dyrate.testbed.data import write_dataset
    from tiny import tiny_model

    root = tmp_path_factory.mktemp("bad")
    images[0].save(root / "img.png")
    (root / "file").write_text("x")
    truncated = shutil.copytree(tiny_dir, root / "truncated")
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    pickled = shutil.copytree(tiny_dir, root / "bin-only")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    llama = root / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1,
                                                    "num_attention_heads": 1, "intermediate_size": 8, "vocab_size": 8}))
    save_file({"w": torch.zeros(1)}, str(llama / "model.safetensors"))
    model = tiny_model(seed=0)[0]
    good = save_predictor(new_predictor("mlp", k=2, model=model), root / "good.safetensors")
    from safetensors.torch import load_file, safe_open

    with safe_open(str(good), "pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    save_file(load_file(str(good)), str(root / "absurd.safetensors"), metadata={META_KEY: json.dumps({**meta, "bins": 10**9})})
    nan = new_predictor("mlp", k=2, model=model)
    with torch.no_grad():
        next(nan.parameters()).fill_(float("nan"))
    save_predictor(nan, root / "nan.safetensors")
    write_dataset(root / "data", seed=3, n=2, image_size=32, progress=False)
    (root / "stranger").mkdir()
    (root / "stranger" / "notes.txt").write_text("mine")
    return root


def cases(tiny_dir: Path, r: Path) -> list[tuple[str, list[str], str]]:
    """(command, argv, fragment the one error line must contain)."""
    img, model = str(r / "img.png"), ["--model", str(tiny_dir)]
    gen = ["generate", *model, "--image", img, "--prompt", "what is it?"]
    ev = ["eval", *model, "--task", "vqa", "--data", str(r / "data" / "vqa.jsonl"), "--quiet"]
    bench = ["bench", "--model", str(tiny_dir), "--batch", "1", "--new-tokens", "2", "--repeats", "1"]
    findk = ["findk", *model, "--task", "vqa", "--data", str(r / "data" / "vqa.jsonl")]
    flops = ["flops", "--config", "llava-1.5-7b", "--policy", "fastv:k=2,r=0.5"]
    analyze = ["analyze", *model, "--data", str(r / "data"), "--limit", "1", "--max-new-tokens", "2"]
    train = ["train-predictor", *model, "--testbed", "--arch", "mlp", "--lambda", "0.1", "--samples", "2", "--steps", "1"]
    tout = ["--out", str(r / "p.safetensors")]
    tb_train = ["testbed", "train", "--config", "tiny", "--steps", "1", "--out", str(r / "tb")]
    return [
        ("generate", ["generate", *model, "--image", str(r / "missing.png"), "--prompt", "hi"], "does not exist"),
        ("generate", [*gen[:-2], "--prompt", "caf\udce9?"], "not valid UTF-8"),
        ("generate", [*gen, "--do-sample", "--temperature", NAN], "--temperature: must be a finite number"),
        ("generate", [*gen, "--do-sample", "--temperature", "inf"], "--temperature: must be a finite number"),
        ("generate", [*gen, "--num-beams", "2", "--length-penalty", NAN], "--length-penalty: must be a finite"),
        ("generate", [*gen, "--do-sample", "--top-p", "1.5"], "--top-p: must be"),
        ("generate", [*gen, "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
        ("generate", [*gen, "--seed", "-1"], "--seed: must be"),
        ("generate", [*gen, "--num-beams", "100000"], "exceeds the vocabulary"),
        ("generate", ["generate", "--model", str(r / "truncated"), "--image", img, "--prompt", "hi"], "cannot load"),
        ("generate", ["generate", "--model", str(r / "llama"), "--image", img, "--prompt", "hi"], "is not supported"),
        ("generate", ["generate", "--model", str(r / "bin-only"), "--image", img, "--prompt", "hi"], "safetensors"),
        ("generate", [*gen, "--policy", f"dyrate:predictor={r / 'absurd.safetensors'}"], "predictor bins"),
        ("generate", [*gen, "--policy", f"dyrate:predictor={r / 'nan.safetensors'}"], "non-finite weights"),
        ("generate", [*gen, "--policy", "fastv:k=2,r=nan"], "reduction rate"),
        ("generate", [*gen, "--device", "cuda"], "no usable CUDA"),  # (skipped where torch has CUDA)
        ("eval", [*ev, "--out", str(r / "file" / "out")], "is a file, not a folder"),
        ("eval", [*ev, "--out", str(r / "file")], "is a file, not a folder"),
        ("eval", [*ev, "--out", str(r / "e1"), "--do-sample", "--temperature", NAN], "--temperature: must be a finite"),
        ("eval", [*ev, "--out", str(r / "e2"), "--do-sample", "--top-p", "1.5"], "--top-p: must be"),
        ("eval", [*ev, "--out", str(r / "e3"), "--policies", ";;"], "no policy"),
        ("eval", [*ev, "--out", str(r / "e4"), "--batch-size", "0"], "--batch-size: must be >= 1"),
        ("eval", [*ev, "--out", str(r / "e5"), "--num-beams", "100000"], "exceeds the vocabulary"),
        ("bench", [*bench, "--text-tokens", "-5"], "--text-tokens: must be >= 0"),
        ("bench", [*bench, "--threads", "-2"], "--threads: must be >= 1"),
        ("bench", [*bench, "--policies", ";;"], "no policy"),
        ("bench", [*bench[:-4], "--batch", "0"], "batch sizes must be >= 1"),
        ("bench", [*bench, "--device", "cuda"], "no usable CUDA"),  # (skipped where torch has CUDA)
        ("findk", [*findk, "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
        ("findk", [*findk, "--eta", NAN], "--eta: must be a finite number"),
        ("findk", [*findk, "--eta", "0"], "--eta: must be > 0"),
        ("flops", [*flops, "--text-tokens", "1e22"], "--text-tokens: expected an integer"),
        ("flops", [*flops, "--text-tokens", str(10**22)], "--text-tokens: must be in"),
        ("analyze", [*analyze, "--out", str(r / "a.png"), "--json", str(r / "a.png")], "is the --out image itself"),
        ("analyze", [*analyze, "--out", str(r / "file" / "a.png")], "is a file, not a folder"),
        ("analyze", [*analyze, "--out", str(r / "a.png"), "--limit", "0"], "--limit: must be >= 1"),
        ("train-predictor", [*train, "--lr", NAN, *tout], "--lr: must be a finite number"),
        ("train-predictor", [*train, "--budget-weight", NAN, *tout], "--budget-weight: must be a finite"),
        ("train-predictor", [*train, "--bins", "10000000", *tout], "--bins: must be in"),
        ("train-predictor", [*train, "--features", "shares,colour", *tout], "give distinct names from shares, step, hidden"),
        ("train-predictor", [*train, "--out", str(r / "dir.safetensors")], "is a directory"),
        ("train-predictor", [*train, "--out", str(r / "file" / "p.safetensors")], "is a file, not a folder"),
        ("demo", ["demo", *model, "--out", str(r / "file")], "is a file, not a folder"),
        ("demo", ["demo", *model, "--policies", ";;"], "no policy"),
        ("demo", ["demo", *model, "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
        ("testbed data", ["testbed", "data", "--image-size", "100000", "--out", str(r / "d")], "--image-size: must be in"),
        ("testbed data", ["testbed", "data", "--seed", "5000", "--out", str(r / "d")], "--seed: must be in 0..999"),
        ("testbed data", ["testbed", "data", "--n", "2", "--out", str(r / "stranger")], "not a testbed dataset"),
        ("testbed train", [*tb_train, "--lr", NAN], "--lr: must be a finite number"),
        ("testbed train", [*tb_train, "--minutes", NAN], "--minutes: must be a finite number"),
        ("testbed train", [*tb_train, "--batch-size", "0"], "--batch-size: must be >= 1"),
        ("testbed eval", ["testbed", "eval", "--model", str(r / "truncated")], "cannot load"),
        ("testbed eval", ["testbed", "eval", "--model", str(r / "llama")], "is not supported"),
        ("testbed eval", ["testbed", "eval", "--model", str(r / "bin-only")], "safetensors"),
        ("testbed eval", ["testbed", "eval", *model, "--batch-size", "0"], "--batch-size: must be >= 1"),
        ("testbed eval", ["testbed", "eval", *model, "--json", str(r)], "is a directory"),
        ("testbed eval", ["testbed", "eval", *model, "--seed", "5000"], "--seed: must be in 0..999"),
    ]


N_CASES = len(cases(Path("model"), Path("files")))


@pytest.mark.parametrize("index", range(N_CASES))
def test_refused_with_one_line(index, files, tiny_dir, capsys):
    (files / "dir.safetensors").mkdir(exist_ok=True)
    command, argv, fragment = cases(tiny_dir, files)[index]
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]  # (progress bars aside)
    assert rc == 2, (argv, err)
    assert len(lines) == 1 and lines[0].startswith("dyrate ") and ": error:" in lines[0], err
    assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in err


def test_decompression_bomb_is_one_line(files, tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the 40x40 test image is then a "bomb" (> 2x the limit)
    rc = main(["generate", "--model", str(tiny_dir), "--image", str(files / "img.png"), "--prompt", "hi"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "decompression-bomb limit" in err[0]


def test_a_request_larger_than_memory_is_refused_before_it_runs(tiny):
    from dyrate.api import check_request
    from dyrate.errors import InputError

    model = tiny[0]
    with pytest.raises(InputError, match=r"needs about [\d.]+ GiB .* more than the [\d.]+ GiB free"):
        check_request(model, batch=10**6, seq=10**4)
    check_request(model, batch=3, seq=200, num_beams=4)  # an ordinary request passes


def test_nothing_is_left_behind(files, tiny_dir):
    """The refused runs wrote no output folder, predictor, state or half dataset."""
    for name in ("e1", "e2", "e3", "e4", "e5", "d", "tb", "p.safetensors", "p.train-state.safetensors",
                 "stranger.partial", "a.png"):
        assert not (files / name).exists(), name
    assert [p.name for p in (files / "stranger").iterdir()] == ["notes.txt"]


def test_the_docs_table_counts_these_cases(files, tiny_dir):
    table = (Path(__file__).resolve().parent.parent / "docs" / "bad_inputs.md").read_text()
    documented = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\| `dyrate ([a-z -]+)` \| (\d+) \|", table, re.M)}
    counted = Counter(command for command, _, _ in cases(tiny_dir, files))
    counted["generate"] += 1  # the decompression bomb
    assert documented == dict(counted)
