"""The one op mechanism: the table from `impl` to a backend's entry points (`backend`), and the registration
every op uses: a torch.library op with a fake (meta) implementation and an autograd formula, whose kernel
picks the backend by its `impl` argument.

The ops are defined through the low-level torch.library API rather than `torch.library.custom_op`: the
latter wraps each call in a dynamo guard whose first use imports torch._dynamo (about 10 s of start-up on
a small CPU machine, paid by every process). torch.compile and opcheck see the same op either way.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from adassl_fast import torch_backend
from adassl_fast.indices import diagonal_indices, partner_indices

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


# Backends whose registered backward can run with grad mode on (create_graph=True): there it differentiates
# a composition of torch ops instead of calling the fused kernels, whose gradients autograd cannot see into.
DIFFERENTIABLE_BACKWARD_IMPLS = ("torch",)


def differentiable_backward(op: str, impl: str, loss_fn, inputs, grad_outputs, why: str = "double backward"):
    """Gradients of `loss_fn(*inputs)` (a loss or a tuple of losses) that autograd can differentiate again.

    The ops' registered backward calls this instead of its backward kernel when the gradients themselves
    must carry a graph (`torch.autograd.grad(..., create_graph=True)`, a gradient penalty), or when it
    needs a gradient the kernels do not compute. `loss_fn` materialises the logits: the second-order graph
    holds M x M values whatever computes it. Backends outside DIFFERENTIABLE_BACKWARD_IMPLS refuse: their
    fused backward would be differentiated as if it were constant, silently wrong.

    Returns one gradient per input, None for inputs that do not require grad.
    """
    if impl not in DIFFERENTIABLE_BACKWARD_IMPLS:
        raise unsupported_backward(op, f'on impl="{impl}" (its fused backward kernels are not differentiable)', why)
    wanted = [i for i, t in enumerate(inputs) if t.requires_grad]
    grads = [None] * len(inputs)
    if not wanted:
        return grads
    create_graph = torch.is_grad_enabled()  # off when only a gradient the kernels lack is wanted
    with torch.enable_grad():
        losses = loss_fn(*inputs)
        found = torch.autograd.grad(losses, [inputs[i] for i in wanted], grad_outputs, create_graph=create_graph,
                                    allow_unused=True)
    for i, g in zip(wanted, found, strict=True):
        grads[i] = g
    return grads


def unsupported_backward(op: str, where: str, why: str = "double backward") -> NotImplementedError:
    """The error for a backward that cannot be exact `where`, naming the backends that can."""
    return NotImplementedError(
        f'adassl_fast.{op}: {why} is not supported {where}; impl="torch" or impl="reference" (in one process) '
        "computes it exactly"
    )


# ----------------------------------------------------------------------------------------------------
# The dispatch table: impl -> the entry points of docs/backends.md.


class Backend(NamedTuple):
    """One backend's entry points, with the signatures of docs/backends.md."""

    nt_xent_forward: object
    nt_xent_backward: object
    info_nce_forward: object
    info_nce_backward: object
    adassl_forward: object
    adassl_backward: object


@functools.cache
def backend(impl: str) -> Backend:
    """The entry points of the backend `impl` ("torch", "triton" or "cuda"). Triton and the CUDA build are
    imported on first use, so importing the library never needs them."""
    if impl == "torch":
        return _entry_points(torch_backend)
    if impl == "triton":
        return _triton_backend()
    if impl == "cuda":
        from adassl_fast import _cuda

        # the CUDA backend composes the symmetric InfoNCE op from two calls of its nt_xent core
        return Backend(_cuda.nt_xent_forward, _cuda.nt_xent_backward,
                       torch_backend.symmetric_forward(_cuda.nt_xent_forward),
                       torch_backend.symmetric_backward(_cuda.nt_xent_backward), _cuda.adassl_forward,
                       _cuda.adassl_backward)
    raise ValueError(f"no kernels for impl={impl!r}")


def _entry_points(module) -> Backend:
    return Backend(*(getattr(module, name) for name in Backend._fields))


def _triton_backend() -> Backend:
    """kernels/'s entry points, given the index vectors they take as arguments (kernels/ imports nothing of
    the library)."""
    from adassl_fast.kernels import adassl, info_nce, nt_xent

    def info_nce_forward(query, *args):
        return info_nce.info_nce_forward(query, *args, indices=diagonal_indices(len(query), query.device))

    def info_nce_backward(grad_loss, query, *args):
        return info_nce.info_nce_backward(grad_loss, query, *args, indices=diagonal_indices(len(query), query.device))

    def adassl_forward(emb_x, *args):
        return adassl.adassl_forward(emb_x, *args, indices=partner_indices(2 * len(emb_x), emb_x.device))

    def adassl_backward(grad_ssl, grad_reg, emb_x, *args):
        return adassl.adassl_backward(grad_ssl, grad_reg, emb_x, *args,
                                      indices=partner_indices(2 * len(emb_x), emb_x.device))

    return Backend(nt_xent.nt_xent_forward, nt_xent.nt_xent_backward, info_nce_forward, info_nce_backward,
                   adassl_forward, adassl_backward)
