"""Helpers shared by the CLI commands."""

from __future__ import annotations

DTYPES = ("auto", "float32", "float16", "bfloat16")


def add_model_arguments(p) -> None:
    p.add_argument("--model", default=None, help="local HF checkpoint directory: LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL or Qwen2.5-VL (default: the built-in testbed model)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="weights dtype (default: as saved)")


def load_model(path: str | None, device: str | None = None, dtype: str = "auto"):
    """Load `path`, or the shipped testbed model when no path is given, onto `device`."""
    import torch

    from ..api import load

    device = check_device(device)
    torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
    return load(path, dtype=torch_dtype, device=device)


def check_device(device: str | None) -> str:
    """A usable torch device name (default: cuda if available, else cpu); InputError otherwise."""
    import torch

    from ..errors import InputError

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as err:
        raise InputError(f"device {device!r} is not a torch device ({str(err).splitlines()[0]})") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r}: this torch has no usable CUDA (torch {torch.__version__}); use --device cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, ValueError, AssertionError) as err:
        raise InputError(f"device {device!r} is not usable here ({str(err).splitlines()[0]})") from None
    return device


# ---- argparse types: a bad value is refused while parsing, with the flag's name, in one line


def int_range(lo: int, hi: int | None = None):
    """An argparse type: an integer in [lo, hi]."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f">= {lo}" if hi is None else f"in {lo}..{hi}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def float_range(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """An argparse type: a finite float in the interval between lo and hi (open ends where asked)."""
    import argparse
    import math

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if (lo is not None and (value <= lo if lo_open else value < lo)) or (
                hi is not None and (value >= hi if hi_open else value > hi)):
            bounds = [f"{'>' if lo_open else '>='} {lo:g}"] if lo is not None else []
            bounds += [f"{'<' if hi_open else '<='} {hi:g}"] if hi is not None else []
            raise argparse.ArgumentTypeError(f"must be {' and '.join(bounds)}, got {value:g}")
        return value

    return parse


POSITIVE = int_range(1)
NONNEGATIVE = int_range(0)
SEED = int_range(0, 2**63 - 1)


def policy_list(text: str) -> list[str]:
    """'a;b;c' -> the non-empty specs, each parsed (PolicySpecError on a bad one, InputError on none)."""
    from ..errors import InputError
    from ..policies import parse_policy

    specs = [s.strip() for s in text.split(";") if s.strip()]
    if not specs:
        raise InputError(f"no policy in {text!r} (give specs separated by ';', e.g. 'none;fastv:k=2,r=0.5')")
    for s in specs:
        parse_policy(s)
    return specs


def writable_file(path, flag: str) -> None:
    """Refuse (InputError) an output file path that is a directory or lies where nothing can be written."""
    from pathlib import Path

    from ..errors import InputError

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {str(path)!r} is a directory; give a file path")
    writable_dir(path.parent, flag)


def writable_dir(path, flag: str) -> None:
    """Refuse (InputError) an output folder that is a file, lies under a file, or cannot be written."""
    from ..evaluation.run_dir import check_writable

    check_writable(path, flag)
