"""Helpers of the dyrate testbed tasks for lmms-eval (referenced from the YAML files beside this one).

The rows come from the directory in the environment variable DYRATE_TESTBED_DATA, as written by
`dyrate testbed data --out DIR` (vqa.jsonl, pope_{random,popular,adversarial}.jsonl, images/).
The YAMLs point lmms-eval's loader at a one-line placeholder file; `process_docs` replaces it
with the real rows, so no dataset is fetched from a hub and the data directory needs no YAML edit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ENV = "DYRATE_TESTBED_DATA"


def data_dir() -> Path:
    value = os.environ.get(ENV, "").strip()
    if not value:
        raise RuntimeError(
            f"set {ENV} to a directory written by `dyrate testbed data --out DIR` to run the dyrate_testbed tasks"
        )
    path = Path(value).expanduser().resolve()
    if not path.is_dir():
        raise RuntimeError(f"{ENV}={value!r} is not a directory")
    return path


def _rows(name: str) -> list[dict]:
    import datasets  # noqa: F401  (lmms-eval's dependency)

    base = data_dir()
    path = base / name
    if not path.is_file():
        raise RuntimeError(f"{path} does not exist ({ENV} must hold the files `dyrate testbed data` writes)")
    rows = []
    with path.open() as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            image = Path(row["image"])
            if not image.is_absolute():
                image = next((c for c in (base / image, base / "images" / image) if c.is_file()), base / "images" / image)
            if not image.is_file():
                raise RuntimeError(f"{path}: image {row['image']!r} not found")
            row["image"] = str(image)
            rows.append(row)
    return rows


def _dataset(name: str):
    import datasets

    return datasets.Dataset.from_list(_rows(name))


def vqa_docs(_placeholder):
    rows = _rows("vqa.jsonl")
    for r in rows:
        r["answers"] = [a.get("answer") if isinstance(a, dict) else str(a) for a in r["answers"]]
        r["type"] = str(r.get("type", ""))
    import datasets

    return datasets.Dataset.from_list(rows)


def pope_random_docs(_placeholder):
    return _dataset("pope_random.jsonl")


def pope_popular_docs(_placeholder):
    return _dataset("pope_popular.jsonl")


def pope_adversarial_docs(_placeholder):
    return _dataset("pope_adversarial.jsonl")


def doc_to_visual(doc):
    from PIL import Image

    with Image.open(doc["image"]) as img:
        return [img.convert("RGB")]


def _wrap(text: str, kwargs) -> str:
    kwargs = kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{text}{kwargs.get('post_prompt', '')}"


def vqa_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return _wrap(doc["question"], lmms_eval_specific_kwargs)


def pope_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return _wrap(doc["text"], lmms_eval_specific_kwargs)


# ---------------------------------------------------------------- metrics (those of `dyrate eval`)


def vqa_process_results(doc, results):
    from dyrate.evaluation.metrics import exact_match, vqa_accuracy

    pred = results[0]
    return {"vqa_accuracy": vqa_accuracy(pred, doc["answers"]), "exact_match": exact_match(pred, doc["answers"])}


def pope_process_results(doc, results):
    item = {"question_id": doc["question_id"], "prediction": results[0], "label": doc["label"]}
    return {k: item for k in ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1", "pope_yes_ratio")}


def _pope(items, key):
    from dyrate.evaluation.metrics import pope_metrics

    return pope_metrics([i["prediction"] for i in items], [i["label"] for i in items])[key]


def pope_accuracy(items):
    return _pope(items, "accuracy")


def pope_precision(items):
    return _pope(items, "precision")


def pope_recall(items):
    return _pope(items, "recall")


def pope_f1(items):
    return _pope(items, "f1")


def pope_yes_ratio(items):
    return _pope(items, "yes_ratio")
