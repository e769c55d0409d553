"""Triton symmetric InfoNCE (kernels/info_nce.py: the SYM row / column kernels) against the reference.

Runs in the Triton interpreter without a GPU (tests/conftest.py). float64 is exact to rounding; bf16 goes
through the fp32-upcast path. Sizes are odd: N not a multiple of any block, d not a power of two.
"""

import pytest
import torch

from adassl_fast.indices import diagonal_indices
from adassl_fast.info_nce import info_nce_reference
from adassl_fast.kernels import backward, launch
from adassl_fast.kernels import info_nce as kin
from adassl_fast.kernels import nt_xent as ntx
from tests.kernels.sentinels import guards_intact, padded
from tests.kernels.shapes import shipped_block_shapes
from tests.rows_as_given import free_rows, leaves, symmetric_loss

pytestmark = pytest.mark.triton

F64 = torch.float64


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)


def _diagonal(query):
    return diagonal_indices(query.shape[0], query.device)


def _run(query, key, scale, inv_t, clamp, deterministic=True, num_splits=None, grad=1.0, normalize=True):
    loss, lse = kin.info_nce_forward(query, key, scale, inv_t, clamp, indices=_diagonal(query), normalize=normalize,
                                     num_splits=num_splits)
    g = torch.tensor(grad, dtype=loss.dtype)
    dq, dk, ds = kin.info_nce_backward(g, query, key, scale, lse, inv_t, clamp, deterministic,
                                       indices=_diagonal(query), normalize=normalize, num_splits=num_splits)
    return loss, lse, dq, dk, ds


def _reference(query, key, scale, temperature, clamp, grad=1.0):
    q, k, s = (x.detach().to(F64).requires_grad_() for x in (query, key, scale))
    loss = info_nce_reference(q, k, temperature=temperature, scale=s, clamp=clamp, symmetric=True)
    return (loss.detach(), *torch.autograd.grad(loss, (q, k, s), torch.tensor(grad, dtype=F64)))


def _lse_reference(query, key, scale, temperature, clamp):
    u = torch.nn.functional.normalize(query.to(F64), dim=1)
    v = torch.nn.functional.normalize(key.to(F64), dim=1)
    S = scale.to(F64) / temperature * (u @ v.t())
    if clamp is not None:
        S = S.clamp(-clamp, clamp)
    return torch.stack([torch.logsumexp(S, 1), torch.logsumexp(S, 0)])


def _close(a, b, tol, what):
    assert torch.isfinite(a).all(), what
    err = (a.to(F64) - b).abs().max().item()
    assert err <= tol, f"{what}: max err {err:.3e}"


@pytest.mark.parametrize("N,d,clamp,deterministic,num_splits", [
    (6, 5, None, True, 1),
    (37, 17, 2.5, True, None),
    (37, 24, 2.5, False, 1),
    (130, 37, None, False, None),
    (130, 24, 3.0, True, 2),
    # 64-blocks in the interpreter: off-diagonal tiles take the unmasked fast path, with the clamp active
    (300, 17, 3.0, True, 1),
])
def test_matches_reference_float64(N, d, clamp, deterministic, num_splits):
    query = torch.randn(N, d, dtype=F64)
    key = query + 0.7 * torch.randn(N, d, dtype=F64)
    scale = torch.tensor(1.3, dtype=F64)
    temperature = 0.2
    loss, lse, dq, dk, ds = _run(query, key, scale, 1 / temperature, clamp, deterministic, num_splits, grad=0.6)
    r_loss, r_dq, r_dk, r_ds = _reference(query, key, scale, temperature, clamp, grad=0.6)
    assert loss.dtype == F64 and lse.shape == (2, N) and ds.dim() == 0
    _close(loss, r_loss, 1e-12, "loss")
    _close(lse, _lse_reference(query, key, scale, temperature, clamp), 1e-12, "row / column lse")
    _close(dq, r_dq, 1e-12, "dquery")
    _close(dk, r_dk, 1e-12, "dkey")
    _close(ds, r_ds, 1e-12, "dscale")


