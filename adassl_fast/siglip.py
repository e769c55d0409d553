"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023, eq. 1) over the N x N logits of `query` against `key`.

    loss = -(1/N) sum_ij log sigmoid(z_ij (scale * <u_i, v_j> + bias)),  z_ii = +1, z_ij = -1 (i != j)

(docs/spec.md 2.11, 3.7). No row statistic links the entries, so the torch backend forms the loss and every
gradient in one pass over row blocks (`torch_backend.siglip_blocks`), holding O(N d) memory. The op takes
scale and bias as one (2,) tensor `params`. The Triton backend runs it through the shared fused core (its SIGMOID
logits, adassl_fast/kernels/siglip.py); the CUDA backend has no SigLIP kernels (BackendUnavailable).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from adassl_fast import _checks, _library, distributed
from adassl_fast._dispatch import resolve_impl_among
from adassl_fast.core import trains_in_one_pass
from adassl_fast.torch_backend import NORM_EPS

# The backends with SigLIP entry points (`_library.Backend.siglip_forward`).
SIGLIP_IMPLS = ("reference", "torch", "triton")


def siglip_reference(query: Tensor, key: Tensor, *, scale=10.0, bias=-10.0, normalize: bool = True) -> Tensor:
    """Materialising SigLIP loss: the N x N logits, labels +1 on the diagonal and -1 elsewhere."""
    acc = _checks.accumulation_dtype(query.dtype)
    u, v = query.to(acc), key.to(acc)
    if normalize:
        u, v = F.normalize(u, dim=1, eps=NORM_EPS), F.normalize(v, dim=1, eps=NORM_EPS)
    logits = _checks.scale_tensor(scale, query) * (u @ v.t()) + _checks.scale_tensor(bias, query)
    labels = 2 * torch.eye(len(u), dtype=acc, device=u.device) - 1
    return -F.logsigmoid(labels * logits).sum() / len(u)


def _op_reference(query, key, params, *, normalize):
    return siglip_reference(query, key, scale=params[0], bias=params[1], normalize=normalize)


def _stash_fake(query, key, params):
    acc = _checks.accumulation_dtype(query.dtype)
    return query.new_empty(query.shape, dtype=acc), key.new_empty(key.shape, dtype=acc), torch.empty_like(params)


def _stash_backward(stash, grads, inputs, options):
    (grad_loss,), (query, key, _) = grads, inputs
    dq, dk, dparams = (g * grad_loss for g in stash)
    return dq.to(query.dtype), dk.to(key.dtype), dparams


# forward -> (loss 0-dim, an empty LSE) in the accumulation dtype; backward -> (dquery, dkey, dparams); the
# one-pass training op -> (loss, empty LSE, dquery, dkey, dparams) for grad_loss = 1. docs/backends.md.
_ops = _library.define_loss(
    "siglip",
    tensors=("query", "key", "params"),
    graded=("query", "key", "params"),
    options="",
    keywords=("normalize",),
    losses=("loss",),
    lse_shape=lambda query, *_: (0,),
    reference=_op_reference,
    stash_fake=_stash_fake,
    stash_backward=_stash_backward,
)


def siglip(query: Tensor, key: Tensor, *, scale=10.0, bias=-10.0, normalize: bool = True, impl: str = "auto",
           process_group=None, deterministic: bool = True, schedule: str | None = None,
           timeout: float | None = None) -> Tensor:
    """SigLIP's sigmoid loss over the N x N logits scale * <u_i, v_j> + bias (u, v the L2-normalised rows of
    `query` and `key`, or the rows as given with normalize=False); row i's positive is key i.

    `scale` and `bias`: floats or 0-dim tensors (they receive gradients). `deterministic=False` lets the
    Triton backward take its atomic schedule; `schedule` ("ring" / "gather") and `timeout` pick the distributed
    schedule with `process_group`, as for info_nce. Returns a 0-dim float32 loss (float64 for float64 inputs).
    """
    query = _checks.matrix("query", query, min_rows=2)
    key = _checks.matrix("key", key)
    _checks.same_layout("key", key, "query", query)
    normalize = _checks.flag("normalize", normalize)
    scale = _checks.scale_tensor(scale, query)
    bias = _checks.scale_tensor(bias, query)
    impl = resolve_impl_among(impl, SIGLIP_IMPLS, "SigLIP", query.device, query.dtype, query.shape[1])
    params = torch.stack([scale, bias])
    if process_group is not None:  # the ring (or gather) schedule of adassl_fast/distributed.py
        return distributed.siglip(query, key, params, normalize, impl, process_group, schedule=schedule,
                                  timeout=timeout)
    if impl == "reference":
        return siglip_reference(query, key, scale=scale, bias=bias, normalize=normalize)
    args = (query, key, params, impl, _checks.flag("deterministic", deterministic), normalize)
    if trains_in_one_pass(impl, query, key, params):
        return _ops.forward_backward(*args)[0]
    return _ops.forward(*args)[0]
