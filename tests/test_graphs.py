"""Small batches are bound by host launch time (README, "Measured"): the loss modules must capture in a CUDA
graph with their backward (torch.cuda.make_graphed_callables) and replay exactly what eager mode computes.

Needs a CUDA device; bench/device_check.sh runs these with the other GPU tests.
"""

import pytest
import torch

import adassl_fast

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")]


@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("make", [
    lambda impl: adassl_fast.nn.NTXentLoss(temperature=0.1, learnable_scale=True, impl=impl),
    lambda impl: adassl_fast.nn.InfoNCELoss(temperature=0.07, learnable_scale=True, impl=impl),
], ids=["nt_xent", "info_nce"])
def test_graphed_loss_replays_eager_results(make, impl):
    eager_fn, graphed = make(impl).cuda(), make(impl).cuda()  # graphing replaces a module's forward
    B, d = 515, 96  # M = 2B = 1030 rows: not a multiple of any block; d not a power of two
    sample = [torch.randn(B, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
    graphed = torch.cuda.make_graphed_callables(graphed, tuple(sample))
    for _ in range(3):  # fresh inputs each replay: the graph reads its inputs, not the capture's values
        a, b = (torch.randn(B, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        eager = eager_fn(a, b)
        want = torch.autograd.grad(eager, (a, b, eager_fn.lambda_train))
        got_loss = graphed(a, b)
        got = torch.autograd.grad(got_loss, (a, b, graphed.lambda_train))
        # the deterministic schedule (the default): the same kernels on the same inputs, bit for bit
        assert torch.equal(got_loss, eager)
        for g, w in zip(got, want):
            assert torch.equal(g, w)
