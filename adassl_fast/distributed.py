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
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from adassl_fast import _checks
from adassl_fast._library import define_loss
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
                                    plan.block_labels(p, src))
        return loss * rows.shape[0], lse
    loss, lse = nt_xent_forward_op(rows, cols, pos, excl, scale, plan.inv_temperature, plan.clamp,
                                   _kernel_impl(plan.impl), plan.deterministic)
    return loss * rows.shape[0], lse


def _block_backward(plan, p, weight, rows, cols, pos, excl, scale, lse, positives, src=None):
    """(drows, dcols, dscale) of weight x the block's summed loss terms."""
    if plan.siglip_normalize is not None:
        return siglip_blocks(rows, cols, scale, plan.siglip_normalize, positives=positives, loss=False,
                             grad_weight=weight)[1:]
    if plan.labels is not None:
        return nt_xent_backward(weight * rows.shape[0], rows, cols, pos, excl, scale, lse, plan.inv_temperature,
                                plan.clamp, True, labels=plan.block_labels(p, src))
    return nt_xent_backward_op(weight * rows.shape[0], rows, cols, pos, excl, scale, lse, plan.inv_temperature,
                               plan.clamp, _kernel_impl(plan.impl), plan.deterministic)


def _gather_indices(plan, p):
    """(pos, excl) of problem p's rows among every rank's columns, and the offset of this rank's block."""
    off = _offsets(plan.sizes[p.cols])[plan.comm.rank]
    return _shift(p.pos, off), _shift(p.excl, off), off


def _forward_gather(plan, scale, tensors):
    comm = plan.comm
    gathered = {c: _gather_rows(comm, tensors[c], plan.sizes[c]) for c in plan.col_tensors}
    last_stats.update(schedule="gather", column_bytes=sum(g.numel() * g.element_size() for g in gathered.values()))
    total, lses = None, []
    for p in plan.problems:
        pos, excl, off = _gather_indices(plan, p)
        summed, lse = _block_forward(plan, p, tensors[p.rows], gathered[p.cols], pos, excl, scale, off)
        part = summed * p.coef
        total = part if total is None else total + part
        lses.append(lse)
    return total, lses, gathered


def _backward_gather(plan, scale, tensors, lses, gathered, grad_out):
    comm = plan.comm
    acc = lses[0].dtype
    grads = [None] * len(tensors)
    col_grads = {}
    dscale = torch.zeros((), dtype=scale.dtype, device=scale.device)
    add = lambda cur, g: g.to(acc) if cur is None else cur + g
    for p, lse in zip(plan.problems, lses, strict=True):
        g = grad_out.to(acc) * (comm.world * p.coef)
        pos, excl, off = _gather_indices(plan, p)
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
    return total, lses


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


def _schedule_forward(plan, scale, tensors):
    """(this rank's share of the global loss, the row LSEs (P, M_r) of the plan's P problems (SigLIP: the block
    sums, (P,)), the gather schedule's gathered row and column tensors (empty (0,) tensors on the ring and for
    a tensor that is no problem's columns))."""
    if plan.comm.schedule == "ring":
        (local, lses), gathered = _forward_ring(plan, scale, tensors), {}
    else:
        local, lses, gathered = _forward_gather(plan, scale, tensors)
    kept = tuple(gathered[t] if t in gathered else tensors[t].new_empty(0) for t in range(len(tensors)))
    return local, torch.stack(lses), kept


def _schedule_backward(plan, scale, tensors, lse, kept, grad_out):
    """(gradients of the row and column tensors in the accumulation dtype, dscale): world_size x the global
    loss's gradients (DDP's averaging then gives the single-process ones)."""
    lses = list(lse.unbind(0))
    if plan.comm.schedule == "ring":
        return _backward_ring(plan, scale, tensors, lses, grad_out)
    return _backward_gather(plan, scale, tensors, lses, {c: kept[c] for c in plan.col_tensors}, grad_out)


# ----------------------------------------------------------------------------------------------------
# The ops: one torch.library op per loss, generated by `_library.define_loss` like every other loss, with the
# schedule as its body. The process group travels as its name (`_GROUPS`, filled by the functional layer
# below), everything else the schedule needs as the op's arguments: the plan is rebuilt from them in the
# forward and again in the backward.

# group name -> the live group (weak: a destroyed group leaves the table with its last reference)
_GROUPS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()

# every distributed op's first options (the group's name, every rank's row count, the schedule, the timeout)
_COMM_OPTIONS = "str group, int[] sizes, str schedule, float? timeout"
# the gather schedule's gathered rows and columns, saved for its backward (empty (0,) tensors on the ring)
_KEPT = ("gathered_rows", "gathered_cols")
_NOT_DIFFERENTIABLE = "with process_group (the distributed schedules have only the analytic first-order backward)"


