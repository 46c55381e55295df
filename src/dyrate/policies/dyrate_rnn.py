"""DyRate with memory (the seed's proposal): a GRU over the last N share vectors (N stored in the
predictor file; N = 0: an unbounded recurrence) predicts the rate bin at every step. The window or
hidden state lives in the per-call policy state (batch first, reordered by the engine for beam
search). Everything else is as in `dyrate` (dyrate.py)."""

from __future__ import annotations

from dataclasses import dataclass

from .dyrate import DyRate


@dataclass(frozen=True)
class DyRateRNN(DyRate):
    name = "dyrate-rnn"
    arch = "gru"
