"""The torch backend: the chunked nt_xent core and every op's entry points in plain PyTorch (docs/backends.md).

Nothing M x M is ever held. One loop over row blocks (`row_blocks`) serves every phase; the symmetric
InfoNCE op and the AdaSSL op are built on it (the latter with the latent prologue in closed form and its
analytic backward, docs/spec.md 3.3-3.6). Besides the entry points every backend has, this one has the
one-pass training schedule (`nt_xent_forward_backward`, `adassl_forward_backward`: the forward and the
gradients for a unit incoming gradient in one pass over S).

This module is the bottom layer with kernels/ and the CUDA binding: it imports only `_checks` and
`indices` of the library.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from adassl_fast import _checks
from adassl_fast.indices import diagonal_indices, partner_indices

NORM_EPS = 1e-12
# The latent prologue's constants (docs/spec.md 2.4, 2.6): sigma = softplus(pre) + SIGMA_EPS, logvar clamped
# to +-LOGVAR_BOUND, the uniform noise of the logistic trick clamped to [UNIFORM_EPS, 1 - UNIFORM_EPS].
SIGMA_EPS = 1e-6
LOGVAR_BOUND = 10.0
UNIFORM_EPS = 1e-6

# ----------------------------------------------------------------------------------------------------
# The nt_xent core. One loop over blocks of rows (`row_blocks`) serves every phase: each block holds a
# (rows x N) slab of logits, sized near 16 MB (one buffer for all blocks), so memory is O(M d + block) and the
# work is plain BLAS.
#   - statistics only (the forward without gradients): one GEMM per block;
#   - gradients from saved LSEs (the two-pass backward, double backward, the distributed ring): three;
#   - statistics and gradients together (the one-pass forward of training): three, where the two-pass
#     schedule costs four. Each block holds whole rows, so its LSEs are known once its exps are summed, and
#     the slab of exps becomes the gradient's slab with no recompute (as fused linear-cross-entropy does).
# Nothing else of size M x d is held but v (the normalised columns), the two gradients and the inputs: the
# rows are normalised block by block, and the normalisation backward works in place on the gradients.

SLAB_ELEMENTS = 1 << 22
# exp(S) itself is summed where |S| < 30 (the usual settings: |scale / tau| or a clamp below 30): its sums
# stay far inside float32's range, and one exp per element serves row and column statistics alike.
_UNSHIFTED_BOUND = 30.0


def _rows_per_block(n_cols: int) -> int:
    return max(16, SLAB_ELEMENTS // max(n_cols, 1))


def _normalize_backward_(grad_u: Tensor, x: Tensor, norm: Tensor, radial: Tensor, weight) -> Tensor:
    """grad_u (dL/du for u = x / max(||x||, eps)) becomes weight * dL/dx in place, with radial = x . grad_u per
    row: weight (g - (u.g) u) / ||x||, or weight g / eps below eps. Whole-matrix ops, no M x d temporaries."""
    inv = weight / norm.clamp_min(NORM_EPS)
    along = torch.where(norm > NORM_EPS, radial * inv / norm.clamp_min(NORM_EPS) ** 2, 0.0)
    return grad_u.mul_(inv.unsqueeze(1)).addcmul_(x, along.unsqueeze(1), value=-1)


def _logit_bound(s: float, clamp: float | None, reach: float) -> tuple[float, bool]:
    """An upper bound on |S| and whether the clamp can bite, given reach >= max |<u_i, v_j>| (plus rounding)."""
    bound = abs(s) * reach * (1 + 1e-5)
    if clamp is not None and bound >= clamp:
        return clamp, True
    return bound, False


def _row_norms(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=1, dtype=_checks.accumulation_dtype(x.dtype))


def _reach(x_norms: Tensor, y_norms: Tensor) -> float:
    """A bound on |<x_i, y_j>| for rows taken as given (normalize=False; unit rows have 1): the product of the
    largest norms (Cauchy-Schwarz), read on the host (one device sync)."""
    if x_norms.numel() == 0 or y_norms.numel() == 0:
        return 0.0
    return float(x_norms.max() * y_norms.max())


def one_exp_pass(scale, inv_temperature: float, clamp: float | None, reach: float = 1.0) -> bool:
    """Whether exp(S) needs no shift for any row or column (so one pass gives row and column statistics);
    reach: a bound on |<u_i, v_j>| (1 for unit rows, `_reach` for rows as given)."""
    return _logit_bound(float(scale) * inv_temperature, clamp, reach)[0] < _UNSHIFTED_BOUND


class _Pass(NamedTuple):
    lse: Tensor  # (M,) row LSEs (computed, or the ones given)
    positive: Tensor  # (M,) clamped logit of each row's positive column (0 where pos = -1)
    col_sum: Tensor | None  # (N,) sum_i exp(S_ij), when asked for
    dcont: Tensor | None  # (M, d) and (N, d) in the accumulation dtype, and the 0-dim dscale like `scale`
    dtarg: Tensor | None
    dscale: Tensor | None


def row_blocks(cont, targ, pos, excl, scale, inv_temperature, clamp, *, grad_weight=None, lse=None, col_lse=None,
                col_sum=False, labels=None, normalize=True) -> _Pass:
    """One pass over the row blocks of S = scale / tau * u v^T, clamped, each row's excluded column removed.
    u, v: the rows normalised, or (normalize=False) as given.

    grad_weight (float or 0-dim tensor) w: also the gradients of w * sum_i [lse_i - S_{i,pos_i}] (plus
    w * sum_j [col_lse_j - S_jj] where col_lse is given: symmetric InfoNCE, both softmaxes in one G).
    lse (M,): the row LSEs to differentiate with (the two-pass backward); None computes them in this pass.
    col_sum: also sum_i exp(S_ij) (needs `one_exp_pass`).
    labels (row labels (M,), column labels (N,), row counts (M,) or None): row i's positives are the columns j
    of its label, and its positive term the sum of their (clamped) logits over its count of positives: the
    given count (the global one, for a block of another rank's columns), else the count among these columns
    (docs/spec.md 2.12; pos must be -1 throughout). Per block the label tiles are compared: nothing M x N
    outlives the block.
    normalize=False: u, v are the rows as given (no normalisation, nor its backward).
    """
    acc = _checks.accumulation_dtype(cont.dtype)
    s = float(scale) * inv_temperature
    x = cont.to(acc)
    norm_u, norm_v = torch.linalg.vector_norm(x, dim=1), _row_norms(targ)
    bound, clamp_active = _logit_bound(s, clamp, 1.0 if normalize else _reach(norm_u, norm_v))
    unshifted = bound < _UNSHIFTED_BOUND
    m, n = x.shape[0], targ.shape[0]
    # u_i * s = x_i * row_factor_i
    row_factor = s / norm_u.clamp_min(NORM_EPS) if normalize else norm_u.new_full((m,), s)
    v = targ.to(acc)
    if normalize:
        v = v / norm_v.clamp_min(NORM_EPS).unsqueeze(1)
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
        if labels is not None:
            same = labels[0][r0:r1].unsqueeze(1) == labels[1]
            count = (same.sum(1) if labels[2] is None else labels[2][r0:r1]).to(acc)
            positive[r0:r1] = torch.where(same, slab, 0.0).sum(1) / count
        if col_lse is not None and not unshifted:
            col_part = (slab - col_lse).exp_()  # P' (before the row exps overwrite S)
        shift = _exponentiate(slab, None if lse is None else lse[r0:r1], unshifted)
        # (a separate pass over the slab: on the CPU a GEMM against [V, 1] costs more than G V and this sum together)
        row_sum = slab.sum(1) if lse is None else None
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
        if labels is not None:  # minus the positives' mean: row_scale G = slab - row_scale [same] / count
            row_scale = row_sum if lse is None else row_scale
            weight = (1.0 if col_lse is None else 2.0) / count
            slab.sub_(same * (weight if row_scale is None else weight * row_scale).unsqueeze(1))
        if outside is not None:
            slab.masked_fill_(outside, 0.0)
        if lse is None:
            row_lse[r0:r1] = _log_plus(row_sum, shift)
            row_scale = row_sum
        dcont[r0:r1] = _block_gradient(slab, slab @ v, row_scale, hot, pos_blk, u_scaled, v, grad_v)
    if not grads:
        return _Pass(row_lse, positive, sums, None, None, None)
    # Whole-matrix work after the loop, in a few large ops: on a loaded machine every small parallel op
    # in the loop waits for both threads to be scheduled. dcont holds G V, grad_v G^T (s U).
    del slab, buffer
    radial = torch.linalg.vecdot(x, dcont)
    if normalize:
        sum_gc = (radial / norm_u.clamp_min(NORM_EPS)).sum()  # sum_ij G_ij C_ij = sum_i u_i . (G V)_i
        _normalize_backward_(dcont, x, norm_u, radial, grad_weight * s)
        y = targ.to(acc)
        _normalize_backward_(grad_v, y, norm_v, torch.linalg.vecdot(y, grad_v), grad_weight)
    else:  # the rows were used as given: G V and G^T (s U) are their gradients already, up to the weights
        sum_gc = radial.sum()
        dcont.mul_(grad_weight * s)
        grad_v.mul_(grad_weight)
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
    if clamp_active and _clamp_bites(slab, clamp):
        outside = (slab > clamp) | (slab < -clamp)
        slab.clamp_(-clamp, clamp)
        hot.mul_(raw.abs() <= clamp)  # the inclusive indicator
        raw = raw.clamp(-clamp, clamp)
    # Rows without an excluded column (excl = -1) write their own value back: no data-dependent branch.
    col = excl_blk.clamp_min(0).unsqueeze(1)
    slab.scatter_(1, col, torch.where(excl_blk.unsqueeze(1) >= 0, float("-inf"), slab.gather(1, col)))
    return torch.where(has_positive, raw, 0.0), outside, hot


def _clamp_bites(slab, clamp) -> bool:
    """Whether some logit of the block lies outside [-clamp, clamp]. On the host one read of the slab tells, and
    a block the clamp cannot change skips the mask, the clamp and the masked fill (about 8x that read at 512 x
    512): the usual case, as a clamp equal to |scale / tau| bites only on rounding. On an accelerator the answer
    would stall the queue once per block, so every block is masked there."""
    if slab.device.type != "cpu":
        return True
    # (amax and amin: each a third of aminmax's time on the CPU; NaN counts as biting: the masked path)
    return not (float(slab.amin()) >= -clamp and float(slab.amax()) <= clamp)


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


def _label_pairs(labels):
    """labels as row_blocks takes them: a square op's one labelling (N,) of rows and columns, or already
    (row labels, column labels, row counts) (the distributed schedules' blocks)."""
    return labels if labels is None or isinstance(labels, tuple) else (labels, labels, None)


def _unpaired(n: int, device) -> tuple[Tensor, Tensor]:
    """pos, excl for label-defined positives: no single positive column, nothing excluded."""
    none = torch.full((n,), -1, dtype=torch.int64, device=device)
    return none, none


def nt_xent_forward(cont, targ, pos, excl, scale, inv_temperature, clamp, labels=None, *, normalize=True):
    p = row_blocks(cont, targ, pos, excl, scale, inv_temperature, clamp, labels=_label_pairs(labels),
                   normalize=normalize)
    return (p.lse - p.positive).mean(), p.lse


def nt_xent_backward(grad_loss, cont, targ, pos, excl, scale, lse, inv_temperature, clamp, deterministic,
                    col_lse=None, labels=None, *, normalize=True):
    """Gradients (dcont, dtarg, dscale) of mean_i [lse_i - S_{i,pos_i}] from the saved LSEs.

    col_lse (N,): the column LSEs of the symmetric InfoNCE loss, (that mean + mean_j [col_lse_j - S_jj]) / 2
    (pos = arange, nothing excluded): both directions' softmaxes go into one G, one pass for both.
    """
    weight = grad_loss.to(lse.dtype) / (2 * cont.shape[0] if col_lse is not None else cont.shape[0])
    p = row_blocks(cont, targ, pos, excl, scale, inv_temperature, clamp, grad_weight=weight, lse=lse,
                    col_lse=col_lse, labels=_label_pairs(labels), normalize=normalize)
    return p.dcont.to(cont.dtype), p.dtarg.to(targ.dtype), p.dscale


def nt_xent_forward_backward(cont, targ, pos, excl, scale, inv_temperature, clamp, labels=None, *, normalize=True):
    """(loss, lse, dcont, dtarg, dscale) in one pass: the gradients for grad_loss = 1, in the accumulation
    dtype (the op's backward scales them by the incoming gradient)."""
    p = row_blocks(cont, targ, pos, excl, scale, inv_temperature, clamp, grad_weight=1.0 / cont.shape[0],
                   labels=_label_pairs(labels), normalize=normalize)
    return (p.lse - p.positive).mean(), p.lse, p.dcont, p.dtarg, p.dscale


# ----------------------------------------------------------------------------------------------------
# The symmetric InfoNCE op. A backend's one-directional nt_xent core gives the symmetric loss in two calls per
# phase; `symmetric_forward` / `symmetric_backward` build that from it.


def symmetric_forward(directional):
    """(loss, lse (2, N)) from a one-directional core forward: rows against columns, then the reverse."""

    def forward(query, key, scale, inv_temperature, clamp, *, normalize=True):
        pos, excl = diagonal_indices(query.shape[0], query.device)
        loss_r, lse_r = directional(query, key, pos, excl, scale, inv_temperature, clamp, normalize=normalize)
        loss_c, lse_c = directional(key, query, pos, excl, scale, inv_temperature, clamp, normalize=normalize)
        return (loss_r + loss_c) / 2, torch.stack([lse_r, lse_c])

    return forward


def symmetric_backward(directional):
    """(dquery, dkey, dscale) from a one-directional core backward: one call per direction, summed."""

    def backward(grad_loss, query, key, scale, lse, inv_temperature, clamp, deterministic, *, normalize=True):
        pos, excl = diagonal_indices(query.shape[0], query.device)
        half = grad_loss / 2
        dq, dk, ds = directional(half, query, key, pos, excl, scale, lse[0], inv_temperature, clamp, deterministic,
                                 normalize=normalize)
        dk2, dq2, ds2 = directional(half, key, query, pos, excl, scale, lse[1], inv_temperature, clamp,
                                    deterministic, normalize=normalize)
        return dq + dq2, dk + dk2, ds + ds2

    return backward


def _square_indices(query, labels):
    n = query.shape[0]
    return diagonal_indices(n, query.device) if labels is None else _unpaired(n, query.device)


def info_nce_forward(query, key, scale, inv_temperature, clamp, labels=None, *, normalize=True):
    """One pass for both directions where one exp serves rows and columns (|scale / tau| < 30, or a clamp
    below 30: the usual settings; rows taken as given also count their norms), else one pass per direction.
    labels (N,): label-defined positives (the positives' mean logit is the same sum down the columns as along
    the rows: the labelling is shared)."""
    pos, excl = _square_indices(query, labels)
    reach = 1.0 if normalize else _reach(_row_norms(query), _row_norms(key))
    if not one_exp_pass(scale, inv_temperature, clamp, reach):
        loss_r, lse_r = nt_xent_forward(query, key, pos, excl, scale, inv_temperature, clamp, labels,
                                        normalize=normalize)
        loss_c, lse_c = nt_xent_forward(key, query, pos, excl, scale, inv_temperature, clamp, labels,
                                        normalize=normalize)
        return (loss_r + loss_c) / 2, torch.stack([lse_r, lse_c])
    p = row_blocks(query, key, pos, excl, scale, inv_temperature, clamp, col_sum=True, labels=_label_pairs(labels),
                   normalize=normalize)
    col_lse = p.col_sum.log_()
    return ((p.lse - p.positive).mean() + (col_lse - p.positive).mean()) / 2, torch.stack([p.lse, col_lse])


def info_nce_backward(grad_loss, query, key, scale, lse, inv_temperature, clamp, deterministic, labels=None, *,
                      normalize=True):
    pos, excl = _square_indices(query, labels)
    return nt_xent_backward(grad_loss, query, key, pos, excl, scale, lse[0], inv_temperature, clamp, deterministic,
                            col_lse=lse[1], labels=labels, normalize=normalize)


# InfoNCE with label-defined positives (docs/spec.md 2.12): one-directional (the core with labels) and symmetric.


def labelled_forward(query, key, labels, scale, inv_temperature, clamp, *, normalize=True):
    return nt_xent_forward(query, key, *_unpaired(query.shape[0], query.device), scale, inv_temperature, clamp,
                           labels, normalize=normalize)


def labelled_backward(grad_loss, query, key, labels, scale, lse, inv_temperature, clamp, deterministic, *,
                      normalize=True):
    return nt_xent_backward(grad_loss, query, key, *_unpaired(query.shape[0], query.device), scale, lse,
                            inv_temperature, clamp, deterministic, labels=labels, normalize=normalize)


def labelled_forward_backward(query, key, labels, scale, inv_temperature, clamp, *, normalize=True):
    return nt_xent_forward_backward(query, key, *_unpaired(query.shape[0], query.device), scale, inv_temperature,
                                    clamp, labels, normalize=normalize)


def labelled_info_nce_forward(query, key, labels, scale, inv_temperature, clamp, *, normalize=True):
    return info_nce_forward(query, key, scale, inv_temperature, clamp, labels, normalize=normalize)


def labelled_info_nce_backward(grad_loss, query, key, labels, scale, lse, inv_temperature, clamp, deterministic, *,
                               normalize=True):
    return info_nce_backward(grad_loss, query, key, scale, lse, inv_temperature, clamp, deterministic, labels,
                             normalize=normalize)



# ----------------------------------------------------------------------------------------------------
# The AdaSSL op: the latent prologue in closed form (forward and backward), around the core.


def _softplus_slope(pre: Tensor) -> Tensor:
    """d softplus / d pre with torch's threshold: sigmoid(pre), exactly 1 above 20."""
    return torch.where(pre > 20, torch.ones_like(pre), torch.sigmoid(pre))


def _unclamped_log_variance(pre: Tensor) -> tuple[Tensor, Tensor]:
    """(sigma = softplus(pre) + 1e-6, 2 log sigma before the clamp). softplus reads a contiguous copy: torch's CPU
    kernel runs a strided column slice such as post[:, d:] about ten times slower (~100 vs ~8 us at 256 x 16)."""
    sigma = F.softplus(pre.contiguous()) + SIGMA_EPS
    return sigma, 2 * torch.log(sigma)


def _gaussian(pre: Tensor):
    """sigma-related quantities of one Gaussian: (logvar clamped, d logvar / d pre with the clamp indicator)."""
    sigma, raw = _unclamped_log_variance(pre)
    inside = raw.abs() <= LOGVAR_BOUND
    dlogvar_dpre = torch.where(inside, 2 * _softplus_slope(pre) / sigma, torch.zeros_like(pre))
    return raw.clamp(-LOGVAR_BOUND, LOGVAR_BOUND), dlogvar_dpre


def direction_forward(post, prior, noise, variant):
    """r (B, d) and the regulariser summed over rows and dims, for one direction."""
    d = post.shape[1] // 2
    head, tail = post[:, :d], post[:, d:]
    if variant == "v":
        logvar_q, logvar_p = (_unclamped_log_variance(pre)[1].clamp(-LOGVAR_BOUND, LOGVAR_BOUND)
                              for pre in (tail, prior[:, d:]))
        r = head + noise * torch.exp(0.5 * logvar_q)
        delta = head - prior[:, :d]
        kl = 0.5 * (logvar_p - logvar_q + torch.exp(logvar_q - logvar_p) + delta**2 * torch.exp(-logvar_p) - 1)
        return r, kl.sum()
    soft = torch.sigmoid(head + logistic_noise(noise))
    return (soft > 0.5).to(tail.dtype) * tail, torch.sigmoid(head).sum()


def direction_backward(grad_r, reg_weight, post, prior, noise, variant):
    """(dpost, dprior) of one direction from dL/dr and the regulariser's weight d l_reg / d R_sum."""
    d = post.shape[1] // 2
    head, tail = post[:, :d], post[:, d:]
    if variant == "v":
        logvar_q, dlvq_dpre = _gaussian(tail)
        logvar_p, dlvp_dpre = _gaussian(prior[:, d:])
        delta = head - prior[:, :d]
        inv_var_p = torch.exp(-logvar_p)
        ratio = torch.exp(logvar_q - logvar_p)
        d_mu = grad_r + reg_weight * delta * inv_var_p
        d_logvar_q = grad_r * noise * 0.5 * torch.exp(0.5 * logvar_q) + reg_weight * 0.5 * (ratio - 1)
        d_logvar_p = reg_weight * 0.5 * (1 - ratio - delta**2 * inv_var_p)
        dpost = torch.cat([d_mu, d_logvar_q * dlvq_dpre], 1)
        dprior = torch.cat([-reg_weight * delta * inv_var_p, d_logvar_p * dlvp_dpre], 1)
        return dpost, dprior
    soft = torch.sigmoid(head + logistic_noise(noise))
    keep = torch.sigmoid(head)
    d_logits = grad_r * tail * soft * (1 - soft) + reg_weight * keep * (1 - keep)
    return torch.cat([d_logits, grad_r * (soft > 0.5).to(tail.dtype)], 1), None


def edited_rows(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx, variant):
    acc = _checks.accumulation_dtype(emb_x.dtype)
    up = lambda t: t.to(acc) if t.numel() else None
    r_xy, reg_xy = direction_forward(up(post_xy), up(prior_xy), up(noise_xy), variant)
    r_yx, reg_yx = direction_forward(up(post_yx), up(prior_yx), up(noise_yx), variant)
    ex, ey = up(emb_x), up(emb_y)
    return torch.cat([ey + r_yx, ex + r_xy]), torch.cat([ex, ey]), (reg_xy + reg_yx) / (2 * emb_x.shape[0])


def adassl_forward(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx, scale,
                          inv_temperature, clamp, variant, *, normalize=True):
    cont, targ, l_reg = edited_rows(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx, variant)
    pos, excl = partner_indices(cont.shape[0], cont.device)
    l_ssl, lse = nt_xent_forward(cont, targ, pos, excl, scale, inv_temperature, clamp, normalize=normalize)
    return l_ssl, l_reg, lse


def adassl_forward_backward(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx, scale,
                                   inv_temperature, clamp, variant, *, normalize=True):
    """(l_ssl, l_reg, lse, dcont, dtarg, dscale): the nt_xent core's one-pass training schedule on the edited
    rows, its gradients for grad_ssl = 1 (the backward scales them and runs the latent prologue's backward)."""
    cont, targ, l_reg = edited_rows(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx, variant)
    pos, excl = partner_indices(cont.shape[0], cont.device)
    l_ssl, lse, dcont, dtarg, dscale = nt_xent_forward_backward(cont, targ, pos, excl, scale, inv_temperature, clamp,
                                                                normalize=normalize)
    return l_ssl, l_reg, lse, dcont, dtarg, dscale


def adassl_backward(grad_ssl, grad_reg, emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy,
                           noise_yx, scale, lse, inv_temperature, clamp, variant, deterministic, *, normalize=True):
    cont, targ, _ = edited_rows(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx, variant)
    pos, excl = partner_indices(cont.shape[0], cont.device)
    dcont, dtarg, dscale = nt_xent_backward(grad_ssl, cont, targ, pos, excl, scale, lse, inv_temperature, clamp, True,
                                            normalize=normalize)
    return adassl_gradients(dcont, dtarg, dscale, grad_reg, emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx,
                            noise_xy, noise_yx, variant)


def adassl_gradients(dcont, dtarg, dscale, grad_reg, emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy,
                     noise_yx, variant):
    """The AdaSSL op's seven gradients from the core's (dcont, dtarg, dscale) on the edited rows (accumulation
    dtype) and grad_reg = d L / d l_reg."""
    acc = _checks.accumulation_dtype(emb_x.dtype)
    reg_weight = grad_reg.to(acc) / (2 * emb_x.shape[0])  # l_reg = (R_xy + R_yx) / 2B
    return (*prologue_backward(dcont, dtarg, reg_weight, emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx,
                               noise_xy, noise_yx, variant), dscale)


def prologue_backward(dcont, dtarg, reg_weight, emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy,
                      noise_yx, variant):
    """The latent prologue's analytic backward: dcont, dtarg (2B, d) on the edited rows (accumulation dtype) and
    reg_weight (0-dim) = d L / d (R_xy + R_yx) -> (demb_x, demb_y, dpost_xy, dpost_yx, dprior_xy, dprior_yx)
    in the inputs' dtypes (empty priors get empty gradients)."""
    acc = _checks.accumulation_dtype(emb_x.dtype)
    b = emb_x.shape[0]
    up = lambda t: t.to(acc) if t.numel() else None
    dpost_xy, dprior_xy = direction_backward(dcont[b:], reg_weight, up(post_xy), up(prior_xy), up(noise_xy), variant)
    dpost_yx, dprior_yx = direction_backward(dcont[:b], reg_weight, up(post_yx), up(prior_yx), up(noise_yx), variant)
    out = lambda g, like: torch.empty_like(like) if g is None else g.to(like.dtype)
    return (
        (dtarg[:b] + dcont[b:]).to(emb_x.dtype),
        (dtarg[b:] + dcont[:b]).to(emb_y.dtype),
        out(dpost_xy, post_xy),
        out(dpost_yx, post_yx),
        out(dprior_xy, prior_xy),
        out(dprior_yx, prior_yx),
    )


def logistic_noise(noise: Tensor) -> Tensor:
    """Logistic(0, 1) from uniform noise clamped to [1e-6, 1 - 1e-6]."""
    u = noise.clamp(UNIFORM_EPS, 1 - UNIFORM_EPS)
    return torch.log(u) - torch.log(1 - u)


# ----------------------------------------------------------------------------------------------------
# The SigLIP op (docs/spec.md 2.11, 3.7): an elementwise softplus over the logits, no row statistic, so the
# forward and the gradients come from one pass over the row blocks. L = a <u_i, v_j> + b, and with
# z_ii = 1, z_ij = -1 elsewhere, softplus(-z L) = softplus(L) - [i == j] L, so
#   loss = (sum_ij softplus(L_ij) - sum_i L_ii) / N,   dL/dL_ij = G_ij = (sigmoid(L_ij) - [i == j]) / N.
# Then dU = a G V, dV = a G^T U, da = sum_i u_i . (G V)_i, db = sum_ij G_ij, and the normalisation backward.


def _softplus(x: Tensor) -> Tensor:
    return F.softplus(x, threshold=40.0)


def siglip_blocks(query, key, params, normalize, *, positives=0, loss=True, grad_weight=None):
    """One pass over the row blocks of L = params[0] * u v^T + params[1] (M x N), row i's positive column
    i + positives (None: no positive among these columns, as for another rank's block in the ring).

    Returns (the SUM of the M x N terms or None, dquery, dkey, dparams), the gradients (of grad_weight * that
    sum) in the accumulation dtype where grad_weight (0-dim or float) is given, else None. normalize=False:
    u, v = the rows.
    """
    acc = _checks.accumulation_dtype(query.dtype)
    a, b = float(params[0]), float(params[1])
    x, y = query.to(acc), key.to(acc)
    norm_u = torch.linalg.vector_norm(x, dim=1) if normalize else None
    norm_v = torch.linalg.vector_norm(y, dim=1) if normalize else None
    v = y if norm_v is None else y / norm_v.clamp_min(NORM_EPS).unsqueeze(1)
    m, n, d = x.shape[0], y.shape[0], x.shape[1]
    grads = grad_weight is not None
    if grads:
        v_ones = torch.cat([v, v.new_ones(n, 1)], 1)  # G [V, 1] also sums each row of G
        v = v_ones[:, :d]
    total = torch.zeros((), dtype=acc, device=x.device)
    if grads:
        gv = torch.empty(m, d + 1, dtype=acc, device=x.device)
        grad_v = torch.zeros(n, d, dtype=acc, device=x.device)
    step = _rows_per_block(n)
    buffer = torch.empty(min(step, m), n, dtype=acc, device=x.device)
    for r0 in range(0, m, step):
        r1 = min(r0 + step, m)
        u_blk = x[r0:r1] if norm_u is None else x[r0:r1] / norm_u[r0:r1].clamp_min(NORM_EPS).unsqueeze(1)
        slab = torch.mm(u_blk, v.t(), out=buffer[: r1 - r0]).mul_(a).add_(b)
        diag = slab.new_empty(0) if positives is None else slab.diagonal(r0 + positives)
        if loss:
            # softplus returns x itself above its threshold, off by exp(-x): 2e-9 at the default 20, below float64's
            # rounding at 40 (where exp(x) still fits float32). The positives' terms as softplus(-L_ii) itself:
            # softplus(L_ii) - L_ii cancels where L_ii is large.
            total += (_softplus(diag.neg()) - _softplus(diag)).sum() + _softplus(slab).sum()
        if not grads:
            continue
        slab.sigmoid_()
        diag.sub_(1.0)  # N G of the block
        torch.mm(slab, v_ones, out=gv[r0:r1])
        grad_v.addmm_(slab.t(), u_blk)
    total = total if loss else None
    if not grads:
        return total, None, None, None
    del slab, buffer
    dcont, dbias_rows = gv[:, :d], gv[:, d]
    u_dot = torch.linalg.vecdot(x, dcont)  # x_i . (N G V)_i
    dscale = (u_dot if norm_u is None else u_dot / norm_u.clamp_min(NORM_EPS)).sum() * grad_weight
    dbias = dbias_rows.sum() * grad_weight
    if norm_u is None:
        dcont = dcont * (grad_weight * a)
    else:
        dcont = _normalize_backward_(dcont, x, norm_u, u_dot, grad_weight * a)
    if norm_v is None:
        grad_v.mul_(grad_weight * a)
    else:
        _normalize_backward_(grad_v, y, norm_v, torch.linalg.vecdot(y, grad_v), grad_weight * a)
    return total, dcont, grad_v, torch.stack([dscale, dbias]).to(params.dtype)


def siglip_forward(query, key, params, *, normalize=True):
    """(loss, an empty LSE): SigLIP keeps no row statistic between its forward and backward."""
    total, *_ = siglip_blocks(query, key, params, normalize)
    return total / query.shape[0], total.new_empty(0)


def siglip_backward(grad_loss, query, key, params, lse, deterministic, *, normalize=True):
    _, dq, dk, dparams = siglip_blocks(query, key, params, normalize, loss=False,
                                        grad_weight=grad_loss.to(params.dtype) / query.shape[0])
    return dq.to(query.dtype), dk.to(key.dtype), dparams


def siglip_forward_backward(query, key, params, *, normalize=True):
    """(loss, empty LSE, dquery, dkey, dparams) in one pass, the gradients for grad_loss = 1."""
    total, dq, dk, dparams = siglip_blocks(query, key, params, normalize, grad_weight=1.0 / query.shape[0])
    return total / query.shape[0], total.new_empty(0), dq, dk, dparams
