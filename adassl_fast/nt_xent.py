"""NT-Xent (SimCLR) as AdaSSL uses it: edited rows `cont` against target columns `targ` (docs/spec.md 2.1, 3.1).

The reference (the authors' materialising semantics, the oracle) and the functional form. The functional
form runs the nt_xent core op (adassl_fast/core.py) with nt_xent's partner indices: each row's positive is
its own index, its excluded column the other view of the same pair.

The torch backend has two schedules, chosen by rule in `core.contrastive_loss` (`trains_in_one_pass`): when
a gradient is needed (grad mode on, some input requires grad, not under torch.compile) one pass forms each
logit block once and yields the loss and the gradients together (3 GEMMs per block; the op stashes the
gradients for the backward, which scales them by grad_output); otherwise the forward computes statistics
alone (1 GEMM per block) and the backward forms the blocks again from the saved LSEs (3 more). The double
backward (a create_graph backward) always takes the two-pass backward. docs/backends.md has the table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from adassl_fast import _checks, distributed
from adassl_fast._dispatch import resolve_impl
from adassl_fast.core import clamp_inclusive, contrastive_loss, unit_rows
from adassl_fast.indices import partner_indices

# ----------------------------------------------------------------------------------------------------
# Reference: the authors' computation, materialising the M x M logits.


def correlated_mask(batch: int, device=None) -> Tensor:
    """(2B, 2B) bool: False on the diagonal and on the diagonals of the two off-diagonal B x B blocks."""
    n = 2 * batch
    idx = torch.arange(n, device=device)
    mask = torch.ones(n, n, dtype=torch.bool, device=device)
    mask[idx, idx] = False
    mask[idx, (idx + batch) % n] = False
    return mask


def nt_xent_reference(cont: Tensor, targ: Tensor, *, temperature: float = 0.1, scale=None, clamp=20.0,
                      normalize: bool = True, negatives: Tensor | None = None) -> Tensor:
    """The authors' NT-Xent: cont (M, d) rows, targ (M, d) columns, M = 2B -> 0-dim loss; `negatives` (K, d):
    K more columns every row is contrasted with.

    Low-precision inputs are upcast to float32 (the reference's cross-entropy runs in float32 under AMP).
    """
    cols = targ if negatives is None else torch.cat([targ, negatives])
    logits = unit_rows(cont, normalize) @ unit_rows(cols, normalize).t() * _checks.scale_tensor(scale, cont)
    logits = logits / temperature
    if clamp is not None:
        logits = clamp_inclusive(logits, clamp)
    n = logits.shape[0]
    square, extra = logits[:, :n], logits[:, n:]
    positives = square.diagonal().unsqueeze(1)
    in_batch = square[correlated_mask(n // 2, logits.device)].view(n, n - 2)
    labels = torch.zeros(n, dtype=torch.long, device=logits.device)
    return F.cross_entropy(torch.cat([positives, in_batch, extra], dim=1), labels)


# ----------------------------------------------------------------------------------------------------
# Functional form.


def nt_xent(
    cont: Tensor,
    targ: Tensor,
    *,
    temperature: float = 0.1,
    scale=None,
    clamp: float | None = 20.0,
    impl: str = "auto",
    process_group=None,
    deterministic: bool = True,
    schedule: str | None = None,
    timeout: float | None = None,
    normalize: bool = True,
    negatives: Tensor | None = None,
) -> Tensor:
    """AdaSSL's NT-Xent loss (docs/spec.md 2.1) without materialising the M x M logits.

    Args:
        cont: (M, d) edited / predicted rows `[x_hat; y_hat]`, M = 2B even.
        targ: (M, d) target rows `[e_x; e_y]`, same dtype and device.
        temperature: tau > 0.
        scale: None (1), a float, or a 0-dim tensor lambda (receives a gradient).
        clamp: logits are clamped to [-clamp, clamp] (inclusive gradient indicator); None disables.
        impl: "auto", "reference", "torch", "triton" or "cuda".
        process_group: a torch.distributed group: negatives are the rows of every rank (docs/api.md).
        deterministic: fused backends use the atomic-free backward (bitwise reproducible) when True.
        schedule: with `process_group`: "ring" (default; per-rank memory independent of the world size) or
            "gather" (one all-gather, memory O(global rows x d)); see adassl_fast/distributed.py.
        timeout: with `process_group`: seconds after which a stuck collective raises DistributedError.
        normalize: L2-normalise the rows of cont, targ (and negatives) first; False takes them as given.
        negatives: (K, d) extra columns (a queue / memory bank) every row is also contrasted with, same dtype
            and device; they receive gradients if they require them (detach a queue). Not with process_group.

    Returns:
        0-dim loss, float32 (float64 for float64 inputs): the mean over rows of the cross-entropy of
        row i against positive column i, with column (i + B) mod M excluded.
    """
    cont = _checks.matrix("cont", cont, min_rows=2)
    targ = _checks.matrix("targ", targ)
    _checks.same_layout("targ", targ, "cont", cont)
    if cont.shape[0] % 2:
        raise ValueError(f"cont must have an even number of rows M = 2B (pairs stacked), got M = {cont.shape[0]}")
    temperature = _checks.positive_float("temperature", temperature)
    clamp = _checks.optional_clamp(clamp)
    normalize = _checks.flag("normalize", normalize)
    negatives = _checks.extra_columns("negatives", negatives, "targ", targ, process_group)
    lam = _checks.scale_tensor(scale, cont)
    impl = resolve_impl(impl, cont.device, cont.dtype, cont.shape[1])
    if process_group is not None:
        return distributed.nt_xent(cont, targ, lam, temperature, clamp, impl, deterministic, process_group,
                                   schedule=schedule, timeout=timeout, normalize=normalize)
    if impl == "reference":
        return nt_xent_reference(cont, targ, temperature=temperature, scale=lam, clamp=clamp, normalize=normalize,
                                 negatives=negatives)
    pos, excl = partner_indices(cont.shape[0], cont.device)
    cols = targ if negatives is None else torch.cat([targ, negatives])
    return contrastive_loss(cont, cols, pos, excl, lam, temperature, clamp, impl, deterministic, normalize)
