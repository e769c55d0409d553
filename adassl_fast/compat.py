"""Drop-in classes for OpenCLIP and lightly users (docs/api.md, "Drop-in classes"): the peers' constructor and
forward signatures and the same functions (values and gradients, float64 tests in tests/test_compat.py),
computed by adassl_fast's ops.

- `ClipLoss`, `SigLipLoss`: OpenCLIP 3.x (`open_clip.loss`). The features are taken as given (the model
  normalised them), `logit_scale` is already exponentiated: the ops run with normalize=False, temperature 1
  and scale = logit_scale.
- `NTXentLoss`: lightly 1.5 / 1.6 (`lightly.loss.NTXentLoss`), memory bank included.

Distributed (world_size > 1, or gather_distributed): the ops' `process_group` is torch.distributed's default
group. Which combinations give the peer's per-rank gradients, and which values differ, is stated per class.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from adassl_fast import _checks
from adassl_fast._dispatch import resolve_impl
from adassl_fast.core import nt_xent_backward_op, nt_xent_forward_op, unit_rows
from adassl_fast.info_nce import info_nce
from adassl_fast.nt_xent import nt_xent
from adassl_fast.siglip import siglip

SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def _scalar(value):
    """OpenCLIP's logit_scale / logit_bias as the ops take them: a one-element tensor of any shape as 0-dim."""
    return value.reshape(()) if isinstance(value, Tensor) and value.dim() and value.numel() == 1 else value


def _check_world(rank, world_size) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size), got {rank!r}")


def _world_group(rank: int, world_size: int, who: str):
    """torch.distributed's default group for world_size > 1 (checked against the given rank), else None."""
    if world_size == 1:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{who}: world_size={world_size} but torch.distributed is not initialised")
    if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        raise ValueError(f"{who}: rank={rank}, world_size={world_size} but torch.distributed's default group has "
                         f"rank {dist.get_rank()} of {dist.get_world_size()}")
    return dist.group.WORLD


def _gather_others(x: Tensor, rank: int, world_size: int) -> Tensor:
    """Every other rank's rows of x (equal sizes, rank order), gathered without gradient."""
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts[:rank] + parts[rank + 1:])


