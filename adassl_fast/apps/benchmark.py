"""`adassl-fast bench`: time, peak extra memory and error of every backend against the reference.

The one benchmark harness (bench/*.py and bench/device_check.sh call it). docs/perf.md says what to measure:
FLOPs and the floor first, then time (median and spread), achieved TFLOP/s, the ratio to the floor,
the loss's extra memory, and the device, versions and commit beside every number.

Order: the FLOP / floor arithmetic (pure functions, tested against docs/perf.md's floor table); the
environment (device, versions, commit); inputs and the loss of each (op, impl); one measurement;
the plan and its workers; output (JSON, CSV, tables); the CLI.

Why workers: on CPU each row runs in a fresh process, so its peak RSS is its own. On a GPU one process
runs the whole sweep (ratios between backends come from the same process; a diagnostic row that needs its
own environment gets its own worker), and a kernel that kills the CUDA context costs one row: the parent
restarts a worker for the rows after it. Rows are appended to
a file as they finish, so a run cut short by a timeout keeps what it measured.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from adassl_fast.apps.cli import Option, Parser, device_flag

# "supcon": symmetric info_nce with labels= (label-defined positives, 4 rows a label in random order)
OPS = ("nt_xent", "info_nce", "adassl", "siglip", "supcon")
# "eager": each loss written the plain PyTorch way (the side-by-side peer of the CPU targets, docs/perf.md)
IMPLS = ("reference", "eager", "compile", "torch", "triton", "cuda")
# Diagnostic rows (GPU, asked for by name): a backend run with extra environment (in a worker of its own) or a
# fixed backward schedule, as (backend, environment, deterministic: None = the run's --atomic setting).
# "triton_mma_sync" is the Triton backend under Triton's own switch DISABLE_MMA_V3=1 (read by its compiler, part
# of its cache key): the same kernels on Ampere's mma.sync (HMMA in SASS) instead of Hopper's wgmma (HGMMA), the
# instruction class the CUDA backend uses by default. cuda against it says how much of cuda/triton that class
# explains. "cuda_wgmma" is the CUDA backend with its opt-in wgmma tile path (ADASSL_FAST_CUDA_WGMMA=1).
# "triton_atomic" is Triton's one-kernel backward with fp32 atomics (deterministic=False: 6 M^2 d, the work the
# floor assumes) beside the default deterministic rows.
DIAGNOSTICS = {"triton_mma_sync": ("triton", {"DISABLE_MMA_V3": "1"}, None),
               "cuda_wgmma": ("cuda", {"ADASSL_FAST_CUDA_WGMMA": "1"}, None),
               "triton_atomic": ("triton", {}, False)}
BENCH_IMPLS = IMPLS + tuple(DIAGNOSTICS)

PHASES = ("fwd", "bwd", "full")
ROW_KEYS = (
    "op", "impl", "M", "d", "dtype", "phase", "median_ms", "tflops", "floor_ratio", "extra_bytes",
    "device", "torch", "triton", "commit",
)
EXTRA_KEYS = (
    "status", "note", "p20_ms", "p80_ms", "reps", "flops", "floor_ms", "max_abs_err", "rel_err", "err_vs",
    "deterministic", "mem_method", "threads", "date", "host",
)
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16", "half": "float16",
          "fp32": "float32", "float32": "float32", "float": "float32", "fp64": "float64", "float64": "float64"}

# Dense bf16 matrix-product ceilings measured on random data (docs/perf.md, the device library's KINDS.md), by a
# substring of the device name. The floor is defined from these alone: unknown devices and CPUs get None.
PEAK_FLOPS = {"H200": 790e12}

# FLOPs per phase in units of M^2 d (docs/perf.md 1). Executed: what the shipped schedule
# does (the deterministic backward recomputes S twice: 8; with fp32 atomics for dV: 6); the symmetric
# info_nce forward needs row and column LSEs (separate passes: 4), its backward combines both directions in
# one G, except on the CUDA backend, which runs its one-directional backward once per direction (twice the
# work). Floor: the least work any schedule needs (forward 2, backward 6, full 8), for every op.
_EXECUTED = {"fwd": 2, "bwd_det": 8, "bwd_atomic": 6}
_FLOOR = {"fwd": 2, "bwd": 6, "full": 8}


def _backend(impl: str) -> str:
    """The library backend a benchmark impl runs (a diagnostic's, or the impl itself)."""
    return DIAGNOSTICS.get(impl, (impl,))[0]


# ----------------------------------------------------------------------------------------------------
# FLOPs and the floor (pure functions).


def _check_phase(phase: str) -> None:
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")


def phase_flops(op: str, phase: str, m: int, d: int, *, deterministic: bool = True, symmetric: bool = True,
                impl: str = "triton") -> int:
    """Matrix-product FLOPs the schedule of `impl` executes for one call of `phase` (M rows, d features)."""
    _check_phase(phase)
    both_ways = op in ("info_nce", "supcon") and symmetric
    fwd = _EXECUTED["fwd"] * (2 if both_ways else 1)
    bwd = _EXECUTED["bwd_atomic" if _runs_atomic(impl, d, deterministic) else "bwd_det"]
    bwd *= 2 if both_ways and _backend(impl) == "cuda" else 1
    units = {"fwd": fwd, "bwd": bwd, "full": fwd + bwd}[phase]
    return units * m * m * d


def _runs_atomic(impl: str, d: int, deterministic: bool) -> bool:
    """Whether deterministic=False gets the atomic backward: only Triton has one, and only where its H200
    table ships a shape for it (kernels/configs.py); the others run the deterministic schedule."""
    if deterministic or _backend(impl) != "triton":
        return False
    from adassl_fast.kernels.configs import atomic_shipped, block_d

    return atomic_shipped("sm90", "16", block_d(d))


def floor_flops(op: str, phase: str, m: int, d: int) -> int:
    """The least matrix-product FLOPs any schedule needs (docs/perf.md's floor: fwd + bwd = 8 M^2 d)."""
    _check_phase(phase)
    return _FLOOR[phase] * m * m * d


def peak_flops(device: str | None) -> float | None:
    """The measured bf16 dense ceiling of a device by name, or None (CPU, unmeasured GPU)."""
    for key, value in PEAK_FLOPS.items():
        if device and key.lower() in device.lower():
            return value
    return None


def floor_seconds(op: str, phase: str, m: int, d: int, device: str | None) -> float | None:
    """docs/perf.md's floor: least FLOPs over the device's bf16 ceiling; None where no ceiling is known."""
    peak = peak_flops(device)
    return None if peak is None else floor_flops(op, phase, m, d) / peak


def achieved_tflops(flops: float, median_ms: float | None) -> float | None:
    if not median_ms or median_ms <= 0:
        return None
    return flops / (median_ms * 1e-3) / 1e12


def ratio_to_floor(median_ms: float | None, floor_s: float | None) -> float | None:
    if median_ms is None or not floor_s:
        return None
    return median_ms * 1e-3 / floor_s


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default) without numpy."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# ----------------------------------------------------------------------------------------------------
# Environment.


