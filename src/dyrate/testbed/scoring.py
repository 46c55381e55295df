"""Testbed-specific scoring: the objects a caption names against the scene's objects.

`SceneObjects` is the `dyrate.evaluation.CaptionTruth` of testbed data: `dyrate testbed data` writes
scenes.jsonl beside captions.json, and `dyrate eval` (or anyone building an `EvalConfig` with
`truth=SceneObjects()`) then reports object precision / recall / F1 beside CIDEr."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .language import object_f1, parse_caption, scene_objects
from .scenes import Scene

SCENES_FILE = "scenes.jsonl"


def object_metrics(pairs: Iterable[tuple[str, set]]) -> dict[str, float]:
    """Mean per-image precision / recall / F1 of the (size, colour, shape, position) objects
    `language.parse_caption` finds in each caption against the scene's objects."""
    scores = [object_f1(parse_caption(text), gold) for text, gold in pairs]
    if not scores:
        return {}
    n = len(scores)
    return {f"object_{k}": sum(s[k] for s in scores) / n for k in ("precision", "recall", "f1")}


class SceneObjects:
    """Caption truth from the scenes.jsonl next to a testbed caption file (image_id -> object set)."""

    def load(self, data_path: Path) -> tuple[Path, dict[str, Any]] | None:
        path = Path(data_path).parent / SCENES_FILE
        if not path.is_file():
            return None
        out = {}
        try:
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    d = json.loads(line)
                    out[str(d["image_id"])] = scene_objects(Scene.from_json(d))
        except (OSError, ValueError, KeyError, TypeError):
            return None  # not a testbed scenes file: no object metrics
        return path, out

    def score(self, pairs: list[tuple[str, Any]]) -> dict[str, float]:
        return object_metrics(pairs)
