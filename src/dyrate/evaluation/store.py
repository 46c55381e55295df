"""The per-sample store of an evaluation run: JSONL files that make runs resumable and mergeable.

- `samples.jsonl` holds one line per (row id, policy). A single process appends to it directly;
  process `r` of a data-parallel run appends to `samples.rank{r}.jsonl` and the main process merges
  every shard into `samples.jsonl` at the end (`merge_samples`).
- Lines are flushed per batch. A killed run leaves at most one truncated last line per file:
  readers skip it, and `SampleWriter` cuts it off before appending, so the rerun redoes exactly the
  pairs that are not complete.
- A line without a prediction (an error, or a line cut short of its fields) does not finish its
  pair: a resume generates the pair again. Per pair, the first line with a prediction wins, else
  the last line; the others are dropped at merge.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from .datasets import row_key

SAMPLES = "samples.jsonl"
SHARD_GLOB = "samples.rank*.jsonl"


def shard_path(out: Path, process: int) -> Path:
    """Where process `process` of a data-parallel run appends (named after accelerate's process rank)."""
    return Path(out) / f"samples.rank{process}.jsonl"


def sample_key(sample: dict) -> tuple[str, str]:
    return row_key(sample["id"]), str(sample["policy"])


def read_samples(path: Path) -> Iterator[dict]:
    """Complete sample lines of a file, in order; truncated or corrupt lines are skipped."""
    path = Path(path)
    if not path.is_file():
        return
    with path.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # a truncated last line: the pair is redone
            try:
                sample = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(sample, dict) and "id" in sample and "policy" in sample:
                yield sample


def sample_files(out: Path) -> list[Path]:
    """samples.jsonl first, then the shard files in process order."""
    out = Path(out)
    shards = sorted(out.glob(SHARD_GLOB), key=lambda p: (len(p.name), p.name))
    return [out / SAMPLES, *shards]


def has_prediction(sample: dict) -> bool:
    """Does this sample finish its (id, policy) pair? (a prediction string and no error)"""
    return isinstance(sample.get("prediction"), str) and not sample.get("error")


def read_all(out: Path) -> dict[tuple[str, str], dict]:
    """Every complete sample of a run directory (main file and shards), one per pair: the first
    with a prediction, else the last line seen."""
    found: dict[tuple[str, str], dict] = {}
    for path in sample_files(out):
        for sample in read_samples(path):
            key = sample_key(sample)
            if key not in found or not has_prediction(found[key]):
                found[key] = sample
    return found


def repair_tail(path: Path) -> int:
    """Cut a truncated last line off `path` (so appends start on a fresh line). Returns bytes cut."""
    path = Path(path)
    if not path.is_file():
        return 0
    with path.open("rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # Walk back to the last newline.
        pos = size - 1
        chunk = 4096
        keep = 0
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            data = f.read(pos - start)
            idx = data.rfind(b"\n")
            if idx >= 0:
                keep = start + idx + 1
                break
            pos = start
        f.truncate(keep)
        return size - keep


class SampleWriter:
    """Appends sample lines to one file; `flush()` after each batch."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(self.path)
        self._f = self.path.open("a", encoding="utf-8")

    def write(self, sample: dict) -> None:
        self._f.write(json.dumps(sample, ensure_ascii=False) + "\n")

    def flush(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def merge_samples(out: Path, order: Iterable[tuple[str, str]] = ()) -> list[dict]:
    """Merge samples.jsonl and every shard of `out` into samples.jsonl (written atomically), one line
    per (id, policy), then delete the shards. Lines are sorted by `order` (a sequence of (row key,
    policy) pairs: the run's rows x policies); pairs not in it follow in the order found.
    Returns the merged samples."""
    out = Path(out)
    files = sample_files(out)
    found = read_all(out)
    position = {pair: i for i, pair in enumerate(order)}
    found_order = {pair: i for i, pair in enumerate(found)}
    merged = sorted(found.values(), key=lambda s: (position.get(sample_key(s), len(position)), found_order[sample_key(s)]))
    tmp = out / (SAMPLES + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for s in merged:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / SAMPLES)
    for shard in files[1:]:
        shard.unlink(missing_ok=True)
    return merged


def shard_rows(items: list[Any], process: int, world_size: int) -> list[Any]:
    """The items process `process` of `world_size` handles: every world_size-th, starting at `process`."""
    if world_size < 1 or not 0 <= process < world_size:
        raise ValueError(f"bad process index {process} of {world_size}")
    return items[process::world_size]
