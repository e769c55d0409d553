"""Worst errors of the backends' normalize=False (rows as given) against the float64 oracle of
tests/rows_as_given.py: nt_xent core, symmetric info_nce, AdaSSL ("v"), float64 and float32 inputs, Triton in the
interpreter (float32 rows stream as bf16 operands) and the torch backend. Run from the repository root:

    TRITON_INTERPRET=1 python bench/results/2026-12-03-rows-as-given-precision/measure.py > results.json
"""

import json
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.getcwd())

import torch  # noqa: E402

from adassl_fast import _library  # noqa: E402
from adassl_fast.indices import partner_indices  # noqa: E402
from tests.rows_as_given import (  # noqa: E402
    adassl_inputs,
    adassl_reference,
    core_loss,
    free_rows,
    leaves,
    symmetric_loss,
)

F64 = torch.float64
SEEDS = range(6)
SIZES = [(130, 37), (200, 128), (130, 300)]
SCALE, TEMPERATURE, CLAMP = 1.0, 0.1, None  # |scale / tau| = 10, row norms in [0.5, 1.5]: |S| up to 22.5


def rel(a, b):
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-300))


def core(entry, dtype, m, d):
    cont = free_rows(m, d, low=0.5, high=1.5)
    targ = cont.roll(1, 0) + 0.5 * free_rows(m, d, low=0.5, high=1.5)
    pos, excl = partner_indices(m, "cpu")
    scale = torch.tensor(SCALE, dtype=F64)
    c, t, s = leaves(cont, targ, scale)
    loss, _ = core_loss(c, t, pos, excl, s, 1 / TEMPERATURE, CLAMP, False)
    want = torch.autograd.grad(loss, (c, t, s))
    sc = scale.to(torch.float64 if dtype == F64 else torch.float32)
    got_loss, lse = entry.nt_xent_forward(cont.to(dtype), targ.to(dtype), pos, excl, sc, 1 / TEMPERATURE, CLAMP,
                                          normalize=False)
    got = entry.nt_xent_backward(torch.tensor(1.0, dtype=lse.dtype), cont.to(dtype), targ.to(dtype), pos, excl, sc,
                                 lse, 1 / TEMPERATURE, CLAMP, True, normalize=False)
    return abs(float(got_loss) - float(loss)), [rel(g, w) for g, w in zip(got, want, strict=True)]


def symmetric(entry, dtype, m, d):
    query = free_rows(m, d, low=0.5, high=1.5)
    key = query + 0.5 * free_rows(m, d, low=0.5, high=1.5)
    scale = torch.tensor(SCALE, dtype=F64)
    q, k, s = leaves(query, key, scale)
    loss, _ = symmetric_loss(q, k, s, 1 / TEMPERATURE, CLAMP, False)
    want = torch.autograd.grad(loss, (q, k, s))
    sc = scale.to(torch.float64 if dtype == F64 else torch.float32)
    got_loss, lse = entry.info_nce_forward(query.to(dtype), key.to(dtype), sc, 1 / TEMPERATURE, CLAMP, normalize=False)
    got = entry.info_nce_backward(torch.tensor(1.0, dtype=lse.dtype), query.to(dtype), key.to(dtype), sc, lse,
                                  1 / TEMPERATURE, CLAMP, True, normalize=False)
    return abs(float(got_loss) - float(loss)), [rel(g, w) for g, w in zip(got, want, strict=True)]


def adassl(entry, dtype, m, d):
    ins = adassl_inputs(m // 2, d, "v")
    scale = torch.tensor(SCALE, dtype=F64)
    r_ssl, _, want = adassl_reference(ins, "v", scale, TEMPERATURE, CLAMP, 1.0, 1.0)
    sc = scale.to(torch.float64 if dtype == F64 else torch.float32)
    cast = [t.to(dtype) for t in ins]
    l_ssl, _, lse = entry.adassl_forward(*cast, sc, 1 / TEMPERATURE, CLAMP, "v", normalize=False)
    one = torch.tensor(1.0, dtype=lse.dtype)
    got = entry.adassl_backward(one, one, *cast, sc, lse, 1 / TEMPERATURE, CLAMP, "v", True, normalize=False)
    return abs(float(l_ssl) - float(r_ssl)), [rel(g, w) for g, w in zip(got, want, strict=True)]


def main():
    rows = []
    for impl in ("triton", "torch"):
        entry = _library.backend(impl)
        for dtype in (F64, torch.float32):
            for op, fn in (("nt_xent", core), ("info_nce", symmetric), ("adassl_v", adassl)):
                worst_loss, worst_grad = 0.0, 0.0
                for seed in SEEDS:
                    for m, d in SIZES:
                        torch.manual_seed(seed)
                        loss_err, grad_errs = fn(entry, dtype, m, d)
                        worst_loss, worst_grad = max(worst_loss, loss_err), max(worst_grad, *grad_errs)
                rows.append(dict(impl=impl, dtype=str(dtype).removeprefix("torch."), op=op, worst_loss_abs=worst_loss,
                                 worst_grad_rel_norm=worst_grad))
                print(json.dumps(rows[-1]), file=sys.stderr)
    print(json.dumps(dict(seeds=list(SEEDS), sizes=SIZES, scale=SCALE, temperature=TEMPERATURE, clamp=CLAMP,
                          rows=rows), indent=1))


if __name__ == "__main__":
    main()