def _comm_of(op: str, group: str, schedule: str, timeout: float | None) -> _Comm:
    pg = _GROUPS[group]
    return _Comm(op, pg, dist.get_rank(pg), dist.get_world_size(pg), schedule, timeout)


def _kept_fake(rows, cols, sizes, schedule, rows_gathered=False, factor=1):
    """Fakes of `_KEPT`: every rank's rows of the gathered tensors (factor x the counts in `sizes`)."""
    gathered = lambda t, on: t.new_empty((factor * sum(sizes), t.shape[1]) if on and schedule == "gather" else (0,))
    return gathered(rows, rows_gathered), gathered(cols, True)


def _contrastive_ops(name, public, tensors, options, plan_of, lse_shape, kept_fake):
    """The distributed op of a loss over one row and one column tensor; plan_of(*op arguments) ->
    (plan, scale, (rows, cols))."""
    n = len(tensors)

    def forward(*args):
        plan, scale, local_tensors = plan_of(*args)
        local, lse, kept = _schedule_forward(plan, scale, local_tensors)
        return plan.comm.all_reduce(local, "the loss all-reduce"), lse, *kept

    def backward(grad_loss, *args):
        (lse, *kept), rest = args[n:n + 1 + len(_KEPT)], args[:n] + args[n + 1 + len(_KEPT):]
        plan, scale, local_tensors = plan_of(*rest)
        grads, dscale = _schedule_backward(plan, scale, local_tensors, lse, kept, grad_loss)
        return *(g.to(t.dtype) for g, t in zip(grads, local_tensors, strict=True)), dscale

    return define_loss(name, tensors=tensors, graded=(tensors[0], tensors[1], tensors[2]),
                       options=f"{_COMM_OPTIONS}, {options}", losses=("loss",), lse_shape=lse_shape, reference=None,
                       public=public, body=(forward, backward), saved=_KEPT, saved_fake=kept_fake,
                       not_differentiable=_NOT_DIFFERENTIABLE)


def _nt_xent_plan(cont, targ, scale, group, sizes, schedule, timeout, inv_temperature, clamp, impl, deterministic):
    pos, excl = partner_indices(cont.shape[0], cont.device)
    plan = _Plan(_comm_of("nt_xent", group, schedule, timeout), [sizes, sizes],
                 [_Problem(0, 1, pos, excl, 1.0 / sum(sizes))], inv_temperature, clamp, impl, deterministic)
    return plan, scale, (cont, targ)


def _info_nce_plan(query, key, scale, labels, group, sizes, schedule, timeout, inv_temperature, clamp, symmetric,
                   impl, deterministic):
    comm = _comm_of("info_nce", group, schedule, timeout)
    pos, excl = diagonal_indices(query.shape[0], query.device)
    extra = {}
    if labels.numel():  # every rank's labels in rank order: each block's column labels are a slice of them
        pos = excl = torch.full_like(pos, -1)
        _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
        off = _offsets(sizes)[comm.rank]
        extra = dict(labels=labels, label_counts=counts[inverse[off : off + query.shape[0]]])
    weight = (0.5 if symmetric else 1.0) / sum(sizes)
    problems = [_Problem(0, 1, pos, excl, weight)] + ([_Problem(1, 0, pos, excl, weight)] if symmetric else [])
    plan = _Plan(comm, [sizes, sizes], problems, inv_temperature, clamp, impl, deterministic, **extra)
    return plan, scale, (query, key)


def _siglip_plan(query, key, params, group, sizes, schedule, timeout, normalize, impl, deterministic):
    pos, excl = diagonal_indices(query.shape[0], query.device)
    plan = _Plan(_comm_of("siglip", group, schedule, timeout), [sizes, sizes],
                 [_Problem(0, 1, pos, excl, 1.0 / sum(sizes))], 1.0, None, impl, deterministic,
                 siglip_normalize=normalize)
    return plan, params, (query, key)


# -> (loss, lse (1, M_r), gathered rows, gathered cols); the backward -> (dcont, dtarg, dscale)
_nt_xent_ops = _contrastive_ops(
    "distributed_nt_xent", "nt_xent", ("cont", "targ", "scale"), "float inv_temperature, float? clamp", _nt_xent_plan,
    lse_shape=lambda cont, *_: (1, cont.shape[0]),
    kept_fake=lambda cont, targ, scale, group, sizes, schedule, *_: _kept_fake(cont, targ, sizes, schedule))
