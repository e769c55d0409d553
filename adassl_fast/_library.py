"""The one op mechanism: the table from `impl` to a backend's entry points (`backend`), and the registration
every op uses: a torch.library op with a fake (meta) implementation and an autograd formula, whose kernel
picks the backend by its `impl` argument.

The ops are defined through the low-level torch.library API rather than `torch.library.custom_op`: the
latter wraps each call in a dynamo guard whose first use imports torch._dynamo (about 10 s of start-up on
a small CPU machine, paid by every process). torch.compile and opcheck see the same op either way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from adassl_fast import _checks, torch_backend
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


@dataclass(frozen=True)
class LossOps:
    """The registered ops of one loss: forward -> (*losses, lse), backward -> the gradients of `graded`, and
    (where the torch backend has it) the one-pass training op -> (*losses, lse, *stash)."""

    forward: object
    backward: object
    forward_backward: object | None


def define_loss(
    name: str,
    *,
    tensors: tuple[str, ...],
    graded: tuple[str, ...],
    options: str,
    losses: tuple[str, ...],
    lse_shape: Callable,
    reference: Callable | None,
    stash_fake: Callable | None = None,
    stash_backward: Callable | None = None,
    reference_only: tuple[str, ...] = (),
    public: str | None = None,
    keywords: tuple[str, ...] = (),
    body: tuple[Callable, Callable] | None = None,
    saved: tuple[str, ...] = (),
    saved_fake: Callable | None = None,
    not_differentiable: str | None = None,
) -> LossOps:
    """Register `<name>_forward`, `<name>_backward` (and `<name>_forward_backward` where `stash_backward` is
    given) with their kernels, fakes and autograd formula, all generated here for every loss, the distributed
    schedules' included (adassl_fast/distributed.py: `body` in place of the table's entry points).

    Args:
        name: the op's name; the kernels call `backend(impl).<name>_forward(*tensors, *options)` and
            `.<name>_backward(*grads, *tensors, lse, *options, deterministic)` (docs/backends.md), the one-pass
            op `torch_backend.<name>_forward_backward(*tensors, *options)`.
        tensors: the names of the tensor inputs, in order; an empty (0,) tensor stands in for an absent input
            (an op cannot take None in one call and a tensor in the next) and gets no gradient.
        graded: the tensor inputs the backward kernels give gradients for, in the backward op's output order.
        options: the schema of the non-tensor inputs ("float inv_temperature, float? clamp", ...); every op
            takes `str impl, bool deterministic` after them.
        losses: the names of the 0-dim losses the forward returns (its backward takes `grad_<loss>` of each).
        lse_shape: the forward's inputs (*tensors, *options, impl, deterministic) -> the shape of the saved LSEs.
        reference: (*tensors, *options) -> the losses by plain autograd ops: the double backward differentiates
            it (`differentiable_backward`), and so does a gradient for an input outside `graded`. None where
            the backward is never differentiable (`not_differentiable` says where; both cases then raise).
        stash_fake: (*tensors) -> fakes of the one-pass op's stash (the gradients for unit incoming gradients).
        stash_backward: (stash, grads, tensors, options) -> the gradients of `graded` from the stash.
        reference_only: the inputs only the reference can differentiate (named in the refusal of other backends).
        public: the functional form's name in error messages (default `name`).
        keywords: bool options every entry point (and the reference) takes as trailing keywords, e.g.
            ("normalize",); in the schema they follow `deterministic`.
        body: (forward, backward) called with every argument of the op (impl and deterministic included) in
            place of `backend(impl).<name>_forward` / `_backward`: the op's own schedule, which calls the
            backends' ops itself (the distributed schedules communicate between their per-block core calls).
        saved: names of tensors the forward returns after the LSE for its backward, which takes them after
            `lse` (the gather schedule's gathered columns); `saved_fake` (the forward's inputs) -> their fakes.
            Not with a one-pass op (`stash_backward`).
        not_differentiable: with `reference=None`, the phrase naming where the backward cannot be
            differentiated, for the refusal of a double backward or of a gradient for `reference_only`.
    """
    n = len(tensors)
    tensor_schema = ", ".join(f"Tensor {t}" for t in tensors)
    option_schema = ", ".join(filter(None, (options, "str impl, bool deterministic", *(f"bool {k}" for k in keywords))))
    grad_schema = ", ".join(f"Tensor grad_{loss}" for loss in losses)
    lse_schema = ", ".join(["Tensor lse", *(f"Tensor {t}" for t in saved)])
    returns = lambda k: "(" + ", ".join(["Tensor"] * k) + ")"
    graded_at = [tensors.index(t) for t in graded]

    def split_keywords(args):
        """(the arguments before the keyword options, the keyword options as a dict)."""
        cut = len(args) - len(keywords)
        return args[:cut], dict(zip(keywords, args[cut:], strict=True))

    def forward_kernel(*args):
        if body is not None:
            return body[0](*args)
        (*inputs, impl, _), kw = split_keywords(args)
        return getattr(backend(impl), f"{name}_forward")(*inputs, **kw)

    def forward_fake(*args):
        first = args[0]
        acc = _checks.accumulation_dtype(first.dtype)
        lse = first.new_empty(lse_shape(*args), dtype=acc)
        return *(first.new_empty((), dtype=acc) for _ in losses), lse, *(saved_fake(*args) if saved else ())

    def backward_kernel(*args):
        if body is not None:
            return body[1](*args)
        (*inputs, impl, deterministic), kw = split_keywords(args)
        return getattr(backend(impl), f"{name}_backward")(*inputs, deterministic, **kw)

    def backward_fake(*args):
        inputs = args[len(losses):len(losses) + n]
        return tuple(torch.empty_like(inputs[i]) for i in graded_at)

    def one_pass_kernel(*args):
        (*inputs, impl, _), kw = split_keywords(args)
        if impl != "torch":
            raise ValueError(f"the one-pass training op is the torch backend's schedule, got impl={impl!r}")
        return getattr(torch_backend, f"{name}_forward_backward")(*inputs, **kw)

    def one_pass_fake(*args):
        return *forward_fake(*args), *stash_fake(*args[:n])

    def setup_context(ctx, inputs, output):
        # after the LSE: what the backward op takes (`saved`), then the one-pass op's stash (its gradients for
        # unit incoming gradients)
        lse, *rest = output[len(losses):]
        ctx.save_for_backward(*inputs[:n], lse, *rest)
        ctx.options = inputs[n:]  # (*options, impl, deterministic, *keywords)
        ctx.mark_non_differentiable(lse, *rest)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for lse, which nothing differentiates

    def autograd_backward(ctx, *grad_outputs):
        grads = grad_outputs[:len(losses)]
        if all(g is None for g in grads):  # no loss was differentiated (grads are not materialised)
            return (None,) * (n + len(ctx.options))
        kept = ctx.saved_tensors
        inputs, lse, for_backward, stash = kept[:n], kept[n], kept[n + 1:n + 1 + len(saved)], kept[n + 1 + len(saved):]
        grads = tuple(lse.new_zeros(()) if g is None else g for g in grads)  # a loss not differentiated
        (*options, impl, _), kw = split_keywords(ctx.options)
        beyond_kernels = any(ctx.needs_input_grad[i] for i in range(n) if i not in graded_at)
        if torch.is_grad_enabled() or beyond_kernels:
            why = "double backward" if torch.is_grad_enabled() else f"a gradient for {' / '.join(reference_only)}"
            if reference is None:
                raise unsupported_backward(public or name, not_differentiable, why)
            found = differentiable_backward(public or name, impl, lambda *t: reference(*t, *options, **kw), inputs,
                                            grads[0] if len(grads) == 1 else grads, why)
        else:
            if stash:
                found_graded = stash_backward(stash, grads, inputs, options)
            else:
                found_graded = backward_op(*grads, *inputs, lse, *for_backward, *ctx.options)
            found = [None] * n
            for i, g in zip(graded_at, found_graded, strict=True):
                found[i] = g
        found = [None if t.numel() == 0 else g for t, g in zip(inputs, found, strict=True)]
        return (*found, *(None,) * len(ctx.options))

    backward_op = define_op(
        f"{name}_backward({grad_schema}, {tensor_schema}, {lse_schema}, {option_schema}) -> {returns(len(graded))}",
        backward_kernel, backward_fake)
    training = dict(backward=autograd_backward, setup_context=setup_context)
    forward_op = define_op(
        f"{name}_forward({tensor_schema}, {option_schema}) -> {returns(len(losses) + 1 + len(saved))}",
        forward_kernel, forward_fake, **training)
    one_pass_op = None if stash_backward is None else define_op(
        f"{name}_forward_backward({tensor_schema}, {option_schema}) -> {returns(len(losses) + 4)}",
        one_pass_kernel, one_pass_fake, **training)
    return LossOps(forward_op, backward_op, one_pass_op)


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
    # None: the backend lacks the op (the functional forms refuse it first, adassl_fast/siglip.py / info_nce.py)
    siglip_forward: object = None
    siglip_backward: object = None
    labelled_forward: object = None
    labelled_backward: object = None
    labelled_info_nce_forward: object = None
    labelled_info_nce_backward: object = None


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
    from adassl_fast.kernels import adassl, info_nce, nt_xent, siglip

    def given(module, entry: str, rows_at: int, indices):
        """module.<entry> with its `indices=` from the size of its argument `rows_at` (options such as normalize
        pass through as keywords, docs/backends.md); looked up per call, like the table's other entries."""

        def run(*args, **options):
            rows = args[rows_at]
            return getattr(module, entry)(*args, indices=indices(len(rows), rows.device), **options)

        return run

    paired = lambda b, device: partner_indices(2 * b, device)  # AdaSSL's 2 B edited rows from B pairs
    return Backend(nt_xent.nt_xent_forward, nt_xent.nt_xent_backward,
                   given(info_nce, "info_nce_forward", 0, diagonal_indices),
                   given(info_nce, "info_nce_backward", 1, diagonal_indices),
                   given(adassl, "adassl_forward", 0, paired), given(adassl, "adassl_backward", 2, paired),
                   given(siglip, "siglip_forward", 0, diagonal_indices),
                   given(siglip, "siglip_backward", 1, diagonal_indices),
                   info_nce.labelled_forward,
                   info_nce.labelled_backward, info_nce.labelled_info_nce_forward, info_nce.labelled_info_nce_backward)
