"""adassl_fast: fused, memory-efficient AdaSSL, NT-Xent and InfoNCE losses.

Functional ops (docs/api.md): nt_xent, info_nce, adassl_nt_xent, gaussian_kl, gaussian_sample,
bernoulli_mask, l0_penalty, siglip. Modules: adassl_fast.nn; OpenCLIP's and lightly's loss classes:
adassl_fast.compat. Backends: impl="reference" | "torch" | "triton" |
"cuda" | "auto".
"""

from adassl_fast import compat, nn
from adassl_fast._checks import set_checks
from adassl_fast._dispatch import BackendUnavailable, info
from adassl_fast._version import __version__
from adassl_fast.adassl import adassl_nt_xent
from adassl_fast.cached import cached_backward
from adassl_fast.info_nce import info_nce
from adassl_fast.latent import bernoulli_mask, gaussian_kl, gaussian_sample, l0_penalty
from adassl_fast.nt_xent import nt_xent
from adassl_fast.siglip import siglip

__all__ = [
    "BackendUnavailable",
    "__version__",
    "adassl_nt_xent",
    "bernoulli_mask",
    "cached_backward",
    "compat",
    "gaussian_kl",
    "gaussian_sample",
    "info",
    "info_nce",
    "l0_penalty",
    "nn",
    "nt_xent",
    "set_checks",
    "siglip",
]
