"""SigLIP's sigmoid loss: the reference against the paper's formula, the torch backend against the reference
(values and the gradients of query, key, scale and bias, float64), the op's routes, nn.SigLIPLoss."""

import math

import pytest
import torch

import adassl_fast
from adassl_fast import _dispatch, siglip, torch_backend
from adassl_fast.nn import SigLIPLoss
from adassl_fast.siglip import _ops, siglip_reference

F64 = torch.float64


def _inputs(n, d, scale=3.0, bias=-2.0):
    leaf = lambda *s: torch.randn(*s, dtype=F64, requires_grad=True)
    param = lambda x: torch.tensor(x, dtype=F64, requires_grad=True)
    return leaf(n, d), leaf(n, d), param(scale), param(bias)


def _paper_loss(x, y, t, b, normalize):
    """Zhai et al. 2023 (Sigmoid Loss for Language Image Pre-Training), eq. 1, written out term by term:
    -1/|B| sum_i sum_j log 1 / (1 + exp(z_ij (-t x_i . y_j - b))), z_ij = 1 for matching pairs, else -1."""
    rows = lambda m: m.detach().tolist()
    x, y = rows(x), rows(y)
    if normalize:
        unit = lambda r: [e / math.sqrt(sum(f * f for f in r)) for e in r]
        x, y = [unit(r) for r in x], [unit(r) for r in y]
    total = 0.0
    for i, xi in enumerate(x):
        for j, yj in enumerate(y):
            z = 1.0 if i == j else -1.0
            dot = sum(a * c for a, c in zip(xi, yj, strict=True))
            total += math.log(1.0 / (1.0 + math.exp(z * (-t * dot - b))))
    return -total / len(x)


@pytest.mark.parametrize("normalize", [True, False])
def test_reference_is_the_papers_formula(normalize):
    q, k, _, _ = _inputs(5, 3)
    loss = siglip_reference(q, k, scale=4.5, bias=-1.5, normalize=normalize)
    assert loss.item() == pytest.approx(_paper_loss(q, k, 4.5, -1.5, normalize), rel=1e-13)


def _loss_and_grads(impl, q, k, s, b, normalize):
    loss = siglip(q, k, scale=s, bias=b, normalize=normalize, impl=impl)
    return (loss, *torch.autograd.grad(loss, [q, k, s, b]))


def _assert_close(found, want):
    for f, w in zip(found, want, strict=True):
        torch.testing.assert_close(f, w, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n, d", [(7, 5), (37, 3)])
def test_torch_backend_matches_the_reference(monkeypatch, normalize, n, d):
    monkeypatch.setattr(torch_backend, "SLAB_ELEMENTS", 16)  # 16 rows a block: N = 37 takes three blocks
    q, k, s, b = _inputs(n, d, scale=torch.rand(()).item() * 10 + 1, bias=-torch.rand(()).item() * 5)
    want = _loss_and_grads("reference", q, k, s, b, normalize)
    _assert_close(_loss_and_grads("torch", q, k, s, b, normalize), want)
    with torch.no_grad():  # the forward alone
        _assert_close([siglip(q, k, scale=s, bias=b, normalize=normalize, impl="torch")], want[:1])


def test_two_pass_backward_and_float_parameters_match_the_reference(monkeypatch):
    monkeypatch.setattr(torch_backend, "SLAB_ELEMENTS", 16)
    q, k, s, b = _inputs(21, 9)
    params = torch.stack([s, b])
    loss = _ops.forward(q, k, params, "torch", True, True)[0]  # the two-pass op: its backward recomputes the slabs
    found = (loss, *torch.autograd.grad(2.5 * loss, [q, k, s, b]))
    ref = siglip_reference(q, k, scale=s, bias=b)
    _assert_close(found, (ref, *torch.autograd.grad(2.5 * ref, [q, k, s, b])))
    floats = siglip(q, k, scale=s.item(), bias=b.item(), impl="torch")
    dq, dk = torch.autograd.grad(floats, [q, k])
    ref = siglip_reference(q, k, scale=s.item(), bias=b.item())
    _assert_close((floats, dq, dk), (ref, *torch.autograd.grad(ref, [q, k])))


def test_double_backward_matches_the_reference():
    q, k, s, b = _inputs(6, 4)
    found, want = [], []
    for impl, out in (("torch", found), ("reference", want)):
        (gq,) = torch.autograd.grad(siglip(q, k, scale=s, bias=b, impl=impl), [q], create_graph=True)
        out.extend(torch.autograd.grad(gq.square().sum(), [q, k, s, b]))
    _assert_close(found, want)


def test_opcheck():
    q, k, s, b = _inputs(5, 3)
    torch.library.opcheck(_ops.forward, (q, k, torch.stack([s, b]).detach().requires_grad_(), "torch", True, False))


def test_cuda_refuses_and_auto_never_picks_it(monkeypatch):
    q, k, _, _ = _inputs(4, 3)
    want = siglip(q, k, impl="torch")
    with pytest.raises(adassl_fast.BackendUnavailable):  # here: no CUDA device at all
        siglip(q, k, impl="cuda")
    # where the CUDA backend runs, it still has no SigLIP kernels: refused, and "auto" takes torch
    monkeypatch.setattr(_dispatch, "resolve_impl", lambda impl, *args: "cuda")
    with pytest.raises(adassl_fast.BackendUnavailable, match="no SigLIP kernels"):
        siglip(q, k, impl="cuda")
    torch.testing.assert_close(siglip(q, k), want, rtol=0, atol=0)


@pytest.mark.triton
def test_auto_takes_triton_where_it_would_run(monkeypatch):
    q, k, _, _ = _inputs(6, 5)
    monkeypatch.setenv("ADASSL_FAST_IMPL", "triton")  # what "auto" picks on a GPU (here: the interpreter)
    torch.testing.assert_close(siglip(q, k), siglip(q, k, impl="triton"), rtol=0, atol=0)
    torch.testing.assert_close(siglip(q, k), siglip(q, k, impl="torch"), rtol=1e-12, atol=1e-13)


def test_bad_inputs_raise():
    q, k, _, _ = _inputs(4, 3)
    with pytest.raises(ValueError, match="key"):
        siglip(q, k[:3])
    with pytest.raises(ValueError, match="scale"):
        siglip(q, k, scale=torch.ones(2, dtype=F64))
    with pytest.raises(TypeError, match="normalize"):
        siglip(q, k, normalize=1)


def test_module_initialisation_and_gradients():
    module = SigLIPLoss(impl="torch").double()
    assert module.log_scale.exp().item() == pytest.approx(10.0) and module.bias.item() == -10.0
    q, k, _, _ = _inputs(9, 5)
    loss = module(q, k)
    found = (loss, *torch.autograd.grad(loss, [q, k, module.log_scale, module.bias]))
    ref = siglip_reference(q, k, scale=module.log_scale.exp(), bias=module.bias)
    _assert_close(found, (ref, *torch.autograd.grad(ref, [q, k, module.log_scale, module.bias])))
