"""negatives= (docs/api.md, "Extra negatives"): K extra columns appended to the keys of nt_xent and of the
one-directional info_nce, against a materialising float64 formula; gradients of every input (the negatives too,
when they require grad), and the refusals."""

import pytest
import torch
import torch.nn.functional as F

import adassl_fast

IMPLS = ["reference", "torch", pytest.param("triton", marks=pytest.mark.triton)]


def _formula(rows, cols, negatives, pos, excl, scale, tau):
    """Cross-entropy of each row over [cols minus its excluded column, negatives], its positive column pos."""
    u = F.normalize(rows, dim=1)
    logits = u @ F.normalize(torch.cat([cols, negatives]), dim=1).t() * scale / tau
    if excl is not None:
        logits = logits.index_put((torch.arange(len(u)), excl), torch.tensor(float("-inf"), dtype=logits.dtype))
    return F.cross_entropy(logits, pos)


def _call(op, impl, rows, cols, negatives, scale):
    if op == "nt_xent":
        return adassl_fast.nt_xent(rows, cols, temperature=0.3, scale=scale, clamp=None, impl=impl,
                                   negatives=negatives)
    return adassl_fast.info_nce(rows, cols, temperature=0.3, scale=scale, symmetric=False, impl=impl,
                                negatives=negatives)


@pytest.mark.parametrize("op", ["nt_xent", "info_nce"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k", [1, 9, 70])
def test_negatives_match_the_formula(op, impl, k):
    torch.manual_seed(k)
    m, d = 22, 37
    dtype = torch.float32 if impl == "triton" else torch.float64
    leaves = [torch.randn(n, d, dtype=torch.float64) for n in (m, m, k)]
    scale = torch.tensor(1.4, dtype=torch.float64, requires_grad=True)
    pos = torch.arange(m)
    excl = (pos + m // 2) % m if op == "nt_xent" else None
    want_in = [t.clone().requires_grad_() for t in leaves]
    want = _formula(*want_in, pos, excl, scale, 0.3)
    want_grads = torch.autograd.grad(want, [*want_in, scale])
    got_in = [t.to(dtype).requires_grad_() for t in leaves]
    got = _call(op, impl, *got_in, scale)
    grads = torch.autograd.grad(got, [*got_in, scale])
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-4)
    torch.testing.assert_close(got.double(), want, **tol)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g.double(), w, **tol)


def test_detached_negatives_leave_the_other_gradients_exact():
    torch.manual_seed(0)
    q, k = (torch.randn(10, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    queue = torch.randn(13, 7, dtype=torch.float64)
    dq, dk = torch.autograd.grad(adassl_fast.info_nce(q, k, symmetric=False, negatives=queue, impl="torch"), [q, k])
    wq, wk = torch.autograd.grad(_formula(q, k, queue, torch.arange(10), None, 1.0, 0.07), [q, k])
    torch.testing.assert_close(dq, wq, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dk, wk, rtol=1e-10, atol=1e-12)


def test_negatives_change_the_loss():
    torch.manual_seed(1)
    q, k, queue = torch.randn(8, 5), torch.randn(8, 5), torch.randn(6, 5)
    assert adassl_fast.info_nce(q, k, symmetric=False, negatives=queue).item() > adassl_fast.info_nce(
        q, k, symmetric=False).item()


def test_negatives_refusals():
    q = torch.randn(4, 3)
    with pytest.raises(ValueError, match="symmetric=False"):
        adassl_fast.info_nce(q, q, negatives=q)
    with pytest.raises(ValueError, match="labels"):
        adassl_fast.info_nce(q, q, symmetric=False, negatives=q, labels=torch.arange(4))
    with pytest.raises(ValueError, match="process_group"):
        adassl_fast.nt_xent(q, q, negatives=q, process_group=object())
    with pytest.raises(ValueError, match="negatives"):
        adassl_fast.nt_xent(q, q, negatives=torch.randn(4, 5))
    with pytest.raises(TypeError, match="negatives"):
        adassl_fast.info_nce(q, q, symmetric=False, negatives=torch.randn(4, 3, dtype=torch.float64))
