"""The shipped float64 golden cases (an independent implementation of docs/spec.md) on every CPU backend."""

import json
from pathlib import Path

import pytest
import torch

import adassl_fast

CASES = json.loads((Path(__file__).parent / "golden" / "adassl_golden.json").read_text())["cases"]


def _t(value):
    return torch.tensor(value, dtype=torch.float64)


def _outputs(case, inputs, impl):
    kw = {k: v for k, v in case["kwargs"].items() if k != "scale_is_input"}
    op = case["op"]
    if op == "nt_xent":
        return [adassl_fast.nt_xent(inputs["cont"], inputs["targ"], scale=inputs.get("scale"), impl=impl, **kw)]
    if op == "info_nce":
        return [adassl_fast.info_nce(inputs["query"], inputs["key"], impl=impl, **kw)]
    if op == "adassl_nt_xent":
        kw["noise_xy"], kw["noise_yx"] = _t(kw["noise_xy"]), _t(kw["noise_yx"])
        return list(adassl_fast.adassl_nt_xent(**inputs, impl=impl, **kw))
    if op == "gaussian_kl":
        return [adassl_fast.gaussian_kl(**inputs, impl=impl)]
    if op == "gaussian_sample":
        return [adassl_fast.gaussian_sample(**inputs, noise=_t(kw["noise"]), impl=impl).sum()]
    if op == "bernoulli_mask":
        mask = adassl_fast.bernoulli_mask(inputs["logits"], _t(kw["noise"]), impl=impl)
        return [(mask * _t(kw["weights"])).sum(), adassl_fast.l0_penalty(inputs["logits"], impl=impl)]
    raise AssertionError(f"unknown op {op}")


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_golden_case(case, impl):
    inputs = {k: _t(v).requires_grad_() for k, v in case["inputs"].items()}
    outputs = _outputs(case, inputs, impl)
    assert len(outputs) == len(case["outputs"])
    for out, expected in zip(outputs, case["outputs"]):
        assert out.dtype == torch.float64
        assert out.item() == pytest.approx(expected["value"], rel=1e-12, abs=1e-12)
        grads = torch.autograd.grad(out, list(inputs.values()), retain_graph=True, materialize_grads=True)
        for name, grad in zip(inputs, grads):
            want = expected["grads"][name]
            want = torch.zeros_like(grad) if want is None else _t(want)
            torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12, msg=f"d {name}")
