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
