"""Sentinel-guarded buffers for the kernels' out-of-bounds tests."""

import torch


def padded(x, before, after, fill=1.0e30):
    """x copied into the middle of a bigger sentinel-filled buffer: (buffer, a contiguous view of x in it)."""
    buf = torch.full((before + x.numel() + after,), fill, dtype=x.dtype)
    view = buf[before:before + x.numel()].view(x.shape)
    view.copy_(x)
    return buf, view


def guards_intact(buf, view, fill=1.0e30) -> bool:
    """Whether every element of `buf` outside `view` still holds the sentinel (nothing wrote past x)."""
    rest = torch.cat([buf[: view.storage_offset()], buf[view.storage_offset() + view.numel():]])
    return bool((rest == fill).all())
