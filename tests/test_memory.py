"""The chunked torch backend's O(M) memory claim, measured as peak RSS of fresh subprocesses."""

import os
import subprocess
import sys

import pytest

PROBE = r"""
import sys, time, torch, adassl_fast

def rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024

op, impl, m, d = getattr(adassl_fast, sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
cont = torch.randn(m, d, requires_grad=True)
targ = torch.randn(m, d, requires_grad=True)
warm = torch.randn(8, d, requires_grad=True)
op(warm, warm.detach(), impl=impl).backward()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
base = rss("VmRSS")
start = time.perf_counter()
op(cont, targ, impl=impl).backward()
print(rss("VmHWM") - base, time.perf_counter() - start)
"""


def peak_extra_bytes(impl: str, m: int, d: int, op: str = "nt_xent") -> tuple[int, float]:
    """Peak RSS above the inputs during one forward + backward of `op`, in a fresh process; and its seconds."""
    # glibc returns big freed blocks to the OS at once (as adassl_fast/apps/benchmark.py's workers do): with its
    # dynamic threshold, how much freed memory stays resident depends on the allocation history
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", PROBE, op, impl, str(m), str(d)], capture_output=True, text=True,
                         check=True, env=env)
    extra, seconds = out.stdout.split()
    return int(extra), float(seconds)


@pytest.mark.slow
def test_torch_backend_memory_is_a_small_fraction_of_the_reference():
    m, d = 8192, 128
    # the median of three fresh processes (docs/perf.md's protocol): one of them once peaked 54 MiB higher
    # (126 vs 72 MiB) while other jobs loaded this machine
    torch_bytes, torch_s = sorted(peak_extra_bytes("torch", m, d) for _ in range(3))[1]
    ref_bytes, ref_s = peak_extra_bytes("reference", m, d)
    ratio = torch_bytes / ref_bytes
    print(f"\nM={m} d={d} float32 fwd+bwd: torch {torch_bytes / 2**20:.0f} MiB {torch_s:.2f} s, "
          f"reference {ref_bytes / 2**20:.0f} MiB {ref_s:.2f} s, memory ratio {ratio:.3f}")
    assert ref_bytes > 4 * m * m  # the reference holds at least the M x M float32 logits
    assert ratio <= 0.05


@pytest.mark.slow
def test_one_pass_training_holds_little_more_than_the_gradients():
    # One forward + backward holds the inputs' gradients (2 M d), v and the stashed gradients (3 M d) and one
    # logit slab: 6 M d floats bound that with a row to spare, plus the slab and 4 MiB. The two-pass schedule at
    # fcc2923 peaked at 58.6 MiB here (bound: 44 MiB).
    from adassl_fast.torch_backend import SLAB_ELEMENTS

    m, d = 8192, 128
    extra = sorted(peak_extra_bytes("torch", m, d)[0] for _ in range(3))[1]
    bound = 6 * m * d * 4 + 4 * SLAB_ELEMENTS + (4 << 20)
    print(f"\nM={m} d={d} float32 fwd+bwd: torch {extra / 2**20:.1f} MiB (bound {bound / 2**20:.0f} MiB)")
    assert extra <= bound


@pytest.mark.slow
def test_siglip_torch_backend_memory_and_time_against_the_reference():
    # issue 19: at N = 16384, d = 128 float32 the chunked one-pass SigLIP holds <= 5 % of the materialising
    # reference's extra memory (several N x N float32 matrices) and takes no longer
    n, d = 16384, 128
    torch_bytes, torch_s = sorted(peak_extra_bytes("torch", n, d, "siglip") for _ in range(3))[1]
    ref_bytes, ref_s = peak_extra_bytes("reference", n, d, "siglip")
    ratio = torch_bytes / ref_bytes
    print(f"\nsiglip N={n} d={d} float32 fwd+bwd: torch {torch_bytes / 2**20:.0f} MiB {torch_s:.2f} s, "
          f"reference {ref_bytes / 2**20:.0f} MiB {ref_s:.2f} s, memory ratio {ratio:.4f}")
    assert ref_bytes > 4 * n * n
    assert ratio <= 0.05
    assert torch_s <= ref_s
