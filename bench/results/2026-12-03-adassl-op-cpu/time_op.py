"""Per-call forward+backward time of adassl_nt_xent (variants "v" and "s") and nt_xent at the shape of
`adassl-fast compare`'s runs: B = 256 pairs, d = 16, float32, 1 torch thread, temperature 0.05.

Usage: python time_op.py [--repeats 7] [--calls 200] [--profile]
Prints the median (and min / max) over repeats of the mean time per call, in ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import adassl_fast as af

B, D, TAU = 256, 16, 0.05


def cases():
    torch.manual_seed(0)
    ex, ey = (torch.randn(B, D, requires_grad=True) for _ in range(2))
    pxy, pyx, qxy, qyx = (torch.randn(B, 2 * D, requires_grad=True) for _ in range(4))
    nx, ny = torch.randn(B, D), torch.randn(B, D)
    ux, uy = torch.rand(B, D), torch.rand(B, D)

    def adassl_v():
        a, b = af.adassl_nt_xent(ex, ey, pxy, pyx, qxy, qyx, variant="v", temperature=TAU, noise_xy=nx, noise_yx=ny)
        (a + 0.5 * b).backward()

    def adassl_s():
        a, b = af.adassl_nt_xent(ex, ey, pxy, pyx, variant="s", temperature=TAU, noise_xy=ux, noise_yx=uy)
        (a + 0.5 * b).backward()

    def nt_xent():
        af.nt_xent(ex, ey, temperature=TAU).backward()

    return {"adassl v": adassl_v, "adassl s": adassl_s, "nt_xent": nt_xent}


def per_call_ms(fn, calls):
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's table for each case")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"adassl_fast from {af.__file__}, torch {torch.__version__}")
    for name, fn in cases().items():
        for _ in range(20):  # warm-up
            fn()
        if args.profile:
            with torch.profiler.profile() as prof:
                for _ in range(20):
                    fn()
            print(name)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=45))
            continue
        times = [per_call_ms(fn, args.calls) for _ in range(args.repeats)]
        print(f"{name:9s} median {statistics.median(times):.3f} ms/call (min {min(times):.3f}, max {max(times):.3f},"
              f" {args.repeats} x {args.calls} calls)")


if __name__ == "__main__":
    main()
