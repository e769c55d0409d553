"""Two-part row sources and sinks: where every kernel reads and writes rows of (M, d) matrices.

A side of the contrastive matrix is read through a "two-part source": rows r < half come from
`a + r * stride`, rows r >= half from `b + (r - half) * stride`. Plain nt_xent passes a == b and half = M;
the one-pass AdaSSL op reads `targ = [emb_x; emb_y]` and `cont = [emb_y + r_yx; emb_x + r_xy]` this way
without concatenating its inputs. RowSource / RowSink say, on the host, which tensors a side's rows
and gradients live in; load_rows / store_rows are the Triton side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .configs import interpreting

# The interpreter converts fp32 -> bf16 by truncation (a GPU rounds to nearest even): round_to
# rounds explicitly there, so interpreter tests see the rounding the GPU kernels do.
_TRUNCATING_BF16 = tl.constexpr(interpreting())


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """x rounded to `dtype` to nearest even, on a GPU and in the interpreter alike."""
    if _TRUNCATING_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def load_rows(a_ptr, b_ptr, rows, cols, half, n_rows, n_cols, stride, TWO_PART: tl.constexpr):
    """(len(rows), len(cols)) tile of a two-part source; zeros outside [0, n_rows) x [0, n_cols)."""
    # int64: M * d reaches 2^30 at M = 2^21, d = 512, and the partial buffers multiply that again.
    r64 = rows.to(tl.int64)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    if TWO_PART:
        # Two masked loads rather than one load through a per-row select of the base pointer: a select
        # hides the column contiguity from the compiler (scalar loads, one 64-bit pointer per element,
        # spills); each half here is base + offsets and vectorises. Memory traffic is the same.
        top = (rows < half)[:, None]
        va = tl.load(a_ptr + (r64 * stride)[:, None] + cols[None, :], mask=mask & top, other=0.0)
        vb = tl.load(b_ptr + ((r64 - half) * stride)[:, None] + cols[None, :], mask=mask & (~top), other=0.0)
        return tl.where(top, va, vb)
    else:
        return tl.load(a_ptr + (r64 * stride)[:, None] + cols[None, :], mask=mask, other=0.0)


@triton.jit
def store_rows(a_ptr, b_ptr, rows, cols, half, n_rows, n_cols, stride, val, TWO_PART: tl.constexpr,
               ACCUM: tl.constexpr):
    r64 = rows.to(tl.int64)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    if ACCUM:
        # The other side's kernel already wrote its share of this gradient (emb_x / emb_y appear both
        # as rows and as columns); add in fp32 and round once more.
        val += load_rows(a_ptr, b_ptr, rows, cols, half, n_rows, n_cols, stride, TWO_PART).to(val.dtype)
    val = round_to(val, a_ptr.dtype.element_ty)
    if TWO_PART:
        top = (rows < half)[:, None]
        tl.store(a_ptr + (r64 * stride)[:, None] + cols[None, :], val, mask=mask & top)
        tl.store(b_ptr + ((r64 - half) * stride)[:, None] + cols[None, :], val, mask=mask & (~top))
    else:
        tl.store(a_ptr + (r64 * stride)[:, None] + cols[None, :], val, mask=mask)


@dataclass
class RowSource:
    """Where the kernels read the `rows` rows of one side (d wide). Plain rows: a == b, half == rows.

    For the AdaSSL prologue (kernels/latent.py) the rows are formed from emb / post / prior / noise, each a
    two-part source with the same `half`; elsewhere those fields repeat emb_a and are never read.
    """

    emb_a: torch.Tensor
    emb_b: torch.Tensor
    half: int
    rows: int
    post_a: torch.Tensor
    post_b: torch.Tensor
    prior_a: torch.Tensor
    prior_b: torch.Tensor
    noise_a: torch.Tensor
    noise_b: torch.Tensor
    prologue: int  # 0 plain, 1 AdaSSL-V, 2 AdaSSL-S

    @staticmethod
    def plain(x: torch.Tensor) -> RowSource:
        return RowSource.two_part(x, x, x.shape[0], x.shape[0])

    @staticmethod
    def two_part(a: torch.Tensor, b: torch.Tensor, half: int, rows: int) -> RowSource:
        """Rows [a; b] read as they are (a has `half` rows)."""
        return RowSource(a, b, half, rows, a, a, a, a, a, a, 0)

    @property
    def width(self) -> int:
        return self.emb_a.shape[1]

    @property
    def split(self) -> bool:
        """Whether the rows really come from two tensors (TWO_PART), not one."""
        return self.half < self.rows

    def latent_args(self) -> tuple:
        """The eight row pointers, in the kernels' (emb, post, prior, noise) order."""
        return (self.emb_a, self.emb_b, self.post_a, self.post_b, self.prior_a, self.prior_b,
                self.noise_a, self.noise_b)


@dataclass
class RowSink:
    """Where a finishing kernel writes the gradients of one side's rows (same layout as RowSource)."""

    a: torch.Tensor
    b: torch.Tensor
    dpost_a: torch.Tensor
    dpost_b: torch.Tensor
    dprior_a: torch.Tensor
    dprior_b: torch.Tensor

    @staticmethod
    def plain(x: torch.Tensor) -> RowSink:
        return RowSink(x, x, x, x, x, x)

    def args(self) -> tuple:
        return self.a, self.b, self.dpost_a, self.dpost_b, self.dprior_a, self.dprior_b
