"""NT-Xent (SimCLR) as AdaSSL uses it: edited rows `cont` against target columns `targ` (SPEC 2.1, 3.1).

Read top to bottom: the reference (the authors' materialising semantics, the oracle), the chunked torch
kernels (one loop over row blocks for every phase: nothing M x M is ever held), the torch.library ops that
every backend plugs into (`impl` picks the kernels), and the functional form.

The torch backend has two schedules, chosen by rule in the functional layer (`trains_in_one_pass`): when a
gradient is needed (grad mode on, some input requires grad, not under torch.compile) one pass forms each
logit block once and yields the loss and the gradients together (3 GEMMs per block; the op stashes the
gradients for the backward, which scales them by grad_output); otherwise the forward computes statistics
alone (1 GEMM per block) and the backward forms the blocks again from the saved LSEs (3 more). The double
backward (a create_graph backward) always takes the two-pass backward. docs/backends.md has the table.
The same core serves `info_nce` and the distributed schedules: each row has one positive column and at
most one excluded column, given as index vectors (docs/backends.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from adassl_fast import _checks
from adassl_fast._dispatch import resolve_impl
from adassl_fast._library import define_op, differentiable_backward

NORM_EPS = 1e-12


# ----------------------------------------------------------------------------------------------------
# Reference: the authors' computation, materialising the M x M logits.


def clamp_inclusive(x: Tensor, bound: float) -> Tensor:
    """clamp(x, -bound, bound) whose gradient passes at exactly +-bound (torch 2.3 behaviour, SPEC 2.1)."""
    inside = (x >= -bound) & (x <= bound)
    return torch.where(inside, x, x.detach().clamp(-bound, bound))


def correlated_mask(batch: int, device=None) -> Tensor:
    """(2B, 2B) bool: False on the diagonal and on the diagonals of the two off-diagonal B x B blocks."""
    n = 2 * batch
    idx = torch.arange(n, device=device)
    mask = torch.ones(n, n, dtype=torch.bool, device=device)
    mask[idx, idx] = False
    mask[idx, (idx + batch) % n] = False
    return mask


def nt_xent_reference(cont: Tensor, targ: Tensor, *, temperature: float = 0.1, scale=None, clamp=20.0) -> Tensor:
    """The authors' NT-Xent: cont (M, d) rows, targ (M, d) columns, M = 2B -> 0-dim loss.

    Low-precision inputs are upcast to float32 (the reference's cross-entropy runs in float32 under AMP).
    """
    acc = _checks.accumulation_dtype(cont.dtype)
    u = F.normalize(cont.to(acc), dim=1, eps=NORM_EPS)
    v = F.normalize(targ.to(acc), dim=1, eps=NORM_EPS)
    lam = _checks.scale_tensor(scale, cont)
    logits = u @ v.t() * lam / temperature
    if clamp is not None:
        logits = clamp_inclusive(logits, clamp)
    n = logits.shape[0]
    positives = logits.diagonal().unsqueeze(1)
    negatives = logits[correlated_mask(n // 2, logits.device)].view(n, n - 2)
    labels = torch.zeros(n, dtype=torch.long, device=logits.device)
    return F.cross_entropy(torch.cat([positives, negatives], dim=1), labels)


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
# Chunked torch kernels. One loop over blocks of rows (`_row_blocks`) serves every phase: each block holds a
# (rows x N) slab of logits, sized near 16 MB (one buffer for all blocks), so memory is O(M d + block) and the
# work is plain BLAS.
#   - statistics only (the forward without gradients): one GEMM per block;
#   - gradients from saved LSEs (the two-pass backward, double backward, the distributed ring): three;
#   - statistics and gradients together (the one-pass forward of training): three, where the two-pass
#     schedule costs four. Each block holds whole rows, so its LSEs are known once its exps are summed, and
#     the slab of exps becomes the gradient's slab with no recompute (as fused linear-cross-entropy does).
# Nothing else of size M x d is held but v (the normalised columns), the two gradients and the inputs: the
# rows are normalised block by block, and the normalisation backward works in place on the gradients.

_SLAB_ELEMENTS = 1 << 22
# exp(S) itself is summed where |S| < 30 (the usual settings: |scale / tau| or a clamp below 30): its sums
# stay far inside float32's range, and one exp per element serves row and column statistics alike.
_UNSHIFTED_BOUND = 30.0


def _rows_per_block(n_cols: int) -> int:
    return max(16, _SLAB_ELEMENTS // max(n_cols, 1))


def _normalize(x: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    x = x.to(acc)
    norm = torch.linalg.vector_norm(x, dim=1)
    return x / norm.clamp_min(NORM_EPS).unsqueeze(1), norm


def _normalize_backward_(grad_u: Tensor, x: Tensor, norm: Tensor, radial: Tensor, weight) -> Tensor:
    """grad_u (dL/du for u = x / max(||x||, eps)) becomes weight * dL/dx in place, with radial = x . grad_u per
    row: weight (g - (u.g) u) / ||x||, or weight g / eps below eps. Whole-matrix ops, no M x d temporaries."""
    inv = weight / norm.clamp_min(NORM_EPS)
    along = torch.where(norm > NORM_EPS, radial * inv / norm.clamp_min(NORM_EPS) ** 2, 0.0)
    return grad_u.mul_(inv.unsqueeze(1)).addcmul_(x, along.unsqueeze(1), value=-1)


def _logit_bound(s: float, clamp: float | None) -> tuple[float, bool]:
    """An upper bound on |S| and whether the clamp can bite: |<u, v>| <= 1 (plus rounding) for unit rows."""
    bound = abs(s) * (1 + 1e-5)
    if clamp is not None and bound >= clamp:
        return clamp, True
    return bound, False


def one_exp_pass(scale, inv_temperature: float, clamp: float | None) -> bool:
    """Whether exp(S) needs no shift for any row or column (so one pass gives row and column statistics)."""
    return _logit_bound(float(scale) * inv_temperature, clamp)[0] < _UNSHIFTED_BOUND


class _Pass(NamedTuple):
    lse: Tensor  # (M,) row LSEs (computed, or the ones given)
    positive: Tensor  # (M,) clamped logit of each row's positive column (0 where pos = -1)
    col_sum: Tensor | None  # (N,) sum_i exp(S_ij), when asked for
    dcont: Tensor | None  # (M, d) and (N, d) in the accumulation dtype, and the 0-dim dscale like `scale`
    dtarg: Tensor | None
    dscale: Tensor | None


def _row_blocks(cont, targ, pos, excl, scale, inv_temperature, clamp, *, grad_weight=None, lse=None, col_lse=None,
                col_sum=False) -> _Pass:
    """One pass over the row blocks of S = scale / tau * u v^T, clamped, each row's excluded column removed.

    grad_weight (float or 0-dim tensor) w: also the gradients of w * sum_i [lse_i - S_{i,pos_i}] (plus
    w * sum_j [col_lse_j - S_jj] where col_lse is given: symmetric InfoNCE, both softmaxes in one G).
    lse (M,): the row LSEs to differentiate with (the two-pass backward); None computes them in this pass.
    col_sum: also sum_i exp(S_ij) (needs `one_exp_pass`).
    """
    acc = _checks.accumulation_dtype(cont.dtype)
    s = float(scale) * inv_temperature
    bound, clamp_active = _logit_bound(s, clamp)
    unshifted = bound < _UNSHIFTED_BOUND
    x = cont.to(acc)
    norm_u = torch.linalg.vector_norm(x, dim=1)
    row_factor = s / norm_u.clamp_min(NORM_EPS)  # u_i * s = x_i * row_factor_i
    m, n, d = x.shape[0], targ.shape[0], x.shape[1]
    # v with a column of ones: the GEMM that forms E V also sums each row of E (no separate pass over the slab)
    v, norm_v = _normalize(targ, acc)
    v_ones = torch.cat([v, v.new_ones(n, 1)], 1)
    v = v_ones[:, :d]
    positive = torch.empty(m, dtype=acc, device=x.device)
    row_lse = torch.empty(m, dtype=acc, device=x.device) if lse is None else lse
    sums = torch.zeros(n, dtype=acc, device=x.device) if col_sum else None
    grads = grad_weight is not None
    if grads:
        dcont = torch.empty_like(x)
        grad_v = torch.zeros_like(v)
        sum_gc = torch.zeros((), dtype=acc, device=x.device)
        col_w = None if col_lse is None or not unshifted else col_lse.neg().exp_()  # P'_ij = exp(S_ij) col_w_j
    step = _rows_per_block(n)
    buffer = torch.empty(min(step, m), n, dtype=acc, device=x.device)  # one slab for every block
    for r0 in range(0, m, step):
        r1 = min(r0 + step, m)
        pos_blk = pos[r0:r1]
        u_scaled = x[r0:r1] * row_factor[r0:r1].unsqueeze(1)
        # (a create_graph backward runs the backward op with autograd recording these ops: out= is refused there)
        slab = u_scaled @ v.t() if u_scaled.requires_grad else torch.mm(u_scaled, v.t(), out=buffer[: r1 - r0])
        positive[r0:r1], outside, hot = _clamp_and_exclude(slab, pos_blk, excl[r0:r1], clamp, clamp_active)
        if col_lse is not None and not unshifted:
            col_part = (slab - col_lse).exp_()  # P' (before the row exps overwrite S)
        shift = _exponentiate(slab, None if lse is None else lse[r0:r1], unshifted)
        # row sums from the slab where no G V follows, or where the clamp's mask will change the slab first
        row_sum = slab.sum(1) if lse is None and (not grads or outside is not None) else None
        if sums is not None:
            sums += slab.sum(0)
        if not grads:
            row_lse[r0:r1] = _log_plus(row_sum, shift)
            continue
        # P = slab / row_scale; None: the slab holds P itself
        row_scale = None if lse is None or not unshifted else lse[r0:r1].exp()
        if col_lse is not None:  # symmetric: G + 2 onehot = P + P', the row weights folded into the slab
            if unshifted:
                slab.mul_(row_scale.reciprocal().unsqueeze(1) + col_w)
            else:
                slab.add_(col_part)
            row_scale, hot = None, hot * 2
        if outside is not None:
            slab.masked_fill_(outside, 0.0)
        gv_ones = slab @ v_ones
        if lse is None:
            row_sum = gv_ones[:, d] if row_sum is None else row_sum
            row_lse[r0:r1] = _log_plus(row_sum, shift)
            row_scale = row_sum
        dcont[r0:r1] = _block_gradient(slab, gv_ones[:, :d], row_scale, hot, pos_blk, u_scaled, v, grad_v)
    if not grads:
        return _Pass(row_lse, positive, sums, None, None, None)
    # Whole-matrix work after the loop, in a few large ops: on a loaded machine every small parallel op
    # in the loop waits for both threads to be scheduled. dcont holds G V, grad_v G^T (s U).
    del slab, buffer
    radial = torch.linalg.vecdot(x, dcont)
    sum_gc = (radial / norm_u.clamp_min(NORM_EPS)).sum()  # sum_ij G_ij C_ij = sum_i u_i . (G V)_i
    _normalize_backward_(dcont, x, norm_u, radial, grad_weight * s)
    y = targ.to(acc)
    _normalize_backward_(grad_v, y, norm_v, torch.linalg.vecdot(y, grad_v), grad_weight)
    dscale = (sum_gc * grad_weight * inv_temperature).to(scale.dtype)
    return _Pass(row_lse, positive, sums, dcont, grad_v, dscale)


def _clamp_and_exclude(slab, pos_blk, excl_blk, clamp, clamp_active):
    """Clamp the slab in place and set each row's excluded column to -inf.

    Returns the positives' clamped logits (0 where pos = -1), the out-of-clamp mask (None when the clamp
    cannot bite) and `hot`: 1 where the row's positive column is present and inside the clamp, else 0 (the
    onehot term of G).
    """
    col = pos_blk.clamp_min(0).unsqueeze(1)
    raw = slab.gather(1, col).squeeze(1)
    has_positive = pos_blk >= 0
    outside = None
    hot = has_positive.to(slab.dtype)
    if clamp_active:
        outside = (slab > clamp) | (slab < -clamp)
        slab.clamp_(-clamp, clamp)
        hot.mul_(raw.abs() <= clamp)  # the inclusive indicator
        raw = raw.clamp(-clamp, clamp)
    # Rows without an excluded column (excl = -1) write their own value back: no data-dependent branch.
    col = excl_blk.clamp_min(0).unsqueeze(1)
    slab.scatter_(1, col, torch.where(excl_blk.unsqueeze(1) >= 0, float("-inf"), slab.gather(1, col)))
    return torch.where(has_positive, raw, 0.0), outside, hot


def _exponentiate(slab, lse_blk, unshifted):
    """exp(S - shift) in place; returns the shift: None (|S| < 30), each row's LSE where given (the slab
    becomes P), else each row's max."""
    if unshifted:
        slab.exp_()
        return None
    # (floored so a row whose only column is excluded gives -inf, not NaN)
    shift = lse_blk.unsqueeze(1) if lse_blk is not None else slab.amax(1, keepdim=True).clamp_min_(-1e30)
    slab.sub_(shift).exp_()
    return shift


