"""CUDA C++ backend: the backend entry points (docs/backends.md) over the module adassl_fast/_cuda_build.py builds.

The module is built (or loaded from the build cache, or the one setup.py built ahead of time) on first use.
On sm_90 devices the bf16 / fp16 tiles run on mma.sync unless ``ADASSL_FAST_CUDA_WGMMA=1`` (read at each
launch) selects the wgmma path (csrc/adassl_mma.cuh, AsyncMma): opt-in until it has been checked and timed
on a GPU; ``info()["wgmma"]`` says which one runs.

Entry points (same signatures as every backend):
``nt_xent_forward``, ``nt_xent_backward``, ``adassl_forward``, ``adassl_backward``; plus
``available() -> (bool, reason)`` and ``info() -> dict``.
"""

from __future__ import annotations

import functools
import os

import torch

from adassl_fast import _cuda_build

__all__ = [
    "available",
    "info",
    "nt_xent_forward",
    "nt_xent_backward",
    "adassl_forward",
    "adassl_backward",
]

WGMMA_ENV = "ADASSL_FAST_CUDA_WGMMA"

_build_error: str | None = None  # why the build failed, once it has: available() does not try again


@functools.cache  # available() runs on every call that resolves impl="cuda"
def _capability_reason() -> str | None:
    """Why a visible GPU cannot run the kernels (nvcc builds for each of them, _gencodes), or None."""
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        if major < 8:
            return (f"the CUDA kernels need compute capability >= 8.0 (bf16 mma.sync, cp.async); GPU {i} "
                    f"({torch.cuda.get_device_name(i)}) is {major}.{minor}")
    return None


def available() -> tuple[bool, str]:
    """(True, "") when the CUDA backend can run here, else (False, why)."""
    if not torch.cuda.is_available():
        return False, (
            f"torch.cuda.is_available() is False: no usable CUDA device/driver (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda})"
        )
    reason = _capability_reason()
    if reason is not None:
        return False, reason
    global _build_error
    if _build_error is None:
        try:
            _cuda_build.build()
        except Exception as e:  # noqa: BLE001 - reported through available() / info()
            _build_error = f"adassl_fast CUDA extension build failed: {e}"
    return _build_error is None, _build_error or ""


def wgmma_requested() -> bool:
    """Whether ADASSL_FAST_CUDA_WGMMA=1 asks for the wgmma tile path (the launcher takes it on sm_90 devices)."""
    return os.environ.get(WGMMA_ENV) == "1"


def info() -> dict:
    """Backend status: availability, reason, the tensor-core path on sm_90 ("wgmma": asked for with
    ADASSL_FAST_CUDA_WGMMA=1, else mma.sync), toolkit, build directory and the build log text."""
    ok, reason = available()
    built = _cuda_build.build_info()
    return {
        "available": ok,
        "reason": reason,
        "wgmma": wgmma_requested(),
        "cuda_home": built["cuda_home"] or _cuda_build.find_cuda_home(),
        "build_dir": built["build_dir"],
        "gencodes": built["gencodes"],
        "build_log": built["build_log"],
    }


def _module():
    ok, reason = available()
    if not ok:
        raise RuntimeError(reason)
    return _cuda_build.build()


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _clamp(clamp):
    return None if clamp is None else float(clamp)


# ------------------------------------------------------------------------------------------------
# Backend entry points (docs/backends.md)
# ------------------------------------------------------------------------------------------------
def _contiguous(*tensors):
    return [t.contiguous() for t in tensors]


def nt_xent_forward(cont, targ, pos, excl, scale, inv_temperature, clamp, *, normalize=True):
    """-> (loss 0-dim, lse (M,)); float32 (float64 for float64 inputs). normalize=False: the rows as given."""
    m = _module()
    with torch.cuda.device(cont.device):
        loss, lse = m.nt_xent_forward(
            *_contiguous(cont, targ, pos, excl),
            scale,
            float(inv_temperature),
            _clamp(clamp),
            bool(normalize),
            _stream(cont),
        )
    return loss, lse


def nt_xent_backward(grad_loss, cont, targ, pos, excl, scale, lse, inv_temperature, clamp, deterministic=True, *,
                     normalize=True):
    """-> (dcont, dtarg, dscale). Always the deterministic row/column schedule; normalize=False: no
    normalisation backward."""
    m = _module()
    with torch.cuda.device(cont.device):
        dcont, dtarg, dscale = m.nt_xent_backward(
            grad_loss,
            *_contiguous(cont, targ, pos, excl),
            scale,
            lse,
            float(inv_temperature),
            _clamp(clamp),
            bool(normalize),
            _stream(cont),
        )
    return dcont, dtarg, dscale


def adassl_forward(
    emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx, scale, inv_temperature, clamp, variant, *,
    normalize=True,
):
    """-> (l_ssl, l_reg, lse (2B,)). normalize=False: the edited rows and the targets as given."""
    m = _module()
    with torch.cuda.device(emb_x.device):
        return tuple(
            m.adassl_forward(
                *_contiguous(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx),
                scale,
                float(inv_temperature),
                _clamp(clamp),
                str(variant),
                bool(normalize),
                _stream(emb_x),
            )
        )


def adassl_backward(
    grad_ssl,
    grad_reg,
    emb_x,
    emb_y,
    post_xy,
    post_yx,
    prior_xy,
    prior_yx,
    noise_xy,
    noise_yx,
    scale,
    lse,
    inv_temperature,
    clamp,
    variant,
    deterministic=True,
    *,
    normalize=True,
):
    """-> (demb_x, demb_y, dpost_xy, dpost_yx, dprior_xy, dprior_yx, dscale)."""
    m = _module()
    with torch.cuda.device(emb_x.device):
        return tuple(
            m.adassl_backward(
                grad_ssl,
                grad_reg,
                *_contiguous(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx),
                scale,
                lse,
                float(inv_temperature),
                _clamp(clamp),
                str(variant),
                bool(normalize),
                _stream(emb_x),
            )
        )
