"""Distributed losses (docs/api.md 4), on CPU with gloo and torch.multiprocessing.

Each spawn runs many cases and writes its results to files; the tests compare them with a single process
on the global batch (impl="reference"). Spawns are few (gloo start-up costs seconds), cached per module.
"""

from __future__ import annotations

import datetime
import os
import statistics
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import adassl_fast
from adassl_fast import distributed

D_IN, D = 6, 5
OPS = ("nt_xent", "info_nce", "info_nce_oneway", "adassl_v", "adassl_s", "siglip", "siglip_raw", "labels",
       "labels_oneway", "nt_xent_raw", "info_nce_raw")  # *_raw: normalize=False
SCHEDULES = distributed.SCHEDULES
SIZES = {2: {"equal": (4, 4), "unequal": (3, 5)}, 4: {"equal": (3, 3, 3, 3), "unequal": (2, 4, 3, 5)}}
WEIGHTS = (1.0, 0.7)  # objective = l_ssl + 0.7 l_reg for AdaSSL


class Net(nn.Module):
    """A small encoder with a predictor / posterior and prior heads and the learnable lambda."""

    def __init__(self, op: str):
        super().__init__()
        torch.manual_seed(1234)
        lin = lambda i, o: nn.Linear(i, o, dtype=torch.float64)
        self.op = op
        self.f = lin(D_IN, D)
        if op.startswith("adassl"):
            self.pxy, self.pyx = lin(D, 2 * D), lin(D, 2 * D)
            if op == "adassl_v":
                self.qxy, self.qyx = lin(D, 2 * D), lin(D, 2 * D)
        else:
            self.h = lin(D, D)
        self.lam = nn.Parameter(torch.tensor(1.3, dtype=torch.float64))
        if op.startswith("siglip"):
            self.bias = nn.Parameter(torch.tensor(-0.8, dtype=torch.float64))

    def forward(self, x, y, noise_xy, noise_yx, group=None, impl="torch"):
        ex, ey = self.f(x), self.f(y)
        if self.op.startswith("nt_xent"):
            cont, targ = torch.cat([self.h(ey), self.h(ex)]), torch.cat([ex, ey])
            return (adassl_fast.nt_xent(cont, targ, temperature=0.2, scale=self.lam, clamp=5.0, impl=impl,
                                        process_group=group, normalize=self.op == "nt_xent"),)
        if self.op.startswith("siglip"):  # scale and bias receive gradients
            return (adassl_fast.siglip(ex, self.h(ey), scale=3 * self.lam, bias=self.bias,
                                       normalize=self.op == "siglip", impl=impl, process_group=group),)
        if self.op.startswith("labels"):  # label-defined positives (noise_xy carries the labels, _data)
            sym = self.op == "labels"
            return (adassl_fast.info_nce(ex, self.h(ey), temperature=0.3, scale=self.lam, symmetric=sym,
                                         clamp=None if sym else 4.0, impl=impl, process_group=group,
                                         labels=noise_xy),)
        if self.op.startswith("info_nce"):
            sym = self.op != "info_nce_oneway"
            return (adassl_fast.info_nce(ex, self.h(ey), temperature=0.3, scale=self.lam, symmetric=sym,
                                         clamp=None if sym else 4.0, impl=impl, process_group=group,
                                         normalize=self.op != "info_nce_raw"),)
        v = self.op == "adassl_v"
        priors = (self.qxy(ey), self.qyx(ex)) if v else (None, None)
        return adassl_fast.adassl_nt_xent(ex, ey, self.pxy(ex), self.pyx(ey), *priors, variant="v" if v else "s",
                                          temperature=0.25, scale=self.lam, clamp=20.0, noise_xy=noise_xy,
                                          noise_yx=noise_yx, impl=impl, process_group=group)


def _data(op: str, b: int):
    g = torch.Generator().manual_seed(99 + OPS.index(op) * 7 + b)
    draw = torch.rand if op == "adassl_s" else torch.randn
    x, y = (torch.randn(b, D_IN, generator=g, dtype=torch.float64) for _ in range(2))
    if op.startswith("labels"):  # three classes, so every class spans the ranks
        return x, y, torch.randint(0, 3, (b,), generator=g), torch.zeros(b)
    return x, y, draw(b, D, generator=g, dtype=torch.float64), draw(b, D, generator=g, dtype=torch.float64)


def _objective(outs):
    return sum(w * o for w, o in zip(WEIGHTS, outs, strict=False))


