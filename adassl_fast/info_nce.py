"""CLIP-style InfoNCE on an N x N similarity (positives on the diagonal), symmetric or one-directional.

The one-directional loss is the nt_xent core (adassl_fast/core.py) with no excluded column. The
symmetric loss has its own op: dL/dS = (P + P' - 2 I) / 2N holds both directions (P the row softmax, P'
the column softmax), so a backward pass over S gives both inputs' gradients at once (8 N^2 d FLOPs, where
two one-directional backward passes cost 16). The torch and Triton backends run it that way; the CUDA
backend composes two one-directional calls of its nt_xent core. Where one log-sum-exp shift fits every
logit, the torch backend also takes the column LSEs from the row pass's exps (one forward pass) and forms
both softmaxes from one exp per element in the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from adassl_fast import _checks, distributed
from adassl_fast._dispatch import resolve_impl, resolve_impl_among
from adassl_fast._library import define_loss
from adassl_fast.core import (
    clamp_inclusive,
    contrastive_loss,
    contrastive_reference,
    contrastive_stash_backward,
    contrastive_stash_fake,
    trains_in_one_pass,
    unit_rows,
)
from adassl_fast.indices import diagonal_indices


def info_nce_reference(query: Tensor, key: Tensor, *, temperature=0.07, scale=None, symmetric=True, clamp=None,
                       labels=None, normalize=True, negatives=None):
    """Materialising InfoNCE: cross-entropy of row i of S = scale/tau * U V^T against column i, or with labels
    (N,) against the uniform distribution over the columns of row i's label (docs/spec.md 2.12). `negatives`
    (K, d): K more columns of every row (one-directional only)."""
    cols = key if negatives is None else torch.cat([key, negatives])
    logits = unit_rows(query, normalize) @ unit_rows(cols, normalize).t() * _checks.scale_tensor(scale, query)
    logits = logits / temperature
    if clamp is not None:
        logits = clamp_inclusive(logits, clamp)
    if labels is None:
        targets = torch.arange(logits.shape[0], device=logits.device)
    else:
        same = (labels.unsqueeze(1) == labels).to(logits.dtype)
        targets = same / same.sum(1, keepdim=True)  # symmetric, as the labelling is shared
    loss = F.cross_entropy(logits, targets)
    if symmetric:
        loss = (loss + F.cross_entropy(logits.t(), targets)) / 2
    return loss


# ----------------------------------------------------------------------------------------------------
# torch.library ops (adassl_fast/_library.py).


def _symmetric_reference(query, key, scale, inv_temperature, clamp, *, normalize=True):
    """The symmetric loss by materialising S: both directions of the core's reference."""
    pos, excl = diagonal_indices(query.shape[0], query.device)
    forward = contrastive_reference(query, key, pos, excl, scale, inv_temperature, clamp, normalize=normalize)
    backward = contrastive_reference(key, query, pos, excl, scale, inv_temperature, clamp, normalize=normalize)
    return (forward + backward) / 2


# forward -> (loss 0-dim, lse (2, N): row then column LSEs) in the accumulation dtype; backward -> (dquery,
# dkey, dscale); docs/backends.md.
_ops = define_loss(
    "info_nce",
    tensors=("query", "key", "scale"),
    graded=("query", "key", "scale"),
    options="float inv_temperature, float? clamp",
    losses=("loss",),
    lse_shape=lambda query, *_: (2, query.shape[0]),
    reference=_symmetric_reference,
    keywords=("normalize",),
)
info_nce_forward_op, info_nce_backward_op = _ops.forward, _ops.backward


def _labelled_reference(symmetric):
    def reference(query, key, labels, scale, inv_temperature, clamp, *, normalize=True):
        return info_nce_reference(query, key, temperature=1.0 / inv_temperature, scale=scale, symmetric=symmetric,
                                  clamp=clamp, labels=labels, normalize=normalize)

    return reference


# Label-defined positives: one-directional -> (loss, lse (N,)) (and the torch backend's one-pass training op, as
# the core's), symmetric -> (loss, lse (2, N)); the backwards -> (dquery, dkey, dscale). Torch and Triton backends.
LABELLED_IMPLS = ("reference", "torch", "triton")
_labelled_ops = {
    symmetric: define_loss(
        name,
        tensors=("query", "key", "labels", "scale"),
        graded=("query", "key", "scale"),
        options="float inv_temperature, float? clamp",
        losses=("loss",),
        lse_shape=shape,
        reference=_labelled_reference(symmetric),
        public="info_nce",
        keywords=("normalize",),
        **stash,
    )
    for symmetric, name, shape, stash in (
        (False, "labelled", lambda q, *_: (q.shape[0],),
         dict(stash_fake=contrastive_stash_fake, stash_backward=contrastive_stash_backward)),
        (True, "labelled_info_nce", lambda q, *_: (2, q.shape[0]), {}),
    )
}


