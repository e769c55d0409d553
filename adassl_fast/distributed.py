"""Negatives from every rank: `nt_xent`, `info_nce`, `adassl_nt_xent` and `siglip` over a torch.distributed group.

The functional ops call into this module when `process_group` is given (docs/api.md 4). Everything
travels through torch.distributed (NCCL on GPUs, gloo on CPUs); the per-block work is the nt_xent core of
whichever backend runs (`nt_xent_forward_op` / `nt_xent_backward_op`, docs/backends.md).

Semantics
---------
The global batch is defined pair by pair. `nt_xent`: rank r passes `cont_r = [x_hat_r; y_hat_r]` and
`targ_r = [e_x_r; e_y_r]` (B_r pairs); the global problem is `nt_xent(cat(x_hat of all ranks, y_hat of all
ranks), cat(e_x of all ranks, e_y of all ranks))`, so each local row keeps its own positive and its own
excluded column. `info_nce` and `adassl_nt_xent`: each input concatenated in rank order. Every rank returns
the global loss. The gradients returned for the local inputs (and for `scale`) are world_size times the
global loss's gradients for those rows (for `scale`: world_size times the share of the local rows), so that
DistributedDataParallel's averaging of parameter gradients reproduces the single-process gradients on the
global batch exactly. Without DDP (no averaging), divide the parameter gradients by world_size yourself.

Unequal local batch sizes are supported: a first, tiny all-gather of metadata carries every rank's row count
(and checks that every rank passes the same op, dtype, feature dimension and options: a mismatch raises a
ValueError on every rank naming the ranks and their values). Ragged blocks are padded only in transit.

Schedules (`schedule=`, default "ring"; ADASSL_FAST_SCHEDULE or `DEFAULT_SCHEDULE` override the default)
-----------------------------------------------------------------------------------------------------
- "gather": all-gather the column rows of every rank once in the forward, one core call of the local rows
  against all columns, and a reduce-scatter of the column gradients in the backward. Two collectives,
  the fewest messages, best for small world sizes or latency-bound (small) batches. Per-rank memory
  O(global rows x d): the gathered columns are kept for the backward, plus their gradient.
- "ring": the column rows travel around the ring in blocks (one block = one rank's local columns) with
  `batch_isend_irecv`; the transfer of the next block overlaps the core call on the block in hand. Forward:
  per-block row LSEs (pos = -1 for rows whose positive is not in the block) merged with logaddexp into the
  global row LSE. Backward: the core backward per block with the GLOBAL LSE gives the exact row-gradient
  share and the block's column-gradient share; the latter rides around the ring with its block (in the
  accumulation dtype) and arrives at its owner after one lap. Per-rank memory O(local rows x d) plus a
  constant number of blocks, independent of world size (docs/api.md's memory contract). 2 (W - 1) block
  transfers per forward + backward instead of two collectives: it hides communication once the per-block
  compute exceeds the per-block transfer time (`bench/scaling.py` prints the cost model's thresholds).

Failure behaviour
-----------------
Every collective and point-to-point transfer here is issued asynchronously and waited with a timeout:
`timeout=` (seconds) when given, else ADASSL_FAST_DIST_TIMEOUT / `DEFAULT_TIMEOUT`, else the process
group's own timeout (`torch.distributed.init_process_group(..., timeout=datetime.timedelta(seconds=...))`,
30 min by default for gloo, 10 min for NCCL). A rank that dies makes its peers fail at once (gloo: the
connection closes); a rank that raises and stays alive, or never calls the op, makes them fail when the
timeout expires. Either way they raise `DistributedError` saying which op, schedule, step and rank. The
group is unusable afterwards: destroy it and restart the job. On NCCL the timeout on the CPU side needs
TORCH_NCCL_BLOCKING_WAIT=1; otherwise NCCL's watchdog enforces the group timeout and aborts the process.

Ordering: the ops' backward communicates too, on the group given. Every rank must run the same losses in
the same order (autograd's order is deterministic for the same graph, so DDP's own all-reduces interleave
identically on every rank); a dedicated group for the losses (`torch.distributed.new_group()`) keeps
them apart from DDP's gradient buckets altogether.

impl="reference" runs the torch backend's kernels here (the reference is a single-process oracle).
`adassl_nt_xent` runs the torch backend's latent prologue on the local rows whatever `impl` is, and the
core calls on the edited rows with `impl` (see `_EditedRows` for why).

The autograd.Functions here sit beside the registered ops because their forward and backward communicate:
one op call covers one block of columns, and the schedule (gather or ring, the loss all-reduce, the
column-gradient reduce-scatter or lap) lives between those calls.
"""

