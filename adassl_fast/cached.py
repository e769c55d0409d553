"""Exact cached-embedding training (GradCache): batches larger than the encoder's activation memory.

A fused O(M) loss does not by itself make a large batch fit: the encoder still holds every row's
activations until backward. `cached_backward` splits the step in three stages:

    (a) encode each stream chunk by chunk without a graph, keeping only the (N, d) embeddings;
    (b) run `loss_fn` on the full embeddings with autograd and backpropagate it to the embeddings
        (and to every parameter used inside `loss_fn`: AdaSSL's networks, a learnable scale);
    (c) re-encode each chunk with a graph and backpropagate that chunk's cached embedding gradient.

The loss sees the whole batch (every negative), the encoder holds one chunk's activations, and the
parameters end with the gradient of the full-batch backward up to float rounding. Stage (c) costs one
extra encoder forward. Exactness needs the two passes of a chunk to compute the same function:

* RNG: the CPU and every initialised CUDA generator are captured before a chunk's first pass and
  replayed for its second (dropout masks match); afterwards the generators are left where stages (a)
  and (b) left them, as if the encoder had run once.
* autocast: both passes and `loss_fn` run inside the caller's autocast context, so they cast alike;
  the backward passes run with autocast off, as torch.amp prescribes for `backward()`.
* batch-dependent modules (BatchNorm in training mode, or without running statistics) normalise each
  chunk by its own statistics, which is not the full-batch function: rejected unless
  `allow_batch_dependent=True`, where each chunk is its own normalisation batch (ghost batch norm)
  and the running statistics are updated once per chunk, not twice.
* DistributedDataParallel (any wrapper with `no_sync()`): the gradients of every chunk accumulate
  locally and are all-reduced once, in the last backward through that wrapper.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

StreamInput = Tensor | Sequence[Tensor]
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


# ----------------------------------------------------------------------------------------------------
# Argument checks.


def _stream_args(inputs) -> list[tuple]:
    if isinstance(inputs, Tensor) or not isinstance(inputs, Sequence) or isinstance(inputs, (str, bytes)):
        raise TypeError(
            "inputs must be a sequence with one entry per stream (a tensor, or a tuple of tensors "
            f"passed to that stream's model as positional arguments), got {type(inputs).__name__}"
        )
    if len(inputs) == 0:
        raise ValueError("inputs must hold at least one stream, got an empty sequence")
    streams = []
    for s, entry in enumerate(inputs):
        args = (entry,) if isinstance(entry, Tensor) else entry
        if not isinstance(args, (tuple, list)) or len(args) == 0:
            raise TypeError(f"inputs[{s}] must be a tensor or a non-empty tuple of tensors, got {type(entry).__name__}")
        for k, a in enumerate(args):
            if not isinstance(a, Tensor):
                raise TypeError(f"inputs[{s}][{k}] must be a torch.Tensor, got {type(a).__name__}")
            if a.dim() == 0:
                raise ValueError(f"inputs[{s}][{k}] must have a batch dimension, got a 0-dim tensor")
        streams.append(tuple(args))
    return streams


def _batch_size(streams: list[tuple]) -> int:
    sizes = {(s, k): a.shape[0] for s, args in enumerate(streams) for k, a in enumerate(args)}
    if len(set(sizes.values())) != 1:
        listing = ", ".join(f"inputs[{s}][{k}]: {n}" for (s, k), n in sizes.items())
        raise ValueError(f"every input tensor must have the same first dimension N (the batch), got {listing}")
    n = next(iter(sizes.values()))
    if n < 1:
        raise ValueError("inputs must have at least one row, got N = 0")
    return n


def _stream_models(models, n_streams: int) -> list[nn.Module]:
    if isinstance(models, nn.Module):
        return [models] * n_streams
    if not isinstance(models, Sequence):
        raise TypeError(f"models must be an nn.Module or a sequence of them, got {type(models).__name__}")
    if len(models) != n_streams:
        raise ValueError(
            f"models must hold one module per input stream: got {len(models)} models for {n_streams} streams "
            "(pass a single module to use it for every stream)"
        )
    for s, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"models[{s}] must be an nn.Module, got {type(m).__name__}")
    return list(models)


def _chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return chunk_size


def is_batch_dependent(module: nn.Module) -> bool:
    """True when `module`'s output for a row depends on the other rows of the batch.

    Detected: every `_BatchNorm` (BatchNorm1d/2d/3d, SyncBatchNorm, the lazy forms) that normalises
    by batch statistics, i.e. in training mode or without running statistics.
    """
    if isinstance(module, _BatchNorm):
        return module.training or (module.running_mean is None and module.running_var is None)
    return False


def _batch_dependent_modules(models: list[nn.Module]) -> list[tuple[int, str, nn.Module]]:
    found, seen = [], set()
    for s, model in enumerate(models):
        for name, m in model.named_modules():
            if id(m) not in seen and is_batch_dependent(m):
                seen.add(id(m))
                found.append((s, name, m))
    return found


def _loss_value(loss, embeddings: list[Tensor]) -> Tensor:
    if isinstance(loss, dict) and "loss" in loss:
        raise TypeError("loss_fn must return a 0-dim Tensor, got a dict (for adassl_fast.nn.AdaSSL return out['loss'])")
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss_fn must return a 0-dim Tensor, got {type(loss).__name__}")
    if loss.dim() != 0:
        raise ValueError(f"loss_fn must return a 0-dim (scalar) loss, got shape {tuple(loss.shape)}; reduce it first")
    if not loss.dtype.is_floating_point:
        raise TypeError(f"loss_fn must return a floating-point loss, got {loss.dtype}")
    used = _leaves_reached(loss)
    unused = [s for s, e in enumerate(embeddings) if id(e) not in used]
    if unused:
        raise ValueError(
            f"loss_fn's result does not depend on the embedding(s) of stream(s) {unused}: every stream passed "
            "to cached_backward must contribute to the loss (and loss_fn must not detach its arguments)"
        )
    return loss


def _leaves_reached(loss: Tensor) -> set[int]:
    """ids of the leaf tensors that `loss`'s autograd graph accumulates into."""
    reached, seen = set(), set()
    stack = [loss.grad_fn] if loss.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            reached.add(id(variable))
        stack.extend(fn for fn, _ in node.next_functions)
    return reached


