"""The forward core: row LSEs and the loss, tile by tile, without any M x N matrix in memory.

lse_i = log sum_{j != excl_i} exp(S^_ij), loss = sum_i (lse_i - S^_{i,pos_i}) / n_loss over the logits of
kernels/tiles.py. Program (row block, column split) streams its column tiles with an online max / sum and
writes a partial (max, sum, positive logit); a merge kernel combines the splits. Column splitting lets small
M fill all SMs; at large M there is one split and the merge is O(M). A tile that holds no positive, no
excluded and no padding column skips every mask: with 128-row blocks that is all but ~2 tiles per block row.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .configs import block_d, pick_config
from .launch import cdiv, column_splits, empty, stat_dtype
from .normalize import normalize_rows
from .rows import RowSource, load_rows
from .tiles import LOG2E, Logits, clamp_binds, holds_special, operand, row_indices


@triton.jit
def _fwd_kernel(
    part_ptr,  # (3, nsplit, M) ACC out: running max and sum (log2 units), positive logit (log2 units)
    # u_ptr .. clamp2: Logits.args (kernels/tiles.py)
    u_ptr, v_ptr,  # (M, d), (N, d) normalised rows (operand dtype: configs.operand_dtype)
    pos_ptr, excl_ptr,  # (M,) int64
    scale_ptr,  # () ACC
    M, N, d, inv_t, clamp2,  # clamp2: the clamp in log2 units
    cols_per_split, nsplit,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CLAMP: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, NORMALIZE: tl.constexpr,
):
    ACC: tl.constexpr = scale_ptr.dtype.element_ty
    # as a tensor: tl.minimum / tl.maximum would round a bare float argument to fp32 (interpreter, fp64)
    clamp2 = tl.zeros([], ACC) + clamp2
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    row_ok = rows < M

    # The row tile stays on chip for the whole column loop (K = d in one tl.dot).
    x = operand(load_rows(u_ptr, u_ptr, rows, dd, M, M, d, d, False), UPCAST)
    sk2 = tl.load(scale_ptr) * inv_t * LOG2E
    pos, excl, pos_lo, pos_hi, excl_lo, excl_hi = row_indices(pos_ptr, excl_ptr, rows, row_ok)
    binds = clamp_binds(sk2, clamp2, NORMALIZE)

    # Finite start: a split can hold only the excluded column of a row, and exp2(-inf - -inf) is NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    p_i = tl.zeros([BLOCK_M], ACC)
    col_start = pid_s * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, N)
    for start in range(col_start, col_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        t = operand(load_rows(v_ptr, v_ptr, cols, dd, N, N, d, d, False), UPCAST)
        s2 = tl.dot(x, tl.trans(t), input_precision=PREC).to(ACC) * sk2
        if CLAMP:
            if binds:
                s2 = tl.minimum(tl.maximum(s2, -clamp2), clamp2)
        stop = start + BLOCK_N
        # Most tiles hold no positive, no excluded and no padding column: they skip every mask.
        if (stop > col_end) | holds_special(pos_lo, pos_hi, excl_lo, excl_hi, start, stop):
            # The positive logit comes from the same tile as the LSE (same operands, same rounding).
            p_i += tl.sum(tl.where(cols[None, :] == pos[:, None], s2, 0.0), 1)
            keep = (cols[None, :] < col_end) & (cols[None, :] != excl[:, None])
            s2 = tl.where(keep, s2, float("-inf"))
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
    lse_ptr,  # (M,) ACC out, natural log
    loss_ptr,  # (grid,) ACC out: per-program sum of (lse_i - S^_{i,pos_i}) / n_loss (the loss is their sum)
    M, nsplit, n_loss,
    BLOCK: tl.constexpr,
):
    ACC: tl.constexpr = lse_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    ok = rows < M
    m = tl.full([BLOCK], -1.0e30, ACC)
    for s in range(nsplit):
        m = tl.maximum(m, tl.load(part_ptr + s * M + rows, mask=ok, other=-1.0e30))
    l_sum = tl.zeros([BLOCK], ACC)
    p = tl.zeros([BLOCK], ACC)
    for s in range(nsplit):
        ms = tl.load(part_ptr + s * M + rows, mask=ok, other=-1.0e30)
        ls = tl.load(part_ptr + (nsplit + s) * M + rows, mask=ok, other=0.0)
        l_sum += ls * tl.exp2(ms - m)
        p += tl.load(part_ptr + (2 * nsplit + s) * M + rows, mask=ok, other=0.0)
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
    _fwd_merge_kernel[(loss_part.numel(),)](part, lse, loss_part, M, nsplit, n_loss, BLOCK=MERGE_BLOCK, num_warps=4)


def forward_core(rows: RowSource, cols: RowSource, logits: Logits, *, num_splits=None, config=None):
    """Shared forward of nt_xent and AdaSSL: (loss (), lse (M,), per-program regulariser sums).

    The M cont rows come from `rows`, the N targ rows from the plain source `cols`. The regulariser sums
    cover all rows and latent dims (undefined for PROLOGUE 0: not summed there, one launch fewer on the
    path that is launch-bound at small M).
    """
    dtype, device = cols.emb_a.dtype, cols.emb_a.device
    stat = stat_dtype(dtype)
    u, _, reg, v, _ = normalize_rows(rows, cols, stat, logits.normalize)
    lse = empty(rows.rows, stat, device)
    loss_part = empty(cdiv(rows.rows, MERGE_BLOCK), stat, device)
    row_lse(u, v, logits, lse, loss_part, rows.rows, config or pick_config("fwd", device, dtype, rows.width),
            num_splits)
    return loss_part.sum(), lse, reg
