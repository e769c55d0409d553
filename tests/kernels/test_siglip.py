"""Triton SigLIP (kernels/siglip.py: the shared core's SIGMOID logits) against the float64 reference.

Runs in the Triton interpreter without a GPU (tests/conftest.py). float64 is exact to rounding; fp32 inputs go
through the fp16 operand path (configs.operand_dtype) with the bound derived below. Sizes are odd: N not a
multiple of any block, d not a power of two. Every buffer the launchers allocate starts as NaN.
"""

import math

import pytest
import torch

import adassl_fast
from adassl_fast.indices import diagonal_indices
from adassl_fast.kernels import launch
from adassl_fast.kernels import siglip as ksig
from adassl_fast.nn import SigLIPLoss
from adassl_fast.siglip import siglip_reference
from tests.kernels.sentinels import guards_intact, padded
from tests.kernels.shapes import shipped_block_shapes
from tests.precision import rel_err

pytestmark = pytest.mark.triton

F64 = torch.float64


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)


def _run(query, key, params, normalize, deterministic=True, num_splits=None, grad=1.0, config=None, configs=None):
    indices = diagonal_indices(query.shape[0], query.device)
    loss, lse = ksig.siglip_forward(query, key, params, indices=indices, normalize=normalize, num_splits=num_splits,
                                    config=config)
    g = torch.tensor(grad, dtype=loss.dtype)
    dq, dk, dp = ksig.siglip_backward(g, query, key, params, lse, deterministic, indices=indices, normalize=normalize,
                                      num_splits=num_splits, configs=configs)
    return loss, lse, dq, dk, dp


def _reference(query, key, params, normalize, grad=1.0, rounded=None):
    """float64 loss and gradients of (query, key, (scale, bias)); `rounded`: the unit (or raw) rows rounded to that
    dtype on the way (straight-through), as the kernels' matrix operands are."""
    q, k = (x.detach().to(F64).requires_grad_() for x in (query, key))
    s, b = (x.detach().to(F64).requires_grad_() for x in params)
    if rounded is None:
        loss = siglip_reference(q, k, scale=s, bias=b, normalize=normalize)
    else:
        u, v = (torch.nn.functional.normalize(x, dim=1) if normalize else x for x in (q, k))
        u, v = (x + (x.to(rounded).to(F64) - x).detach() for x in (u, v))
        z = 2 * torch.eye(len(u), dtype=F64) - 1
        loss = -torch.nn.functional.logsigmoid(z * (s * (u @ v.t()) + b)).sum() / len(u)
    dq, dk, ds, db = torch.autograd.grad(loss, (q, k, s, b), torch.tensor(grad, dtype=F64))
    return loss.detach(), dq, dk, torch.stack([ds, db])


def _close(a, b, tol, what):
    assert torch.isfinite(a).all(), what
    err = (a.to(F64) - b).abs().max().item()
    assert err <= tol, f"{what}: max err {err:.3e}"


def _inputs(N, d, dtype=F64, scale=3.0, bias=-2.0):
    query = torch.randn(N, d, dtype=dtype)
    key = (query.to(F64) + 0.7 * torch.randn(N, d, dtype=F64)).to(dtype)
    return query, key, torch.tensor([scale, bias], dtype=launch.stat_dtype(dtype))


CASES = [  # (N, d, normalize, deterministic, num_splits)
    (6, 5, True, True, 1),
    (37, 17, True, False, None),
    (37, 24, False, True, 1),
    (130, 37, True, True, 2),
    (130, 24, False, False, None),
    # 64-blocks in the interpreter: off-diagonal tiles take the unmasked fast path
    (300, 17, True, True, 1),
    # d in (128, 256] and (256, 512]: BLOCK_D 256 and 512, the widest GPU table entries
    (70, 130, True, False, None),
    (70, 300, False, True, None),
]


@pytest.mark.parametrize("N,d,normalize,deterministic,num_splits", CASES)
def test_matches_reference_float64(N, d, normalize, deterministic, num_splits):
    query, key, params = _inputs(N, d, scale=4.5, bias=-3.0)
    if not normalize:  # rows as given: keep the logits in a range where every term matters
        query, key = query / math.sqrt(d), key / math.sqrt(d)
    loss, lse, dq, dk, dp = _run(query, key, params, normalize, deterministic, num_splits, grad=0.7)
    r_loss, r_dq, r_dk, r_dp = _reference(query, key, params, normalize, grad=0.7)
    assert loss.dtype == F64 and lse.shape == (0,) and dp.shape == (2,) and dp.dtype == F64
    _close(loss, r_loss, 1e-12, "loss")
    _close(dq, r_dq, 1e-12, "dquery")
    _close(dk, r_dk, 1e-12, "dkey")
    _close(dp, r_dp, 1e-12, "dscale, dbias")


