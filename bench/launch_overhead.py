"""Is a forward + backward step launch-bound? Host enqueue time vs GPU time vs a CUDA-graph replay.

    python bench/launch_overhead.py [--op nt_xent] [--impl triton,cuda] [--M 8192,32768] [--d 128] [--steps 20]

For each (impl, M), after warm-up, one step is `loss = op(...); torch.autograd.grad(loss, inputs)` (bf16):
- host ms: wall time to enqueue `steps` steps without synchronising, per step (the Python + launch cost);
- gpu ms: CUDA events around the same `steps` steps, per step (what the device spends, gaps included);
- graph ms: the step captured once in a CUDA graph and replayed `steps` times (device time without
  launch gaps: what torch.compile(mode="reduce-overhead") or a hand-captured training step would see).
When host ms is close to gpu ms and graph ms is much smaller, the step is bound by its launches.
Needs a CUDA GPU; prints one table.

    python bench/launch_overhead.py --python-only [--op nt_xent,info_nce,adassl]

runs anywhere (no GPU): every Triton kernel launch is replaced by a no-op, so what is timed is the host
path around the launches (checks, dispatch, the torch.library op and autograd, allocations, configs):
min and median over 7 blocks of 200 steps, as ms per step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch


def _step_fn(op: str, impl: str, M: int, d: int, device: str = "cuda"):
    import adassl_fast

    dev, dt = torch.device(device), torch.bfloat16
    if op in ("nt_xent", "info_nce"):
        cont = torch.randn(M, d, device=dev, dtype=dt, requires_grad=True)
        targ = torch.randn(M, d, device=dev, dtype=dt, requires_grad=True)

        def step():
            if op == "nt_xent":
                loss = adassl_fast.nt_xent(cont, targ, temperature=0.1, clamp=20.0, impl=impl)
            else:
                loss = adassl_fast.info_nce(cont, targ, temperature=0.07, impl=impl)
            return torch.autograd.grad(loss, (cont, targ))

        return step
    B = M // 2
    ex, ey = (torch.randn(B, d, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
    post = [torch.randn(B, 2 * d, device=dev, dtype=dt, requires_grad=True) for _ in range(4)]
    noise = [torch.randn(B, d, device=dev, dtype=dt) for _ in range(2)]

    def step():
        l_ssl, l_reg = adassl_fast.adassl_nt_xent(ex, ey, *post, variant="v", temperature=0.1, clamp=20.0,
                                                  noise_xy=noise[0], noise_yx=noise[1], impl=impl)
        return torch.autograd.grad(l_ssl + l_reg, (ex, ey, *post))

    return step


def measure(step, steps: int) -> dict:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(steps):
        step()
    host = (time.perf_counter() - t0) * 1e3 / steps
    end.record()
    torch.cuda.synchronize()
    out = dict(host=host, gpu=start.elapsed_time(end) / steps)
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # warm-up on the side stream, as torch.cuda.graph requires
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph.replay()
        torch.cuda.synchronize()
        start.record()
        for _ in range(steps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        out["graph"] = start.elapsed_time(end) / steps
    except Exception as exc:  # capture can fail (a host sync in the step): report it, keep the rest
        out["graph_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    return out


def python_only(ops: list[str], M: int, d: int) -> int:
    """Host time per step of the Triton path with every kernel launch a no-op (any machine)."""
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are decorated: no driver needed
    from adassl_fast.kernels import backward, forward, normalize

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for stage in (normalize, forward, backward):  # the modules that launch kernels
        for name in [n for n in dir(stage) if n.startswith("_") and n.endswith("_kernel")]:
            setattr(stage, name, _NoLaunch())
    print(f"{'op':<8} {'M':>7} {'min ms':>7} {'median ms':>9}  (host path only, Triton launches stubbed)")
    for op in ops:
        step = _step_fn(op, "triton", M, d, "cpu")
        for _ in range(20):
            step()
        blocks = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(200):
                step()
            blocks.append((time.perf_counter() - t0) / 200 * 1e3)
        print(f"{op:<8} {M:>7} {min(blocks):7.3f} {statistics.median(blocks):9.3f}", flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", default="nt_xent", help="nt_xent, info_nce or adassl (comma-separated)")
    ap.add_argument("--impl", default="triton,cuda")
    ap.add_argument("--M", default="8192,32768")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--python-only", action="store_true", help="time the host path with launches stubbed")
    args = ap.parse_args(argv)
    ops = args.op.split(",")
    if any(op not in ("nt_xent", "info_nce", "adassl") for op in ops):
        ap.error(f"--op takes nt_xent, info_nce, adassl; got {args.op!r}")
    if args.python_only:
        return python_only(ops, int(args.M.split(",")[0]), args.d)
    if not torch.cuda.is_available():
        print("launch_overhead.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    print(f"{'op':<8} {'impl':<7} {'M':>7} {'host ms':>8} {'gpu ms':>8} {'graph ms':>9}  ({device})")
    for op in ops:
        for impl in args.impl.split(","):
            for M in (int(m) for m in args.M.split(",")):
                try:
                    r = measure(_step_fn(op, impl, M, args.d), args.steps)
                except Exception as exc:  # an unavailable backend: one line, the next row runs
                    print(f"{op:<8} {impl:<7} {M:>7}  error: {type(exc).__name__}: {str(exc)[:120]}")
                    continue
                graph = f"{r['graph']:9.3f}" if "graph" in r else f"  failed: {r['graph_error']}"
                print(f"{op:<8} {impl:<7} {M:>7} {r['host']:8.3f} {r['gpu']:8.3f} {graph}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
