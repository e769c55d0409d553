"""The forward core: row LSEs and the loss, tile by tile, without any M x N matrix in memory.

lse_i = log sum_{j != excl_i} exp(S^_ij), loss = sum_i (lse_i - S^_{i,pos_i}) / n_loss over the logits of
kernels/tiles.py. Program (row block, column split) streams its column tiles with an online max / sum and
writes a partial (max, sum, positive logit); a merge kernel combines the splits. Column splitting lets small
M fill all SMs; at large M there is one split and the merge is O(M). A tile that holds no positive, no
excluded and no padding column skips every mask: with 128-row blocks that is all but ~2 tiles per block row.
The logits' modes (kernels/tiles.py): SIGMOID sums softplus(-z_ij L_ij) per row instead of the online LSE (the
merge adds the splits' sums); LABELS takes each row's positive term as the mean logit over the columns of its
label, comparing the label tiles (every tile is masked).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .configs import block_d, pick_config
from .launch import cdiv, column_splits, empty, stat_dtype
from .normalize import normalize_rows
from .rows import RowSource
from .tiles import Logits, holds_special, owned_rows, softplus2, streamed_tile


@triton.jit
def _fwd_kernel(
    part_ptr,  # (3, nsplit, M) ACC out: running max and sum (log2 units), positive logit (log2 units)
    # u_ptr .. clamp2: Logits.args (kernels/tiles.py)
    u_ptr, v_ptr,  # (M, d), (N, d) normalised (or as-given) rows (operand dtype: configs.operand_dtype)
    pos_ptr, excl_ptr,  # (M,) int64 (LABELS: the labels and each row's count of positives)
    scale_ptr,  # () ACC (SIGMOID: (2,), the scale and the bias)
    M, N, d, inv_t, clamp2,  # clamp2: the clamp in log2 units
    cols_per_split, nsplit,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CLAMP: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, SIGMOID: tl.constexpr, LABELS: tl.constexpr,
    NORMALIZE: tl.constexpr,
):
    # SIGMOID: the sum slot holds sum_j softplus(-z_ij L_ij) (log2 units), the max and positive slots stay unused.
    # LABELS: the positive slot holds the positives' mean logit (each tile's sum over the row's count).
    ACC: tl.constexpr = scale_ptr.dtype.element_ty
    rows, row_ok, dd, x, sk2, b2, clamp2, binds, pos, excl, pos_lo, pos_hi, excl_lo, excl_hi = owned_rows(
        u_ptr, pos_ptr, excl_ptr, scale_ptr, M, d, inv_t, clamp2, BLOCK_M, BLOCK_D, UPCAST, SIGMOID, LABELS,
        NORMALIZE)
    pid_s = tl.program_id(1)

    # Finite start: a split can hold only the excluded column of a row, and exp2(-inf - -inf) is NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    p_i = tl.zeros([BLOCK_M], ACC)
    col_start = pid_s * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, N)
    for start in range(col_start, col_end, BLOCK_N):
        cols, _, s2 = streamed_tile(x, v_ptr, start, N, d, dd, sk2, b2, BLOCK_N, UPCAST, PREC, SIGMOID)
        if CLAMP:
            if binds:
                s2 = tl.minimum(tl.maximum(s2, -clamp2), clamp2)
        stop = start + BLOCK_N
        # Most tiles hold no positive, no excluded and no padding column: they skip every mask.
        special = (stop > col_end) | holds_special(pos_lo, pos_hi, excl_lo, excl_hi, start, stop)
        inside = cols[None, :] < col_end
        if SIGMOID:
            if special:  # the positive's term is softplus(-L); padding columns add nothing
                s2 = tl.where(cols[None, :] == pos[:, None], -s2, s2)
                l_i += tl.sum(tl.where(inside, softplus2(s2), 0.0), 1)
            else:
                l_i += tl.sum(softplus2(s2), 1)
        else:
            # The positive logits come from the same tile as the LSE (same operands, same rounding).
            if LABELS:  # every tile may hold positives: compare the label tiles
                labels = tl.load(pos_ptr + cols, mask=cols < col_end, other=0)
                same = (labels[None, :] == pos[:, None]) & inside
                p_i += tl.sum(tl.where(same, s2, 0.0), 1) * excl  # (LABELS: excl holds 1 / count)
                s2 = tl.where(inside, s2, float("-inf"))
            elif special:
                p_i += tl.sum(tl.where(cols[None, :] == pos[:, None], s2, 0.0), 1)
                s2 = tl.where(inside & (cols[None, :] != excl[:, None]), s2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s2, 1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s2 - m_new[:, None]), 1)
            m_i = m_new

    out = part_ptr + pid_s * M + rows
    tl.store(out, m_i, mask=row_ok)
    tl.store(out + nsplit * M, l_i, mask=row_ok)
    tl.store(out + 2 * nsplit * M, p_i, mask=row_ok)


@triton.jit
def _fwd_merge_kernel(
    part_ptr,  # (3, nsplit, M) ACC from _fwd_kernel
    lse_ptr,  # (M,) ACC out, natural log (SIGMOID: row i's sum of terms)
    loss_ptr,  # (grid,) ACC out: per-program sum of (lse_i - S^_{i,pos_i}) / n_loss (the loss is their sum)
    M, nsplit, n_loss,
    BLOCK: tl.constexpr, SIGMOID: tl.constexpr,
):
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    ok = rows < M
    m = tl.zeros([BLOCK], ACC)
    if not SIGMOID:
        m = tl.full([BLOCK], -1.0e30, ACC)
        for s in range(nsplit):
            m = tl.maximum(m, tl.load(part_ptr + s * M + rows, mask=ok, other=-1.0e30))
    l_sum = tl.zeros([BLOCK], ACC)
    p = tl.zeros([BLOCK], ACC)
    for s in range(nsplit):
        ls = tl.load(part_ptr + (nsplit + s) * M + rows, mask=ok, other=0.0)
        if SIGMOID:
            l_sum += ls
        else:
            l_sum += ls * tl.exp2(tl.load(part_ptr + s * M + rows, mask=ok, other=-1.0e30) - m)
        p += tl.load(part_ptr + (2 * nsplit + s) * M + rows, mask=ok, other=0.0)
    if SIGMOID:  # the terms add up, with no shift
        lse2 = l_sum
    else:
        lse2 = m + tl.log2(tl.where(ok, l_sum, 1.0))
    LN2: tl.constexpr = 0.6931471805599453
    tl.store(lse_ptr + rows, lse2 * LN2, mask=ok)
    tl.store(loss_ptr + pid, tl.sum(tl.where(ok, (lse2 - p) * LN2, 0.0), 0) / n_loss)


MERGE_BLOCK = 128  # rows per program of the merge kernel: the loss comes back as cdiv(M, 128) partial sums


def row_lse(u, v, logits: Logits, lse, loss_part, n_loss: int, cfg, num_splits):
    """Row LSEs of u (M, ld) scored against v (N, ld) into `lse` (M,), and per-program sums of
    (lse_i - S_{i,pos_i}) / n_loss into `loss_part` (cdiv(M, MERGE_BLOCK),): the matrix kernel and its merge."""
    M, ld = u.shape
    n_rb = cdiv(M, cfg.block_m)
    n_cb = cdiv(v.shape[0], cfg.block_n)
    per = column_splits(n_rb, n_cb, u.device, num_splits)
    nsplit = cdiv(n_cb, per)
    part = empty((3, nsplit, M), lse.dtype, u.device)
    _fwd_kernel[(n_rb, nsplit)](
        part, *logits.args(u, v), per * cfg.block_n, nsplit,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d(ld), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **logits.constexprs(u.dtype))
    _fwd_merge_kernel[(loss_part.numel(),)](part, lse, loss_part, M, nsplit, n_loss, BLOCK=MERGE_BLOCK,
                                            SIGMOID=logits.sigmoid, num_warps=4)


def forward_core(rows: RowSource, cols: RowSource, logits: Logits, *, num_splits=None, config=None):
    """Shared forward of nt_xent, AdaSSL, SigLIP and labelled InfoNCE: (loss (), lse (M,), per-program regulariser
    sums). logits.normalize False: the rows are scored as given.

    The M cont rows come from `rows`, the N targ rows from the plain source `cols`. The regulariser sums
    cover all rows and latent dims (undefined for PROLOGUE 0: not summed there, one launch fewer on the
    path that is launch-bound at small M).
    """
    dtype, device = cols.emb_a.dtype, cols.emb_a.device
    stat = stat_dtype(dtype)
    u, _, reg, v, _ = normalize_rows(rows, cols, stat, logits.normalize)
    lse = empty(rows.rows, stat, device)
    loss_part = empty(cdiv(rows.rows, MERGE_BLOCK), stat, device)
    kind = "fwd_sigmoid" if logits.sigmoid else "fwd"
    row_lse(u, v, logits, lse, loss_part, rows.rows, config or pick_config(kind, device, dtype, rows.width),
            num_splits)
    return loss_part.sum(), lse, reg
