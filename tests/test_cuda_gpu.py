"""CUDA C++ backend against the references, on a GPU (skipped where torch sees no CUDA device).

Calls adassl_fast._cuda's entry points directly (docs/backends.md signatures) and compares values and
gradients with nt_xent_reference / adassl_nt_xent_reference (autograd) in float64 and at low precision,
at odd sizes that exercise partial tiles and padded feature dims."""

from __future__ import annotations

import pytest
import torch

from adassl_fast import _cuda, _library
from tests.precision import rel_err
from tests.rows_as_given import adassl_inputs, adassl_reference, core_loss, free_rows, leaves, symmetric_loss

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

SIZES = [(34, 24), (130, 37), (514, 128), (130, 128), (514, 24)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", params=["mma.sync", "wgmma"])
def tensor_core_path(request):
    """Every test on both bf16 / fp16 tile paths; module scope, so all mma.sync cases run first and a wgmma
    kernel that broke the CUDA context could not take them down. wgmma (ADASSL_FAST_CUDA_WGMMA=1): sm_90 only."""
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "mma.sync":
            mp.delenv(_cuda.WGMMA_ENV, raising=False)
        else:
            mp.setenv(_cuda.WGMMA_ENV, "1")
        yield request.param


@pytest.fixture(autouse=True)
def _on_tensor_core_path(request, tensor_core_path):
    if tensor_core_path == "wgmma":
        if torch.cuda.get_device_capability()[0] != 9:
            pytest.skip("the wgmma path needs an sm_90 device")
        if request.node.callspec.params.get("dtype") in (torch.float32, torch.float64):
            pytest.skip("fp32 / fp64 run the scalar kernels on either setting")
        assert _cuda.info()["wgmma"]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tol(dtype):
    # (loss abs tol, relative gradient-norm tol)
    return {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 2e-4)}.get(dtype, (2e-3, 3e-2))