class _Regrade(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by `factor`, then (average=True) replaces it by its
    mean over the default group: how a peer's per-rank gradients differ from adassl_fast's convention."""

    @staticmethod
    def forward(ctx, x, factor, average):
        ctx.factor, ctx.average = factor, average
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad * ctx.factor
        if ctx.average:
            grad = grad.contiguous()
            dist.all_reduce(grad)
            grad = grad / dist.get_world_size()
        return grad, None, None


class ClipLoss(nn.Module):
    """OpenCLIP's `ClipLoss`: (CE(logits_per_image, labels) + CE(logits_per_text, labels)) / 2 with
    logits_per_image = logit_scale * image_features @ text_features.T (+ logit_bias, which no cross-entropy
    sees: it gets a zero gradient), labels = arange(N); the symmetric `info_nce` with normalize=False.

    forward(image_features (N, d), text_features (N, d), logit_scale (0-dim, already exponentiated),
    logit_bias=None, output_dict=False) -> the loss, or {"contrastive_loss": loss}. `cache_labels` has no
    effect (no label tensor is built). `impl` (keyword only) picks the backend as for the ops.

    world_size > 1 runs the distributed op on the default group (equal local batches, as OpenCLIP's
    all_gather needs). adassl_fast's convention (docs/api.md 4) gives each rank world_size x the global loss's
    gradients; per (local_loss, gather_with_grad):
    - (False, True): OpenCLIP's per-rank gradients exactly; every rank returns the global loss, as OpenCLIP.
    - (True, True): the features' and logit_scale's per-rank gradients exactly; the value returned is the
      global loss (OpenCLIP returns each rank's local loss, whose mean over ranks it equals).
    - (False, False): exact too: OpenCLIP's features get 1 / world_size of the above and logit_scale the mean
      over ranks (a backward all-reduce of one number does that here).
    - (True, False): each direction's local rows against every rank's columns, all columns detached (OpenCLIP
      gathers them without gradient, its own rank's included): values and gradients exactly (one all-gather,
      then the one-directional op with `negatives`, on the whole gathered batch's memory O(N d)).
    use_horovod=True raises ValueError: only torch.distributed is supported.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, impl: str = "auto"):
        super().__init__()
        if use_horovod:
            raise ValueError("ClipLoss(use_horovod=True) is not supported: adassl_fast's distributed losses run on "
                             "torch.distributed (initialise it and pass rank / world_size)")
        self.local_loss = _checks.flag("local_loss", local_loss)
        self.gather_with_grad = _checks.flag("gather_with_grad", gather_with_grad)
        self.cache_labels = _checks.flag("cache_labels", cache_labels)
        _check_world(rank, world_size)
        self.rank, self.world_size, self.use_horovod, self.impl = rank, world_size, use_horovod, impl

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
                output_dict: bool = False):
        group = _world_group(self.rank, self.world_size, "ClipLoss")
        scale = _scalar(logit_scale)
        common = dict(temperature=1.0, scale=scale, normalize=False, impl=self.impl)
        if group is not None and self.local_loss and not self.gather_with_grad:
            others = lambda x: _gather_others(x, self.rank, self.world_size)
            # OpenCLIP's gathered copies carry no gradient, its own rank's included: only the rows are trained
            loss = (info_nce(image_features, text_features.detach(), symmetric=False,
                             negatives=others(text_features), **common)
                    + info_nce(text_features, image_features.detach(), symmetric=False,
                               negatives=others(image_features), **common)) / 2
        else:
            if group is not None and not self.local_loss:
                if not self.gather_with_grad:
                    image_features = _Regrade.apply(image_features, 1.0 / self.world_size, False)
                    text_features = _Regrade.apply(text_features, 1.0 / self.world_size, False)
                if isinstance(scale, Tensor) and scale.requires_grad:
                    scale = _Regrade.apply(scale, 1.0, True)
                common["scale"] = scale
            loss = info_nce(image_features, text_features, symmetric=True, process_group=group, **common)
        if isinstance(logit_bias, Tensor):
            loss = loss + 0.0 * logit_bias.sum()  # a shift of every logit leaves each cross-entropy unchanged
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """OpenCLIP's `SigLipLoss`: -sum_ij log sigmoid(z_ij (logit_scale <x_i, y_j> + logit_bias)) / N with
    z = 2 I - 1 over the N image rows and the text columns, features as given: `siglip` with normalize=False.

    forward(image_features (N, d), text_features (N, d), logit_scale, logit_bias, output_dict=False); logit_bias
    None means 0. `cache_labels` has no effect; `dist_impl` ("bidir", "shift", "reduce", "gather", default
    "bidir") is checked as OpenCLIP does, and every one computes the same function: here adassl_fast's ring or
    gather schedule runs whichever is named (docs/api.md 4).

    world_size > 1: OpenCLIP's rank r returns its local image rows against every rank's text, divided by its N;
    its text features receive gradients from every rank's loss. adassl_fast gives exactly those per-rank
    gradients (features, logit_scale, logit_bias); the value returned is the global loss (the mean over ranks
    of OpenCLIP's per-rank values).
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl: str | None = None,
                 *, impl: str = "auto"):
        super().__init__()
        dist_impl = dist_impl or "bidir"
        if dist_impl not in SIGLIP_DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {', '.join(map(repr, SIGLIP_DIST_IMPLS))}, got {dist_impl!r}")
        self.cache_labels = _checks.flag("cache_labels", cache_labels)
        _check_world(rank, world_size)
        self.rank, self.world_size, self.dist_impl, self.impl = rank, world_size, dist_impl, impl

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias,
                output_dict: bool = False):
        group = _world_group(self.rank, self.world_size, "SigLipLoss")
        bias = 0.0 if logit_bias is None else _scalar(logit_bias)
        loss = siglip(image_features, text_features, scale=_scalar(logit_scale),
                      bias=bias, normalize=False, impl=self.impl, process_group=group)
        return {"contrastive_loss": loss} if output_dict else loss


class _PositiveAndBank(torch.autograd.Function):
    """mean_i [log(exp(s_i) + sum_k exp(S_ik)) - s_i] with s_i = <q_i, k_i> / tau (row i's positive) and
    S = Q B^T / tau against the bank's K rows: MoCo's loss (no in-batch negatives), on rows as given.

    The bank part is the nt_xent core with no positive column (pos = -1); its backward, given the LSE over the
    bank AND the positive, yields that part's exact gradients (as the distributed ring does with a global LSE);
    the positive's share is O(B d) elementwise work here.
    """

    @staticmethod
    def forward(ctx, q, k, bank, inv_temperature, impl):
        none = torch.full((q.shape[0],), -1, dtype=torch.int64, device=q.device)
        one = _checks.constant(1.0, _checks.accumulation_dtype(q.dtype), q.device)
        _, lse_bank = nt_xent_forward_op(q, bank, none, none, one, inv_temperature, None, impl, True, False)
        qa, ka = unit_rows(q, False), unit_rows(k, False)
        s = torch.linalg.vecdot(qa, ka) * inv_temperature
        lse = torch.logaddexp(lse_bank, s)
        ctx.save_for_backward(q, k, bank, one, none, lse, s)
        ctx.inv_temperature, ctx.impl = inv_temperature, impl
        return (lse - s).mean()

    @staticmethod
    def backward(ctx, grad):
        q, k, bank, one, none, lse, s = ctx.saved_tensors
        dq, dbank, _ = nt_xent_backward_op(grad, q, bank, none, none, one, lse, ctx.inv_temperature, None, ctx.impl,
                                           True, False)
        weight = (grad * (torch.exp(s - lse) - 1) / q.shape[0] * ctx.inv_temperature).unsqueeze(1)
        qa, ka = unit_rows(q, False), unit_rows(k, False)
        dq = dq + (weight * ka).to(q.dtype)
        dk = (weight * qa).to(k.dtype)
        return dq, dk, dbank if ctx.needs_input_grad[2] else None, None, None


class NTXentLoss(nn.Module):
    """lightly's `NTXentLoss(temperature=0.5, memory_bank_size=0, gather_distributed=False)`, forward(out0, out1)
    with out0, out1 (B, d) the two views' projections; both are L2-normalised first.

    memory_bank_size 0 (or (0, ...)): SimCLR's loss over the 2B rows (each row against the 2B - 1 others, its
    own similarity excluded): `adassl_fast.nn.NTXentLoss`'s. gather_distributed=True with an initialised group
    of more than one rank: every rank's rows are negatives (the distributed op); lightly's per-rank gradients
    exactly, the value the global loss (lightly returns each rank's local rows' loss; the mean over ranks agrees).

    memory_bank_size K > 0 (an int: d taken from the first batch; or (K, d)): MoCo's loss. The bank (buffer
    `bank` (K, d), non-persistent as lightly's) starts as random normal rows, normalised; each forward
    contrasts out0's row i with out1's row i (the positive) and the K bank rows (no in-batch negatives), using
    the bank as it was BEFORE this call; then, only if out0 requires grad, the normalised out1 (detached;
    gathered from every rank first with gather_distributed) is written FIFO at `bank_ptr`, a batch that
    overruns the end filling it and dropping its remainder, the pointer back to 0. The bank never receives
    gradients; the loss is each rank's own (no cross-rank gradient), as lightly's.
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size=0, gather_distributed: bool = False, *,
                 impl: str = "auto"):
        super().__init__()
        self.temperature = _checks.positive_float("temperature", temperature)
        size = (memory_bank_size,) if isinstance(memory_bank_size, int) else tuple(memory_bank_size)
        if not size or len(size) > 2 or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in size):
            raise ValueError(f"memory_bank_size must be an int K >= 0 or a tuple (K, d) of them, got "
                             f"{memory_bank_size!r}")
        self.memory_bank_size = memory_bank_size
        self.size = size
        self.gather_distributed = _checks.flag("gather_distributed", gather_distributed)
        self.impl = impl
        self.register_buffer("bank", torch.empty(size, dtype=torch.float), persistent=False)
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long), persistent=False)
        if len(size) == 2 and size[0] > 0:
            self._init_bank(size)

    @torch.no_grad()
    def _init_bank(self, size) -> None:
        self.bank = F.normalize(torch.randn(size, dtype=self.bank.dtype, device=self.bank.device), dim=-1)
        self.bank_ptr.zero_()

    @torch.no_grad()
    def _enqueue(self, batch: Tensor) -> None:
        if self._group() is not None:
            parts = [torch.empty_like(batch) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, batch.contiguous())
            batch = torch.cat(parts)
        k, ptr = self.size[0], int(self.bank_ptr)
        if ptr + batch.shape[0] >= k:
            self.bank[ptr:] = batch[: k - ptr]
            self.bank_ptr.zero_()
        else:
            self.bank[ptr : ptr + batch.shape[0]] = batch
            self.bank_ptr += batch.shape[0]

    def _group(self):
        distributed = self.gather_distributed and dist.is_available() and dist.is_initialized()
        return dist.group.WORLD if distributed and dist.get_world_size() > 1 else None

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        if not isinstance(out0, Tensor) or not isinstance(out1, Tensor) or out0.shape != out1.shape:
            raise ValueError("out0 and out1 must be tensors of the same shape (B, d)")
        if self.size[0] == 0:
            return nt_xent(torch.cat([out1, out0]), torch.cat([out0, out1]), temperature=self.temperature,
                           clamp=None, impl=self.impl, process_group=self._group())
        out0 = _checks.matrix("out0", out0)
        out1 = _checks.matrix("out1", out1)
        if self.bank.dim() == 1:
            self._init_bank((self.size[0], out0.shape[1]))
        impl = resolve_impl(self.impl, out0.device, out0.dtype, out0.shape[1])
        u0, u1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
        negatives = self.bank.to(out0.dtype, copy=True)  # a copy: the update below must not change it
        if out0.requires_grad:
            self._enqueue(u1.detach())
        if impl == "reference":
            return moco_reference(u0, u1, negatives, self.temperature)
        return _PositiveAndBank.apply(u0, u1, negatives, 1.0 / self.temperature, impl)


def moco_reference(q: Tensor, k: Tensor, bank: Tensor, temperature: float) -> Tensor:
    """MoCo's loss by materialising the (B, 1 + K) logits [<q_i, k_i>, q_i B^T] / tau (rows as given)."""
    q, k, bank = unit_rows(q, False), unit_rows(k, False), unit_rows(bank, False)
    logits = torch.cat([torch.linalg.vecdot(q, k).unsqueeze(1), q @ bank.t()], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
