"""research/fastv_prompt_oracle.py: the per-prompt FastV oracle read off an eval run's samples."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "research" / "fastv_prompt_oracle.py"


def test_prompt_oracle(tmp_path, monkeypatch, capsys):
    run, data = tmp_path / "run", tmp_path / "data"
    (run / "captions").mkdir(parents=True)
    data.mkdir()
    answers = {  # row -> answer under none, r=0.5, r=0.9
        0: ("a", "a", "a"),   # both rates keep the answer -> 0.9 -> ceil(0.1 * 144) = 15 tokens
        1: ("b", "b", "x"),   # 0.9 changes it -> 0.5 -> 72 tokens
        2: ("c", "x", "c"),   # 0.5 changes it: 0.9 does not count (smaller rates must hold too) -> all 144
    }
    rows = []
    for rid, (none, r5, r9) in answers.items():
        for policy, pred in (("none", none), ("fastv:k=2,r=0.5", r5), ("fastv:k=2,r=0.9", r9)):
            rows.append(json.dumps({"id": rid, "policy": policy, "prediction": pred}))
    (run / "captions" / "samples.jsonl").write_text("\n".join(rows) + "\n")
    (data / "scenes.jsonl").write_text("\n".join(json.dumps({"image_id": i, "objects": [{}] * (i + 1)})
                                                 for i in range(3)) + "\n")
    monkeypatch.setattr(sys, "argv", ["x", "--run", str(run), "--data", str(data)])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    out = capsys.readouterr().out
    mean = (15 + 72 + 144) / 3 / 144 * 100
    assert f"captions: 3 rows, mean kept {mean:.1f}%" in out
    assert "[(0.0, 1), (0.5, 1), (0.9, 1)]" in out
    assert "1: 10.4% (1), 2: 50.0% (1), 3: 100.0% (1)" in out