def _indices(M, device):
    pos = torch.arange(M, device=device)
    return pos, (pos + M // 2) % M


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,d", SIZES)
@pytest.mark.parametrize("lam", [1.3, 3.0])
def test_cuda_nt_xent_matches_reference(dtype, M, d, lam):
    from adassl_fast.nt_xent import nt_xent_reference

    dev = "cuda"
    acc = _acc(dtype)
    cont = torch.randn(M, d, device=dev, dtype=dtype)
    targ = (cont.to(acc) + 0.7 * torch.randn(M, d, device=dev, dtype=acc)).to(dtype)
    scale = torch.tensor(lam, device=dev, dtype=acc)
    tau, clamp = 0.1, 20.0  # lam = 3 -> |S| up to 30: the clamp bites
    pos, excl = _indices(M, dev)

    loss, lse = _cuda.nt_xent_forward(cont, targ, pos, excl, scale, 1 / tau, clamp)
    gl = torch.tensor(1.7, device=dev, dtype=acc)
    dcont, dtarg, dscale = _cuda.nt_xent_backward(gl, cont, targ, pos, excl, scale, lse, 1 / tau, clamp, True)

    c, t, s = (x.detach().clone().requires_grad_(True) for x in (cont, targ, scale))
    ref = nt_xent_reference(c, t, temperature=tau, scale=s, clamp=clamp)
    rc, rt, rs = torch.autograd.grad(ref * gl, (c, t, s))

    ltol, gtol = _tol(dtype)
    assert loss.dtype == acc and lse.shape == (M,) and lse.dtype == acc
    assert dcont.dtype == dtype and dtarg.dtype == dtype and dscale.dtype == scale.dtype
    ref = ref.detach()
    assert abs(float(loss) - float(ref)) <= ltol * max(1.0, abs(float(ref)))
    assert rel_err(dcont, rc) < gtol, rel_err(dcont, rc)
    assert rel_err(dtarg, rt) < gtol, rel_err(dtarg, rt)
    assert abs(float(dscale) - float(rs)) <= gtol * max(1e-3, abs(float(rs))) * 3


def test_cuda_nt_xent_backward_is_deterministic():
    dev = "cuda"
    M, d = 514, 128
    cont = torch.randn(M, d, device=dev, dtype=torch.bfloat16)
    targ = torch.randn(M, d, device=dev, dtype=torch.bfloat16)
    scale = torch.tensor(1.0, device=dev)
    pos, excl = _indices(M, dev)
    _, lse = _cuda.nt_xent_forward(cont, targ, pos, excl, scale, 10.0, 20.0)
    gl = torch.tensor(1.0, device=dev)
    a = _cuda.nt_xent_backward(gl, cont, targ, pos, excl, scale, lse, 10.0, 20.0, True)
    b = _cuda.nt_xent_backward(gl, cont, targ, pos, excl, scale, lse, 10.0, 20.0, True)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_cuda_symmetric_info_nce_matches_reference(dtype):
    """The symmetric op on CUDA: two one-directional core calls per phase (adassl_fast/info_nce.py)."""
    import adassl_fast
    from adassl_fast.info_nce import info_nce_reference

    dev, N, d = "cuda", 130, 37
    q = torch.randn(N, d, device=dev, dtype=dtype, requires_grad=True)
    k = (q.detach().to(_acc(dtype)) + 0.7 * torch.randn(N, d, device=dev)).to(dtype).requires_grad_(True)
    s = torch.tensor(1.3, device=dev, dtype=_acc(dtype), requires_grad=True)
    loss = adassl_fast.info_nce(q, k, temperature=0.1, scale=s, clamp=5.0, impl="cuda")
    got = torch.autograd.grad(loss, (q, k, s))
    ins = [x.detach().double().requires_grad_(True) for x in (q, k, s)]
    ref = info_nce_reference(*ins[:2], temperature=0.1, scale=ins[2], clamp=5.0)
    want = torch.autograd.grad(ref, ins)
    ltol, gtol = _tol(dtype)
    assert abs(float(loss) - float(ref)) <= ltol * max(1.0, abs(float(ref)))
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 3 * gtol, rel_err(g, w)


def test_cuda_info_nce_rectangular():
    """info_nce one way: N != M columns, pos = arange, excl = -1, no clamp."""
    dev = "cuda"
    M, N, d = 130, 200, 37
    cont = torch.randn(M, d, device=dev, dtype=torch.float64)
    targ = torch.randn(N, d, device=dev, dtype=torch.float64)
    scale = torch.tensor(1.0, device=dev, dtype=torch.float64)
    pos = torch.arange(M, device=dev)
    excl = torch.full((M,), -1, device=dev, dtype=torch.long)
    loss, lse = _cuda.nt_xent_forward(cont, targ, pos, excl, scale, 5.0, None)
    c, t = cont.clone().requires_grad_(True), targ.clone().requires_grad_(True)
    logits = torch.nn.functional.normalize(c, dim=1) @ torch.nn.functional.normalize(t, dim=1).t() * 5.0
    ref = torch.nn.functional.cross_entropy(logits, pos)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.logsumexp(logits, 1).detach(), rtol=1e-12, atol=1e-12)
    gl = torch.tensor(1.0, device=dev, dtype=torch.float64)
    dc, dt, _ = _cuda.nt_xent_backward(gl, cont, targ, pos, excl, scale, lse, 5.0, None, True)
    rc, rt = torch.autograd.grad(ref, (c, t))
    torch.testing.assert_close(dc, rc, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dt, rt, rtol=1e-10, atol=1e-12)


def _core_reference(cont, targ, pos, excl, scale, inv_t, clamp, grad_loss):
    """float64 autograd reference of the nt_xent core (docs/backends.md) for arbitrary pos / excl (-1 = none).

    -> (loss, lse, dcont, dtarg, dscale)."""
    c, t, s = (x.detach().double().requires_grad_(True) for x in (cont, targ, scale))
    u = torch.nn.functional.normalize(c, dim=1, eps=1e-12)
    v = torch.nn.functional.normalize(t, dim=1, eps=1e-12)
    S = s * inv_t * (u @ v.t())
    Sc = S.clamp(-clamp, clamp) if clamp is not None else S
    M = c.shape[0]
    rows = torch.arange(M, device=c.device)
    mask = torch.zeros_like(S, dtype=torch.bool)
    has_e = excl >= 0
    mask[rows[has_e], excl[has_e]] = True
    lse = torch.logsumexp(Sc.masked_fill(mask, -torch.inf), 1)
    spos = torch.where(pos >= 0, Sc.gather(1, pos.clamp_min(0)[:, None])[:, 0], torch.zeros_like(lse))
    loss = (lse - spos).mean()
    dc, dt, ds = torch.autograd.grad(loss * float(grad_loss), (c, t, s))
    return loss.detach(), lse.detach(), dc, dt, ds


