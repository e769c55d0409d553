"""adassl_nt_xent: the one-pass op against the composition of the reference ops."""

import sys

import pytest
import torch

import adassl_fast
from adassl_fast.adassl import adassl_nt_xent_reference


def make_inputs(b, d, variant, dtype=torch.float64, spread=1.0):
    """Random embeddings, network outputs and noise for one AdaSSL call (all leaves requiring grad)."""
    leaf = lambda *shape: (spread * torch.randn(*shape, dtype=dtype)).requires_grad_()
    inputs = dict(emb_x=leaf(b, d), emb_y=leaf(b, d), post_xy=leaf(b, 2 * d), post_yx=leaf(b, 2 * d))
    if variant == "v":
        inputs.update(prior_xy=leaf(b, 2 * d), prior_yx=leaf(b, 2 * d))
        noise = dict(noise_xy=torch.randn(b, d, dtype=torch.float64), noise_yx=torch.randn(b, d, dtype=torch.float64))
    else:
        noise = dict(noise_xy=torch.rand(b, d, dtype=torch.float64), noise_yx=torch.rand(b, d, dtype=torch.float64))
    return inputs, noise


def _grads(outputs, inputs, lam):
    wrt = list(inputs.values()) + [lam]
    return [torch.autograd.grad(o, wrt, retain_graph=True, materialize_grads=True) for o in outputs]


@pytest.mark.parametrize("path", ["one_pass", "two_pass"])
@pytest.mark.parametrize("variant", ["v", "s"])
# (17, 24, 0.05): scale / tau = 26 > 20, the clamp is active; (65, 37, 0.5, None): no clamp
@pytest.mark.parametrize("b,d,tau,clamp", [(3, 5, 0.1, 20.0), (17, 24, 0.05, 20.0), (65, 37, 0.5, None)])
def test_torch_op_matches_reference_float64(path, variant, b, d, tau, clamp, monkeypatch):
    # one pass: the training op (the core's gradients stashed in the forward); two passes: the forward op and
    # the backward op, as under no_grad + a later backward, torch.compile, or a create_graph backward
    if path == "two_pass":
        monkeypatch.setattr(sys.modules["adassl_fast.adassl"], "trains_in_one_pass", lambda *args: False)
    inputs, noise = make_inputs(b, d, variant, spread=3.0)  # spread: logvar clamps and masks both sides
    lam = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    kw = dict(variant=variant, temperature=tau, scale=lam, clamp=clamp, **noise)
    ref = adassl_nt_xent_reference(**inputs, **kw)
    got = adassl_fast.adassl_nt_xent(**inputs, impl="torch", **kw)
    kind = "adassl_forward_backward" if path == "one_pass" else "adassl_forward_default"
    assert kind in type(got[0].grad_fn).__name__
    for g, r in zip(got, ref):
        assert g.dtype == torch.float64
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    weighted = lambda out: [0.6 * out[0] + 1.7 * out[1]]  # incoming gradients other than 1 (the stash is scaled)
    for outs in (lambda out: out, weighted):
        for got_grads, ref_grads in zip(_grads(outs(got), inputs, lam), _grads(outs(ref), inputs, lam)):
            for g, r in zip(got_grads, ref_grads):
                torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("variant", ["v", "s"])
def test_torch_op_at_the_prologue_edges_matches_reference_float64(variant):
    # Pre-activations across softplus's threshold (20: slope exactly 1 above), the log-variance clamp (+-10:
    # pre near -5.3 and 148.4, inclusive) and far past both, at both directions' tails; mask logits saturating.
    edges = torch.tensor([-40.0, -5.3, -1e-3, 0.0, 19.5, 20.0, 20.5, 60.0, 148.0, 149.0, 1e3], dtype=torch.float64)
    inputs, noise = make_inputs(5, 9, variant)
    with torch.no_grad():
        for name, t in inputs.items():
            if name.startswith(("post", "prior")):
                half = t[:, 9:] if variant == "v" else t[:, :9]
                half.copy_(edges[torch.randperm(edges.numel()).repeat(5)[: half.numel()]].view_as(half))
    lam = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    kw = dict(variant=variant, temperature=0.1, scale=lam, **noise)
    ref = adassl_nt_xent_reference(**inputs, **kw)
    got = adassl_fast.adassl_nt_xent(**inputs, impl="torch", **kw)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    weighted = lambda out: [0.6 * out[0] + 1.7 * out[1]]
    for got_grads, ref_grads in zip(_grads(weighted(got), inputs, lam), _grads(weighted(ref), inputs, lam)):
        for g, r in zip(got_grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("variant", ["v", "s"])
def test_bfloat16_inputs_agree_with_float64(variant, impl):
    # Through the functional op, as users call it: drawn-dtype and given-dtype noise must both reach
    # every backend in the dtype it reads.
    inputs, noise = make_inputs(17, 24, variant)
    ref = adassl_nt_xent_reference(**inputs, variant=variant, **noise)
    low = {k: v.detach().bfloat16() for k, v in inputs.items()}
    got = adassl_fast.adassl_nt_xent(**low, variant=variant, impl=impl, **noise)
    drawn = adassl_fast.adassl_nt_xent(**low, variant=variant, impl=impl)
    assert all(t.dtype == torch.float32 and torch.isfinite(t) for t in drawn)
    for g, r in zip(got, ref):
        assert g.dtype == torch.float32
        assert abs(g.item() - r.item()) <= 3e-2 * abs(r.item()) + 1e-3


def test_modular_zero_gradient_fact_for_the_additive_editor_at_the_mask():
    # A mask of all zeros (logits -> -inf) makes r = 0: the edit is the identity and d l_ssl / d r_tilde = 0.
    inputs, noise = make_inputs(5, 4, "s")
    with torch.no_grad():
        inputs["post_xy"][:, :4] = -50.0
        inputs["post_yx"][:, :4] = -50.0
    l_ssl, _ = adassl_fast.adassl_nt_xent(**inputs, variant="s", impl="torch", **noise)
    vanilla = adassl_fast.nt_xent(torch.cat([inputs["emb_y"], inputs["emb_x"]]),
                                  torch.cat([inputs["emb_x"], inputs["emb_y"]]), impl="torch")
    torch.testing.assert_close(l_ssl, vanilla)
    (g,) = torch.autograd.grad(l_ssl, [inputs["post_xy"]])
    assert torch.count_nonzero(g[:, 4:]) == 0


@pytest.mark.parametrize("variant", ["v", "s"])
def test_drawn_noise_is_reproducible_under_manual_seed(variant):
    inputs, _ = make_inputs(6, 3, variant)
    results = []
    for _ in range(2):
        torch.manual_seed(11)
        results.append(adassl_fast.adassl_nt_xent(**inputs, variant=variant, impl="torch"))
    assert results[0][0].item() == results[1][0].item()
    assert results[0][1].item() == results[1][1].item()