@pytest.mark.slow
@pytest.mark.parametrize("kernel,cfg", shipped_block_shapes(), ids=lambda v: getattr(v, "name", v))
def test_every_shipped_block_shape_matches_reference_float64(kernel, cfg):
    # the SYM kernels (column LSEs read per streamed tile) at each shape the GPU table ships, N = 150 as in
    # tests/kernels/test_nt_xent.py; the forward shape runs both LSE passes
    N, d, clamp, temperature = 150, 24, 3.0, 0.2
    query = torch.randn(N, d, dtype=F64)
    key = query + 0.7 * torch.randn(N, d, dtype=F64)
    scale = torch.tensor(1.3, dtype=F64)
    r_loss, r_dq, r_dk, r_ds = _reference(query, key, scale, temperature, clamp)
    loss, lse = kin.info_nce_forward(query, key, scale, 1 / temperature, clamp, indices=_diagonal(query),
                                     config=cfg if kernel == "fwd" else None)
    _close(loss, r_loss, 1e-12, f"{cfg.name}: loss")
    _close(lse, _lse_reference(query, key, scale, temperature, clamp), 1e-12, f"{cfg.name}: row / column lse")
    for deterministic in (True, False) if kernel == "bwd_row" else (True,):
        dq, dk, ds = kin.info_nce_backward(torch.tensor(1.0, dtype=F64), query, key, scale, lse, 1 / temperature,
                                           clamp, deterministic, indices=_diagonal(query), configs={kernel: cfg})
        for got, want, what in ((dq, r_dq, "dquery"), (dk, r_dk, "dkey"), (ds, r_ds, "dscale")):
            _close(got, want, 1e-12, f"{cfg.name} deterministic={deterministic}: {what}")


@pytest.mark.parametrize("deterministic", [True, False])
def test_equals_two_one_directional_passes_float64(deterministic):
    # the fused backward (one G for both directions) against the nt_xent core run once per direction
    N, d = 70, 24
    query, key = torch.randn(N, d, dtype=F64), torch.randn(N, d, dtype=F64)
    scale = torch.tensor(0.9, dtype=F64)
    pos, excl = torch.arange(N), torch.full((N,), -1)
    loss, lse, dq, dk, ds = _run(query, key, scale, 8.0, 5.0, deterministic)
    half = torch.tensor(0.5, dtype=F64)
    lr, lse_r = ntx.nt_xent_forward(query, key, pos, excl, scale, 8.0, 5.0)
    lc, lse_c = ntx.nt_xent_forward(key, query, pos, excl, scale, 8.0, 5.0)
    dq1, dk1, ds1 = ntx.nt_xent_backward(half, query, key, pos, excl, scale, lse_r, 8.0, 5.0, True)
    dk2, dq2, ds2 = ntx.nt_xent_backward(half, key, query, pos, excl, scale, lse_c, 8.0, 5.0, True)
    _close(loss, (lr + lc) / 2, 1e-13, "loss")
    _close(lse, torch.stack([lse_r, lse_c]), 1e-13, "lse")
    _close(dq, dq1 + dq2, 1e-13, "dquery")
    _close(dk, dk1 + dk2, 1e-13, "dkey")
    _close(ds, ds1 + ds2, 1e-13, "dscale")


def test_bfloat16_through_upcast():
    N, d = 130, 37
    query = torch.randn(N, d).bfloat16()
    key = (query.float() + 0.5 * torch.randn(N, d)).bfloat16()
    scale = torch.tensor(1.0)
    loss, lse, dq, dk, ds = _run(query, key, scale, 1 / 0.07, None)
    assert dq.dtype == torch.bfloat16 and dk.dtype == torch.bfloat16 and loss.dtype == torch.float32
    r_loss, r_dq, r_dk, r_ds = _reference(query, key, scale, 0.07, None)
    # bf16-rounded unit rows move the logits by ~2^-9 scale / tau (docs/backends.md "Precision")
    assert abs(loss.item() - r_loss.item()) < 1e-3 * r_loss.item()
    assert abs(ds.item() - r_ds.item()) < 1e-2 * r_ds.abs().item()
    for got, want, what in ((dq, r_dq, "dquery"), (dk, r_dk, "dkey")):
        rel = ((got.to(F64) - want).norm() / want.norm()).item()
        assert rel < 3e-2, f"{what}: relative error {rel:.2e}"


def test_deterministic_schedule_is_bitwise_reproducible():
    N, d = 130, 24
    query, key = torch.randn(N, d), torch.randn(N, d)
    a = _run(query, key, torch.tensor(1.0), 5.0, 20.0, True)
    b = _run(query, key, torch.tensor(1.0), 5.0, 20.0, True)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("deterministic", [True, False])
def test_out_of_bounds_guarded_by_sentinels(deterministic):
    # the SYM kernels also read the column LSEs per streamed tile: a wrong mask there reads the sentinels
    N, d = 34, 37
    query, key = torch.randn(N, d, dtype=F64), torch.randn(N, d, dtype=F64)
    scale = torch.tensor(1.0, dtype=F64)
    clean = _run(query, key, scale, 4.0, 20.0, deterministic)
    qbuf, qv = padded(query, 64 * 64, 64 * 64, 1.0e30)
    kbuf, kv = padded(key, 64 * 64, 64 * 64, 1.0e30)
    lbuf, lse = padded(clean[1], 64, 64, -1.0e30)  # a sentinel LSE read as a column's would blow up P
    loss, _ = kin.info_nce_forward(qv, kv, scale, 4.0, 20.0, indices=_diagonal(qv))
    grads = kin.info_nce_backward(torch.tensor(1.0, dtype=F64), qv, kv, scale, lse, 4.0, 20.0, deterministic,
                                  indices=_diagonal(qv))
    assert torch.equal(loss, clean[0])
    for x, y in zip(grads, clean[2:], strict=True):
        assert torch.equal(x, y)
    for buf, view in ((qbuf, qv), (kbuf, kv)):
        assert guards_intact(buf, view)


