"""info_nce: the reference against a hand computation, the CPU backends against the reference."""

import math

import pytest
import torch

import adassl_fast
from adassl_fast.info_nce import info_nce_reference


def test_reference_matches_a_hand_computed_case():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]], dtype=torch.float64)
    k = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -3.0]], dtype=torch.float64)
    tau = 0.5
    cos = [[(a @ b / (a.norm() * b.norm())).item() for b in k] for a in q]

    def ce(rows):
        return sum(-r[i] / tau + math.log(sum(math.exp(x / tau) for x in r)) for i, r in enumerate(rows)) / 3

    cols = [list(c) for c in zip(*cos)]
    assert info_nce_reference(q, k, temperature=tau, symmetric=False).item() == pytest.approx(ce(cos), rel=1e-14)
    both = info_nce_reference(q, k, temperature=tau, symmetric=True).item()
    assert both == pytest.approx((ce(cos) + ce(cols)) / 2, rel=1e-14)


@pytest.mark.parametrize("symmetric", [True, False])
# |scale / tau| < 30 (or a clamp below it): one exp pass serves rows and columns; (0.02, None): s / tau = 85,
# one pass per direction (adassl_fast/nt_xent.py _fixed_shift)
@pytest.mark.parametrize("n,d,tau,clamp", [(6, 5, 0.07, None), (34, 24, 0.05, 20.0), (131, 37, 1.0, None),
                                           (45, 19, 0.02, None)])
def test_torch_backend_matches_reference_float64(symmetric, n, d, tau, clamp):
    q = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    kw = dict(temperature=tau, scale=lam, symmetric=symmetric, clamp=clamp)
    ref = info_nce_reference(q, k, **kw)
    got = adassl_fast.info_nce(q, k, impl="torch", **kw)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(torch.autograd.grad(got, [q, k, lam]), torch.autograd.grad(ref, [q, k, lam])):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_bfloat16_inputs_give_float32():
    q, k = torch.randn(34, 16), torch.randn(34, 16)
    ref = info_nce_reference(q.double(), k.double())
    got = adassl_fast.info_nce(q.bfloat16(), k.bfloat16(), impl="torch")
    assert got.dtype == torch.float32
    assert abs(got.item() - ref.item()) < 3e-2 * ref.item()