from __future__ import annotations

import datetime
import math
import os
import struct
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from adassl_fast import _checks
from adassl_fast._library import unsupported_backward
from adassl_fast.core import nt_xent_backward_op, nt_xent_forward_op
from adassl_fast.indices import diagonal_indices, partner_indices
from adassl_fast.torch_backend import edited_rows, nt_xent_backward, nt_xent_forward, prologue_backward, siglip_blocks

SCHEDULES = ("gather", "ring")
DEFAULT_SCHEDULE: str | None = None  # None: ADASSL_FAST_SCHEDULE, else "ring"
DEFAULT_TIMEOUT: float | None = None  # seconds; None: ADASSL_FAST_DIST_TIMEOUT, else the group's timeout

# What the last call held for columns from other ranks (bytes), for tests and benchmarks.
last_stats: dict = {}


class DistributedError(RuntimeError):
    """A collective of a distributed loss failed or timed out (a peer died, raised or is not calling it)."""


def resolve_schedule(schedule: str | None = None) -> str:
    if schedule is None:
        schedule = DEFAULT_SCHEDULE or os.environ.get("ADASSL_FAST_SCHEDULE") or "ring"
    if schedule not in SCHEDULES:
        raise ValueError(f'schedule must be "gather" or "ring", got {schedule!r}')
    return schedule


def resolve_timeout(timeout: float | None = None) -> float | None:
    if timeout is None:
        timeout = DEFAULT_TIMEOUT
    if timeout is None:
        env = os.environ.get("ADASSL_FAST_DIST_TIMEOUT", "")
        timeout = float(env) if env else None
    if timeout is not None:
        timeout = _checks.positive_float("timeout", float(timeout))
    return timeout


# ----------------------------------------------------------------------------------------------------
# Plumbing: waits with a timeout and a clear error, metadata agreement, ragged gather / reduce-scatter.


_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class _Comm:
    op: str
    group: object
    rank: int
    world: int
    schedule: str
    timeout: float | None

    def peer(self, offset: int) -> int:
        return (self.rank + offset) % self.world

    def wait(self, works, what: str) -> None:
        limit = None if self.timeout is None else datetime.timedelta(seconds=self.timeout)
        for work in works or ():
            try:
                if limit is None:
                    work.wait()
                else:
                    work.wait(limit)
            except Exception as exc:
                within = "" if self.timeout is None else f" within {self.timeout:g} s"
                raise DistributedError(
                    f"adassl_fast.distributed.{self.op} ({self.schedule} schedule) on rank {self.rank} of "
                    f"{self.world}: {what} did not complete{within}: {type(exc).__name__}: {exc}. A peer rank "
                    "probably died, raised, or is not calling the same op; the process group is unusable now "
                    "(destroy it and restart the job)."
                ) from exc

    def all_reduce(self, t: Tensor, what: str) -> Tensor:
        t = t.clone()
        self.wait([dist.all_reduce(t, group=self.group, async_op=True)], what)
        return t

    def p2p(self, sends, recvs, what: str):
        """Post sends to rank + 1 and receives from rank - 1 (tag = position); returns the works."""
        nxt, prv = self.peer(1), self.peer(-1)
        ops = [dist.P2POp(dist.isend, t, group=self.group, group_peer=nxt, tag=i) for i, t in enumerate(sends)]
        ops += [dist.P2POp(dist.irecv, t, group=self.group, group_peer=prv, tag=i) for i, t in enumerate(recvs)]
        if not ops:
            return []
        try:
            return dist.batch_isend_irecv(ops)
        except Exception as exc:
            raise DistributedError(
                f"adassl_fast.distributed.{self.op} ({self.schedule} schedule) on rank {self.rank}: posting "
                f"{what} failed: {type(exc).__name__}: {exc}"
            ) from exc


