"""Helpers shared by the CLI commands."""

from __future__ import annotations

DTYPES = ("auto", "float32", "float16", "bfloat16")


def add_model_arguments(p) -> None:
    p.add_argument("--model", default=None, help="local HF LLaVA checkpoint directory (default: the built-in testbed model)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="weights dtype (default: as saved)")


def load_model(path: str | None, device: str | None = None, dtype: str = "auto"):
    """Load `path`, or the shipped testbed model when no path is given, onto `device`."""
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
    return load(path, dtype=torch_dtype, device=device)
