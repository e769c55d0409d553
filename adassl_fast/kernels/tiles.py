"""What the matrix kernels share: the logits they score, and the tile helpers of forward and backward.

Every matrix kernel (kernels/forward.py, kernels/backward.py) streams rows u (M, ld) against v (N, ld), the
normalised rows or (Logits.normalize False) the rows as given, and scores them the same way:
S_ij = scale / tau * <u_i, v_j>, clamped to +-clamp, row i's positive column pos_i and excluded column excl_i
(-1: none). Two modes change what a tile of S feeds (docs/spec.md):
- SIGMOID (SigLIP, 2.11 / 3.7): L_ij = scale <u_i, v_j> + bias (tau = 1, no clamp), each entry its own term
  softplus(-z_ij L_ij), z = +1 at the positive column, -1 elsewhere: no row LSE. `scale` is then the (2,)
  tensor (scale, bias).
- LABELS (label-defined positives, 2.12): row i's positives are the columns of its label; `pos` holds the
  labels (shared by rows and columns: the ops are square) and `excl` each row's count of positives (nothing
  is excluded). The kernels compare label tiles; nothing N x N is stored.
Logits carries that scoring on the host and hands every matrix kernel the same run of arguments (u, v, pos,
excl, scale, M, N, ld, 1 / tau, clamp); the Triton helpers below set up the owned block, score a tile, find
the tiles that need masks and the blocks where the clamp can bind. Logits are kept in log2 units (log2(e)
folded into the scale) so the softmax uses exp2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import dot_precision
from .rows import load_rows

# Module-level constants used inside @triton.jit must be constexpr.
LOG2E = tl.constexpr(1.4426950408889634)


@dataclass(frozen=True)
class Logits:
    """How the matrix kernels score rows against columns (docs/backends.md, the nt_xent core).

    pos, excl: (M,) int64, contiguous; scale: () in the statistics dtype; clamp: float or None; normalize:
    whether u, v are the normalised rows (False: the rows as given, docs/backends.md). The modes (module
    docstring) come from `sigmoid` and `labelled`, which give their pos / excl / scale meaning.
    """

    pos: torch.Tensor
    excl: torch.Tensor
    scale: torch.Tensor
    inv_temperature: float
    clamp: float | None
    normalize: bool = True
    sigmoid: bool = False
    labels: bool = False

    @staticmethod
    def pairwise_sigmoid(indices, params: torch.Tensor, normalize: bool) -> Logits:
        """SigLIP's logits L = params[0] <u_i, v_j> + params[1] with the diagonal (pos, excl) `indices`."""
        pos, excl = indices
        return Logits(pos, excl, params, 1.0, None, normalize, sigmoid=True)

    @staticmethod
    def labelled(labels: torch.Tensor, scale, inv_temperature: float, clamp, normalize: bool) -> Logits:
        """Label-defined positives: `labels` (N,) int64 shared by rows and columns, with each row's count of
        positives, |{j : labels_j = labels_i}|, from one sort (O(N log N), no N x N compare, no host sync)."""
        ordered = labels.sort().values
        counts = torch.searchsorted(ordered, labels, right=True) - torch.searchsorted(ordered, labels)
        return Logits(labels, counts, scale, inv_temperature, clamp, normalize, labels=True)

    def args(self, u: torch.Tensor, v: torch.Tensor) -> tuple:
        """The arguments every matrix kernel takes from u_ptr to clamp2, scoring u (M, ld) against v (N, ld)."""
        # the clamp in log2 units, formed in double precision on the host (a kernel's float argument is fp32)
        clamp2 = float(self.clamp) * 1.4426950408889634 if self.clamp is not None else 0.0
        return (u, v, self.pos, self.excl, self.scale, u.shape[0], v.shape[0], u.shape[1],
                float(self.inv_temperature), clamp2)

    def constexprs(self, dtype: torch.dtype) -> dict:
        upcast, prec = dot_precision(dtype)
        return dict(CLAMP=self.clamp is not None, UPCAST=upcast, PREC=prec, NORMALIZE=self.normalize,
                    SIGMOID=self.sigmoid, LABELS=self.labels)


@triton.jit
def operand(x, UPCAST: tl.constexpr):
    if UPCAST:
        return x.to(tl.float32)
    else:
        return x


@triton.jit
def owned_block(x_ptr, n, ld, scale_ptr, inv_t, clamp2, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, SIGMOID: tl.constexpr, NORMALIZE: tl.constexpr):
    """What every matrix kernel sets up first: the indices of the BLOCK rows of x (n, ld) that program_id(0)
    owns, the feature indices, the owned tile (on chip for the whole loop: K = d in one tl.dot), the logit
    scale and bias in log2 units (bias 0 but in SIGMOID mode), the clamp as a tensor and whether it binds
    (clamp_binds: always for rows taken as given, NORMALIZE off)."""
    ACC: tl.constexpr = scale_ptr.dtype.element_ty
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    dd = tl.arange(0, BLOCK_D)
    x = operand(load_rows(x_ptr, x_ptr, idx, dd, n, n, ld, ld, False), UPCAST)
    sk2 = tl.load(scale_ptr) * inv_t * LOG2E
    if SIGMOID:
        b2 = tl.load(scale_ptr + 1) * LOG2E
    else:
        b2 = tl.zeros([], ACC)
    # as a tensor: tl.minimum / tl.maximum would round a bare float argument to fp32 (interpreter, fp64)
    clamp2 = tl.zeros([], ACC) + clamp2
    return idx, dd, x, sk2, b2, clamp2, clamp_binds(sk2, clamp2, NORMALIZE)


