"""CLIP-style InfoNCE on an N x N similarity (positives on the diagonal), symmetric or one-directional.

It reuses the nt_xent core (adassl_fast/nt_xent.py) with no excluded column: the key->query direction
is the same op with the roles of the two inputs swapped, so every backend that runs nt_xent runs this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from adassl_fast import _checks
from adassl_fast._dispatch import resolve_impl
from adassl_fast.nt_xent import NORM_EPS, clamp_inclusive, contrastive_loss


def info_nce_reference(query: Tensor, key: Tensor, *, temperature=0.07, scale=None, symmetric=True, clamp=None):
    """Materialising InfoNCE: cross-entropy of row i of S = scale/tau * U V^T against column i."""
    acc = _checks.accumulation_dtype(query.dtype)
    u = F.normalize(query.to(acc), dim=1, eps=NORM_EPS)
    v = F.normalize(key.to(acc), dim=1, eps=NORM_EPS)
    logits = u @ v.t() * _checks.scale_tensor(scale, query) / temperature
    if clamp is not None:
        logits = clamp_inclusive(logits, clamp)
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = (loss + F.cross_entropy(logits.t(), labels)) / 2
    return loss


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
) -> Tensor:
    """InfoNCE over the N x N cosine similarities of `query` (N, d) and `key` (N, d).

    Row i's positive is key i. `symmetric=True` averages the query->key and key->query cross-entropies.
    Normalisation, `scale`, `clamp`, `impl`, `process_group`, `schedule` and `timeout` follow `nt_xent`.
    Returns a 0-dim float32 loss (float64 for float64 inputs).
    """
    query = _checks.matrix("query", query, min_rows=2)
    key = _checks.matrix("key", key)
    _checks.same_layout("key", key, "query", query)
    temperature = _checks.positive_float("temperature", temperature)
    clamp = _checks.optional_clamp(clamp)
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric must be a bool, got {type(symmetric).__name__}")
    lam = _checks.scale_tensor(scale, query)
    impl = resolve_impl(impl, query.device, query.dtype, query.shape[1])
    if process_group is not None:
        from adassl_fast import distributed

        return distributed.info_nce(query, key, lam, temperature, symmetric, clamp, impl, deterministic, process_group,
                                    schedule=schedule, timeout=timeout)
    if impl == "reference":
        return info_nce_reference(query, key, temperature=temperature, scale=lam, symmetric=symmetric, clamp=clamp)
    pos = torch.arange(query.shape[0], device=query.device)
    excl = torch.full_like(pos, -1)
    loss = contrastive_loss(query, key, pos, excl, lam, temperature, clamp, impl, deterministic)
    if symmetric:
        loss = (loss + contrastive_loss(key, query, pos, excl, lam, temperature, clamp, impl, deterministic)) / 2
    return loss