_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
_OP_CODES = {"nt_xent": 1, "info_nce": 2, "adassl_nt_xent": 3, "siglip": 4}
_META_FIELDS = 12


def _float_bits(x: float | None) -> int:
    return struct.unpack("<q", struct.pack("<d", math.nan if x is None else float(x)))[0]


def _bits_float(b: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(b)))[0]


def _agree(comm: _Comm, device: torch.device, fields: list[tuple[str, int, str]]) -> list[list[int]]:
    """All-gather one int64 per field; fields are (description, value, kind) with kind "same" (must match on
    every rank), "float" (a float's bits, must match) or "rows" (may differ). Returns every rank's values."""
    # A fixed length, so that ranks calling different ops still exchange the same number of bytes.
    values = [v for _, v, _ in fields] + [0] * (_META_FIELDS - len(fields))
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    table = torch.empty((comm.world * _META_FIELDS,), dtype=torch.int64, device=device)
    comm.wait([_all_gather_single(table, mine, group=comm.group, async_op=True)], "the metadata all-gather")
    rows = table.view(comm.world, _META_FIELDS).cpu().tolist()
    for j, (name, _, kind) in enumerate(fields):
        values = [row[j] for row in rows]
        if kind == "rows" or len(set(values)) == 1:
            continue
        show = {
            "float": lambda b: repr(_bits_float(b)).replace("nan", "None"),
            "dtype": lambda c: str({v: k for k, v in _DTYPE_CODES.items()}.get(c, c)),
            "op": lambda c: {v: k for k, v in _OP_CODES.items()}.get(c, str(c)),
            "schedule": lambda c: SCHEDULES[c] if 0 <= c < len(SCHEDULES) else str(c),
        }.get(kind, str)
        listing = ", ".join(f"rank {r}: {show(v)}" for r, v in enumerate(values))
        raise ValueError(
            f"adassl_fast.distributed.{comm.op}: the ranks disagree on {name} ({listing}); every rank of the "
            "group must call the same op with the same dtype, feature dimension and options"
        )
    return rows


def _metadata(comm, device, dtype, d, options, row_counts) -> list[list[int]]:
    """Check agreement across ranks and return, for each named row count, its value on every rank."""
    fields = [
        ("the op", _OP_CODES[comm.op], "op"),
        ("the dtype", _DTYPE_CODES[dtype], "dtype"),
        ("the feature dimension d", int(d), "same"),
        ("the schedule", SCHEDULES.index(comm.schedule), "schedule"),
        ("the device type", 1 if device.type == "cuda" else 0, "same"),
    ]
    for name, value in options:
        is_float = value is None or isinstance(value, float)
        fields.append((name, _float_bits(value) if is_float else int(value), "float" if is_float else "same"))
    start = len(fields)
    fields += [(name, int(n), "rows") for name, n in row_counts]
    rows = _agree(comm, device, fields)
    return [[row[start + j] for row in rows] for j in range(len(row_counts))]


# ----------------------------------------------------------------------------------------------------
# The engine: local rows against the columns of every rank, for one or more "problems" sharing tensors.


@dataclass
class _Problem:
    rows: int  # index of the row tensor among the local tensors
    cols: int  # index of the column tensor
    pos: Tensor  # (M_r,) positive column of each row inside the OWN block (local index)
    excl: Tensor  # (M_r,) excluded column inside the own block, or -1
    coef: float  # weight of one row's (lse - positive) in the global loss, e.g. 1 / M_global


@dataclass
class _Plan:
    comm: _Comm
    sizes: list  # sizes[t][s]: rows of local tensor t on rank s
    problems: list
    inv_temperature: float
    clamp: float | None
    impl: str
    deterministic: bool
    col_tensors: list = field(default_factory=list)
    # SigLIP (docs/spec.md 2.11): normalize's value, and `scale` holds (scale, bias); None: the nt_xent core.
    # Its blocks are sums of elementwise terms (`torch_backend.siglip_blocks`, positives = the column offset of
    # the row's own key, None off its block): no row statistic, so an "LSE" slot carries the block sums.
    siglip_normalize: bool | None = None
    # info_nce(labels=): every rank's labels in rank order (N_global,) and the local rows' global counts of
    # positives; the blocks run the torch backend's core with label-defined positives (docs/spec.md 2.12).
    labels: Tensor | None = None
    label_counts: Tensor | None = None
    normalize: bool = True  # the nt_xent core's: False takes the rows as given

    def block_labels(self, p, src: int | None):
        """(row labels, column labels, row counts) of problem p's local rows against rank src's block of
        columns (None: every rank's columns, the gather schedule)."""
        rows = self.labels_of(self.comm.rank, p.rows)
        return rows, self.labels if src is None else self.labels_of(src, p.cols), self.label_counts

    def labels_of(self, rank: int, tensor: int) -> Tensor:
        off = _offsets(self.sizes[tensor])[rank]
        return self.labels[off : off + self.sizes[tensor][rank]]

    def __post_init__(self):
        self.col_tensors = sorted({p.cols for p in self.problems})


