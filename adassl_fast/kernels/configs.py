"""Named, reproducible block configurations for the Triton kernels.

Every shipped configuration has a name; `shipped_configs()` enumerates them for the cross-compile
test (tests/test_cross_compile.py) and `pick_config()` is what the launchers (and bench/) use.

Key: (arch, dtype class, BLOCK_D) -> one `Config` per kernel kind.
- arch: the GPU class (arch_class()): "sm90" (H100 / H200), "sm80" (A100 and other parts with >= 163 KB of
  shared memory a block), "sm86" (RTX 30 / 40 / 50, A10, L4, L40: 99 KB); "interp" (TRITON_INTERPRET).
- dtype class: "16" (bf16 / fp16 operands: bf16 and fp16 inputs, and fp32 inputs, whose normalised rows
  are fp16, or bf16 for rows taken as given: operand_dtype()), "64" (fp64, interpreter only).
- BLOCK_D: d padded to a power of two (16 .. 512); the whole feature dimension is one tl.dot K.
Kernel kinds: "fwd" (row-owned forward), "bwd_row" (row-owned dU, also the atomic schedule),
"bwd_col" (column-owned dV). BLOCK_M is the block the program owns, BLOCK_N the block it streams.
The symmetric InfoNCE backward (SYM: one more exp tile live) runs the kinds "bwd_row_sym" / "bwd_col_sym", and
SigLIP's forward (SIGMOID: a softplus per element where the LSE has an exp) the kind "fwd_sigmoid" (MODE_KINDS):
an entry names them only where the plain kind's shape spills in that mode; elsewhere they take the plain one.
The atomic schedule runs the row kernel with ATOMIC (its (BLOCK_N, d) dV share live beside the (BLOCK_M, d)
dU accumulator) at the "bwd_row" shape; an entry with "atomic": False ships none (there that kernel fits
without spills only at far smaller tiles), and there deterministic=False runs the deterministic schedule
(atomic_schedule()).

The sm90 d <= 128 entries were measured on an H200 (bench/tune_triton.py); the others come from the
cross-compile table alone: larger d shrinks the blocks so the fp32 gradient accumulator
(BLOCK_M x BLOCK_D) stays in registers without spills. tests/test_cross_compile.py checks every entry
below for spills, shared memory and (sm_90) wgmma.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass

import torch

KINDS = ("fwd", "bwd_row", "bwd_col")
# a mode's kind -> the kind whose entry it defaults to
MODE_KINDS = {"bwd_row_sym": "bwd_row", "bwd_col_sym": "bwd_col", "fwd_sigmoid": "fwd"}

@dataclass(frozen=True)
class Config:
    name: str
    block_m: int  # rows owned by one program
    block_n: int  # rows of the other side streamed per loop step
    num_warps: int
    num_stages: int


def _c(kind, arch, dt, bd, bm, bn, w, s):
    return Config(f"{kind}_{arch}_f{dt}_d{bd}_m{bm}n{bn}w{w}s{s}", bm, bn, w, s)


# (arch, dtype class, BLOCK_D) -> {kind: (block_m, block_n, num_warps, num_stages)}
# Every entry below compiles for its arch without spills (tests/test_cross_compile.py). Smaller d uses
# the entry of the next larger BLOCK_D.
_TABLE = {
    # Measured (bench/tune_triton.py on an H200, M = 65536, bf16; bench/results/2026-11-28_1941-NVIDIA-H200/
    # tune.json): the fastest of 8 candidates per kernel. fwd 2.56 ms (429 TFLOP/s); with either backward
    # kernel at these 64 x 64 blocks the whole backward took 11.6 / 11.9 ms, 3-6 % (row) and 10 % (column)
    # under the 128 x 64, 8-warp shape FA-style kernels start from.
    # SYM column kernel: 64 x 64 with 4 warps spilled (8 bytes, with the clamp); 128 x 64 with 8 warps and 3
    # stages (255 registers, no spill) was the plain column kernel's second best (12.4 vs 11.9 ms). Untimed.
    # SIGMOID forward: 128 x 128 with 4 warps spilled 1576 bytes (255 registers); with 8 warps 155 registers, no
    # spill (cross-compile of 2026-12-03; 128 x 64 with 4 warps fits too, at 255). Untimed.
    ("sm90", "16", 128): {"fwd": (128, 128, 4, 2), "bwd_row": (64, 64, 4, 3), "bwd_col": (64, 64, 4, 3),
                          "bwd_col_sym": (128, 64, 8, 3), "fwd_sigmoid": (128, 128, 8, 2)},
    # sm80 (no A100 lent yet, so unmeasured): chosen from the cross-compile table alone, the largest shapes
    # that compile without spills for every variant (the atomic row kernel with the clamp spilled at 64 x 64)
    ("sm80", "16", 128): {"fwd": (128, 64, 8, 3), "bwd_row": (64, 32, 8, 2), "bwd_col": (64, 64, 4, 2)},
    # d in (128, 256] (not timed on a GPU yet): from the cross-compile table, the largest tiles without spills
    # for every variant; on sm_90 also with wgmma (its 64-row warpgroup tiles rule out 32-row blocks). The
    # atomic row kernel is the binding one: 64 x 64 on sm_90, 32 x 32 on sm_80.
    # (SYM row kernel: the atomic one with the clamp spilled 8 bytes at 64 x 64; 64 x 32 does not)
    ("sm90", "16", 256): {"fwd": (128, 64, 8, 2), "bwd_row": (64, 64, 8, 2), "bwd_col": (64, 64, 8, 2),
                          "bwd_row_sym": (64, 32, 8, 2)},
    ("sm80", "16", 256): {"fwd": (128, 64, 8, 2), "bwd_row": (32, 32, 8, 2), "bwd_col": (64, 64, 8, 2)},
    # d in (256, 512] (not timed on a GPU yet; cross-compile sweep of 2026-11-28): the (64, 512) fp32 dU
    # accumulator alone is 128 registers a thread at 8 warps. The atomic row kernel also holds its
    # (BLOCK_N, 512) dV share: with the clamp or SYM it fits only at 32 x 16 (sm_90: below wgmma's 64-row
    # tiles; 8-136 bytes spilled at 64 x 16), a quarter of the deterministic kernels' tiles, which would
    # likely cost more than its 6-instead-of-8 M^2 d saves. Untimed, so these entries ship no atomic
    # schedule. sm_80 row kernel: 64 x 64 spilled 32 bytes with the clamp, 64 x 32 does not.
    ("sm90", "16", 512): {"fwd": (128, 32, 8, 2), "bwd_row": (64, 64, 8, 2), "bwd_col": (64, 32, 8, 2),
                          "atomic": False},
    ("sm80", "16", 512): {"fwd": (64, 64, 8, 2), "bwd_row": (64, 32, 8, 2), "bwd_col": (64, 32, 8, 2),
                          "atomic": False},
    # 99 KB of shared memory a block (compute capability 8.6 / 8.9 / 12.x; unmeasured): the sm80 shapes fit up
    # to d = 256 (at most 99328 bytes); at d = 512 they need 103-132 KB. There the cross-compile sweep of
    # 2026-11-29 (sm_86, 11 shapes) gave the largest owned blocks that fit without spills: 64 x 32 forward
    # (98816 bytes), 64 x 16 backward (84-87 KB; 32 x 32 also fits, but re-reads the streamed side twice as
    # often).
    ("sm86", "16", 128): {"fwd": (128, 64, 8, 3), "bwd_row": (64, 32, 8, 2), "bwd_col": (64, 64, 4, 2)},
    ("sm86", "16", 256): {"fwd": (128, 64, 8, 2), "bwd_row": (32, 32, 8, 2), "bwd_col": (64, 64, 8, 2)},
    ("sm86", "16", 512): {"fwd": (64, 32, 8, 2), "bwd_row": (64, 16, 8, 2), "bwd_col": (64, 16, 8, 2),
                          "atomic": False},
}
# fp32 inputs run the "16" entries: the normalising pre-kernel reads fp32 rows and writes fp16 unit rows
# (bf16 rows with normalize=False: operand_dtype), statistics and gradient accumulation stay fp32
# (docs/backends.md, "fp32 inputs").
# Not shipped (cross-compile sweep, 2026-11-28), so pick_config raises and dispatch falls back to the torch
# backend:
# - fp32 operands (3xTF32, three dots per product): at d = 128 the backward kernels fit only at 64 x 16
#   (row) and 32 x 16 without wgmma (column, atomic row: 16 x 16); at d = 256 every backward shape spilled.
# - fp64 compiles without spills at d = 128 (fp64 mma.sync, 64 x 32 tiles), but a Python float kernel
#   argument (inv_temperature, the clamp) is fp32 on a GPU, so results would not be float64-exact.

# Blackwell parts take the class their shared memory gives (B200: sm80, RTX 50: sm86), compiled by Triton for
# their own arch and not in the cross-compile test: a one-off compile of the d = 128 (and sm86 d = 512) clamp
# variants on 2026-11-29 found one 8-byte spill each (sm_100: the SYM column kernel; sm_120: the forward).
# Shared memory one block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin) on the GPUs of each class:
# every entry of a class fits its budget (tests/test_cross_compile.py).
SMEM_BUDGET = {"sm90": 227 * 1024, "sm80": 163 * 1024, "sm86": 99 * 1024}


# The interpreter costs ~3-4 ms per (program x loop step) whatever the block: big blocks, one stage.
_INTERP = {k: (64, 64, 4, 1) for k in KINDS}


def block_d(d: int) -> int:
    """d padded to the power of two the kernels tile with (>= 16, the smallest tl.dot K)."""
    return max(16, 1 << (max(int(d), 1) - 1).bit_length())


def operand_dtype(dtype: torch.dtype, normalize: bool = True) -> torch.dtype:
    """The dtype of the rows u, v that the matrix kernels stream, for inputs of `dtype`.

    fp32 inputs are normalised in fp32 and rounded once to fp16: unit vectors lie in [-1, 1], where fp16
    keeps 3 more mantissa bits than bf16, and the bf16 / fp16 shapes then serve them (docs/backends.md).
    fp32 rows taken as given (normalize=False) have no such bound: they are rounded to bf16, which keeps
    fp32's exponent range (fp16 overflows past 65504 and loses precision below 6e-5), so any finite row
    is representable, at bf16's unit roundoff of 2^-9.
    """
    if dtype == torch.float32:
        return torch.float16 if normalize else torch.bfloat16
    return dtype


def dtype_class(dtype: torch.dtype) -> str:
    """The table's dtype class for inputs of `dtype` (the class of their operand dtype)."""
    return {torch.float16: "16", torch.bfloat16: "16", torch.float64: "64"}[operand_dtype(dtype)]


