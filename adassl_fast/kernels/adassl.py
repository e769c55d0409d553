"""The one-pass AdaSSL op in Triton (docs/backends.md "The one-pass AdaSSL op", docs/spec.md 2.4, 2.6, 3.3-3.6).

No matmul kernel of its own: the nt_xent core (kernels/forward.py, kernels/backward.py) runs on the edited
rows `cont = [emb_y + r_yx; emb_x + r_xy]` against `targ = [emb_x; emb_y]`, both read through two-part row
sources (no concatenation of the inputs):
- the normalising pre-kernel forms the edited rows from emb / post / prior / noise in registers
  (PROLOGUE 1 = "v", 2 = "s"; kernels/latent.py), sums the KL / L0 regulariser, and writes the
  *normalised* edited rows u (M x d, operand dtype: fp16 for fp32 inputs) that the matmul kernels stream.
  That O(M d) buffer is the one departure from "the edited rows never reach HBM" (docs/backends.md):
  without it the column-owned backward kernel re-formed every streamed row tile (softplus, exp, log per
  element: ~8x the exp work of its own tile at d = 128, 128-row blocks), which made AdaSSL 2.4x slower
  than nt_xent on an H200.
  No M x M matrix is ever written.
- backward: the finishing kernel of the row side turns dcont into d emb (additive editor:
  d emb_ctx += dcont), d post, d prior, adding the regulariser's gradient times grad_reg. emb_x / emb_y
  are both rows and columns, so the side finished second adds to what the first wrote.
"""

from __future__ import annotations

from .backward import backward_core
from .forward import forward_core
from .launch import empty, on_input_device, stat_dtype
from .rows import RowSink, RowSource
from .tiles import Logits

PROLOGUES = {"v": 1, "s": 2}


def _sources(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx, variant):
    """(rows, cols): cont = [emb_y + r_yx; emb_x + r_xy] formed by the prologue, targ = [emb_x; emb_y]."""
    if variant not in PROLOGUES:
        raise ValueError(f'variant must be "v" or "s", got {variant!r}')
    B, d = emb_x.shape
    assert emb_y.shape == (B, d) and post_xy.shape == (B, 2 * d) and post_yx.shape == (B, 2 * d)
    assert noise_xy.shape == (B, d) and noise_yx.shape == (B, d)
    tensors = [emb_x, emb_y, post_xy, post_yx, noise_xy, noise_yx]
    if variant == "v":
        assert prior_xy.shape == (B, 2 * d) and prior_yx.shape == (B, 2 * d)
        tensors += [prior_xy, prior_yx]
    else:
        prior_xy = prior_yx = post_xy  # never read by the "s" kernels
    assert all(t.dtype == emb_x.dtype and t.is_contiguous() for t in tensors), "same dtype, contiguous"
    assert d <= 512, "the Triton backend tiles d <= 512 in one block"
    # rows i < B are the y -> x prediction (context emb_y), rows i >= B the x -> y one (context emb_x)
    rows = RowSource(emb_y, emb_x, B, 2 * B, post_yx, post_xy, prior_yx, prior_xy, noise_yx, noise_xy,
                     PROLOGUES[variant])
    return rows, RowSource.two_part(emb_x, emb_y, B, 2 * B)


def _partners(indices, emb_x, scale, inv_temperature, clamp, normalize) -> Logits:
    """The logits of nt_xent over the 2B rows: indices = (pos, excl), (2B,) int64, pos_i = i and
    excl_i = (i + B) mod 2B (the caller keeps one pair per B: adassl_fast.nt_xent.partner_indices)."""
    pos, excl = indices
    assert pos.shape == excl.shape == (2 * emb_x.shape[0],), (pos.shape, excl.shape)
    return Logits(pos, excl, scale, inv_temperature, clamp, bool(normalize))


@on_input_device
def adassl_forward(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx, scale,
                   inv_temperature, clamp, variant, *, indices, normalize=True, num_splits=None, config=None):
    """One-pass AdaSSL forward.

    emb_x, emb_y (B, d); post_* (B, 2d); prior_* (B, 2d) for "v", empty for "s"; noise_* (B, d)
    (standard normal for "v", uniform for "s"); scale () float32 (float64 for float64 inputs);
    indices: nt_xent's partner (pos, excl) (2B,) int64 (see _partners); normalize=False: the edited rows and
    the targets as given (no L2 normalisation).
    Returns (l_ssl (), l_reg (), lse (2B,)), float32 (float64 for float64 inputs).
    """
    rows, cols = _sources(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx, variant)
    logits = _partners(indices, emb_x, scale, inv_temperature, clamp, normalize)
    l_ssl, lse, reg_sums = forward_core(rows, cols, logits, num_splits=num_splits, config=config)
    # l_reg = (R_xy + R_yx) / 2 with R a mean over B rows: the sum over all 2B rows / 2B
    return l_ssl, reg_sums.sum() / rows.rows, lse


@on_input_device
def adassl_backward(grad_ssl, grad_reg, emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy,
                    noise_yx, scale, lse, inv_temperature, clamp, variant, deterministic, *, indices,
                    normalize=True, num_splits=None, configs=None):
    """One-pass AdaSSL backward.

    grad_ssl, grad_reg () tensors; the inputs, indices and normalize as in adassl_forward; lse (2B,) from it.
    Returns (demb_x, demb_y (B, d), dpost_xy, dpost_yx (B, 2d), dprior_xy, dprior_yx ((B, 2d) for
    "v", empty for "s"), dscale ()), gradients in the input dtype, dscale like scale.
    """
    rows, cols = _sources(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx, variant)
    logits = _partners(indices, emb_x, scale, inv_temperature, clamp, normalize)
    (B, d), dev, dt = emb_x.shape, emb_x.device, emb_x.dtype
    demb_x, demb_y = empty((B, d), dt, dev), empty((B, d), dt, dev)
    dpost_xy, dpost_yx = empty((B, 2 * d), dt, dev), empty((B, 2 * d), dt, dev)
    if variant == "v":
        dprior_xy, dprior_yx = empty((B, 2 * d), dt, dev), empty((B, 2 * d), dt, dev)
    else:
        dprior_xy, dprior_yx = prior_xy.new_empty(prior_xy.shape), prior_yx.new_empty(prior_yx.shape)
    row_sink = RowSink(demb_y, demb_x, dpost_yx, dpost_xy,
                       dprior_yx if variant == "v" else dpost_yx, dprior_xy if variant == "v" else dpost_xy)
    col_sink = RowSink(demb_x, demb_y, demb_x, demb_y, demb_x, demb_y)
    dscale = backward_core(grad_ssl.reshape(()), rows, row_sink, cols, col_sink, logits, lse.contiguous(),
                           bool(deterministic), grad_reg=grad_reg.reshape(()).to(stat_dtype(dt)), accumulate=True,
                           num_splits=num_splits, configs=configs)
    return demb_x, demb_y, dpost_xy, dpost_yx, dprior_xy, dprior_yx, dscale
