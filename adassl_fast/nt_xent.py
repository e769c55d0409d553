"""NT-Xent (SimCLR) as AdaSSL uses it: edited rows `cont` against target columns `targ` (SPEC 2.1, 3.1).

Read top to bottom: the reference (the authors' materialising semantics, the oracle), the chunked torch
kernels (row blocks, online statistics, recompute in backward: nothing M x M is ever held), the
torch.library ops that every backend plugs into (`impl` picks the kernels), and the functional form.
The same core serves `info_nce` and the distributed schedules: each row has one positive column and at
most one excluded column, given as index vectors (docs/backends.md).
"""

from __future__ import annotations

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
# Chunked torch kernels. Each block of rows holds a (rows x N) slab of logits, sized so the slab stays
# near 16 MB: the memory is O(M d + block), and the work is plain BLAS so it is fast on CPUs.

_SLAB_ELEMENTS = 1 << 22


def _rows_per_block(n_cols: int) -> int:
    return max(16, _SLAB_ELEMENTS // max(n_cols, 1))


def _normalize(x: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    x = x.to(acc)
    norm = torch.linalg.vector_norm(x, dim=1)
    return x / norm.clamp_min(NORM_EPS).unsqueeze(1), norm


def normalize_backward(grad_u: Tensor, u: Tensor, norm: Tensor) -> Tensor:
    """Gradient through u = x / max(||x||, eps): (g - (u.g) u) / ||x||, or g / eps below eps."""
    radial = (u * grad_u).sum(1, keepdim=True)
    above = (norm > NORM_EPS).unsqueeze(1)
    return torch.where(above, (grad_u - radial * u) / norm.clamp_min(NORM_EPS).unsqueeze(1), grad_u / NORM_EPS)


def _logit_bound(s: float, clamp: float | None) -> tuple[float, bool]:
    """An upper bound on |S| and whether the clamp can bite: |<u, v>| <= 1 (plus rounding) for unit rows."""
    bound = abs(s) * (1 + 1e-5)
    if clamp is not None and bound >= clamp:
        return clamp, True
    return bound, False


def _fixed_shift(bound: float) -> float | None:
    """`bound` where it is a valid log-sum-exp shift for every row and column, else None.

    Logits lie in [-bound, bound], so exp(S - bound) lies in [exp(-2 bound), 1]: far from underflow when
    2 bound < 60. Then no row-max pass is needed, and one exp serves row and column statistics alike.
    """
    return bound if 2 * bound < 60 else None


def _logit_slab(u_scaled_blk, v, pos_blk, excl_blk, clamp, clamp_active):
    """Clamped logits of a row block (the scale is folded into the rows) with excluded columns at -inf.

    Returns the slab, the positives' logits (0 where pos = -1) and the out-of-clamp mask (None when the
    clamp cannot bite).
    """
    slab = u_scaled_blk @ v.t()
    outside = None
    if clamp_active:
        outside = (slab > clamp) | (slab < -clamp)
        slab.clamp_(-clamp, clamp)
    positive = torch.where(pos_blk >= 0, slab.gather(1, pos_blk.clamp_min(0).unsqueeze(1)).squeeze(1), 0.0)
    # Rows without an excluded column (excl = -1) write their own value back: no data-dependent branch.
    col = excl_blk.clamp_min(0).unsqueeze(1)
    kept = slab.gather(1, col)
    slab.scatter_(1, col, torch.where(excl_blk.unsqueeze(1) >= 0, float("-inf"), kept))
    return slab, positive, outside


def _scaled_operands(cont, targ, scale, inv_temperature, clamp):
    """(u * scale / tau, v, the fixed shift or None, whether the clamp can bite) in the accumulation dtype."""
    acc = _checks.accumulation_dtype(cont.dtype)
    s = float(scale) * inv_temperature
    u, _ = _normalize(cont, acc)
    v, _ = _normalize(targ, acc)
    bound, clamp_active = _logit_bound(s, clamp)
    return u.mul_(s), v, _fixed_shift(bound), clamp_active


def _row_statistics(u, v, pos, excl, clamp, clamp_active, shift, col_sum=None):
    """(lse (M,), positive logit (M,)) of the rows of S = u v^T (the scale folded into u), block by block.

    shift: a log-sum-exp shift valid for every row (`_fixed_shift`), or None for each row's max.
    col_sum (N,): with a fixed shift, also receives sum_i exp(S_ij - shift), the column statistics from
    the same exps (symmetric InfoNCE).
    """
    m = u.shape[0]
    lse = torch.empty(m, dtype=u.dtype, device=u.device)
    positive = torch.empty(m, dtype=u.dtype, device=u.device)
    step = _rows_per_block(v.shape[0])
    for r0 in range(0, m, step):
        r1 = min(r0 + step, m)
        slab, positive[r0:r1], _ = _logit_slab(u[r0:r1], v, pos[r0:r1], excl[r0:r1], clamp, clamp_active)
        if shift is None:
            # (floored so a row whose only column is excluded gives -inf, not NaN)
            row_max = slab.amax(1, keepdim=True).clamp_min_(-1e30)
            lse[r0:r1] = slab.sub_(row_max).exp_().sum(1).log_().add_(row_max.squeeze(1))
        else:
            e = slab.sub_(shift).exp_()
            lse[r0:r1] = e.sum(1).log_().add_(shift)
            if col_sum is not None:
                col_sum += e.sum(0)
    return lse, positive


def _torch_forward(cont, targ, pos, excl, scale, inv_temperature, clamp):
    u, v, shift, clamp_active = _scaled_operands(cont, targ, scale, inv_temperature, clamp)
    lse, positive = _row_statistics(u, v, pos, excl, clamp, clamp_active, shift)
    return (lse - positive).mean(), lse


def _torch_backward(grad_loss, cont, targ, pos, excl, scale, lse, inv_temperature, clamp, deterministic,
                    col_lse=None):
    """Gradients (dcont, dtarg, dscale) of mean_i [lse_i - S_{i,pos_i}].

    col_lse (N,): the column LSEs of the symmetric InfoNCE loss, (that mean + mean_j [col_lse_j - S_jj]) / 2
    (pos = arange, nothing excluded): both directions' softmaxes go into one G, one pass for both.
    """
    acc = _checks.accumulation_dtype(cont.dtype)
    s = float(scale) * inv_temperature
    u, norm_u = _normalize(cont, acc)
    v, norm_v = _normalize(targ, acc)
    u_scaled = u * s
    bound, clamp_active = _logit_bound(s, clamp)
    shift = _fixed_shift(bound)
    if col_lse is not None and shift is not None:
        # P_ij + P'_ij = exp(S_ij - shift) (a_i + b_j): one exp per element for both directions
        row_w, col_w = (shift - lse).exp_(), (shift - col_lse).exp_()
    m = u.shape[0]
    grad_u = torch.empty_like(u)
    grad_v = torch.zeros_like(v)
    sum_gc = torch.zeros((), dtype=acc, device=u.device)
    step = _rows_per_block(v.shape[0])
    for r0 in range(0, m, step):
        r1 = min(r0 + step, m)
        pos_blk = pos[r0:r1]
        slab, _, outside = _logit_slab(u_scaled[r0:r1], v, pos_blk, excl[r0:r1], clamp, clamp_active)
        # G / w = (P - onehot(pos)) * [inside clamp], P = 0 at the excluded column; the scalar row weight
        # w = grad_loss / M is applied to the small products below instead of the slab.
        hot = (pos_blk >= 0).to(acc).neg_()
        if col_lse is None:
            g = slab.sub_(lse[r0:r1].unsqueeze(1)).exp_()
        elif shift is not None:
            hot.mul_(2)
            g = slab.sub_(shift).exp_().mul_(row_w[r0:r1].unsqueeze(1) + col_w)
        else:
            hot.mul_(2)
            g = (slab - col_lse).exp_().add_(slab.sub_(lse[r0:r1].unsqueeze(1)).exp_())
        g.scatter_add_(1, pos_blk.clamp_min(0).unsqueeze(1), hot.unsqueeze(1))
        if outside is not None:
            g.masked_fill_(outside, 0.0)
        gv = g @ v
        sum_gc += (gv * u[r0:r1]).sum()  # sum_ij G_ij C_ij = sum_i u_i . (G V)_i
        grad_u[r0:r1] = gv
        grad_v.addmm_(g.t(), u[r0:r1])
    w = grad_loss.to(acc) / (2 * m if col_lse is not None else m)
    dcont = normalize_backward(grad_u.mul_(w * s), u, norm_u).to(cont.dtype)
    dtarg = normalize_backward(grad_v.mul_(w * s), v, norm_v).to(targ.dtype)
    return dcont, dtarg, (sum_gc * w * inv_temperature).to(scale.dtype)


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


def _setup_context(ctx, inputs, output):
    cont, targ, pos, excl, scale, inv_temperature, clamp, impl, deterministic = inputs
    ctx.save_for_backward(cont, targ, pos, excl, scale, output[1])
    ctx.options = (inv_temperature, clamp, impl, deterministic)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled (M,) gradient for lse, which nothing differentiates


def _autograd_backward(ctx, grad_loss, _grad_lse):
    if grad_loss is None:  # the loss was not differentiated (grads are not materialised)
        return (None,) * 9
    cont, targ, pos, excl, scale, lse = ctx.saved_tensors
    inv_temperature, clamp, impl, deterministic = ctx.options
    if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable themselves
        dcont, dtarg, dscale = differentiable_backward(
            "nt_xent", impl, lambda c, t, s: contrastive_reference(c, t, pos, excl, s, inv_temperature, clamp),
            (cont, targ, scale), grad_loss,
        )
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
nt_xent_forward_op = define_op(
    "nt_xent_forward(Tensor cont, Tensor targ, Tensor pos, Tensor excl, Tensor scale, float inv_temperature, "
    "float? clamp, str impl, bool deterministic) -> (Tensor, Tensor)",
    _forward_kernel,
    _forward_fake,
    backward=_autograd_backward,
    setup_context=_setup_context,
)


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
    loss, _ = nt_xent_forward_op(cont, targ, pos, excl, scale, 1.0 / temperature, clamp, impl, deterministic)
    return loss


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