def _pattern(kind, M, N, dev, g):
    """pos / excl index patterns. "none": every tile of the core kernels is a plain tile; "diag": positives
    on the diagonal only; "mixed": random columns, about a third of the rows without a positive (-1) and a
    third without an excluded column, excl != pos."""
    ar = torch.arange(M)
    if kind == "none":
        pos = torch.full((M,), -1)
        excl = torch.full((M,), -1)
    elif kind == "diag":
        pos = ar % N
        excl = torch.full((M,), -1)
    else:
        pos = torch.randint(0, N, (M,), generator=g)
        excl = (pos + 1 + torch.randint(0, N - 1, (M,), generator=g)) % N
        pos[torch.rand(M, generator=g) < 1 / 3] = -1
        excl[torch.rand(M, generator=g) < 1 / 3] = -1
    return pos.to(dev), excl.to(dev)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "M,N,d,kind,clamp",
    [
        (300, 260, 48, "mixed", 20.0),  # ragged rows and columns, specials anywhere, pos = -1 rows
        (200, 330, 24, "mixed", None),
        (256, 192, 128, "none", 20.0),  # multiples of 64, no positive / excluded entry: plain tiles only
        (256, 192, 128, "none", None),  # the same without a clamp (the clamp-free plain-tile path)
        (128, 128, 64, "diag", 20.0),  # multiples of 64: specials on the diagonal tiles only
        (65, 63, 40, "diag", 20.0),  # one row / column past a tile
    ],
)
def test_cuda_core_arbitrary_indices(dtype, M, N, d, kind, clamp):
    dev = "cuda"
    acc = _acc(dtype)
    g = torch.Generator().manual_seed(M * 1000 + N)
    cont = torch.randn(M, d, generator=g).to(dev, dtype)
    targ = torch.randn(N, d, generator=g).to(dev, dtype)
    pos, excl = _pattern(kind, M, N, dev, g)
    scale = torch.tensor(3.0, device=dev, dtype=acc)  # scale / tau = 30: the clamp (20) bites
    inv_t = 10.0
    gl = torch.tensor(1.3, device=dev, dtype=acc)
    loss, lse = _cuda.nt_xent_forward(cont, targ, pos, excl, scale, inv_t, clamp)
    dcont, dtarg, dscale = _cuda.nt_xent_backward(gl, cont, targ, pos, excl, scale, lse, inv_t, clamp, True)
    r_loss, r_lse, rc, rt, rs = _core_reference(cont, targ, pos, excl, scale, inv_t, clamp, gl)

    ltol, gtol = _tol(dtype)
    assert abs(float(loss) - float(r_loss)) <= ltol * max(1.0, abs(float(r_loss)))
    assert float((lse.double() - r_lse).abs().max()) <= 5 * ltol * max(1.0, float(r_lse.abs().max()))
    assert rel_err(dcont, rc) < gtol, rel_err(dcont, rc)
    assert rel_err(dtarg, rt) < gtol, rel_err(dtarg, rt)
    assert abs(float(dscale) - float(rs)) <= gtol * max(1e-3, abs(float(rs))) * 3


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_entries_exactly_at_the_clamp_pass_their_gradient(dtype):
    # d = 1 and powers of two: every normalised row is exactly +-1 in every dtype and scale / tau = 20, so
    # every logit sits exactly on the clamp; the inclusive indicator gives d loss / d scale = sum G C / tau.
    dev = "cuda"
    acc = _acc(dtype)
    cont = torch.tensor([[1.0], [-2.0], [4.0], [0.5], [-0.25], [8.0]], device=dev, dtype=dtype)
    targ = torch.tensor([[2.0], [1.0], [-1.0], [4.0], [1.0], [-0.5]], device=dev, dtype=dtype)
    m = cont.shape[0]
    pos, excl = _indices(m, dev)
    scale = torch.tensor(2.0, device=dev, dtype=acc)
    _, lse = _cuda.nt_xent_forward(cont, targ, pos, excl, scale, 10.0, 20.0)
    gl = torch.tensor(1.0, device=dev, dtype=acc)
    _, _, dscale = _cuda.nt_xent_backward(gl, cont, targ, pos, excl, scale, lse, 10.0, 20.0, True)
    cos = torch.sign(cont.double()) @ torch.sign(targ.double()).t()
    logits = 20.0 * cos
    logits[pos, excl] = float("-inf")
    g = (torch.softmax(logits, 1) - torch.eye(m, dtype=torch.float64, device=dev)) / m
    expected = float((g * cos).sum() / 0.1)
    assert abs(expected) > 1.0
    rtol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)
    assert float(dscale) == pytest.approx(expected, rel=rtol)


