"""adassl_fast/torch_backend.py: what only the torch backend has (its numerics against the references are in
the op tests, which parametrise over the backends)."""

import pytest
import torch

from adassl_fast.torch_backend import (
    adassl_backward,
    adassl_forward,
    adassl_forward_backward,
    adassl_gradients,
    info_nce_backward,
    info_nce_forward,
    labelled_backward,
    labelled_forward,
    labelled_forward_backward,
    nt_xent_backward,
    nt_xent_forward,
    nt_xent_forward_backward,
    symmetric_backward,
    symmetric_forward,
)
from tests.rows_as_given import (
    adassl_inputs,
    adassl_reference,
    core_loss,
    free_rows,
    labelled_loss,
    leaves,
    symmetric_loss,
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


# ----------------------------------------------------------------------------------------------------
# normalize=False: the rows as given (docs/backends.md), against the float64 oracle of tests/rows_as_given.py.

F64 = torch.float64


def _partners(m):
    pos = torch.arange(m)
    return pos, (pos + m // 2) % m


def _core_reference(cont, targ, pos, excl, scale, inv_t, clamp, normalize=False):
    c, t, s = leaves(cont, targ, scale)
    loss, lse = core_loss(c, t, pos, excl, s, inv_t, clamp, normalize)
    return (loss.detach(), lse.detach(), *torch.autograd.grad(loss, (c, t, s)))


def _close(got, want, tol, what):
    assert torch.isfinite(got).all(), what
    err = (got.to(F64) - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), f"{what}: {err:.3e}"


@pytest.mark.parametrize("m,n,d,clamp", [(6, 6, 5, None), (70, 70, 37, 3.0), (37, 70, 24, 2.9), (130, 45, 19, None)])
def test_rows_as_given_core_matches_float64(m, n, d, clamp):
    # |scale / tau| = 2.6 < clamp: the clamp binds only through rows of norm > 1 (_logit_bound's reach)
    cont = free_rows(m, d)
    targ = cont.roll(1, 0) + free_rows(n, d) if m == n else free_rows(n, d)
    pos, excl = _partners(m) if m == n else (torch.randint(-1, n, (m,)), torch.randint(-1, n, (m,)))
    scale, inv_t = torch.tensor(1.3, dtype=F64), 2.0
    r_loss, r_lse, r_dc, r_dt, r_ds = _core_reference(cont, targ, pos, excl, scale, inv_t, clamp)
    loss, lse = nt_xent_forward(cont, targ, pos, excl, scale, inv_t, clamp, normalize=False)
    dc, dt, ds = nt_xent_backward(torch.tensor(1.0, dtype=F64), cont, targ, pos, excl, scale, lse, inv_t, clamp, True,
                                  normalize=False)
    one_pass = nt_xent_forward_backward(cont, targ, pos, excl, scale, inv_t, clamp, normalize=False)
    for got in ((loss, lse, dc, dt, ds), one_pass):
        for a, b, what in zip(got, (r_loss, r_lse, r_dc, r_dt, r_ds), ("loss", "lse", "dcont", "dtarg", "dscale"),
                              strict=True):
            _close(a, b, 1e-12, what)
    n_loss, _, n_dc, _, _ = _core_reference(cont, targ, pos, excl, scale, inv_t, clamp, normalize=True)
    assert abs(n_loss - r_loss) > 1e-2 and (n_dc - r_dc).abs().max() > 1e-2 * r_dc.abs().max()  # the flag matters


@pytest.mark.parametrize("inv_t,clamp", [(2.0, None), (2.0, 3.0), (40.0, None)])  # 40: |S| > 30, two passes
def test_rows_as_given_symmetric_matches_float64(inv_t, clamp):
    n, d = 45, 19
    query = free_rows(n, d)
    key = query + free_rows(n, d)
    scale, grad = torch.tensor(1.3, dtype=F64), torch.tensor(0.8, dtype=F64)
    q, k, s = leaves(query, key, scale)
    r_loss, r_lse = symmetric_loss(q, k, s, inv_t, clamp, False)
    r_grads = torch.autograd.grad(r_loss, (q, k, s), grad)
    fused = info_nce_forward(query, key, scale, inv_t, clamp, normalize=False)
    composed = symmetric_forward(nt_xent_forward)(query, key, scale, inv_t, clamp, normalize=False)
    for loss, lse in (fused, composed):
        _close(loss, r_loss.detach(), 1e-12, "loss")
        _close(lse, r_lse.detach(), 1e-12, "lse")
    lse = fused[1]
    for grads in (info_nce_backward(grad, query, key, scale, lse, inv_t, clamp, True, normalize=False),
                  symmetric_backward(nt_xent_backward)(grad, query, key, scale, lse, inv_t, clamp, True,
                                                       normalize=False)):
        for a, b, what in zip(grads, r_grads, ("dquery", "dkey", "dscale"), strict=True):
            _close(a, b, 1e-12, what)


def test_rows_as_given_labelled_matches_float64():
    n, d, inv_t, clamp = 40, 13, 2.0, 3.0
    query = free_rows(n, d)
    key = query + free_rows(n, d)
    labels = torch.randint(0, 6, (n,))
    scale = torch.tensor(1.3, dtype=F64)
    q, k, s = leaves(query, key, scale)
    r_loss, r_lse = labelled_loss(q, k, labels, s, inv_t, clamp, False)
    r_grads = torch.autograd.grad(r_loss, (q, k, s))
    loss, lse = labelled_forward(query, key, labels, scale, inv_t, clamp, normalize=False)
    _close(loss, r_loss.detach(), 1e-12, "loss")
    _close(lse, r_lse.detach(), 1e-12, "lse")
    grads = labelled_backward(torch.tensor(1.0, dtype=F64), query, key, labels, scale, lse, inv_t, clamp, True,
                              normalize=False)
    one_pass = labelled_forward_backward(query, key, labels, scale, inv_t, clamp, normalize=False)
    _close(one_pass[0], r_loss.detach(), 1e-12, "one-pass loss")
    for found in (grads, one_pass[2:]):
        for a, b, what in zip(found, r_grads, ("dquery", "dkey", "dscale"), strict=True):
            _close(a, b, 1e-12, what)


@pytest.mark.parametrize("variant", ["v", "s"])
def test_rows_as_given_adassl_matches_float64(variant):
    B, d, inv_t, clamp = 17, 24, 2.0, 3.0
    ins = adassl_inputs(B, d, variant)
    scale = torch.tensor(1.3, dtype=F64)
    r_ssl, r_reg, r_grads = adassl_reference(ins, variant, scale, 1 / inv_t, clamp, 0.9, 0.6)
    l_ssl, l_reg, lse = adassl_forward(*ins, scale, inv_t, clamp, variant, normalize=False)
    _close(l_ssl, r_ssl, 1e-12, "l_ssl")
    _close(l_reg, r_reg, 1e-12, "l_reg")
    grads = adassl_backward(torch.tensor(0.9, dtype=F64), torch.tensor(0.6, dtype=F64), *ins, scale, lse, inv_t,
                            clamp, variant, True, normalize=False)
    l_ssl1, _, _, dcont, dtarg, dscale = adassl_forward_backward(*ins, scale, inv_t, clamp, variant, normalize=False)
    _close(l_ssl1, r_ssl, 1e-12, "one-pass l_ssl")
    one_pass = adassl_gradients(dcont * 0.9, dtarg * 0.9, dscale * 0.9, torch.tensor(0.6, dtype=F64), *ins, variant)
    graded = [0, 1, 2, 3, 4, 5, 6] if variant == "v" else [0, 1, 2, 3, 6]
    for found in (grads, one_pass):
        for i, want in zip(graded, r_grads, strict=True):
            _close(found[i], want, 1e-12, f"gradient {i}")


def test_float32_rows_as_given_with_logits_past_the_unshifted_range():
    # |scale / tau| = 10 would let exp(S) go unshifted for unit rows, but rows of norm ~3 give |S| up to ~90:
    # exp(90) overflows float32. The logit bound counts the norms (_reach), so the rows are shifted.
    m, d, inv_t = 64, 16, 10.0
    cont = free_rows(m, d, low=2.5, high=3.0)
    targ = cont.roll(1, 0) * 1.05
    pos, excl = _partners(m)
    scale = torch.tensor(1.0)
    assert (scale.double() * inv_t * (cont @ targ.t())).max() > 88.7  # log of float32's largest value
    r_loss, r_lse, r_dc, r_dt, r_ds = _core_reference(cont, targ, pos, excl, scale, inv_t, None)
    c32, t32 = cont.float(), targ.float()
    loss, lse, dc, dt, ds = nt_xent_forward_backward(c32, t32, pos, excl, scale, inv_t, None, normalize=False)
    _close(loss, r_loss, 1e-5, "loss")
    _close(lse, r_lse, 1e-5, "lse")
    for a, b, what in ((dc, r_dc, "dcont"), (dt, r_dt, "dtarg"), (ds, r_ds, "dscale")):
        _close(a, b, 1e-4, what)
    loss, lse = info_nce_forward(c32, t32, scale, inv_t, None, normalize=False)
    q, k, s = leaves(cont, targ, scale)
    s_loss, s_lse = symmetric_loss(q, k, s, inv_t, None, False)
    _close(loss, s_loss.detach(), 1e-5, "symmetric loss")
    _close(lse, s_lse.detach(), 1e-5, "symmetric lse")
