"""`dyrate eval`: datasets and bad rows, the sample store, resume after a crash, data-parallel
sharding and merging, the CLI end to end on the tiny checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dyrate.cli import main
from dyrate.errors import InputError, PolicySpecError
from dyrate.evaluation import EvalConfig, load_dataset, prepare, run_eval
from dyrate.evaluation import store as S
from dyrate.testbed.scoring import SceneObjects

POLICIES = ["none", "fastv:k=2,r=0.5"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, images):
    """A hand-made dataset: 3 images, COCO captions, VQA and POPE JSONL (images in images/)."""
    root = tmp_path_factory.mktemp("evaldata")
    (root / "images").mkdir()
    names = []
    for i, img in enumerate(images):
        names.append(f"img{i}.png")
        img.save(root / "images" / names[-1])
    coco = {
        "images": [{"id": 10 + i, "file_name": n} for i, n in enumerate(names)],
        "annotations": [
            {"id": k, "image_id": 10 + i, "caption": c}
            for k, (i, c) in enumerate(
                [
                    (0, "a noisy picture"),
                    (0, "random colours"),
                    (1, "noise everywhere"),
                    (1, "a colourful mess"),
                    (2, "pixels of many colours"),
                    (2, "static noise"),
                ]
            )
        ],
    }
    (root / "captions.json").write_text(json.dumps(coco))
    vqa = [
        {
            "question_id": q,
            "image": names[q % 3],
            "question": f"What is {q}?",
            "answers": ["noise", "static"],
            "type": "what" if q % 2 else "which",
        }
        for q in range(5)
    ]
    _jsonl(root / "vqa.jsonl", vqa)
    pope = [
        {"question_id": q, "image": names[q % 3], "text": "Is there a cat?", "label": "yes" if q % 2 else "no"}
        for q in range(6)
    ]
    _jsonl(root / "pope.jsonl", pope)
    return root


def _jsonl(path: Path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def _config(out, data, task="vqa", **kw) -> EvalConfig:
    kw.setdefault("policies", POLICIES)
    kw.setdefault("max_new_tokens", 4)
    kw.setdefault("batch_size", 2)
    kw.setdefault("progress", False)
    return EvalConfig(task=task, data=data, out=out, **kw)


def _rows(out: Path) -> list[dict]:
    """samples.jsonl without the timing field, as a list."""
    lines = (Path(out) / "samples.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "latency_s"} for line in lines]


def _as_set(rows):
    return {json.dumps(r, sort_keys=True) for r in rows}


# ---------------------------------------------------------------- datasets


def test_datasets_read_all_formats(data_dir):
    cap = load_dataset("caption", data_dir / "captions.json")
    assert [r.id for r in cap.rows] == [10, 11, 12] and cap.bad == []
    assert cap.rows[0].references == ["a noisy picture", "random colours"]
    assert cap.rows[0].image == data_dir / "images" / "img0.png"  # found in the images/ sub-folder
    vqa = load_dataset("vqa", data_dir, limit=3)  # a folder means its vqa.jsonl
    assert [r.id for r in vqa.rows] == [0, 1, 2] and vqa.limit_reached
    assert vqa.rows[1].type == "what" and vqa.rows[1].references == ["noise", "static"]
    pope = load_dataset("pope", data_dir / "pope.jsonl", images_dir=data_dir / "images")
    assert [r.label for r in pope.rows] == ["no", "yes"] * 3


def test_bad_rows_are_reported_skipped_and_counted(tmp_path, data_dir, tiny, capsys):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    shutil.copy(data_dir / "images" / "img0.png", tmp_path / "ok.png")
    _jsonl(
        tmp_path / "pope.jsonl",
        [
            {"question_id": 1, "image": "ok.png", "text": "Is there a cat?", "label": "yes"},
            {"question_id": 2, "image": "missing.png", "text": "Is there a cat?", "label": "no"},
            {"question_id": 3, "image": "ok.png", "label": "no"},
            "{this is not json",
            {"question_id": 1, "image": "ok.png", "text": "Is there a dog?", "label": "no"},
            {"question_id": 5, "image": "ok.png", "text": "Is there a dog?", "label": "maybe"},
            {"question_id": 6, "image": "broken.png", "text": "Is there a dog?", "label": "no"},
            {"question_id": 7, "image": "ok.png", "text": "Is there a dog?", "label": "No"},
        ],
    )
    ds = load_dataset("pope", tmp_path / "pope.jsonl")
    assert [r.id for r in ds.rows] == [1, 6, 7]
    assert len(ds.bad) == 5
    joined = "\n".join(ds.bad)
    for needle in (
        "line 2: image 'missing.png' not found",
        "line 3: missing field 'text'",
        "line 4: not valid JSON",
        "line 5: duplicate id 1",
        "line 6: label must be 'yes' or 'no'",
    ):
        assert needle in joined

    model, processor = tiny
    summary = run_eval(model, processor, prepare(_config(tmp_path / "out", tmp_path / "pope.jsonl", task="pope")))
    err = capsys.readouterr().err
    assert err.count("skipped row: pope.jsonl:line") == 5
    assert "row 6: image" in err and "cannot be read" in err  # the unreadable image, reported once
    log = (tmp_path / "out" / "eval.log").read_text()
    assert log.count("skipped row") == 5 and "row 6" in log
    assert summary["rows"] == {"evaluated": 3, "skipped": 5, "read": 8, "limit": None}
    for p in summary["policies"]:
        assert (p["scored"], p["errors"], p["skipped"], p["missing"]) == (2, 1, 5, 0)
    errors = [r for r in _rows(tmp_path / "out") if r["error"]]
    assert {(r["id"], r["policy"]) for r in errors} == {(6, p) for p in POLICIES}
    assert all(r["prediction"] is None for r in errors)


@pytest.mark.parametrize(
    "content, task, message",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary", "vqa", "cannot read the file as UTF-8"),
        (b"just some words\nand more", "pope", "no line is a JSON object"),
        (b'{"images": []', "caption", "not valid JSON"),
        (b'{"annotations": []}', "caption", "not a COCO caption file"),
        (b'{"question_id": 1, "question": "q?", "answers": ["a"], "image": "nope.png"}\n', "vqa", "no usable vqa rows"),
    ],
)
def test_unreadable_dataset_is_one_line_and_exit_2(tmp_path, capsys, content, task, message):
    path = tmp_path / "data.file"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        load_dataset(task, path)
    rc = main(["eval", "--task", task, "--data", str(path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("dyrate eval: error:") and message in err[0]
    assert not (tmp_path / "out").exists()  # nothing is loaded or written before the data is checked


def test_cli_bad_policy_and_missing_file(tmp_path, capsys, data_dir):
    rc = main(["eval", "--task", "vqa", "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    rc = main(
        [
            "eval",
            "--task",
            "vqa",
            "--data",
            str(data_dir / "vqa.jsonl"),
            "--policies",
            "none;bogus:k=1",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 2 and "unknown policy 'bogus'" in capsys.readouterr().err
    with pytest.raises(PolicySpecError):
        prepare(_config(tmp_path / "o", data_dir / "vqa.jsonl", policies=["fastv:k=0"]))


# ---------------------------------------------------------------- the store


def test_repair_tail_and_read_samples(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"id": 1, "policy": "none"}\n{"id": 2, "policy": "none"}\n{"id": 3, "pol')
    assert [s["id"] for s in S.read_samples(path)] == [1, 2]
    assert S.repair_tail(path) == len('{"id": 3, "pol')
    assert path.read_text().endswith('"none"}\n') and S.repair_tail(path) == 0
    path.write_text('{"id": 3, "p')  # a single truncated line
    S.repair_tail(path)
    assert path.read_text() == ""


def test_merge_samples_dedupes_orders_and_removes_shards(tmp_path):
    line = lambda i, p, x="": json.dumps({"id": i, "policy": p, "prediction": x}) + "\n"  # noqa: E731
    (tmp_path / "samples.jsonl").write_text(line(2, "none", "main") + line(1, "none"))
    (tmp_path / "samples.rank0.jsonl").write_text(line(2, "none", "dup") + line(1, "vtw:k=2") + '{"id": 9')
    (tmp_path / "samples.rank1.jsonl").write_text(line(0, "none") + line(0, "vtw:k=2") + line(99, "none"))
    order = [(str(i), p) for i in range(3) for p in ("none", "vtw:k=2")]
    merged = S.merge_samples(tmp_path, order)
    assert [(s["id"], s["policy"]) for s in merged] == [
        (0, "none"),
        (0, "vtw:k=2"),
        (1, "none"),
        (1, "vtw:k=2"),
        (2, "none"),
        (99, "none"),
    ]
    assert merged[4]["prediction"] == "main"  # the first line of a pair wins
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.jsonl"]
    assert [json.loads(x)["id"] for x in (tmp_path / "samples.jsonl").read_text().splitlines()] == [0, 0, 1, 1, 2, 99]


def test_shard_rows_partition():
    items = list(range(7))
    shards = [S.shard_rows(items, r, 3) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(shards, [])) == items
    with pytest.raises(ValueError):
        S.shard_rows(items, 3, 3)


# ---------------------------------------------------------------- running and resuming


def test_caption_run_on_testbed_data(tmp_path, tiny):
    from dyrate.testbed.data import write_dataset

    write_dataset(tmp_path / "data", seed=7, n=3, image_size=32, progress=False)
    model, processor = tiny
    cfg = _config(
        tmp_path / "out",
        tmp_path / "data" / "captions.json",
        task="caption",
        policies="none;fastv:k=2,r=0.5;vtw:k=2",
        max_new_tokens=6,
        truth=SceneObjects(),
    )
    summary = run_eval(model, processor, prepare(cfg), log=None)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == [
        "pareto.png",
        "run.json",
        "samples.jsonl",
        "summary.json",
        "summary.md",
    ]
    rows = _rows(out)
    assert len(rows) == 9 and [r["policy"] for r in rows[:3]] == ["none", "fastv:k=2,r=0.5", "vtw:k=2"]
    first = rows[0]
    assert set(first) == {"id", "policy", "mode", "prediction", "n_tokens", "retained", "kv_bytes", "flops", "error"}
    assert first["flops"]["prefill"]["ratio"] == 1.0 and first["retained"] == 1.0
    by_policy = {p["policy"]: p for p in summary["policies"]}
    assert set(by_policy["none"]["metrics"]) >= {"object_f1", "object_precision", "object_recall"}
    if shutil.which("java"):
        assert set(by_policy["none"]["metrics"]) >= {"CIDEr", "BLEU-4", "ROUGE-L"}
    assert summary["baseline"] == "none" and summary["truth"].endswith("scenes.jsonl")
    assert by_policy["vtw:k=2"]["retained"] == 0.0 and by_policy["fastv:k=2,r=0.5"]["retained"] == 0.5
    for conv in ("prefill", "cached", "nocache"):
        assert by_policy["none"]["flops"][conv]["ratio"] == 1.0
        assert by_policy["vtw:k=2"]["flops"][conv]["ratio"] < by_policy["fastv:k=2,r=0.5"]["flops"][conv]["ratio"] < 1
    assert json.loads((out / "summary.json").read_text())["policies"][0]["policy"] == "none"
    md = (out / "summary.md").read_text()
    assert "| `vtw:k=2` |" in md and "FLOPs prefill %" in md and "CIDEr / none" in md
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"


class _Crash(Exception):
    pass


def test_resume_after_crash_and_truncated_line(tmp_path, data_dir, tiny, monkeypatch):
    import dyrate.api

    model, processor = tiny
    data = data_dir / "vqa.jsonl"
    full = run_eval(model, processor, prepare(_config(tmp_path / "full", data)), log=None)
    reference = _rows(tmp_path / "full")
    assert len(reference) == 5 * 2

    # Crash after the first batch (2 rows x 2 policies), then cut the last line in half, as a kill
    # in the middle of a write would.
    def crash(batch, done):
        raise _Crash

    with pytest.raises(_Crash):
        run_eval(model, processor, prepare(_config(tmp_path / "run", data)), log=None, on_batch=crash)
    samples = tmp_path / "run" / "samples.jsonl"
    text = samples.read_text()
    assert len(text.splitlines()) == 4 and not (tmp_path / "run" / "summary.json").exists()
    samples.write_text(text[: -len(text.splitlines()[-1]) // 2 - 1])

    calls = []
    real = dyrate.api.generate

    def counting(model_, processor_, images_, prompts_, **kw):
        if "policy" in kw:  # not the untimed warm-up call (the runner hands in Policy objects, parsed once)
            calls.append((len(prompts_), kw["policy"].spec()))
        return real(model_, processor_, images_, prompts_, **kw)

    monkeypatch.setattr(dyrate.api, "generate", counting)
    resumed = run_eval(model, processor, prepare(_config(tmp_path / "run", data)), log=None)
    rows = _rows(tmp_path / "run")
    assert len(rows) == len({(r["id"], r["policy"]) for r in rows}) == 10  # no duplicates
    assert _as_set(rows) == _as_set(reference)
    assert sum(n for n, _ in calls) == 10 - 3  # only the missing pairs were generated
    strip = lambda s: [{k: v for k, v in p.items() if k != "latency_s"} for p in s["policies"]]  # noqa: E731
    assert strip(resumed) == strip(full)

    # Nothing left to do: a rerun generates nothing; a new policy generates only its own pairs.
    calls.clear()
    run_eval(model, processor, prepare(_config(tmp_path / "run", data)), log=None)
    assert calls == []
    run_eval(model, processor, prepare(_config(tmp_path / "run", data, policies=POLICIES + ["vtw:k=2"])), log=None)
    assert {p for _, p in calls} == {"vtw:k=2"} and sum(n for n, _ in calls) == 5
    assert len(_rows(tmp_path / "run")) == 15


def test_resume_refuses_other_settings(tmp_path, data_dir, tiny):
    model, processor = tiny
    run_eval(model, processor, prepare(_config(tmp_path / "o", data_dir / "vqa.jsonl", limit=1)), log=None)
    with pytest.raises(InputError, match="other settings .*mode: 'evict' -> 'mask'"):
        run_eval(
            model, processor, prepare(_config(tmp_path / "o", data_dir / "vqa.jsonl", limit=1, mode="mask")), log=None
        )
    # --limit may grow: the first row is kept, the others are added.
    run_eval(model, processor, prepare(_config(tmp_path / "o", data_dir / "vqa.jsonl", limit=3)), log=None)
    assert len(_rows(tmp_path / "o")) == 6


class _FakeState:
    """Rank r of n without real processes: the barrier is a no-op, so ranks run one after another."""

    def __init__(self, rank, n):
        self.process_index, self.num_processes = rank, n
        self.is_main_process = rank == 0

    def wait_for_everyone(self):
        pass


def test_sharded_run_equals_single_run(tmp_path, data_dir, tiny):
    model, processor = tiny
    data = data_dir / "pope.jsonl"
    single = run_eval(model, processor, prepare(_config(tmp_path / "one", data, task="pope")), log=None)
    out = tmp_path / "two"
    # Rank 1 first: it writes its shard and returns None; rank 0 then merges both and scores.
    assert (
        run_eval(model, processor, prepare(_config(out, data, task="pope")), state=_FakeState(1, 2), log=None) is None
    )
    assert [json.loads(x)["id"] for x in (out / "samples.rank1.jsonl").read_text().splitlines()] == [1, 3, 1, 3, 5, 5]
    two = run_eval(model, processor, prepare(_config(out, data, task="pope")), state=_FakeState(0, 2), log=None)
    assert not list(out.glob("samples.rank*"))
    assert _rows(out) == _rows(tmp_path / "one")  # same lines, same order after the merge
    strip = lambda s: [{k: v for k, v in p.items() if k != "latency_s"} for p in s["policies"]]  # noqa: E731
    assert strip(two) == strip(single) and two["processes"] == 2


# ---------------------------------------------------------------- the CLI


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for needle in (
        "--policies",
        "--task {caption,vqa,pope}",
        "--limit",
        "--batch-size",
        "--max-new-tokens",
        "--mode {evict,mask}",
        "--images",
        "--prompt",
        "--suffix",
        "samples.jsonl",
        "accelerate launch",
    ):
        assert needle in out


def test_cli_end_to_end(tmp_path, tiny_dir, data_dir, capsys):
    argv = [
        "eval",
        "--model",
        str(tiny_dir),
        "--task",
        "pope",
        "--data",
        str(data_dir / "pope.jsonl"),
        "--policies",
        "none; fastv:k=2,r=0.5 ;vtw:k=2",
        "--limit",
        "4",
        "--batch-size",
        "3",
        "--max-new-tokens",
        "3",
        "--suffix",
        "Answer yes or no.",
        "--out",
        str(tmp_path / "out"),
        "--quiet",
    ]
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert "| `fastv:k=2,r=0.5` |" in cap.out and "F1 / none" in cap.out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rows"]["evaluated"] == 4 and summary["suffix"] == "Answer yes or no."
    assert [p["scored"] for p in summary["policies"]] == [4, 4, 4]
    assert len(_rows(tmp_path / "out")) == 12
    assert main(argv) == 0  # a finished run reruns as a no-op with the same result
    assert len(_rows(tmp_path / "out")) == 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_two_processes_equal_one(tmp_path, tiny_dir, data_dir):
    """A real 2-process run (accelerate launch, gloo on CPU) gives the samples and metrics of 1 process."""
    accelerate = Path(sys.executable).parent / "accelerate"
    if not accelerate.exists():
        pytest.skip("accelerate launcher not installed")
    common = [
        "-m",
        "dyrate",
        "eval",
        "--model",
        str(tiny_dir),
        "--task",
        "vqa",
        "--data",
        str(data_dir / "vqa.jsonl"),
        "--policies",
        "none;fastv:k=2,r=0.5",
        "--max-new-tokens",
        "3",
        "--batch-size",
        "2",
        "--quiet",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launch = [
        str(accelerate),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
    ]
    two = subprocess.run(
        launch + common + ["--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=120
    )
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run(
        [sys.executable] + common + ["--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    assert _rows(tmp_path / "two") == _rows(tmp_path / "one")
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert (s1["processes"], s2["processes"]) == (1, 2)
    strip = lambda s: [{k: v for k, v in p.items() if k != "latency_s"} for p in s["policies"]]  # noqa: E731
    assert strip(s1) == strip(s2)
    assert not list((tmp_path / "two").glob("samples.rank*"))


def test_cli_decoding_options(tmp_path, tiny_dir, tiny, data_dir, capsys):
    """--num-beams / --do-sample reach generate: the predictions equal dyrate.generate with the same
    options; sampling flags without --do-sample are refused with one line."""
    from dyrate.api import generate, read_image

    base = ["eval", "--model", str(tiny_dir), "--task", "vqa", "--data", str(data_dir / "vqa.jsonl"),
            "--policies", "fastv:k=2,r=0.5", "--limit", "2", "--max-new-tokens", "4", "--quiet"]
    model, processor = tiny
    rows = load_dataset("vqa", data_dir / "vqa.jsonl", limit=2).rows
    for flags, opts in ((["--num-beams", "2"], dict(num_beams=2)),
                        (["--do-sample", "--top-p", "0.8", "--seed", "5"], dict(do_sample=True, top_p=0.8, seed=5))):
        out = tmp_path / flags[0].strip("-")
        assert main([*base, *flags, "--out", str(out)]) == 0
        got = {r["id"]: r["prediction"] for r in _rows(out)}
        want = generate(model, processor, [read_image(r.image) for r in rows], [r.question for r in rows],
                        policy="fastv:k=2,r=0.5", max_new_tokens=4, **opts)
        assert got == {r.id: w.text for r, w in zip(rows, want)}
        assert json.loads((out / "summary.json").read_text())["decoding"] == {**({"seed": 0} if "do_sample" in opts else {}), **opts}
    capsys.readouterr()
    assert main([*base, "--top-p", "0.8", "--out", str(tmp_path / "bad")]) == 2
    assert "--top-p needs --do-sample" in capsys.readouterr().err