# ----------------------------------------------------------------------------------------------------
# RNG capture and replay: the CPU generator and every initialised CUDA device's.


def _rng_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


def _get_rng_state(devices: list[int]) -> tuple[Tensor, list[Tensor]]:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(state: tuple[Tensor, list[Tensor]], devices: list[int]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, s in zip(devices, cuda):
        torch.cuda.set_rng_state(s, d)


# ----------------------------------------------------------------------------------------------------
# The three stages.


def _chunk(args: tuple, start: int, stop: int) -> tuple:
    return tuple(a[start:stop] for a in args)


def _encode(model: nn.Module, args: tuple, s: int) -> Tensor:
    out = model(*args)
    if not isinstance(out, Tensor):
        raise TypeError(f"models[{s}] must return one Tensor of embeddings, got {type(out).__name__}")
    if out.dim() == 0 or out.shape[0] != args[0].shape[0]:
        raise ValueError(
            f"models[{s}] must return one embedding row per input row: {args[0].shape[0]} rows in, "
            f"output shape {tuple(out.shape)}"
        )
    if not out.dtype.is_floating_point:
        raise TypeError(f"models[{s}] must return floating-point embeddings, got {out.dtype}")
    return out


def _encode_without_graph(model, args, s, n, chunk_size, devices, rng_states):
    """Stage (a): the (N, ...) embeddings of one stream, one chunk at a time, no graph."""
    emb = None
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        rng_states.append(_get_rng_state(devices))
        out = _encode(model, _chunk(args, start, stop), s)
        if emb is None:
            emb = out.new_empty((n, *out.shape[1:]))
        elif out.shape[1:] != emb.shape[1:] or out.dtype != emb.dtype or out.device != emb.device:
            raise ValueError(
                f"models[{s}] returned chunks of different shapes or dtypes: {tuple(emb.shape[1:])} {emb.dtype} "
                f"then {tuple(out.shape[1:])} {out.dtype} (rows {start}:{stop})"
            )
        emb[start:stop] = out
    return emb


def _last_backward_per_model(models: list[nn.Module], n_chunks: int) -> dict[int, tuple[int, int]]:
    """For each distinct module, the (stream, chunk) of the last backward through it."""
    return {id(m): (s, n_chunks - 1) for s, m in enumerate(models)}


def _no_sync(model: nn.Module, last: bool):
    no_sync = getattr(model, "no_sync", None)
    if last or not callable(no_sync):
        return contextlib.nullcontext()
    return no_sync()


def _backward(tensor: Tensor, grad: Tensor | None = None) -> None:
    """backward() outside any autocast region: backward ops run in the dtypes autocast chose for their
    forward; autocast active during backward is unsupported (torch.amp docs) and breaks custom ops."""
    with contextlib.ExitStack() as stack:
        for device in _AUTOCAST_DEVICES:
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        torch.autograd.backward(tensor, grad)


def _snapshot_buffers(modules: list[nn.Module]) -> list[tuple[Tensor, Tensor]]:
    return [(b, b.detach().clone()) for m in modules for b in m.buffers(recurse=False)]


def cached_backward(
    models: nn.Module | Sequence[nn.Module],
    inputs: Sequence[StreamInput],
    loss_fn: Callable[..., Tensor],
    *,
    chunk_size: int,
    allow_batch_dependent: bool = False,
) -> Tensor:
    """Backpropagate `loss_fn(*[model(x) for model, x in zip(models, inputs)])` with the encoders'
    activation memory of one chunk (GradCache): exact, not an approximation.

    Every parameter ends with the gradient that the full-batch
    `loss_fn(*[m(*x) for m, x in zip(models, inputs)]).backward()` would give (up to float rounding),
    accumulated into existing `.grad` like `backward()`, and the detached loss is returned. The encoders
    run twice per chunk (once without a graph, once with); `loss_fn` runs once, on the full embeddings.

    Args:
        models: one nn.Module used for every stream, or one per stream (the same module may appear
            more than once). A module with `no_sync()` (DistributedDataParallel, FSDP) synchronises its
            gradients once, in its last chunk's backward.
        inputs: one entry per stream: a tensor, or a tuple of tensors passed to the model as positional
            arguments. Every tensor has the same first dimension N (the batch); chunks are row ranges.
        loss_fn: `loss_fn(*embeddings) -> 0-dim loss`, embeddings (N, ...) one per stream in order. It
            may use parameters of its own (AdaSSL's networks, a learnable scale): they get their gradient
            too. For `adassl_fast.nn.AdaSSL`, return `out["loss"]`. With a GradScaler, scale inside it.
        chunk_size: rows per encoder pass (>= 1; need not divide N; the last chunk is smaller).
        allow_batch_dependent: modules whose output depends on the batch (BatchNorm in training mode)
            make the result differ from the full-batch gradient, so they raise a ValueError naming
            them. True accepts them: each chunk is then its own normalisation batch, the gradient is
            exact for that model, and running statistics are updated once per chunk.

    Returns:
        The loss, detached.

    Raises:
        TypeError / ValueError: malformed arguments, batch sizes that differ across inputs,
            chunk_size < 1, a loss that is not a 0-dim floating tensor or does not depend on every
            stream's embedding, a batch-dependent module (without the opt-out).
        RuntimeError: called under torch.inference_mode().

    Runs with gradients enabled internally whatever the caller's grad mode, and restores that mode.
    """
    streams = _stream_args(inputs)
    n = _batch_size(streams)
    models = _stream_models(models, len(streams))
    chunk_size = _chunk_size(chunk_size)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("cached_backward cannot compute gradients under torch.inference_mode()")
    batch_dependent = _batch_dependent_modules(models)
    if batch_dependent and not allow_batch_dependent:
        names = ", ".join(
            f"models[{s}].{name or '<root>'} ({type(m).__name__}, {'training' if m.training else 'no running stats'})"
            for s, name, m in batch_dependent
        )
        raise ValueError(
            f"cached_backward: batch-dependent module(s) {names} normalise each chunk by its own statistics, "
            "so the gradient would not equal the full-batch one. Put them in eval mode, replace them (LayerNorm, "
            "GroupNorm), or pass allow_batch_dependent=True to train with per-chunk statistics."
        )

    devices = _rng_devices()
    n_chunks = -(-n // chunk_size)

    # (a) Embeddings without a graph; the RNG state before each chunk is kept for its replay.
    rng_states: list[list] = []
    embeddings = []
    with torch.no_grad():
        for s, (model, args) in enumerate(zip(models, streams)):
            rng_states.append([])
            embeddings.append(_encode_without_graph(model, args, s, n, chunk_size, devices, rng_states[s]))

    with torch.enable_grad():
        # (b) The loss on the full batch, backpropagated to the embeddings and to loss_fn's parameters.
        for e in embeddings:
            e.requires_grad_(True)
        loss = _loss_value(loss_fn(*embeddings), embeddings)
        _backward(loss)
        loss = loss.detach()
        emb_grads = [e.grad for e in embeddings]
        del embeddings

        # (c) Re-encode chunk by chunk with a graph and push the cached gradients into the encoders.
        # The RNG ends where (a) and (b) left it; buffers of batch-dependent modules are restored so that
        # their running statistics see each chunk once.
        after_loss = _get_rng_state(devices)
        saved_buffers = _snapshot_buffers([m for _, _, m in batch_dependent])
        last = _last_backward_per_model(models, n_chunks)
        try:
            for s, (model, args) in enumerate(zip(models, streams)):
                for c, start in enumerate(range(0, n, chunk_size)):
                    stop = min(start + chunk_size, n)
                    _set_rng_state(rng_states[s][c], devices)
                    with _no_sync(model, last[id(model)] == (s, c)):
                        out = _encode(model, _chunk(args, start, stop), s)
                        grad = emb_grads[s][start:stop]
                        if out.shape != grad.shape:
                            raise RuntimeError(
                                f"models[{s}] returned shape {tuple(out.shape)} when re-encoding rows {start}:{stop}, "
                                f"but {tuple(grad.shape)} on the first pass"
                            )
                        if out.requires_grad:
                            _backward(out, grad.to(out.dtype))
                        del out
        finally:
            _set_rng_state(after_loss, devices)
            with torch.no_grad():
                for live, saved in saved_buffers:
                    live.copy_(saved)
    return loss
