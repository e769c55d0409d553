"""Argument validation shared by every op: clear errors naming the argument, nothing silent."""

from __future__ import annotations

import functools
import math
import os

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_checks_enabled = os.environ.get("ADASSL_FAST_CHECKS", "0") not in ("", "0")


def set_checks(enabled: bool) -> None:
    """Make every op raise on NaN/Inf inputs (costs a device sync per input, hence opt-in)."""
    global _checks_enabled
    _checks_enabled = bool(enabled)


def matrix(name: str, t, *, min_rows: int = 1) -> torch.Tensor:
    """A 2-D floating tensor with at least `min_rows` rows and one column, returned contiguous."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(t.shape)}")
    if t.shape[0] < min_rows or t.shape[1] < 1:
        raise ValueError(f"{name} must have at least {min_rows} rows and 1 column, got shape {tuple(t.shape)}")
    if _checks_enabled:
        _require_finite(t, f"{name} contains NaN or Inf (checks enabled by set_checks / ADASSL_FAST_CHECKS)")
    return t if t.is_contiguous() else t.contiguous()


def _require_finite(t: torch.Tensor, message: str) -> None:
    """Raise ValueError(message) if `t` holds NaN or Inf (a device sync).

    Meta and fake tensors (shape propagation) hold no values to check; a graph torch.compile traces
    cannot branch on a value, so there the check is an assertion inside the graph.
    """
    finite = torch.isfinite(t).all()
    if torch.compiler.is_compiling():
        torch._assert_async(finite, message)
    elif not (t.device.type == "meta" or torch._subclasses.fake_tensor.is_fake(t)) and not bool(finite):
        raise ValueError(message)


def same_layout(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, *, shape=None) -> None:
    """`t` must match `ref` in dtype and device, and in shape (or `shape` when given)."""
    want = tuple(ref.shape) if shape is None else tuple(shape)
    if tuple(t.shape) != want:
        raise ValueError(f"{name} must have shape {want} to match {ref_name}, got {tuple(t.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; pass both in one dtype")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def positive_float(name: str, value) -> float:
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    value = float(value)
    # comparisons, not math.isfinite: torch.compile(dynamic=True) traces them on a symbolic float
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def extra_columns(name: str, t, like_name: str, like: torch.Tensor, process_group) -> torch.Tensor | None:
    """None, or `t` (K, d) as extra columns beside `like` (N, d): same dtype, device and d; not distributed."""
    if t is None:
        return None
    if process_group is not None:
        raise ValueError(f"{name} with process_group is not supported: the distributed schedules carry no extra "
                         "columns (a queue is usually the same on every rank: call without process_group)")
    t = matrix(name, t)
    same_layout(name, t, like_name, like, shape=(t.shape[0], like.shape[1]))
    return t


def optional_clamp(clamp) -> float | None:
    return None if clamp is None else positive_float("clamp", clamp)


def scale_tensor(scale, like: torch.Tensor) -> torch.Tensor:
    """`scale` (None, a number, or a 0-dim tensor) as a 0-dim tensor in the ops' accumulation dtype.

    A tensor keeps its autograd history (the cast is differentiable), so lambda receives a gradient.
    """
    acc = accumulation_dtype(like.dtype)
    if scale is None:
        return constant(1.0, acc, like.device)
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0:
            raise ValueError(f"scale must be a 0-dim tensor (the learnable lambda), got shape {tuple(scale.shape)}")
        if not scale.is_floating_point():
            raise TypeError(f"scale must be a floating tensor, got {scale.dtype}")
        if scale.device != like.device:
            raise ValueError(f"scale is on {scale.device} but the embeddings are on {like.device}")
        if _checks_enabled:
            _require_finite(scale, "scale is NaN or Inf (checks enabled)")
        return scale.to(acc)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be None, a float or a 0-dim tensor, got {type(scale).__name__}")
    if not -math.inf < scale < math.inf:  # (comparisons: traceable on a symbolic float, as above)
        raise ValueError(f"scale must be finite, got {scale}")
    return constant(float(scale), acc, like.device)


def reused(make):
    """`make(*key)` -> read-only tensors, memoised for the last few keys (the device among them).

    For the constants every step needs (index vectors, a fixed scale): made anew they cost a few small
    kernels a step, and small M is bound by its launches (bench/launch_overhead.py). Made afresh while
    torch.compile traces, so no cached tensor is baked into a graph, and under a dispatch mode such as
    FakeTensorMode, whose tensors must not outlive it in the cache.
    """
    cached = functools.lru_cache(maxsize=8)(make)

    @functools.wraps(make)
    def get(*key):
        if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
            return make(*key)
        return cached(*key)

    return get


@reused
def constant(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A read-only 0-dim tensor (a fill kernel: torch.tensor(...) on a GPU would copy from the host and wait)."""
    return torch.full((), value, dtype=dtype, device=device)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (exact tests); every other dtype accumulates and reports in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
