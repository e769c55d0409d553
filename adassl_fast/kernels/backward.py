"""The backward core: row and column gradients and dscale, recomputing S tile by tile from the saved LSEs.

G = grad / M * (P - onehot(pos)) * [|S| <= clamp], dU = s G V, dV = s G^T U, dscale = 1/tau sum G * C, then
the normalisation backward (skipped with normalize=False) and, for AdaSSL, the latent backward of each side.
- Deterministic: a row-owned kernel (sum_j G_ij v_j) and a column-owned kernel (sum_i G_ij u_i, from the
  transposed tile V U^T, so nothing is transposed on chip), no atomics. Non-deterministic: the row-owned
  kernel also adds G^T U into an fp32 (N, d) buffer with atomics (6 instead of 8 M^2 d FLOPs); where the
  table ships no shape for that kernel (d > 256: configs.atomic_schedule), the deterministic schedule runs.
  dscale needs no per-element work: sum_ij G_ij C_ij = sum_i <u_i, sum_j G_ij v_j>.
- Rows past the end need no mask (their LSE is +inf, so P = 0), and columns past the end add zero rows.
- SYM (symmetric InfoNCE, kernels/info_nce.py): both matrix kernels also read the column LSEs and form G
  from both directions' softmaxes, so one backward pass serves both losses.
- The logits' modes (kernels/tiles.py): SIGMOID (SigLIP) has G = sigmoid(L) - I and no LSE, and the row kernel
  also writes G's row sums per split (dbias); LABELS replaces the onehot by Q_ij = [same label] / count_i.
- The matrix kernels write fp32 (split, row, d) partials; a finishing kernel per side sums the splits in a
  fixed order (deterministic) and applies grad_loss / M, scale / tau, the normalisation backward and, for
  AdaSSL, the latent backward (all O(M d)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .configs import atomic_schedule, block_d, pick_config
from .latent import build_rows, latent_epilogue
from .launch import cdiv, column_splits, empty, rows_per_program, stat_dtype
from .normalize import EPS, normalize_rows
from .rows import RowSink, RowSource, load_rows, store_rows
from .tiles import LOG2E, Logits, holds_special, owned_block, owned_rows, positive_weights, streamed_tile


@triton.jit
def _grad_tile(s2, lse2, lse2_t, col, pos, excl, clamp2, CLAMP: tl.constexpr, binds, special, SYM: tl.constexpr,
               SIGMOID: tl.constexpr, LABELS: tl.constexpr):
    """(P - onehot(pos)) * [|S| <= clamp] for one tile of S in log2 units, in either orientation.

    lse2, pos, excl broadcast along S's rows and `col` is S's column index (the caller arranges the
    shapes). `special`: the tile holds a positive or an excluded column; elsewhere the masks are
    skipped. Rows past the end need no mask: their LSE is +inf, so P is exactly 0 there. Columns past
    the end need none either: their operand rows are 0, so they add nothing to a product.
    SYM (symmetric InfoNCE, diagonal positives, nothing excluded): both directions' softmaxes in one G,
    P + P' - 2 onehot, where P' uses `lse2_t`, the column LSEs (broadcast along S's other axis). Padding
    gets P' != 0 there, but it multiplies zero operand rows or lands in rows that are never stored.
    LABELS: `col` and `pos` are the column's and the row's labels, `excl` the row's 1 / count (0 past the end):
    the onehot becomes Q_ij = [same label] / count_i (symmetric: Q is symmetric, the count is the label's).
    SIGMOID (no LSE, no clamp): sigmoid(L) - onehot(pos), the positive's as -sigmoid(-L) (no cancellation).
    """
    if SIGMOID:
        p = 1.0 / (1.0 + tl.exp2(-s2))
        if special:
            p = tl.where(col == pos, -1.0 / (1.0 + tl.exp2(s2)), p)
    else:
        # No clamped copy of S: where the gradient survives (|S| <= clamp) the clamp is the identity.
        p = tl.exp2(s2 - lse2)
        hot = 1.0
        if SYM:
            p += tl.exp2(s2 - lse2_t)
            hot = 2.0
        if LABELS:
            p -= tl.where(col == pos, hot * excl, 0.0)
        elif special:
            p = tl.where(col == excl, 0.0, p) - tl.where(col == pos, hot, 0.0)
        if CLAMP:
            if binds:
                p = tl.where(tl.abs(s2) <= clamp2, p, 0.0)  # inclusive: an entry at the clamp keeps its gradient
    return p


@triton.jit
def _bwd_row_kernel(
    part_ptr,  # (nsplit, M, d) ACC out: sum_j G^_ij v_j of each column split (G^ = G / grad_scale)
    dv_ptr,  # ATOMIC: (N, d) ACC, zeroed: sum_i G^_ij u_i added with atomics; else unused
    gsum_ptr,  # SIGMOID: (nsplit, M) ACC out: sum_j G^_ij of each split (for dbias); else unused
    lse_ptr,  # (M,) ACC row LSEs (natural log); SIGMOID: unused
    lsec_ptr,  # SYM: (N,) ACC column LSEs; else unused
    u_ptr, v_ptr, pos_ptr, excl_ptr, scale_ptr, M, N, d, inv_t, clamp2,  # the logits, as in _fwd_kernel
    cols_per_split, nsplit,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CLAMP: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, ATOMIC: tl.constexpr, SYM: tl.constexpr,
    SIGMOID: tl.constexpr, LABELS: tl.constexpr, NORMALIZE: tl.constexpr,
):
    # Row-owned: dU and (by the bilinear identity sum_j G_ij C_ij = <u_i, sum_j G_ij v_j>) dscale,
    # which the finishing kernel forms from this kernel's output. The grad_loss / M factor and the
    # scale are applied there too, so this loop holds only exp2 and the two products.
    ACC: tl.constexpr = scale_ptr.dtype.element_ty
    rows, row_ok, dd, x, sk2, b2, clamp2, binds, pos, excl, pos_lo, pos_hi, excl_lo, excl_hi = owned_rows(
        u_ptr, pos_ptr, excl_ptr, scale_ptr, M, d, inv_t, clamp2, BLOCK_M, BLOCK_D, UPCAST, SIGMOID, LABELS,
        NORMALIZE)
    pid_s = tl.program_id(1)
    if SIGMOID:
        lse2 = tl.zeros([BLOCK_M], ACC)  # unused
        g_sum = tl.zeros([BLOCK_M], ACC)
    else:
        lse2 = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf")) * LOG2E

    du = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    col_start = pid_s * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, N)
    for start in range(col_start, col_end, BLOCK_N):
        cols, t, s2 = streamed_tile(x, v_ptr, start, N, d, dd, sk2, b2, BLOCK_N, UPCAST, PREC, SIGMOID)
        stop = start + BLOCK_N
        special = holds_special(pos_lo, pos_hi, excl_lo, excl_hi, start, stop)
        if SYM:
            lse2_t = tl.load(lsec_ptr + cols, mask=cols < N, other=float("inf"))[None, :] * LOG2E
        else:
            lse2_t = lse2[:, None]  # unused
        if LABELS:
            col = tl.load(pos_ptr + cols, mask=cols < N, other=0)[None, :]
        else:
            col = cols[None, :]
        g = _grad_tile(s2, lse2[:, None], lse2_t, col, pos[:, None], excl[:, None], clamp2, CLAMP,
                       binds, special, SYM, SIGMOID, LABELS)
        if SIGMOID:  # dbias needs G's sum: padding columns (not only their products) must add nothing
            if stop > col_end:
                g = tl.where(cols[None, :] < col_end, g, 0.0)
            g_sum += tl.sum(g, 1)
        du = tl.dot(g.to(t.dtype), t, du, input_precision=PREC, out_dtype=ACC)
        if ATOMIC:
            dv = tl.dot(tl.trans(g.to(x.dtype)), x, input_precision=PREC, out_dtype=ACC)
            dv_ptrs = dv_ptr + cols.to(tl.int64)[:, None] * d + dd[None, :]
            tl.atomic_add(dv_ptrs, dv, mask=(cols < col_end)[:, None] & (dd[None, :] < d))

    out = part_ptr + (pid_s * M + rows.to(tl.int64))[:, None] * d + dd[None, :]
    tl.store(out, du, mask=row_ok[:, None] & (dd[None, :] < d))
    if SIGMOID:
        tl.store(gsum_ptr + pid_s * M + rows, g_sum, mask=row_ok)


@triton.jit
def _bwd_col_kernel(
    part_ptr,  # (nsplit, N, d) ACC out: sum_i G^_ij u_i of each row split
    lse_ptr, lsec_ptr,  # as _bwd_row_kernel
    u_ptr, v_ptr, pos_ptr, excl_ptr, scale_ptr, M, N, d, inv_t, clamp2,  # the logits, as in _fwd_kernel
    rows_per_split, nsplit,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CLAMP: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, SYM: tl.constexpr,
    SIGMOID: tl.constexpr, LABELS: tl.constexpr, NORMALIZE: tl.constexpr,
):
    # Column-owned: this program owns BLOCK_N rows of v and streams BLOCK_M rows of u. It forms the
    # transposed tile S^T = V U^T directly, so G^T is the register operand of the second product and
    # nothing is transposed on chip.
    ACC: tl.constexpr = scale_ptr.dtype.element_ty
    cols, dd, t, sk2, b2, clamp2, binds = owned_block(v_ptr, N, d, scale_ptr, inv_t, clamp2, BLOCK_N, BLOCK_D,
                                                      UPCAST, SIGMOID, NORMALIZE)
    pid_s = tl.program_id(1)
    col_lo = tl.program_id(0) * BLOCK_N
    col_stop = col_lo + BLOCK_N
    if SYM:
        lse2_t = tl.load(lsec_ptr + cols, mask=cols < N, other=float("inf"))[:, None] * LOG2E
    if LABELS:
        col = tl.load(pos_ptr + cols, mask=cols < N, other=0)[:, None]
    else:
        col = cols[:, None]

    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, M)
    for start in range(row_start, row_end, BLOCK_M):
        rows, x, s2 = streamed_tile(t, u_ptr, start, M, d, dd, sk2, b2, BLOCK_M, UPCAST, PREC, SIGMOID)
        row_ok = rows < row_end
        if SIGMOID:
            lse2 = tl.zeros([BLOCK_M], ACC)  # unused
        else:
            lse2 = tl.load(lse_ptr + rows, mask=row_ok, other=float("inf")) * LOG2E
        pos = tl.load(pos_ptr + rows, mask=row_ok, other=-1)
        if LABELS:
            excl = positive_weights(excl_ptr, rows, row_ok, ACC)
        else:
            excl = tl.load(excl_ptr + rows, mask=row_ok, other=-1)
        mine = ((pos >= col_lo) & (pos < col_stop)) | ((excl >= col_lo) & (excl < col_stop))
        special = tl.max(mine.to(tl.int32), 0) > 0
        if not SYM:
            lse2_t = lse2[None, :]  # unused
        g = _grad_tile(s2, lse2[None, :], lse2_t, col, pos[None, :], excl[None, :], clamp2, CLAMP,
                       binds, special, SYM, SIGMOID, LABELS)
        dv = tl.dot(g.to(x.dtype), x, dv, input_precision=PREC, out_dtype=ACC)

    out = part_ptr + (pid_s * N + cols.to(tl.int64))[:, None] * d + dd[None, :]
    tl.store(out, dv, mask=(cols < N)[:, None] & (dd[None, :] < d))


@triton.jit
def _normalize_backward(g, x, inv, ACC: tl.constexpr):
    """dc = (g - (u . g) u) / max(|x|, eps), or g / eps below eps (F.normalize's clamp_min)."""
    x = x.to(ACC)
    u = x * inv[:, None]
    above = tl.sqrt(tl.sum(x * x, 1)) >= EPS
    proj = tl.where(above, tl.sum(u * g, 1), 0.0)
    return (g - proj[:, None] * u) * inv[:, None]


@triton.jit
def _finish_block(
    part_ptr, dsc_ptr, u_ptr, rinv_ptr, scale_ptr, grad_ptr, greg_ptr, pid,
    half, R, d, ld, nsplit, n_loss,
    emb_a, emb_b, post_a, post_b, prior_a, prior_b, noise_a, noise_b,
    dst_a, dst_b, dpost_a, dpost_b, dprior_a, dprior_b,
    inv_t,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    PROLOGUE: tl.constexpr, TWO_PART: tl.constexpr, ACCUM: tl.constexpr, DSCALE: tl.constexpr,
    NORMALIZE: tl.constexpr,
):
    """Rows [pid * BLOCK_M, +BLOCK_M) of one side (see _finish_kernel)."""
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    ok = (rows < R)[:, None] & (dd[None, :] < d)
    g = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for s in range(nsplit):
        g += tl.load(part_ptr + (s * R + rows.to(tl.int64))[:, None] * ld + dd[None, :], mask=ok,
                     other=0.0)
    gscale = tl.load(grad_ptr).to(ACC) / n_loss
    if DSCALE:
        u = load_rows(u_ptr, u_ptr, rows, dd, R, R, d, ld, False).to(ACC)
        tl.store(dsc_ptr + pid, tl.sum(tl.sum(u * g, 1), 0) * gscale * inv_t)
    g = g * (gscale * tl.load(scale_ptr) * inv_t)
    if NORMALIZE:
        x, _ = build_rows(rows, dd, half, R, d, emb_a, emb_b, post_a, post_b, prior_a, prior_b,
                          noise_a, noise_b, ACC, PROLOGUE)
        inv = tl.load(rinv_ptr + rows, mask=rows < R, other=0.0)
        dc = _normalize_backward(g, x, inv, ACC)
    else:  # the rows were scored as given: g is already their gradient
        dc = g
    if PROLOGUE == 0:
        store_rows(dst_a, dst_b, rows, dd, half, R, d, d, dc, TWO_PART, ACCUM)
    else:
        reg_grad = tl.load(greg_ptr).to(ACC) / R
        latent_epilogue(dc, rows, dd, half, R, d, emb_a, emb_b, post_a, post_b, prior_a, prior_b,
                        noise_a, noise_b, dst_a, dst_b, dpost_a, dpost_b, dprior_a, dprior_b,
                        reg_grad, ACC, PROLOGUE, ACCUM)


@triton.jit
def _finish_kernel(
    dsc_ptr,  # DSCALE: (grid_r,) ACC out, this program's share of dscale = inv_t sum_ij G_ij C_ij; else unused
    u_ptr,  # DSCALE: (R, ld) the normalised rows the matmul kernels used; else unused
    scale_ptr, grad_ptr, greg_ptr,  # () ACC: scale, grad_loss, grad_reg
    d, ld, n_loss, inv_t,  # ld: the row stride of u and the partials (normalize_rows)
    # The first side (_Finish.args): part (nsplit, R, ld) ACC, sum_j G^_ij (other side)_j of each split (see
    # the matmul kernels); rinv (R,) its inverse norms; its rows (RowSource) and its gradients (RowSink).
    part_ptr, rinv_ptr, nsplit, half, R,
    emb_a, emb_b, post_a, post_b, prior_a, prior_b, noise_a, noise_b,
    dst_a, dst_b, dpost_a, dpost_b, dprior_a, dprior_b,
    # BOTH: programs from grid_r on finish the targ side too (_Finish.plain_args: plain rows, a sink that
    # must not alias the first)
    cpart_ptr, cinv_ptr, nsplit_c, half_c, N, targ_a, targ_b, cdst_a, cdst_b,
    grid_r,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    PROLOGUE: tl.constexpr, TWO_PART: tl.constexpr, ACCUM: tl.constexpr, DSCALE: tl.constexpr,
    BOTH: tl.constexpr, BLOCK_C: tl.constexpr, TWO_PART_C: tl.constexpr, NORMALIZE: tl.constexpr,
):
    # The O(R d) end of the backward: sum the splits in a fixed order (deterministic), apply
    # grad_loss / M and scale / tau, the normalisation backward (NORMALIZE only) and (AdaSSL) the latent backward.
    # One launch for both sides where their sinks are distinct (small M is bound by launches).
    ACC: tl.constexpr = scale_ptr.dtype.element_ty
    pid = tl.program_id(0)
    if BOTH and pid >= grid_r:
        _finish_block(cpart_ptr, dsc_ptr, u_ptr, cinv_ptr, scale_ptr, grad_ptr, greg_ptr, pid - grid_r,
                      half_c, N, d, ld, nsplit_c, n_loss,
                      targ_a, targ_b, targ_a, targ_b, targ_a, targ_b, targ_a, targ_b,
                      cdst_a, cdst_b, cdst_a, cdst_b, cdst_a, cdst_b, inv_t,
                      ACC, BLOCK_C, BLOCK_D, 0, TWO_PART_C, False, False, NORMALIZE)
    else:
        _finish_block(part_ptr, dsc_ptr, u_ptr, rinv_ptr, scale_ptr, grad_ptr, greg_ptr, pid,
                      half, R, d, ld, nsplit, n_loss, emb_a, emb_b, post_a, post_b, prior_a, prior_b, noise_a, noise_b,
                      dst_a, dst_b, dpost_a, dpost_b, dprior_a, dprior_b, inv_t,
                      ACC, BLOCK_M, BLOCK_D, PROLOGUE, TWO_PART, ACCUM, DSCALE, NORMALIZE)


@dataclass
class _Finish:
    """One side as the finishing kernel takes it: the matrix kernels' partials and the side's rows."""

    part: torch.Tensor  # (nsplit, rows, ld) ACC: sum_j G^_ij (other side)_j of each split
    inv: torch.Tensor  # (rows,) 1 / max(|x_i|, eps)
    source: RowSource
    sink: RowSink
    two_part: bool  # TWO_PART of the kernel: read and write the rows as two parts

    def args(self) -> tuple:
        return (self.part, self.inv, self.part.shape[0], self.source.half, self.source.rows,
                *self.source.latent_args(), *self.sink.args())

    def plain_args(self) -> tuple:
        """The second side's arguments: plain rows, only their first two sink pointers written."""
        return (self.part, self.inv, self.part.shape[0], self.source.half, self.source.rows,
                self.source.emb_a, self.source.emb_b, self.sink.a, self.sink.b)


def backward_core(grad_loss, rows: RowSource, row_sink: RowSink, cols: RowSource, col_sink: RowSink,
                  logits: Logits, lse, deterministic: bool, *, grad_reg=None, col_lse=None,
                  accumulate: bool = False, num_splits=None, configs=None):
    """Shared backward: writes the row / column gradients into the sinks, returns dscale (SIGMOID logits: the (2,)
    gradient of (scale, bias); lse is then None).

    grad_reg: () the regulariser's incoming gradient (AdaSSL's rows only). col_lse: (N,) column LSEs for the
    symmetric InfoNCE loss (lse_i - S_ii + lse'_i - S_ii) / 2M, whose G holds both directions' softmaxes: one
    pair of matmul kernels for both (pos = arange, nothing excluded). accumulate: the two sinks alias (AdaSSL:
    emb_x / emb_y are both rows and columns); the side finished second adds to what the first wrote.
    logits.normalize False: the rows were scored as given (no normalisation backward).
    """
    dtype, device, d = cols.emb_a.dtype, cols.emb_a.device, rows.width
    M, N = rows.rows, cols.rows
    stat = stat_dtype(dtype)
    sym = col_lse is not None
    suffix = "_sym" if sym else ""
    configs = configs or {}
    cfg_r = configs.get("bwd_row") or pick_config("bwd_row" + suffix, device, dtype, d)
    cfg_c = configs.get("bwd_col") or pick_config("bwd_col" + suffix, device, dtype, d)
    u, rinv, _, v, cinv = normalize_rows(rows, cols, stat, logits.normalize)
    ld = u.shape[1]  # the matrix kernels' width: d padded to 16 (normalize_rows)
    if lse is None:  # SIGMOID: no LSEs; never read
        lse = logits.scale
    lsec = col_lse if sym else lse
    n_loss = 2 * M if sym else M
    common = dict(BLOCK_D=block_d(d), SYM=sym, **logits.constexprs(u.dtype))

    def row_kernel(atomic: bool):
        n_rb = cdiv(M, cfg_r.block_m)
        n_cb = cdiv(N, cfg_r.block_n)
        per = column_splits(n_rb, n_cb, device, num_splits)
        part = empty((cdiv(n_cb, per), M, ld), stat, device)
        dv = torch.zeros((N, ld), dtype=stat, device=device) if atomic else part
        g_sum = empty((part.shape[0], M), stat, device) if logits.sigmoid else part
        _bwd_row_kernel[(n_rb, part.shape[0])](
            part, dv, g_sum, lse, lsec, *logits.args(u, v), per * cfg_r.block_n, part.shape[0],
            BLOCK_M=cfg_r.block_m, BLOCK_N=cfg_r.block_n, ATOMIC=atomic,
            num_warps=cfg_r.num_warps, num_stages=cfg_r.num_stages, **common)
        return _Finish(part, rinv, rows, row_sink, True), dv, g_sum

    def col_kernel():
        # the column kernel owns cfg.block_m rows of v and streams cfg.block_n rows of u
        n_own = cdiv(N, cfg_c.block_m)
        n_loop = cdiv(M, cfg_c.block_n)
        per = column_splits(n_own, n_loop, device, num_splits)
        part = empty((cdiv(n_loop, per), N, ld), stat, device)
        _bwd_col_kernel[(n_own, part.shape[0])](
            part, lse, lsec, *logits.args(u, v), per * cfg_c.block_n, part.shape[0],
            BLOCK_M=cfg_c.block_n, BLOCK_N=cfg_c.block_m,
            num_warps=cfg_c.num_warps, num_stages=cfg_c.num_stages, **common)
        return part

    def finish(row_side: _Finish | None, col_side: _Finish | None, accum: bool):
        """One launch for the sides given (either may be None). The row side also writes the per-program
        dscale shares (returned)."""
        first = row_side or col_side
        block = rows_per_program(d, first.source.prologue, finishing=True, normalize=logits.normalize)
        grid_r = cdiv(first.source.rows, block)
        dsc = empty(grid_r, stat, device) if row_side else first.inv
        both = row_side is not None and col_side is not None
        second = col_side if both else first
        block_c = rows_per_program(d, 0, finishing=True, normalize=logits.normalize)
        grid = grid_r + (cdiv(N, block_c) if both else 0)
        _finish_kernel[(grid,)](
            dsc, u, logits.scale, grad_loss, grad_reg, d, ld, n_loss, float(logits.inv_temperature),
            *first.args(), *second.plain_args(), grid_r,
            BLOCK_M=block, BLOCK_D=block_d(d), PROLOGUE=first.source.prologue, TWO_PART=first.two_part,
            ACCUM=accum, DSCALE=row_side is not None, BOTH=both, BLOCK_C=block_c, TWO_PART_C=second.two_part,
            NORMALIZE=logits.normalize, num_warps=4)
        return dsc

    if grad_reg is None:
        grad_reg = logits.scale  # never read without the AdaSSL prologue
    if deterministic or not atomic_schedule(device, dtype, d):
        col_part = col_kernel()
        row_side, _, g_sum = row_kernel(False)
    else:
        row_side, dv, g_sum = row_kernel(True)
        col_part = dv[None]  # one "split": the atomics summed every row block's share already
    col_side = _Finish(col_part, cinv, cols, col_sink, cols.split)
    if accumulate:  # the sinks alias: the targ side first, then the row side adds to it
        finish(None, col_side, False)
        dsc = finish(row_side, None, True)
    else:
        dsc = finish(row_side, col_side, False)
    if logits.sigmoid:  # dbias = sum_ij G_ij, from the row kernel's per-split row sums
        return torch.stack([dsc.sum(), g_sum.sum() * (grad_loss / n_loss)]).to(logits.scale.dtype)
    return dsc.sum().to(logits.scale.dtype)
