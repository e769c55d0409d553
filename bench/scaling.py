"""Scaling of the distributed losses (gather and ring schedules) and a cost model for when the ring hides
its communication.

Three sub-commands:

    python bench/scaling.py model [--d 128] [--dtype bfloat16]
        The alpha-beta cost model: for an H200 NVLink node (~450 GB/s per direction per GPU, alpha ~5 us,
        up to 8 GPUs) and an InfiniBand cluster (~50 GB/s per GPU, alpha ~10 us, 16..256 GPUs), the local
        batch (rows per rank, M_r = 2 B_r) above which the ring hides its transfers behind the block kernels,
        the kernels timed at docs/perf.md's floor (8 M^2 d FLOPs forward + backward at 790 TFLOP/s bf16), and the
        exposed communication of the gather schedule. Pure arithmetic: runs anywhere.

    python bench/scaling.py sweep [--max-procs 4] [--device cpu|cuda] [--ops nt_xent,...]
        Launches `python -m torch.distributed.run --standalone --nproc_per_node=W bench/scaling.py run ...`
        for W = 1, 2, 4, ... up to --max-procs, both schedules, weak scaling (fixed rows per rank) and strong
        scaling (fixed global rows), appends JSON rows to --out, draws --png, and prints measured times next
        to the cost model calibrated on the same machine (alpha, bandwidth and kernel rate measured in the
        run itself), i.e. predicted vs measured wherever both exist.

    torchrun --nproc_per_node=W bench/scaling.py run --schedule ring --mode weak ...
        One measurement (what `sweep` launches); rank 0 appends the row.

On CPUs the group is gloo; with --device cuda it is NCCL, one GPU per process (LOCAL_RANK).

Running on a real multi-GPU node (e.g. 8 x H200):

    python bench/scaling.py sweep --device cuda --max-procs 8 --dtype bfloat16 --dim 128 \\
        --local-rows 16384 --global-rows 131072 --repeats 10 \\
        --out bench/results/scaling_h200.jsonl --png bench/results/scaling_h200.png

  and across nodes, one `run` per configuration on every node (the sweep launcher is single-node):

    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$MASTER:29500 \\
        bench/scaling.py run --device cuda --schedule ring --mode weak --dtype bfloat16 --dim 128 \\
        --local-rows 16384 --out bench/results/scaling_ib.jsonl

  then `python bench/scaling.py model` prints the thresholds to compare with; rows carry the measured
  alpha / bandwidth / kernel rate so `python bench/scaling.py report FILE` reprints predicted vs measured.
  Set NCCL_DEBUG=WARN and keep the default impl ("auto" picks Triton, then CUDA, then torch).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

# ----------------------------------------------------------------------------------------------------
# Cost model.

H200_FLOPS = 790e12  # bf16 dense, docs/perf.md
FABRICS = {
    # name: (bytes/s per direction per GPU, alpha seconds, GPU counts modelled)
    "NVLink (H200 node)": (450e9, 5e-6, (2, 4, 8)),
    "InfiniBand cluster": (50e9, 10e-6, (16, 32, 64, 128, 256)),
}
BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}
ACC_BYTES = {"bfloat16": 4, "float16": 4, "float32": 4, "float64": 8}


def step_times(m_local: float, d: int, elem: int, acc: int, flops: float, bandwidth: float, alpha: float):
    """Per ring step with equal blocks of m_local rows: (compute_fwd, comm_fwd, compute_bwd, comm_bwd).

    Forward: one block kernel (2 m^2 d FLOPs) against one block transfer (m d elem bytes). Backward: one
    block kernel (6 m^2 d) against the block plus its column-gradient accumulator (m d (elem + acc))."""
    c_f = 2 * m_local * m_local * d / flops
    c_b = 6 * m_local * m_local * d / flops
    t_f = alpha + m_local * d * elem / bandwidth
    t_b = 2 * alpha + m_local * d * (elem + acc) / bandwidth
    return c_f, t_f, c_b, t_b


def _root(a: float, b: float, c: float) -> float:
    """Positive root of a m^2 = b m + c."""
    return (b + math.sqrt(b * b + 4 * a * c)) / (2 * a)


def hiding_threshold(d, elem, acc, flops, bandwidth, alpha) -> tuple[float, float]:
    """Smallest local rows per rank where the ring's per-step compute covers its transfer: (fwd, bwd)."""
    fwd = _root(2 * d / flops, d * elem / bandwidth, alpha)
    bwd = _root(6 * d / flops, d * (elem + acc) / bandwidth, 2 * alpha)
    return fwd, bwd


