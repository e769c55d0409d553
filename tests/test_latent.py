"""The latent ops (docs/spec.md 2.4, 2.6): closed forms, the clamp bounds, the straight-through mask, noise."""

import math

import pytest
import torch
import torch.nn.functional as F

import adassl_fast


def test_gaussian_kl_matches_the_closed_form():
    mu_q, pre_q, mu_p, pre_p = (torch.randn(7, 5, dtype=torch.float64) for _ in range(4))
    var_q, var_p = (F.softplus(pre_q) + 1e-6) ** 2, (F.softplus(pre_p) + 1e-6) ** 2
    kl = 0.5 * (torch.log(var_p / var_q) + var_q / var_p + (mu_q - mu_p) ** 2 / var_p - 1)
    got = adassl_fast.gaussian_kl(mu_q, pre_q, mu_p, pre_p)
    assert got.item() == pytest.approx(kl.sum(1).mean().item(), rel=1e-12)


def test_logvar_clamp_bounds_the_variance_and_stops_the_gradient():
    pre = torch.tensor([[200.0, -30.0, 0.0]], dtype=torch.float64, requires_grad=True)
    mu = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    noise = torch.ones(1, 3, dtype=torch.float64)
    r = adassl_fast.gaussian_sample(mu, pre, noise)
    assert r[0, 0].item() == pytest.approx(math.exp(5.0), rel=1e-12)  # logvar clamped to +10
    assert r[0, 1].item() == pytest.approx(math.exp(-5.0), rel=1e-12)  # and to -10
    (grad,) = torch.autograd.grad(r.sum(), [pre])
    assert grad[0, 0].item() == 0.0 and grad[0, 1].item() == 0.0 and grad[0, 2].item() != 0.0


def test_bernoulli_mask_is_hard_forward_and_sigmoid_backward():
    logits = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    u = torch.rand(6, 9, dtype=torch.float64)
    mask = adassl_fast.bernoulli_mask(logits, u)
    g = torch.log(u) - torch.log(1 - u)
    assert torch.equal(mask.detach(), (logits.detach() + g > 0).double())
    (grad,) = torch.autograd.grad(mask.sum(), [logits])
    y = torch.sigmoid(logits.detach() + g)
    torch.testing.assert_close(grad, y * (1 - y), rtol=1e-12, atol=1e-15)


def test_bernoulli_mask_frequency_follows_sigmoid_of_logits():
    logits = torch.full((20000, 1), 0.8)
    rate = adassl_fast.bernoulli_mask(logits).mean().item()
    assert rate == pytest.approx(torch.sigmoid(torch.tensor(0.8)).item(), abs=0.015)


def test_l0_penalty_is_the_expected_active_count():
    logits = torch.randn(4, 6, dtype=torch.float64)
    assert adassl_fast.l0_penalty(logits).item() == pytest.approx(torch.sigmoid(logits).sum(1).mean().item())


def test_drawn_noise_is_reproducible_under_manual_seed():
    mu, pre = torch.randn(3, 4), torch.randn(3, 4)
    torch.manual_seed(7)
    a = adassl_fast.gaussian_sample(mu, pre)
    torch.manual_seed(7)
    b = adassl_fast.gaussian_sample(mu, pre)
    assert torch.equal(a, b)


def test_fused_backends_have_no_standalone_latent_kernels():
    with pytest.raises(adassl_fast.BackendUnavailable, match="fused into adassl_nt_xent"):
        adassl_fast.l0_penalty(torch.randn(2, 3), impl="cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_drawn_noise_keeps_the_input_dtype(dtype):
    mu, pre = torch.randn(3, 4, dtype=dtype), torch.randn(3, 4, dtype=dtype)
    assert adassl_fast.gaussian_sample(mu, pre).dtype == dtype
    assert adassl_fast.bernoulli_mask(mu).dtype == dtype
