"""An evaluation run's folder (OUT): one writer at a time, and a record of what its samples were
made from, so that a resume never mixes runs.

- `OUT/.lock`: held (an advisory `flock`) by the main process of the run writing OUT for as long as
  it runs. A second run into the same OUT is refused with one line instead of interleaving
  samples; the lock goes with the process, so a killed run never leaves a stale one.
- `OUT/run.json`: the run's identity (task, data file and a hash of its content, the truth file's
  hash, model, mode, decoding, prompt) and every policy run into OUT so far. A resume with other
  settings or changed data is refused, and so is an OUT whose run.json cannot be read or whose
  samples have no run.json at all: the settings behind them are unknown.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..errors import InputError
from .store import SAMPLES

LOCK_FILE = ".lock"
RUN_FILE = "run.json"


def check_writable(out: Path, flag: str = "--out") -> None:
    """InputError if the folder `out` is a file, lies under a file, or its nearest existing folder
    is not writable (`flag` names it in the message)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{flag} {str(out)!r} is a file, not a folder")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{flag} {str(out)!r}: {str(probe)!r} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {str(out)!r}: no permission to write in {str(probe)!r}")


class RunLock:
    """The exclusive lock of one run on OUT (released on `release()` or when the process ends)."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; None on success, else why not (another run holds it)."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            return (f"another dyrate eval (pid {holder}) is writing to {self.path.parent}; "
                    "wait for it to finish, or use another --out")
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def file_digest(path: Path | None) -> str | None:
    """sha256 (16 hex digits) of a file's bytes; None for no file."""
    if path is None:
        return None
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def read_run_file(out: Path, identity: dict[str, Any]) -> list[str]:
    """Check OUT's run.json against `identity`; return the policies run into OUT so far (none for a
    new OUT). InputError when OUT holds another run, an unreadable run.json, or samples without one."""
    out = Path(out)
    path = out / RUN_FILE
    if not path.is_file():
        samples = out / SAMPLES  # (shards are only ever written after the main process wrote run.json)
        if samples.is_file() and samples.stat().st_size:
            raise InputError(f"{out} holds samples but no {RUN_FILE}, so the settings behind them are unknown; "
                             "use another --out, or delete the folder")
        return []
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        old = None
    if not isinstance(old, dict):
        raise InputError(f"{path} cannot be read, so the settings behind the samples in {out} are unknown; "
                         "use another --out, or delete the folder")
    diff = [k for k in identity if old.get(k) != identity[k]]
    if diff:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {identity[k]!r}" for k in diff)
        raise InputError(f"{out} holds a run with other settings or data ({detail}); "
                         "use another --out directory to keep both, or delete it")
    policies = old.get("policies", [])
    return [p for p in policies if isinstance(p, str)] if isinstance(policies, list) else []


def write_run_file(out: Path, identity: dict[str, Any], policies: list[str]) -> None:
    """Write run.json atomically (a reader never sees half of it)."""
    path = Path(out) / RUN_FILE
    tmp = path.with_name(RUN_FILE + ".tmp")
    tmp.write_text(json.dumps({**identity, "policies": policies}, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