def _offsets(sizes: list[int]) -> list[int]:
    out = [0]
    for n in sizes[:-1]:
        out.append(out[-1] + n)
    return out


def _shift(idx: Tensor, off: int) -> Tensor:
    return torch.where(idx >= 0, idx + off, idx)


def _gather_rows(comm: _Comm, t: Tensor, sizes: list[int]) -> Tensor:
    """cat over ranks of each rank's rows of a ragged tensor (all-gather with padding in transit)."""
    big = max(sizes)
    send = t
    if t.shape[0] != big:
        send = t.new_zeros((big, t.shape[1]))
        send[: t.shape[0]] = t
    out = t.new_empty((comm.world * big, t.shape[1]))
    comm.wait([_all_gather_single(out, send, group=comm.group, async_op=True)], "the column all-gather")
    if all(n == big for n in sizes):
        return out
    return torch.cat([out[s * big : s * big + n] for s, n in enumerate(sizes)])


def _reduce_scatter_rows(plan: _Plan, g: Tensor, sizes: list[int]) -> Tensor:
    """Sum over ranks of g (global rows, d), each rank keeping its own rows (ragged reduce-scatter)."""
    comm, big = plan.comm, max(sizes)
    if any(n != big for n in sizes):
        padded = g.new_zeros((comm.world * big, g.shape[1]))
        for s, (off, n) in enumerate(zip(_offsets(sizes), sizes, strict=True)):
            padded[s * big : s * big + n] = g[off : off + n]
        g = padded
    out = g.new_empty((big, g.shape[1]))
    work = _reduce_scatter_single(out, g.contiguous(), group=comm.group, async_op=True)
    comm.wait([work], "the column-gradient reduce-scatter")
    return out[: sizes[comm.rank]]


def _kernel_impl(impl: str) -> str:
    return "torch" if impl == "reference" else impl


def _block_forward(plan, p, rows, cols, pos, excl, scale, positives, src=None):
    """(the block's share of the rows' summed loss terms, its LSE: the row LSEs, or for SigLIP that share).
    positives: SigLIP's column offset of the rows' own keys (None: not in this block); src: the block's rank."""
    if plan.siglip_normalize is not None:
        total = siglip_blocks(rows, cols, scale, plan.siglip_normalize, positives=positives)[0]
        return total, total
    if plan.labels is not None:
        # (the torch backend's core: only it has label-defined positives)
        loss, lse = nt_xent_forward(rows, cols, pos, excl, scale, plan.inv_temperature, plan.clamp,
                                    plan.block_labels(p, src), normalize=plan.normalize)
        return loss * rows.shape[0], lse
    loss, lse = nt_xent_forward_op(rows, cols, pos, excl, scale, plan.inv_temperature, plan.clamp,
                                   _kernel_impl(plan.impl), plan.deterministic, plan.normalize)
    return loss * rows.shape[0], lse


def _block_backward(plan, p, weight, rows, cols, pos, excl, scale, lse, positives, src=None):
    """(drows, dcols, dscale) of weight x the block's summed loss terms."""
    if plan.siglip_normalize is not None:
        return siglip_blocks(rows, cols, scale, plan.siglip_normalize, positives=positives, loss=False,
                             grad_weight=weight)[1:]
    if plan.labels is not None:
        return nt_xent_backward(weight * rows.shape[0], rows, cols, pos, excl, scale, lse, plan.inv_temperature,
                                plan.clamp, True, labels=plan.block_labels(p, src), normalize=plan.normalize)
    return nt_xent_backward_op(weight * rows.shape[0], rows, cols, pos, excl, scale, lse, plan.inv_temperature,
                               plan.clamp, _kernel_impl(plan.impl), plan.deterministic, plan.normalize)


