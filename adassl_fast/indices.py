"""The index vectors of the nt_xent core (docs/backends.md): each row's positive column and its excluded
column (-1: none), cached per size and device and shared read-only by every backend and schedule."""

from __future__ import annotations

import torch
from torch import Tensor

from adassl_fast import _checks


def partner_indices(m: int, device) -> tuple[Tensor, Tensor]:
    """nt_xent's positive (i) and excluded ((i + M/2) mod M) column of every row: two (M,) int64 vectors."""
    return _indices("partner", m, torch.device(device))


def diagonal_indices(n: int, device) -> tuple[Tensor, Tensor]:
    """InfoNCE's positive (i) and excluded (-1: none) column of every row: two (N,) int64 vectors."""
    return _indices("diagonal", n, torch.device(device))


@_checks.reused
def _indices(kind: str, m: int, device: torch.device) -> tuple[Tensor, Tensor]:
    pos = torch.arange(m, device=device)
    return pos, (pos + m // 2) % m if kind == "partner" else torch.full_like(pos, -1)
