"""Fused NT-Xent core in Triton: forward and backward without any M x N matrix in memory.

Math (docs/backends.md, SPEC 2.1 / 3.1): u_i = c_i / max(|c_i|, eps), v_j = t_j / max(|t_j|, eps),
S_ij = scale / tau * <u_i, v_j>, S^ = clamp(S, +-clamp), lse_i = log sum_{j != excl_i} exp(S^_ij),
loss = mean_i (lse_i - S^_{i,pos_i}). Backward: G = grad / M * (P - onehot(pos)) * [|S| <= clamp],
dU = s G V, dV = s G^T U, dscale = 1/tau sum G * C, then the normalisation backward.

Design (flash-attention style; see DESIGN.md "The kernels"):
- A tiny pre-kernel computes the inverse row norms of both sides (O(M d) reads). The matmul kernels
  feed the *raw* rows to tl.dot and multiply the fp32 products by rinv_i * cinv_j, so normalised rows
  are never written and the operands are not rounded a second time.
- Logits are kept in log2 units (log2(e) folded into the scale) so the online softmax uses exp2.
- Forward: program (row block, column split) streams its column tiles with an online max / sum and
  writes a partial (max, sum, positive logit); a merge kernel combines the splits. Column splitting
  lets small M fill all SMs; at large M there is one split and the merge is O(M).
- Backward, deterministic: a row-owned kernel (dU, dscale) and a column-owned kernel (dV), both
  recomputing S from the saved LSE, no atomics. Non-deterministic: the row-owned kernel also adds
  G^T U into an fp32 (N, d) buffer with atomics (6 instead of 8 M^2 d FLOPs).
- With one split the normalisation backward runs in the matmul kernel's epilogue; with several the
  splits write fp32 partials that a finishing kernel sums in a fixed order (still deterministic).
- Every matmul kernel has a PROLOGUE constexpr: 0 reads `cont`; 1 / 2 build the AdaSSL edited rows in
  registers (kernels/latent.py, used by kernels/adassl.py). One set of kernels serves both ops.
- UPCAST (constexpr) turns loaded bf16 / fp16 tiles into fp32: the interpreter computes 16-bit
  floats wrongly, so it is set only under TRITON_INTERPRET.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .configs import block_d, interpreting, num_sms, pick_config
from .latent import build_rows, latent_epilogue, load_rows, store_rows

# Module-level constants used inside @triton.jit must be constexpr.
LOG2E = tl.constexpr(1.4426950408889634)
EPS = tl.constexpr(1e-12)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_stats_kernel(
    inv_ptr,  # (n_rows,) ACC out: 1 / max(|x_i|, eps)
    reg_ptr,  # (grid,) ACC out: per-program regulariser sum (PROLOGUE != 0)
    half, n_rows, d,
    emb_a, emb_b, post_a, post_b, prior_a, prior_b, noise_a, noise_b,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PROLOGUE: tl.constexpr,
):
    ACC: tl.constexpr = inv_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    x, reg = build_rows(rows, cols, half, n_rows, d, emb_a, emb_b, post_a, post_b, prior_a, prior_b,
                        noise_a, noise_b, ACC, PROLOGUE)
    # The norm of the values that enter tl.dot (for AdaSSL: the edited rows rounded to the input dtype).
    x = x.to(ACC)
    # EPS as an ACC tensor: tl.maximum rounds a bare constant to fp32
    inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, 1)), tl.zeros([], ACC) + EPS)
    tl.store(inv_ptr + rows, inv, mask=rows < n_rows)
    if PROLOGUE != 0:
        tl.store(reg_ptr + pid, tl.sum(reg, 0))


@triton.jit
def _operand(x, UPCAST: tl.constexpr):
    if UPCAST:
        return x.to(tl.float32)
    else:
        return x


@triton.jit
def _fwd_kernel(
    part_ptr,  # (3, nsplit, M) ACC out: running max and sum (log2 units), positive logit (log2 units)
    rinv_ptr, cinv_ptr,  # (M,), (N,) ACC inverse norms
    pos_ptr, excl_ptr,  # (M,) int64
    scale_ptr,  # () ACC
    half_r, M, d,
    emb_a, emb_b, post_a, post_b, prior_a, prior_b, noise_a, noise_b,  # cont rows (see latent.py)
    targ_a, targ_b, half_c, N,  # targ rows, two-part
    inv_t, clamp2, cols_per_split, nsplit,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PROLOGUE: tl.constexpr, TARG_TWO_PART: tl.constexpr, CLAMP: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    ACC: tl.constexpr = scale_ptr.dtype.element_ty
    # as a tensor: tl.minimum / tl.maximum would round a bare float argument to fp32 (interpreter, fp64)
    clamp2 = tl.zeros([], ACC) + clamp2
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    row_ok = rows < M

    # The row tile is formed once and stays on chip for the whole column loop (K = d in one tl.dot).
    x, _ = build_rows(rows, dd, half_r, M, d, emb_a, emb_b, post_a, post_b, prior_a, prior_b,
                      noise_a, noise_b, ACC, PROLOGUE)
    x = _operand(x, UPCAST)
    rk = tl.load(rinv_ptr + rows, mask=row_ok, other=0.0) * (tl.load(scale_ptr) * inv_t * LOG2E)
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=-1)
    excl = tl.load(excl_ptr + rows, mask=row_ok, other=-1)

    # Finite start: a split can hold only the excluded column of a row, and exp2(-inf - -inf) is NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    p_i = tl.zeros([BLOCK_M], ACC)
    col_start = pid_s * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, N)
    for start in range(col_start, col_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < col_end
        t = _operand(load_rows(targ_a, targ_b, cols, dd, half_c, N, d, d, TARG_TWO_PART), UPCAST)
        cinv = tl.load(cinv_ptr + cols, mask=col_ok, other=0.0)
        acc = tl.dot(x, tl.trans(t), input_precision=PREC)
        s2 = acc.to(ACC) * rk[:, None] * cinv[None, :]
        if CLAMP:
            s2 = tl.minimum(tl.maximum(s2, -clamp2), clamp2)
        # The positive logit comes from the same tile as the LSE (same operands, same rounding).
        p_i += tl.sum(tl.where(cols[None, :] == pos[:, None], s2, 0.0), 1)
        keep = col_ok[None, :] & (cols[None, :] != excl[:, None])
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
    loss_ptr,  # (grid,) ACC out: per-program sum of lse_i - S^_{i,pos_i}
    M, nsplit,
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
    tl.store(loss_ptr + pid, tl.sum(tl.where(ok, (lse2 - p) * LN2, 0.0), 0))


@triton.jit
def _grad_tile(acc, rows, cols, M, N, rinv, cinv, pos, excl, lse2, sk2, clamp2, gscale,
               CLAMP: tl.constexpr):
    """G (ACC, zero outside the valid / non-excluded / unclamped set) and C = cos for one tile."""
    c = acc * rinv[:, None] * cinv[None, :]
    s2 = c * sk2
    if CLAMP:
        inside = tl.abs(s2) <= clamp2  # inclusive: an entry exactly at the clamp keeps its gradient
        s2 = tl.minimum(tl.maximum(s2, -clamp2), clamp2)
    keep = (rows < M)[:, None] & (cols < N)[None, :] & (cols[None, :] != excl[:, None])
    p = tl.where(keep, tl.exp2(s2 - lse2[:, None]), 0.0)
    g = (p - tl.where(cols[None, :] == pos[:, None], 1.0, 0.0)) * gscale
    if CLAMP:
        g = tl.where(inside, g, 0.0)
    return g, c


@triton.jit
def _normalize_backward(g, x, inv, ACC: tl.constexpr):
    """dc = (g - (u . g) u) / max(|x|, eps), or g / eps below eps (F.normalize's clamp_min)."""
    x = x.to(ACC)
    u = x * inv[:, None]
    above = tl.sqrt(tl.sum(x * x, 1)) >= EPS
    proj = tl.where(above, tl.sum(u * g, 1), 0.0)
    return (g - proj[:, None] * u) * inv[:, None]


@triton.jit
def _bwd_row_kernel(
    part_ptr,  # FUSED: unused; else (nsplit, M, d) ACC out: unscaled dU partial of each split
    dsc_ptr,  # (grid,) ACC out: per-program sum of G * C
    dv_ptr,  # ATOMIC: (N, d) ACC, += G^T U (unscaled, pre-normalisation)
    rinv_ptr, cinv_ptr, pos_ptr, excl_ptr, lse_ptr, scale_ptr, grad_ptr, greg_ptr,
    half_r, M, d,
    emb_a, emb_b, post_a, post_b, prior_a, prior_b, noise_a, noise_b,
    targ_a, targ_b, half_c, N,
    dst_a, dst_b, dpost_a, dpost_b, dprior_a, dprior_b,  # FUSED epilogue outputs (rows)
    inv_t, clamp2, cols_per_split, nsplit,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PROLOGUE: tl.constexpr, TARG_TWO_PART: tl.constexpr, CLAMP: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
    ATOMIC: tl.constexpr, FUSED: tl.constexpr, ACCUM: tl.constexpr,
):
    ACC: tl.constexpr = scale_ptr.dtype.element_ty
    # as a tensor: tl.minimum / tl.maximum would round a bare float argument to fp32 (interpreter, fp64)
    clamp2 = tl.zeros([], ACC) + clamp2
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    row_ok = rows < M

    x, _ = build_rows(rows, dd, half_r, M, d, emb_a, emb_b, post_a, post_b, prior_a, prior_b,
                      noise_a, noise_b, ACC, PROLOGUE)
    xo = _operand(x, UPCAST)
    rinv = tl.load(rinv_ptr + rows, mask=row_ok, other=0.0)
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=-1)
    excl = tl.load(excl_ptr + rows, mask=row_ok, other=-1)
    lse2 = tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * LOG2E
    scale = tl.load(scale_ptr)
    sk2 = scale * inv_t * LOG2E
    gscale = tl.load(grad_ptr).to(ACC) / M

    du = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    dsc = tl.zeros([BLOCK_M], ACC)
    col_start = pid_s * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, N)
    for start in range(col_start, col_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < col_end
        t = _operand(load_rows(targ_a, targ_b, cols, dd, half_c, N, d, d, TARG_TWO_PART), UPCAST)
        cinv = tl.load(cinv_ptr + cols, mask=col_ok, other=0.0)
        acc = tl.dot(xo, tl.trans(t), input_precision=PREC).to(ACC)
        g, c = _grad_tile(acc, rows, cols, M, col_end, rinv, cinv, pos, excl, lse2, sk2,
                          clamp2, gscale, CLAMP)
        dsc += tl.sum(g * c, 1)
        # Fold the column norms into G so the raw targ rows are the second operand.
        du = tl.dot((g * cinv[None, :]).to(t.dtype), t, du, input_precision=PREC, out_dtype=ACC)
        if ATOMIC:
            dv = tl.dot(tl.trans((g * rinv[:, None]).to(xo.dtype)), xo, input_precision=PREC,
                        out_dtype=ACC)
            dv_ptrs = dv_ptr + cols.to(tl.int64)[:, None] * d + dd[None, :]
            tl.atomic_add(dv_ptrs, dv, mask=col_ok[:, None] & (dd[None, :] < d))

    tl.store(dsc_ptr + pid_m * nsplit + pid_s, tl.sum(dsc, 0))
    if FUSED:
        du = du * (scale * inv_t)
        # Rebuild the row tile instead of keeping it live across the loop: the loop only needs it as a
        # dot operand in shared memory, and holding a register copy for the epilogue causes spills.
        x, _ = build_rows(rows, dd, half_r, M, d, emb_a, emb_b, post_a, post_b, prior_a, prior_b,
                          noise_a, noise_b, ACC, PROLOGUE)
        dc = _normalize_backward(du, x, rinv, ACC)
        if PROLOGUE == 0:
            store_rows(dst_a, dst_b, rows, dd, half_r, M, d, d, dc, True, ACCUM)
        else:
            reg_grad = tl.load(greg_ptr).to(ACC) / M
            latent_epilogue(dc, rows, dd, half_r, M, d, emb_a, emb_b, post_a, post_b, prior_a,
                            prior_b, noise_a, noise_b, dst_a, dst_b, dpost_a, dpost_b, dprior_a,
                            dprior_b, reg_grad, ACC, PROLOGUE, ACCUM)
    else:
        out = part_ptr + (pid_s * M + rows.to(tl.int64))[:, None] * d + dd[None, :]
        tl.store(out, du, mask=row_ok[:, None] & (dd[None, :] < d))


@triton.jit
def _bwd_col_kernel(
    part_ptr,  # FUSED: unused; else (nsplit, N, d) ACC out: unscaled dV partial of each row split
    rinv_ptr, cinv_ptr, pos_ptr, excl_ptr, lse_ptr, scale_ptr, grad_ptr,
    half_r, M, d,
    emb_a, emb_b, post_a, post_b, prior_a, prior_b, noise_a, noise_b,
    targ_a, targ_b, half_c, N,
    dst_a, dst_b,  # FUSED epilogue output (targ rows, two-part)
    inv_t, clamp2, rows_per_split, nsplit,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PROLOGUE: tl.constexpr, TARG_TWO_PART: tl.constexpr, CLAMP: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, FUSED: tl.constexpr, ACCUM: tl.constexpr,
):
    # Column-owned: this program owns BLOCK_N targ rows and streams BLOCK_M cont rows. For AdaSSL
    # the streamed cont rows are rebuilt from emb / post / noise in every step (never stored).
    ACC: tl.constexpr = scale_ptr.dtype.element_ty
    # as a tensor: tl.minimum / tl.maximum would round a bare float argument to fp32 (interpreter, fp64)
    clamp2 = tl.zeros([], ACC) + clamp2
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    col_ok = cols < N

    t = load_rows(targ_a, targ_b, cols, dd, half_c, N, d, d, TARG_TWO_PART)
    to = _operand(t, UPCAST)
    cinv = tl.load(cinv_ptr + cols, mask=col_ok, other=0.0)
    scale = tl.load(scale_ptr)
    sk2 = scale * inv_t * LOG2E
    gscale = tl.load(grad_ptr).to(ACC) / M

    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        x, _ = build_rows(rows, dd, half_r, row_end, d, emb_a, emb_b, post_a, post_b, prior_a,
                          prior_b, noise_a, noise_b, ACC, PROLOGUE)
        xo = _operand(x, UPCAST)
        rinv = tl.load(rinv_ptr + rows, mask=row_ok, other=0.0)
        pos = tl.load(pos_ptr + rows, mask=row_ok, other=-1)
        excl = tl.load(excl_ptr + rows, mask=row_ok, other=-1)
        lse2 = tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * LOG2E
        acc = tl.dot(xo, tl.trans(to), input_precision=PREC).to(ACC)
        g, _ = _grad_tile(acc, rows, cols, row_end, N, rinv, cinv, pos, excl, lse2, sk2,
                          clamp2, gscale, CLAMP)
        dv = tl.dot(tl.trans((g * rinv[:, None]).to(xo.dtype)), xo, dv, input_precision=PREC,
                    out_dtype=ACC)

    if FUSED:
        dv = dv * (scale * inv_t)
        t = load_rows(targ_a, targ_b, cols, dd, half_c, N, d, d, TARG_TWO_PART)  # reloaded: see the row kernel
        dt = _normalize_backward(dv, t, cinv, ACC)
        store_rows(dst_a, dst_b, cols, dd, half_c, N, d, d, dt, TARG_TWO_PART, ACCUM)
    else:
        out = part_ptr + (pid_s * N + cols.to(tl.int64))[:, None] * d + dd[None, :]
        tl.store(out, dv, mask=col_ok[:, None] & (dd[None, :] < d))


@triton.jit
def _finish_kernel(
    part_ptr,  # (nsplit, R, d) ACC: unscaled gradient partials w.r.t. the normalised rows
    rinv_ptr, scale_ptr, greg_ptr,
    half, R, d, nsplit,
    emb_a, emb_b, post_a, post_b, prior_a, prior_b, noise_a, noise_b,
    dst_a, dst_b, dpost_a, dpost_b, dprior_a, dprior_b,
    inv_t,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    PROLOGUE: tl.constexpr, TWO_PART: tl.constexpr, ACCUM: tl.constexpr,
):
    # The epilogue of a split (or atomic) schedule: sum the splits in a fixed order, then the
    # normalisation backward and (AdaSSL) the latent backward, exactly as the fused epilogue does.
    ACC: tl.constexpr = scale_ptr.dtype.element_ty
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    ok = (rows < R)[:, None] & (dd[None, :] < d)
    g = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for s in range(nsplit):
        g += tl.load(part_ptr + (s * R + rows.to(tl.int64))[:, None] * d + dd[None, :], mask=ok,
                     other=0.0)
    g = g * (tl.load(scale_ptr) * inv_t)
    x, _ = build_rows(rows, dd, half, R, d, emb_a, emb_b, post_a, post_b, prior_a, prior_b,
                      noise_a, noise_b, ACC, PROLOGUE)
    inv = tl.load(rinv_ptr + rows, mask=rows < R, other=0.0)
    dc = _normalize_backward(g, x, inv, ACC)
    if PROLOGUE == 0:
        store_rows(dst_a, dst_b, rows, dd, half, R, d, d, dc, TWO_PART, ACCUM)
    else:
        reg_grad = tl.load(greg_ptr).to(ACC) / R
        latent_epilogue(dc, rows, dd, half, R, d, emb_a, emb_b, post_a, post_b, prior_a, prior_b,
                        noise_a, noise_b, dst_a, dst_b, dpost_a, dpost_b, dprior_a, dprior_b,
                        reg_grad, ACC, PROLOGUE, ACCUM)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------


@dataclass
class RowSource:
    """Where the kernels read `cont` rows (see kernels/latent.py). Plain nt_xent: a == b == cont."""

    emb_a: torch.Tensor
    emb_b: torch.Tensor
    half: int
    post_a: torch.Tensor
    post_b: torch.Tensor
    prior_a: torch.Tensor
    prior_b: torch.Tensor
    noise_a: torch.Tensor
    noise_b: torch.Tensor
    prologue: int  # 0 plain, 1 AdaSSL-V, 2 AdaSSL-S

    def args(self):
        return (self.emb_a, self.emb_b, self.post_a, self.post_b, self.prior_a, self.prior_b,
                self.noise_a, self.noise_b)

    @staticmethod
    def plain(x: torch.Tensor) -> RowSource:
        return RowSource(x, x, x.shape[0], x, x, x, x, x, x, 0)


@dataclass
class RowSink:
    """Where a fused epilogue writes gradients of the rows of one side (same layout as RowSource)."""

    a: torch.Tensor
    b: torch.Tensor
    dpost_a: torch.Tensor
    dpost_b: torch.Tensor
    dprior_a: torch.Tensor
    dprior_b: torch.Tensor

    @staticmethod
    def plain(x: torch.Tensor) -> RowSink:
        return RowSink(x, x, x, x, x, x)


# Tests set this to fill every buffer the launchers allocate with NaN before the kernels run, so an
# element a kernel forgets to write (or a partial it reads before it is written) shows up.
POISON = False


def _empty(shape, dtype, device):
    if POISON:
        return torch.full(tuple(shape) if not isinstance(shape, int) else (shape,), float("nan"), dtype=dtype,
                          device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _common(dtype: torch.dtype, clamp):
    upcast = interpreting() and dtype in (torch.float16, torch.bfloat16)
    # fp32 on a GPU: 3xTF32 on the tensor cores (about fp32 accuracy); IEEE FMA dots spill badly
    if dtype in (torch.float16, torch.bfloat16):
        prec = "tf32"
    else:
        prec = "ieee" if interpreting() or dtype == torch.float64 else "tf32x3"
    has_clamp = clamp is not None
    # clamp in log2 units, formed in double precision on the host (a kernel's float argument is fp32)
    return upcast, prec, has_clamp, (float(clamp) * 1.4426950408889634 if has_clamp else 0.0)


def _splits(n_own_blocks: int, n_loop_blocks: int, device, num_splits) -> int:
    """Blocks of the loop range per split: enough programs for ~2 waves on the device."""
    if num_splits is None:
        num_splits = max(1, triton.cdiv(2 * num_sms(device), max(n_own_blocks, 1)))
    num_splits = max(1, min(int(num_splits), n_loop_blocks))
    return triton.cdiv(n_loop_blocks, num_splits)


def row_inv_norms(src: RowSource, n_rows: int, d: int, stat: torch.dtype):
    """(inverse norms (n_rows,), per-program regulariser sums) of the rows a RowSource describes."""
    inv = _empty(n_rows, stat, src.emb_a.device)
    # the latent prologue keeps ~10 (rows x BLOCK_D) fp32 temporaries live: few rows per program
    block = 16 if src.prologue else (64 if d <= 128 else 32)
    grid = triton.cdiv(n_rows, block)
    reg = _empty(grid, stat, inv.device)
    _row_stats_kernel[(grid,)](inv, reg, src.half, n_rows, d, *src.args(), BLOCK_M=block,
                               BLOCK_D=block_d(d), PROLOGUE=src.prologue, num_warps=4)
    return inv, reg


def _targ_args(targ_a, targ_b, half_c, N):
    return (targ_a, targ_b, half_c, N)


def forward_core(src: RowSource, M: int, targ_a, targ_b, half_c: int, N: int, d: int, pos, excl,
                 scale, inv_temperature: float, clamp, *, num_splits=None, config=None):
    """Shared forward of nt_xent and AdaSSL: (loss (), lse (M,), regulariser sum ()).

    The regulariser sum is over all rows and latent dims (0 for PROLOGUE 0).
    """
    dtype, device = targ_a.dtype, targ_a.device
    stat = _stat_dtype(dtype)
    upcast, prec, has_clamp, clamp_v = _common(dtype, clamp)
    cfg = config or pick_config("fwd_latent" if src.prologue else "fwd", device, dtype, d)
    rinv, reg = row_inv_norms(src, M, d, stat)
    cinv, _ = row_inv_norms(RowSource(targ_a, targ_b, half_c, *([targ_a] * 6), 0), N, d, stat)

    n_rb = triton.cdiv(M, cfg.block_m)
    n_cb = triton.cdiv(N, cfg.block_n)
    per = _splits(n_rb, n_cb, device, num_splits)
    nsplit = triton.cdiv(n_cb, per)
    part = _empty((3, nsplit, M), stat, device)
    _fwd_kernel[(n_rb, nsplit)](
        part, rinv, cinv, pos, excl, scale, src.half, M, d, *src.args(),
        *_targ_args(targ_a, targ_b, half_c, N),
        float(inv_temperature), clamp_v, per * cfg.block_n, nsplit,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d(d), PROLOGUE=src.prologue,
        TARG_TWO_PART=half_c < N, CLAMP=has_clamp, UPCAST=upcast, PREC=prec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    lse = _empty(M, stat, device)
    mblock = 128
    loss_part = _empty(triton.cdiv(M, mblock), stat, device)
    _fwd_merge_kernel[(loss_part.numel(),)](part, lse, loss_part, M, nsplit, BLOCK=mblock,
                                           num_warps=4)
    return loss_part.sum() / M, lse, reg.sum()


def backward_core(grad_loss, grad_reg, src: RowSource, row_sink: RowSink, M: int,
                  targ_a, targ_b, half_c: int, N: int, col_sink: RowSink, d: int, pos, excl,
                  scale, lse, inv_temperature: float, clamp, deterministic: bool, *,
                  accumulate: bool = False, num_splits=None, configs=None):
    """Shared backward: writes the row / column gradients into the sinks, returns dscale.

    accumulate: the two sinks alias (AdaSSL: emb_x / emb_y are both rows and columns); the kernel
    that runs second adds to what the first wrote.
    """
    dtype, device = targ_a.dtype, targ_a.device
    stat = _stat_dtype(dtype)
    upcast, prec, has_clamp, clamp_v = _common(dtype, clamp)
    configs = configs or {}
    sfx = "_latent" if src.prologue else ""
    cfg_r = configs.get("bwd_row") or pick_config("bwd_row" + sfx, device, dtype, d)
    cfg_c = configs.get("bwd_col") or pick_config("bwd_col" + sfx, device, dtype, d)
    bd = block_d(d)
    inv_t = float(inv_temperature)
    two_part = half_c < N  # AdaSSL: targ = [emb_x; emb_y]
    targ_src = RowSource(targ_a, targ_b, half_c, *([targ_a] * 6), 0)
    rinv, _ = row_inv_norms(src, M, d, stat)
    cinv, _ = row_inv_norms(targ_src, N, d, stat)
    if grad_reg is None:
        grad_reg = scale
    common = dict(BLOCK_D=bd, PROLOGUE=src.prologue, TARG_TWO_PART=two_part, CLAMP=has_clamp,
                  UPCAST=upcast, PREC=prec)

    def finish(part, nsplit, inv, half, R, s: RowSource, sink: RowSink, prologue, tp, accum):
        block = 8 if prologue else (32 if d > 128 else 64)  # the latent backward is register-hungry
        _finish_kernel[(triton.cdiv(R, block),)](
            part, inv, scale, grad_reg, half, R, d, nsplit, *s.args(), sink.a, sink.b,
            sink.dpost_a, sink.dpost_b, sink.dprior_a, sink.dprior_b, inv_t,
            BLOCK_M=block, BLOCK_D=bd, PROLOGUE=prologue, TWO_PART=tp, ACCUM=accum, num_warps=4)

    def row_pass(atomic: bool, accum: bool):
        n_rb = triton.cdiv(M, cfg_r.block_m)
        n_cb = triton.cdiv(N, cfg_r.block_n)
        per = _splits(n_rb, n_cb, device, num_splits)
        nsplit = triton.cdiv(n_cb, per)
        # The epilogue runs in the matmul kernel only for plain nt_xent's deterministic pass: with the
        # atomic dV or the AdaSSL latent backward in the same kernel it spills, so those write fp32 rows
        # and the small-block finishing kernel does the epilogue (O(M d) extra traffic).
        fused = nsplit == 1 and not atomic and src.prologue == 0
        part = rinv if fused else _empty((nsplit, M, d), stat, device)
        dsc = _empty(n_rb * nsplit, stat, device)
        dv = torch.zeros((N, d), dtype=stat, device=device) if atomic else rinv
        _bwd_row_kernel[(n_rb, nsplit)](
            part, dsc, dv, rinv, cinv, pos, excl, lse, scale, grad_loss, grad_reg,
            src.half, M, d, *src.args(), *_targ_args(targ_a, targ_b, half_c, N),
            row_sink.a, row_sink.b, row_sink.dpost_a, row_sink.dpost_b, row_sink.dprior_a,
            row_sink.dprior_b, inv_t, clamp_v, per * cfg_r.block_n, nsplit,
            BLOCK_M=cfg_r.block_m, BLOCK_N=cfg_r.block_n, ATOMIC=atomic, FUSED=fused, ACCUM=accum,
            num_warps=cfg_r.num_warps, num_stages=cfg_r.num_stages, **common)
        if not fused:
            finish(part, nsplit, rinv, src.half, M, src, row_sink, src.prologue, True, accum)
        return dsc, dv

    def col_pass(accum: bool):
        # the column kernel owns cfg.block_m targ rows and streams cfg.block_n cont rows
        n_own = triton.cdiv(N, cfg_c.block_m)
        n_loop = triton.cdiv(M, cfg_c.block_n)
        per = _splits(n_own, n_loop, device, num_splits)
        nsplit = triton.cdiv(n_loop, per)
        fused = nsplit == 1
        part = cinv if fused else _empty((nsplit, N, d), stat, device)
        _bwd_col_kernel[(n_own, nsplit)](
            part, rinv, cinv, pos, excl, lse, scale, grad_loss, src.half, M, d, *src.args(),
            *_targ_args(targ_a, targ_b, half_c, N), col_sink.a, col_sink.b,
            inv_t, clamp_v, per * cfg_c.block_n, nsplit,
            BLOCK_M=cfg_c.block_n, BLOCK_N=cfg_c.block_m, FUSED=fused, ACCUM=accum,
            num_warps=cfg_c.num_warps, num_stages=cfg_c.num_stages, **common)
        if not fused:
            finish(part, nsplit, cinv, half_c, N, targ_src, col_sink, 0, two_part, accum)

    if deterministic:
        col_pass(False)
        dsc, _ = row_pass(False, accumulate)
    else:
        dsc, dv = row_pass(True, False)
        finish(dv, 1, cinv, half_c, N, targ_src, col_sink, 0, two_part, accumulate)
    return (dsc.sum() * inv_t).to(scale.dtype)


def _check(cont, targ, pos, excl, scale):
    assert cont.dim() == 2 and targ.dim() == 2 and cont.shape[1] == targ.shape[1], (cont.shape, targ.shape)
    assert cont.dtype == targ.dtype and cont.is_contiguous() and targ.is_contiguous()
    assert pos.shape == (cont.shape[0],) and excl.shape == (cont.shape[0],)
    assert scale.dim() == 0 and scale.dtype == _stat_dtype(cont.dtype), scale.dtype
    assert cont.shape[1] <= 512, "the Triton backend tiles d <= 512 in one block"


def nt_xent_forward(cont, targ, pos, excl, scale, inv_temperature, clamp, *, num_splits=None,
                    config=None):
    """Fused forward of the nt_xent core (docs/backends.md).

    cont (M, d), targ (N, d): same floating dtype, contiguous; pos, excl (M,) int64 (excl -1: none);
    scale () float32 (float64 for float64 inputs); inv_temperature float; clamp float or None.
    Returns (loss (), lse (M,)), both float32 (float64 for float64 inputs).
    num_splits / config: optional overrides of the column split count and the block config (tests).
    """
    _check(cont, targ, pos, excl, scale)
    M, d = cont.shape
    N = targ.shape[0]
    loss, lse, _ = forward_core(RowSource.plain(cont), M, targ, targ, N, N, d, pos.contiguous(),
                                excl.contiguous(), scale, inv_temperature, clamp,
                                num_splits=num_splits, config=config)
    return loss, lse


def nt_xent_backward(grad_loss, cont, targ, pos, excl, scale, lse, inv_temperature, clamp,
                     deterministic, *, num_splits=None, configs=None):
    """Fused backward of the nt_xent core (docs/backends.md).

    grad_loss () tensor; cont (M, d), targ (N, d); pos, excl (M,) int64; scale (); lse (M,) from
    nt_xent_forward. deterministic=True: row-owned dU and column-owned dV kernels, no atomics;
    False: one kernel with fp32 atomics for dV.
    Returns (dcont (M, d), dtarg (N, d)) in the input dtype and dscale () like scale.
    """
    _check(cont, targ, pos, excl, scale)
    M, d = cont.shape
    N = targ.shape[0]
    dcont = _empty(cont.shape, cont.dtype, cont.device)
    dtarg = _empty(targ.shape, targ.dtype, targ.device)
    dscale = backward_core(grad_loss.reshape(()), None, RowSource.plain(cont), RowSink.plain(dcont),
                           M, targ, targ, N, N, RowSink.plain(dtarg), d, pos.contiguous(),
                           excl.contiguous(), scale, lse.contiguous(), inv_temperature, clamp,
                           bool(deterministic), num_splits=num_splits, configs=configs)
    return dcont, dtarg, dscale
