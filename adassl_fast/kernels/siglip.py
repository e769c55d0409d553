"""SigLIP's pairwise sigmoid loss in Triton (docs/backends.md "The SigLIP op", docs/spec.md 2.11 / 3.7).

loss = (1/N) sum_ij softplus(-z_ij L_ij), L = scale * u v^T + bias, z_ii = +1, z_ij = -1 elsewhere. The entry
points only: the shared core's SIGMOID logits (kernels/tiles.py) turn the forward kernel's online LSE into a sum
of softplus terms and the backward's G into sigmoid(L) - I, over the same tiles and schedules (deterministic
row- / column-owned, or atomic) as nt_xent; dbias is the sum of G, taken from the row kernel's row sums.
"""

from __future__ import annotations

from .backward import backward_core
from .forward import forward_core
from .launch import check_core_inputs, empty, on_input_device
from .rows import RowSink, RowSource
from .tiles import Logits


def _logits(query, key, params, indices, normalize) -> Logits:
    """SIGMOID logits with the diagonal positives: indices = (arange(N), -1 everywhere) (N,) int64 (the caller
    keeps one pair per N: adassl_fast.indices.diagonal_indices)."""
    pos, excl = indices
    check_core_inputs(query, key, pos, excl, params[0])
    assert key.shape == query.shape and params.shape == (2,) and params.is_contiguous(), (key.shape, params.shape)
    return Logits.pairwise_sigmoid(indices, params, bool(normalize))


@on_input_device
def siglip_forward(query, key, params, *, indices, normalize=True, num_splits=None, config=None):
    """Fused SigLIP forward.

    query, key (N, d): same floating dtype, contiguous; params (2,) (scale, bias), float32 (float64 for float64
    inputs); normalize=False: the rows as given (kernels/nt_xent.py). Returns (loss (), an empty (0,) LSE), like
    params.
    """
    logits = _logits(query, key, params, indices, normalize)
    loss, _, _ = forward_core(RowSource.plain(query), RowSource.plain(key), logits, num_splits=num_splits,
                              config=config)
    return loss, params.new_empty(0)


@on_input_device
def siglip_backward(grad_loss, query, key, params, lse, deterministic, *, indices, normalize=True, num_splits=None,
                    configs=None):
    """Fused SigLIP backward: (dquery, dkey (N, d) in the input dtype, dparams (2,) like params).

    grad_loss () tensor; the rest as in siglip_forward (lse: its empty LSE, unused). deterministic as in
    nt_xent_backward (kernels/nt_xent.py).
    """
    logits = _logits(query, key, params, indices, normalize)
    dquery = empty(query.shape, query.dtype, query.device)
    dkey = empty(key.shape, key.dtype, key.device)
    dparams = backward_core(grad_loss.reshape(()), RowSource.plain(query), RowSink.plain(dquery),
                            RowSource.plain(key), RowSink.plain(dkey), logits, None, bool(deterministic),
                            num_splits=num_splits, configs=configs)
    return dquery, dkey, dparams
