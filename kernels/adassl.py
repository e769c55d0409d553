"""The one-pass AdaSSL op in Triton (docs/backends.md "The one-pass AdaSSL op", SPEC 2.4, 2.6, 3.3-3.6).

No matmul kernel of its own: the nt_xent kernels (kernels/nt_xent.py) run on the edited rows
`cont = [emb_y + r_yx; emb_x + r_xy]` against `targ = [emb_x; emb_y]`, both read through two-part row
sources (no concatenation of the inputs):
- the normalising pre-kernel forms the edited rows from emb / post / prior / noise in registers
  (PROLOGUE 1 = "v", 2 = "s"; kernels/latent.py), sums the KL / L0 regulariser, and writes the
  *normalised* edited rows u (M x d, input dtype) that the matmul kernels stream. That O(M d) buffer is
  the one departure from "the edited rows never reach HBM" (DESIGN.md): without it the column-owned
  backward kernel re-formed every streamed row tile (softplus, exp, log per element: ~8x the exp work
  of its own tile at d = 128, 128-row blocks), which made AdaSSL 2.4x slower than nt_xent on an H200.
  No M x M matrix is ever written.
- backward: the finishing kernel of the row side turns dcont into d emb (additive editor:
  d emb_ctx += dcont), d post, d prior, adding the regulariser's gradient times grad_reg. emb_x / emb_y
  are both rows and columns, so the side finished second adds to what the first wrote.
"""

from __future__ import annotations

from adassl_fast.nt_xent import partner_indices

from .nt_xent import RowSink, RowSource, _empty, _stat_dtype, backward_core, forward_core, on_input_device

PROLOGUES = {"v": 1, "s": 2}


def _sources(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx, variant):
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
    src = RowSource(emb_y, emb_x, B, post_yx, post_xy, prior_yx, prior_xy, noise_yx, noise_xy,
                    PROLOGUES[variant])
    return src, B, d


@on_input_device
def adassl_forward(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx, scale,
                   inv_temperature, clamp, variant, *, num_splits=None, config=None):
    """One-pass AdaSSL forward.

    emb_x, emb_y (B, d); post_* (B, 2d); prior_* (B, 2d) for "v", empty for "s"; noise_* (B, d)
    (standard normal for "v", uniform for "s"); scale () float32 (float64 for float64 inputs).
    Returns (l_ssl (), l_reg (), lse (2B,)), float32 (float64 for float64 inputs).
    """
    src, B, d = _sources(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx, variant)
    M = 2 * B
    pos, excl = partner_indices(M, emb_x.device)
    l_ssl, lse, reg_sums = forward_core(src, M, emb_x, emb_y, B, M, d, pos, excl, scale, inv_temperature,
                                       clamp, num_splits=num_splits, config=config)
    # l_reg = (R_xy + R_yx) / 2 with R a mean over B rows: the sum over all 2B rows / 2B
    return l_ssl, reg_sums.sum() / M, lse


@on_input_device
def adassl_backward(grad_ssl, grad_reg, emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy,
                    noise_yx, scale, lse, inv_temperature, clamp, variant, deterministic, *,
                    num_splits=None, configs=None):
    """One-pass AdaSSL backward.

    grad_ssl, grad_reg () tensors; the inputs as in adassl_forward; lse (2B,) from it.
    Returns (demb_x, demb_y (B, d), dpost_xy, dpost_yx (B, 2d), dprior_xy, dprior_yx ((B, 2d) for
    "v", empty for "s"), dscale ()), gradients in the input dtype, dscale like scale.
    """
    src, B, d = _sources(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx, variant)
    M = 2 * B
    pos, excl = partner_indices(M, emb_x.device)
    dev, dt = emb_x.device, emb_x.dtype
    demb_x, demb_y = _empty((B, d), dt, dev), _empty((B, d), dt, dev)
    dpost_xy, dpost_yx = _empty((B, 2 * d), dt, dev), _empty((B, 2 * d), dt, dev)
    if variant == "v":
        dprior_xy, dprior_yx = _empty((B, 2 * d), dt, dev), _empty((B, 2 * d), dt, dev)
    else:
        dprior_xy, dprior_yx = prior_xy.new_empty(prior_xy.shape), prior_yx.new_empty(prior_yx.shape)
    row_sink = RowSink(demb_y, demb_x, dpost_yx, dpost_xy,
                       dprior_yx if variant == "v" else dpost_yx, dprior_xy if variant == "v" else dpost_xy)
    col_sink = RowSink(demb_x, demb_y, demb_x, demb_y, demb_x, demb_y)
    grad_reg = grad_reg.reshape(()).to(_stat_dtype(dt))
    dscale = backward_core(grad_ssl.reshape(()), grad_reg, src, row_sink, M, emb_x, emb_y, B, M, col_sink, d,
                           pos, excl, scale, lse.contiguous(), inv_temperature, clamp, bool(deterministic),
                           accumulate=True, num_splits=num_splits, configs=configs)
    return demb_x, demb_y, dpost_xy, dpost_yx, dprior_xy, dprior_yx, dscale
