"""Triton InfoNCE with label-defined positives (kernels/info_nce.py: the shared core's LABELS logits) against the
float64 reference, one-directional and symmetric.

Runs in the Triton interpreter without a GPU (tests/conftest.py). float64 is exact to rounding; fp32 inputs go
through the fp16 operand path with the bound of tests/kernels/test_nt_xent.py. Sizes are odd: N not a multiple
of any block, d not a power of two. Every buffer the launchers allocate starts as NaN.
"""

import pytest
import torch

import adassl_fast
from adassl_fast.info_nce import info_nce_reference
from adassl_fast.kernels import info_nce as kin
from adassl_fast.kernels import launch
from tests.kernels.sentinels import guards_intact, padded
from tests.kernels.shapes import shipped_block_shapes
from tests.precision import rel_err
from tests.rows_as_given import free_rows, labelled_loss, leaves

pytestmark = pytest.mark.triton

F64 = torch.float64
ENTRIES = {False: (kin.labelled_forward, kin.labelled_backward),
           True: (kin.labelled_info_nce_forward, kin.labelled_info_nce_backward)}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)


def _run(query, key, labels, scale, inv_t, clamp, symmetric, deterministic=True, num_splits=None, grad=1.0,
         config=None, configs=None, normalize=True):
    forward, backward = ENTRIES[symmetric]
    loss, lse = forward(query, key, labels, scale, inv_t, clamp, normalize=normalize, num_splits=num_splits,
                        config=config)
    g = torch.tensor(grad, dtype=loss.dtype)
    dq, dk, ds = backward(g, query, key, labels, scale, lse, inv_t, clamp, deterministic, normalize=normalize,
                          num_splits=num_splits, configs=configs)
    return loss, lse, dq, dk, ds


def _reference(query, key, labels, scale, temperature, clamp, symmetric, grad=1.0):
    q, k, s = (x.detach().to(F64).requires_grad_() for x in (query, key, scale))
    loss = info_nce_reference(q, k, temperature=temperature, scale=s, clamp=clamp, symmetric=symmetric,
                              labels=labels)
    return (loss.detach(), *torch.autograd.grad(loss, (q, k, s), torch.tensor(grad, dtype=F64)))


def _close(a, b, tol, what):
    assert torch.isfinite(a).all(), what
    err = (a.to(F64) - b).abs().max().item()
    assert err <= tol, f"{what}: max err {err:.3e}"


