"""Is a forward + backward step launch-bound? Host enqueue time vs GPU time vs a CUDA-graph replay.

    python bench/launch_overhead.py [--op nt_xent] [--impl triton,cuda] [--M 8192,32768] [--d 128] [--steps 20]

For each (impl, M), after warm-up, one step is `loss = op(...); torch.autograd.grad(loss, inputs)` (bf16):
- host ms: wall time to enqueue `steps` steps without synchronising, per step (the Python + launch cost);
- gpu ms: CUDA events around the same `steps` steps, per step (what the device spends, gaps included);
- graph ms: the step captured once in a CUDA graph and replayed `steps` times (device time without
  launch gaps: what torch.compile(mode="reduce-overhead") or a hand-captured training step would see).
When host ms is close to gpu ms and graph ms is much smaller, the step is bound by its launches.
Needs a CUDA GPU; prints one table.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def _step_fn(op: str, impl: str, M: int, d: int):
    import adassl_fast

    dev, dt = torch.device("cuda"), torch.bfloat16
    if op == "nt_xent":
        cont = torch.randn(M, d, device=dev, dtype=dt, requires_grad=True)
        targ = torch.randn(M, d, device=dev, dtype=dt, requires_grad=True)

        def step():
            loss = adassl_fast.nt_xent(cont, targ, temperature=0.1, clamp=20.0, impl=impl)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--op", default="nt_xent", choices=["nt_xent", "adassl"])
    ap.add_argument("--impl", default="triton,cuda")
    ap.add_argument("--M", default="8192,32768")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("launch_overhead.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    print(f"{'op':<8} {'impl':<7} {'M':>7} {'host ms':>8} {'gpu ms':>8} {'graph ms':>9}  ({device})")
    for impl in args.impl.split(","):
        for M in (int(m) for m in args.M.split(",")):
            try:
                r = measure(_step_fn(args.op, impl, M, args.d), args.steps)
            except Exception as exc:  # an unavailable backend: one line, the next row runs
                print(f"{args.op:<8} {impl:<7} {M:>7}  error: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            graph = f"{r['graph']:9.3f}" if "graph" in r else f"  failed: {r['graph_error']}"
            print(f"{args.op:<8} {impl:<7} {M:>7} {r['host']:8.3f} {r['gpu']:8.3f} {graph}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
