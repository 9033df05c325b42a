"""The leave-one-group-out CKA (jackknife of ECLMF's CKA interval) against the weighted CKA
of every replicate and against CKA of the kept rows."""

import numpy as np
import pytest
import torch

from fidelity.metrics.eclmf import cka_replicates, leave_one_out_cka, linear_cka


@pytest.mark.parametrize(("m", "n_groups", "scale"), [(40, 40, 1.0), (90, 30, 1e3), (64, 9, 1e-3)])
def test_leave_one_out_cka_equals_the_weighted_replicates(m, n_groups, scale):
    g = torch.Generator().manual_seed(m + n_groups)
    X = torch.randn(m, 6, generator=g, dtype=torch.float64) * scale
    Y = X @ torch.randn(6, 4, generator=g, dtype=torch.float64) + torch.randn(
        m, 4, generator=g, dtype=torch.float64
    )
    group = torch.cat([torch.arange(n_groups), torch.randint(0, n_groups, (m - n_groups,))])
    group = group[torch.randperm(m, generator=g)]  # every group present, some with many rows
    leave_out = (group[:, None] != torch.arange(n_groups)[None, :]).double().numpy()  # (m, n)
    fast = leave_one_out_cka(X, Y, group)
    assert fast == pytest.approx(cka_replicates(X, Y, leave_out), rel=1e-9, abs=1e-12)
    for i in (0, n_groups - 1):
        rows = group != i
        assert fast[i] == pytest.approx(linear_cka(X[rows], Y[rows]), rel=1e-9, abs=1e-12)


def test_leave_one_out_cka_of_constant_states_is_nan():
    X = torch.ones(12, 3, dtype=torch.float64)
    Y = torch.randn(12, 2, dtype=torch.float64)
    assert np.isnan(leave_one_out_cka(X, Y, torch.arange(12) % 4)).all()