@pytest.mark.parametrize("scale,bias", [(10.0, -10.0), (30.0, 12.0), (1.0, -40.0)])
def test_saturated_logits_keep_every_term_float64(scale, bias):
    # SigLIP's initialisation (10, -10) and logits far into either tail: softplus's log(1 + e) with e ~ 2^-60 and
    # the positives' sigmoid(L) - 1 both lose everything to cancellation unless formed as the kernels do
    query, key, params = _inputs(37, 9, scale=scale, bias=bias)
    loss, _, dq, dk, dp = _run(query, key, params, True)
    r_loss, r_dq, r_dk, r_dp = _reference(query, key, params, True)
    assert abs(loss.item() - r_loss.item()) <= 1e-13 * r_loss.abs().item() + 1e-300
    for got, want, what in ((dq, r_dq, "dquery"), (dk, r_dk, "dkey"), (dp, r_dp, "dparams")):
        assert rel_err(got, want) < 1e-12, f"{what}: {rel_err(got, want):.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("kernel,cfg", shipped_block_shapes(), ids=lambda v: getattr(v, "name", v))
def test_every_shipped_block_shape_matches_reference_float64(kernel, cfg):
    # N = 150 as in tests/kernels/test_nt_xent.py: two or more owned blocks of every shape, the last partial,
    # column splits; the row kernel's shape runs both schedules (the atomic one is the row kernel's)
    query, key, params = _inputs(150, 24)
    r_loss, r_dq, r_dk, r_dp = _reference(query, key, params, True)
    indices = diagonal_indices(150, query.device)
    loss, lse = ksig.siglip_forward(query, key, params, indices=indices, config=cfg if kernel == "fwd" else None)
    _close(loss, r_loss, 1e-12, f"{cfg.name}: loss")
    for deterministic in (True, False) if kernel == "bwd_row" else (True,):
        dq, dk, dp = ksig.siglip_backward(torch.tensor(1.0, dtype=F64), query, key, params, lse, deterministic,
                                          indices=indices, configs={kernel: cfg})
        for got, want, what in ((dq, r_dq, "dquery"), (dk, r_dk, "dkey"), (dp, r_dp, "dparams")):
            _close(got, want, 1e-12, f"{cfg.name} deterministic={deterministic}: {what}")


FP16_UNIT = 2.0**-11  # the unit roundoff of the fp16 operands fp32 inputs are rounded to


@pytest.mark.parametrize("d,deterministic", [(37, True), (300, False)])
def test_float32_inputs_through_fp16_operands(d, deterministic):
    """fp32 inputs: fp32 norms, unit rows rounded once to fp16, fp32 terms, sums and gradient accumulation.

    Against float64 with the same rounding: accumulation error only. Against the unrounded float64 result, the
    bound the rounding gives: each cosine moves by at most delta_c = 2 u + u^2 (u = 2^-11), each logit by
    h = a delta_c (a the scale). softplus' slope is sigmoid, and sigmoid(x + t) <= sigmoid(x) e^|t|, so a term
    softplus(-z L) moves by at most sigmoid(-z L) e^h h: |d loss| <= e^h h (1/N) sum_ij sigmoid(-z_ij L_ij).
    sigmoid is 1/4-Lipschitz, so |dG_ij| <= h / 4N, and a row gradient a sum_j G_ij v_j moves by at most
    a (h / 4 + 3 u sum_j |G_ij|) (v_j rounded, and on a GPU G rounded to fp16 for the second product), which
    the normalisation backward (a projection) divides by |x_i|. A 1e-6 relative slack covers fp32 accumulation.
    """
    N, scale, bias = 130, 10.0, -10.0
    query, key, params = _inputs(N, d, torch.float32, scale, bias)
    query = query * 3.0
    loss, _, dq, dk, dp = _run(query, key, params, True, deterministic)
    assert loss.dtype == dp.dtype == dq.dtype == dk.dtype == torch.float32
    e_loss, e_dq, e_dk, e_dp = _reference(query, key, params, True, rounded=torch.float16)
    _close(loss, e_loss, 2e-6 * e_loss.abs().item(), "loss vs fp16-operand float64")
    for got, want, what in ((dq, e_dq, "dquery"), (dk, e_dk, "dkey"), (dp, e_dp, "dparams")):
        assert rel_err(got, want) < 1e-4, f"{what} vs fp16-operand float64: {rel_err(got, want):.2e}"
    r_loss, r_dq, r_dk, r_dp = _reference(query, key, params, True)
    u = torch.nn.functional.normalize(query.double(), dim=1)
    v = torch.nn.functional.normalize(key.double(), dim=1)
    logits = scale * (u @ v.t()) + bias
    z = 2 * torch.eye(N, dtype=F64) - 1
    h = scale * (2 * FP16_UNIT + FP16_UNIT**2)
    loss_bound = math.exp(h) * h * torch.sigmoid(-z * logits).sum().item() / N
    assert abs(loss.double() - r_loss).item() <= loss_bound + 1e-6 * r_loss.item()
    g_abs = (torch.sigmoid(logits) - torch.eye(N, dtype=F64)).abs() / N
    for got, want, x, g_rows in ((dq, r_dq, query, g_abs.sum(1)), (dk, r_dk, key, g_abs.sum(0))):
        row_bound = scale * (h / 4 + 3 * FP16_UNIT * g_rows) / x.double().norm(dim=1)
        err = (got.double() - want).norm(dim=1)
        assert (err <= row_bound + 1e-6 * want.norm(dim=1)).all(), (err / row_bound).max()


