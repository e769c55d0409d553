"""The normalising pre-kernel: u = x / max(|x|, eps) of both sides, written once per call.

With NORMALIZE off (normalize=False: rows taken as given) it writes u = x, only cast to the operand dtype.

The matrix kernels stream only u and v, so one lean set of them serves nt_xent, info_nce, AdaSSL and SigLIP, and
S = scale / tau * <u_i, v_j> is one multiply per element. For AdaSSL this kernel forms the edited rows
first (kernels/latent.py) and sums the KL / L0 regulariser; the edited rows are written only in their
normalised form, O(M d) bytes.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .configs import block_d, operand_dtype
from .latent import build_rows
from .launch import cdiv, empty, rows_per_program
from .rows import RowSource, store_rows

EPS = tl.constexpr(1e-12)


@triton.jit
def _normalize_block(out_ptr, inv_ptr, pid, half, n_rows, d, ld,
                     emb_a, emb_b, post_a, post_b, prior_a, prior_b, noise_a, noise_b,
                     ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PROLOGUE: tl.constexpr,
                     NORMALIZE: tl.constexpr):
    """Rows [pid * BLOCK_M, +BLOCK_M) of one side: writes u_i = x_i / max(|x_i|, eps) (out_ptr's dtype, row
    stride ld, zeros in columns [d, ld)) and 1 / max(|x_i|, eps), or (NORMALIZE off) u_i = x_i and no inverse
    norm; returns the block's regulariser sum (0 for PROLOGUE 0)."""
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    x, reg = build_rows(rows, cols, half, n_rows, d, emb_a, emb_b, post_a, post_b, prior_a, prior_b,
                        noise_a, noise_b, ACC, PROLOGUE)
    # The norm of the rows as the input dtype holds them (for AdaSSL: the edited rows rounded once).
    x = x.to(ACC)
    if NORMALIZE:
        # EPS as an ACC tensor: tl.maximum rounds a bare constant to fp32
        inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, 1)), tl.zeros([], ACC) + EPS)
        tl.store(inv_ptr + rows, inv, mask=rows < n_rows)
        x = x * inv[:, None]
    store_rows(out_ptr, out_ptr, rows, cols, n_rows, n_rows, ld, ld, x, False, False)
    return tl.sum(reg, 0)


@triton.jit
def _normalize_kernel(
    out_ptr,  # (n_rows, ld) out, operand dtype (configs.operand_dtype): the cont side's u
    inv_ptr,  # (n_rows,) ACC out: its 1 / max(|x_i|, eps) (NORMALIZE only)
    reg_ptr,  # (grid_u,) ACC out: per-program regulariser sum (PROLOGUE != 0)
    half, n_rows, d, ld,  # ld: d rounded up to 16, the row stride of u and v (see normalize_rows)
    emb_a, emb_b, post_a, post_b, prior_a, prior_b, noise_a, noise_b,  # the cont rows (RowSource)
    vout_ptr, vinv_ptr,  # (n_cols, ld), (n_cols,) out: the same for the targ side (a plain two-part source)
    targ_a, targ_b, half_t, n_cols, grid_u,
    BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, PROLOGUE: tl.constexpr,
    NORMALIZE: tl.constexpr,
):
    # Both sides in one launch (small M is bound by launches): programs [0, grid_u) take the cont rows,
    # the rest the targ rows, each side with its own rows per program (the AdaSSL prologue holds more).
    ACC: tl.constexpr = inv_ptr.dtype.element_ty
    pid = tl.program_id(0)
    if pid < grid_u:
        reg = _normalize_block(out_ptr, inv_ptr, pid, half, n_rows, d, ld, emb_a, emb_b, post_a, post_b,
                               prior_a, prior_b, noise_a, noise_b, ACC, BLOCK_M, BLOCK_D, PROLOGUE, NORMALIZE)
        if PROLOGUE != 0:
            tl.store(reg_ptr + pid, reg)
    else:
        _normalize_block(vout_ptr, vinv_ptr, pid - grid_u, half_t, n_cols, d, ld, targ_a, targ_b, targ_a, targ_b,
                         targ_a, targ_b, targ_a, targ_b, ACC, BLOCK_T, BLOCK_D, 0, NORMALIZE)


def normalize_rows(rows: RowSource, cols: RowSource, stat, normalize: bool):
    """(u (M, ld), 1/|x| (M,), per-program regulariser sums, v (N, ld), 1/|t| (N,)) of both sides, one launch.

    `rows` gives the M cont rows (for AdaSSL formed from emb / post / prior / noise), `cols` the N targ rows
    (a plain two-part source). u and v, in the operand dtype (the input dtype; fp16 for fp32 inputs, rounded
    once from the fp32 unit rows: configs.operand_dtype), are what the matrix kernels stream: O((M + N) d)
    bytes, written once per call, so the column kernel never re-forms AdaSSL's edited rows per tile (that
    multiplied its exp / log work by ~8). Their rows are ld = d rounded up to 16 wide, zero-padded: the
    matrix kernels then see 16-divisible strides and widths whatever d is (Triton's aligned, vectorised code;
    with d = 100, 200 or 300 the sm_90 kernels spilled up to 736 bytes).
    normalize=False: u, v are the rows as given, in the operand dtype (bf16 for fp32 rows), and the inverse
    norms are left unwritten (nothing reads them).
    """
    dev, dtype, d = rows.emb_a.device, rows.emb_a.dtype, rows.width
    M, N = rows.rows, cols.rows
    ld = cdiv(d, 16) * 16
    u, inv_u = empty((M, ld), operand_dtype(dtype, normalize), dev), empty(M, stat, dev)
    v, inv_v = empty((N, ld), operand_dtype(dtype, normalize), dev), empty(N, stat, dev)
    block, block_t = rows_per_program(d, rows.prologue, finishing=False), rows_per_program(d, 0, finishing=False)
    grid_u = cdiv(M, block)
    reg = empty(grid_u, stat, dev)
    _normalize_kernel[(grid_u + cdiv(N, block_t),)](
        u, inv_u, reg, rows.half, M, d, ld, *rows.latent_args(), v, inv_v, cols.emb_a, cols.emb_b, cols.half, N,
        grid_u, BLOCK_M=block, BLOCK_T=block_t, BLOCK_D=block_d(d), PROLOGUE=rows.prologue, NORMALIZE=normalize,
        num_warps=4)
    return u, inv_u, reg, v, inv_v
