"""Properties of the mask bank and the soft rank mask used to train rate predictors."""

import math

import pytest
import torch

from dyrate.rates import keep_count
from dyrate.learn.soft_mask import expected_keep, mask_bank, ranks, soft_mask


@pytest.mark.parametrize("bins,n_img", [(10, 16), (4, 7), (10, 576), (3, 1)])
def test_mask_bank(bins, n_img):
    bank = mask_bank(bins, n_img)
    assert bank.shape == (bins, n_img)
    assert bool((bank[0] == 1).all())  # bin 0 keeps everything
    for i in range(bins):
        assert int(bank[i].sum()) == keep_count(i / bins, n_img) == math.ceil(round((1 - i / bins) * n_img, 6))
        assert bool((bank[i][:-1] >= bank[i][1:]).all())  # a prefix of the ranking
    assert bool((bank[:-1] >= bank[1:]).all())  # higher bins keep subsets


def test_soft_mask_properties():
    gen = torch.Generator().manual_seed(0)
    bins, n = 10, 16
    bank = mask_bank(bins, n)
    for _ in range(20):
        p = torch.rand(3, bins, generator=gen).softmax(-1)
        scores = torch.rand(3, n, generator=gen)
        r = ranks(scores)
        m = soft_mask(p, r, bank)
        assert bool(((m >= 0) & (m <= 1 + 1e-6)).all())
        # monotone non-increasing in rank: sort by rank and compare neighbours
        by_rank = m.gather(-1, r.argsort(-1))
        assert bool((by_rank[:, :-1] >= by_rank[:, 1:] - 1e-6).all())
        # sum rule: the total mask is the expected keep count
        torch.testing.assert_close(m.sum(-1), expected_keep(p, bank) * n)
    for i in range(bins):  # one-hot p: the hard mask of bin i over the ranking
        p = torch.nn.functional.one_hot(torch.tensor([i]), bins).float()
        scores = torch.rand(1, n, generator=gen)
        m = soft_mask(p, ranks(scores), bank)
        top = scores.sort(dim=-1, descending=True, stable=True).indices[0, : keep_count(i / bins, n)]
        hard = torch.zeros(1, n)
        hard[0, top] = 1.0
        torch.testing.assert_close(m, hard)
    m0 = soft_mask(torch.nn.functional.one_hot(torch.tensor([0]), bins).float(), ranks(torch.rand(1, n)), bank)
    assert bool((m0 == 1).all())


def test_ranks_ties_earlier_first():
    assert ranks(torch.tensor([0.5, 0.9, 0.5, 0.1])).tolist() == [1, 0, 2, 3]


def test_gradient_reaches_p():
    bank = mask_bank(10, 16)
    logits = torch.randn(2, 10, requires_grad=True)
    m = soft_mask(logits.softmax(-1), ranks(torch.rand(2, 16)), bank)
    (m * torch.arange(16.0)).sum().backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0