def device_name(device: str) -> str:
    """The GPU's name from NVML (torch as a fallback), or the CPU model."""
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else 0
        try:
            import pynvml

            pynvml.nvmlInit()
            try:
                name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(index))
            finally:
                pynvml.nvmlShutdown()
            return name.decode() if isinstance(name, bytes) else str(name)
        except Exception:
            import torch

            return torch.cuda.get_device_name(index)
    from adassl_fast._dispatch import cpu_name

    return cpu_name()


@functools.cache
def versions() -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version}


@functools.cache
def git_commit() -> str:
    """ADASSL_FAST_COMMIT, else the checkout's HEAD (+"-dirty" when tracked files changed), else "unknown"."""
    if os.environ.get("ADASSL_FAST_COMMIT"):
        return os.environ["ADASSL_FAST_COMMIT"]
    for where in (Path(__file__).resolve().parents[1], Path.cwd()):
        try:
            head = subprocess.run(["git", "-C", str(where), "rev-parse", "--short=12", "HEAD"],
                                  capture_output=True, text=True, timeout=10)
            if head.returncode:
                continue
            dirty = subprocess.run(["git", "-C", str(where), "diff", "--quiet", "HEAD"], timeout=10).returncode
            return head.stdout.strip() + ("-dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            continue
    return "unknown"


# ----------------------------------------------------------------------------------------------------
# Inputs and losses. Fresh random inputs for every row (never zeros), drawn on the device.


def make_inputs(op: str, m: int, d: int, dtype, device: str, seed: int = 0) -> list:
    """The op's tensor arguments for M rows: leaves that need gradients, noise that does not."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(rows, cols, scale=1.0, shift=0.0, grad=True):
        t = torch.randn(rows, cols, generator=gen, device=device, dtype=torch.float32) * scale + shift
        return t.to(dtype).requires_grad_(grad)

    if op in ("nt_xent", "info_nce", "siglip"):
        return [randn(m, d), randn(m, d)]
    if op == "supcon":
        return [randn(m, d), randn(m, d), torch.randperm(m, generator=gen, device=device) // 4]
    if op == "adassl":
        b = m // 2
        post = lambda: torch.cat([randn(b, d, 0.3, grad=False), randn(b, d, 1.0, -1.0, grad=False)], 1)
        posts = [post().requires_grad_(True) for _ in range(4)]  # post_xy, post_yx, prior_xy, prior_yx
        return [randn(b, d), randn(b, d), *posts, randn(b, d, grad=False), randn(b, d, grad=False)]
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def _reference_loss(op: str):
    """The materialising reference of `op` as a plain function of its tensors (what torch.compile gets)."""
    from adassl_fast.adassl import adassl_nt_xent_reference
    from adassl_fast.info_nce import info_nce_reference
    from adassl_fast.nt_xent import nt_xent_reference
    from adassl_fast.siglip import siglip_reference

    if op == "nt_xent":
        return lambda cont, targ: nt_xent_reference(cont, targ, temperature=0.1, scale=None, clamp=20.0)
    if op == "siglip":
        return lambda query, key: siglip_reference(query, key, scale=10.0, bias=-10.0)
    if op == "info_nce":
        return lambda query, key: info_nce_reference(query, key, temperature=0.07, symmetric=True, clamp=None)
    if op == "supcon":
        return lambda query, key, labels: info_nce_reference(query, key, temperature=0.07, labels=labels)

    def adassl(ex, ey, pxy, pyx, qxy, qyx, nxy, nyx):
        l_ssl, l_reg = adassl_nt_xent_reference(ex, ey, pxy, pyx, qxy, qyx, variant="v", temperature=0.1,
                                                clamp=20.0, noise_xy=nxy, noise_yx=nyx)
        return l_ssl + l_reg

    return adassl


def plain_eager_nt_xent(cont, targ, temperature=0.1, clamp=20.0):
    """NT-Xent as users write it in plain PyTorch: the M x M logits, clamped, the partner column at -inf."""
    import torch
    import torch.nn.functional as F

    logits = F.normalize(cont, dim=1) @ F.normalize(targ, dim=1).T / temperature
    logits = logits.clamp(-clamp, clamp)
    rows = torch.arange(logits.shape[0], device=logits.device)
    partner = (rows + logits.shape[0] // 2) % logits.shape[0]
    logits = logits.index_put((rows, partner), logits.new_tensor(float("-inf")))
    return F.cross_entropy(logits, rows)


def plain_eager_info_nce(query, key, temperature=0.07):
    """CLIP's symmetric InfoNCE in plain PyTorch (as OpenCLIP's ClipLoss computes it on one process)."""
    import torch
    import torch.nn.functional as F

    logits = F.normalize(query, dim=1) @ F.normalize(key, dim=1).T / temperature
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def plain_eager_siglip(query, key, scale=10.0, bias=-10.0):
    """SigLIP's sigmoid loss in plain PyTorch, as OpenCLIP's SigLipLoss computes it on one process (features
    normalised by the caller): the N x N logits, labels +1 on the diagonal and -1 elsewhere."""
    import torch
    import torch.nn.functional as F

    logits = scale * F.normalize(query, dim=1) @ F.normalize(key, dim=1).T + bias
    labels = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


def plain_eager_supcon(query, key, labels, temperature=0.07):
    """Symmetric InfoNCE with label-defined positives as peers write it: the N x N logits and an N x N mask of
    the pairs that share a label, each row's targets spread evenly over them."""
    import torch.nn.functional as F

    logits = F.normalize(query, dim=1) @ F.normalize(key, dim=1).T / temperature
    same = (labels[:, None] == labels[None, :]).to(logits.dtype)
    targets = same / same.sum(1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def _plain_eager_loss(op: str):
    """The plain eager peer of `op`: AdaSSL's latent edit as the reference composes it, then plain NT-Xent."""
    import torch

    from adassl_fast.adassl import reference_direction

    if op == "nt_xent":
        return plain_eager_nt_xent
    if op == "info_nce":
        return plain_eager_info_nce
    if op == "siglip":
        return plain_eager_siglip
    if op == "supcon":
        return plain_eager_supcon

    def adassl(ex, ey, pxy, pyx, qxy, qyx, nxy, nyx):
        r_xy, reg_xy = reference_direction(pxy, qxy, nxy, "v")
        r_yx, reg_yx = reference_direction(pyx, qyx, nyx, "v")
        return plain_eager_nt_xent(torch.cat([ey + r_yx, ex + r_xy]), torch.cat([ex, ey])) + (reg_xy + reg_yx) / 2

    return adassl


def loss_function(op: str, impl: str, deterministic: bool = True):
    """A callable (*inputs) -> 0-dim loss for `impl` ("compile" = torch.compile of the reference)."""
    import adassl_fast

    impl = _backend(impl)
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if impl == "reference":
        return _reference_loss(op)
    if impl == "eager":
        return _plain_eager_loss(op)
    if impl == "compile":
        import torch

        torch._dynamo.reset()  # a fresh compile per row: no dynamic-shape recompile carried across sizes
        return torch.compile(_reference_loss(op), dynamic=False)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if op == "nt_xent":
        return lambda c, t: adassl_fast.nt_xent(c, t, temperature=0.1, clamp=20.0, impl=impl,
                                                deterministic=deterministic)
    if op == "info_nce":
        return lambda q, k: adassl_fast.info_nce(q, k, temperature=0.07, symmetric=True, impl=impl,
                                                 deterministic=deterministic)
    if op == "siglip":
        return lambda q, k: adassl_fast.siglip(q, k, scale=10.0, bias=-10.0, impl=impl)
    if op == "supcon":
        return lambda q, k, labels: adassl_fast.info_nce(q, k, temperature=0.07, labels=labels, impl=impl,
                                                         deterministic=deterministic)

    def adassl(ex, ey, pxy, pyx, qxy, qyx, nxy, nyx):
        l_ssl, l_reg = adassl_fast.adassl_nt_xent(ex, ey, pxy, pyx, qxy, qyx, variant="v", temperature=0.1,
                                                  clamp=20.0, noise_xy=nxy, noise_yx=nyx, impl=impl,
                                                  deterministic=deterministic)
        return l_ssl + l_reg

    return adassl


def _phase_step(fn, inputs: list, phase: str):
    """(step, clear): one call of the phase, and the reset of the inputs' gradients between calls."""
    params = [t for t in inputs if t.requires_grad]

    def clear():
        for p in params:
            p.grad = None

    if phase == "fwd":
        return (lambda: fn(*inputs)), clear
    if phase == "full":
        return (lambda: fn(*inputs).backward()), clear
    loss = fn(*inputs)  # bwd: the graph is built once and kept; its saved tensors count as the baseline
    return (lambda: loss.backward(retain_graph=True)), clear


# ----------------------------------------------------------------------------------------------------
# One measurement.


def _reps(estimate_s: float, budget_s: float, min_reps: int, max_reps: int, time_left_s: float) -> int:
    """Timed calls: fill `budget_s`, at least min_reps (1 once a call exceeds the budget), within the time left."""
    floor = min_reps if estimate_s <= budget_s else 1
    n = max(floor, min(max_reps, int(budget_s / max(estimate_s, 1e-9))))
    fits = time_left_s / max(estimate_s, 1e-9)
    return max(1, n if fits >= n else int(fits))


def _time_cuda(step, clear, device, budget_s, min_reps, max_reps, time_left_s):
    """CUDA-event times of `step` (L2 flushed before each) and the peak allocated bytes above the baseline.

    One untimed warm-up (JIT, compilation, autotuning); the first timed call sets how many follow."""
    import torch

    t0 = time.perf_counter()
    clear()
    step()
    torch.cuda.synchronize(device)
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device)  # > L2: every call starts cold
    clear()
    gc.collect()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    times, reps = [], 1
    while len(times) < reps:
        clear()
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        if not times:
            torch.cuda.synchronize(device)
            first = a.elapsed_time(b) * 1e-3
            reps = _reps(first, budget_s, min_reps, max_reps, time_left_s - (time.perf_counter() - t0) + first)
        times.append((a, b))
    torch.cuda.synchronize(device)
    extra = torch.cuda.max_memory_allocated(device) - base
    return [a.elapsed_time(b) for a, b in times], extra, "cuda max_memory_allocated - baseline"


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def _time_cpu(step, clear, budget_s, min_reps, max_reps, time_left_s):
    """Host-clock times of `step` after one warm-up; the first timed call also gives the peak RSS above the
    baseline and sets how many calls follow."""
    import resource

    t0 = time.perf_counter()
    clear()
    step()
    clear()
    gc.collect()
    if _reset_peak_rss():
        base, method = _status_kib("VmRSS"), "peak RSS (VmHWM after reset) - RSS before"
        read_peak = lambda: _status_kib("VmHWM")
    else:
        base, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss after - before"
        read_peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, extra, reps = [], None, 1
    while len(times) < reps:
        clear()
        t1 = time.perf_counter()
        step()
        elapsed = time.perf_counter() - t1
        times.append(elapsed * 1e3)
        if extra is None:
            extra = max(0, read_peak() - base) * 1024
            reps = _reps(elapsed, budget_s, min_reps, max_reps, time_left_s - (time.perf_counter() - t0) + elapsed)
    return times, extra, method


