"""Issue bar: CIDEr recomputed independently from samples.jsonl equals the reported one."""

import json
import shutil

import pytest

from dyrate.evaluation import EvalConfig, prepare, run_eval


@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer needs Java")
def test_cider_recomputed_from_samples_equals_summary(tmp_path, tiny):
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from dyrate.testbed.data import write_dataset

    write_dataset(tmp_path / "data", seed=11, n=4, image_size=32, progress=False)
    cfg = EvalConfig(task="caption", data=str(tmp_path / "data" / "captions.json"), policies="none;fastv:k=2,r=0.5",
                     out=str(tmp_path / "out"), max_new_tokens=8, progress=False)
    summary = run_eval(*tiny, prepare(cfg), log=None)
    coco = json.loads((tmp_path / "data" / "captions.json").read_text())
    refs: dict[int, list[str]] = {}
    for ann in coco["annotations"]:
        refs.setdefault(ann["image_id"], []).append(ann["caption"])
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    for policy in summary["policies"]:
        preds = {s["id"]: s["prediction"] for s in samples if s["policy"] == policy["policy"]}
        tok = PTBTokenizer()
        gts = tok.tokenize({i: [{"caption": c} for c in refs[i]] for i in preds})
        res = tok.tokenize({i: [{"caption": p}] for i, p in preds.items()})
        cider, _ = Cider().compute_score(gts, res)
        assert policy["metrics"]["CIDEr"] == pytest.approx(cider, abs=1e-9)
