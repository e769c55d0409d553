"""info_nce(..., labels=): label-defined positives. The reference against SupCon's formula written out, the
torch backend against the reference (float64 values and gradients, every schedule), labels = arange(N)
against the plain loss."""

import math

import pytest
import torch

import adassl_fast
from adassl_fast import _dispatch, info_nce, torch_backend
from adassl_fast.info_nce import _labelled_ops

F64 = torch.float64


def _inputs(n, d):
    leaf = lambda *s: torch.randn(*s, dtype=F64, requires_grad=True)
    return leaf(n, d), leaf(n, d), torch.tensor(torch.rand(()).item() + 0.5, dtype=F64, requires_grad=True)


def _supcon(q, k, labels, inv_t, symmetric):
    """Khosla et al. 2020 (Supervised Contrastive Learning), eq. 2 (L_out), per anchor i:
    -1/|P(i)| sum_{p in P(i)} log(exp(z_i . z_p / tau) / sum_{a in A(i)} exp(z_i . z_a / tau)), here with
    the anchors the queries, A(i) every key and P(i) the keys of i's label; symmetric: averaged with the keys
    as anchors."""
    unit = lambda m: [[e / math.sqrt(sum(f * f for f in r)) for e in r] for r in m.detach().tolist()]
    u, v, lab = unit(q), unit(k), labels.tolist()

    def one_way(rows, cols):
        total = 0.0
        for i, ri in enumerate(rows):
            s = [inv_t * sum(a * b for a, b in zip(ri, c, strict=True)) for c in cols]
            log_den = math.log(sum(math.exp(x) for x in s))
            positives = [p for p in range(len(cols)) if lab[p] == lab[i]]
            total += -sum(s[p] - log_den for p in positives) / len(positives)
        return total / len(rows)

    forward = one_way(u, v)
    return (forward + one_way(v, u)) / 2 if symmetric else forward


@pytest.mark.parametrize("symmetric", [True, False])
def test_reference_is_supcons_formula(symmetric):
    q, k, _ = _inputs(7, 3)
    labels = torch.tensor([0, 2, 0, 1, 2, 0, 5])
    loss = info_nce(q, k, temperature=0.3, labels=labels, symmetric=symmetric, impl="reference")
    assert loss.item() == pytest.approx(_supcon(q, k, labels, 1 / 0.3, symmetric), rel=1e-13)


def _loss_and_grads(q, k, s, **kw):
    loss = info_nce(q, k, scale=s, **kw)
    return (loss, *torch.autograd.grad(loss, [q, k, s]))


def _assert_close(found, want):
    for f, w in zip(found, want, strict=True):
        torch.testing.assert_close(f, w, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clamp", [None, 3.0])
@pytest.mark.parametrize("temperature", [0.1, 0.02])  # |S| < 30: exps unshifted; 0.02: shifted by each row's max
def test_torch_backend_matches_the_reference(monkeypatch, symmetric, clamp, temperature):
    monkeypatch.setattr(torch_backend, "SLAB_ELEMENTS", 16)  # 16 rows a block: three blocks
    q, k, s = _inputs(37, 5)
    labels = torch.randint(0, 6, (37,))
    kw = dict(labels=labels, symmetric=symmetric, clamp=clamp, temperature=temperature)
    want = _loss_and_grads(q, k, s, impl="reference", **kw)
    _assert_close(_loss_and_grads(q, k, s, impl="torch", **kw), want)  # one-directional: the one-pass op
    with torch.no_grad():
        _assert_close([info_nce(q, k, scale=s, impl="torch", **kw)], want[:1])
    # the two-pass backward from the saved LSEs
    loss = _labelled_ops[symmetric].forward(q, k, labels, s, 1 / temperature, clamp, "torch", True, True)[0]
    _assert_close((loss, *torch.autograd.grad(loss, [q, k, s])), want)


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_arange_labels_are_the_plain_loss(impl, symmetric):
    q, k, s = _inputs(9, 4)
    plain = _loss_and_grads(q, k, s, impl=impl, symmetric=symmetric)
    _assert_close(_loss_and_grads(q, k, s, impl=impl, symmetric=symmetric, labels=torch.arange(9)), plain)


def test_bad_labels_and_backends_without_them_raise(monkeypatch):
    q, k, _ = _inputs(4, 3)
    with pytest.raises(TypeError, match="labels"):
        info_nce(q, k, labels=torch.zeros(4))
    with pytest.raises(ValueError, match="labels"):
        info_nce(q, k, labels=torch.zeros(3, dtype=torch.int64))
    labels = torch.tensor([1, 0, 1, 1])
    want = info_nce(q, k, labels=labels, impl="torch")
    # where the CUDA backend runs, it has no labelled kernels: refused, and "auto" takes torch
    monkeypatch.setattr(_dispatch, "resolve_impl", lambda impl, *args: "cuda")
    with pytest.raises(adassl_fast.BackendUnavailable, match="label-defined"):
        info_nce(q, k, labels=labels, impl="cuda")
    torch.testing.assert_close(info_nce(q, k, labels=labels), want, rtol=0, atol=0)
