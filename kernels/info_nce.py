"""Symmetric InfoNCE (CLIP) in Triton: both directions' cross-entropies through one set of kernels.

loss = (mean_i [lse_i - S_ii] + mean_j [lse'_j - S_jj]) / 2 over S = scale / tau * u v^T (N x N), with
lse the row LSEs and lse' the column LSEs. No kernel of its own (kernels/nt_xent.py):
- forward: the rows are normalised once, then the forward matmul kernel runs on (u, v) for the row
  LSEs and on (v, u) for the column LSEs: 4 N^2 d FLOPs, 2 N^2 exps.
- backward: dL/dS = (P + P' - 2 I) / 2N holds both directions (P row softmax, P' column softmax), so
  one row-owned and one column-owned kernel (SYM) give both inputs' gradients: 8 N^2 d, where running
  the one-directional op twice (each direction's own pair of kernels) costs 16 N^2 d.
"""

from __future__ import annotations

from adassl_fast.nt_xent import diagonal_indices

from .configs import pick_config
from .nt_xent import (
    _MERGE_BLOCK,
    RowSink,
    RowSource,
    _cdiv,
    _check,
    _empty,
    _row_lse,
    _stat_dtype,
    backward_core,
    normalize_rows,
    on_input_device,
)


@on_input_device
def info_nce_forward(query, key, scale, inv_temperature, clamp, *, num_splits=None, config=None):
    """Fused forward of the symmetric InfoNCE loss.

    query, key (N, d): same floating dtype, contiguous; scale () float32 (float64 for float64 inputs);
    inv_temperature float; clamp float or None.
    Returns (loss (), lse (2, N): row LSEs then column LSEs), float32 (float64 for float64 inputs).
    """
    pos, excl = diagonal_indices(query.shape[0], query.device)
    _check(query, key, pos, excl, scale)
    assert key.shape == query.shape, (query.shape, key.shape)
    N, d = query.shape
    dtype, device = query.dtype, query.device
    stat = _stat_dtype(dtype)
    u, _, _, v, _ = normalize_rows(RowSource.plain(query), N, key, key, N, N, d, stat)
    cfg = config or pick_config("fwd", device, dtype, d)
    lse = _empty((2, N), stat, device)
    loss_part = _empty((2, _cdiv(N, _MERGE_BLOCK)), stat, device)
    # each direction's terms are divided by 2N: the loss is the sum of both directions' parts
    _row_lse(u, v, pos, excl, scale, inv_temperature, clamp, lse[0], loss_part[0], 2 * N, cfg, num_splits)
    _row_lse(v, u, pos, excl, scale, inv_temperature, clamp, lse[1], loss_part[1], 2 * N, cfg, num_splits)
    return loss_part.sum(), lse


@on_input_device
def info_nce_backward(grad_loss, query, key, scale, lse, inv_temperature, clamp, deterministic, *,
                      num_splits=None, configs=None):
    """Fused backward of the symmetric InfoNCE loss.

    grad_loss () tensor; query, key (N, d); scale (); lse (2, N) from info_nce_forward.
    deterministic as in nt_xent_backward. Returns (dquery, dkey (N, d)) in the input dtype and dscale ().
    """
    pos, excl = diagonal_indices(query.shape[0], query.device)
    _check(query, key, pos, excl, scale)
    N, d = query.shape
    assert lse.shape == (2, N), lse.shape
    lse = lse.contiguous()
    dquery = _empty(query.shape, query.dtype, query.device)
    dkey = _empty(key.shape, key.dtype, key.device)
    dscale = backward_core(grad_loss.reshape(()), None, RowSource.plain(query), RowSink.plain(dquery), N,
                           key, key, N, N, RowSink.plain(dkey), d, pos, excl, scale, lse[0], inv_temperature,
                           clamp, bool(deterministic), col_lse=lse[1], num_splits=num_splits, configs=configs)
    return dquery, dkey, dscale