def _log_plus(row_sum, shift):
    return row_sum.log() if shift is None else row_sum.log().add_(shift.squeeze(1))


def _block_gradient(e, ev, row_scale, hot, pos_blk, u_scaled, v, grad_v):
    """G V of a block, with G = e / row_scale - hot * onehot(pos) (row_scale None: 1) and ev = e V; adds
    G^T (s U) to grad_v.

    The row weights act on the small (rows x d) operands and the onehot on one entry per row, so the slab is
    read by the two GEMMs and never rewritten whole.
    """
    col = pos_blk.clamp_min(0).unsqueeze(1)
    hot_entry = hot if row_scale is None else hot * row_scale
    e.scatter_add_(1, col, hot_entry.neg().unsqueeze(1))  # e - hot row_scale onehot = row_scale G
    weighted = u_scaled if row_scale is None else u_scaled / row_scale.unsqueeze(1)
    grad_v.addmm_(e.t(), weighted)
    gv = ev if row_scale is None else ev / row_scale.unsqueeze(1)
    return gv - v.index_select(0, col.squeeze(1)) * hot.unsqueeze(1)


def _torch_forward(cont, targ, pos, excl, scale, inv_temperature, clamp):
    p = _row_blocks(cont, targ, pos, excl, scale, inv_temperature, clamp)
    return (p.lse - p.positive).mean(), p.lse


