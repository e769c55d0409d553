"""Triton nt_xent core (kernels/nt_xent.py) against the package reference and the backends.md formulas.

Runs in the Triton interpreter without a GPU (tests/conftest.py sets TRITON_INTERPRET=1 first). float64
checks are exact to rounding; bf16 goes through the kernels' fp32-upcast path with looser tolerances.
Sizes are odd on purpose: M not a multiple of any block, d not a power of two.
"""

import pytest
import torch

from adassl_fast.kernels import launch
from adassl_fast.kernels import nt_xent as ntx
from adassl_fast.nt_xent import nt_xent_reference
from tests.kernels.sentinels import guards_intact, padded
from tests.kernels.shapes import shipped_block_shapes
from tests.precision import rel_err
from tests.rows_as_given import core_loss, free_rows, leaves

pytestmark = pytest.mark.triton

F64 = torch.float64


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # every buffer the launchers allocate starts as NaN: unwritten elements cannot pass unnoticed
    monkeypatch.setattr(launch, "POISON", True)


def _nt_indices(M):
    idx = torch.arange(M)
    return idx, (idx + M // 2) % M


def _problem(M, d, dtype=F64):
    """Fresh random (cont, targ, pos, excl, scale) for nt_xent with the partner mask, scale 1."""
    pos, excl = _nt_indices(M)
    return torch.randn(M, d, dtype=dtype), torch.randn(M, d, dtype=dtype), pos, excl, torch.tensor(1.0, dtype=dtype)


def _run(cont, targ, pos, excl, scale, inv_t, clamp, deterministic=True, num_splits=None, grad=1.0, normalize=True):
    loss, lse = ntx.nt_xent_forward(cont, targ, pos, excl, scale, inv_t, clamp, normalize=normalize,
                                    num_splits=num_splits)
    g = torch.tensor(grad, dtype=loss.dtype)
    dc, dt, ds = ntx.nt_xent_backward(g, cont, targ, pos, excl, scale, lse, inv_t, clamp, deterministic,
                                      normalize=normalize, num_splits=num_splits)
    return loss, lse, dc, dt, ds


def _reference(cont, targ, scale, temperature, clamp, grad=1.0, dtype=F64):
    c = cont.detach().to(dtype).requires_grad_()
    t = targ.detach().to(dtype).requires_grad_()
    s = scale.detach().to(dtype).requires_grad_()
    loss = nt_xent_reference(c, t, temperature=temperature, scale=s, clamp=clamp)
    dc, dt, ds = torch.autograd.grad(loss, (c, t, s), torch.tensor(grad, dtype=dtype))
    return loss.detach(), dc, dt, ds


def _close(a, b, atol, rtol=0.0, what=""):
    a, b = a.to(F64), b.to(F64)
    assert torch.isfinite(a).all(), what
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"{what}: max err {err:.3e}"


CASES = [  # (M, d, clamp, deterministic, num_splits)
    (6, 5, None, True, 1),
    (6, 5, 20.0, False, None),
    (34, 24, 3.0, True, None),
    (34, 37, None, False, 1),
    (130, 37, 3.0, True, 1),
    (130, 24, 3.0, False, None),
    (130, 5, None, True, 2),
    # M = 300 with the interpreter's 64-blocks: tiles without a positive or excluded column take the
    # kernels' unmasked fast path (an active clamp there too)
    (300, 24, 3.0, True, 1),
    (300, 17, None, False, None),
    # d in (128, 256]: BLOCK_D 256; d in (256, 512]: BLOCK_D 512, the widest GPU table entry
    (70, 130, 3.0, True, None),
    (70, 300, None, False, None),
]


@pytest.mark.parametrize("M,d,clamp,deterministic,num_splits", CASES)
def test_matches_reference_float64(M, d, clamp, deterministic, num_splits):
    cont = torch.randn(M, d, dtype=F64)
    targ = cont.roll(1, 0) + 0.5 * torch.randn(M, d, dtype=F64)
    scale = torch.tensor(1.7, dtype=F64)
    temperature = 0.3
    pos, excl = _nt_indices(M)
    loss, lse, dc, dt, ds = _run(cont, targ, pos, excl, scale, 1 / temperature, clamp, deterministic,
                                 num_splits, grad=0.7)
    r_loss, r_dc, r_dt, r_ds = _reference(cont, targ, scale, temperature, clamp, grad=0.7)
    assert loss.dtype == F64 and lse.shape == (M,) and ds.dtype == F64 and ds.dim() == 0
    _close(loss, r_loss, 1e-12, what="loss")
    _close(dc, r_dc, 1e-12, what="dcont")
    _close(dt, r_dt, 1e-12, what="dtarg")
    _close(ds, r_ds, 1e-12, what="dscale")


@pytest.mark.slow
@pytest.mark.parametrize("kernel,cfg", shipped_block_shapes(), ids=lambda v: getattr(v, "name", v))
def test_every_shipped_block_shape_matches_reference_float64(kernel, cfg):
    # M = 150: two or more owned blocks of every shape, the last one partial, and column splits (auto: ~2 waves
    # of 132 SMs); the backward shape runs in both schedules (the atomic one is the row kernel's)
    M, d, clamp, temperature = 150, 24, 3.0, 0.3
    cont, targ, pos, excl, _ = _problem(M, d)
    scale = torch.tensor(1.7, dtype=F64)
    r_loss, r_dc, r_dt, r_ds = _reference(cont, targ, scale, temperature, clamp)
    loss, lse = ntx.nt_xent_forward(cont, targ, pos, excl, scale, 1 / temperature, clamp,
                                    config=cfg if kernel == "fwd" else None)
    _close(loss, r_loss, 1e-12, what=f"{cfg.name}: loss")
    for deterministic in (True, False) if kernel == "bwd_row" else (True,):
        dc, dt, ds = ntx.nt_xent_backward(torch.tensor(1.0, dtype=F64), cont, targ, pos, excl, scale, lse,
                                          1 / temperature, clamp, deterministic, configs={kernel: cfg})
        for got, want, what in ((dc, r_dc, "dcont"), (dt, r_dt, "dtarg"), (ds, r_ds, "dscale")):
            _close(got, want, 1e-12, what=f"{cfg.name} deterministic={deterministic}: {what}")


def _formula(cont, targ, pos, excl, scale, inv_t, clamp):
    """docs/backends.md, written out with autograd: general pos (-1: none) and excl (-1: none)."""
    u = cont / cont.norm(dim=1, keepdim=True).clamp_min(1e-12)
    v = targ / targ.norm(dim=1, keepdim=True).clamp_min(1e-12)
    S = scale * inv_t * (u @ v.t())
    if clamp is not None:
        S = torch.where(S.abs() <= clamp, S, S.detach().clamp(-clamp, clamp))
    rows = torch.arange(S.shape[0])
    dropped = torch.zeros_like(S, dtype=torch.bool)
    dropped[rows[excl >= 0], excl[excl >= 0]] = True
    lse = torch.logsumexp(S.masked_fill(dropped, float("-inf")), 1)
    positive = torch.where(pos >= 0, S[rows, pos.clamp_min(0)], torch.zeros((), dtype=S.dtype))
    return (lse - positive).mean(), lse


@pytest.mark.parametrize("M,N,d,clamp,deterministic,num_splits", [
    (37, 70, 24, 2.5, True, None),
    (70, 37, 37, 2.5, False, 1),
    (23, 130, 5, None, True, 2),
])
def test_general_pos_excl_float64(M, N, d, clamp, deterministic, num_splits):
    cont = torch.randn(M, d, dtype=F64, requires_grad=True)
    targ = torch.randn(N, d, dtype=F64, requires_grad=True)
    scale = torch.tensor(1.3, dtype=F64, requires_grad=True)
    pos = torch.randint(0, N, (M,))
    pos[::5] = -1  # rows whose positive lives in another block of columns (ring schedule)
    excl = torch.randint(-1, N, (M,))  # includes -1 (info_nce style) and random columns
    inv_t = 1 / 0.25
    r_loss, r_lse = _formula(cont, targ, pos, excl, scale, inv_t, clamp)
    r_dc, r_dt, r_ds = torch.autograd.grad(r_loss, (cont, targ, scale), torch.tensor(1.3, dtype=F64))
    loss, lse, dc, dt, ds = _run(cont.detach(), targ.detach(), pos, excl, scale.detach(), inv_t, clamp,
                                 deterministic, num_splits, grad=1.3)
    _close(loss, r_loss, 1e-12, what="loss")
    _close(lse, r_lse, 1e-12, what="lse")
    _close(dc, r_dc, 1e-12, what="dcont")
    _close(dt, r_dt, 1e-12, what="dtarg")
    _close(ds, r_ds, 1e-12, what="dscale")


@pytest.mark.parametrize("deterministic", [True, False])
def test_entries_exactly_at_the_clamp(deterministic):
    # d = 1 with power-of-two magnitudes: every cosine is exactly +-1 and scale / tau == clamp, so every
    # logit sits exactly on +-clamp; the inclusive indicator keeps all their gradients (dscale != 0).
    M = 10
    cont = torch.tensor([1.0, -2.0, 0.5, 4.0, -1.0, 2.0, -0.5, 1.0, 8.0, -4.0], dtype=F64)[:, None]
    targ = torch.tensor([2.0, 1.0, -1.0, 0.25, 1.0, -2.0, 1.0, 0.5, -1.0, 2.0], dtype=F64)[:, None]
    scale = torch.tensor(2.0, dtype=F64)
    temperature, clamp = 0.5, 4.0
    pos, excl = _nt_indices(M)
    loss, lse, dc, dt, ds = _run(cont, targ, pos, excl, scale, 1 / temperature, clamp, deterministic)
    r_loss, r_dc, r_dt, r_ds = _reference(cont, targ, scale, temperature, clamp)
    assert r_ds.abs().item() > 1e-3
    _close(loss, r_loss, 1e-12, what="loss")
    _close(dc, r_dc, 1e-12, what="dcont")
    _close(dt, r_dt, 1e-12, what="dtarg")
    _close(ds, r_ds, 1e-12, what="dscale")


def _rounded_operands_reference(cont, targ, scale, temperature, clamp, dtype):
    """float64 nt_xent whose normalised rows are rounded to `dtype` (straight-through), as the kernels'
    matrix operands are: what the kernels should match to accumulation error."""
    c, t = cont.to(F64).requires_grad_(), targ.to(F64).requires_grad_()
    s = scale.to(F64).requires_grad_()
    u, v = torch.nn.functional.normalize(c, dim=1), torch.nn.functional.normalize(t, dim=1)
    u = u + (u.to(dtype).to(F64) - u).detach()
    v = v + (v.to(dtype).to(F64) - v).detach()
    S = s / temperature * (u @ v.t())
    if clamp is not None:
        S = torch.where(S.abs() <= clamp, S, S.detach().clamp(-clamp, clamp))
    rows = torch.arange(S.shape[0])
    pos, excl = _nt_indices(S.shape[0])
    loss = (torch.logsumexp(S.index_put((rows, excl), torch.tensor(float("-inf"), dtype=F64)), 1)
            - S[rows, pos]).mean()
    return (loss.detach(), *torch.autograd.grad(loss, (c, t, s)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,deterministic", [(37, True), (300, False)])  # on a GPU: the d <= 128 / 512 entries
def test_half_precision_through_upcast(dtype, d, deterministic):
    M = 130
    cont = torch.randn(M, d).to(dtype)
    targ = (cont.float() + 0.5 * torch.randn(M, d)).to(dtype)
    scale = torch.tensor(1.5)
    pos, excl = _nt_indices(M)
    # grad_loss 2^12 lifts the fp16 gradients (~3e-8 at d = 300 for grad_loss 1) out of fp16's subnormal range,
    # where no kernel could store them closer than tens of percent; dividing it out again is exact
    lift = 2.0**12
    loss, lse, dc, dt, ds = _run(cont, targ, pos, excl, scale, 10.0, 20.0, deterministic, grad=lift)
    assert dc.dtype == dtype and dt.dtype == dtype and loss.dtype == torch.float32
    assert all(torch.isfinite(x).all() for x in (loss, lse, dc, dt, ds))
    dc, dt, ds = (g.to(F64) / lift for g in (dc, dt, ds))
    # Against float64 with the same operand rounding: only accumulation order (and, on a GPU, G rounded
    # to the input dtype for the second product) separates them.
    e_loss, e_dc, e_dt, e_ds = _rounded_operands_reference(cont, targ, scale, 0.1, 20.0, dtype)
    _close(loss, e_loss, 1e-5, 1e-5, what="loss vs rounded-operand float64")
    for got, want, what in ((dc, e_dc, "dcont"), (dt, e_dt, "dtarg"), (ds, e_ds, "dscale")):
        assert rel_err(got, want) < 5e-3, f"{what} vs rounded-operand float64: {rel_err(got, want):.2e}"
    # Against float64 on the unrounded values: rounding unit vectors to bf16 moves each logit by ~2^-9
    # scale / tau, and the gradients (sums with heavy cancellation, sum_j G_ij ~ 0) by up to ~1 % at
    # scale / tau = 15 (bf16), as in an autocast run of the reference, which also rounds S itself.
    r_loss, r_dc, r_dt, r_ds = _reference(cont, targ, scale, 0.1, 20.0)
    _close(loss, r_loss, 1e-4, 1e-5, what="loss")
    _close(ds, r_ds, 1e-4, 1e-3, what="dscale")
    for got, want, what in ((dc, r_dc, "dcont"), (dt, r_dt, "dtarg")):
        assert rel_err(got, want) < 3e-2, f"{what}: relative error {rel_err(got, want):.2e}"


# fp16's unit roundoff: the kernels round fp32 inputs' unit rows to fp16 once (configs.operand_dtype)
FP16_UNIT = 2.0**-11


@pytest.mark.parametrize("d,deterministic,clamp", [(37, True, None), (300, False, 20.0), (5, True, 20.0)])
def test_float32_inputs_through_fp16_operands(d, deterministic, clamp):
    """fp32 inputs: fp32 norms, unit rows rounded once to fp16, fp32 statistics and gradient accumulation, fp32
    gradients. Against float64 (docs/backends.md, "fp32 inputs") with a bound derived from that rounding alone:
    each unit-row entry moves by at most FP16_UNIT relatively, so every cosine by at most
    delta_c = 2 FP16_UNIT + FP16_UNIT^2 (Cauchy-Schwarz) and every logit by delta = s / tau * delta_c. Then
    |d loss| <= 2 delta (the LSE is 1-Lipschitz in the max norm), a softmax row moves by at most 2 delta in
    l1, so a row gradient before the normalisation backward moves by at most s / tau / M (2 delta +
    2 FP16_UNIT (v rounded) + 2 FP16_UNIT (G rounded to fp16 on a GPU)), and the normalisation backward
    (a projection) scales that by 1 / |x_i|; dscale moves by at most (2 delta + 2 delta_c) / tau."""
    M, scale_value, temperature = 130, 1.5, 0.1
    cont = torch.randn(M, d) * 3.0
    targ = (cont.roll(1, 0) + 0.5 * torch.randn(M, d)) * 0.2
    scale = torch.tensor(scale_value)
    pos, excl = _nt_indices(M)
    loss, lse, dc, dt, ds = _run(cont, targ, pos, excl, scale, 1 / temperature, clamp, deterministic)
    assert loss.dtype == lse.dtype == ds.dtype == torch.float32
    assert dc.dtype == dt.dtype == torch.float32
    # the same rounding in float64: only fp32 accumulation separates the kernels from it
    e_loss, e_dc, e_dt, e_ds = _rounded_operands_reference(cont, targ, scale, temperature, clamp, torch.float16)
    _close(loss, e_loss, 2e-6, 1e-6, what="loss vs fp16-operand float64")
    for got, want, what in ((dc, e_dc, "dcont"), (dt, e_dt, "dtarg"), (ds, e_ds, "dscale")):
        assert rel_err(got, want) < 1e-4, f"{what} vs fp16-operand float64: {rel_err(got, want):.2e}"
    # the derived bound against float64 on the unrounded inputs (a clamp of 20 never binds at s / tau = 15)
    r_loss, r_dc, r_dt, r_ds = _reference(cont, targ, scale, temperature, clamp)
    s_tau = scale_value / temperature
    delta_c = 2 * FP16_UNIT + FP16_UNIT**2
    delta = s_tau * delta_c
    assert abs(loss.double() - r_loss).item() <= 2 * delta
    assert abs(ds.double() - r_ds).item() <= (2 * delta + 2 * delta_c) / temperature
    row_bound = s_tau / M * (2 * delta + 4 * FP16_UNIT)
    for got, want, x in ((dc, r_dc, cont), (dt, r_dt, targ)):
        err = (got.double() - want).norm(dim=1)
        assert (err <= row_bound / x.double().norm(dim=1)).all(), (err * x.double().norm(dim=1)).max() / row_bound


def test_deterministic_schedule_is_bitwise_reproducible():
    cont, targ, pos, excl, scale = _problem(130, 24, torch.float32)
    a = _run(cont, targ, pos, excl, scale, 5.0, None, True)
    b = _run(cont, targ, pos, excl, scale, 5.0, None, True)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("deterministic,normalize", [(True, True), (False, True), (False, False)])
def test_out_of_bounds_guarded_by_sentinels(deterministic, normalize):
    cont, targ, pos, excl, scale = _problem(34, 37)
    clean = _run(cont, targ, pos, excl, scale, 4.0, 20.0, deterministic, normalize=normalize)
    # a block of 64 rows x 64 features reads far past both ends if any mask is wrong
    cbuf, cv = padded(cont, 64 * 64, 64 * 64)
    tbuf, tv = padded(targ, 64 * 64, 64 * 64)
    pbuf, pv = padded(pos, 64, 64, fill=-(2**40))
    ebuf, ev = padded(excl, 64, 64, fill=2**40)
    guarded = _run(cv, tv, pv, ev, scale, 4.0, 20.0, deterministic, normalize=normalize)
    for x, y in zip(clean, guarded, strict=True):
        assert torch.equal(x, y)
    for buf, view in ((cbuf, cv), (tbuf, tv)):
        assert guards_intact(buf, view)


def test_zero_rows_take_the_eps_branch():
    cont, targ, pos, excl, scale = _problem(6, 5)
    cont[2] = 0.0
    targ[4] = 1e-14  # below eps: the clamp_min branch of F.normalize
    loss, lse, dc, dt, ds = _run(cont, targ, pos, excl, scale, 2.0, None)
    r_loss, r_dc, r_dt, r_ds = _reference(cont, targ, scale, 0.5, None)
    _close(loss, r_loss, 1e-12, what="loss")
    _close(dc, r_dc, 1e-12 * max(1.0, r_dc.abs().max().item()), what="dcont")
    _close(dt, r_dt, 1e-12 * max(1.0, r_dt.abs().max().item()), what="dtarg")
    _close(ds, r_ds, 1e-12, what="dscale")


# ----------------------------------------------------------------------------------------------------
# normalize=False: the rows as given (docs/backends.md), against the float64 oracle of tests/rows_as_given.py.


def _as_given_indices(M, N):
    """nt_xent's partner indices where M == N, else random positives and exclusions with -1 entries."""
    if M == N:
        return _nt_indices(M)
    pos, excl = torch.randint(0, N, (M,)), torch.randint(-1, N, (M,))
    pos[::5] = -1
    return pos, excl


def _as_given_reference(cont, targ, pos, excl, scale, inv_t, clamp, grad, normalize=False, operand_dtype=None):
    c, t, s = leaves(cont, targ, scale)
    loss, lse = core_loss(c, t, pos, excl, s, inv_t, clamp, normalize, operand_dtype)
    return (loss.detach(), lse.detach(), *torch.autograd.grad(loss, (c, t, s), torch.tensor(grad, dtype=F64)))


AS_GIVEN_CASES = [  # (M, N, d, clamp, deterministic, num_splits)
    (6, 6, 5, None, True, 1),
    (34, 34, 37, 3.0, False, None),
    (130, 130, 24, 3.0, True, 2),
    # 64-blocks in the interpreter: most tiles take the unmasked fast path, with the clamp
    (300, 300, 17, 3.0, False, 1),
    (37, 70, 24, 2.9, True, None),  # N != M, positives and exclusions anywhere (-1 included)
    (70, 37, 37, None, False, 1),
    (70, 70, 130, 3.0, False, None),  # BLOCK_D 256
    (70, 70, 300, 3.0, True, None),  # BLOCK_D 512
]


@pytest.mark.parametrize("M,N,d,clamp,deterministic,num_splits", AS_GIVEN_CASES)
def test_rows_as_given_match_float64(M, N, d, clamp, deterministic, num_splits):
    # |scale / tau| = 2.6 is below the clamp: for unit rows no logit could reach it (the kernels skip the clamp
    # there, tiles.clamp_binds), but rows of norm up to 2.5 give |S| up to 16
    cont = free_rows(M, d)
    # partners nearby (as in training) where the rows pair up, so wide rows still reach the clamp
    targ = cont.roll(1, 0) + free_rows(N, d) if M == N else free_rows(N, d)
    pos, excl = _as_given_indices(M, N)
    scale, inv_t = torch.tensor(1.3, dtype=F64), 2.0
    r_loss, r_lse, r_dc, r_dt, r_ds = _as_given_reference(cont, targ, pos, excl, scale, inv_t, clamp, 0.7)
    if clamp is not None:
        assert (scale * inv_t * (cont @ targ.t())).abs().max() > clamp > 1.01 * scale * inv_t
    loss, lse, dc, dt, ds = _run(cont, targ, pos, excl, scale, inv_t, clamp, deterministic, num_splits, grad=0.7,
                                 normalize=False)
    _close(loss, r_loss, 1e-12, what="loss")
    _close(lse, r_lse, 1e-12, what="lse")
    _close(dc, r_dc, 1e-12, what="dcont")
    _close(dt, r_dt, 1e-12, what="dtarg")
    _close(ds, r_ds, 1e-12, what="dscale")


@pytest.mark.parametrize("deterministic", [True, False])
def test_normalize_false_is_not_normalize_true(deterministic):
    """On rows whose norms are not 1 the two settings give different results, each its own oracle's."""
    M, d, clamp, inv_t = 70, 24, 3.0, 2.0
    cont, targ = free_rows(M, d), free_rows(M, d)
    pos, excl = _nt_indices(M)
    scale = torch.tensor(1.3, dtype=F64)
    results = {}
    for normalize in (True, False):
        got = _run(cont, targ, pos, excl, scale, inv_t, clamp, deterministic, normalize=normalize)
        want = _as_given_reference(cont, targ, pos, excl, scale, inv_t, clamp, 1.0, normalize=normalize)
        for a, b, what in zip(got, want, ("loss", "lse", "dcont", "dtarg", "dscale"), strict=True):
            _close(a, b, 1e-12, what=f"normalize={normalize}: {what}")
        results[normalize] = got
    for a, b, what in zip(results[True], results[False], ("loss", "lse", "dcont", "dtarg", "dscale"), strict=True):
        assert (a - b).abs().max() > 1e-2 * b.abs().max(), f"{what} does not depend on normalize"


@pytest.mark.slow
@pytest.mark.parametrize("kernel,cfg", shipped_block_shapes(), ids=lambda v: getattr(v, "name", v))
def test_every_shipped_block_shape_rows_as_given_float64(kernel, cfg):
    # as test_every_shipped_block_shape_matches_reference_float64, with normalize=False and rows of norm != 1
    M, d, clamp, inv_t = 150, 24, 3.0, 2.0
    cont, targ = free_rows(M, d), free_rows(M, d)
    pos, excl = _nt_indices(M)
    scale = torch.tensor(1.3, dtype=F64)
    r_loss, r_lse, r_dc, r_dt, r_ds = _as_given_reference(cont, targ, pos, excl, scale, inv_t, clamp, 1.0)
    loss, lse = ntx.nt_xent_forward(cont, targ, pos, excl, scale, inv_t, clamp, normalize=False,
                                    config=cfg if kernel == "fwd" else None)
    _close(loss, r_loss, 1e-12, what=f"{cfg.name}: loss")
    for deterministic in (True, False) if kernel == "bwd_row" else (True,):
        dc, dt, ds = ntx.nt_xent_backward(torch.tensor(1.0, dtype=F64), cont, targ, pos, excl, scale, lse, inv_t,
                                          clamp, deterministic, normalize=False, configs={kernel: cfg})
        for got, want, what in ((dc, r_dc, "dcont"), (dt, r_dt, "dtarg"), (ds, r_ds, "dscale")):
            _close(got, want, 1e-12, what=f"{cfg.name} deterministic={deterministic}: {what}")


# bf16's unit roundoff: fp32 rows taken as given are rounded once to bf16 operands (configs.operand_dtype)
BF16_UNIT = 2.0**-9


@pytest.mark.parametrize("magnitude,d,deterministic", [(1.0, 37, True), (1.0, 300, False), (1e6, 24, False),
                                                       (1e-6, 24, True)])
def test_float32_rows_as_given_through_bf16_operands(magnitude, d, deterministic):
    """fp32 rows taken as given: rounded once to bf16 operands (fp32's exponent range: rows of 1e6 hold
    elements past fp16's 65504, rows of 1e-6 elements below its normal range, 6e-5), fp32 statistics and
    gradient accumulation, fp32 gradients, no normalisation backward. Against float64 with a bound derived from
    that rounding alone (docs/backends.md): each operand entry moves by at most BF16_UNIT relatively, so each
    <c_i, t_j> by at most dC = (2 BF16_UNIT + BF16_UNIT^2) |c|max |t|max (Cauchy-Schwarz) and each logit by
    delta = |s| / tau dC. Then |d loss| <= 2 delta; a softmax row moves by at most 2 delta in l1, so row i's
    gradient s / tau / M sum_j G_ij t_j by at most s / tau / M (2 delta (1 + u) |t|max + 2 u |t|max + 2 u |t|max)
    (the rounded t, and G rounded to bf16 on a GPU), and the column gradients, summed over columns, by M times
    that with |c|max; dscale = 1 / tau / M sum_ij G_ij C_ij by 1 / tau (2 delta (1 + u) C + 2 dC + 2 u C)."""
    M, temperature = 130, 0.1
    cont = free_rows(M, d, torch.float32) * magnitude
    targ = free_rows(M, d, torch.float32) * magnitude
    scale = torch.tensor(1.5 / magnitude**2)  # the logits stay O(10) whatever the magnitude of the rows
    pos, excl = _nt_indices(M)
    loss, lse, dc, dt, ds = _run(cont, targ, pos, excl, scale, 1 / temperature, None, deterministic, normalize=False)
    assert loss.dtype == lse.dtype == ds.dtype == dc.dtype == dt.dtype == torch.float32
    assert all(torch.isfinite(x).all() for x in (loss, lse, dc, dt, ds))
    # the same rounding in float64: only fp32 accumulation separates the kernels from it
    e_loss, _, e_dc, e_dt, e_ds = _as_given_reference(cont, targ, pos, excl, scale, 1 / temperature, None, 1.0,
                                                      operand_dtype=torch.bfloat16)
    assert abs(loss.double() - e_loss).item() <= 1e-5 * max(1.0, e_loss.abs().item())
    for got, want, what in ((dc, e_dc, "dcont"), (dt, e_dt, "dtarg"), (ds, e_ds, "dscale")):
        assert rel_err(got, want) < 1e-4, f"{what} vs bf16-operand float64: {rel_err(got, want):.2e}"
    # the derived bound against float64 on the unrounded rows
    r_loss, _, r_dc, r_dt, r_ds = _as_given_reference(cont, targ, pos, excl, scale, 1 / temperature, None, 1.0)
    u = BF16_UNIT
    c_max, t_max = cont.double().norm(dim=1).max().item(), targ.double().norm(dim=1).max().item()
    s_tau = abs(scale.item()) / temperature
    d_c = (2 * u + u**2) * c_max * t_max
    delta = s_tau * d_c
    assert abs(loss.double() - r_loss).item() <= 2 * delta
    assert abs(ds.double() - r_ds).item() <= (2 * delta * (1 + u) * c_max * t_max + 2 * d_c + 2 * u * c_max * t_max
                                              ) / temperature
    row_bound = s_tau / M * (2 * delta * (1 + u) + 4 * u) * t_max
    assert (dc.double() - r_dc).norm(dim=1).max().item() <= row_bound
    assert (dt.double() - r_dt).norm(dim=1).sum().item() <= s_tau * (2 * delta * (1 + u) + 4 * u) * c_max
