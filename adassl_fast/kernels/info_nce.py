"""InfoNCE in Triton: the symmetric (CLIP) loss through one set of kernels, and label-defined positives.

loss = (mean_i [lse_i - S_ii] + mean_j [lse'_j - S_jj]) / 2 over S = scale / tau * u v^T (N x N), with
lse the row LSEs and lse' the column LSEs. No kernel of its own (kernels/forward.py, kernels/backward.py):
- forward: the rows are normalised once, then the forward matmul kernel runs on (u, v) for the row
  LSEs and on (v, u) for the column LSEs: 4 N^2 d FLOPs, 2 N^2 exps.
- backward: dL/dS = (P + P' - 2 I) / 2N holds both directions (P row softmax, P' column softmax), so
  one row-owned and one column-owned kernel (SYM) give both inputs' gradients: 8 N^2 d, where running
  the one-directional op twice (each direction's own pair of kernels) costs 16 N^2 d.
Label-defined positives (docs/spec.md 2.12), one-directional (the core with LABELS logits) and symmetric (the
above with LABELS logits): the positive term is each row's mean logit over the columns of its label, and the
onehot of G becomes Q_ij = [labels_i = labels_j] / count_i, formed tile by tile from the labels.
"""

from __future__ import annotations

from .backward import backward_core
from .configs import pick_config
from .forward import MERGE_BLOCK, forward_core, row_lse
from .launch import cdiv, check_core_inputs, empty, on_input_device, stat_dtype
from .normalize import normalize_rows
from .rows import RowSink, RowSource
from .tiles import Logits


def _square(query, key, logits: Logits) -> Logits:
    check_core_inputs(query, key, logits.pos, logits.excl, logits.scale)
    assert key.shape == query.shape, (query.shape, key.shape)
    return logits


def _diagonal(query, key, indices, scale, inv_temperature, clamp, normalize) -> Logits:
    """The logits of S = scale / tau * u v^T with positives on the diagonal and nothing excluded.

    indices: (pos, excl) = (arange(N), -1 everywhere) as (N,) int64 tensors (the caller keeps one pair per N:
    adassl_fast.nt_xent.diagonal_indices). The same indices serve the column direction.
    """
    pos, excl = indices
    return _square(query, key, Logits(pos, excl, scale, inv_temperature, clamp, bool(normalize)))


def _labelled(query, key, labels, scale, inv_temperature, clamp, normalize) -> Logits:
    """LABELS logits: labels (N,) int64, shared by the rows and the columns of either direction."""
    return _square(query, key, Logits.labelled(labels, scale, inv_temperature, clamp, bool(normalize)))


def _symmetric_forward(query, key, logits: Logits, num_splits, config):
    N, d = query.shape
    dtype, device = query.dtype, query.device
    stat = stat_dtype(dtype)
    u, _, _, v, _ = normalize_rows(RowSource.plain(query), RowSource.plain(key), stat, logits.normalize)
    cfg = config or pick_config("fwd", device, dtype, d)
    lse = empty((2, N), stat, device)
    loss_part = empty((2, cdiv(N, MERGE_BLOCK)), stat, device)
    # each direction's terms are divided by 2N: the loss is the sum of both directions' parts
    row_lse(u, v, logits, lse[0], loss_part[0], 2 * N, cfg, num_splits)
    row_lse(v, u, logits, lse[1], loss_part[1], 2 * N, cfg, num_splits)
    return loss_part.sum(), lse


def _symmetric_backward(grad_loss, query, key, logits: Logits, lse, deterministic, num_splits, configs):
    assert lse.shape == (2, query.shape[0]), lse.shape
    lse = lse.contiguous()
    dquery = empty(query.shape, query.dtype, query.device)
    dkey = empty(key.shape, key.dtype, key.device)
    dscale = backward_core(grad_loss.reshape(()), RowSource.plain(query), RowSink.plain(dquery), RowSource.plain(key),
                           RowSink.plain(dkey), logits, lse[0], bool(deterministic), col_lse=lse[1],
                           num_splits=num_splits, configs=configs)
    return dquery, dkey, dscale


