"""The nt_xent core op (docs/backends.md): mean_i [lse_i - S_{i,pos_i}] over S = scale / tau * u v^T, clamped,
each row's positive and excluded column given as index vectors. Every loss and the distributed schedules
are built on it.

Here: its reference (materialising, the oracle its double backward differentiates), its three
torch.library ops (forward, backward, and the torch backend's one-pass training op; `impl` picks the
backend through `_library.backend`), and `contrastive_loss`, which picks the schedule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from adassl_fast import _checks, torch_backend
from adassl_fast._library import backend, define_op, differentiable_backward
from adassl_fast.torch_backend import NORM_EPS


def clamp_inclusive(x: Tensor, bound: float) -> Tensor:
    """clamp(x, -bound, bound) whose gradient passes at exactly +-bound (torch 2.3 behaviour, SPEC 2.1)."""
    inside = (x >= -bound) & (x <= bound)
    return torch.where(inside, x, x.detach().clamp(-bound, bound))


def contrastive_reference(cont, targ, pos, excl, scale, inv_temperature, clamp) -> Tensor:
    """The nt_xent core's loss mean_i [lse_i - S^_{i,pos_i}] (docs/backends.md) by materialising S (M, N).

    Plain autograd ops: the ops' registered backward differentiates it for second-order gradients.
    """
    acc = _checks.accumulation_dtype(cont.dtype)
    u = F.normalize(cont.to(acc), dim=1, eps=NORM_EPS)
    v = F.normalize(targ.to(acc), dim=1, eps=NORM_EPS)
    logits = u @ v.t() * (scale * inv_temperature)
    if clamp is not None:
        logits = clamp_inclusive(logits, clamp)
    columns = torch.arange(logits.shape[1], device=logits.device)
    excluded = (columns == excl.unsqueeze(1)) & (excl >= 0).unsqueeze(1)
    lse = torch.logsumexp(logits.masked_fill(excluded, float("-inf")), dim=1)
    positive = logits.gather(1, pos.clamp_min(0).unsqueeze(1)).squeeze(1)
    return (lse - torch.where(pos >= 0, positive, 0.0)).mean()

# ----------------------------------------------------------------------------------------------------
# torch.library ops: one registration for every backend (adassl_fast/_library.py), so autograd,
# torch.compile and opcheck see the same op whatever runs inside.


def _forward_kernel(cont, targ, pos, excl, scale, inv_temperature, clamp, impl, deterministic):
    return backend(impl).nt_xent_forward(cont, targ, pos, excl, scale, inv_temperature, clamp)


def _forward_fake(cont, targ, pos, excl, scale, inv_temperature, clamp, impl, deterministic):
    acc = _checks.accumulation_dtype(cont.dtype)
    return cont.new_empty((), dtype=acc), cont.new_empty((cont.shape[0],), dtype=acc)


def _backward_kernel(grad_loss, cont, targ, pos, excl, scale, lse, inv_temperature, clamp, impl, deterministic):
    return backend(impl).nt_xent_backward(grad_loss, cont, targ, pos, excl, scale, lse, inv_temperature, clamp,
                                          deterministic)


def _backward_fake(grad_loss, cont, targ, pos, excl, scale, lse, inv_temperature, clamp, impl, deterministic):
    return torch.empty_like(cont), torch.empty_like(targ), torch.empty_like(scale)


def _one_pass_kernel(cont, targ, pos, excl, scale, inv_temperature, clamp, impl, deterministic):
    if impl != "torch":
        raise ValueError(f"the one-pass training op is the torch backend's schedule, got impl={impl!r}")
    return torch_backend.nt_xent_forward_backward(cont, targ, pos, excl, scale, inv_temperature, clamp)


def _one_pass_fake(cont, targ, pos, excl, scale, inv_temperature, clamp, impl, deterministic):
    acc = _checks.accumulation_dtype(cont.dtype)
    stash = cont.new_empty(cont.shape, dtype=acc), targ.new_empty(targ.shape, dtype=acc), torch.empty_like(scale)
    return *_forward_fake(cont, targ, pos, excl, scale, inv_temperature, clamp, impl, deterministic), *stash


def _setup_context(ctx, inputs, output):
    cont, targ, pos, excl, scale, inv_temperature, clamp, impl, deterministic = inputs
    lse, *stash = output[1:]  # stash: the one-pass op's (dcont, dtarg, dscale) for grad_loss = 1
    ctx.save_for_backward(cont, targ, pos, excl, scale, lse, *stash)
    ctx.options = (inv_temperature, clamp, impl, deterministic)
    ctx.mark_non_differentiable(lse, *stash)
    ctx.set_materialize_grads(False)  # no zero-filled (M,) gradient for lse, which nothing differentiates


def _autograd_backward(ctx, grad_loss, *_grad_lse_and_stash):
    if grad_loss is None:  # the loss was not differentiated (grads are not materialised)
        return (None,) * 9
    cont, targ, pos, excl, scale, lse, *stash = ctx.saved_tensors
    inv_temperature, clamp, impl, deterministic = ctx.options
    if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable themselves
        dcont, dtarg, dscale = differentiable_backward(
            "nt_xent", impl, lambda c, t, s: contrastive_reference(c, t, pos, excl, s, inv_temperature, clamp),
            (cont, targ, scale), grad_loss,
        )
    elif stash:  # the one-pass op's gradients (for grad_loss = 1), scaled
        dcont, dtarg, dscale = (g * grad_loss for g in stash)
        dcont, dtarg = dcont.to(cont.dtype), dtarg.to(targ.dtype)
    else:
        dcont, dtarg, dscale = nt_xent_backward_op(
            grad_loss, cont, targ, pos, excl, scale, lse, inv_temperature, clamp, impl, deterministic
        )
    return dcont, dtarg, None, None, dscale, None, None, None, None


# (loss 0-dim, lse (M,)) in the accumulation dtype; docs/backends.md has the contract.
nt_xent_backward_op = define_op(
    "nt_xent_backward(Tensor grad_loss, Tensor cont, Tensor targ, Tensor pos, Tensor excl, Tensor scale, "
    "Tensor lse, float inv_temperature, float? clamp, str impl, bool deterministic) -> (Tensor, Tensor, Tensor)",
    _backward_kernel,
    _backward_fake,
)
_FORWARD_INPUTS = ("Tensor cont, Tensor targ, Tensor pos, Tensor excl, Tensor scale, float inv_temperature, "
                   "float? clamp, str impl, bool deterministic")
nt_xent_forward_op = define_op(
    f"nt_xent_forward({_FORWARD_INPUTS}) -> (Tensor, Tensor)",
    _forward_kernel,
    _forward_fake,
    backward=_autograd_backward,
    setup_context=_setup_context,
)
# Training on the torch backend: the forward and the gradients for grad_loss = 1 in one pass over S,
# -> (loss, lse, dcont, dtarg, dscale); the backward scales the last three (`trains_in_one_pass` picks it).
nt_xent_forward_backward_op = define_op(
    f"nt_xent_forward_backward({_FORWARD_INPUTS}) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _one_pass_kernel,
    _one_pass_fake,
    backward=_autograd_backward,
    setup_context=_setup_context,
)


def trains_in_one_pass(impl: str, *tensors: Tensor) -> bool:
    """Whether a call takes the torch backend's one-pass training op: grad mode on and some input needing a
    gradient (decided here, since inside an op autograd is already below), outside torch.compile (whose
    tracing keeps the two-pass ops). Elsewhere the forward alone (one GEMM per block) is cheaper."""
    return (impl == "torch" and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
            and not torch.compiler.is_compiling())


def contrastive_loss(cont, targ, pos, excl, scale, temperature, clamp, impl, deterministic) -> Tensor:
    """mean_i [lse_i - S_{i,pos_i}] through the op of `impl` (not "reference"); inputs already checked."""
    args = (cont, targ, pos, excl, scale, 1.0 / temperature, clamp, impl, deterministic)
    if trains_in_one_pass(impl, cont, targ, scale):
        return nt_xent_forward_backward_op(*args)[0]
    return nt_xent_forward_op(*args)[0]

