"""The one-pass AdaSSL op: latent sample, additive edit, NT-Xent and the regulariser in one Function.

For each direction (x->y and y->x) the posterior output gives r (Gaussian reparameterisation for
variant "v", straight-through Bernoulli mask for "s"), the editor adds it to the context embedding, and
the edited rows are contrasted against the targets:

    cont = [emb_y + r_yx; emb_x + r_xy],  targ = [emb_x; emb_y],  l_ssl = nt_xent(cont, targ)
    l_reg = (R(post_xy, prior_xy) + R(post_yx, prior_yx)) / 2,  R = KL ("v") or L0 ("s")

Order: the reference composition, the torch.library ops shared by every backend (the torch backend's
latent prologue and its analytic backward, docs/spec.md 3.3-3.6, are in adassl_fast/torch_backend.py), the
functional form.
"""

from __future__ import annotations

import torch
from torch import Tensor

from adassl_fast import _checks, distributed, latent, torch_backend
from adassl_fast._dispatch import resolve_impl
from adassl_fast._library import define_loss
from adassl_fast.core import trains_in_one_pass
from adassl_fast.nt_xent import nt_xent_reference

VARIANTS = ("v", "s")


# ----------------------------------------------------------------------------------------------------
# Reference: the composition of the reference ops, as the authors' wrapper does it.


def reference_direction(post, prior, noise, variant):
    """(r (B, d), R) of one direction by the reference ops: post (B, 2d), prior (B, 2d) or None, noise (B, d)."""
    d = post.shape[1] // 2
    if variant == "v":
        mu_q, pre_q = post[:, :d], post[:, d:]
        r = latent.gaussian_sample_reference(mu_q, pre_q, noise)
        return r, latent.gaussian_kl_reference(mu_q, pre_q, prior[:, :d], prior[:, d:])
    logits, unmasked = post[:, :d], post[:, d:]
    return latent.bernoulli_mask_reference(logits, noise) * unmasked, latent.l0_penalty_reference(logits)


def adassl_nt_xent_reference(
    emb_x, emb_y, post_xy, post_yx, prior_xy=None, prior_yx=None, *, variant="v", temperature=0.1, scale=None,
    clamp=20.0, noise_xy, noise_yx, normalize=True,
):
    """(l_ssl, l_reg) by composing the reference ops; noise must be given."""
    acc = _checks.accumulation_dtype(emb_x.dtype)
    up = lambda t: None if t is None else t.to(acc)
    emb_x, emb_y, post_xy, post_yx = up(emb_x), up(emb_y), up(post_xy), up(post_yx)
    r_xy, reg_xy = reference_direction(post_xy, up(prior_xy), up(noise_xy), variant)
    r_yx, reg_yx = reference_direction(post_yx, up(prior_yx), up(noise_yx), variant)
    cont = torch.cat([emb_y + r_yx, emb_x + r_xy])
    targ = torch.cat([emb_x, emb_y])
    l_ssl = nt_xent_reference(cont, targ, temperature=temperature, scale=scale, clamp=clamp, normalize=normalize)
    return l_ssl, (reg_xy + reg_yx) / 2


# ----------------------------------------------------------------------------------------------------
# torch.library ops (adassl_fast/_library.py). Variant "s" has no prior: empty (0,) tensors stand in for it
# (ops cannot take None in one call and a tensor in the next without recompiling, and cannot return None).


def _reference_losses(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx, scale, inv_temperature,
                      clamp, variant, *, normalize=True):
    """(l_ssl, l_reg) of the op's inputs by composing the reference ops (differentiable throughout)."""
    none_if_empty = lambda t: t if t.numel() else None
    return adassl_nt_xent_reference(
        emb_x, emb_y, post_xy, post_yx, none_if_empty(prior_xy), none_if_empty(prior_yx), variant=variant,
        temperature=1.0 / inv_temperature, scale=scale, clamp=clamp, noise_xy=noise_xy, noise_yx=noise_yx,
        normalize=normalize,
    )


