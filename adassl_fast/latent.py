"""The latent variable r and its regularisers: Gaussian KL and sample (AdaSSL-V, docs/spec.md 2.4), straight-through
Bernoulli mask and L0 penalty (AdaSSL-S, docs/spec.md 2.6).

These are O(B d_r) elementwise ops. Standalone, they are launch-bound on a GPU, so the fused backends
compute them inside `adassl_nt_xent`'s row prologue instead; here "reference" and "torch" are the same
plain PyTorch (autograd through it is exact and cheap), and "auto" always picks it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from adassl_fast import _checks
from adassl_fast._dispatch import BackendUnavailable
from adassl_fast.core import clamp_inclusive
from adassl_fast.torch_backend import LOGVAR_BOUND, SIGMA_EPS, logistic_noise


def log_variance(pre: Tensor) -> Tensor:
    """logvar = clamp(2 log(softplus(pre) + 1e-6), -10, 10), inclusive gradient indicator."""
    return clamp_inclusive(2 * torch.log(F.softplus(pre) + SIGMA_EPS), LOGVAR_BOUND)


def gaussian_kl_reference(mu_q: Tensor, pre_q: Tensor, mu_p: Tensor, pre_p: Tensor) -> Tensor:
    lv_q, lv_p = log_variance(pre_q), log_variance(pre_p)
    kl = 0.5 * (lv_p - lv_q + torch.exp(lv_q) / torch.exp(lv_p) + (mu_q - mu_p) ** 2 / torch.exp(lv_p) - 1)
    return kl.sum(1).mean()


def gaussian_sample_reference(mu_q: Tensor, pre_q: Tensor, noise: Tensor) -> Tensor:
    return mu_q + noise * torch.exp(0.5 * log_variance(pre_q))


def bernoulli_mask_reference(logits: Tensor, noise: Tensor) -> Tensor:
    soft = torch.sigmoid(logits + logistic_noise(noise))
    hard = (soft > 0.5).to(soft.dtype)
    return hard.detach() - soft.detach() + soft


def l0_penalty_reference(logits: Tensor) -> Tensor:
    return torch.sigmoid(logits).sum(1).mean()


def _plain_pytorch(impl: str) -> None:
    if not isinstance(impl, str):
        raise TypeError(f"impl must be a string, got {type(impl).__name__}")
    if impl in ("triton", "cuda"):
        raise BackendUnavailable(
            f'impl="{impl}" has no standalone latent kernels: they are fused into adassl_nt_xent; '
            'use impl="torch" (or "auto") for the standalone op'
        )
    if impl not in ("auto", "reference", "torch"):
        raise ValueError(f'impl must be "auto", "reference", "torch", "triton" or "cuda", got {impl!r}')


def _noise(noise, like: Tensor, name: str, kind: str) -> Tensor:
    """The given noise, checked against `like`, or noise drawn like the reference's randn_like / rand_like
    (same dtype and device; reproducible under torch.manual_seed)."""
    if noise is None:
        draw = torch.randn if kind == "normal" else torch.rand
        return draw(like.shape, dtype=like.dtype, device=like.device)
    noise = _checks.matrix(name, noise)
    _checks.same_layout(name, noise, "the latent inputs", like)
    return noise


def _pair(name_a: str, a: Tensor, name_b: str, b: Tensor) -> tuple[Tensor, Tensor]:
    a = _checks.matrix(name_a, a)
    b = _checks.matrix(name_b, b)
    _checks.same_layout(name_b, b, name_a, a)
    return a, b


def gaussian_kl(mu_q: Tensor, pre_q: Tensor, mu_p: Tensor, pre_p: Tensor, *, impl: str = "auto") -> Tensor:
    """KL(q || p) of diagonal Gaussians, summed over dims and averaged over rows (docs/spec.md 2.4).

    All four inputs are (B, d_r); `pre_*` are pre-activations, sigma = softplus(pre) + 1e-6.
    """
    _plain_pytorch(impl)
    mu_q, pre_q = _pair("mu_q", mu_q, "pre_q", pre_q)
    mu_p, pre_p = _pair("mu_p", mu_p, "pre_p", pre_p)
    _checks.same_layout("mu_p", mu_p, "mu_q", mu_q)
    return gaussian_kl_reference(mu_q, pre_q, mu_p, pre_p)


def gaussian_sample(mu_q: Tensor, pre_q: Tensor, noise: Tensor | None = None, *, impl: str = "auto") -> Tensor:
    """r = mu_q + noise * exp(logvar_q / 2): (B, d_r). `noise` (B, d_r) standard normal, drawn if None."""
    _plain_pytorch(impl)
    mu_q, pre_q = _pair("mu_q", mu_q, "pre_q", pre_q)
    return gaussian_sample_reference(mu_q, pre_q, _noise(noise, mu_q, "noise", "normal"))


def bernoulli_mask(logits: Tensor, noise: Tensor | None = None, *, impl: str = "auto") -> Tensor:
    """Straight-through Bernoulli(sigmoid(logits)) mask (B, d_r): hard 0/1 forward, sigmoid gradient.

    `noise` is the uniform u (B, d_r) of the logistic trick, drawn if None.
    """
    _plain_pytorch(impl)
    logits = _checks.matrix("logits", logits)
    return bernoulli_mask_reference(logits, _noise(noise, logits, "noise", "uniform"))


def l0_penalty(logits: Tensor, *, impl: str = "auto") -> Tensor:
    """Expected number of active mask entries: sum of sigmoid(logits) over dims, mean over rows."""
    _plain_pytorch(impl)
    return l0_penalty_reference(_checks.matrix("logits", logits))
