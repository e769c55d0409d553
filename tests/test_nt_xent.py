"""nt_xent: the reference against hand-computed cases, and every CPU backend against the reference."""

import math
import sys

import pytest
import torch

import adassl_fast
from adassl_fast.nt_xent import nt_xent_reference

CPU_IMPLS = ["torch"]


def _inputs(m, d, dtype=torch.float64, scale=None):
    cont = torch.randn(m, d, dtype=dtype, requires_grad=True)
    targ = torch.randn(m, d, dtype=dtype, requires_grad=True)
    lam = None if scale is None else torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    return cont, targ, lam


def _value_and_grads(fn, cont, targ, lam, **kw):
    loss = fn(cont, targ, scale=lam, **kw)
    wrt = [t for t in (cont, targ, lam) if t is not None]
    return loss, torch.autograd.grad(loss, wrt)


def test_reference_matches_a_hand_computed_4x2_case():
    # B = 2, M = 4, d = 2: rows at angles, so every cosine is known in closed form.
    angles_c = [0.0, math.pi / 2, math.pi, 3 * math.pi / 2]
    angles_t = [math.pi / 6, math.pi / 3, math.pi / 4, -math.pi / 4]
    cont = torch.tensor([[2 * math.cos(a), 2 * math.sin(a)] for a in angles_c], dtype=torch.float64)
    targ = torch.tensor([[0.5 * math.cos(a), 0.5 * math.sin(a)] for a in angles_t], dtype=torch.float64)
    tau = 0.5
    expected = 0.0
    for i in range(4):
        logits = {j: math.cos(angles_c[i] - angles_t[j]) / tau for j in range(4)}
        del logits[(i + 2) % 4]  # the partner column is excluded; the positive stays in the log-sum-exp
        expected += -logits[i] + math.log(sum(math.exp(v) for v in logits.values()))
    expected /= 4
    got = nt_xent_reference(cont, targ, temperature=tau, clamp=20.0)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(expected, rel=1e-14)