def _error_vs_reference(op, fn, inputs, phase) -> dict:
    """Max abs and max relative (norm-wise) error of the loss and every input gradient vs the float64 reference."""
    import torch

    def run(f, tensors):
        params = [t for t in tensors if t.requires_grad]
        loss = f(*tensors)
        grads = list(torch.autograd.grad(loss, params)) if phase != "fwd" else []
        return [loss.detach()] + grads

    ref_inputs = [t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t
                  for t in inputs]
    ours = [x.double() for x in run(fn, [t.detach().requires_grad_(t.requires_grad) for t in inputs])]
    ref = run(_reference_loss(op), ref_inputs)
    max_abs = max(float((a - b).abs().max()) for a, b in zip(ours, ref, strict=True))
    rel = max(float((a - b).norm() / b.norm().clamp_min(1e-300)) for a, b in zip(ours, ref, strict=True))
    return {"max_abs_err": max_abs, "rel_err": rel, "err_vs": "reference float64"}


def measure(spec: dict, settings: dict, time_left_s: float = math.inf) -> dict:
    """Time, extra memory and error of one (op, impl, M, d, dtype, phase) on spec["device"]."""
    import torch

    device, phase = spec["device"], spec["phase"]
    dtype = getattr(torch, DTYPES[spec["dtype"]])
    inputs = make_inputs(spec["op"], spec["M"], spec["d"], dtype, device, seed=spec.get("seed", 0))
    fn = loss_function(spec["op"], spec["impl"], spec.get("deterministic", True))
    step, clear = _phase_step(fn, inputs, phase)
    args = (settings["budget_s"], settings["min_reps"], settings["max_reps"], time_left_s)
    if device.startswith("cuda"):
        times, extra, method = _time_cuda(step, clear, torch.device(device), *args)
    else:
        times, extra, method = _time_cpu(step, clear, *args)
    out = {"median_ms": quantile(times, 0.5), "p20_ms": quantile(times, 0.2), "p80_ms": quantile(times, 0.8),
           "reps": len(times), "extra_bytes": int(extra) if extra is not None else None, "mem_method": method}
    del step
    clear()
    if spec["M"] <= settings["err_max_m"]:
        out.update(_error_vs_reference(spec["op"], fn, inputs, phase))
    return out


