"""The backward core's schedules (kernels/backward.py), driven through the nt_xent entry points in the interpreter."""

import pytest
import torch

from adassl_fast.kernels import backward, launch
from adassl_fast.kernels import nt_xent as ntx

pytestmark = pytest.mark.triton

F64 = torch.float64


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # every buffer the launchers allocate starts as NaN: unwritten elements cannot pass unnoticed
    monkeypatch.setattr(launch, "POISON", True)


class _LaunchCounter:
    """Stands in for a @triton.jit kernel: counts its launches (kernel[grid](...)) and runs them."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_without_an_atomic_shape_deterministic_false_runs_the_deterministic_schedule(monkeypatch):
    M, d = 70, 24
    cont, targ = torch.randn(M, d, dtype=F64), torch.randn(M, d, dtype=F64)
    pos = torch.arange(M)
    excl, scale = (pos + M // 2) % M, torch.tensor(1.0, dtype=F64)

    def run(deterministic):
        loss, lse = ntx.nt_xent_forward(cont, targ, pos, excl, scale, 5.0, 20.0)
        grads = ntx.nt_xent_backward(torch.tensor(1.0, dtype=F64), cont, targ, pos, excl, scale, lse, 5.0, 20.0,
                                     deterministic)
        return loss, lse, *grads

    want = run(True)
    column_kernel = _LaunchCounter(backward._bwd_col_kernel)
    monkeypatch.setattr(backward, "_bwd_col_kernel", column_kernel)
    for shipped, column_launches in ((True, 0), (False, 1)):  # False: as at d > 256 on a GPU
        column_kernel.launches = 0
        monkeypatch.setattr(backward, "atomic_schedule", lambda *args, shipped=shipped: shipped)
        got = run(False)
        assert column_kernel.launches == column_launches, shipped
    for x, y in zip(got, want, strict=True):
        assert torch.equal(x, y)  # bitwise: the same kernels in the same order