def test_reference_clamp_is_applied_after_scaling():
    cont = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # Both rows equal their targets: positive cos = 1 -> 1/0.01 = 100 clamped to 20; partner excluded.
    loss = nt_xent_reference(cont, cont.clone(), temperature=0.01, clamp=20.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)  # only the positive remains in each row


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize(
    "m,d,tau,clamp,scale",
    [(6, 5, 0.1, 20.0, None), (34, 24, 0.05, 20.0, 3.0), (130, 37, 0.3, None, 0.7), (514, 17, 1.0, 20.0, 1.3)],
)
def test_backend_matches_reference_float64(impl, m, d, tau, clamp, scale):
    cont, targ, lam = _inputs(m, d, scale=scale)
    ref, ref_grads = _value_and_grads(nt_xent_reference, cont, targ, lam, temperature=tau, clamp=clamp)
    got, got_grads = _value_and_grads(adassl_fast.nt_xent, cont, targ, lam, temperature=tau, clamp=clamp, impl=impl)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_backend_with_active_clamp_and_multiple_blocks(impl, monkeypatch):
    # Force several row blocks so the block loop's edges are exercised at an odd size.
    monkeypatch.setattr(sys.modules["adassl_fast.torch_backend"], "SLAB_ELEMENTS", 7 * 130)
    cont, targ, lam = _inputs(130, 11, scale=6.0)
    ref, ref_grads = _value_and_grads(nt_xent_reference, cont, targ, lam, temperature=0.1, clamp=20.0)
    got, got_grads = _value_and_grads(adassl_fast.nt_xent, cont, targ, lam, temperature=0.1, impl=impl)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_blocks_the_active_clamp_cannot_change_skip_it_exactly(monkeypatch):
    # scale / tau = 20.5 against a clamp of 20: active everywhere, but it bites only in the block holding rows
    # 40-42, made parallel (or antiparallel) to a target row; the other blocks skip the mask (the torch backend
    # decides per block on the host). Both kinds of block must agree with the reference.
    backend = sys.modules["adassl_fast.torch_backend"]
    monkeypatch.setattr(backend, "SLAB_ELEMENTS", 7 * 130)  # 16 rows a block
    decided = []
    bites = backend._clamp_bites
    monkeypatch.setattr(backend, "_clamp_bites", lambda slab, clamp: decided.append(bites(slab, clamp)) or decided[-1])
    cont, targ, lam = _inputs(130, 11, scale=2.05)
    with torch.no_grad():
        cont[40], cont[41], cont[42] = 3 * targ[7], -0.5 * targ[90], targ[41]
    ref, ref_grads = _value_and_grads(nt_xent_reference, cont, targ, lam, temperature=0.1, clamp=20.0)
    got, got_grads = _value_and_grads(adassl_fast.nt_xent, cont, targ, lam, temperature=0.1, impl="torch")
    assert decided.count(True) >= 1 and decided.count(False) >= 1
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("impl", ["reference"] + CPU_IMPLS)
def test_entries_exactly_at_the_clamp_pass_their_gradient(impl):
    # d = 1: every cosine is +-1 and scale / tau = 20, so every logit sits exactly on the clamp. An
    # exclusive indicator would give d loss / d scale = 0; the inclusive one gives sum G C / tau.
    cont = torch.tensor([[1.0], [-2.0], [3.0], [0.5], [-1.5], [2.5]], dtype=torch.float64, requires_grad=True)
    targ = torch.tensor([[2.0], [1.0], [-1.0], [4.0], [1.0], [-3.0]], dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    adassl_fast.nt_xent(cont, targ, temperature=0.1, scale=lam, clamp=20.0, impl=impl).backward()
    cos = torch.sign(cont.detach()) @ torch.sign(targ.detach()).t()
    m = cos.shape[0]
    logits = 20.0 * cos
    logits[torch.arange(m), (torch.arange(m) + m // 2) % m] = float("-inf")
    g = (torch.softmax(logits, 1) - torch.eye(m, dtype=torch.float64)) / m
    expected = (g * cos).sum() / 0.1
    assert expected.abs().item() > 1.0
    assert lam.grad.item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_low_precision_inputs_give_float32_and_agree(impl, dtype, tol):
    c64, t64, _ = _inputs(34, 24)
    lam64 = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    ref, ref_grads = _value_and_grads(nt_xent_reference, c64, t64, lam64, temperature=0.1)
    cont = c64.detach().to(dtype).requires_grad_()
    targ = t64.detach().to(dtype).requires_grad_()
    lam = torch.tensor(1.5, requires_grad=True)
    got, got_grads = _value_and_grads(adassl_fast.nt_xent, cont, targ, lam, temperature=0.1, impl=impl)
    assert got.dtype == torch.float32
    assert got_grads[0].dtype == dtype and got_grads[2].dtype == torch.float32
    assert abs(got.item() - ref.item()) <= tol * abs(ref.item())
    for g, r in zip(got_grads, ref_grads):
        err = (g.double() - r).norm() / r.norm()
        assert err <= tol, f"relative gradient error {err:.2e} > {tol}"


def test_nt_xent_matches_vanilla_simclr_when_cont_is_the_swapped_targets():
    # docs/spec.md 2.1 "vanilla equivalence": cont = [e_y; e_x], targ = [e_x; e_y] is standard SimCLR NT-Xent,
    # whose excluded entry is the self-similarity.
    ex, ey = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    z = torch.nn.functional.normalize(torch.cat([ex, ey]), dim=1)
    sim = z @ z.t() / 0.2
    sim.fill_diagonal_(float("-inf"))
    labels = torch.cat([torch.arange(5, 10), torch.arange(5)])
    simclr = torch.nn.functional.cross_entropy(sim, labels)
    ours = adassl_fast.nt_xent(torch.cat([ey, ex]), torch.cat([ex, ey]), temperature=0.2, clamp=None, impl="torch")
    torch.testing.assert_close(ours, simclr, rtol=1e-12, atol=1e-12)


def test_python_float_scale_equals_tensor_scale():
    cont, targ, _ = _inputs(10, 6)
    a = adassl_fast.nt_xent(cont, targ, scale=2.5, impl="torch")
    b = adassl_fast.nt_xent(cont, targ, scale=torch.tensor(2.5, dtype=torch.float64), impl="torch")
    assert a.item() == b.item()


def test_torch_backward_is_bitwise_reproducible():
    cont, targ, lam = _inputs(130, 16, scale=1.0)
    grads = [_value_and_grads(adassl_fast.nt_xent, cont, targ, lam, impl="torch")[1] for _ in range(2)]
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("scale", [0.0, -2.0, 250.0])
def test_zero_negative_and_huge_scales(impl, scale):
    # scale 0: every logit is 0 (the fixed-shift path with a zero bound); negative: the bound uses |s|;
    # 250 / 0.1 with no clamp: logits far beyond exp's range take the row-max path.
    cont, targ, lam = _inputs(34, 7, scale=scale)
    ref, ref_grads = _value_and_grads(nt_xent_reference, cont, targ, lam, temperature=0.1, clamp=None)
    got, got_grads = _value_and_grads(adassl_fast.nt_xent, cont, targ, lam, temperature=0.1, clamp=None, impl=impl)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------------
# The torch backend's two schedules: one pass for training (each logit block formed once, the gradients
# stashed for the backward) and two passes (forward statistics, then the backward from the saved LSEs).


def _two_pass(monkeypatch):
    """Make the functional layer take the two-pass ops even where it would train in one pass."""
    monkeypatch.setattr(sys.modules["adassl_fast.core"], "trains_in_one_pass", lambda *args: False)


@pytest.mark.parametrize("path", ["one_pass", "two_pass"])
@pytest.mark.parametrize(
    "m,d,tau,clamp,scale,slab",
    [
        (130, 11, 0.1, 20.0, 6.0, 7 * 130),  # clamp active (scale / tau = 60), 19 blocks of 7 rows
        (98, 37, 0.3, 20.0, 1.3, 1 << 22),  # clamp inactive, one block
        (66, 24, 0.1, None, 250.0, 16 * 66),  # |S| up to 2500: the row-max path, 5 blocks, the last of 2 rows
    ],
)
def test_torch_paths_match_reference_float64(path, m, d, tau, clamp, scale, slab, monkeypatch):
    monkeypatch.setattr(sys.modules["adassl_fast.torch_backend"], "SLAB_ELEMENTS", slab)
    if path == "two_pass":
        _two_pass(monkeypatch)
    cont, targ, lam = _inputs(m, d, scale=scale)
    weight = 0.37  # an incoming gradient other than 1: the stash is scaled by it
    ref = nt_xent_reference(cont, targ, temperature=tau, scale=lam, clamp=clamp)
    got = adassl_fast.nt_xent(cont, targ, temperature=tau, scale=lam, clamp=clamp, impl="torch")
    kind = "nt_xent_forward_backward" if path == "one_pass" else "nt_xent_forward_default"
    assert kind in type(got.grad_fn).__name__
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    got_grads = torch.autograd.grad(got * weight, [cont, targ, lam])
    for g, r in zip(got_grads, torch.autograd.grad(ref * weight, [cont, targ, lam]), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_one_pass_is_taken_only_when_a_gradient_is_needed():
    cont, targ, _ = _inputs(10, 6)
    one_pass = lambda loss: loss.grad_fn is not None and "forward_backward" in type(loss.grad_fn).__name__
    assert one_pass(adassl_fast.nt_xent(cont, targ, impl="torch"))
    with torch.no_grad():
        plain = adassl_fast.nt_xent(cont, targ, impl="torch")
    assert plain.grad_fn is None
    detached = adassl_fast.nt_xent(cont.detach(), targ.detach(), impl="torch")
    assert detached.grad_fn is None
    # the same loss either way
    assert plain.item() == pytest.approx(adassl_fast.nt_xent(cont, targ, impl="torch").item(), rel=1e-14)
    # only the scale needs a gradient: still one pass (its gradient comes from the same G)
    lam = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    assert one_pass(adassl_fast.nt_xent(cont.detach(), targ.detach(), scale=lam, impl="torch"))


def test_create_graph_backward_of_the_one_pass_op_takes_the_two_pass_gradient():
    # With grad mode on in the backward the stash (a constant to autograd) is not used: the first-order
    # gradients still equal the reference's.
    cont, targ, lam = _inputs(34, 9, scale=1.2)
    got = torch.autograd.grad(adassl_fast.nt_xent(cont, targ, scale=lam, impl="torch"), [cont, targ, lam],
                              create_graph=True)
    ref = torch.autograd.grad(nt_xent_reference(cont, targ, scale=lam), [cont, targ, lam])
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g.detach(), r, rtol=1e-10, atol=1e-12)