@functools.cache  # read once: Triton itself decides at decoration time (import), and this runs ~10 times a step
def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def arch_class(major: int, minor: int, smem_per_block: int) -> str:
    """The table's class for a GPU of compute capability major.minor that offers `smem_per_block` bytes of
    shared memory a block (opt-in). Raises ValueError, saying why, for a GPU no class covers."""
    if major < 8:
        raise ValueError(f"the Triton kernels need compute capability >= 8.0 (bf16 tensor cores); this GPU is "
                         f"{major}.{minor}")
    for cls in ("sm90", "sm80", "sm86") if major == 9 else ("sm80", "sm86"):
        if smem_per_block >= SMEM_BUDGET[cls]:
            return cls
    raise ValueError(f"this GPU (compute capability {major}.{minor}) offers {smem_per_block} bytes of shared memory "
                     f"a block; the Triton configs need at least {SMEM_BUDGET['sm86']}")


def arch_of(device: torch.device) -> str:
    """The table's class for `device`: "interp" under TRITON_INTERPRET or off the GPU, else arch_class()."""
    if interpreting() or device.type != "cuda":
        return "interp"
    return _cuda_class(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache  # six lookups a step
def _cuda_class(index: int) -> str:
    if torch.version.hip:
        raise ValueError("the Triton configs are vetted on NVIDIA GPUs only (this torch is a ROCm build)")
    props = torch.cuda.get_device_properties(index)
    # CUDA builds of torch report the opt-in limit; the fallback is each architecture's documented value
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 1024 * {
        (8, 0): 163, (8, 7): 163, (9, 0): 227, (10, 0): 227, (10, 3): 227}.get((props.major, props.minor), 99)
    return arch_class(props.major, props.minor, smem)


def _lookup(arch: str, dt: str, bd: int) -> tuple[tuple, str, int]:
    """Nearest table entry: same arch and dtype class, smallest BLOCK_D >= bd."""
    for cbd in sorted(k[2] for k in _TABLE if k[0] == arch and k[1] == dt):
        if cbd >= bd:
            return _TABLE[(arch, dt, cbd)], dt, cbd
    raise ValueError(
        f"no vetted Triton config for arch={arch} dtype class={dt} BLOCK_D={bd}: the GPU table covers bf16 / fp16 / "
        "fp32 (fp16 operands) with d <= 512 (fp64 runs in the interpreter only); use impl='torch'"
    )


# A table measured on the user's own GPU (bench/tune_triton.py writes one) replaces matching entries:
# ADASSL_FAST_TRITON_CONFIGS=path/to/tune.json. Its "table" maps "arch/dtype class/BLOCK_D" to
# {kind: [block_m, block_n, num_warps, num_stages]}; configurations from it are named "tuned_...".
TUNED_ENV = "ADASSL_FAST_TRITON_CONFIGS"


@functools.cache
def _tuned_table(path: str) -> dict:
    with open(path) as f:
        table = json.load(f)["table"]
    return {tuple(k.split("/")[:2]) + (int(k.split("/")[2]),): v for k, v in table.items()}


def pick_config(kind: str, device: torch.device, dtype: torch.dtype, d: int) -> Config:
    """The configuration a launcher uses for `kind` on `device` for inputs of `dtype` and width d.

    A mode's kind (MODE_KINDS) takes its own table entry where there is one, else its plain kind's (tuned or
    shipped).
    """
    return _pick(kind, arch_of(device), dtype_class(dtype), block_d(d), os.environ.get(TUNED_ENV) or None)


@functools.cache  # six lookups a training step: small M is bound by host time
def _pick(kind: str, arch: str, dtc: str, bd: int, tuned: str | None) -> Config:
    if arch == "interp":
        return _c(kind, "interp", dtc, bd, *_INTERP[MODE_KINDS.get(kind, kind)])
    if kind in MODE_KINDS:
        entry, edtc, ebd = _lookup(arch, dtc, bd)
        if kind in entry:
            return _c(kind, arch, edtc, ebd, *entry[kind])
        return _pick(MODE_KINDS[kind], arch, dtc, bd, tuned)
    if tuned:
        entry = _tuned_table(tuned).get((arch, dtc, bd), {})
        if kind in entry:
            return _c(f"tuned_{kind}", arch, dtc, bd, *entry[kind])
    entry, edtc, ebd = _lookup(arch, dtc, bd)
    return _c(kind, arch, edtc, ebd, *entry[kind])


def atomic_schedule(device: torch.device, dtype: torch.dtype, d: int) -> bool:
    """Whether the atomic backward schedule has a shipped shape for inputs of `dtype` and width d on `device`
    (entries with "atomic": False do not: deterministic=False then runs the deterministic schedule)."""
    return atomic_shipped(arch_of(device), dtype_class(dtype), block_d(d))


@functools.cache  # asked once per backward
def atomic_shipped(arch: str, dtc: str, bd: int) -> bool:
    """atomic_schedule by table key (arch, dtype class, BLOCK_D); the cross-compile test enumerates with it."""
    return arch == "interp" or _lookup(arch, dtc, bd)[0].get("atomic", True)


def shipped_configs() -> list[tuple[str, str, int, Config]]:
    """Every shipped GPU configuration as (arch, dtype class, BLOCK_D, Config), in a fixed order."""
    out = []
    for (arch, dt, bd), entry in _TABLE.items():
        for kind in (*KINDS, *MODE_KINDS):
            if kind in entry:
                out.append((arch, dt, bd, _c(kind, arch, dt, bd, *entry[kind])))
    return out


def num_sms(device: torch.device) -> int:
    """Programs needed to fill the device; the interpreter pretends to be an H200 (132 SMs)."""
    if device.type == "cuda" and not interpreting():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def unsupported_reason(device: torch.device, dtype: torch.dtype, d: int) -> str | None:
    """None when a shipped configuration covers inputs of `dtype` and width `d` on `device`, else why not."""
    try:
        for kind in KINDS:
            pick_config(kind, device, dtype, d)
    except (ValueError, KeyError) as exc:
        return str(exc)
    return None
