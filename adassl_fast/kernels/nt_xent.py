"""The nt_xent core in Triton: forward and backward without any M x N matrix in memory (docs/backends.md).

Math (docs/spec.md 2.1 / 3.1): u_i = c_i / max(|c_i|, eps), v_j = t_j / max(|t_j|, eps),
S_ij = scale / tau * <u_i, v_j>, S^ = clamp(S, +-clamp), lse_i = log sum_{j != excl_i} exp(S^_ij),
loss = mean_i (lse_i - S^_{i,pos_i}). Backward: G = grad / M * (P - onehot(pos)) * [|S| <= clamp],
dU = s G V, dV = s G^T U, dscale = 1/tau sum G * C, then the normalisation backward.

The entry points only: the kernels they run are shared with info_nce, AdaSSL and SigLIP (flash-attention style):
kernels/normalize.py writes the normalised rows once, kernels/forward.py and kernels/backward.py stream
them (docs/architecture.md has the map).
"""

from __future__ import annotations

from .backward import backward_core
from .forward import forward_core
from .launch import check_core_inputs, empty, on_input_device
from .rows import RowSink, RowSource
from .tiles import Logits


@on_input_device
def nt_xent_forward(cont, targ, pos, excl, scale, inv_temperature, clamp, *, normalize=True, num_splits=None,
                    config=None):
    """Fused forward of the nt_xent core (docs/backends.md).

    cont (M, d), targ (N, d): same floating dtype, contiguous; pos, excl (M,) int64 (excl -1: none);
    scale () float32 (float64 for float64 inputs); inv_temperature float; clamp float or None;
    normalize=False: the rows as given (no L2 normalisation; fp32 rows stream as bf16 operands).
    Returns (loss (), lse (M,)), both float32 (float64 for float64 inputs).
    num_splits / config: optional overrides of the column split count and the block config (tests).
    """
    check_core_inputs(cont, targ, pos, excl, scale)
    logits = Logits(pos.contiguous(), excl.contiguous(), scale, inv_temperature, clamp, bool(normalize))
    loss, lse, _ = forward_core(RowSource.plain(cont), RowSource.plain(targ), logits, num_splits=num_splits,
                                config=config)
    return loss, lse


@on_input_device
def nt_xent_backward(grad_loss, cont, targ, pos, excl, scale, lse, inv_temperature, clamp, deterministic, *,
                     normalize=True, num_splits=None, configs=None):
    """Fused backward of the nt_xent core (docs/backends.md).

    grad_loss () tensor; cont (M, d), targ (N, d); pos, excl (M,) int64; scale (); lse (M,) from
    nt_xent_forward. deterministic=True: row-owned dU and column-owned dV kernels, no atomics;
    False: one kernel with fp32 atomics for dV. normalize as in nt_xent_forward (False: no normalisation
    backward).
    Returns (dcont (M, d), dtarg (N, d)) in the input dtype and dscale () like scale.
    """
    check_core_inputs(cont, targ, pos, excl, scale)
    dcont = empty(cont.shape, cont.dtype, cont.device)
    dtarg = empty(targ.shape, targ.dtype, targ.device)
    logits = Logits(pos.contiguous(), excl.contiguous(), scale, inv_temperature, clamp, bool(normalize))
    dscale = backward_core(grad_loss.reshape(()), RowSource.plain(cont), RowSink.plain(dcont), RowSource.plain(targ),
                           RowSink.plain(dtarg), logits, lse.contiguous(), bool(deterministic),
                           num_splits=num_splits, configs=configs)
    return dcont, dtarg, dscale