def _stash_fake(emb_x, *tensors):
    rows = emb_x.new_empty((2 * emb_x.shape[0], emb_x.shape[1]), dtype=_checks.accumulation_dtype(emb_x.dtype))
    return rows, torch.empty_like(rows), torch.empty_like(tensors[-1])


def _stash_backward(stash, grads, inputs, options):
    """The core's stashed gradients on the edited rows (for grad_ssl = 1), scaled, through the latent
    prologue's backward."""
    grad_ssl, grad_reg = grads
    dcont, dtarg, dscale = (g * grad_ssl for g in stash)
    return torch_backend.adassl_gradients(dcont, dtarg, dscale, grad_reg, *inputs[:8], options[-1])


# forward -> (l_ssl, l_reg, lse (2B,)) in the accumulation dtype; backward -> (demb_x, demb_y, dpost_xy,
# dpost_yx, dprior_xy, dprior_yx, dscale); the one-pass training op (torch backend, core.trains_in_one_pass)
# -> (l_ssl, l_reg, lse, dcont (2B, d), dtarg (2B, d), dscale), the core's gradients for grad_ssl = 1 on the
# edited rows, which its backward scales and takes through the latent prologue's backward. The kernels give
# no gradient for the noise (sampled, rarely differentiated): the reference's does.
_ops = define_loss(
    "adassl",
    tensors=("emb_x", "emb_y", "post_xy", "post_yx", "prior_xy", "prior_yx", "noise_xy", "noise_yx", "scale"),
    graded=("emb_x", "emb_y", "post_xy", "post_yx", "prior_xy", "prior_yx", "scale"),
    options="float inv_temperature, float? clamp, str variant",
    losses=("ssl", "reg"),
    lse_shape=lambda emb_x, *_: (2 * emb_x.shape[0],),
    reference=_reference_losses,
    stash_fake=_stash_fake,
    stash_backward=_stash_backward,
    reference_only=("noise_xy", "noise_yx"),
    public="adassl_nt_xent",
    keywords=("normalize",),
)
adassl_forward_op, adassl_backward_op, adassl_forward_backward_op = _ops.forward, _ops.backward, _ops.forward_backward


# ----------------------------------------------------------------------------------------------------
# Functional form.


def _check_inputs(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx, variant):
    if variant not in VARIANTS:
        raise ValueError(f'variant must be "v" (Gaussian KL) or "s" (sparse L0), got {variant!r}')
    emb_x = _checks.matrix("emb_x", emb_x)
    emb_y = _checks.matrix("emb_y", emb_y)
    _checks.same_layout("emb_y", emb_y, "emb_x", emb_x)
    b, d = emb_x.shape
    posts = []
    for name, post in (("post_xy", post_xy), ("post_yx", post_yx)):
        post = _checks.matrix(name, post)
        if post.shape[0] == b and post.shape[1] % 2 == 0 and post.shape[1] != 2 * d:
            raise ValueError(
                f"{name} has d_r = {post.shape[1] // 2} but the additive editor needs d_r == d = {d} "
                f"({name} must be (B, 2 d) = {(b, 2 * d)})"
            )
        _checks.same_layout(name, post, "emb_x", emb_x, shape=(b, 2 * d))
        posts.append(post)
    priors = []
    for name, prior in (("prior_xy", prior_xy), ("prior_yx", prior_yx)):
        if variant == "s":
            if prior is not None:
                raise ValueError(f'{name} must be None for variant "s" (the sparse variant has no prior network)')
            priors.append(emb_x.new_empty((0,)))
            continue
        if prior is None:
            raise ValueError(f'{name} is required for variant "v" (the KL needs the prior network output)')
        prior = _checks.matrix(name, prior)
        _checks.same_layout(name, prior, "emb_x", emb_x, shape=(b, 2 * d))
        priors.append(prior)
    noises = []
    for name, noise in (("noise_xy", noise_xy), ("noise_yx", noise_yx)):
        if noise is None:
            # Drawn like the reference's randn_like / rand_like: in the embeddings' dtype.
            draw = torch.randn if variant == "v" else torch.rand
            noise = draw((b, d), dtype=emb_x.dtype, device=emb_x.device)
        else:
            noise = _checks.matrix(name, noise)
            if tuple(noise.shape) != (b, d):
                raise ValueError(f"{name} must have shape {(b, d)}, got {tuple(noise.shape)}")
            if noise.device != emb_x.device:
                raise ValueError(f"{name} is on {noise.device} but emb_x is on {emb_x.device}")
            noise = noise.to(emb_x.dtype)  # the kernels read every row input in one dtype
        noises.append(noise)
    return emb_x, emb_y, posts, priors, noises