def test_backward_asks_for_the_sym_configs(monkeypatch):
    # the SYM kernels hold one more exp tile: the table may give them their own shapes (kernels/configs.py)
    asked = []
    real = backward.pick_config

    def spy(kind, device, dtype, d):
        asked.append(kind)
        return real(kind, device, dtype, d)

    monkeypatch.setattr(backward, "pick_config", spy)
    query, key = torch.randn(20, 8, dtype=F64), torch.randn(20, 8, dtype=F64)
    _run(query, key, torch.tensor(1.0, dtype=F64), 5.0, None)
    assert asked == ["bwd_row_sym", "bwd_col_sym"]  # (the forward looks up "fwd" in kernels/info_nce.py)


# ----------------------------------------------------------------------------------------------------
# normalize=False: the rows as given (docs/backends.md), against the float64 oracle of tests/rows_as_given.py.


def _as_given_reference(query, key, scale, inv_t, clamp, grad=1.0, normalize=False):
    q, k, s = leaves(query, key, scale)
    loss, lse = symmetric_loss(q, k, s, inv_t, clamp, normalize)
    return (loss.detach(), lse.detach(), *torch.autograd.grad(loss, (q, k, s), torch.tensor(grad, dtype=F64)))


def _as_given_problem(N, d):
    query = free_rows(N, d)
    return query, query + free_rows(N, d), torch.tensor(1.3, dtype=F64)


@pytest.mark.parametrize("N,d,clamp,deterministic,num_splits", [
    (6, 5, None, True, 1),
    (37, 17, 3.0, True, None),
    (37, 24, 3.0, False, 1),
    (130, 37, None, False, None),
    (300, 17, 3.0, True, 1),  # off-diagonal tiles on the unmasked fast path, the clamp binding there
    (70, 130, 3.0, False, None),  # BLOCK_D 256
])
def test_rows_as_given_match_float64(N, d, clamp, deterministic, num_splits):
    # |scale / tau| = 2.6 < clamp: only rows of norm > 1 reach the clamp (tiles.clamp_binds)
    query, key, scale = _as_given_problem(N, d)
    inv_t = 2.0
    if clamp is not None:
        assert (scale * inv_t * (query @ key.t())).abs().max() > clamp > 1.01 * scale * inv_t
    loss, lse, dq, dk, ds = _run(query, key, scale, inv_t, clamp, deterministic, num_splits, grad=0.6,
                                 normalize=False)
    r_loss, r_lse, r_dq, r_dk, r_ds = _as_given_reference(query, key, scale, inv_t, clamp, grad=0.6)
    n_loss, _, n_dq, _, _ = _as_given_reference(query, key, scale, inv_t, clamp, grad=0.6, normalize=True)
    assert abs(n_loss - r_loss) > 1e-2 and (n_dq - r_dq).abs().max() > 1e-2 * r_dq.abs().max()  # the flag matters
    _close(loss, r_loss, 1e-12, "loss")
    _close(lse, r_lse, 1e-12, "row / column lse")
    _close(dq, r_dq, 1e-12, "dquery")
    _close(dk, r_dk, 1e-12, "dkey")
    _close(ds, r_ds, 1e-12, "dscale")


@pytest.mark.slow
@pytest.mark.parametrize("kernel,cfg", shipped_block_shapes(), ids=lambda v: getattr(v, "name", v))
def test_every_shipped_block_shape_rows_as_given_float64(kernel, cfg):
    N, d, clamp, inv_t = 150, 24, 3.0, 2.0
    query, key, scale = _as_given_problem(N, d)
    r_loss, r_lse, r_dq, r_dk, r_ds = _as_given_reference(query, key, scale, inv_t, clamp)
    loss, lse = kin.info_nce_forward(query, key, scale, inv_t, clamp, indices=_diagonal(query), normalize=False,
                                     config=cfg if kernel == "fwd" else None)
    _close(loss, r_loss, 1e-12, f"{cfg.name}: loss")
    _close(lse, r_lse, 1e-12, f"{cfg.name}: row / column lse")
    for deterministic in (True, False) if kernel == "bwd_row" else (True,):
        dq, dk, ds = kin.info_nce_backward(torch.tensor(1.0, dtype=F64), query, key, scale, lse, inv_t, clamp,
                                           deterministic, indices=_diagonal(query), normalize=False,
                                           configs={kernel: cfg})
        for got, want, what in ((dq, r_dq, "dquery"), (dk, r_dk, "dkey"), (ds, r_ds, "dscale")):
            _close(got, want, 1e-12, f"{cfg.name} deterministic={deterministic}: {what}")
