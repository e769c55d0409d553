"""Host-side helpers every Triton launcher shares: buffers, grid arithmetic, precision, the device.

Small M is bound by host time (bench/launch_overhead.py), so these stay plain Python arithmetic.
"""

from __future__ import annotations

import functools

import torch

from .configs import block_d, interpreting, num_sms

# Tests set this to fill every buffer the launchers allocate with NaN before the kernels run, so an
# element a kernel forgets to write (or a partial it reads before it is written) shows up.
POISON = False


def empty(shape, dtype, device):
    if POISON:
        return torch.full(tuple(shape) if not isinstance(shape, int) else (shape,), float("nan"), dtype=dtype,
                          device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def cdiv(a: int, b: int) -> int:
    # not triton.cdiv: from host code that goes through a constexpr-function wrapper (~10 us a call, 14
    # calls a step), and small M is bound by exactly this host time (bench/launch_overhead.py)
    return -(-a // b)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The statistics / accumulation dtype for inputs of `dtype`: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_precision(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, PREC) for the matrix kernels on operands (u, v: configs.operand_dtype) of `dtype`.

    UPCAST turns loaded bf16 / fp16 tiles into fp32: the interpreter computes 16-bit floats wrongly, so it
    is set only under TRITON_INTERPRET. float64 operands run only in the interpreter, with IEEE dots.
    """
    if dtype in (torch.float16, torch.bfloat16):
        return interpreting(), "tf32"
    return False, "ieee"


def column_splits(n_own_blocks: int, n_loop_blocks: int, device, num_splits) -> int:
    """Blocks of the loop range per split: enough programs for ~2 waves on the device."""
    if num_splits is None:
        num_splits = max(1, cdiv(2 * num_sms(device), max(n_own_blocks, 1)))
    num_splits = max(1, min(int(num_splits), n_loop_blocks))
    return cdiv(n_loop_blocks, num_splits)


def rows_per_program(d: int, prologue: int, finishing: bool, normalize: bool = True) -> int:
    """Rows per program of the O(M d) kernels (the normalising and the finishing kernel).

    Their whole tile lives in registers: the AdaSSL latent math keeps ~10 (rows x BLOCK_D) fp32 temporaries
    live (its backward more), so each kind gets a fixed element budget and the rows shrink as d grows
    (tests/test_cross_compile.py compiles exactly these shapes and checks them for spills). The finishing
    kernel writes the caller's (rows, d) gradients: where d is not a multiple of 16 those rows are not
    16-byte aligned, each element takes its own address, and it gets half the budget (at d = 100 the full
    one spilled 912 bytes on sm_80; a quarter left an 8-byte stack frame on sm_90; tests/test_launch_path.py).
    The finishing kernel of plain rows taken as given (normalize=False: no normalisation backward, so little
    is live) gets a quarter: at the full and the half budget ptxas chose 56-128 registers for it on sm_90
    and spilled 8-16 bytes (bf16 and fp32 rows, d = 128-512; tests/test_cross_compile.py), at a quarter it
    takes 39-72 and spills none.
    """
    budget = (1024 if finishing else 2048) if prologue else 8192
    if finishing and not prologue and not normalize:
        budget //= 4
    elif finishing and d % 16:
        budget //= 2
    return max(1, min(64, budget // block_d(d)))


def on_input_device(launcher):
    """Run a Triton entry point on its first argument's CUDA device. Triton launches on the current device (and
    its current stream): in a process whose current device is another GPU it would launch there."""

    @functools.wraps(launcher)
    def run(first, *args, **kwargs):
        if first.is_cuda and first.device.index != torch.cuda.current_device():
            with torch.cuda.device(first.device):
                return launcher(first, *args, **kwargs)
        return launcher(first, *args, **kwargs)

    return run


def check_core_inputs(cont, targ, pos, excl, scale):
    """The input contract of the nt_xent core (docs/backends.md), as assertions."""
    assert cont.dim() == 2 and targ.dim() == 2 and cont.shape[1] == targ.shape[1], (cont.shape, targ.shape)
    assert cont.dtype == targ.dtype and cont.is_contiguous() and targ.is_contiguous()
    assert pos.shape == (cont.shape[0],) and excl.shape == (cont.shape[0],)
    assert scale.dim() == 0 and scale.dtype == stat_dtype(cont.dtype), scale.dtype
    assert cont.shape[1] <= 512, "the Triton backend tiles d <= 512 in one block"