def _torch_backward(grad_loss, cont, targ, pos, excl, scale, lse, inv_temperature, clamp, deterministic,
                    col_lse=None):
    """Gradients (dcont, dtarg, dscale) of mean_i [lse_i - S_{i,pos_i}] from the saved LSEs.

    col_lse (N,): the column LSEs of the symmetric InfoNCE loss, (that mean + mean_j [col_lse_j - S_jj]) / 2
    (pos = arange, nothing excluded): both directions' softmaxes go into one G, one pass for both.
    """
    weight = grad_loss.to(lse.dtype) / (2 * cont.shape[0] if col_lse is not None else cont.shape[0])
    p = _row_blocks(cont, targ, pos, excl, scale, inv_temperature, clamp, grad_weight=weight, lse=lse,
                    col_lse=col_lse)
    return p.dcont.to(cont.dtype), p.dtarg.to(targ.dtype), p.dscale


def _torch_forward_backward(cont, targ, pos, excl, scale, inv_temperature, clamp):
    """(loss, lse, dcont, dtarg, dscale) in one pass: the gradients for grad_loss = 1, in the accumulation
    dtype (the op's backward scales them by the incoming gradient)."""
    p = _row_blocks(cont, targ, pos, excl, scale, inv_temperature, clamp, grad_weight=1.0 / cont.shape[0])
    return (p.lse - p.positive).mean(), p.lse, p.dcont, p.dtarg, p.dscale