def _ada_inputs(B, d, dtype, variant, dev="cuda"):
    acc = _acc(dtype)
    emb_x = torch.randn(B, d, device=dev, dtype=dtype)
    emb_y = (emb_x.to(acc) + 0.5 * torch.randn(B, d, device=dev, dtype=acc)).to(dtype)
    post_xy = torch.randn(B, 2 * d, device=dev, dtype=dtype)
    post_yx = torch.randn(B, 2 * d, device=dev, dtype=dtype)
    if variant == "v":
        prior_xy = torch.randn(B, 2 * d, device=dev, dtype=dtype)
        prior_yx = torch.randn(B, 2 * d, device=dev, dtype=dtype)
        noise_xy = torch.randn(B, d, device=dev, dtype=dtype)
        noise_yx = torch.randn(B, d, device=dev, dtype=dtype)
    else:
        prior_xy = torch.empty(0, device=dev, dtype=dtype)
        prior_yx = torch.empty(0, device=dev, dtype=dtype)
        noise_xy = torch.rand(B, d, device=dev, dtype=dtype)
        noise_yx = torch.rand(B, d, device=dev, dtype=dtype)
    return emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["v", "s"])
@pytest.mark.parametrize("M,d", [(34, 24), (130, 37), (514, 128)])
def test_cuda_adassl_matches_reference(dtype, variant, M, d):
    from adassl_fast.adassl import adassl_nt_xent_reference

    dev = "cuda"
    acc = _acc(dtype)
    B = M // 2
    ins = _ada_inputs(B, d, dtype, variant)
    scale = torch.tensor(1.2, device=dev, dtype=acc)
    tau, clamp = 0.1, 20.0
    l_ssl, l_reg, lse = _cuda.adassl_forward(*ins, scale, 1 / tau, clamp, variant)
    gs = torch.tensor(1.0, device=dev, dtype=acc)
    gr = torch.tensor(0.7, device=dev, dtype=acc)
    grads = _cuda.adassl_backward(gs, gr, *ins, scale, lse, 1 / tau, clamp, variant, True)

    leaves = [x.detach().clone().requires_grad_(True) for x in ins[:4]]
    if variant == "v":
        leaves += [x.detach().clone().requires_grad_(True) for x in ins[4:6]]
        priors = leaves[4:6]
    else:
        priors = [None, None]
    s = scale.clone().requires_grad_(True)
    r_ssl, r_reg = adassl_nt_xent_reference(
        *leaves[:4],
        *priors,
        variant=variant,
        temperature=tau,
        scale=s,
        clamp=clamp,
        noise_xy=ins[6],
        noise_yx=ins[7],
    )
    ref_grads = torch.autograd.grad(r_ssl * gs + r_reg * gr, [*leaves, s])

    ltol, gtol = _tol(dtype)
    if dtype in (torch.bfloat16, torch.float16):
        ltol, gtol = 5e-3, 4e-2  # the edited rows are rounded to the input dtype before the matrix product
    r_ssl, r_reg = r_ssl.detach(), r_reg.detach()
    assert abs(float(l_ssl) - float(r_ssl)) <= ltol * max(1.0, abs(float(r_ssl)))
    assert abs(float(l_reg) - float(r_reg)) <= ltol * max(1.0, abs(float(r_reg)))
    names = ["emb_x", "emb_y", "post_xy", "post_yx", "prior_xy", "prior_yx"]
    got = list(grads[:6]) if variant == "v" else list(grads[:4])
    for name, g, r in zip(names, got, ref_grads[:-1], strict=False):
        assert g.shape == r.shape and g.dtype == dtype, name
        assert rel_err(g, r) < gtol, (name, rel_err(g, r))
    if variant == "s":
        assert grads[4].numel() == 0 and grads[5].numel() == 0
    assert abs(float(grads[6]) - float(ref_grads[-1])) <= 3 * gtol * max(1e-3, abs(float(ref_grads[-1])))


@pytest.mark.parametrize("variant", ["v", "s"])
def test_cuda_adassl_backward_is_deterministic(variant):
    B, d = 257, 128  # M = 514: ragged last tile
    ins = _ada_inputs(B, d, torch.bfloat16, variant)
    scale = torch.tensor(1.2, device="cuda")
    _, _, lse = _cuda.adassl_forward(*ins, scale, 10.0, 20.0, variant)
    gs = torch.tensor(1.0, device="cuda")
    gr = torch.tensor(0.5, device="cuda")
    a = _cuda.adassl_backward(gs, gr, *ins, scale, lse, 10.0, 20.0, variant, True)
    b = _cuda.adassl_backward(gs, gr, *ins, scale, lse, 10.0, 20.0, variant, True)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------------------------------
