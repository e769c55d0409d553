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

from adassl_fast import _checks
from adassl_fast._library import define_loss
from adassl_fast.torch_backend import NORM_EPS


def clamp_inclusive(x: Tensor, bound: float) -> Tensor:
    """clamp(x, -bound, bound) whose gradient passes at exactly +-bound (torch 2.3 behaviour, docs/spec.md 2.1)."""
    inside = (x >= -bound) & (x <= bound)
    return torch.where(inside, x, x.detach().clamp(-bound, bound))


def unit_rows(x: Tensor, normalize: bool = True) -> Tensor:
    """x in its accumulation dtype, L2-normalised (eps NORM_EPS) unless normalize=False (the rows as given)."""
    x = x.to(_checks.accumulation_dtype(x.dtype))
    return F.normalize(x, dim=1, eps=NORM_EPS) if normalize else x


def contrastive_reference(cont, targ, pos, excl, scale, inv_temperature, clamp, *, normalize=True) -> Tensor:
    """The nt_xent core's loss mean_i [lse_i - S^_{i,pos_i}] (docs/backends.md) by materialising S (M, N).

    Plain autograd ops: the ops' registered backward differentiates it for second-order gradients.
    """
    u, v = unit_rows(cont, normalize), unit_rows(targ, normalize)
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


def contrastive_stash_fake(rows, cols, *rest):
    """Fakes of a contrastive one-pass op's stash (d rows, d cols, d scale); `rest` ends with the scale."""
    acc = _checks.accumulation_dtype(rows.dtype)
    return rows.new_empty(rows.shape, dtype=acc), cols.new_empty(cols.shape, dtype=acc), torch.empty_like(rest[-1])


def contrastive_stash_backward(stash, grads, inputs, options):
    """A contrastive one-pass op's gradients (for grad_loss = 1), scaled by grad_loss and cast to the inputs'."""
    (grad_loss,), (rows, cols, *_) = grads, inputs
    drows, dcols, dscale = (g * grad_loss for g in stash)
    return drows.to(rows.dtype), dcols.to(cols.dtype), dscale


# forward -> (loss 0-dim, lse (M,)) in the accumulation dtype; backward -> (dcont, dtarg, dscale); the
# one-pass training op (torch backend, `trains_in_one_pass` picks it) -> (loss, lse, dcont, dtarg, dscale), the
# gradients for grad_loss = 1 that its backward scales. docs/backends.md has the contract.
_ops = define_loss(
    "nt_xent",
    tensors=("cont", "targ", "pos", "excl", "scale"),
    graded=("cont", "targ", "scale"),
    options="float inv_temperature, float? clamp",
    losses=("loss",),
    lse_shape=lambda cont, *_: (cont.shape[0],),
    reference=contrastive_reference,
    stash_fake=contrastive_stash_fake,
    stash_backward=contrastive_stash_backward,
    keywords=("normalize",),
)
nt_xent_forward_op, nt_xent_backward_op, nt_xent_forward_backward_op = (
    _ops.forward, _ops.backward, _ops.forward_backward)


def trains_in_one_pass(impl: str, *tensors: Tensor) -> bool:
    """Whether a call takes the torch backend's one-pass training op: grad mode on and some input needing a
    gradient (decided here, since inside an op autograd is already below), outside torch.compile (whose
    tracing keeps the two-pass ops). Elsewhere the forward alone (one GEMM per block) is cheaper."""
    return (impl == "torch" and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
            and not torch.compiler.is_compiling())


def contrastive_loss(cont, targ, pos, excl, scale, temperature, clamp, impl, deterministic, normalize=True) -> Tensor:
    """mean_i [lse_i - S_{i,pos_i}] through the op of `impl` (not "reference"); inputs already checked."""
    args = (cont, targ, pos, excl, scale, 1.0 / temperature, clamp, impl, deterministic, normalize)
    if trains_in_one_pass(impl, cont, targ, scale):
        return nt_xent_forward_backward_op(*args)[0]
    return nt_xent_forward_op(*args)[0]

