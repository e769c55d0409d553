"""adassl_fast/torch_backend.py: what only the torch backend has (its numerics against the references are in
the op tests, which parametrise over the backends)."""

import pytest
import torch

from adassl_fast.torch_backend import (
    info_nce_backward,
    info_nce_forward,
    nt_xent_backward,
    nt_xent_forward,
    symmetric_backward,
    symmetric_forward,
)


@pytest.mark.parametrize("clamp,inv_t", [(None, 6.0), (2.0, 6.0), (None, 40.0)])  # 40: no shared shift
def test_fused_torch_passes_equal_two_directional_passes(clamp, inv_t):
    # the torch backend's symmetric forward (one exp pass for rows and columns where one shift serves both)
    # and backward (one G) against the composition the CUDA backend uses (its one-directional core once per
    # direction), both from the torch core: float64, to rounding
    n, d = 45, 19
    q, k = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    scale, grad = torch.tensor(1.4, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    loss, lse = info_nce_forward(q, k, scale, inv_t, clamp)
    loss_2, lse_2 = symmetric_forward(nt_xent_forward)(q, k, scale, inv_t, clamp)
    assert lse.shape == (2, n)
    torch.testing.assert_close(loss, loss_2, rtol=1e-13, atol=0.0)
    torch.testing.assert_close(lse, lse_2, rtol=1e-13, atol=0.0)
    fused = info_nce_backward(grad, q, k, scale, lse, inv_t, clamp, True)
    composed = symmetric_backward(nt_xent_backward)(grad, q, k, scale, lse, inv_t, clamp, True)
    for a, b in zip(fused, composed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
