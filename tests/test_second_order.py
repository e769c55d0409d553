"""Gradients beyond the training step: second-order gradients (a gradient penalty through the loss) are
exact on the reference and torch backends and refused elsewhere (docs/api.md 9), gradcheck passes with
its default arguments, and every tensor input gets a gradient (the noise too)."""

import pytest
import torch

import adassl_fast
from adassl_fast import latent

F64 = dict(dtype=torch.float64)


def _leaf(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


def _scale(dtype=torch.float64):
    return torch.tensor(1.3, dtype=dtype, requires_grad=True)


def _nt_xent(impl, **kw):
    return lambda cont, targ, scale: adassl_fast.nt_xent(cont, targ, scale=scale, impl=impl, **kw)


def _info_nce(impl, **kw):
    return lambda query, key, scale: adassl_fast.info_nce(query, key, scale=scale, impl=impl, **kw)


def _adassl_inputs(variant, b, d, dtype=torch.float64, noise_grad=False):
    """(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx, scale); no priors for "s"."""
    priors = (_leaf(b, 2 * d, dtype=dtype), _leaf(b, 2 * d, dtype=dtype)) if variant == "v" else ()
    draw = torch.randn if variant == "v" else torch.rand
    noises = tuple(draw(b, d, dtype=dtype).requires_grad_(noise_grad) for _ in range(2))
    return (_leaf(b, d, dtype=dtype), _leaf(b, d, dtype=dtype), _leaf(b, 2 * d, dtype=dtype),
            _leaf(b, 2 * d, dtype=dtype), *priors, *noises, _scale(dtype))


def _adassl(impl, variant, reg_weight=0.3):
    """The op as a function of its tensor inputs: l_ssl + reg_weight * l_reg (both outputs differentiated)."""

    def loss(emb_x, emb_y, post_xy, post_yx, *rest):
        priors = rest[:2] if variant == "v" else (None, None)
        noise_xy, noise_yx, scale = rest[-3:]
        l_ssl, l_reg = adassl_fast.adassl_nt_xent(emb_x, emb_y, post_xy, post_yx, *priors, variant=variant,
                                                  scale=scale, noise_xy=noise_xy, noise_yx=noise_yx, impl=impl)
        return l_ssl + reg_weight * l_reg

    return loss


def _penalty_gradients(loss_fn, inputs):
    """d/d inputs of the loss plus a gradient penalty: the loss's gradients taken with create_graph=True,
    then differentiated again (what a WGAN-GP style regulariser does)."""
    wanted = [t for t in inputs if t.requires_grad]
    loss = loss_fn(*inputs)
    first = torch.autograd.grad(loss, wanted, create_graph=True)
    weights = [torch.linspace(-1, 2, g.numel(), dtype=g.dtype).view_as(g) for g in first]  # the same every call
    penalty = sum((g * w).sum() ** 2 + g.square().sum() for g, w in zip(first, weights, strict=True))
    return torch.autograd.grad(loss + penalty, wanted)


def _assert_all_close(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11)


CONTRASTIVE = [
    pytest.param(_nt_xent, dict(), 10, 7, id="nt_xent"),
    pytest.param(_nt_xent, dict(clamp=1.5, temperature=0.5), 6, 3, id="nt_xent-clamp-bites"),
    pytest.param(_info_nce, dict(), 9, 5, id="info_nce-symmetric"),
    pytest.param(_info_nce, dict(symmetric=False, clamp=2.0, temperature=0.3), 11, 4, id="info_nce-one-way"),
]


@pytest.mark.parametrize("op, kw, m, d", CONTRASTIVE)
def test_gradient_penalty_matches_the_reference_float64(op, kw, m, d):
    inputs = (_leaf(m, d), _leaf(m, d), _scale())
    want = _penalty_gradients(op("reference", **kw), inputs)
    _assert_all_close(_penalty_gradients(op("torch", **kw), inputs), want)


@pytest.mark.parametrize("variant, b, d", [("v", 5, 3), ("s", 7, 2)])
def test_adassl_gradient_penalty_matches_the_reference_float64(variant, b, d):
    inputs = _adassl_inputs(variant, b, d)
    want = _penalty_gradients(_adassl("reference", variant), inputs)
    _assert_all_close(_penalty_gradients(_adassl("torch", variant), inputs), want)


def test_latent_ops_gradient_penalty():
    """The standalone latent ops are plain autograd PyTorch on every impl: second order is exact."""
    mu_q, pre_q, mu_p, pre_p = (_leaf(5, 3) for _ in range(4))
    noise = torch.randn(5, 3, **F64)
    assert torch.autograd.gradgradcheck(lambda *t: latent.gaussian_kl(*t, impl="torch"), (mu_q, pre_q, mu_p, pre_p))
    assert torch.autograd.gradgradcheck(lambda m, p: latent.gaussian_sample(m, p, noise, impl="torch"), (mu_q, pre_q))
    assert torch.autograd.gradgradcheck(lambda logits: latent.l0_penalty(logits, impl="torch"), (mu_q,))


@pytest.mark.parametrize("op, kw, m, d", CONTRASTIVE)
def test_gradcheck_with_default_arguments_on_the_torch_backend(op, kw, m, d):
    assert torch.autograd.gradcheck(op("torch", **kw), (_leaf(m, d), _leaf(m, d), _scale()))


def test_adassl_gradcheck_with_default_arguments_noise_included():
    # variant "v" only: the straight-through mask of "s" is by design not the derivative of its forward
    assert torch.autograd.gradcheck(_adassl("torch", "v"), _adassl_inputs("v", 4, 3, noise_grad=True))


@pytest.mark.parametrize("variant", ["v", "s"])
def test_every_input_gets_the_reference_gradient_noise_included(variant):
    inputs = _adassl_inputs(variant, 6, 3, noise_grad=True)
    want = torch.autograd.grad(_adassl("reference", variant)(*inputs), inputs)
    got = torch.autograd.grad(_adassl("torch", variant)(*inputs), inputs)
    assert all(g is not None for g in got)
    _assert_all_close(got, want)


# ----------------------------------------------------------------------------------------------------
# Backends whose backward is not differentiable refuse, naming the ones that compute it.

REFUSAL = 'double backward is not supported on impl="triton".*impl="torch" or impl="reference"'


@pytest.mark.triton
@pytest.mark.parametrize("op, kw", [(_nt_xent, {}), (_info_nce, {}), (_info_nce, dict(symmetric=False))],
                         ids=["nt_xent", "info_nce-symmetric", "info_nce-one-way"])
def test_triton_refuses_double_backward(op, kw):
    inputs = (_leaf(8, 16, dtype=torch.float32), _leaf(8, 16, dtype=torch.float32), _scale(torch.float32))
    loss = op("triton", **kw)(*inputs)
    with pytest.raises(NotImplementedError, match=REFUSAL):
        torch.autograd.grad(loss, inputs[0], create_graph=True)
    # the first-order gradient is still the fused kernel's, as before
    assert torch.autograd.grad(op("triton", **kw)(*inputs), inputs[0])[0].shape == (8, 16)


@pytest.mark.triton
@pytest.mark.parametrize("variant", ["v", "s"])
def test_triton_refuses_adassl_double_backward_and_noise_gradients(variant):
    inputs = _adassl_inputs(variant, 4, 16, dtype=torch.float32)
    with pytest.raises(NotImplementedError, match=REFUSAL):
        torch.autograd.grad(_adassl("triton", variant)(*inputs), inputs[0], create_graph=True)
    inputs = _adassl_inputs(variant, 4, 16, dtype=torch.float32, noise_grad=True)
    with pytest.raises(NotImplementedError, match='gradient for noise_xy / noise_yx is not supported on impl="triton"'):
        _adassl("triton", variant)(*inputs).backward()


@pytest.fixture
def one_rank_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_distributed_ops_refuse_double_backward(one_rank_group):
    group = dict(impl="torch", process_group=one_rank_group)
    cont, targ = _leaf(6, 4), _leaf(6, 4)
    for loss in (adassl_fast.nt_xent(cont, targ, **group), adassl_fast.info_nce(cont, targ, **group)):
        with pytest.raises(NotImplementedError, match="double backward is not supported with process_group"):
            torch.autograd.grad(loss, cont, create_graph=True)
    emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx, _ = _adassl_inputs("v", 3, 4)
    l_ssl, l_reg = adassl_fast.adassl_nt_xent(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy=noise_xy,
                                              noise_yx=noise_yx, **group)
    with pytest.raises(NotImplementedError, match="double backward is not supported with process_group"):
        torch.autograd.grad(l_ssl + l_reg, post_xy, create_graph=True)
    # and without create_graph the distributed gradient is the single-process one
    got = torch.autograd.grad(adassl_fast.nt_xent(cont, targ, **group), cont)[0]
    torch.testing.assert_close(got, torch.autograd.grad(adassl_fast.nt_xent(cont, targ, impl="torch"), cont)[0])
