"""Helpers shared by the CLI commands."""

from __future__ import annotations

import sys

DEFAULT_MODEL_NOTE = (
    "note: no --model given: using a tiny random-weight LLaVA built in code (the trained testbed "
    "model is not shipped yet), so its text is gibberish; pruning, traces and FLOPs are real"
)


def load_model(path: str | None, quiet: bool = False):
    """Load `path`, or the built-in default model when no path is given."""
    from ..api import load

    if path is None:
        from ..tiny import tiny_model

        if not quiet:
            print(DEFAULT_MODEL_NOTE, file=sys.stderr)
        return tiny_model(seed=0)
    return load(path)
