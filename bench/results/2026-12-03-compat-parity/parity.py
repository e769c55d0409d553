"""Worst float64 absolute error of adassl_fast.compat against each peer, over the loss and every gradient
(features, logit_scale, logit_bias): OpenCLIP's own classes (loss.py loaded from the wheel, see
tests/test_compat.py) and lightly's formulas as tests/test_compat.py writes them. Run from the repository root."""

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, ".")
from adassl_fast import compat  # noqa: E402
from tests.test_compat import OPEN_CLIP, _grads, _leaves, _load_open_clip, lightly_formula  # noqa: E402

oc = _load_open_clip(OPEN_CLIP, Path(tempfile.mkdtemp()))
worst: dict = {}


def error(a, b):
    return max((a[0] - b[0]).abs().item(), *((x - y).abs().max().item() for x, y in zip(a[1], b[1], strict=True)))


def note(key, ours, theirs, leaves):
    worst[key] = max(worst.get(key, 0.0), error((ours, _grads(ours, leaves)), (theirs, _grads(theirs, leaves))))


for seed in range(6):
    for impl in ("torch", "reference"):
        n, d = 17 + seed * 23, 33 + seed * 11
        leaves = _leaves(n, d, seed)
        note(("ClipLoss", impl), compat.ClipLoss(impl=impl)(*leaves), oc.ClipLoss()(*leaves), leaves)
        note(("SigLipLoss", impl), compat.SigLipLoss(impl=impl)(*leaves), oc.SigLipLoss()(*leaves), leaves)
        out0, out1 = leaves[:2]
        note(("lightly NTXentLoss", impl), compat.NTXentLoss(0.2, impl=impl)(out0, out1),
             lightly_formula(out0, out1, 0.2), [out0, out1])
        torch.manual_seed(seed)
        banked = compat.NTXentLoss(0.2, memory_bank_size=(300, d), impl=impl).double()
        bank = banked.bank.clone()
        note(("lightly NTXentLoss, memory bank", impl), banked(out0, out1), lightly_formula(out0, out1, 0.2, bank),
             [out0, out1])
for key, value in sorted(worst.items()):
    print(*key, f"{value:.1e}", sep="\t")
