"""cached_backward: exact against the full-batch backward (float64, 1e-10), dropout replay, BatchNorm
rejection, bad input, 2-rank gloo DDP, and the peak-memory saving in a fresh subprocess."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from adassl_fast import nt_xent
from adassl_fast.cached import cached_backward

N, D_IN, D_EMB = 50, 12, 8
CHUNKS = (7, 16, 50)
TOL = 1e-10


def mlp(dropout: float = 0.0, norm: nn.Module | None = None) -> nn.Sequential:
    layers = [nn.Linear(D_IN, 32), nn.Tanh()]
    if norm is not None:
        layers.append(norm)
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(32, D_EMB)]
    return nn.Sequential(*layers).double()


def simclr(za, zb, scale=None):
    """SimCLR NT-Xent on two views: row i of [zb; za] has its positive at column i of [za; zb]."""
    return nt_xent(torch.cat([zb, za]), torch.cat([za, zb]), scale=scale)


def views(n=N):
    return torch.randn(n, D_IN, dtype=torch.float64), torch.randn(n, D_IN, dtype=torch.float64)


def encoders(kind: str, **kw) -> list[nn.Module]:
    if kind == "shared":
        enc = mlp(**kw)
        return [enc, enc]
    return [mlp(**kw), mlp(**kw)]


def unique_params(*modules) -> list[nn.Parameter]:
    seen, out = set(), []
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def grads(params) -> list[torch.Tensor]:
    return [p.grad.clone() for p in params]


def zero(params) -> None:
    for p in params:
        p.grad = None


def err(a, b) -> float:
    return abs(float(a.detach() - b.detach()))


def max_err(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------------
# Exactness against the full-batch backward.


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("kind", ["shared", "separate"])
def test_nt_xent_matches_full_batch(kind, chunk_size):
    models = encoders(kind)
    scale = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)  # a parameter used inside loss_fn
    params = unique_params(*models) + [scale]
    xa, xb = views()
    loss_fn = lambda za, zb: simclr(za, zb, scale=scale)

    full = loss_fn(models[0](xa), models[1](xb))
    full.backward()
    want = grads(params)
    zero(params)

    got_loss = cached_backward(models, [xa, xb], loss_fn, chunk_size=chunk_size)
    assert not got_loss.requires_grad and got_loss.dim() == 0
    assert err(got_loss, full) <= TOL
    assert max_err(grads(params), want) <= TOL


def test_single_module_and_tuple_inputs():
    """One module for every stream; a stream given as a tuple of tensors (positional arguments)."""

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = mlp()

        def forward(self, x, gate):
            return self.body(x) * gate

    enc = Gated()
    xa, xb = views()
    ga, gb = torch.rand(N, 1, dtype=torch.float64), torch.rand(N, 1, dtype=torch.float64)
    full = simclr(enc(xa, ga), enc(xb, gb))
    full.backward()
    want = grads(enc.parameters())
    zero(enc.parameters())
    got = cached_backward(enc, [(xa, ga), (xb, gb)], simclr, chunk_size=9)
    assert err(got, full) <= TOL
    assert max_err(grads(enc.parameters()), want) <= TOL


def test_accumulates_into_existing_grad_and_input_grad():
    models = encoders("separate")
    params = unique_params(*models)
    xa, xb = views()
    xa.requires_grad_(True)
    simclr(models[0](xa), models[1](xb)).backward()
    want, want_x = grads(params), xa.grad.clone()
    for p in params:
        p.grad = torch.ones_like(p)
    xa.grad = None
    cached_backward(models, [xa, xb], simclr, chunk_size=16)
    assert max_err(grads(params), [w + 1 for w in want]) <= TOL
    assert float((xa.grad - want_x).abs().max()) <= TOL


def test_adassl_module_as_loss_fn():
    from adassl_fast import nn as ada_nn

    models = encoders("shared")
    ada = ada_nn.AdaSSL(D_EMB, D_EMB, variant="v", hidden=(16,)).double()
    params = unique_params(*models, ada)
    xa, xb = views()
    loss_fn = lambda za, zb: ada(za, zb)["loss"]

    state = torch.get_rng_state()  # AdaSSL samples its latent noise: same stream for both runs
    full = loss_fn(models[0](xa), models[1](xb))
    full.backward()
    want = grads(params)
    for chunk_size in CHUNKS:
        zero(params)
        torch.set_rng_state(state)
        got = cached_backward(models, [xa, xb], loss_fn, chunk_size=chunk_size)
        assert err(got, full) <= TOL
        assert max_err(grads(params), want) <= TOL
        assert all(p.grad is not None for p in ada.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------
# What makes it exact: RNG replay, autocast, grad mode.


@pytest.mark.parametrize("chunk_size", [7, 50])
def test_dropout_masks_replayed(chunk_size):
    """Reference by hand: the chunks encoded with a graph in the same order from the same RNG state
    (the masks of cached_backward's first pass); the cached gradients must equal it, which they only do
    when the second pass replays those masks."""
    models = encoders("separate", dropout=0.3)
    params = unique_params(*models)
    xa, xb = views()
    seed = 1234

    torch.manual_seed(seed)
    chunks = [torch.cat([m(x[i : i + chunk_size]) for i in range(0, N, chunk_size)]) for m, x in zip(models, (xa, xb))]
    ref = simclr(*chunks)
    ref.backward()
    want, rng_after = grads(params), torch.get_rng_state()
    zero(params)

    torch.manual_seed(seed)
    got = cached_backward(models, [xa, xb], simclr, chunk_size=chunk_size)
    assert err(got, ref) <= TOL
    assert max_err(grads(params), want) <= TOL
    assert torch.equal(torch.get_rng_state(), rng_after)  # the generator advanced as for one encoder pass

    zero(params)
    torch.manual_seed(seed + 1)  # different masks: a different gradient (the check above is not vacuous)
    cached_backward(models, [xa, xb], simclr, chunk_size=chunk_size)
    assert max_err(grads(params), want) > 1e-6


def test_autocast_respected():
    """Both encoder passes and loss_fn run under the caller's autocast; the backward passes do not (the
    custom nt_xent backward fails under autocast). bf16 tolerance: the by-hand reference reuses one bf16
    cast of each weight for all chunks, cached_backward casts once per pass."""
    enc = nn.Sequential(nn.Linear(D_IN, 32), nn.Tanh(), nn.Linear(32, D_EMB))
    xa, xb = torch.randn(N, D_IN), torch.randn(N, D_IN)
    seen = []
    enc[2].register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    loss_fn = lambda za, zb: simclr(za, zb) if za.dtype == zb.dtype == torch.bfloat16 else None

    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunks = [torch.cat([enc(x[i : i + 16]) for i in range(0, N, 16)]) for x in (xa, xb)]
        ref = loss_fn(*chunks)
    ref.backward()  # torch.amp: backward outside autocast
    want = grads(enc.parameters())
    zero(enc.parameters())
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cached_backward(enc, [xa, xb], loss_fn, chunk_size=16)
    assert seen == [torch.bfloat16] * (2 * 2 * 4)  # two passes, two streams, four chunks
    assert err(got, ref) <= 1e-6
    for g, w in zip(grads(enc.parameters()), want):
        assert float((g - w).norm() / w.norm()) < 2e-2


@pytest.mark.parametrize("grad_enabled", [True, False])
def test_grad_mode_restored(grad_enabled):
    enc = mlp()
    xa, xb = views()
    with torch.set_grad_enabled(grad_enabled):
        cached_backward(enc, [xa, xb], simclr, chunk_size=16)
        assert torch.is_grad_enabled() == grad_enabled
    assert all(p.grad is not None for p in enc.parameters())


def test_inference_mode_rejected():
    enc = mlp()
    xa, xb = views()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        cached_backward(enc, [xa, xb], simclr, chunk_size=16)


# ----------------------------------------------------------------------------------------------------
# Batch-dependent modules.


def test_batchnorm_training_rejected_with_name():
    enc = mlp(norm=nn.BatchNorm1d(32).double())
    xa, xb = views()
    with pytest.raises(ValueError, match=r"models\[0\]\.2 \(BatchNorm1d, training\).*allow_batch_dependent"):
        cached_backward(enc, [xa, xb], simclr, chunk_size=16)
    assert all(p.grad is None for p in enc.parameters())
    enc.eval()  # running statistics: per-row, allowed
    cached_backward(enc, [xa, xb], simclr, chunk_size=16)


def test_batchnorm_opt_out_is_ghost_batchnorm():
    """allow_batch_dependent=True: each chunk is a normalisation batch, running stats updated once per chunk."""
    models = encoders("shared", norm=nn.BatchNorm1d(32).double())
    bn = models[0][2]
    xa, xb = views()
    chunks = [torch.cat([models[0](x[i : i + 16]) for i in range(0, N, 16)]) for x in (xa, xb)]
    ref = simclr(*chunks)
    ref.backward()
    want, want_stats = grads(models[0].parameters()), [b.clone() for b in bn.buffers()]
    zero(models[0].parameters())
    bn.reset_running_stats()

    got = cached_backward(models, [xa, xb], simclr, chunk_size=16, allow_batch_dependent=True)
    assert err(got, ref) <= TOL
    assert max_err(grads(models[0].parameters()), want) <= TOL
    assert max_err(list(bn.buffers()), want_stats) <= TOL


# ----------------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input():
    enc = mlp()
    xa, xb = views()
    with pytest.raises(ValueError, match="same first dimension"):
        cached_backward(enc, [xa, xb[:-1]], simclr, chunk_size=8)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        cached_backward(enc, [xa, xb], simclr, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be an int"):
        cached_backward(enc, [xa, xb], simclr, chunk_size=2.5)
    with pytest.raises(ValueError, match="one module per input stream"):
        cached_backward([enc], [xa, xb], simclr, chunk_size=8)
    with pytest.raises(TypeError, match="sequence with one entry per stream"):
        cached_backward(enc, xa, simclr, chunk_size=8)
    with pytest.raises(TypeError, match=r"inputs\[1\]\[0\] must be a torch.Tensor"):
        cached_backward(enc, [xa, [xb.tolist()]], simclr, chunk_size=8)
    with pytest.raises(ValueError, match="0-dim"):
        cached_backward(enc, [xa, xb], lambda a, b: (a * b).sum(1), chunk_size=8)
    with pytest.raises(TypeError, match="out\\['loss'\\]"):
        cached_backward(enc, [xa, xb], lambda a, b: {"loss": simclr(a, b)}, chunk_size=8)
    with pytest.raises(ValueError, match=r"does not depend on the embedding\(s\) of stream\(s\) \[1\]"):
        cached_backward(enc, [xa, xb], lambda a, b: simclr(a, b.detach()), chunk_size=8)
    with pytest.raises(ValueError, match=r"stream\(s\) \[0, 1\]"):
        cached_backward(enc, [xa, xb], lambda a, b: torch.zeros((), dtype=a.dtype), chunk_size=8)
    assert all(p.grad is None for p in enc.parameters())  # nothing was touched by a rejected call


# ----------------------------------------------------------------------------------------------------
# 2-rank gloo DistributedDataParallel. adassl_fast.distributed is not used here: each rank's loss is the
# plain nt_xent of its own rows, so DDP's averaged gradient equals the single-process gradient of the
# mean over ranks of the per-rank losses, which is what the reference computes.

WORLD, DDP_CHUNK = 2, 7


def _ddp_setup(kind):
    torch.manual_seed(0)
    models = encoders(kind)
    xa, xb = views()
    return models, xa, xb


def _counting_allreduce(state, bucket):
    state["calls"] += 1
    buf = bucket.buffer().div_(dist.get_world_size())
    return dist.all_reduce(buf, async_op=True).get_future().then(lambda fut: fut.value()[0])


def _ddp_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for kind in ("shared", "separate"):
            models, xa, xb = _ddp_setup(kind)
            wrapped = {id(m): nn.parallel.DistributedDataParallel(m) for m in models}
            counter = {"calls": 0}
            for ddp in wrapped.values():
                ddp.register_comm_hook(counter, _counting_allreduce)
            rows = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
            loss = cached_backward([wrapped[id(m)] for m in models], [xa[rows], xb[rows]], simclr, chunk_size=DDP_CHUNK)
            params = unique_params(*models)
            results[kind] = {"grads": grads(params), "calls": counter["calls"], "ddps": len(wrapped), "loss": loss}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_gloo(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for kind in ("shared", "separate"):
        models, xa, xb = _ddp_setup(kind)
        params = unique_params(*models)
        size = N // WORLD
        losses = [
            simclr(models[0](xa[r * size : (r + 1) * size]), models[1](xb[r * size : (r + 1) * size]))
            for r in range(WORLD)
        ]
        (sum(losses) / WORLD).backward()
        want = grads(params)
        for r, res in enumerate(per_rank):
            assert err(res[kind]["loss"], losses[r]) <= TOL
            assert max_err(res[kind]["grads"], want) <= TOL, (kind, r)
            # one all-reduce per DDP module (one bucket each for these small models), not one per chunk
            assert res[kind]["calls"] == res[kind]["ddps"], (kind, res[kind]["calls"])


def _global_loss(za, zb):
    """The distributed NT-Xent of adassl_fast.distributed: negatives from every rank's rows."""
    return nt_xent(torch.cat([zb, za]), torch.cat([za, zb]), temperature=0.5, process_group=dist.group.WORLD)