def _forward_gather(plan, scale, tensors):
    comm = plan.comm
    gathered = {c: _gather_rows(comm, tensors[c], plan.sizes[c]) for c in plan.col_tensors}
    last_stats.update(schedule="gather", column_bytes=sum(g.numel() * g.element_size() for g in gathered.values()))
    total, lses, idx = None, [], []
    for p in plan.problems:
        off = _offsets(plan.sizes[p.cols])[comm.rank]
        pos, excl = _shift(p.pos, off), _shift(p.excl, off)
        summed, lse = _block_forward(plan, p, tensors[p.rows], gathered[p.cols], pos, excl, scale, off)
        part = summed * p.coef
        total = part if total is None else total + part
        lses.append(lse)
        idx.append((pos, excl))
    return total, lses, (gathered, idx)


def _backward_gather(plan, scale, tensors, lses, saved, grad_out):
    comm = plan.comm
    gathered, idx = saved
    acc = lses[0].dtype
    grads = [None] * len(tensors)
    col_grads = {}
    dscale = torch.zeros((), dtype=scale.dtype, device=scale.device)
    add = lambda cur, g: g.to(acc) if cur is None else cur + g
    for p, lse, (pos, excl) in zip(plan.problems, lses, idx, strict=True):
        g = grad_out.to(acc) * (comm.world * p.coef)
        off = _offsets(plan.sizes[p.cols])[comm.rank]
        drows, dcols, ds = _block_backward(plan, p, g, tensors[p.rows], gathered[p.cols], pos, excl, scale, lse,
                                           off)
        grads[p.rows] = add(grads[p.rows], drows)
        col_grads[p.cols] = add(col_grads.get(p.cols), dcols)
        dscale = dscale + ds
    for c, g in col_grads.items():
        grads[c] = add(grads[c], _reduce_scatter_rows(plan, g, plan.sizes[c]))
    return grads, dscale


def _ring_buffers(plan, tensors, dtype=None):
    return {
        c: tensors[c].new_empty((max(plan.sizes[c]), tensors[c].shape[1]), dtype=dtype or tensors[c].dtype)
        for c in plan.col_tensors
    }


def _forward_ring(plan, scale, tensors):
    comm, w = plan.comm, plan.comm.world
    held = {c: tensors[c] for c in plan.col_tensors}
    spare = _ring_buffers(plan, tensors)
    last_stats.update(schedule="ring", column_bytes=2 * sum(b.numel() * b.element_size() for b in spare.values()))
    lses = [None] * len(plan.problems)
    positives = [None] * len(plan.problems)
    minus = {p.rows: torch.full_like(p.pos, -1) for p in plan.problems}
    for k in range(w):
        src = comm.peer(-k)
        works = []
        if k < w - 1:
            nxt = comm.peer(-k - 1)
            sends = [held[c][: plan.sizes[c][src]] for c in plan.col_tensors]
            recvs = [spare[c][: plan.sizes[c][nxt]] for c in plan.col_tensors]
            works = comm.p2p(sends, recvs, f"the ring forward step {k} (block of rank {src})")
        for j, p in enumerate(plan.problems):
            own = src == comm.rank
            block = held[p.cols][: plan.sizes[p.cols][src]]
            pos, excl = (p.pos, p.excl) if own else (minus[p.rows], minus[p.rows])
            summed, lse = _block_forward(plan, p, tensors[p.rows], block, pos, excl, scale, 0 if own else None, src)
            if plan.siglip_normalize is not None:  # the blocks' sums add up; "positives" stays 0
                lses[j] = lse if lses[j] is None else lses[j] + lse
                positives[j] = torch.zeros_like(lse)
                continue
            lses[j] = lse if lses[j] is None else torch.logaddexp(lses[j], lse)
            if own or plan.labels is not None:  # sum_i S_{i,pos_i} = sum_i lse_own_i - M_r * loss_own
                # (with labels every block holds positives: their shares add up)
                share = lse.sum() - summed
                positives[j] = share if positives[j] is None else positives[j] + share
        comm.wait(works, f"the ring forward step {k} (block of rank {src})")
        if k < w - 1:
            for c in plan.col_tensors:
                fresh = spare[c]
                spare[c] = held[c] if held[c] is not tensors[c] else tensors[c].new_empty(fresh.shape)
                held[c] = fresh
    total = None
    for j, p in enumerate(plan.problems):
        part = (lses[j].sum() - positives[j]) * p.coef
        total = part if total is None else total + part
    return total, lses, None