# ----------------------------------------------------------------------------------------------------
# Rows, the plan and its workers.


def _base_row(spec: dict, env: dict) -> dict:
    flops = phase_flops(spec["op"], spec["phase"], spec["M"], spec["d"], deterministic=spec["deterministic"],
                        impl=spec["impl"])
    floor_s = floor_seconds(spec["op"], spec["phase"], spec["M"], spec["d"], env["device"])
    row = {k: spec[k] for k in ("op", "impl", "M", "d", "dtype", "phase")}
    row.update(median_ms=None, tflops=None, floor_ratio=None, extra_bytes=None, device=env["device"],
               torch=env["torch"], triton=env["triton"], commit=env["commit"])
    row.update({k: None for k in EXTRA_KEYS})
    row.update(status="skipped", note="", flops=flops, floor_ms=None if floor_s is None else floor_s * 1e3,
               deterministic=spec["deterministic"], date=env["date"], host=env["host"])
    return row


def environment(device: str) -> dict:
    import platform

    return {"device": device_name(device), **versions(), "commit": git_commit(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "host": platform.node()}


def _cuda_context_lost(device: str) -> bool:
    import torch

    if not device.startswith("cuda"):
        return False
    try:
        torch.cuda.synchronize()
        torch.empty(1, device=device).add_(1).item()
        return False
    except Exception:
        return True


def run_row(spec: dict, settings: dict, env: dict, deadline: float) -> dict:
    """Measure one row; a backend that cannot run, an OOM or a failure becomes a row with the reason."""
    import torch

    from adassl_fast import BackendUnavailable

    row = _base_row(spec, env)
    time_left = deadline - time.time()
    if time_left <= 0:
        row["note"] = "not run: the run's deadline had passed"
        return row
    try:
        row.update(measure(spec, settings, time_left))
        row["status"], row["threads"] = "ok", torch.get_num_threads()
        row["tflops"] = achieved_tflops(row["flops"], row["median_ms"])
        floor_s = None if row["floor_ms"] is None else row["floor_ms"] / 1e3
        row["floor_ratio"] = ratio_to_floor(row["median_ms"], floor_s)
    except BackendUnavailable as exc:
        row["note"] = str(exc)
    except torch.cuda.OutOfMemoryError as exc:
        row["status"], row["note"] = "oom", str(exc).splitlines()[0][:300]
    except Exception as exc:
        lines = [ln for ln in str(exc).splitlines() if ln.strip()] or [""]
        row["status"], row["note"] = "error", f"{type(exc).__name__}: {' | '.join(lines[:3])}"[:500]
    finally:
        gc.collect()
        if spec["device"].startswith("cuda") and torch.cuda.is_available():
            try:
                torch.cuda.empty_cache()
            except Exception:
                pass
    return row


def _worker(plan_path: str, out_path: str) -> int:
    """Run the plan's rows in order, appending each finished row to out_path as one JSON line."""
    with open(plan_path) as f:
        plan = json.load(f)
    settings, deadline = plan["settings"], plan["deadline"]
    if settings.get("threads"):
        import torch

        torch.set_num_threads(settings["threads"])
    env = environment(plan["rows"][0]["device"]) if plan["rows"] else {}
    last = {}  # (op, impl, d, dtype, phase) -> (M, seconds per call): predicts the next size's cost
    for spec in plan["rows"]:
        key = (spec["op"], spec["impl"], spec["d"], spec["dtype"], spec["phase"])
        predicted = None
        if key in last:
            m0, s0 = last[key]
            predicted = s0 * (spec["M"] / m0) ** 2 * 2  # warm-up + one timed call
        if predicted is not None and time.time() + predicted > deadline:
            row = _base_row(spec, env)
            row["note"] = f"not run: predicted {predicted:.0f} s exceeds the time left before the deadline"
        else:
            row = run_row(spec, settings, env, deadline)
        if row["status"] == "ok":
            last[key] = (spec["M"], row["median_ms"] / 1e3)
        with open(out_path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if row["status"] == "error" and _cuda_context_lost(spec["device"]):
            return 3  # the parent starts a fresh worker for the rows after this one
    return 0


def _worker_env(spec: dict) -> dict:
    """The environment a row's worker needs on top of ours (a diagnostic impl's switches)."""
    return DIAGNOSTICS.get(spec["impl"], ("", {}, None))[1]


def _next_batch(todo: list[dict], isolate: str) -> list[dict]:
    """The rows the next worker runs: one ("row"), or the leading rows that need the same worker environment."""
    if isolate == "row":
        return todo[:1]
    env = _worker_env(todo[0])
    return todo[:next((i for i, s in enumerate(todo) if _worker_env(s) != env), len(todo))]


def _child_env(extra: dict) -> dict:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the child imports what we imported
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # big blocks go back to the OS when freed: RSS is honest
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut off by a kill
            pass
    return rows


class _Interrupted(Exception):
    """SIGTERM (e.g. from `timeout`) or Ctrl-C: stop the workers and keep what they measured."""


def _run_workers(specs: list[dict], settings: dict, deadline: float, isolate: str, progress, env: dict) -> list:
    """Rows for `specs` in order: one worker per row ("row") or per run ("run"), restarted after a crash."""
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="adassl_bench_"))
    todo = list(specs)
    attempt, stop = 0, None
    while todo and stop is None:
        if time.time() > deadline:
            stop = "not run: the run's deadline had passed"
            break
        attempt += 1
        batch = _next_batch(todo, isolate)
        plan, out = tmp / f"plan{attempt}.json", tmp / f"rows{attempt}.jsonl"
        plan.write_text(json.dumps({"settings": settings, "deadline": deadline, "rows": batch}))
        log = tmp / f"worker{attempt}.log"
        done, killed = 0, None
        limit = settings["row_timeout_s"]
        with open(log, "w") as logf:
            worker = [sys.executable, "-m", "adassl_fast.apps.benchmark", "--worker", str(plan), str(out)]
            env = _child_env(_worker_env(batch[0]))
            proc = subprocess.Popen(worker, stdout=logf, stderr=subprocess.STDOUT, env=env)
            started = time.time()
            try:
                while proc.poll() is None:
                    time.sleep(0.2)
                    now_done = len(_read_rows(out))
                    if now_done != done:
                        progress.update(now_done - done)
                        done, started = now_done, time.time()
                    if time.time() - started > limit:
                        killed = f"killed after {limit:.0f} s on one row (--row-timeout-s)"
                    elif time.time() > deadline + settings["grace_s"]:
                        killed = "killed: the run's deadline had passed"
                    if killed:
                        proc.kill()
                        proc.wait()
            except (_Interrupted, KeyboardInterrupt):
                killed = stop = "interrupted (SIGTERM or Ctrl-C)"
                proc.kill()
                proc.wait()
        got = _read_rows(out)
        progress.update(len(got) - done)
        rows += got
        todo = todo[len(got):]
        if todo and proc.returncode not in (0, 3):  # the first unfinished row is the culprit
            bad = _base_row(todo[0], env)
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])[-400:]
            bad.update(status="skipped" if stop else "error",
                       note=f"{killed or f'worker exited with code {proc.returncode}'}: {tail}".rstrip(": "))
            rows.append(bad)
            progress.update(1)
            todo = todo[1:]
    for spec in todo:
        r = _base_row(spec, env)
        r["note"] = stop or "not run"
        rows.append(r)
        progress.update(1)
    return rows