def _ddp_global_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        models, xa, xb = _ddp_setup("shared")
        ddp = nn.parallel.DistributedDataParallel(models[0])
        rows = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
        loss = cached_backward([ddp, ddp], [xa[rows], xb[rows]], _global_loss, chunk_size=DDP_CHUNK)
        torch.save({"grads": grads(unique_params(*models)), "loss": loss}, os.path.join(out_dir, f"g{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_with_the_distributed_loss_equals_the_global_batch(tmp_path):
    # cached_backward + DDP + process_group= loss: every rank's loss is the global-batch loss and, after
    # DDP's averaging, the gradients are the single process's on the global batch.
    mp.spawn(_ddp_global_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    models, xa, xb = _ddp_setup("shared")
    za, zb = models[0](xa), models[0](xb)
    half = N // WORLD
    # The global problem pairs rank by rank: [zb of every rank; za of every rank] against [za; zb].
    full = nt_xent(torch.cat([zb[:half], zb[half:], za[:half], za[half:]]),
                   torch.cat([za[:half], za[half:], zb[:half], zb[half:]]), temperature=0.5)
    full.backward()
    want = grads(unique_params(*models))
    for r in range(WORLD):
        res = torch.load(tmp_path / f"g{r}.pt")
        assert err(res["loss"], full) <= TOL
        assert max_err(res["grads"], want) <= TOL, r


# ----------------------------------------------------------------------------------------------------
# Peak memory: CPU RSS of a fresh process, full-batch backward vs cached_backward.

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time
    import torch
    import torch.nn.functional as F
    from torch import nn
    from adassl_fast.cached import cached_backward

    mode, n, chunk, width = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 32))
    xa, xb = torch.randn(n, 16), torch.randn(n, 16)
    # An O(N d) alignment loss, so that the figures are the encoder's (the contrastive losses' own
    # footprint is the same in both modes and belongs to their kernels).
    loss_fn = lambda a, b: -(F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1).mean()
    peak_mb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Warm up on 4 rows (lazy imports, first-call allocations), so the baseline holds everything but the batch.
    loss_fn(enc(xa[:4]), enc(xb[:4])).backward()
    cached_backward(enc, [xa[:4], xb[:4]], loss_fn, chunk_size=2)
    enc.zero_grad()
    base, t0 = peak_mb(), time.perf_counter()
    if mode == "full":
        loss_fn(enc(xa), enc(xb)).backward()
    else:
        cached_backward(enc, [xa, xb], loss_fn, chunk_size=chunk)
    print(json.dumps({"base_mb": base, "peak_mb": peak_mb(), "seconds": time.perf_counter() - t0}))
    """
)


def _peak(mode, n, chunk, width):
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, mode, str(n), str(chunk), str(width)],
        capture_output=True,
        text=True,
        check=True,
        # A fixed glibc mmap threshold: every tensor buffer is its own mapping, returned on free, so RSS
        # follows tensor lifetimes rather than heap fragmentation (with the default dynamic threshold the
        # freed chunks stay resident and the figure depends on the allocation history).
        env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_fresh_process():
    n, chunk, width = 8192, 512, 8192
    full = _peak("full", n, chunk, width)
    cached = _peak("cached", n, chunk, width)
    full_mb, cached_mb = full["peak_mb"] - full["base_mb"], cached["peak_mb"] - cached["base_mb"]
    print(
        f"\npeak RSS above baseline, N={n}, encoder 16-{width}-32 float32, two streams: "
        f"full batch {full_mb:.0f} MB ({full['seconds']:.1f} s), cached_backward chunk_size={chunk} "
        f"{cached_mb:.0f} MB ({cached['seconds']:.1f} s), ratio {cached_mb / full_mb:.3f}"
        " (MALLOC_MMAP_THRESHOLD_=131072)"
    )
    assert cached_mb < 0.15 * full_mb