@on_input_device
def info_nce_forward(query, key, scale, inv_temperature, clamp, *, indices, normalize=True, num_splits=None,
                     config=None):
    """Fused forward of the symmetric InfoNCE loss.

    query, key (N, d): same floating dtype, contiguous; scale () float32 (float64 for float64 inputs);
    inv_temperature float; clamp float or None; indices: the diagonal (pos, excl) (N,) int64 (see _diagonal);
    normalize=False: the rows as given (kernels/nt_xent.py).
    Returns (loss (), lse (2, N): row LSEs then column LSEs), float32 (float64 for float64 inputs).
    """
    logits = _diagonal(query, key, indices, scale, inv_temperature, clamp, normalize)
    return _symmetric_forward(query, key, logits, num_splits, config)


@on_input_device
def info_nce_backward(grad_loss, query, key, scale, lse, inv_temperature, clamp, deterministic, *, indices,
                      normalize=True, num_splits=None, configs=None):
    """Fused backward of the symmetric InfoNCE loss.

    grad_loss () tensor; query, key (N, d); scale (); lse (2, N) from info_nce_forward; indices, normalize as there.
    deterministic as in nt_xent_backward. Returns (dquery, dkey (N, d)) in the input dtype and dscale ().
    """
    logits = _diagonal(query, key, indices, scale, inv_temperature, clamp, normalize)
    return _symmetric_backward(grad_loss, query, key, logits, lse, deterministic, num_splits, configs)


@on_input_device
def labelled_forward(query, key, labels, scale, inv_temperature, clamp, *, normalize=True, num_splits=None,
                     config=None):
    """Fused forward of one-directional InfoNCE with label-defined positives: mean_i [lse_i - mean over the
    columns j of row i's label of S^_ij]. query, key (N, d), scale and normalize as in info_nce_forward; labels
    (N,) int64. Returns (loss (), lse (N,))."""
    logits = _labelled(query, key, labels, scale, inv_temperature, clamp, normalize)
    loss, lse, _ = forward_core(RowSource.plain(query), RowSource.plain(key), logits, num_splits=num_splits,
                                config=config)
    return loss, lse


@on_input_device
def labelled_backward(grad_loss, query, key, labels, scale, lse, inv_temperature, clamp, deterministic, *,
                      normalize=True, num_splits=None, configs=None):
    """Fused backward of labelled_forward's loss from its lse (N,): (dquery, dkey, dscale)."""
    logits = _labelled(query, key, labels, scale, inv_temperature, clamp, normalize)
    dquery = empty(query.shape, query.dtype, query.device)
    dkey = empty(key.shape, key.dtype, key.device)
    dscale = backward_core(grad_loss.reshape(()), RowSource.plain(query), RowSink.plain(dquery), RowSource.plain(key),
                           RowSink.plain(dkey), logits, lse.contiguous(), bool(deterministic), num_splits=num_splits,
                           configs=configs)
    return dquery, dkey, dscale


@on_input_device
def labelled_info_nce_forward(query, key, labels, scale, inv_temperature, clamp, *, normalize=True, num_splits=None,
                              config=None):
    """Fused forward of symmetric InfoNCE with label-defined positives: (loss (), lse (2, N)); normalize as in
    info_nce_forward."""
    logits = _labelled(query, key, labels, scale, inv_temperature, clamp, normalize)
    return _symmetric_forward(query, key, logits, num_splits, config)


@on_input_device
def labelled_info_nce_backward(grad_loss, query, key, labels, scale, lse, inv_temperature, clamp, deterministic, *,
                               normalize=True, num_splits=None, configs=None):
    """Fused backward of labelled_info_nce_forward's loss from its lse (2, N): (dquery, dkey, dscale)."""
    logits = _labelled(query, key, labels, scale, inv_temperature, clamp, normalize)
    return _symmetric_backward(grad_loss, query, key, logits, lse, deterministic, num_splits, configs)
