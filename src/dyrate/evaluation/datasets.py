"""Evaluation datasets: COCO caption JSON, VQA-style JSONL, POPE JSONL -> a list of `Row`s.

Only the file is read here; images stay on disk (their existence is checked, they are decoded
batch by batch by the runner). A row that cannot be used (a missing field, a missing image, a
line that is not JSON, a duplicate id) becomes one line in `Dataset.bad` and is skipped; a file
that cannot be read at all raises `InputError`.

Image paths are resolved, in order: absolute paths as they are; with `images_dir`, relative to
it; otherwise relative to the data file's folder, then to its `images/` sub-folder (the layout
`dyrate testbed data` writes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import InputError

TASKS = ("caption", "vqa", "pope")
DEFAULT_FILES = {"caption": "captions.json", "vqa": "vqa.jsonl"}
DEFAULT_CAPTION_PROMPT = "describe the image."
DEFAULT_MAX_NEW_TOKENS = {"caption": 64, "vqa": 10, "pope": 5}


@dataclass
class Row:
    """One evaluation item: what to ask about which image and what counts as right."""

    id: Any  # image_id (captions) or question_id (VQA, POPE), as in the file
    image: Path
    question: str | None = None  # VQA / POPE question text; None for captions
    references: list[str] = field(default_factory=list)  # captions or VQA answers
    label: str | None = None  # POPE: 'yes' | 'no'
    type: str | None = None  # VQA question type, if the file has one
    truth: Any = None  # captions: per-image ground truth from a `CaptionTruth` (e.g. the testbed scene's objects)

    @property
    def key(self) -> str:
        return row_key(self.id)


def row_key(row_id: Any) -> str:
    """The id as a string: how samples are matched to rows on resume and merge."""
    return str(row_id)


@dataclass
class Dataset:
    task: str
    path: Path
    rows: list[Row]
    bad: list[str]  # one message per skipped row
    n_read: int  # records looked at (rows + bad)
    limit_reached: bool = False
    truth_file: Path | None = None  # where the rows' `truth` came from (a `CaptionTruth`'s file)


class CaptionTruth(Protocol):
    """Ground truth about each image beside a caption file, and the metrics it gives: how data sets
    with more than reference captions add their own scores without this package knowing them
    (the testbed's scene objects and object F1: `dyrate.testbed.scoring.SceneObjects`)."""

    def load(self, data_path: Path) -> tuple[Path, dict[str, Any]] | None:
        """(file read, row key -> truth) for the caption file at `data_path`; None if it has none."""

    def score(self, pairs: list[tuple[str, Any]]) -> dict[str, float]:
        """Metrics over (predicted caption, truth) pairs."""


def resolve_data_path(task: str, path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        name = DEFAULT_FILES.get(task)
        if name and (path / name).is_file():
            return path / name
        found = sorted(p.name for p in path.glob("*.json*"))
        raise InputError(
            f"{path} is a directory; give the {task} data file itself"
            + (f" (found: {', '.join(found)})" if found else "")
        )
    if not path.is_file():
        raise InputError(f"data file {str(path)!r} does not exist")
    return path


def load_dataset(
    task: str, path: str | Path, images_dir: str | Path | None = None, limit: int | None = None,
    truth: CaptionTruth | None = None,
) -> Dataset:
    """Read a dataset file; the first `limit` usable rows (bad rows on the way are reported, not counted).
    truth: where caption rows get their per-image ground truth (`Row.truth`), if anywhere."""
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    path = resolve_data_path(task, path)
    if images_dir is not None:
        images_dir = Path(images_dir)
        if not images_dir.is_dir():
            raise InputError(f"images directory {str(images_dir)!r} does not exist")
    resolver = _ImageResolver(path.parent, images_dir)
    if task == "caption":
        records = _caption_records(path)
        truth_file, truths = (truth.load(path) if truth is not None else None) or (None, None)
    else:
        records = _jsonl_records(path)
        truth_file, truths = None, None
    make = {"caption": _caption_row, "vqa": _vqa_row, "pope": _pope_row}[task]
    rows: list[Row] = []
    bad: list[str] = []
    seen: set[str] = set()
    n_read = 0
    limit_reached = False
    for where, record in records:
        if limit is not None and len(rows) >= limit:
            limit_reached = True
            break
        n_read += 1
        try:
            if isinstance(record, _Bad):
                raise _RowError(record.message)
            if not isinstance(record, dict):
                raise _RowError(f"expected a JSON object, got {type(record).__name__}")
            row = make(record, resolver)
            if row.key in seen:
                raise _RowError(f"duplicate id {row.id!r}")
            if truths is not None:
                row.truth = truths.get(row.key)
        except _RowError as err:
            bad.append(f"{path.name}:{where}: {err}")
            continue
        seen.add(row.key)
        rows.append(row)
    if not rows:
        detail = f"; first problem: {bad[0]}" if bad else ""
        raise InputError(f"{path}: no usable {task} rows ({len(bad)} bad){detail}")
    used = truth_file if truths is not None and any(r.truth is not None for r in rows) else None
    return Dataset(task, path, rows, bad, n_read, limit_reached, used)


class _RowError(Exception):
    pass


@dataclass
class _Bad:
    message: str


class _ImageResolver:
    def __init__(self, base: Path, images_dir: Path | None):
        self.base, self.images_dir = base, images_dir

    def __call__(self, name: Any) -> Path:
        if not isinstance(name, str) or not name.strip():
            raise _RowError(f"bad image field {name!r}")
        p = Path(name)
        if p.is_absolute():
            candidates = [p]
        elif self.images_dir is not None:
            candidates = [self.images_dir / p]
        else:
            candidates = [self.base / p, self.base / "images" / p]
        for c in candidates:
            if c.is_file():
                return c
        raise _RowError(f"image {name!r} not found (looked in {', '.join(str(c.parent) for c in candidates)})")


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the file ({err.__class__.__name__}: {err})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None


def _jsonl_records(path: Path):
    """(line number, parsed object or _Bad) per non-empty line. A file none of whose lines is JSON
    (or that cannot be decoded at all) raises InputError."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the file as UTF-8 text ({err.__class__.__name__})") from None
    out = []
    good = 0
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"line {i}", json.loads(line)))
            good += 1
        except json.JSONDecodeError as err:
            out.append((f"line {i}", _Bad(f"not valid JSON ({err.msg})")))
    if not good:
        raise InputError(f"{path}: no line is a JSON object (expected JSONL, one record per line)")
    return out


def _caption_records(path: Path):
    data = _read_json(path)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise InputError(f"{path}: not a COCO caption file (needs 'images' and 'annotations' lists)")
    refs: dict[str, list[str]] = {}
    for ann in data["annotations"]:
        if isinstance(ann, dict) and isinstance(ann.get("caption"), str) and "image_id" in ann:
            refs.setdefault(row_key(ann["image_id"]), []).append(ann["caption"])
    out = []
    for i, img in enumerate(data["images"]):
        if isinstance(img, dict) and "id" in img:
            img = {**img, "_refs": refs.get(row_key(img["id"]), [])}
        out.append((f"images[{i}]", img))
    return out


def _need(record: dict, name: str, kind=str) -> Any:
    if name not in record:
        raise _RowError(f"missing field {name!r}")
    value = record[name]
    if not isinstance(value, kind) or (isinstance(value, str) and not value.strip()):
        raise _RowError(f"bad field {name!r}: {value!r}")
    return value


def _id(record: dict, name: str) -> Any:
    if name not in record:
        raise _RowError(f"missing field {name!r}")
    value = record[name]
    if not isinstance(value, (int, str)) or isinstance(value, bool):
        raise _RowError(f"bad field {name!r}: {value!r}")
    return value


def _caption_row(record: dict, resolve) -> Row:
    row_id = _id(record, "id")
    if not record["_refs"]:
        raise _RowError(f"image id {row_id!r} has no reference caption")
    return Row(row_id, resolve(_need(record, "file_name")), references=list(record["_refs"]))


def _vqa_row(record: dict, resolve) -> Row:
    row_id = _id(record, "question_id")
    question = _need(record, "question")
    if "answers" in record:
        answers = record["answers"]
        if not isinstance(answers, list):
            raise _RowError(f"bad field 'answers': {answers!r}")
        # VQA v2 annotations hold {"answer": ...} dicts; plain strings are fine too.
        answers = [a.get("answer") if isinstance(a, dict) else a for a in answers]
        if not answers or not all(isinstance(a, str) for a in answers):
            raise _RowError(f"bad field 'answers': {record['answers']!r}")
    elif "answer" in record:
        answers = [_need(record, "answer")]
    else:
        raise _RowError("missing field 'answers'")
    qtype = record.get("type", record.get("question_type"))
    return Row(
        row_id,
        resolve(_need(record, "image")),
        question=question,
        references=answers,
        type=None if qtype is None else str(qtype),
    )


def _pope_row(record: dict, resolve) -> Row:
    row_id = _id(record, "question_id")
    text = record.get("text", record.get("question"))
    if not isinstance(text, str) or not text.strip():
        raise _RowError("missing field 'text' (the question)")
    label = _need(record, "label").strip().lower()
    if label not in ("yes", "no"):
        raise _RowError(f"label must be 'yes' or 'no', got {record['label']!r}")
    return Row(row_id, resolve(_need(record, "image")), question=text, label=label)


def training_samples(folder: str | Path, n: int) -> list:
    """Up to n rate-predictor training samples (`dyrate.learn.Sample`) from a `dyrate testbed data`-style
    folder: vqa.jsonl, pope_*.jsonl and captions.json, whichever exist (questions first). The answer is
    the first VQA answer, the POPE label or the first reference caption."""
    from ..learn import Sample

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--data {str(folder)!r} is not a directory")
    files = [("vqa", folder / "vqa.jsonl"), *[("pope", f) for f in sorted(folder.glob("pope_*.jsonl"))],
             ("caption", folder / "captions.json")]
    out: list = []
    for task, path in files:
        if not path.is_file() or len(out) >= n:
            continue
        for row in load_dataset(task, path, None, n - len(out)).rows:
            answer = row.label if task == "pope" else row.references[0]
            out.append(Sample(row.image, row.question or DEFAULT_CAPTION_PROMPT, answer))
    if not out:
        raise InputError(f"--data {str(folder)!r}: no vqa.jsonl, pope_*.jsonl or captions.json rows")
    return out