def predict(schedule, world, m_local, d, elem, acc, flops, bandwidth, alpha) -> dict:
    """Forward + backward time of one loss evaluation with equal blocks (seconds), and the exposed comm."""
    c_f, t_f, c_b, t_b = step_times(m_local, d, elem, acc, flops, bandwidth, alpha)
    compute = world * (c_f + c_b)
    small = 4 * alpha * max(1.0, math.log2(max(world, 1)))  # metadata all-gather + loss all-reduce
    if world == 1:
        return {"time": compute, "exposed": 0.0, "compute": compute}
    if schedule == "ring":
        steps = (world - 1) * (max(c_f, t_f) + max(c_b, t_b)) + c_f + c_b
        tail = alpha + m_local * d * acc / bandwidth  # the last gradient transfer is not overlapped
        total = steps + tail + small
    else:  # ring all-gather then reduce-scatter, not overlapped with compute
        gather = (world - 1) * (alpha + m_local * d * elem / bandwidth)
        scatter = (world - 1) * (alpha + m_local * d * acc / bandwidth)
        total = compute + gather + scatter + small
    return {"time": total, "exposed": total - compute, "compute": compute}


def print_model(d_list, dtype, flops, efficiency, strong_rows):
    elem, acc = BYTES[dtype], ACC_BYTES[dtype]
    rate = flops * efficiency
    print(f"Cost model: kernels at {rate / 1e12:.0f} TFLOP/s ({efficiency:g} x the {flops / 1e12:.0f} TFLOP/s floor), "
          f"{dtype} blocks ({elem} B), column-gradient accumulators {acc} B; local rows M_r = 2 B_r per rank.")
    print("Ring threshold = smallest M_r whose per-step block kernel covers the per-step transfer (forward: "
          "2 M_r^2 d FLOPs vs alpha + M_r d b / BW; backward: 6 M_r^2 d vs 2 alpha + M_r d (b + acc) / BW).")
    for name, (bw, alpha, worlds) in FABRICS.items():
        print(f"\n{name}: {bw / 1e9:.0f} GB/s per direction, alpha {alpha * 1e6:.0f} us, "
              f"GPUs {worlds[0]}..{worlds[-1]}")
        print(f"{'d':>5} {'fwd M_r':>9} {'bwd M_r':>9} {'threshold':>10} | exposed comm at the threshold M_r:")
        for d in d_list:
            f, b = hiding_threshold(d, elem, acc, rate, bw, alpha)
            thr = math.ceil(max(f, b))
            cells = []
            for w in worlds:
                ring = predict("ring", w, thr, d, elem, acc, rate, bw, alpha)
                gat = predict("gather", w, thr, d, elem, acc, rate, bw, alpha)
                cells.append(f"W={w}: ring {100 * ring['exposed'] / ring['time']:.0f}% / gather "
                             f"{100 * gat['exposed'] / gat['time']:.0f}%")
            print(f"{d:>5} {f:>9.0f} {b:>9.0f} {thr:>10d} | " + "; ".join(cells))
        d0 = d_list[0]
        thr = math.ceil(max(hiding_threshold(d0, elem, acc, rate, bw, alpha)))
        print(f"  strong scaling at global M = {strong_rows} (d = {d0}): the ring hides its transfers up to "
              f"W = {max(1, strong_rows // thr)} GPUs (M_r >= {thr}).")