# labels: every rank's labels in rank order (N_global,) int64, or an empty (0,) tensor for diagonal positives;
# -> (loss, lse (2, N_r) symmetric, else (1, N_r), gathered query (symmetric), gathered key)
_info_nce_ops = _contrastive_ops(
    "distributed_info_nce", "info_nce", ("query", "key", "scale", "labels"),
    "float inv_temperature, float? clamp, bool symmetric", _info_nce_plan,
    lse_shape=lambda query, *args: (1 + args[9], query.shape[0]),
    kept_fake=lambda query, key, scale, labels, group, sizes, schedule, timeout, inv_t, clamp, symmetric, *_:
        _kept_fake(query, key, sizes, schedule, rows_gathered=symmetric))
# params = (scale, bias) (2,); -> (loss, the block sums (1,), gathered query (empty), gathered key)
_siglip_ops = _contrastive_ops(
    "distributed_siglip", "siglip", ("query", "key", "params"), "bool normalize", _siglip_plan,
    lse_shape=lambda query, *_: (1,),
    kept_fake=lambda query, key, params, group, sizes, schedule, *_: _kept_fake(query, key, sizes, schedule))


def _adassl_plan(emb_x, group, sizes, schedule, timeout, inv_temperature, clamp, impl, deterministic) -> _Plan:
    """The nt_xent problem over the edited rows: 2 B_r rows per rank (`sizes` counts B_r)."""
    m_sizes = [2 * b for b in sizes]
    pos, excl = partner_indices(2 * emb_x.shape[0], emb_x.device)
    return _Plan(_comm_of("adassl_nt_xent", group, schedule, timeout), [m_sizes, m_sizes],
                 [_Problem(0, 1, pos, excl, 1.0 / sum(m_sizes))], inv_temperature, clamp, impl, deterministic)


def _edited(latent, variant):
    """The torch backend's latent prologue on the local rows: (cont, targ) in the input dtype, the mean
    regulariser (R_xy + R_yx) / 2 B_r in the accumulation dtype."""
    cont, targ, reg_mean = edited_rows(*latent, variant)
    return (cont.to(latent[0].dtype), targ.to(latent[0].dtype)), reg_mean


def _adassl_forward(*args):
    latent, scale, (group, sizes, schedule, timeout, inv_temperature, clamp, variant, impl, deterministic) = (
        args[:8], args[8], args[9:])
    plan = _adassl_plan(latent[0], group, sizes, schedule, timeout, inv_temperature, clamp, impl, deterministic)
    edited, reg_mean = _edited(latent, variant)
    local, lse, kept = _schedule_forward(plan, scale, edited)
    # l_reg = the sum over every rank's rows of R / 2 B: one all-reduce carries both losses
    shares = torch.stack([local, reg_mean * (latent[0].shape[0] / sum(sizes))])
    l_ssl, l_reg = plan.comm.all_reduce(shares, "the loss all-reduce")
    return l_ssl.clone(), l_reg.clone(), lse, *kept  # (an op's outputs may not alias each other)


def _adassl_backward(grad_ssl, grad_reg, *args):
    latent, scale, lse, kept = args[:8], args[8], args[9], args[10:12]
    group, sizes, schedule, timeout, inv_temperature, clamp, variant, impl, deterministic = args[12:]
    plan = _adassl_plan(latent[0], group, sizes, schedule, timeout, inv_temperature, clamp, impl, deterministic)
    edited, _ = _edited(latent, variant)  # formed again (O(B d)), as the single-process torch backward does
    (dcont, dtarg), dscale = _schedule_backward(plan, scale, edited, lse, kept, grad_ssl)
    reg_weight = grad_reg.to(dcont.dtype) * (plan.comm.world / (2 * sum(sizes)))  # world x d l_reg / d R_sum
    return *prologue_backward(dcont, dtarg, reg_weight, *latent, variant), dscale


# The AdaSSL op's tensors and gradients (adassl_fast/adassl.py), the latent prologue inside the body;
# -> (l_ssl, l_reg, lse (1, 2 B_r), gathered rows (empty), gathered targ)
_adassl_ops = define_loss(
    "distributed_adassl",
    tensors=("emb_x", "emb_y", "post_xy", "post_yx", "prior_xy", "prior_yx", "noise_xy", "noise_yx", "scale"),
    graded=("emb_x", "emb_y", "post_xy", "post_yx", "prior_xy", "prior_yx", "scale"),
    options=f"{_COMM_OPTIONS}, float inv_temperature, float? clamp, str variant",
    losses=("ssl", "reg"),
    lse_shape=lambda emb_x, *_: (1, 2 * emb_x.shape[0]),
    reference=None,
    reference_only=("noise_xy", "noise_yx"),
    public="adassl_nt_xent",
    body=(_adassl_forward, _adassl_backward),
    saved=_KEPT,
    saved_fake=lambda emb_x, emb_y, *args: _kept_fake(emb_x, emb_x, args[8], args[9], factor=2),
    not_differentiable=_NOT_DIFFERENTIABLE,
)