@triton.jit
def owned_rows(u_ptr, pos_ptr, excl_ptr, scale_ptr, M, d, inv_t, clamp2, BLOCK_M: tl.constexpr,
               BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, SIGMOID: tl.constexpr, LABELS: tl.constexpr,
               NORMALIZE: tl.constexpr):
    """The row-owned kernels' set-up (the forward and the row-owned backward): owned_block for the rows of u,
    which rows are inside, their positive and excluded columns and the ranges holds_special takes. LABELS: `pos`
    holds the rows' labels and `excl` 1 / their counts of positives (positive_weights)."""
    rows, dd, x, sk2, b2, clamp2, binds = owned_block(u_ptr, M, d, scale_ptr, inv_t, clamp2, BLOCK_M, BLOCK_D,
                                                      UPCAST, SIGMOID, NORMALIZE)
    row_ok = rows < M
    pos, excl, pos_lo, pos_hi, excl_lo, excl_hi = row_indices(pos_ptr, excl_ptr, rows, row_ok)
    if LABELS:
        excl = positive_weights(excl_ptr, rows, row_ok, scale_ptr.dtype.element_ty)
    return rows, row_ok, dd, x, sk2, b2, clamp2, binds, pos, excl, pos_lo, pos_hi, excl_lo, excl_hi


@triton.jit
def scores(x, t, sk2, b2, PREC: tl.constexpr, SIGMOID: tl.constexpr):
    """One tile of logits in log2 units, x t^T scaled (and, in SIGMOID mode, the bias added), in sk2's dtype."""
    s2 = tl.dot(x, tl.trans(t), input_precision=PREC).to(sk2.dtype) * sk2
    if SIGMOID:
        s2 += b2
    return s2


@triton.jit
def streamed_tile(owned, y_ptr, start, n, ld, dd, sk2, b2, BLOCK: tl.constexpr, UPCAST: tl.constexpr,
                  PREC: tl.constexpr, SIGMOID: tl.constexpr):
    """The head of every matrix kernel's loop: the indices of the streamed block [start, start + BLOCK) of
    y (n, ld), its tile (zero rows past n) and the logits of the owned tile against it (scores)."""
    idx = start + tl.arange(0, BLOCK)
    tile = operand(load_rows(y_ptr, y_ptr, idx, dd, n, n, ld, ld, False), UPCAST)
    return idx, tile, scores(owned, tile, sk2, b2, PREC, SIGMOID)


@triton.jit
def positive_weights(counts_ptr, rows, ok, ACC: tl.constexpr):
    """LABELS: 1 / (each row's count of positives), 0 for rows past the end (so they get no positive term)."""
    counts = tl.load(counts_ptr + rows, mask=ok, other=1).to(ACC)
    return tl.where(ok, 1.0 / counts, 0.0)


@triton.jit
def softplus2(x):
    """log2(1 + 2^x), the softplus in log2 units: max(x, 0) + log2(1 + e) with e = 2^-|x| <= 1. u = 1 + e rounds
    by c = (u - 1) - e (exact), and log2(1 + e) = log2(u) - c log2(e) to within |c| e: the tails keep every term
    (log2(u) alone is off by up to half an ulp of 1, all of a float64 term at e = 2^-60, and where 1 + e rounds
    to 1 this gives e log2(e) itself). No branch, no division: the 128 x 128 forward tile stays in registers."""
    e = tl.exp2(-tl.abs(x))
    u = 1.0 + e
    return tl.maximum(x, 0.0) + (tl.log2(u) - ((u - 1.0) - e) * LOG2E)


@triton.jit
def _index_range(idx):
    """(min, max) of the entries >= 0 of an index vector (-1 means none); (big, -1) when there are none."""
    lo = tl.min(tl.where(idx >= 0, idx, 2147483647), 0)
    return lo, tl.max(idx, 0)


@triton.jit
def row_indices(pos_ptr, excl_ptr, rows, row_ok):
    """pos, excl of a row program's rows and the ranges they span, for holds_special."""
    pos = tl.load(pos_ptr + rows, mask=row_ok, other=-1)
    excl = tl.load(excl_ptr + rows, mask=row_ok, other=-1)
    pos_lo, pos_hi = _index_range(pos)
    excl_lo, excl_hi = _index_range(excl)
    return pos, excl, pos_lo, pos_hi, excl_lo, excl_hi


@triton.jit
def holds_special(pos_lo, pos_hi, excl_lo, excl_hi, start, stop):
    """Whether columns [start, stop) may hold a row's positive or excluded column (conservative)."""
    return ((pos_lo < stop) & (pos_hi >= start)) | ((excl_lo < stop) & (excl_hi >= start))


@triton.jit
def clamp_binds(sk2, clamp2, NORMALIZE: tl.constexpr):
    """False when no logit can reach the clamp: |S| <= |scale / tau| |cos| and |cos| <= 1, with 1 % to
    spare for operands rounded to bf16. Then the clamp is the identity and every tile skips it (clamp 20
    at tau 0.1, the benchmark's setting, while |scale| < 1.98). Rows taken as given (NORMALIZE off) have
    no such bound (+inf: the clamp applies unless scale is 0, where every logit is 0). A bound rather than a
    constant True keeps the tiles' run-time branch, whose register allocation the shipped shapes were
    vetted with (a constant made the SYM column kernel spill 24 bytes on sm_90 at d = 256)."""
    if NORMALIZE:
        reach = 1.01
    else:
        reach = float("inf")
    return tl.abs(sk2) * reach >= clamp2