# ----------------------------------------------------------------------------------------------------
# One measurement under torchrun.


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(op, rows, d, dtype, device, gen_seed):
    import torch

    g = torch.Generator(device="cpu").manual_seed(gen_seed)
    mk = lambda r, c: torch.randn(r, c, generator=g).to(device=device, dtype=dtype).requires_grad_()
    if op == "nt_xent":
        rows += rows % 2
        return (mk(rows, d), mk(rows, d))
    if op == "info_nce":
        return (mk(rows, d), mk(rows, d))
    b = max(1, rows // 2)
    noise = lambda: torch.randn(b, d, generator=g).to(device=device)
    return (mk(b, d), mk(b, d), mk(b, 2 * d), mk(b, 2 * d), mk(b, 2 * d), mk(b, 2 * d), noise(), noise())


def _call(op, tensors, group):
    import adassl_fast

    if op == "nt_xent":
        return adassl_fast.nt_xent(*tensors, process_group=group)
    if op == "info_nce":
        return adassl_fast.info_nce(*tensors, process_group=group)
    ex, ey, pxy, pyx, qxy, qyx, nxy, nyx = tensors
    l_ssl, l_reg = adassl_fast.adassl_nt_xent(ex, ey, pxy, pyx, qxy, qyx, noise_xy=nxy, noise_yx=nyx,
                                              process_group=group)
    return l_ssl + l_reg


def _timed(fn, device, repeats):
    import torch.distributed as dist

    times = []
    for _ in range(repeats):
        dist.barrier()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _calibrate(rows, d, dtype, device, repeats):
    """alpha and bandwidth of one ring hop (p2p to rank+1 while receiving from rank-1), and the kernel rate
    of one block fwd + bwd (8 M_r^2 d FLOPs) with every rank computing at once."""
    import torch
    import torch.distributed as dist

    from adassl_fast import _dispatch
    from adassl_fast.core import nt_xent_backward_op, nt_xent_forward_op

    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    if world > 1:
        def hop(n):
            send = torch.randn(n, d, device=device).to(dtype)
            recv = torch.empty_like(send)

            def go():
                ops = [dist.P2POp(dist.isend, send, (rank + 1) % world),
                       dist.P2POp(dist.irecv, recv, (rank - 1) % world)]
                for w in dist.batch_isend_irecv(ops):
                    w.wait()
            go()
            return statistics.median(_timed(go, device, repeats))
        small, big = hop(1), hop(rows)
        out["alpha"] = small
        out["bandwidth"] = (rows - 1) * d * BYTES[str(dtype).split(".")[1]] / max(big - small, 1e-9)
    impl = _dispatch.resolve_impl("auto", device)
    cont = torch.randn(rows, d, device=device).to(dtype)
    targ = torch.randn(rows, d, device=device).to(dtype)
    idx = torch.arange(rows, device=device)
    excl = torch.full_like(idx, -1)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.ones((), dtype=acc, device=device)

    def kernel():
        loss, lse = nt_xent_forward_op(cont, targ, idx, excl, scale, 10.0, 20.0, impl, True, True)
        nt_xent_backward_op(torch.ones((), dtype=acc, device=device), cont, targ, idx, excl, scale, lse, 10.0, 20.0,
                            impl, True, True)
    kernel()
    t = statistics.median(_timed(kernel, device, repeats))
    out["flops"] = 8 * rows * rows * d / t
    out["impl"] = impl
    return out


def run(args):
    import datetime

    import torch
    import torch.distributed as dist

    from adassl_fast import distributed

    device = torch.device("cpu")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=600))
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    dtype = getattr(torch, args.dtype)
    rows = args.local_rows if args.mode == "weak" else max(2, args.global_rows // world)
    distributed.DEFAULT_SCHEDULE = args.schedule
    cal = _calibrate(rows, args.d, dtype, device, max(3, args.repeats))
    for op in args.ops.split(","):
        tensors = _inputs(op, rows, args.d, dtype, device, 1000 + rank)
        group = dist.group.WORLD

        def step(op=op, tensors=tensors, group=group):
            _call(op, tensors, group).backward()
            for t in tensors:
                t.grad = None

        step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = _timed(step, device, args.repeats)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        all_times = [None] * world
        dist.all_gather_object(all_times, times)
        if rank == 0:
            per_iter = [max(ts[i] for ts in all_times) for i in range(len(times))]
            row = {
                "op": op, "schedule": args.schedule, "mode": args.mode, "world": world, "local_rows": rows,
                "global_rows": rows * world, "d": args.d, "dtype": args.dtype, "device": _device_name(device),
                "backend": dist.get_backend(), "impl": cal["impl"], "median_s": statistics.median(per_iter),
                "min_s": min(per_iter), "max_s": max(per_iter), "repeats": args.repeats, "peak_bytes": peak,
                "calibration": cal, "torch": torch.__version__, "commit": _commit(),
            }
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row))
    dist.destroy_process_group()


def _device_name(device):
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from adassl_fast._dispatch import _cpu_name

    return _cpu_name()


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------------
# Sweep, report, plot.


def sweep(args):
    worlds = [w for w in (1, 2, 4, 8, 16, 32) if w <= args.max_procs]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    here = os.path.abspath(__file__)
    root = os.path.dirname(os.path.dirname(here))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for mode in ("weak", "strong"):
        for world in worlds:
            for schedule in ("gather", "ring"):
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                       here, "run", "--schedule", schedule, "--mode", mode, "--device", args.device,
                       "--dtype", args.dtype, "--dim", str(args.d), "--local-rows", str(args.local_rows),
                       "--global-rows", str(args.global_rows), "--ops", args.ops, "--repeats", str(args.repeats),
                       "--out", args.out]
                print(f"[sweep] {mode} W={world} {schedule}", flush=True)
                res = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if res.returncode:
                    print(res.stdout[-2000:], res.stderr[-4000:], file=sys.stderr)
                    raise SystemExit(f"torchrun failed for {mode} W={world} {schedule}")
    report(args.out, args.png)


