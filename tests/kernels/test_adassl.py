"""Triton one-pass AdaSSL op (kernels/adassl.py) against the package reference, in the interpreter.

Both variants with given noise, values and every gradient (emb, post, prior, scale; grad_reg != 1),
deterministic and atomic schedules, fused and split epilogues, bf16 through the fp32 upcast path.
"""

import pytest
import torch

from adassl_fast.adassl import adassl_nt_xent_reference
from adassl_fast.indices import partner_indices
from adassl_fast.kernels import adassl as ak
from adassl_fast.kernels import launch
from tests.rows_as_given import adassl_inputs, adassl_reference

pytestmark = pytest.mark.triton

F64 = torch.float64


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)


def _inputs(B, d, variant, dtype):
    emb_x, emb_y = torch.randn(B, d, dtype=F64), torch.randn(B, d, dtype=F64)
    # a in [-8, 8] reaches both logvar clamps (sigma < e^-5 and, with the +20 row, the softplus threshold)
    post_xy, post_yx = 3 * torch.randn(B, 2 * d, dtype=F64), 3 * torch.randn(B, 2 * d, dtype=F64)
    post_xy[0, d:] = 21.0  # softplus identity branch, logvar clamped at +10
    if variant == "v":
        prior_xy, prior_yx = 3 * torch.randn(B, 2 * d, dtype=F64), 3 * torch.randn(B, 2 * d, dtype=F64)
        noise_xy, noise_yx = torch.randn(B, d, dtype=F64), torch.randn(B, d, dtype=F64)
    else:
        prior_xy = prior_yx = torch.empty(0, dtype=F64)
        noise_xy, noise_yx = torch.rand(B, d, dtype=F64), torch.rand(B, d, dtype=F64)
    ins = [emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx]
    return [t.to(dtype) for t in ins]


def _reference(ins, variant, scale, temperature, clamp, g_ssl, g_reg):
    emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx = [t.to(F64) for t in ins]
    leaves = [t.clone().requires_grad_() for t in (emb_x, emb_y, post_xy, post_yx)]
    priors = [t.clone().requires_grad_() for t in (prior_xy, prior_yx)] if variant == "v" else [None, None]
    s = scale.to(F64).clone().requires_grad_()
    l_ssl, l_reg = adassl_nt_xent_reference(
        *leaves, *priors, variant=variant, temperature=temperature, scale=s, clamp=clamp,
        noise_xy=noise_xy, noise_yx=noise_yx,
    )
    wrt = leaves + (priors if variant == "v" else []) + [s]
    grads = torch.autograd.grad([l_ssl, l_reg], wrt, [torch.tensor(g_ssl, dtype=F64), torch.tensor(g_reg, dtype=F64)])
    return l_ssl.detach(), l_reg.detach(), list(grads)


def _kernel(ins, variant, scale, temperature, clamp, g_ssl, g_reg, deterministic, num_splits, normalize=True):
    partners = partner_indices(2 * ins[0].shape[0], ins[0].device)
    l_ssl, l_reg, lse = ak.adassl_forward(*ins, scale, 1 / temperature, clamp, variant, indices=partners,
                                          normalize=normalize, num_splits=num_splits)
    st = l_ssl.dtype
    out = ak.adassl_backward(
        torch.tensor(g_ssl, dtype=st), torch.tensor(g_reg, dtype=st), *ins, scale, lse, 1 / temperature, clamp,
        variant, deterministic, indices=partners, normalize=normalize, num_splits=num_splits,
    )
    grads = list(out[:4]) + (list(out[4:6]) if variant == "v" else []) + [out[6]]
    if variant == "s":
        assert out[4].numel() == 0 and out[5].numel() == 0
    return l_ssl, l_reg, lse, grads


NAMES = ["demb_x", "demb_y", "dpost_xy", "dpost_yx", "dprior_xy", "dprior_yx", "dscale"]


def _names(variant):
    return NAMES if variant == "v" else NAMES[:4] + NAMES[6:]


@pytest.mark.parametrize(
    "B,d,variant,clamp,deterministic,num_splits",
    [
        (3, 5, "v", None, True, 1),
        (17, 24, "v", 3.0, True, None),
        (17, 37, "v", 3.0, False, 1),
        (65, 24, "v", None, False, None),
        (3, 5, "s", 3.0, False, 1),
        (17, 37, "s", 3.0, True, 2),
        (65, 5, "s", None, True, 1),
        (9, 131, "v", 3.0, False, None),  # BLOCK_D 256, the widest GPU table entry
    ],
)
def test_matches_reference_float64(B, d, variant, clamp, deterministic, num_splits):
    ins = _inputs(B, d, variant, F64)
    scale = torch.tensor(1.4, dtype=F64)
    l_ssl, l_reg, lse, grads = _kernel(ins, variant, scale, 0.2, clamp, 0.9, 0.6, deterministic, num_splits)
    r_ssl, r_reg, r_grads = _reference(ins, variant, scale, 0.2, clamp, 0.9, 0.6)
    assert l_ssl.dtype == F64 and l_reg.dtype == F64 and lse.shape == (2 * B,)
    assert abs(l_ssl.item() - r_ssl.item()) <= 1e-12
    assert abs(l_reg.item() - r_reg.item()) <= 1e-12 * max(1.0, abs(r_reg.item()))
    for name, a, b in zip(_names(variant), grads, r_grads, strict=True):
        assert a.dtype == F64 and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        err = (a - b).abs().max().item()
        assert err <= 1e-12 * max(1.0, b.abs().max().item()), f"{name}: {err:.3e}"