def pre_skip_reason(spec: dict, settings: dict, probe: dict) -> str | None:
    """Why a row is not worth a process (decided from sizes and cheap probes), or None."""
    impl, m = spec["impl"], spec["M"]
    if impl in DIAGNOSTICS and not spec["device"].startswith("cuda"):
        backend, env, det = DIAGNOSTICS[impl]
        how = " ".join([f"{k}={v}" for k, v in env.items()] + ([f"deterministic={det}"] if det is not None else []))
        return f"{impl}: a GPU diagnostic ({backend} with {how}), nothing to measure on CPU"
    if impl in ("reference", "eager", "compile") and m > settings["ref_max_m"]:
        return f"{impl} materialises M x M logits: not run above M = {settings['ref_max_m']} (--ref-max-m)"
    if impl == "torch" and m > settings["torch_max_m"]:
        return f"chunked torch backend too slow here: not run above M = {settings['torch_max_m']} (--torch-max-m)"
    if impl in probe and probe[impl]:
        return probe[impl]
    if impl == "triton" and spec["device"] == "cpu" and m > settings["interpret_max_m"]:
        return f"Triton interpreter on CPU: not run above M = {settings['interpret_max_m']} (--interpret-max-m)"
    if impl == "compile" and spec["device"] == "cpu" and settings.get("quick"):
        return "torch.compile builds for 20-110 s on a CPU: left out of --quick (ask for --impl compile)"
    return None


def _probe_backends(device: str, impls: list[str]) -> dict:
    """Reasons triton / cuda cannot run, probed here only where that is cheap (no GPU: nothing to build)."""
    from adassl_fast._dispatch import unavailable_reason

    out = {}
    if device.startswith("cuda"):
        return out  # the worker finds out (building the CUDA extension belongs in the measured process)
    for impl in impls:
        if impl in ("triton", "cuda"):
            try:
                reason = unavailable_reason(impl)
            except Exception as exc:
                reason = f"probe failed: {type(exc).__name__}: {exc}"
            if reason is None and impl == "cuda":
                reason = "needs CUDA tensors"
            out[impl] = None if reason is None else f'impl="{impl}" cannot run: {reason}'
    return out


