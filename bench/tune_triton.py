"""Time candidate block configurations of the Triton nt_xent kernels on this GPU; write the fastest.

    python bench/tune_triton.py [--M 8192,65536] [--d 128] [--dtype bf16] [--out DIR] [--budget-s 240]

For each kernel kind (fwd, bwd_row, bwd_col; AdaSSL runs the same kernels) and each candidate
(block_m, block_n, num_warps, num_stages), at every M: run it, check its outputs against the shipped
configuration's (a wrong candidate is reported and never chosen), and time it with
triton.testing.do_bench (median). The backward is timed whole (both matmul kernels and the O(M d)
kernels) with one kind varied and the other at its shipped configuration, so the differences
between candidates are the varied kernel's. Writes DIR/tune.json ("table": the fastest candidate
per kind at the largest M, in the form kernels/configs.py reads from $ADASSL_FAST_TRITON_CONFIGS)
and prints a table. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import torch

CANDIDATES = {  # (block_m, block_n, num_warps, num_stages); block_m = rows owned by a program
    "fwd": [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3),
            (128, 128, 4, 2), (256, 64, 8, 2), (64, 64, 4, 3)],
    "bwd_row": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 2),
                (128, 32, 8, 3), (64, 64, 8, 2), (128, 64, 4, 2)],
    "bwd_col": [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 2),
                (128, 32, 8, 3), (64, 64, 8, 2), (128, 64, 4, 2)],
}
FLOPS_PER_M2D = {"fwd": 2, "bwd_row": 8, "bwd_col": 8}  # the backward timing holds both kernels


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _call(ntx, kind, cfg, ins):
    """One run of the forward (kind "fwd") or the whole backward with `kind`'s kernel under `cfg`."""
    cont, targ, pos, excl, scale, inv_t, grad, lse = ins
    if kind == "fwd":
        return ntx.nt_xent_forward(cont, targ, pos, excl, scale, inv_t, None, config=cfg)
    return ntx.nt_xent_backward(grad, cont, targ, pos, excl, scale, lse, inv_t, None, True, configs={kind: cfg})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--M", default="8192,65536")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--out", default=".")
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop timing new candidates after this")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_triton.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    from adassl_fast.kernels import configs
    from adassl_fast.kernels import nt_xent as ntx

    t_start = time.time()
    dev = torch.device("cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    d = args.d
    arch = configs.arch_of(dev)
    key = f"{arch}/{configs.dtype_class(dtype)}/{configs.block_d(d)}"
    rows = []
    sizes = [int(m) for m in args.M.split(",")]
    print(f"{'M':>7} {'kind':<8} {'config':<18} {'ms':>9} {'TFLOP/s':>8}  status", flush=True)
    for M in sizes:
        gen = torch.Generator(device=dev).manual_seed(M)
        cont = torch.randn(M, d, device=dev, generator=gen).to(dtype)
        targ = (cont.float() + torch.randn(M, d, device=dev, generator=gen)).to(dtype)
        idx = torch.arange(M, device=dev)
        pos, excl = (idx + M // 2) % M, idx
        scale = torch.tensor(1.0, device=dev)
        inv_t = 1 / 0.1
        grad = torch.tensor(1.0, device=dev)
        loss0, lse0 = ntx.nt_xent_forward(cont, targ, pos, excl, scale, inv_t, None)
        ref_bwd = ntx.nt_xent_backward(grad, cont, targ, pos, excl, scale, lse0, inv_t, None, True)
        ins = (cont, targ, pos, excl, scale, inv_t, grad, lse0)
        for kind, cands in CANDIDATES.items():
            for c in cands:
                name = "m{}n{}w{}s{}".format(*c)
                row = dict(M=M, d=d, dtype=args.dtype, kind=kind, config=list(c), name=name)
                rows.append(row)
                if time.time() - t_start > args.budget_s:
                    row["status"] = "not run: budget"
                    continue
                fn = functools.partial(_call, ntx, kind, configs.Config(f"tune_{kind}_{name}", *c), ins)
                try:
                    out = fn()
                    torch.cuda.synchronize()
                    ref = (loss0, lse0) if kind == "fwd" else ref_bwd
                    err = max(_rel(a, b) for a, b in zip(out, ref, strict=True))
                    row["rel_err"] = err
                    if not err < 2e-2:
                        row["status"] = f"WRONG (rel err {err:.2e})"
                    else:
                        ms = triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
                        row.update(ms=ms, tflops=FLOPS_PER_M2D[kind] * M * M * d / ms / 1e9, status="ok")
                except Exception as exc:  # a candidate that does not compile or launch (shared memory, ...)
                    row["status"] = f"error: {type(exc).__name__}: {str(exc)[:160]}"
                ms_s = f"{row['ms']:9.3f} {row['tflops']:8.1f}" if "ms" in row else f"{'-':>9} {'-':>8}"
                print(f"{M:>7} {kind:<8} {name:<18} {ms_s}  {row['status']}", flush=True)
    best = {}
    for kind in CANDIDATES:
        ok = [r for r in rows if r["kind"] == kind and r["M"] == max(sizes) and "ms" in r]
        if ok:
            best[kind] = min(ok, key=lambda r: r["ms"])["config"]
    result = dict(device=torch.cuda.get_device_name(dev), torch=torch.__version__, triton=triton.__version__,
                  commit=os.environ.get("ADASSL_FAST_COMMIT", "unknown"), table={key: best}, rows=rows)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "tune.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"fastest at M = {max(sizes)} ({key}): {json.dumps(best)} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