@pytest.mark.parametrize("variant", ["v", "s"])
def test_bf16_through_upcast(variant):
    B, d = 33, 24
    ins = _inputs(B, d, variant, torch.bfloat16)
    scale = torch.tensor(1.2)
    l_ssl, l_reg, lse, grads = _kernel(ins, variant, scale, 0.1, 20.0, 1.0, 1.0, True, None)
    r_ssl, r_reg, r_grads = _reference(ins, variant, scale, 0.1, 20.0, 1.0, 1.0)
    assert l_ssl.dtype == torch.float32 and grads[0].dtype == torch.bfloat16
    # the kernels round the edited rows to bf16 before the matmul; the reference keeps them in fp32
    assert abs(l_ssl.item() - r_ssl.item()) <= 2e-2
    assert abs(l_reg.item() - r_reg.item()) <= 1e-4 * max(1.0, abs(r_reg.item()))
    for name, a, b in zip(_names(variant), grads, r_grads, strict=True):
        assert torch.isfinite(a.float()).all(), name
        err = (a.to(F64) - b).abs().max().item()
        assert err <= 5e-2 * max(1e-3, b.abs().max().item()), f"{name}: {err:.3e}"


def test_out_of_bounds_guarded_by_sentinels():
    B, d = 17, 37
    ins = _inputs(B, d, "v", F64)
    scale = torch.tensor(1.0, dtype=F64)
    clean = _kernel(ins, "v", scale, 0.5, 20.0, 1.0, 1.0, True, 1)
    bufs, views = [], []
    for t in ins:
        buf = torch.full((4096 + t.numel() + 4096,), 1.0e30, dtype=F64)
        v = buf[4096 : 4096 + t.numel()].view(t.shape)
        v.copy_(t)
        bufs.append(buf)
        views.append(v)
    guarded = _kernel(views, "v", scale, 0.5, 20.0, 1.0, 1.0, True, 1)
    for x, y in zip(clean[:3], guarded[:3], strict=True):
        assert torch.equal(x, y)
    for x, y in zip(clean[3], guarded[3], strict=True):
        assert torch.equal(x, y)
    for buf, v in zip(bufs, views, strict=True):
        assert (buf[:4096] == 1.0e30).all() and (buf[4096 + v.numel() :] == 1.0e30).all()


# ----------------------------------------------------------------------------------------------------
# normalize=False: the edited rows and the targets as given (docs/backends.md), against the float64 oracle of
# tests/rows_as_given.py.


@pytest.mark.parametrize(
    "B,d,variant,clamp,deterministic,num_splits",
    [
        (3, 5, "v", None, True, 1),
        (17, 24, "v", 3.0, True, None),
        (33, 37, "v", 3.0, False, 1),
        (17, 37, "s", 3.0, False, None),
        (65, 5, "s", None, True, 1),
        (9, 131, "s", 3.0, True, None),  # BLOCK_D 256
    ],
)
def test_rows_as_given_match_float64(B, d, variant, clamp, deterministic, num_splits):
    ins = adassl_inputs(B, d, variant)
    scale, temperature = torch.tensor(1.3, dtype=F64), 0.5  # |scale / tau| = 2.6 < clamp
    l_ssl, l_reg, lse, grads = _kernel(ins, variant, scale, temperature, clamp, 0.9, 0.6, deterministic, num_splits,
                                       normalize=False)
    r_ssl, r_reg, r_grads = adassl_reference(ins, variant, scale, temperature, clamp, 0.9, 0.6)
    n_ssl, _, n_grads = adassl_reference(ins, variant, scale, temperature, clamp, 0.9, 0.6, normalize=True)
    assert abs(n_ssl - r_ssl) > 1e-2 and (n_grads[0] - r_grads[0]).abs().max() > 1e-2 * r_grads[0].abs().max()
    assert abs(l_ssl.item() - r_ssl.item()) <= 1e-12
    assert abs(l_reg.item() - r_reg.item()) <= 1e-12 * max(1.0, abs(r_reg.item()))
    for name, a, b in zip(_names(variant), grads, r_grads, strict=True):
        assert a.dtype == F64 and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        err = (a - b).abs().max().item()
        assert err <= 1e-12 * max(1.0, b.abs().max().item()), f"{name}: {err:.3e}"