@pytest.mark.parametrize("deterministic", [True, False])
def test_float32_rows_as_given_stream_as_bf16(deterministic):
    """fp32 rows with normalize=False are bf16 operands (configs.operand_dtype): entries ~1e5 overflow fp16
    (a NaN loss), and bf16 keeps fp32's range. Against float64 with the same bf16 rounding: accumulation error."""
    N, d = 70, 37
    query, key, _ = _inputs(N, d, torch.float32)
    query, key = query * 1e5, key * 1e5
    params = torch.tensor([1e-11, -1.0], dtype=torch.float32)  # logits O(1) on rows of norm ~6e5
    loss, _, dq, dk, dp = _run(query, key, params, False, deterministic)
    e_loss, e_dq, e_dk, e_dp = _reference(query, key, params, False, rounded=torch.bfloat16)
    _close(loss, e_loss, 2e-6 * e_loss.abs().item(), "loss vs bf16-operand float64")
    for got, want, what in ((dq, e_dq, "dquery"), (dk, e_dk, "dkey"), (dp, e_dp, "dparams")):
        assert rel_err(got, want) < 1e-4, f"{what} vs bf16-operand float64: {rel_err(got, want):.2e}"


def test_deterministic_schedule_is_bitwise_reproducible():
    query, key, params = _inputs(130, 24, torch.float32)
    a = _run(query, key, params, True, True)
    b = _run(query, key, params, True, True)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("deterministic", [True, False])
def test_out_of_bounds_guarded_by_sentinels(deterministic):
    query, key, params = _inputs(34, 37)
    clean = _run(query, key, params, True, deterministic)
    # a block of 64 rows x 64 features reads far past both ends if any mask is wrong
    qbuf, qv = padded(query, 64 * 64, 64 * 64)
    kbuf, kv = padded(key, 64 * 64, 64 * 64)
    pbuf, pv = padded(params, 4, 4)  # the bias is read one past the scale
    guarded = _run(qv, kv, pv, True, deterministic)
    for x, y in zip(clean, guarded, strict=True):
        assert torch.equal(x, y)
    for buf, view in ((qbuf, qv), (kbuf, kv), (pbuf, pv)):
        assert guards_intact(buf, view)


@pytest.mark.parametrize("normalize, deterministic", [(True, True), (False, True), (True, False)])
def test_public_op_and_module_match_the_reference(normalize, deterministic, monkeypatch):
    schedules = []
    real = ksig.siglip_backward
    monkeypatch.setattr(ksig, "siglip_backward", lambda *a, **k: schedules.append(a[5]) or real(*a, **k))
    leaf = lambda *s: torch.randn(*s, dtype=F64, requires_grad=True)
    q, k = leaf(23, 11), leaf(23, 11)
    s, b = torch.tensor(5.0, dtype=F64, requires_grad=True), torch.tensor(-4.0, dtype=F64, requires_grad=True)
    found = adassl_fast.siglip(q, k, scale=s, bias=b, normalize=normalize, impl="triton", deterministic=deterministic)
    want = siglip_reference(q, k, scale=s, bias=b, normalize=normalize)
    _close(found, want, 1e-12, "loss")
    for got, ref, what in zip(torch.autograd.grad(1.5 * found, (q, k, s, b)),
                              torch.autograd.grad(1.5 * want, (q, k, s, b)), ("query", "key", "scale", "bias"),
                              strict=True):
        _close(got, ref, 1e-12, f"d{what}")
    assert schedules == [deterministic]
    module = SigLIPLoss(impl="triton").double()
    loss = module(q, k)
    grads = torch.autograd.grad(loss, (q, module.log_scale, module.bias))
    ref = siglip_reference(q, k, scale=module.log_scale.exp(), bias=module.bias)
    for got, want_g in zip(grads, torch.autograd.grad(ref, (q, module.log_scale, module.bias)), strict=True):
        _close(got, want_g, 1e-12, "module")