def _init(rank, world, store, seconds=60):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=seconds))


def _check_worker(rank, world, store, out, cases, mismatch):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    _init(rank, world, store)
    results = {}
    for op, schedule, kind in cases:
        sizes = SIZES[world][kind]
        distributed.DEFAULT_SCHEDULE = schedule
        net = Net(op)
        model = DDP(net)
        off = sum(sizes[:rank])
        local = [t[off : off + sizes[rank]] for t in _data(op, sum(sizes))]
        try:
            outs = model(*local, group=dist.group.WORLD)
            _objective(outs).backward()
            results[(op, schedule, kind)] = (
                [o.item() for o in outs],
                {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None},
            )
        except Exception as exc:  # reported by the test
            results[(op, schedule, kind)] = f"{type(exc).__name__}: {exc}"
    if mismatch:  # every rank must raise a ValueError naming the ranks (and nobody hangs)
        distributed.DEFAULT_SCHEDULE = None
        bad = {
            "d": lambda: adassl_fast.nt_xent(*(torch.randn(4, 5 + rank, dtype=torch.float64) for _ in range(2)),
                                             process_group=dist.group.WORLD),
            "dtype": lambda: adassl_fast.nt_xent(
                *(torch.randn(4, 5, dtype=torch.float64 if rank else torch.float32) for _ in range(2)),
                process_group=dist.group.WORLD),
            "temperature": lambda: adassl_fast.info_nce(*(torch.randn(4, 5) for _ in range(2)),
                                                        temperature=0.1 + rank, process_group=dist.group.WORLD),
            "op": lambda: (adassl_fast.nt_xent if rank else adassl_fast.info_nce)(
                *(torch.randn(4, 5) for _ in range(2)), process_group=dist.group.WORLD),
        }
        for name, call in bad.items():
            try:
                call()
                results[("mismatch", name)] = "no error"
            except Exception as exc:
                results[("mismatch", name)] = f"{type(exc).__name__}: {exc}"
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _warm():
    """Import what the ops' first call imports (torch._dynamo, for the torch.library ops: seconds), so that
    forked ranks inherit it instead of each paying for it."""
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    adassl_fast.nt_xent(x, x.flip(0)).backward()


def _spawn(fn, world, tmp, *args):
    """Run fn(rank, world, store, tmp, *args) on `world` forked ranks (fork: no re-import of torch)."""
    _warm()
    store = os.path.join(tmp, f"store-{fn.__name__}-{world}-{time.time_ns()}")
    mp.start_processes(fn, args=(world, store, str(tmp), *args), nprocs=world, join=True, start_method="fork")
    return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]


_single_cache: dict = {}