def build_specs(ops, impls, ms, ds, dtype, phases, device, deterministic, sizes_for=None) -> list[dict]:
    """The rows to measure, M-major (the order given is the priority when a deadline cuts the run)."""
    sizes_for = sizes_for or {}  # impl or op -> the only M it runs at (both apply where both are given)
    specs = []
    for m in ms:
        for d in ds:
            for op in ops:
                for phase in phases:
                    for impl in impls:
                        if any(key in sizes_for and m not in sizes_for[key] for key in (impl, op)):
                            continue
                        det = DIAGNOSTICS.get(impl, ("", {}, None))[2]
                        specs.append({"op": op, "impl": impl, "M": m, "d": d, "dtype": dtype, "phase": phase,
                                      "device": device, "deterministic": deterministic if det is None else det,
                                      "seed": len(specs)})
    return specs


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def run(specs: list[dict], settings: dict, *, isolate: str, deadline: float, show_progress: bool) -> list[dict]:
    """Measure every spec (pre-skipped ones become rows with the reason); rows come back in spec order."""
    if not specs:
        return []
    device = specs[0]["device"]
    env = environment(device)
    probe = _probe_backends(device, sorted({s["impl"] for s in specs}))
    rows: dict[int, dict] = {}
    todo = []
    for i, spec in enumerate(specs):
        reason = pre_skip_reason(spec, settings, probe)
        if reason:
            rows[i] = _base_row(spec, env)
            rows[i]["note"] = reason
        else:
            todo.append((i, spec))
    # the targets' rows first, then each diagnostic's rows together (one worker per environment)
    todo.sort(key=lambda item: tuple(sorted(_worker_env(item[1]).items())))
    bar = _NoBar()
    if show_progress and len(todo) > 1:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="bench", unit="row", file=sys.stderr)
        except ImportError:
            pass
    import signal

    def interrupted(signum, frame):
        raise _Interrupted()

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        measured = _run_workers([s for _, s in todo], settings, deadline, isolate, bar, env)
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()
    for (i, _), row in zip(todo, measured, strict=True):
        rows[i] = row
    return [rows[i] for i in sorted(rows)]


# ----------------------------------------------------------------------------------------------------
# Output.