# ----------------------------------------------------------------------------------------------------
# The functional layer (inputs already validated by the functional forms; lam is a 0-dim accumulation-dtype
# tensor): the metadata agreement (a collective of its own, before any op), then one op call.


def _comm(op, process_group, schedule, timeout) -> _Comm:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"adassl_fast.{op}: process_group given but torch.distributed is not initialised")
    return _Comm(op, process_group, dist.get_rank(process_group), dist.get_world_size(process_group),
                 resolve_schedule(schedule), resolve_timeout(timeout))


def _op_options(comm: _Comm, sizes: list[int]) -> tuple:
    """The ops' first options; registers the group under its name for the op's body."""
    _GROUPS[comm.group.group_name] = comm.group
    return comm.group.group_name, sizes, comm.schedule, comm.timeout


def nt_xent(cont, targ, lam, temperature, clamp, impl, deterministic, process_group, *, schedule=None,
            timeout=None) -> Tensor:
    """Distributed nt_xent: rank r passes [x_hat_r; y_hat_r] and [e_x_r; e_y_r]; returns the global loss."""
    comm = _comm("nt_xent", process_group, schedule, timeout)
    options = [("temperature", float(temperature)), ("clamp", clamp)]
    (m_sizes,) = _metadata(comm, cont.device, cont.dtype, cont.shape[1], options, [("the rows of cont", cont.shape[0])])
    return _nt_xent_ops.forward(cont, targ, lam, *_op_options(comm, m_sizes), 1.0 / temperature, clamp,
                                _kernel_impl(impl), deterministic)[0]


def info_nce(query, key, lam, temperature, symmetric, clamp, impl, deterministic, process_group, *, schedule=None,
             timeout=None, labels=None) -> Tensor:
    """Distributed CLIP-style InfoNCE: query and key (and labels) concatenated in rank order; returns the global
    loss. With labels the blocks run the torch backend's core whatever `impl` is (no other backend has them)."""
    comm = _comm("info_nce", process_group, schedule, timeout)
    options = [("temperature", float(temperature)), ("clamp", clamp), ("symmetric", bool(symmetric)),
               ("labels given", labels is not None)]
    (n_sizes,) = _metadata(comm, query.device, query.dtype, query.shape[1], options,
                           [("the rows of query", query.shape[0])])
    # O(N) integers travel once, here: each block's column labels are a slice of them
    every = query.new_empty(0, dtype=torch.int64) if labels is None else _gather_rows(comm, labels.view(-1, 1),
                                                                                      n_sizes).view(-1)
    return _info_nce_ops.forward(query, key, lam, every, *_op_options(comm, n_sizes), 1.0 / temperature, clamp,
                                 bool(symmetric), _kernel_impl(impl), deterministic)[0]


def adassl_nt_xent(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx, lam, temperature, clamp,
                   variant, impl, deterministic, process_group, *, schedule=None, timeout=None):
    """Distributed one-pass AdaSSL: the latent prologue on local rows (the torch backend's, whatever `impl`:
    see the module docstring), the distributed nt_xent core on the edited rows, l_reg the global mean. Returns
    (l_ssl, l_reg), both the global values on every rank."""
    comm = _comm("adassl_nt_xent", process_group, schedule, timeout)
    options = [("temperature", float(temperature)), ("clamp", clamp), ("the variant", "vs".index(variant))]
    (b_sizes,) = _metadata(comm, emb_x.device, emb_x.dtype, emb_x.shape[1], options,
                           [("the rows of emb_x", emb_x.shape[0])])
    l_ssl, l_reg, *_ = _adassl_ops.forward(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx,
                                           lam, *_op_options(comm, b_sizes), 1.0 / temperature, clamp, variant,
                                           _kernel_impl(impl), deterministic)
    return l_ssl, l_reg


def siglip(query, key, params, normalize, impl, process_group, *, schedule=None, timeout=None) -> Tensor:
    """Distributed SigLIP: query and key concatenated in rank order, params = (scale, bias) (2,); returns the
    global loss (the sum over the global N x N terms / N), world_size x the global gradients as the others."""
    comm = _comm("siglip", process_group, schedule, timeout)
    (n_sizes,) = _metadata(comm, query.device, query.dtype, query.shape[1], [("normalize", bool(normalize))],
                           [("the rows of query", query.shape[0])])
    return _siglip_ops.forward(query, key, params, *_op_options(comm, n_sizes), bool(normalize), _kernel_impl(impl),
                               True)[0]