def _kernels(impl: str):
    """(forward, backward) of the nt_xent core for a backend name (docs/backends.md)."""
    if impl == "torch":
        return _torch_forward, _torch_backward
    if impl == "triton":
        from adassl_fast.kernels import nt_xent as triton_kernels

        return triton_kernels.nt_xent_forward, triton_kernels.nt_xent_backward
    if impl == "cuda":
        from adassl_fast import _cuda

        return _cuda.nt_xent_forward, _cuda.nt_xent_backward
    raise ValueError(f"no nt_xent kernels for impl={impl!r}")


# ----------------------------------------------------------------------------------------------------
# torch.library ops: one registration for every backend (adassl_fast/_library.py), so autograd,
# torch.compile and opcheck see the same op whatever runs inside.


def _forward_kernel(cont, targ, pos, excl, scale, inv_temperature, clamp, impl, deterministic):
    forward, _ = _kernels(impl)
    return forward(cont, targ, pos, excl, scale, inv_temperature, clamp)


def _forward_fake(cont, targ, pos, excl, scale, inv_temperature, clamp, impl, deterministic):
    acc = _checks.accumulation_dtype(cont.dtype)
    return cont.new_empty((), dtype=acc), cont.new_empty((cont.shape[0],), dtype=acc)


def _backward_kernel(grad_loss, cont, targ, pos, excl, scale, lse, inv_temperature, clamp, impl, deterministic):
    _, backward = _kernels(impl)
    return backward(grad_loss, cont, targ, pos, excl, scale, lse, inv_temperature, clamp, deterministic)


