"""normalize=False (docs/api.md, "normalize"): every op takes the rows as given; every backend against the
reference in float64 (Triton: fp32 inputs in the interpreter, against the float64 reference), values and the
gradients of every input including scale, through the one-pass, two-pass and double-backward routes."""

import pytest
import torch
import torch.nn.functional as F

import adassl_fast

IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]


def _rows(m, d, dtype, norm=1.0):
    """Rows of norm ~`norm` (not unit): normalising or not changes the loss."""
    return (torch.randn(m, d, dtype=torch.float64) * norm / d**0.5).to(dtype).requires_grad_()


def _call(op, impl, tensors, lam):
    a, b, *rest = tensors
    if op == "nt_xent":
        return adassl_fast.nt_xent(a, b, temperature=0.3, scale=lam, clamp=None, impl=impl, normalize=False)
    if op == "adassl":
        x, y, pxy, pyx, qxy, qyx, nxy, nyx = tensors
        l_ssl, l_reg = adassl_fast.adassl_nt_xent(x, y, pxy, pyx, qxy, qyx, temperature=0.3, scale=lam, clamp=None,
                                                  noise_xy=nxy, noise_yx=nyx, impl=impl, normalize=False)
        return l_ssl + 0.5 * l_reg
    sym = op != "info_nce_oneway"
    labels = torch.arange(a.shape[0]) % 3 if op == "labels" else None
    return adassl_fast.info_nce(a, b, temperature=0.3, scale=lam, symmetric=sym, impl=impl, normalize=False,
                                labels=labels)


def _inputs(op, dtype, norm=1.0):
    if op == "adassl":
        b, d = 11, 19
        return [_rows(b, d, dtype, norm), _rows(b, d, dtype, norm), *(_rows(b, 2 * d, dtype) for _ in range(4)),
                *(torch.randn(b, d, dtype=dtype) for _ in range(2))]
    m = 22 if op == "nt_xent" else 21
    return [_rows(m, 37, dtype, norm), _rows(m, 37, dtype, norm)]


def _value_and_grads(op, impl, tensors, lam):
    loss = _call(op, impl, tensors, lam)
    wrt = [t for t in tensors if t.requires_grad] + [lam]
    return loss, torch.autograd.grad(loss, wrt)


OPS = ["nt_xent", "info_nce", "info_nce_oneway", "labels", "adassl"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", IMPLS)
def test_backend_matches_reference_without_normalisation(op, impl):
    torch.manual_seed(OPS.index(op))
    dtype = torch.float64 if impl == "torch" else torch.float32
    tensors = _inputs(op, dtype)
    if impl == "triton":
        # fp32 rows taken as given become bf16 operands (docs/backends.md): rows that bf16 holds exactly leave
        # only fp32 accumulation here (the bf16 rounding bound is tested in tests/kernels/)
        tensors = [t.detach().bfloat16().float().requires_grad_(t.requires_grad) for t in tensors]
    lam = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    want, want_grads = _value_and_grads(op, "reference", [t.detach().double().requires_grad_(t.requires_grad)
                                                          for t in tensors], lam)
    got, grads = _value_and_grads(op, impl, tensors, lam)
    if impl == "triton" and op == "adassl":
        # the edited rows emb + r are formed in the kernel and rounded to bf16 there (2^-9 relative each):
        # the loss and each gradient to a relative-norm bound, as in tests/kernels/
        assert abs(got.item() - want.item()) <= 1e-2 * abs(want.item())
        for g, w in zip(grads, want_grads, strict=True):
            assert float((g.double() - w).norm()) <= 1e-2 * float(w.norm())
        return
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-4)
    torch.testing.assert_close(got.double(), want, **tol)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g.double(), w, **tol)