def _labels(N, classes):
    """Random labels in [0, classes) with one singleton (a row that is its own only positive) and negative ids."""
    labels = torch.randint(0, classes, (N,)) - classes // 2
    labels[N // 3] = 10**12
    return labels


def _problem(N, d, dtype=F64):
    query = torch.randn(N, d, dtype=dtype)
    key = (query.to(F64) + 0.7 * torch.randn(N, d, dtype=F64)).to(dtype)
    return query, key, torch.tensor(1.3, dtype=launch.stat_dtype(dtype))


CASES = [  # (N, d, classes, clamp, deterministic, num_splits)
    (6, 5, 2, None, True, 1),
    (37, 17, 5, 2.5, True, None),
    (37, 24, 3, 2.5, False, 1),
    (130, 37, 9, None, False, None),
    (130, 24, 4, 3.0, True, 2),
    # 64-blocks in the interpreter: every tile compares labels, with the clamp active
    (300, 17, 7, 3.0, True, 1),
    (70, 130, 6, 3.0, False, None),
]


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("N,d,classes,clamp,deterministic,num_splits", CASES)
def test_matches_reference_float64(N, d, classes, clamp, deterministic, num_splits, symmetric):
    query, key, scale = _problem(N, d)
    labels = _labels(N, classes)
    loss, lse, dq, dk, ds = _run(query, key, labels, scale, 1 / 0.2, clamp, symmetric, deterministic, num_splits,
                                 grad=0.6)
    r_loss, r_dq, r_dk, r_ds = _reference(query, key, labels, scale, 0.2, clamp, symmetric, grad=0.6)
    assert loss.dtype == F64 and lse.shape == ((2, N) if symmetric else (N,)) and ds.dim() == 0
    for got, want, what in ((loss, r_loss, "loss"), (dq, r_dq, "dquery"), (dk, r_dk, "dkey"), (ds, r_ds, "dscale")):
        _close(got, want, 1e-12, what)


@pytest.mark.slow
@pytest.mark.parametrize("kernel,cfg", shipped_block_shapes(), ids=lambda v: getattr(v, "name", v))
def test_every_shipped_block_shape_matches_reference_float64(kernel, cfg):
    # N = 150 as in tests/kernels/test_nt_xent.py; the symmetric op runs the LABELS and SYM kernels together, the
    # one-directional op the plain LABELS ones; the row kernel's shape runs both schedules
    N, d, clamp, temperature = 150, 24, 3.0, 0.2
    query, key, scale = _problem(N, d)
    labels = _labels(N, 8)
    for symmetric in (False, True):
        forward, backward = ENTRIES[symmetric]
        r_loss, r_dq, r_dk, r_ds = _reference(query, key, labels, scale, temperature, clamp, symmetric)
        loss, lse = forward(query, key, labels, scale, 1 / temperature, clamp, config=cfg if kernel == "fwd" else None)
        _close(loss, r_loss, 1e-12, f"{cfg.name} symmetric={symmetric}: loss")
        for deterministic in (True, False) if kernel == "bwd_row" else (True,):
            dq, dk, ds = backward(torch.tensor(1.0, dtype=F64), query, key, labels, scale, lse, 1 / temperature,
                                  clamp, deterministic, configs={kernel: cfg})
            for got, want, what in ((dq, r_dq, "dquery"), (dk, r_dk, "dkey"), (ds, r_ds, "dscale")):
                _close(got, want, 1e-12, f"{cfg.name} symmetric={symmetric} deterministic={deterministic}: {what}")


FP16_UNIT = 2.0**-11


@pytest.mark.parametrize("symmetric", [False, True])
def test_float32_inputs_through_fp16_operands(symmetric):
    """fp32 inputs: unit rows rounded once to fp16, fp32 statistics and accumulation. The bound of
    tests/kernels/test_nt_xent.py holds unchanged: each logit moves by at most delta = s / tau delta_c with
    delta_c = 2 u + u^2 (u = 2^-11), the LSE and the positives' mean (an average of logits) by delta each, so
    |d loss| <= 2 delta; Q_i. sums to 1 like the onehot it replaces, so a row gradient moves by at most
    s / tau / N (2 delta + 4 u) (symmetric: the mean of both directions' bounds), over |x_i|."""
    N, d, scale_value, temperature = 130, 37, 1.5, 0.1
    query, key, _ = _problem(N, d, torch.float32)
    query = query * 3.0
    scale = torch.tensor(scale_value)
    labels = _labels(N, 11)
    loss, _, dq, dk, ds = _run(query, key, labels, scale, 1 / temperature, None, symmetric)
    assert loss.dtype == ds.dtype == dq.dtype == dk.dtype == torch.float32
    r_loss, r_dq, r_dk, r_ds = _reference(query, key, labels, scale, temperature, None, symmetric)
    delta_c = 2 * FP16_UNIT + FP16_UNIT**2
    s_tau = scale_value / temperature
    delta = s_tau * delta_c
    assert abs(loss.double() - r_loss).item() <= 2 * delta
    assert abs(ds.double() - r_ds).item() <= (2 * delta + 2 * delta_c) / temperature
    row_bound = s_tau / N * (2 * delta + 4 * FP16_UNIT)
    for got, want, x in ((dq, r_dq, query), (dk, r_dk, key)):
        err = (got.double() - want).norm(dim=1)
        assert (err <= row_bound / x.double().norm(dim=1)).all()
    assert rel_err(dq, r_dq) < 1e-2 and rel_err(dk, r_dk) < 1e-2


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("deterministic", [True, False])
def test_arange_labels_are_the_plain_loss(symmetric, deterministic):
    # through the public op: the LABELS kernels with every row its own class against the diagonal kernels
    leaf = lambda *s: torch.randn(*s, dtype=F64, requires_grad=True)
    q, k, s = leaf(37, 13), leaf(37, 13), torch.tensor(0.9, dtype=F64, requires_grad=True)
    kw = dict(temperature=0.3, clamp=2.5, symmetric=symmetric, impl="triton", deterministic=deterministic)
    plain = adassl_fast.info_nce(q, k, scale=s, **kw)
    labelled = adassl_fast.info_nce(q, k, scale=s, labels=torch.arange(37), **kw)
    _close(labelled, plain.detach(), 1e-13, "loss")
    for got, want, what in zip(torch.autograd.grad(labelled, (q, k, s)), torch.autograd.grad(plain, (q, k, s)),
                               ("query", "key", "scale"), strict=True):
        _close(got, want, 1e-13, f"d{what}")


@pytest.mark.parametrize("symmetric", [False, True])
def test_public_op_matches_the_reference(symmetric):
    leaf = lambda *s: torch.randn(*s, dtype=F64, requires_grad=True)
    q, k, s = leaf(41, 9), leaf(41, 9), torch.tensor(1.1, dtype=F64, requires_grad=True)
    labels = torch.randint(0, 6, (41,), dtype=torch.int32)  # any integer dtype: the op takes int64 copies
    kw = dict(temperature=0.25, symmetric=symmetric, labels=labels)
    found = adassl_fast.info_nce(q, k, scale=s, impl="triton", **kw)
    want = adassl_fast.info_nce(q, k, scale=s, impl="reference", **kw)
    _close(found, want.detach(), 1e-12, "loss")
    for got, ref in zip(torch.autograd.grad(found, (q, k, s)), torch.autograd.grad(want, (q, k, s)), strict=True):
        _close(got, ref, 1e-12, "gradient")


def test_deterministic_schedule_is_bitwise_reproducible():
    query, key, scale = _problem(130, 24, torch.float32)
    labels = _labels(130, 9)
    a = _run(query, key, labels, scale, 5.0, 20.0, True, True)
    b = _run(query, key, labels, scale, 5.0, 20.0, True, True)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("deterministic", [True, False])
def test_out_of_bounds_guarded_by_sentinels(symmetric, deterministic):
    # the label sentinel is a real label: a label read past either end would add positives
    N, d = 34, 37
    query, key, scale = _problem(N, d)
    labels = _labels(N, 5)
    clean = _run(query, key, labels, scale, 4.0, 20.0, symmetric, deterministic)
    qbuf, qv = padded(query, 64 * 64, 64 * 64)
    kbuf, kv = padded(key, 64 * 64, 64 * 64)
    lbuf, lv = padded(labels, 64, 64, fill=int(labels[0]))
    guarded = _run(qv, kv, lv, scale, 4.0, 20.0, symmetric, deterministic)
    for x, y in zip(clean, guarded, strict=True):
        assert torch.equal(x, y)
    for buf, view in ((qbuf, qv), (kbuf, kv)):
        assert guards_intact(buf, view)
    assert guards_intact(lbuf, lv, fill=int(labels[0]))


# normalize=False: the rows as given (docs/backends.md), against the float64 oracle of tests/rows_as_given.py.


def _as_given_reference(query, key, labels, scale, inv_t, clamp, symmetric, normalize, grad=1.0):
    """float64 (loss, dquery, dkey, dscale); symmetric: the mean of both directions (S and S^T, the same labels)."""
    q, k, s = leaves(query, key, scale)
    loss = labelled_loss(q, k, labels, s, inv_t, clamp, normalize)[0]
    if symmetric:
        loss = (loss + labelled_loss(k, q, labels, s, inv_t, clamp, normalize)[0]) / 2
    return (loss.detach(), *torch.autograd.grad(loss, (q, k, s), torch.tensor(grad, dtype=F64)))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("N,d,classes,clamp,deterministic,num_splits", [
    (37, 17, 5, 3.0, True, None),
    (130, 24, 4, 3.0, False, 2),
    (70, 37, 6, None, True, 1),
])
def test_rows_as_given_match_float64(N, d, classes, clamp, deterministic, num_splits, symmetric):
    # |scale / tau| = 2.6 < clamp: only rows of norm > 1 reach the clamp, which must apply all the same
    # (tiles.clamp_binds: the skip holds only for unit rows)
    query = free_rows(N, d)
    key, scale, inv_t, labels = query + free_rows(N, d), torch.tensor(1.3, dtype=F64), 2.0, _labels(N, classes)
    if clamp is not None:
        assert (scale * inv_t * (query @ key.t())).abs().max() > clamp > 1.01 * scale * inv_t
    loss, _, dq, dk, ds = _run(query, key, labels, scale, inv_t, clamp, symmetric, deterministic, num_splits,
                               grad=0.6, normalize=False)
    want = _as_given_reference(query, key, labels, scale, inv_t, clamp, symmetric, False, grad=0.6)
    unit = _as_given_reference(query, key, labels, scale, inv_t, clamp, symmetric, True, grad=0.6)
    # the oracle with normalize=True is the library's reference, and the flag matters on these rows
    _close(unit[0], _reference(query, key, labels, scale, 1 / inv_t, clamp, symmetric, grad=0.6)[0], 1e-12, "oracle")
    assert abs(unit[0] - want[0]) > 1e-2 and (unit[1] - want[1]).abs().max() > 1e-2 * want[1].abs().max()
    for got, ref, what in zip((loss, dq, dk, ds), want, ("loss", "dquery", "dkey", "dscale"), strict=True):
        _close(got, ref, 1e-12, what)