# ----------------------------------------------------------------------------------------------------
# Functional form.


def info_nce(
    query: Tensor,
    key: Tensor,
    *,
    temperature: float = 0.07,
    scale=None,
    symmetric: bool = True,
    clamp: float | None = None,
    impl: str = "auto",
    process_group=None,
    deterministic: bool = True,
    schedule: str | None = None,
    timeout: float | None = None,
    labels: Tensor | None = None,
    normalize: bool = True,
    negatives: Tensor | None = None,
) -> Tensor:
    """InfoNCE over the N x N cosine similarities of `query` (N, d) and `key` (N, d).

    Row i's positive is key i; with `labels` (N,) integers, the keys j with labels[j] == labels[i]:
    loss_i = logsumexp_j S_ij - mean over those j of S_ij (reference, torch and triton backends; "auto" never
    takes cuda).
    `symmetric=True` averages the query->key and key->query cross-entropies.
    `negatives` (K, d): extra columns (a queue / memory bank of keys) appended to the keys, so each query is
    contrasted with N + K keys; one-directional only (symmetric=False): the reverse direction's rows would be
    the keys, and a queue of keys holds no queries for them (docs/api.md). They receive gradients if they
    require them. Not with labels or process_group.
    Normalisation (`normalize`), `scale`, `clamp`, `impl`, `process_group`, `schedule` and `timeout` follow
    `nt_xent`. Returns a 0-dim float32 loss (float64 for float64 inputs).
    """
    query = _checks.matrix("query", query, min_rows=2)
    key = _checks.matrix("key", key)
    _checks.same_layout("key", key, "query", query)
    temperature = _checks.positive_float("temperature", temperature)
    clamp = _checks.optional_clamp(clamp)
    symmetric = _checks.flag("symmetric", symmetric)
    normalize = _checks.flag("normalize", normalize)
    negatives = _checks.extra_columns("negatives", negatives, "key", key, process_group)
    if negatives is not None and symmetric:
        raise ValueError("negatives need symmetric=False: they are extra keys for the query->key direction, and the "
                         "key->query direction has no extra queries to match them")
    if negatives is not None and labels is not None:
        raise ValueError("negatives cannot be combined with labels (extra columns carry no labels)")
    lam = _checks.scale_tensor(scale, query)
    if labels is not None:
        return _labelled(query, key, labels, temperature, lam, symmetric, clamp, impl, deterministic, process_group,
                         schedule, timeout, normalize)
    impl = resolve_impl(impl, query.device, query.dtype, query.shape[1])
    if process_group is not None:
        return distributed.info_nce(query, key, lam, temperature, symmetric, clamp, impl, deterministic, process_group,
                                    schedule=schedule, timeout=timeout, normalize=normalize)
    if impl == "reference":
        return info_nce_reference(query, key, temperature=temperature, scale=lam, symmetric=symmetric, clamp=clamp,
                                  normalize=normalize, negatives=negatives)
    if symmetric:
        loss, _ = info_nce_forward_op(query, key, lam, 1.0 / temperature, clamp, impl, deterministic, normalize)
        return loss
    pos, excl = diagonal_indices(query.shape[0], query.device)
    cols = key if negatives is None else torch.cat([key, negatives])
    return contrastive_loss(query, cols, pos, excl, lam, temperature, clamp, impl, deterministic, normalize)


def _labelled(query, key, labels, temperature, lam, symmetric, clamp, impl, deterministic, process_group, schedule,
              timeout, normalize):
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex \
            or labels.dtype == torch.bool:
        raise TypeError("labels must be an integer tensor")
    if labels.shape != (query.shape[0],):
        raise ValueError(f"labels must have shape ({query.shape[0]},) to match query, got {tuple(labels.shape)}")
    if labels.device != query.device:
        raise ValueError(f"labels are on {labels.device} but query is on {query.device}")
    impl = resolve_impl_among(impl, LABELLED_IMPLS, "label-defined InfoNCE", query.device, query.dtype, query.shape[1])
    if process_group is not None:
        return distributed.info_nce(query, key, lam, temperature, symmetric, clamp, impl, deterministic, process_group,
                                    schedule=schedule, timeout=timeout, labels=labels.to(torch.int64).contiguous(),
                                    normalize=normalize)
    if impl == "reference":
        return info_nce_reference(query, key, temperature=temperature, scale=lam, symmetric=symmetric, clamp=clamp,
                                  labels=labels, normalize=normalize)
    ops = _labelled_ops[symmetric]
    args = (query, key, labels.to(torch.int64).contiguous(), lam, 1.0 / temperature, clamp, impl, deterministic,
            normalize)
    if ops.forward_backward is not None and trains_in_one_pass(impl, query, key, lam):
        return ops.forward_backward(*args)[0]
    return ops.forward(*args)[0]