def _backward_ring(plan, scale, tensors, lses, grad_out):
    comm, w = plan.comm, plan.comm.world
    acc = lses[0].dtype
    held = {c: tensors[c] for c in plan.col_tensors}
    spare = _ring_buffers(plan, tensors)
    acc_in = _ring_buffers(plan, tensors, acc)
    acc_out = {c: None for c in plan.col_tensors}
    grads = [None] * len(tensors)
    dscale = torch.zeros((), dtype=scale.dtype, device=scale.device)
    minus = {p.rows: torch.full_like(p.pos, -1) for p in plan.problems}
    weights = [grad_out.to(acc) * (w * p.coef) for p in plan.problems]
    for k in range(w):
        src, before = comm.peer(-k), comm.peer(-k + 1)
        sends, recvs = [], []
        if k < w - 1:  # the next block of columns
            nxt = comm.peer(-k - 1)
            sends += [held[c][: plan.sizes[c][src]] for c in plan.col_tensors]
            recvs += [spare[c][: plan.sizes[c][nxt]] for c in plan.col_tensors]
        if k > 0:  # the column-gradient accumulator of the previous block goes on; this block's comes in
            sends += [acc_out[c] for c in plan.col_tensors]
            recvs += [acc_in[c][: plan.sizes[c][src]] for c in plan.col_tensors]
        what = f"the ring backward step {k} (block of rank {src}, gradient of rank {before}'s block)"
        works = comm.p2p(sends, recvs, what)
        partial = {}
        for j, p in enumerate(plan.problems):
            own = src == comm.rank
            block = held[p.cols][: plan.sizes[p.cols][src]]
            pos, excl = (p.pos, p.excl) if own else (minus[p.rows], minus[p.rows])
            drows, dcols, ds = _block_backward(plan, p, weights[j], tensors[p.rows], block, pos, excl, scale,
                                               lses[j], 0 if own else None, src)
            grads[p.rows] = drows.to(acc) if grads[p.rows] is None else grads[p.rows] + drows
            partial[p.cols] = dcols.to(acc) if p.cols not in partial else partial[p.cols] + dcols
            dscale = dscale + ds
        comm.wait(works, what)
        for c in plan.col_tensors:
            acc_out[c] = partial[c] if k == 0 else partial[c] + acc_in[c][: plan.sizes[c][src]]
        if k < w - 1:
            for c in plan.col_tensors:
                fresh = spare[c]
                spare[c] = held[c] if held[c] is not tensors[c] else tensors[c].new_empty(fresh.shape)
                held[c] = fresh
    if w > 1:  # the last accumulator belongs to rank + 1; ours arrives from rank - 1, complete
        mine = [acc_in[c][: plan.sizes[c][comm.rank]] for c in plan.col_tensors]
        what = "the ring backward's last column-gradient transfer"
        comm.wait(comm.p2p([acc_out[c] for c in plan.col_tensors], mine, what), what)
        own = dict(zip(plan.col_tensors, mine, strict=True))
    else:
        own = acc_out
    for c in plan.col_tensors:
        grads[c] = own[c].clone() if grads[c] is None else grads[c] + own[c]
    return grads, dscale


def _refuse_double_backward(op: str) -> None:
    """With grad mode on in backward (create_graph=True) the analytic backward would be differentiated as a
    constant: refuse instead of returning wrong second-order gradients."""
    if torch.is_grad_enabled():
        raise unsupported_backward(op, "with process_group (the distributed backward is not differentiable)")


