"""Worst float64 errors of the Triton SigLIP and labelled InfoNCE entry points (interpreter) over the cases of
tests/kernels/test_siglip.py and tests/kernels/test_labels.py, and the fp32-input (fp16 operand) errors against
the unrounded float64 reference. Run from the repository root: python bench/results/<this folder>/errors.py"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
sys.path.insert(0, os.getcwd())

import torch  # noqa: E402

from adassl_fast.kernels import launch  # noqa: E402
from tests.kernels import test_labels as tl  # noqa: E402
from tests.kernels import test_siglip as ts  # noqa: E402
from tests.precision import rel_err  # noqa: E402

launch.POISON = True
torch.manual_seed(0)
worst = {}


def update(key, value):
    worst[key] = max(worst.get(key, 0.0), value)


for N, d, normalize, det, splits in ts.CASES:
    q, k, p = ts._inputs(N, d, scale=4.5, bias=-3.0)
    if not normalize:
        q, k = q / d**0.5, k / d**0.5
    loss, _, dq, dk, dp = ts._run(q, k, p, normalize, det, splits, grad=0.7)
    for name, a, b in zip(("loss", "dquery", "dkey", "dscale/dbias"), (loss, dq, dk, dp),
                          ts._reference(q, k, p, normalize, grad=0.7), strict=True):
        update(("siglip f64", name), (a - b).abs().max().item())
for sym in (False, True):
    for N, d, classes, clamp, det, splits in tl.CASES:
        q, k, s = tl._problem(N, d)
        labels = tl._labels(N, classes)
        out = tl._run(q, k, labels, s, 5.0, clamp, sym, det, splits, grad=0.6)
        ref = tl._reference(q, k, labels, s, 0.2, clamp, sym, grad=0.6)
        for name, a, b in zip(("loss", "dquery", "dkey", "dscale"), (out[0], *out[2:]), ref, strict=True):
            update((f"labels{' sym' if sym else ''} f64", name), (a - b).abs().max().item())
for d in (37, 300):  # fp32 inputs (fp16 operands) against the unrounded float64 result: relative errors
    q, k, p = ts._inputs(130, d, torch.float32, 10.0, -10.0)
    q = q * 3
    loss, _, dq, dk, dp = ts._run(q, k, p, True, True)
    ref = ts._reference(q, k, p, True)
    update(("siglip fp32", "loss rel"), abs(loss.item() - ref[0].item()) / abs(ref[0].item()))
    for name, a, b in zip(("dquery", "dkey", "dparams"), (dq, dk, dp), ref[1:], strict=True):
        update(("siglip fp32", name + " rel"), rel_err(a, b))
for sym in (False, True):
    q, k, _ = tl._problem(130, 37, torch.float32)
    q = q * 3
    s = torch.tensor(1.5)
    labels = tl._labels(130, 11)
    out = tl._run(q, k, labels, s, 10.0, None, sym)
    ref = tl._reference(q, k, labels, s, 0.1, None, sym)
    update((f"labels{' sym' if sym else ''} fp32", "loss abs"), abs(out[0].item() - ref[0].item()))
    for name, a, b in zip(("dquery", "dkey", "dscale"), out[2:], ref[1:], strict=True):
        update((f"labels{' sym' if sym else ''} fp32", name + " rel"), rel_err(a.reshape(-1), b.reshape(-1)))
for (what, name), value in worst.items():
    print(f"{what:18s} {name:14s} {value:.2e}")