def _backward_fake(grad_loss, cont, targ, pos, excl, scale, lse, inv_temperature, clamp, impl, deterministic):
    return torch.empty_like(cont), torch.empty_like(targ), torch.empty_like(scale)


def _one_pass_kernel(cont, targ, pos, excl, scale, inv_temperature, clamp, impl, deterministic):
    if impl != "torch":
        raise ValueError(f"the one-pass training op is the torch backend's schedule, got impl={impl!r}")
    return _torch_forward_backward(cont, targ, pos, excl, scale, inv_temperature, clamp)


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


def partner_indices(m: int, device) -> tuple[Tensor, Tensor]:
    """nt_xent's positive (i) and excluded ((i + M/2) mod M) column of every row (read-only, reused)."""
    return _indices("partner", m, torch.device(device))


def diagonal_indices(n: int, device) -> tuple[Tensor, Tensor]:
    """InfoNCE's positive (i) and excluded (-1: none) column of every row (read-only, reused)."""
    return _indices("diagonal", n, torch.device(device))


@_checks.reused
def _indices(kind: str, m: int, device: torch.device) -> tuple[Tensor, Tensor]:
    pos = torch.arange(m, device=device)
    return pos, (pos + m // 2) % m if kind == "partner" else torch.full_like(pos, -1)


def contrastive_loss(cont, targ, pos, excl, scale, temperature, clamp, impl, deterministic) -> Tensor:
    """mean_i [lse_i - S_{i,pos_i}] through the op of `impl` (not "reference"); inputs already checked."""
    args = (cont, targ, pos, excl, scale, 1.0 / temperature, clamp, impl, deterministic)
    if trains_in_one_pass(impl, cont, targ, scale):
        return nt_xent_forward_backward_op(*args)[0]
    return nt_xent_forward_op(*args)[0]


# ----------------------------------------------------------------------------------------------------
# Functional form.


def nt_xent(
    cont: Tensor,
    targ: Tensor,
    *,
    temperature: float = 0.1,
    scale=None,
    clamp: float | None = 20.0,
    impl: str = "auto",
    process_group=None,
    deterministic: bool = True,
    schedule: str | None = None,
    timeout: float | None = None,
) -> Tensor:
    """AdaSSL's NT-Xent loss (SPEC 2.1) without materialising the M x M logits.

    Args:
        cont: (M, d) edited / predicted rows `[x_hat; y_hat]`, M = 2B even.
        targ: (M, d) target rows `[e_x; e_y]`, same dtype and device.
        temperature: tau > 0.
        scale: None (1), a float, or a 0-dim tensor lambda (receives a gradient).
        clamp: logits are clamped to [-clamp, clamp] (inclusive gradient indicator); None disables.
        impl: "auto", "reference", "torch", "triton" or "cuda".
        process_group: a torch.distributed group: negatives are the rows of every rank (API.md).
        deterministic: fused backends use the atomic-free backward (bitwise reproducible) when True.
        schedule: with `process_group`: "ring" (default; per-rank memory independent of the world size) or
            "gather" (one all-gather, memory O(global rows x d)); see adassl_fast/distributed.py.
        timeout: with `process_group`: seconds after which a stuck collective raises DistributedError.

    Returns:
        0-dim loss, float32 (float64 for float64 inputs): the mean over rows of the cross-entropy of
        row i against positive column i, with column (i + B) mod M excluded.
    """
    cont = _checks.matrix("cont", cont, min_rows=2)
    targ = _checks.matrix("targ", targ)
    _checks.same_layout("targ", targ, "cont", cont)
    if cont.shape[0] % 2:
        raise ValueError(f"cont must have an even number of rows M = 2B (pairs stacked), got M = {cont.shape[0]}")
    temperature = _checks.positive_float("temperature", temperature)
    clamp = _checks.optional_clamp(clamp)
    lam = _checks.scale_tensor(scale, cont)
    impl = resolve_impl(impl, cont.device, cont.dtype, cont.shape[1])
    if process_group is not None:
        from adassl_fast import distributed

        return distributed.nt_xent(cont, targ, lam, temperature, clamp, impl, deterministic, process_group,
                                   schedule=schedule, timeout=timeout)
    if impl == "reference":
        return nt_xent_reference(cont, targ, temperature=temperature, scale=lam, clamp=clamp)
    pos, excl = partner_indices(cont.shape[0], cont.device)
    return contrastive_loss(cont, targ, pos, excl, lam, temperature, clamp, impl, deterministic)
