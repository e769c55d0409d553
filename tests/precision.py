"""The relative error every low-precision backend test measures with."""

import torch


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64, less two fp16 subnormal quanta (6e-8) per element when `a` is fp16:
    gradients of ~1e-7 and below are not representable any closer, whatever the kernel does."""
    quantum = 6e-8 if a.dtype == torch.float16 else 0.0
    a, b = a.double(), b.double()
    err = ((a - b).norm() - 2 * quantum * a.numel() ** 0.5).clamp_min(0)
    return float(err / b.norm().clamp_min(1e-30))
