"""Backend selection: which implementation runs an op, and why another one cannot.

Nothing here imports Triton, builds the CUDA extension or touches a GPU at import time: availability is
probed lazily and cached, so `import adassl_fast` works on any machine.
"""

from __future__ import annotations

import functools
import os

import torch

from adassl_fast._version import __version__

IMPLS = ("reference", "torch", "triton", "cuda")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


@functools.cache
def _triton_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "no CUDA device (set TRITON_INTERPRET=1 before importing adassl_fast to run the kernels on CPU)"
        return None
    from adassl_fast.kernels.configs import arch_of

    try:
        arch_of(torch.device("cuda"))  # the block table's class for this GPU (cached)
    except ValueError as exc:  # a GPU no class covers (pre-Ampere, ROCm)
        return str(exc)
    return None


def _cuda_reason() -> str | None:
    if not torch.cuda.is_available():
        return f"no CUDA device visible to torch (torch {torch.__version__}, built for CUDA {torch.version.cuda})"
    from adassl_fast import _cuda

    ok, reason = _cuda.available()
    return None if ok else reason


def unavailable_reason(impl: str) -> str | None:
    """None when `impl` can run on this machine, else the reason it cannot."""
    if impl in ("reference", "torch"):
        return None
    if impl == "triton":
        return _triton_reason()
    if impl == "cuda":
        return _cuda_reason()
    raise ValueError(f"impl must be one of {('auto',) + IMPLS}, got {impl!r}")


def _input_reason(impl: str, device: torch.device, dtype: torch.dtype | None, d: int | None) -> str | None:
    """Why an available backend still cannot take these inputs (Triton ships vetted GPU configs only for
    some dtypes and widths), or None."""
    if impl != "triton" or dtype is None or d is None:
        return None
    from adassl_fast.kernels.configs import unsupported_reason

    return unsupported_reason(device, dtype, d)


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype | None = None, d: int | None = None) -> str:
    """Turn `impl` (possibly "auto") into the backend that runs on (rows, d) inputs of `dtype` on `device`.

    "auto" honours ADASSL_FAST_IMPL; otherwise CUDA tensors get triton, else cuda, else torch (each only
    where it takes these inputs), and CPU tensors get torch. An explicit backend that cannot run raises
    BackendUnavailable with the reason.
    """
    if not isinstance(impl, str):
        raise TypeError(f"impl must be a string, got {type(impl).__name__}")
    if impl == "auto":
        impl = os.environ.get("ADASSL_FAST_IMPL", "auto") or "auto"
        if impl == "auto":
            if device.type == "cuda":
                for candidate in ("triton", "cuda"):
                    if unavailable_reason(candidate) is None and _input_reason(candidate, device, dtype, d) is None:
                        return candidate
            return "torch"
    reason = unavailable_reason(impl) or _input_reason(impl, device, dtype, d)
    if reason is not None:
        raise BackendUnavailable(f'impl="{impl}" cannot run: {reason}')
    if impl == "cuda" and device.type != "cuda":
        raise BackendUnavailable('impl="cuda" needs CUDA tensors, got tensors on ' + str(device))
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendUnavailable('impl="triton" needs CUDA tensors (or TRITON_INTERPRET=1), got ' + str(device))
    return impl


def resolve_impl_among(impl: str, supported: tuple[str, ...], what: str, device: torch.device,
                       dtype: torch.dtype | None = None, d: int | None = None) -> str:
    """resolve_impl for an op only some backends have: "auto" takes "torch" where it would pick another
    backend; an explicit backend outside `supported` raises BackendUnavailable naming `what` it lacks."""
    resolved = resolve_impl(impl, device, dtype, d)
    if resolved in supported:
        return resolved
    if impl == "auto":
        return "torch"
    raise BackendUnavailable(f'impl="{resolved}" has no {what} kernels yet; impl="torch" or "reference" runs it')


def info() -> dict:
    """Versions, the device, and each backend with whether it is available (and why not)."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu_name()
    backends = {}
    for impl in IMPLS:
        try:
            reason = unavailable_reason(impl)
        except Exception as exc:  # a failing probe is itself a reason, never a crash
            reason = f"probe failed: {type(exc).__name__}: {exc}"
        backends[impl] = {"available": reason is None, "reason": reason}
    from adassl_fast._cuda import wgmma_requested

    # the CUDA backend's opt-in wgmma tile path on sm_90 devices (adassl_fast/_cuda.py)
    backends["cuda"]["wgmma"] = wgmma_requested()
    return {
        "adassl_fast": __version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_runtime": torch.version.cuda,
        "device": device,
        "default_impl_cpu": resolve_impl("auto", torch.device("cpu")),
        "backends": backends,
    }


@functools.cache
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