def _load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def report(path, png=None):
    rows = _load(path)
    print(f"\n{'op':<15} {'mode':<6} {'sched':<6} {'W':>3} {'M_r':>6} {'measured':>10} {'predicted':>10} "
          f"{'ratio':>6} {'exposed(pred)':>13}  calibration (alpha, GB/s, GFLOP/s)")
    for r in rows:
        cal = r["calibration"]
        w = r["world"]
        alpha = cal.get("alpha", 0.0)
        bw = cal.get("bandwidth", float("inf"))
        elem, acc = BYTES[r["dtype"]], ACC_BYTES[r["dtype"]]
        pred = predict(r["schedule"], w, r["local_rows"], r["d"], elem, acc, cal["flops"], bw, alpha)
        if r["op"] == "info_nce":  # two directions: twice the kernels and transfers
            pred = {k: 2 * v for k, v in pred.items()}
        extra = "" if r["op"] != "adassl_nt_xent" else " (+prologue)"
        print(f"{r['op']:<15} {r['mode']:<6} {r['schedule']:<6} {w:>3} {r['local_rows']:>6} {r['median_s']:>10.4f} "
              f"{pred['time']:>10.4f} {r['median_s'] / pred['time']:>6.2f} {pred['exposed'] / pred['time']:>12.0%}  "
              f"{alpha * 1e6:.0f} us, {bw / 1e9:.2f}, {cal['flops'] / 1e9:.1f}{extra}")
    if png:
        plot(rows, png)


def plot(rows, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = sorted({r["op"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, mode in zip(axes, ("weak", "strong"), strict=True):
        for op in ops:
            for schedule, style in (("gather", "--o"), ("ring", "-s")):
                pts = sorted((r["world"], r["median_s"]) for r in rows
                             if r["mode"] == mode and r["op"] == op and r["schedule"] == schedule)
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, label=f"{op} {schedule}")
        sample = next((r for r in rows if r["mode"] == mode), None)
        if sample:
            what = f"M_r = {sample['local_rows']}" if mode == "weak" else f"M = {sample['global_rows']}"
            ax.set_title(f"{mode} scaling ({what}, d = {sample['d']}, {sample['dtype']}, {sample['backend']})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("processes")
        ax.set_ylabel("fwd + bwd time per step (s)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("model", help="print the cost model's ring-hiding thresholds")
    m.add_argument("--d", default="128,256,512")
    m.add_argument("--dtype", default="bfloat16", choices=sorted(BYTES))
    m.add_argument("--flops", type=float, default=H200_FLOPS)
    m.add_argument("--efficiency", type=float, default=1.0, help="kernel rate as a fraction of the floor's")
    m.add_argument("--strong-rows", type=int, default=262144)
    for name in ("run", "sweep"):
        s = sub.add_parser(name)
        s.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
        s.add_argument("--dtype", default="float32", choices=sorted(BYTES))
        s.add_argument("--dim", dest="d", type=int, default=128)
        s.add_argument("--local-rows", type=int, default=1024, help="rows per rank (weak scaling)")
        s.add_argument("--global-rows", type=int, default=4096, help="rows over all ranks (strong scaling)")
        s.add_argument("--ops", default="nt_xent")
        s.add_argument("--repeats", type=int, default=5)
        s.add_argument("--out", default="bench/results/scaling.jsonl")
        if name == "run":
            s.add_argument("--schedule", default="ring", choices=("gather", "ring"))
            s.add_argument("--mode", default="weak", choices=("weak", "strong"))
        else:
            s.add_argument("--max-procs", type=int, default=4)
            s.add_argument("--png", default="bench/results/scaling.png")
    r = sub.add_parser("report", help="reprint measured vs predicted from a JSON-lines file")
    r.add_argument("path")
    r.add_argument("--png", default=None)
    args = p.parse_args(argv)
    if args.cmd == "model":
        print_model([int(x) for x in args.d.split(",")], args.dtype, args.flops, args.efficiency, args.strong_rows)
    elif args.cmd == "run":
        run(args)
    elif args.cmd == "sweep":
        sweep(args)
    else:
        report(args.path, args.png)


if __name__ == "__main__":
    main()