def _single(op, b):
    """Loss values and parameter gradients of one process on the global batch, impl="reference"."""
    if (op, b) not in _single_cache:
        net = Net(op)
        outs = net(*_data(op, b), impl="reference")
        _objective(outs).backward()
        _single_cache[op, b] = ([o.item() for o in outs],
                                {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    return _single_cache[op, b]


ALL_CASES = [(op, s, k) for op in OPS for s in SCHEDULES for k in ("equal", "unequal")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = {}

    def get(world):
        if world not in cache:
            tmp = tmp_path_factory.mktemp(f"w{world}")
            cache[world] = _spawn(_check_worker, world, tmp, ALL_CASES, world == 2)
        return cache[world]

    return get


def _compare(per_rank, op, world, schedule, kind):
    b = sum(SIZES[world][kind])
    want_vals, want_grads = _single(op, b)
    for rank, res in enumerate(per_rank):
        got = res[(op, schedule, kind)]
        assert not isinstance(got, str), f"rank {rank}: {got}"
        vals, grads = got
        torch.testing.assert_close(torch.tensor(vals), torch.tensor(want_vals), rtol=1e-10, atol=1e-12,
                                   msg=lambda m, r=rank: f"rank {r} loss: {m}")
        assert grads.keys() == want_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, want_grads[name], rtol=1e-9, atol=1e-12,
                                       msg=lambda m, r=rank, n=name: f"rank {r} grad of {n}: {m}")


@pytest.mark.parametrize("kind", ["equal", "unequal"])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("op", OPS)
def test_two_ranks_match_one_process_on_the_global_batch(runs, op, schedule, kind):
    _compare(runs(2), op, 2, schedule, kind)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["equal", "unequal"])
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("op", OPS)
def test_four_ranks_match_one_process_on_the_global_batch(runs, op, schedule, kind):
    _compare(runs(4), op, 4, schedule, kind)


@pytest.mark.parametrize(
    "name, words",
    [
        ("d", ["feature dimension", "rank 0: 5", "rank 1: 6"]),
        ("dtype", ["dtype", "rank 0: torch.float32", "rank 1: torch.float64"]),
        ("temperature", ["temperature", "rank 0: 0.1", "rank 1: 1.1"]),
        ("op", ["the op", "rank 0: info_nce", "rank 1: nt_xent"]),
    ],
)
def test_mismatched_ranks_raise_on_every_rank_naming_them(runs, name, words):
    for rank, res in enumerate(runs(2)):
        msg = res[("mismatch", name)]
        assert msg.startswith("ValueError"), f"rank {rank}: {msg}"
        for w in words:
            assert w in msg, f"rank {rank}: {w!r} not in {msg!r}"


def test_schedule_and_timeout_resolution(monkeypatch):
    monkeypatch.setattr(distributed, "DEFAULT_SCHEDULE", None)
    monkeypatch.delenv("ADASSL_FAST_SCHEDULE", raising=False)
    assert distributed.resolve_schedule() == "ring"
    monkeypatch.setenv("ADASSL_FAST_SCHEDULE", "gather")
    assert distributed.resolve_schedule() == "gather"
    assert distributed.resolve_schedule("ring") == "ring"
    with pytest.raises(ValueError, match="schedule"):
        distributed.resolve_schedule("allgather")
    monkeypatch.setenv("ADASSL_FAST_DIST_TIMEOUT", "7.5")
    assert distributed.resolve_timeout() == 7.5
    assert distributed.resolve_timeout(3) == 3.0
    with pytest.raises(ValueError, match="timeout"):
        distributed.resolve_timeout(-1)


# ----------------------------------------------------------------------------------------------------
# Failure behaviour: a peer that raises (and lingers) or dies.


def _failing_worker(rank, world, store, out, mode, timeout):
    _init(rank, world, store, seconds=120)  # the group's own timeout is long: the op's timeout must act
    distributed.DEFAULT_TIMEOUT = timeout
    x = torch.randn(8, 4, dtype=torch.float64)
    adassl_fast.nt_xent(x, x.flip(0), process_group=dist.group.WORLD)  # one good step
    if rank == world - 1:
        if mode == "die":
            os._exit(3)
        time.sleep(60)  # "raised" and stuck in its handler: never reaches the collective
        os._exit(0)
    start = time.monotonic()
    try:
        loss = adassl_fast.nt_xent(x, x.flip(0), process_group=dist.group.WORLD)
        result = f"no error ({loss.item()})"
    except Exception as exc:
        result = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(out, f"fail{rank}.txt"), "w") as f:
        f.write(f"{time.monotonic() - start:.3f}\n{result}")
    os._exit(0)