class _DistributedContrastive(torch.autograd.Function):
    """Global loss of the plan's problems; gradients world_size x the global ones for the local rows."""

    @staticmethod
    def forward(ctx, plan, scale, *tensors):
        ring = plan.comm.schedule == "ring"
        local, lses, saved = (_forward_ring if ring else _forward_gather)(plan, scale, tensors)
        total = plan.comm.all_reduce(local, "the loss all-reduce")
        ctx.plan = plan
        ctx.saved = saved
        ctx.save_for_backward(scale, *tensors, *lses)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        plan = ctx.plan
        _refuse_double_backward(plan.comm.op)
        scale, *rest = ctx.saved_tensors
        n = len(rest) - len(plan.problems)
        tensors, lses = rest[:n], rest[n:]
        if plan.comm.schedule == "ring":
            grads, dscale = _backward_ring(plan, scale, tensors, lses, grad_out)
        else:
            grads, dscale = _backward_gather(plan, scale, tensors, lses, ctx.saved, grad_out)
        ctx.saved = None
        grads = [None if g is None else g.to(t.dtype) for g, t in zip(grads, tensors, strict=True)]
        return (None, dscale if ctx.needs_input_grad[1] else None, *grads)


class _GlobalSum(torch.autograd.Function):
    """all_reduce(x) forward; world_size x grad backward (DDP averaging then gives the global gradient)."""

    @staticmethod
    def forward(ctx, comm, x):
        ctx.world = comm.world
        return comm.all_reduce(x, "the regulariser all-reduce")

    @staticmethod
    def backward(ctx, grad):
        return None, grad * ctx.world


def _comm(op, process_group, schedule, timeout) -> _Comm:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"adassl_fast.{op}: process_group given but torch.distributed is not initialised")
    return _Comm(op, process_group, dist.get_rank(process_group), dist.get_world_size(process_group),
                 resolve_schedule(schedule), resolve_timeout(timeout))


# ----------------------------------------------------------------------------------------------------
# The three ops (inputs already validated by the functional forms; lam is a 0-dim accumulation-dtype tensor).


def nt_xent(cont, targ, lam, temperature, clamp, impl, deterministic, process_group, *, schedule=None,
            timeout=None, normalize=True) -> Tensor:
    """Distributed nt_xent: rank r passes [x_hat_r; y_hat_r] and [e_x_r; e_y_r]; returns the global loss."""
    comm = _comm("nt_xent", process_group, schedule, timeout)
    options = [("temperature", float(temperature)), ("clamp", clamp), ("normalize", bool(normalize))]
    (m_sizes,) = _metadata(comm, cont.device, cont.dtype, cont.shape[1], options, [("the rows of cont", cont.shape[0])])
    pos, excl = partner_indices(cont.shape[0], cont.device)
    problem = _Problem(0, 1, pos, excl, 1.0 / sum(m_sizes))
    plan = _Plan(comm, [m_sizes, m_sizes], [problem], 1.0 / temperature, clamp, impl, deterministic,
                 normalize=normalize)
    return _DistributedContrastive.apply(plan, lam, cont, targ)


def info_nce(query, key, lam, temperature, symmetric, clamp, impl, deterministic, process_group, *, schedule=None,
             timeout=None, labels=None, normalize=True) -> Tensor:
    """Distributed CLIP-style InfoNCE: query and key (and labels) concatenated in rank order; returns the global
    loss. With labels the blocks run the torch backend's core whatever `impl` is (no other backend has them)."""
    comm = _comm("info_nce", process_group, schedule, timeout)
    options = [("temperature", float(temperature)), ("clamp", clamp), ("symmetric", bool(symmetric)),
               ("labels given", labels is not None), ("normalize", bool(normalize))]
    (n_sizes,) = _metadata(comm, query.device, query.dtype, query.shape[1], options,
                           [("the rows of query", query.shape[0])])
    pos, excl = diagonal_indices(query.shape[0], query.device)
    extra = {}
    if labels is not None:  # O(N) integers travel once: each block's column labels are a slice of them
        pos = excl = torch.full_like(pos, -1)
        every = _gather_rows(comm, labels.view(-1, 1), n_sizes).view(-1)
        _, inverse, counts = torch.unique(every, return_inverse=True, return_counts=True)
        off = _offsets(n_sizes)[comm.rank]
        extra = dict(labels=every, label_counts=counts[inverse[off : off + query.shape[0]]])
    weight = (0.5 if symmetric else 1.0) / sum(n_sizes)
    problems = [_Problem(0, 1, pos, excl, weight)]
    if symmetric:
        problems.append(_Problem(1, 0, pos, excl, weight))
    plan = _Plan(comm, [n_sizes, n_sizes], problems, 1.0 / temperature, clamp, impl, deterministic, **extra,
                 normalize=normalize)
    return _DistributedContrastive.apply(plan, lam, query, key)


