"""`dyrate eval` never loses or mixes results: one writer per OUT, resumes only onto the same settings
and data, lines without a prediction are redone, every policy run into OUT stays in the summary,
and bad settings are refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dyrate.cli import main
from dyrate.errors import InputError
from dyrate.evaluation import EvalConfig, prepare, run_eval
from dyrate.evaluation.run_dir import RunLock


@pytest.fixture()
def vqa(tmp_path, images) -> Path:
    (tmp_path / "images").mkdir()
    for i, img in enumerate(images):
        img.save(tmp_path / "images" / f"img{i}.png")
    rows = [{"question_id": q, "image": f"img{q % 3}.png", "question": f"What is {q}?", "answers": ["noise"]}
            for q in range(4)]
    path = tmp_path / "vqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(out, data, **kw) -> EvalConfig:
    kw.setdefault("policies", ["none"])
    return EvalConfig(task="vqa", data=data, out=out, max_new_tokens=3, batch_size=2, progress=False, **kw)


def lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]


def test_a_second_writer_is_refused_while_the_first_holds_out(tmp_path, vqa, tiny, tiny_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    held = RunLock(out)
    assert held.acquire() is None  # another run is writing here
    try:
        with pytest.raises(InputError, match="another dyrate eval .* is writing to"):
            run_eval(*tiny, prepare(config(out, vqa)), log=None)
        rc = main(["eval", "--model", str(tiny_dir), "--task", "vqa", "--data", str(vqa), "--out", str(out), "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "another dyrate eval" in err[0]
        assert not (out / "samples.jsonl").exists()  # nothing was written
    finally:
        held.release()
    run_eval(*tiny, prepare(config(out, vqa)), log=None)  # free again: the run goes through
    assert len(lines(out)) == 4
    assert RunLock(out).acquire() is None  # and the finished run let go of it


def test_changed_data_at_the_same_path_is_refused(tmp_path, vqa, tiny):
    out = tmp_path / "out"
    run_eval(*tiny, prepare(config(out, vqa)), log=None)
    rows = [json.loads(x) for x in vqa.read_text().splitlines()]
    rows[0]["answers"] = ["something else"]  # regenerated: same path and ids, other answers
    vqa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(InputError, match="other settings or data .*data_sha256"):
        run_eval(*tiny, prepare(config(out, vqa)), log=None)


@pytest.mark.parametrize("damage", ["{not json", "[]", None])
def test_unreadable_or_missing_run_file_is_refused(tmp_path, vqa, tiny, damage):
    out = tmp_path / "out"
    run_eval(*tiny, prepare(config(out, vqa)), log=None)
    if damage is None:
        (out / "run.json").unlink()
        match = "holds samples but no run.json"
    else:
        (out / "run.json").write_text(damage)
        match = "cannot be read"
    with pytest.raises(InputError, match=match):
        run_eval(*tiny, prepare(config(out, vqa)), log=None)


def test_earlier_policies_stay_in_the_summary(tmp_path, vqa, tiny):
    out = tmp_path / "out"
    run_eval(*tiny, prepare(config(out, vqa, policies=["none"])), log=None)
    summary = run_eval(*tiny, prepare(config(out, vqa, policies=["fastv:k=2,r=0.5"])), log=None)
    assert [p["policy"] for p in summary["policies"]] == ["none", "fastv:k=2,r=0.5"]
    assert all(p["scored"] == 4 for p in summary["policies"])
    assert summary["baseline"] == "none" and summary["policies"][1]["relative"]
    assert json.loads((out / "run.json").read_text())["policies"] == ["none", "fastv:k=2,r=0.5"]


def test_lines_without_a_prediction_are_redone(tmp_path, vqa, tiny):
    out = tmp_path / "out"
    run_eval(*tiny, prepare(config(out, vqa)), log=None)
    good = lines(out)
    damaged = [{"id": good[0]["id"], "policy": "none"},  # the fields after the key were lost
               {**good[1], "prediction": None, "error": "image 'x' cannot be read"}, *good[2:]]
    (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in damaged))
    summary = run_eval(*tiny, prepare(config(out, vqa)), log=None)
    assert summary["policies"][0]["scored"] == 4 and summary["policies"][0]["errors"] == 0
    assert [s["prediction"] for s in lines(out)] == [s["prediction"] for s in good]


@pytest.mark.parametrize("decoding,match", [
    ({"do_sample": True, "temperature": float("nan")}, "temperature must be a finite number"),
    ({"do_sample": True, "temperature": float("inf")}, "temperature must be a finite number"),
    ({"do_sample": True, "top_p": 1.5}, "top_p must lie in"),
    ({"num_beams": 2, "length_penalty": float("nan")}, "length_penalty must be a finite number"),
])
def test_bad_decoding_is_refused_before_anything_is_written(tmp_path, vqa, decoding, match):
    with pytest.raises(InputError, match=match):
        config(tmp_path / "out", vqa, decoding=decoding)
    assert not (tmp_path / "out").exists()


def test_out_under_a_file_is_refused(tmp_path, vqa, tiny):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        run_eval(*tiny, prepare(config(tmp_path / "file" / "out", vqa)), log=None)
    with pytest.raises(InputError, match="is a file, not a folder"):
        run_eval(*tiny, prepare(config(tmp_path / "file", vqa)), log=None)