@pytest.mark.parametrize("mode", ["raise", "die"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_a_failing_rank_makes_the_others_fail_within_the_timeout(tmp_path, monkeypatch, mode, schedule):
    world, timeout = 2, 2.0
    monkeypatch.setenv("ADASSL_FAST_SCHEDULE", schedule)
    _warm()
    ctx = mp.get_context("fork")
    store = str(tmp_path / "store")
    procs = [ctx.Process(target=_failing_worker, args=(r, world, store, str(tmp_path), mode, timeout))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        deadline = time.monotonic() + 60
        while procs[0].is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not procs[0].is_alive(), "rank 0 hung"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    elapsed, msg = (tmp_path / "fail0.txt").read_text().split("\n", 1)
    assert msg.startswith("DistributedError"), msg
    assert "rank 0 of 2" in msg and schedule in msg, msg
    assert float(elapsed) < timeout + 5, (elapsed, msg)


# ----------------------------------------------------------------------------------------------------
# Memory: the ring's peak per rank does not grow with the world size (weak scaling, fixed local rows).


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def _memory_worker(rank, world, store, out, m_local, d):
    import ctypes

    # Fixed mmap threshold: big buffers are mmapped and unmapped on free, so RSS follows the live bytes.
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 1 << 17)  # M_TRIM_THRESHOLD
    torch.set_num_threads(1)
    _init(rank, world, store)
    results = {}
    for schedule in ("ring", "gather", "ring"):  # the first ring call also warms everything up
        distributed.DEFAULT_SCHEDULE = schedule
        g = torch.Generator().manual_seed(rank)
        cont = torch.randn(m_local, d, dtype=torch.float64, generator=g).requires_grad_()
        targ = torch.randn(m_local, d, dtype=torch.float64, generator=g).requires_grad_()
        dist.barrier()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM)
        before = _rss_kib("VmRSS")
        adassl_fast.nt_xent(cont, targ, process_group=dist.group.WORLD).backward()
        results[schedule] = ((_rss_kib("VmHWM") - before) / 1024, distributed.last_stats["column_bytes"] / 2**20)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ring_peak_memory_does_not_grow_with_world_size(tmp_path):
    # The ring holds the local rows, two block buffers (in hand, arriving) and two column-gradient
    # accumulators (arriving, leaving): from 3 ranks on, that set is complete and constant (2 ranks use
    # fewer). Measured here (block 8 MiB, fwd + bwd, median rank): ring 136 / 136 MiB at 3 / 6 ranks, gather
    # 185 / 329 MiB.
    m_local, d = 64, 16384  # one block = 8 MiB in float64: above the few MiB of RSS noise seen with 6 ranks
    block_mib = m_local * d * 8 / 2**20
    peaks = {}
    for world in (3, 6):
        sub = tmp_path / f"w{world}"
        sub.mkdir()
        res = _spawn(_memory_worker, world, sub, m_local, d)
        # the median rank: every rank runs the same schedule, and a max over 6 noisy RSS readings sits
        # higher than one over 3 (CI runs with 2 MiB blocks saw 2-5 MiB of drift between 3 and 6 ranks)
        peaks[world] = {s: statistics.median(r[s][0] for r in res) for s in ("ring", "gather")}
        peaks[world]["ring_buffers"] = res[0]["ring"][1]
    print(f"\npeak extra RSS per rank (MiB), block = {block_mib:.0f} MiB:", peaks)
    # a ring that kept what passed through would hold 3 more blocks at 6 ranks than at 3
    assert peaks[6]["ring"] <= peaks[3]["ring"] + block_mib, peaks
    assert peaks[6]["ring_buffers"] == peaks[3]["ring_buffers"], peaks
    # The measurement sees growth where there is some: gather holds every rank's columns.
    assert peaks[6]["gather"] >= peaks[3]["gather"] + 3 * block_mib, peaks


# ----------------------------------------------------------------------------------------------------
# The ops: the schedules are the body of torch.library ops generated by `_library.define_loss` (one rank).


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _leaf(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def _op_args(op, group, schedule, m=7, d=5):
    """(the distributed op, its arguments) on one rank: m local rows of width d."""
    comm = (distributed.group_name(group), [m], schedule, 30.0)
    scale = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    if op.startswith("nt_xent"):  # nt_xent_raw: normalize=False
        return distributed.nt_xent_ops.forward, (_leaf(m, d), _leaf(m, d), scale, *comm, 1 / 0.3, 4.0, "torch", True,
                                                 op == "nt_xent")
    if op.startswith("info_nce"):
        labels = torch.randint(0, 3, (m,)) if op.endswith("labels") else torch.empty(0, dtype=torch.int64)
        return distributed.info_nce_ops.forward, (_leaf(m, d), _leaf(m, d), scale, labels, *comm, 1 / 0.3, None,
                                                  op != "info_nce_oneway", "torch", True, True)
    if op == "siglip":
        params = torch.tensor([3.0, -0.8], dtype=torch.float64, requires_grad=True)
        return distributed.siglip_ops.forward, (_leaf(m, d), _leaf(m, d), params, *comm, "torch", True, True)
    priors = (_leaf(m, 2 * d), _leaf(m, 2 * d)) if op == "adassl_v" else (torch.empty(0, dtype=torch.float64),) * 2
    draw = torch.randn if op == "adassl_v" else torch.rand
    noises = (draw(m, d, dtype=torch.float64), draw(m, d, dtype=torch.float64))
    return distributed.adassl_ops.forward, (_leaf(m, d), _leaf(m, d), _leaf(m, 2 * d), _leaf(m, 2 * d), *priors,
                                            *noises, scale, *comm, 1 / 0.25, 20.0, op[-1], "torch", True, True)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("op", ["nt_xent", "nt_xent_raw", "info_nce", "info_nce_oneway", "info_nce_labels", "siglip",
                                "adassl_v", "adassl_s"])
def test_the_distributed_ops_pass_opcheck(one_rank, op, schedule):
    """Schema, fake (meta) kernel, autograd registration and AOT dispatch of each op, both schedules."""
    fn, args = _op_args(op, one_rank, schedule)
    torch.library.opcheck(fn, args)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_the_gather_schedule_keeps_its_columns_for_the_backward(one_rank, schedule):
    # the ring passes blocks instead; the gather's all-gathered columns are op outputs saved by the generator
    fn, args = _op_args("info_nce", one_rank, schedule)
    loss, lse, rows, cols = fn(*args)
    assert lse.shape == (2, 7)
    want = (7, 5) if schedule == "gather" else (0,)
    assert rows.shape == cols.shape == want


def test_distributed_adassl_refuses_noise_gradients(one_rank):
    m, d = 5, 4
    inputs = [_leaf(m, d), _leaf(m, d), _leaf(m, 2 * d), _leaf(m, 2 * d), _leaf(m, 2 * d), _leaf(m, 2 * d)]
    noise = [torch.randn(m, d, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    l_ssl, l_reg = adassl_fast.adassl_nt_xent(*inputs, noise_xy=noise[0], noise_yx=noise[1], impl="torch",
                                              process_group=one_rank)
    refusal = "gradient for noise_xy / noise_yx is not supported with process_group"
    with pytest.raises(NotImplementedError, match=refusal):
        (l_ssl + l_reg).backward()


def _spy_on_triton_core(monkeypatch):
    """Count the Triton backend's nt_xent core calls (the table is rebuilt around the spies)."""
    from adassl_fast import _library
    from adassl_fast.kernels import nt_xent as triton_nt_xent

    calls = {"forward": 0, "backward": 0}
    for phase in calls:
        real = getattr(triton_nt_xent, f"nt_xent_{phase}")

        def spy(*args, real=real, phase=phase, **kw):
            calls[phase] += 1
            return real(*args, **kw)

        monkeypatch.setattr(triton_nt_xent, f"nt_xent_{phase}", spy)
    _library.backend.cache_clear()
    return calls


@pytest.mark.triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo with CPU tensors: Triton runs here only in its interpreter")
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_distributed_adassl_runs_its_core_on_the_impl_and_the_torch_prologue(one_rank, monkeypatch, schedule):
    """impl="triton": every block is the Triton core (the latent prologue is the torch backend's, docs/
    architecture.md 5); values and gradients equal the single-process Triton op's."""
    from adassl_fast import _library

    b, d = 5, 12
    g = torch.Generator().manual_seed(3)
    leaf = lambda *s: torch.randn(*s, generator=g).requires_grad_()
    inputs = [leaf(b, d), leaf(b, d), leaf(b, 2 * d), leaf(b, 2 * d), leaf(b, 2 * d), leaf(b, 2 * d)]
    noise = dict(noise_xy=torch.randn(b, d, generator=g), noise_yx=torch.randn(b, d, generator=g))
    run = lambda **kw: adassl_fast.adassl_nt_xent(*inputs, **noise, impl="triton", temperature=0.3, **kw)
    want = run()
    want_grads = torch.autograd.grad(want[0] + 0.7 * want[1], inputs)
    try:
        calls = _spy_on_triton_core(monkeypatch)
        got = run(process_group=one_rank, schedule=schedule)
        got_grads = torch.autograd.grad(got[0] + 0.7 * got[1], inputs)
    finally:
        monkeypatch.undo()
        _library.backend.cache_clear()
    assert calls == {"forward": 1, "backward": 1}
    # rounding only: the one-pass Triton op forms the edited rows in its kernels, the schedule in torch
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-4, atol=1e-5)
    for a, e in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_siglip_takes_the_schedule_it_is_given(one_rank, schedule, monkeypatch):
    """siglip(schedule=, timeout=) reaches the distributed op as info_nce's do; a bad name is refused."""
    seen = []
    real = distributed._comm
    monkeypatch.setattr(distributed, "_comm", lambda *a: seen.append(real(*a)) or seen[-1])
    q, k = _leaf(7, 5), _leaf(7, 5)
    got = adassl_fast.siglip(q, k, scale=3.0, bias=-0.8, impl="torch", process_group=one_rank, schedule=schedule,
                             timeout=12.0)
    assert [(c.op, c.schedule, c.timeout) for c in seen] == [("siglip", schedule, 12.0)]
    torch.testing.assert_close(got, adassl_fast.siglip(q, k, scale=3.0, bias=-0.8, impl="reference"),
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="schedule"):
        adassl_fast.siglip(q, k, impl="torch", process_group=one_rank, schedule="tree")