def write_rows(rows: list[dict], out_dir: str | Path, stem: str = "rows") -> tuple[Path, Path]:
    """rows.json (a list of row objects) and rows.csv (ROW_KEYS first, then EXTRA_KEYS)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / f"{stem}.json", out / f"{stem}.csv"
    json_path.write_text(json.dumps(rows, indent=1) + "\n")
    keys = list(ROW_KEYS) + [k for k in EXTRA_KEYS] + sorted({k for r in rows for k in r} - set(ROW_KEYS + EXTRA_KEYS))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k) for k in keys})
    return json_path, csv_path


def load_rows(paths) -> list[dict]:
    rows = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        rows += data if isinstance(data, list) else data.get("rows", [])
    return rows


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt(x, spec=".3g") -> str:
    return "-" if x is None else format(x, spec)


def _group_key(r: dict) -> tuple:
    return (r["op"], r["M"], r["d"], r["dtype"], r["phase"])


def format_table(rows: list[dict]) -> str:
    """Measured rows as an aligned table (time, spread, TFLOP/s, floor ratio, memory, error, speed-up over
    the eager reference of the same size, time and memory as fractions of the plain eager loss's), then one
    line per row that did not run, with the reason."""
    ok = lambda impl: {_group_key(r): r for r in rows if r["impl"] == impl and r["status"] == "ok"}
    ref, plain = ok("reference"), ok("eager")
    head = ["op", "impl", "M", "d", "dtype", "phase", "median ms", "p20-p80 ms", "TFLOP/s", "x floor",
            "extra mem", "max|err|", "x eager", "t / plain", "mem / plain"]
    body = []
    for r in rows:
        if r["status"] != "ok":
            continue
        base, peer = ref.get(_group_key(r)), plain.get(_group_key(r))
        ratio = lambda a, b: a / b if a is not None and b else None
        body.append([r["op"], r["impl"], str(r["M"]), str(r["d"]), r["dtype"], r["phase"], _fmt(r["median_ms"], ".4g"),
                     f"{_fmt(r['p20_ms'], '.4g')}-{_fmt(r['p80_ms'], '.4g')}", _fmt(r["tflops"], ".3g"),
                     _fmt(r["floor_ratio"], ".2f"), _fmt_bytes(r["extra_bytes"]), _fmt(r.get("max_abs_err"), ".1e"),
                     _fmt(ratio(base and base["median_ms"], r["median_ms"]), ".2f"),
                     _fmt(ratio(r["median_ms"], peer and peer["median_ms"]), ".3f"),
                     _fmt(ratio(r["extra_bytes"], peer and peer["extra_bytes"]), ".3f")])
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)] if body else [len(h) for h in head]
    lines = ["  ".join(x.rjust(w) for x, w in zip(line, widths, strict=True)) for line in [head, *body]]
    if not body:
        lines.append("(no measured rows)")
    skipped = [r for r in rows if r["status"] != "ok"]
    if skipped:
        lines.append("")
        lines.append("not measured:")
        seen = set()
        for r in skipped:
            key = (r["op"], r["impl"], r["status"], r["note"])
            if key in seen:
                continue
            sizes = sorted({x["M"] for x in skipped if (x["op"], x["impl"], x["status"], x["note"]) == key})
            seen.add(key)
            lines.append(f"  {r['op']} {r['impl']} M={','.join(map(str, sizes))}: {r['status']}: {r['note']}")
    return "\n".join(lines)


def _row(rows, op, impl, m, phase="full"):
    for r in rows:
        if (r["op"], r["impl"], r["M"], r["phase"]) == (op, impl, m, phase) and r["status"] == "ok":
            return r
    return None


def instruction_class_share(triton: dict | None, cuda: dict | None, mma_sync: dict | None) -> str | None:
    """What the triton_mma_sync diagnostic says about cuda/triton: how much slower Triton gets on the CUDA
    backend's matrix instruction (mma.sync instead of wgmma), and the share of log(cuda/triton) that explains."""
    if not (triton and cuda and mma_sync):
        return None
    gap, own = cuda["median_ms"] / triton["median_ms"], mma_sync["median_ms"] / triton["median_ms"]
    share = f", {math.log(own) / math.log(gap):.0%} of the gap (log scale)" if gap > 1 and own > 0 else ""
    return (f"cuda/triton {gap:.2f}; Triton on mma.sync (DISABLE_MMA_V3=1) is {own:.2f}x Triton on wgmma and "
            f"cuda is {cuda['median_ms'] / mma_sync['median_ms']:.2f}x it: the matrix instruction accounts for "
            f"{own:.2f}x{share}")


def summarize(rows: list[dict], ops=("nt_xent", "adassl")) -> str:
    """docs/perf.md's targets, read off the rows: fused time and ratio to the floor per M, speed-ups over eager and
    torch.compile, CUDA vs Triton, extra memory; then PASS / FAIL / UNMEASURED per target, and a WHY line
    for cuda/triton where the triton_mma_sync diagnostic ran."""
    ms = sorted({r["M"] for r in rows if r["phase"] == "full"})
    dev = next((r["device"] for r in rows), "?")
    commit = next((r["commit"] for r in rows), "?")
    lines = [f"summary: {dev}, commit {commit}, phase full (fwd + bwd), d/dtype as measured"]
    head = ["op", "M", "triton ms", "x floor", "cuda ms", "x floor", "cuda/triton", "torch ms", "eager ms",
            "compile ms", "eager/fused", "compile/fused", "fused mem"]
    body = []
    verdicts = []
    for op in ops:
        for m in ms:
            t, c, th = _row(rows, op, "triton", m), _row(rows, op, "cuda", m), _row(rows, op, "torch", m)
            e, k = _row(rows, op, "reference", m), _row(rows, op, "compile", m)
            if not any((t, c, th, e, k)):
                continue
            fused = t or c or th
            ms_ = lambda r: None if r is None else r["median_ms"]
            div = lambda a, b: None if a is None or b is None or not b["median_ms"] else a["median_ms"] / b["median_ms"]
            body.append([op, str(m), _fmt(ms_(t), ".4g"), _fmt(t and t["floor_ratio"], ".2f"), _fmt(ms_(c), ".4g"),
                         _fmt(c and c["floor_ratio"], ".2f"), _fmt(div(c, t), ".2f"), _fmt(ms_(th), ".4g"),
                         _fmt(ms_(e), ".4g"), _fmt(ms_(k), ".4g"), _fmt(div(e, fused), ".2f"),
                         _fmt(div(k, fused), ".2f"),
                         _fmt_bytes(fused and fused["extra_bytes"])])
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)] if body else [len(h) for h in head]
    lines += ["  ".join(x.rjust(w) for x, w in zip(line, widths, strict=True)) for line in [head, *body]]

    def verdict(name, value, ok):
        if value is None:
            verdicts.append(f"UNMEASURED  {name}")
        else:
            verdicts.append(f"{'PASS' if ok(value) else 'FAIL'}  {name}: {value:.3g}")

    for op in ops:
        # (triton_atomic: the same targets for Triton's deterministic=False schedule, where it was measured)
        for impl in ("triton", "cuda", "triton_atomic"):
            optional = impl in DIAGNOSTICS
            for m in [m for m in ms if m >= 65536] or [65536]:
                r = _row(rows, op, impl, m)
                if r or not optional:
                    verdict(f"{op} {impl} M={m} x floor <= 1.5", r and r["floor_ratio"], lambda v: v <= 1.5)
            r = _row(rows, op, impl, 8192)
            if r or not optional:
                verdict(f"{op} {impl} M=8192 x floor <= 2.5", r and r["floor_ratio"], lambda v: v <= 2.5)
        fused = _row(rows, op, "triton", 32768) or _row(rows, op, "cuda", 32768)
        e, k = _row(rows, op, "reference", 32768), _row(rows, op, "compile", 32768)
        verdict(f"{op} M=32768 eager/fused >= 5", e and fused and e["median_ms"] / fused["median_ms"], lambda v: v >= 5)
        verdict(f"{op} M=32768 compile/fused >= 2.5", k and fused and k["median_ms"] / fused["median_ms"],
                lambda v: v >= 2.5)
        big = _row(rows, op, "triton", 2097152) or _row(rows, op, "cuda", 2097152)
        verdicts.append(f"{'PASS' if big else 'UNMEASURED'}  {op} M=2097152 fwd+bwd on one GPU"
                        + (f": {big['impl']} {big['median_ms']:.4g} ms, extra {_fmt_bytes(big['extra_bytes'])}"
                           if big else ""))
        for m in [m for m in ms if m >= 32768]:
            t, c = _row(rows, op, "triton", m), _row(rows, op, "cuda", m)
            verdict(f"{op} M={m} cuda/triton <= 1.3", t and c and c["median_ms"] / t["median_ms"], lambda v: v <= 1.3)
            why = instruction_class_share(t, c, _row(rows, op, "triton_mma_sync", m))
            if why:
                verdicts.append(f"WHY   {op} M={m}: {why}")
            w = _row(rows, op, "cuda_wgmma", m)
            if w:
                verdict(f"{op} M={m} cuda_wgmma/triton <= 1.3 (opt-in path)", t and w["median_ms"] / t["median_ms"],
                        lambda v: v <= 1.3)
    lines.append("")
    lines += verdicts
    bad = [r for r in rows if r["status"] in ("error", "oom")]
    if bad:
        lines.append("")
        lines.append("errors:")
        lines += [f"  {r['op']} {r['impl']} M={r['M']}: {r['status']}: {r['note'][:200]}" for r in bad]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# CLI.


def _ints(text: str, minimum: int = 1) -> list[int]:
    """A comma list of integers >= minimum, 2^k allowed (an argparse `type`, through functools.partial)."""
    out = []
    for part in filter(None, (p.strip().lower() for p in text.split(","))):
        try:
            value = 2 ** int(part[2:]) if part.startswith("2^") else int(float(part))
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected a comma list of integers (2^k allowed), got {text!r}") \
                from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"every value must be >= {minimum}, got {value}")
        out.append(value)
    if not out:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}")
    return out


def _names(allowed):
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        for n in names:
            if n not in allowed:
                raise argparse.ArgumentTypeError(f"{n!r} is not one of {', '.join(allowed)}")
        if not names:
            raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(allowed)}")
        return names

    return parse


