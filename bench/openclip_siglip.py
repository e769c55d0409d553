"""adassl_fast.siglip beside OpenCLIP's SigLipLoss on CPU: agreement in float64, then time and peak memory.

    python bench/openclip_siglip.py --loss-py PATH/open_clip/loss.py [--M 4096,16384] [--d 128]

OpenCLIP is not a dependency, and its package does not import here (it needs torchvision, which does not
import beside the CPU torch): its `open_clip/loss.py` needs only torch, so it is loaded by path from an
unpacked wheel (`pip download open_clip_torch==3.3.0 --no-deps`, then unzip). OpenCLIP's loss takes
normalised features and an exponentiated scale, so both sides get raw rows, F.normalize and scale = exp(t')
inside the timed step: the same function. Each (loss, M) runs in a fresh process (peak RSS above the inputs
during one forward + backward, float32), as tests/test_memory.py measures.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import adassl_fast


def _load(path: str):
    spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _step(which: str, openclip, q, k, t, b):
    if which == "openclip":
        return openclip.SigLipLoss()(F.normalize(q, dim=1), F.normalize(k, dim=1), t.exp(), b)
    return adassl_fast.siglip(q, k, scale=t.exp(), bias=b, impl="torch")


def agreement(openclip, n: int = 33, d: int = 7) -> float:
    """The worst absolute difference of the loss and the gradients of query, key, t' and bias, float64."""
    leaf = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)
    inputs = [leaf(n, d), leaf(n, d), torch.tensor(2.1, dtype=torch.float64, requires_grad=True),
              torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)]
    results = []
    for which in ("openclip", "adassl"):
        loss = _step(which, openclip, *inputs)
        results.append([loss.detach(), *torch.autograd.grad(loss, inputs)])
    return max(float((a - c).abs().max()) for a, c in zip(*results, strict=True))


def measure(which: str, openclip, n: int, d: int) -> tuple[float, float]:
    """(peak extra MiB, seconds) of one forward + backward after a warm-up."""
    q, k = torch.randn(n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)
    t, b = torch.tensor(2.302585, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
    warm = torch.randn(8, d, requires_grad=True)
    _step(which, openclip, warm, warm.detach(), t, b).backward()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    base, start = _rss("VmRSS"), time.perf_counter()
    _step(which, openclip, q, k, t, b).backward()
    return (_rss("VmHWM") - base) / 2**20, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loss-py", required=True, help="path to open_clip/loss.py from an unpacked wheel")
    p.add_argument("--M", default="4096,16384")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--one", nargs=2, metavar=("WHICH", "M"), help=argparse.SUPPRESS)  # the fresh-process worker
    args = p.parse_args(argv)
    openclip = _load(args.loss_py)
    if args.one:
        mib, seconds = measure(args.one[0], openclip, int(args.one[1]), args.d)
        print(mib, seconds)
        return 0
    print(f"float64 agreement (loss and gradients of query, key, t', bias): worst |diff| {agreement(openclip):.1e}")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # freed big blocks go back to the OS at once
    print(f"{'loss':>9} {'M':>6} {'d':>4} {'seconds':>8} {'peak extra MiB':>15}")
    for n in map(int, args.M.split(",")):
        for which in ("openclip", "adassl"):
            out = subprocess.run([sys.executable, __file__, "--loss-py", args.loss_py, "--d", str(args.d), "--one",
                                  which, str(n)], capture_output=True, text=True, check=True, env=env)
            mib, seconds = map(float, out.stdout.split())
            print(f"{which:>9} {n:>6} {args.d:>4} {seconds:>8.2f} {mib:>15.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
