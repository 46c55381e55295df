"""The tower scores VisionZip and PruMerge share (policies/tower.py): attention received, computed
in query chunks, equals the whole attention matrix at once, with and without windows; the class
token's row respects windows; a unit sums its tower tokens."""

from __future__ import annotations

import pytest
import torch

from dyrate.adapters.vision import Tile
from dyrate.policies import tower


def _direct(q, k, scale, windows):
    logits = torch.einsum("qhd,khd->hqk", q, k) * scale  # (H, T, T)
    if windows is not None:
        logits = logits.masked_fill(windows[:, None] != windows[None, :], float("-inf"))
    return logits.softmax(-1).mean(1).sum(0)  # (T,)


@pytest.mark.parametrize("windowed", [False, True])
def test_received_in_chunks_equals_all_at_once(monkeypatch, windowed):
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(11, 2, 4, generator=gen), torch.randn(11, 2, 4, generator=gen)
    windows = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3]) if windowed else None
    want = _direct(q, k, 0.5, windows)
    monkeypatch.setattr(tower, "QUERY_CHUNK", 3)  # four chunks, the last one short
    got = tower.received(q, k, 0.5, windows)
    torch.testing.assert_close(got, want)
    assert got.sum() == pytest.approx(2.0, rel=1e-5)  # each head's rows sum to 1


def test_unit_scores_sum_a_units_tokens_and_the_class_row_keeps_its_window():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(8, 2, 4, generator=gen), torch.randn(8, 2, 4, generator=gen)
    tile = Tile(torch.zeros(2, 3), torch.arange(2), lambda layer: (q, k), None, group=4)
    torch.testing.assert_close(tower.unit_scores(tile, q, k, 0.5, None),
                               _direct(q, k, 0.5, None).view(2, 4).sum(1))
    cls_tile = Tile(torch.zeros(7, 3), torch.arange(7), lambda layer: (q, k), torch.zeros(3))
    windows = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    scores = tower.unit_scores(cls_tile, q, k, 0.5, windows)
    assert scores[2:].abs().max() == 0  # outside the class token's window: no attention
    row = (torch.einsum("hd,thd->ht", q[0, :, :], k[:3]) * 0.5).softmax(-1)[:, 1:].sum(0)
    torch.testing.assert_close(scores[:2], row)