def _sizes_for(text: str) -> tuple[str, list[int]]:
    key, _, sizes = text.partition("=")
    if key not in BENCH_IMPLS + OPS or not sizes:
        raise argparse.ArgumentTypeError(f"expected IMPL=M1,M2 or OP=M1,M2 with IMPL in {BENCH_IMPLS}, OP in {OPS}, "
                                         f"got {text!r}")
    return key, _ints(sizes, minimum=2)


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="adassl-fast bench", description=(
        "Time, peak extra memory and error vs the float64 reference of every backend (docs/perf.md). "
        "impl 'compile' is torch.compile of the reference."))
    # (the help text goes to add_argument; an Option here only checks the value)
    count = lambda minimum=1: Option("", int, minimum=minimum).parse
    seconds = Option("", float, above=0).parse
    p.add_argument("--op", type=_names(OPS), help=f"comma list of {OPS} (default: all)")
    p.add_argument("--impl", type=_names(BENCH_IMPLS),
                   help=f"comma list of {IMPLS} (default: all), or the GPU diagnostic {tuple(DIAGNOSTICS)}")
    p.add_argument("--M", "-M", dest="ms", type=functools.partial(_ints, minimum=2),
                   help="comma list of row counts >= 2, 2^k allowed (default CPU 1024..16384, GPU 4096..2^21)")
    p.add_argument("--d", "-d", dest="ds", type=_ints, help="comma list of feature dims (default 128)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--phase", type=_names(PHASES), help="comma list of fwd, bwd, full (default full)")
    p.add_argument("--device", default="auto", type=device_flag,
                   help="auto (cuda if available), cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--quick", action="store_true",
                   help="short comparison: nt_xent, adassl; M 1024,4096; d 128; full (default: off)")
    p.add_argument("--out", help="write rows.json and rows.csv here (default: print only)")
    p.add_argument("--atomic", action="store_true",
                   help="non-deterministic backward (fp32 atomics) in fused backends (default: off)")
    p.add_argument("--budget-s", type=Option("", float, minimum=0).parse,
                   help="timed seconds per row, 0 for one timed call (default 1 GPU, 2 CPU)")
    p.add_argument("--min-reps", type=count(), default=3, help="timed repetitions at least (default: 3)")
    p.add_argument("--max-reps", type=count(), default=100,
                   help="timed repetitions at most, >= --min-reps (default: 100)")
    p.add_argument("--ref-max-m", type=count(2),
                   help="largest M for reference / compile (default CPU 16384, GPU 32768)")
    p.add_argument("--torch-max-m", type=count(2),
                   help="largest M for the torch backend (default CPU 16384, GPU 262144)")
    p.add_argument("--err-max-m", type=count(0), help="largest M checked against the float64 reference, 0 for "
                   "none (default 4096 CPU, 8192 GPU)")
    p.add_argument("--interpret-max-m", type=count(2), default=256,
                   help="largest M for Triton's CPU interpreter (default: 256)")
    p.add_argument("--sizes-for", action="append", type=_sizes_for, default=[], metavar="IMPL=M1,M2",
                   help="run an impl or an op only at these M (repeatable), e.g. compile=32768, info_nce=8192")
    p.add_argument("--deadline-s", type=seconds, default=math.inf,
                   help="stop starting rows after this many seconds (default: none)")
    p.add_argument("--grace-s", type=Option("", float, minimum=0).parse, default=30.0,
                   help="kill the worker this long after the deadline (default: 30)")
    p.add_argument("--row-timeout-s", type=seconds, default=600.0,
                   help="kill a worker stuck this long on one row (default: 600)")
    p.add_argument("--isolate", choices=("row", "run"),
                   help="a fresh process per row (CPU default) or per run (GPU default)")
    p.add_argument("--threads", type=count(), help="torch CPU threads in each worker (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown)")
    p.add_argument("--summary", nargs="+", metavar="ROWS_JSON", help="print the PERF-target summary of saved rows")
    p.add_argument("--worker", nargs=2, metavar=("PLAN", "OUT"), help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.max_reps < args.min_reps:
        parser.error(f"--max-reps {args.max_reps} is below --min-reps {args.min_reps}")
    if args.worker:
        return _worker(*args.worker)
    if args.summary:
        rows = load_rows(args.summary)
        print(format_table(rows))
        print()
        print(summarize(rows))
        return 0
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = "cuda:0"
    gpu = device.startswith("cuda")  # (a CUDA device that is not there was refused by the parser)
    if args.quick:
        ops, impls = args.op or ["nt_xent", "adassl"], args.impl or list(IMPLS)
        ms, ds, phases = args.ms or [1024, 4096], args.ds or [128], args.phase or ["full"]
        budget = args.budget_s if args.budget_s is not None else (0.5 if gpu else 1.0)
    else:
        ops, impls = args.op or list(OPS), args.impl or list(IMPLS)
        ms = args.ms or ([4096 << k for k in range(10)] if gpu else [1024, 2048, 4096, 8192, 16384])
        ds, phases = args.ds or [128], args.phase or ["full"]
        budget = args.budget_s if args.budget_s is not None else (1.0 if gpu else 2.0)
    dtype = DTYPES[args.dtype] if args.dtype else ("bfloat16" if gpu else "float32")
    settings = {
        "budget_s": budget, "min_reps": args.min_reps, "max_reps": args.max_reps, "quick": args.quick,
        "ref_max_m": args.ref_max_m or (32768 if gpu else 16384),
        "torch_max_m": args.torch_max_m or (262144 if gpu else 16384),
        "err_max_m": args.err_max_m if args.err_max_m is not None else (8192 if gpu else 4096),
        "interpret_max_m": args.interpret_max_m, "threads": args.threads,
        "row_timeout_s": args.row_timeout_s, "grace_s": args.grace_s,
    }
    specs = build_specs(ops, impls, ms, ds, dtype, phases, device, not args.atomic, dict(args.sizes_for))
    deadline = time.time() + args.deadline_s if math.isfinite(args.deadline_s) else 1e18
    isolate = args.isolate or ("run" if gpu else "row")
    rows = run(specs, settings, isolate=isolate, deadline=deadline, show_progress=not args.no_progress)
    print(format_table(rows))
    if args.out:
        json_path, csv_path = write_rows(rows, args.out)
        print(f"\nwrote {json_path} and {csv_path}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