def adassl_nt_xent(
    emb_x: Tensor,
    emb_y: Tensor,
    post_xy: Tensor,
    post_yx: Tensor,
    prior_xy: Tensor | None = None,
    prior_yx: Tensor | None = None,
    *,
    variant: str = "v",
    temperature: float = 0.1,
    scale=None,
    clamp: float | None = 20.0,
    noise_xy: Tensor | None = None,
    noise_yx: Tensor | None = None,
    impl: str = "auto",
    process_group=None,
    deterministic: bool = True,
    schedule: str | None = None,
    timeout: float | None = None,
    normalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """AdaSSL with the additive editor, fused: -> (l_ssl, l_reg), both 0-dim.

    Args:
        emb_x, emb_y: (B, d) context / target embeddings f(x), f(x+).
        post_xy, post_yx: (B, 2d) posterior outputs per direction: [mu | pre-activation] for "v",
            [mask logits | unmasked r] for "s" (d_r == d, the additive editor).
        prior_xy, prior_yx: (B, 2d) prior outputs [mu | pre-activation] for "v"; None for "s".
        variant: "v" (Gaussian KL) or "s" (L0 on a straight-through Bernoulli mask).
        noise_xy, noise_yx: (B, d) standard normal ("v") or uniform ("s") noise, cast to the embeddings'
            dtype; drawn from torch's RNG in that dtype when None (reproducible under torch.manual_seed).
        temperature, scale, clamp, impl, process_group, deterministic, schedule, timeout, normalize: as for
            `nt_xent` (normalize=False contrasts the edited rows and targets as given).

    Returns:
        l_ssl = nt_xent([emb_y + r_yx; emb_x + r_xy], [emb_x; emb_y]) and
        l_reg = (R_xy + R_yx) / 2 (not multiplied by beta), float32 (float64 for float64 inputs).
    """
    emb_x, emb_y, (post_xy, post_yx), (prior_xy, prior_yx), (noise_xy, noise_yx) = _check_inputs(
        emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx, variant
    )
    temperature = _checks.positive_float("temperature", temperature)
    clamp = _checks.optional_clamp(clamp)
    normalize = _checks.flag("normalize", normalize)
    lam = _checks.scale_tensor(scale, emb_x)
    impl = resolve_impl(impl, emb_x.device, emb_x.dtype, emb_x.shape[1])
    if process_group is not None:
        return distributed.adassl_nt_xent(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx,
                                          lam, temperature, clamp, variant, impl, deterministic, process_group,
                                          schedule=schedule, timeout=timeout, normalize=normalize)
    if impl == "reference":
        none_if_empty = lambda t: t if t.numel() else None
        return adassl_nt_xent_reference(
            emb_x, emb_y, post_xy, post_yx, none_if_empty(prior_xy), none_if_empty(prior_yx), variant=variant,
            temperature=temperature, scale=lam, clamp=clamp, noise_xy=noise_xy, noise_yx=noise_yx, normalize=normalize,
        )
    args = (emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx, lam, 1.0 / temperature, clamp,
            variant, impl, deterministic, normalize)
    one_pass = trains_in_one_pass(impl, emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, lam)
    l_ssl, l_reg, *_ = (adassl_forward_backward_op if one_pass else adassl_forward_op)(*args)
    return l_ssl, l_reg