@pytest.mark.parametrize("op", ["nt_xent", "info_nce", "info_nce_oneway"])
def test_large_logits_take_the_shifted_path(op):
    """Rows of norm ~6 at tau = 0.3: |S| reaches ~120, where exp overflows float32 unless shifted (the bound must
    come from the row norms, not from |<u, v>| <= 1)."""
    torch.manual_seed(5)
    query, noise = _inputs(op, torch.float32, norm=6.0)
    tensors = [query, (query.detach() + noise.detach() / 6).requires_grad_()]  # positives' logits ~ 36 / tau
    lam = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    want, want_grads = _value_and_grads(op, "reference", [t.detach().double().requires_grad_() for t in tensors],
                                        lam)
    got, grads = _value_and_grads(op, "torch", tensors, lam)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-3, atol=1e-3)  # float32 sums of logits ~100


def test_reference_without_normalisation_is_the_plain_dot_product_cross_entropy():
    torch.manual_seed(1)
    q, k = torch.randn(9, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    want = F.cross_entropy(q @ k.t() / 0.4, torch.arange(9))
    got = adassl_fast.info_nce(q, k, temperature=0.4, symmetric=False, impl="reference", normalize=False)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)


def _normalised_call(op, tensors, lam):
    """The same op with normalize=True."""
    a, b = tensors[:2]
    if op == "nt_xent":
        return adassl_fast.nt_xent(a, b, temperature=0.3, scale=lam, clamp=None, impl="torch")
    if op == "adassl":
        x, y, pxy, pyx, qxy, qyx, nxy, nyx = tensors
        l_ssl, l_reg = adassl_fast.adassl_nt_xent(x, y, pxy, pyx, qxy, qyx, temperature=0.3, scale=lam, clamp=None,
                                                  noise_xy=nxy, noise_yx=nyx, impl="torch")
        return l_ssl + 0.5 * l_reg
    return adassl_fast.info_nce(a, b, temperature=0.3, scale=lam, symmetric=op != "info_nce_oneway", impl="torch",
                                labels=torch.arange(a.shape[0]) % 3 if op == "labels" else None)


@pytest.mark.parametrize("op", OPS)
def test_normalize_false_differs_from_true_on_unnormalised_rows(op):
    torch.manual_seed(2)
    tensors = [t.detach() for t in _inputs(op, torch.float64, norm=3.0)]
    lam = torch.tensor(1.0, dtype=torch.float64)
    assert abs(_call(op, "torch", tensors, lam).item() - _normalised_call(op, tensors, lam).item()) > 1e-3
    if op != "adassl":  # on unit rows the two agree (AdaSSL's edited rows are never unit)
        unit = [F.normalize(t, dim=1) for t in tensors]
        torch.testing.assert_close(_call(op, "torch", unit, lam), _normalised_call(op, unit, lam), rtol=1e-12,
                                   atol=1e-14)


@pytest.mark.parametrize("op", ["nt_xent", "info_nce", "info_nce_oneway"])
def test_double_backward_without_normalisation(op):
    """create_graph=True differentiates the reference with normalize=False (the ops' keyword options)."""
    torch.manual_seed(3)
    lam = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    inputs = [t.detach() for t in _inputs(op, torch.float64)]
    results = []
    for impl in ("reference", "torch"):
        tensors = [t.clone().requires_grad_() for t in inputs]
        (ga,) = torch.autograd.grad(_call(op, impl, tensors, lam), [tensors[0]], create_graph=True)
        results.append(torch.autograd.grad(ga.square().sum(), [*tensors, lam]))
    for g, w in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_modules_pass_normalize():
    torch.manual_seed(4)
    z0, z1 = torch.randn(6, 5, dtype=torch.float64) * 3, torch.randn(6, 5, dtype=torch.float64) * 3
    got = adassl_fast.nn.NTXentLoss(temperature=0.5, normalize=False, impl="torch")(z0, z1)
    want = adassl_fast.nt_xent(torch.cat([z1, z0]), torch.cat([z0, z1]), temperature=0.5, clamp=None,
                               impl="reference", normalize=False)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    got = adassl_fast.nn.InfoNCELoss(temperature=0.5, normalize=False, impl="torch")(z0, z1)
    want = adassl_fast.info_nce(z0, z1, temperature=0.5, impl="reference", normalize=False)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_normalize_must_be_a_bool():
    x = torch.randn(4, 3)
    for call in (adassl_fast.nt_xent, adassl_fast.info_nce):
        with pytest.raises(TypeError, match="normalize"):
            call(x, x, normalize=1)