class _EditedRows(torch.autograd.Function):
    """The AdaSSL latent prologue on the local rows: -> (cont, targ, R_xy_sum + R_yx_sum), with the torch
    backend's analytic backward (straight-through mask for "s").

    A Function of its own because the ring needs the edited rows themselves (they travel between ranks and
    each block is one core op call), and no registered op returns them: the AdaSSL op's fused backends form
    them in registers and never write them out. It runs the torch prologue whatever `impl` is (O(B d)
    elementwise work, against the core's O(M^2 d)); the core calls on the edited rows honour `impl`.
    """

    @staticmethod
    def forward(ctx, variant, emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx):
        cont, targ, reg_mean = edited_rows(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx,
                                           variant)
        ctx.variant = variant
        ctx.save_for_backward(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx)
        return cont.to(emb_x.dtype), targ.to(emb_x.dtype), reg_mean * (2 * emb_x.shape[0])

    @staticmethod
    def backward(ctx, dcont, dtarg, dreg):
        _refuse_double_backward("adassl_nt_xent")
        if ctx.needs_input_grad[7] or ctx.needs_input_grad[8]:
            raise unsupported_backward("adassl_nt_xent", "with process_group", "a gradient for noise_xy / noise_yx")
        emb_x, *rest = ctx.saved_tensors
        acc = _checks.accumulation_dtype(emb_x.dtype)
        grads = prologue_backward(dcont.to(acc), dtarg.to(acc), dreg.to(acc), emb_x, *rest, ctx.variant)
        return None, *grads, None, None


def adassl_nt_xent(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx, lam, temperature, clamp,
                   variant, impl, deterministic, process_group, *, schedule=None, timeout=None, normalize=True):
    """Distributed one-pass AdaSSL: the latent prologue on local rows, the distributed nt_xent core on the
    edited rows, l_reg the global mean. Returns (l_ssl, l_reg), both the global values on every rank."""
    comm = _comm("adassl_nt_xent", process_group, schedule, timeout)
    options = [("temperature", float(temperature)), ("clamp", clamp), ("the variant", "vs".index(variant)),
               ("normalize", bool(normalize))]
    (b_sizes,) = _metadata(comm, emb_x.device, emb_x.dtype, emb_x.shape[1], options,
                           [("the rows of emb_x", emb_x.shape[0])])
    cont, targ, reg_sum = _EditedRows.apply(variant, emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy,
                                            noise_yx)
    pos, excl = partner_indices(cont.shape[0], cont.device)
    m_sizes = [2 * b for b in b_sizes]
    plan = _Plan(comm, [m_sizes, m_sizes], [_Problem(0, 1, pos, excl, 1.0 / sum(m_sizes))],
                 1.0 / temperature, clamp, impl, deterministic, normalize=normalize)
    l_ssl = _DistributedContrastive.apply(plan, lam, cont, targ)
    l_reg = _GlobalSum.apply(comm, reg_sum / (2 * sum(b_sizes)))
    return l_ssl, l_reg


def siglip(query, key, params, normalize, impl, process_group, *, schedule=None, timeout=None) -> Tensor:
    """Distributed SigLIP: query and key concatenated in rank order, params = (scale, bias) (2,); returns the
    global loss (the sum over the global N x N terms / N), world_size x the global gradients as the others."""
    comm = _comm("siglip", process_group, schedule, timeout)
    (n_sizes,) = _metadata(comm, query.device, query.dtype, query.shape[1], [("normalize", bool(normalize))],
                           [("the rows of query", query.shape[0])])
    pos, excl = diagonal_indices(query.shape[0], query.device)
    plan = _Plan(comm, [n_sizes, n_sizes], [_Problem(0, 1, pos, excl, 1.0 / sum(n_sizes))], 1.0, None, impl, True,
                 siglip_normalize=normalize)
    return _DistributedContrastive.apply(plan, params, query, key)
