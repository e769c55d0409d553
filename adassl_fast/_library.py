"""The one registration mechanism every op uses: a torch.library op with a fake (meta) implementation and
an autograd formula, whose kernel picks the backend by its `impl` argument.

The ops are defined through the low-level torch.library API rather than `torch.library.custom_op`: the
latter wraps each call in a dynamo guard whose first use imports torch._dynamo (about 10 s of start-up on
a small CPU machine, paid by every process). torch.compile and opcheck see the same op either way.
"""

from __future__ import annotations

import functools

import torch

_LIB = torch.library.Library("adassl_fast", "DEF")


def _without_autocast(kernel):
    """Backends choose their own precision: an enclosing autocast must not recast their inner products."""

    @functools.wraps(kernel)
    def run(*args):
        if not (torch.is_autocast_enabled("cuda") or torch.is_autocast_enabled("cpu")):
            return kernel(*args)  # the common case, without two context managers per call (host time)
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return kernel(*args)

    return run


def define_op(schema: str, kernel, fake, *, backward=None, setup_context=None):
    """Define `adassl_fast::<name>` from its schema and return the callable OpOverload."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, _without_autocast(kernel), "CompositeExplicitAutograd")
    qualname = f"adassl_fast::{name}"
    torch.library.register_fake(qualname, fake, lib=_LIB)
    if backward is not None:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=_LIB)
    return getattr(torch.ops.adassl_fast, name).default
