"""Helpers shared by the CLI commands."""

from __future__ import annotations

import sys

DEFAULT_MODEL_NOTE = (
    "note: no --model given: using a tiny random-weight LLaVA built in code (the trained testbed "
    "model is not shipped yet), so its text is gibberish; pruning, traces and FLOPs are real"
)


DTYPES = ("auto", "float32", "float16", "bfloat16")


def add_model_arguments(p) -> None:
    p.add_argument("--model", default=None, help="local HF LLaVA checkpoint directory (default: the built-in model)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="weights dtype (default: as saved)")


def load_model(path: str | None, quiet: bool = False, device: str | None = None, dtype: str = "auto"):
    """Load `path`, or the built-in default model when no path is given, onto `device`."""
    import torch

    from ..api import load
    from ..errors import InputError

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        torch.empty(0, device=device)
    except (RuntimeError, ValueError) as err:
        raise InputError(f"device {device!r} is not usable here ({str(err).splitlines()[0]})") from None
    torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
    if path is None:
        from ..tiny import tiny_model

        if not quiet:
            print(DEFAULT_MODEL_NOTE, file=sys.stderr)
        model, processor = tiny_model(seed=0)
        return model.to(device=device, dtype=torch_dtype), processor
    return load(path, dtype=torch_dtype, device=device)