# normalize=False: the rows as given (docs/backends.md), against the float64 oracle of tests/rows_as_given.py.
# |scale / tau| = 2.6 is below the clamp, which only rows of norm > 1 reach: the tensor-core kernels' clamp
# skip (clamp_live) must not apply to them.


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,d,clamp", [(34, 24, 3.0), (130, 37, None), (514, 128, 3.0), (130, 300, 3.0)])
def test_cuda_rows_as_given_nt_xent(dtype, M, d, clamp):
    dev, acc, inv_t = "cuda", _acc(dtype), 2.0
    cont = free_rows(M, d).to(dev)
    targ = cont.roll(1, 0) + free_rows(M, d).to(dev)
    pos, excl = _indices(M, dev)
    scale = torch.tensor(1.3, device=dev, dtype=acc)
    c, t, s = leaves(cont.to(dtype), targ.to(dtype), scale)  # the oracle sees the same (rounded) rows
    ref, _ = core_loss(c, t, pos, excl, s, inv_t, clamp, False)
    rc, rt, rs = torch.autograd.grad(ref, (c, t, s))
    loss, lse = _cuda.nt_xent_forward(cont.to(dtype), targ.to(dtype), pos, excl, scale, inv_t, clamp,
                                      normalize=False)
    dc, dt, ds = _cuda.nt_xent_backward(torch.tensor(1.0, device=dev, dtype=acc), cont.to(dtype), targ.to(dtype),
                                        pos, excl, scale, lse, inv_t, clamp, True, normalize=False)
    ltol, gtol = _tol(dtype)
    assert abs(float(loss) - float(ref)) <= ltol * max(1.0, abs(float(ref)))
    assert rel_err(dc, rc) < gtol and rel_err(dt, rt) < gtol, (rel_err(dc, rc), rel_err(dt, rt))
    assert abs(float(ds) - float(rs)) <= 3 * gtol * max(1e-3, abs(float(rs)))
    unit, _ = _cuda.nt_xent_forward(cont.to(dtype), targ.to(dtype), pos, excl, scale, inv_t, clamp)
    assert abs(float(unit) - float(loss)) > 1e-2  # the flag matters on rows of norm != 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_cuda_rows_as_given_symmetric_info_nce(dtype):
    dev, N, d, inv_t, clamp = "cuda", 130, 37, 2.0, 3.0
    query = free_rows(N, d).to(dev)
    key = query + free_rows(N, d).to(dev)
    scale = torch.tensor(1.3, device=dev, dtype=_acc(dtype))
    q, k, s = leaves(query.to(dtype), key.to(dtype), scale)
    ref, _ = symmetric_loss(q, k, s, inv_t, clamp, False)
    want = torch.autograd.grad(ref, (q, k, s))
    entry = _library.backend("cuda")
    loss, lse = entry.info_nce_forward(query.to(dtype), key.to(dtype), scale, inv_t, clamp, normalize=False)
    got = entry.info_nce_backward(torch.tensor(1.0, device=dev, dtype=scale.dtype), query.to(dtype), key.to(dtype),
                                  scale, lse, inv_t, clamp, True, normalize=False)
    ltol, gtol = _tol(dtype)
    assert abs(float(loss) - float(ref)) <= ltol * max(1.0, abs(float(ref)))
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 3 * gtol, rel_err(g, w)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", ["v", "s"])
def test_cuda_rows_as_given_adassl(dtype, variant):
    dev, B, d, inv_t, clamp = "cuda", 65, 37, 2.0, 3.0
    ins = [t.to(dev) for t in adassl_inputs(B, d, variant, dtype)]
    scale = torch.tensor(1.3, device=dev, dtype=_acc(dtype))
    r_ssl, r_reg, want = adassl_reference(ins, variant, scale, 1 / inv_t, clamp, 0.9, 0.6)
    l_ssl, l_reg, lse = _cuda.adassl_forward(*ins, scale, inv_t, clamp, variant, normalize=False)
    acc = scale.dtype
    out = _cuda.adassl_backward(torch.tensor(0.9, device=dev, dtype=acc), torch.tensor(0.6, device=dev, dtype=acc),
                                *ins, scale, lse, inv_t, clamp, variant, True, normalize=False)
    got = list(out[:4]) + (list(out[4:6]) if variant == "v" else []) + [out[6]]
    ltol, gtol = _tol(dtype)
    if dtype == torch.bfloat16:
        ltol, gtol = 5e-3, 4e-2  # the edited rows are rounded to the input dtype before the matrix product
    assert abs(float(l_ssl) - float(r_ssl)) <= ltol * max(1.0, abs(float(r_ssl)))
    assert abs(float(l_reg) - float(r_reg)) <= ltol * max(1.0, abs(float(r_reg)))
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 3 * gtol, rel_err(g, w)
