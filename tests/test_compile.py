"""The torch.library ops: opcheck (schema, fake tensors, autograd registration) and torch.compile."""

import pytest
import torch

import adassl_fast
from adassl_fast.adassl import adassl_forward_op
from adassl_fast.core import nt_xent_forward_op
from adassl_fast.indices import partner_indices
from adassl_fast.info_nce import info_nce_forward_op
from adassl_fast.nn import InfoNCELoss, NTXentLoss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Every backend that can run here goes through the same ops; Triton runs in its interpreter on CPU.
IMPLS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]
if torch.cuda.is_available():
    IMPLS.append(pytest.param("cuda", marks=pytest.mark.cuda))


def _nt_xent_args(impl, m=10, d=6, dtype=torch.float64, normalize=True):
    leaf = lambda *s: torch.randn(*s, dtype=dtype, device=DEVICE, requires_grad=True)
    pos, excl = partner_indices(m, DEVICE)
    scale = torch.tensor(1.2, dtype=dtype, device=DEVICE, requires_grad=True)
    return (leaf(m, d), leaf(m, d), pos, excl, scale, 10.0, 20.0, impl, True, normalize)


def _adassl_args(impl, variant, b=5, d=4):
    leaf = lambda *s: torch.randn(*s, dtype=torch.float64, device=DEVICE, requires_grad=True)
    empty = lambda: torch.empty(0, dtype=torch.float64, device=DEVICE)
    prior = (leaf(b, 2 * d), leaf(b, 2 * d)) if variant == "v" else (empty(), empty())
    draw = torch.randn if variant == "v" else torch.rand
    noise = (draw(b, d, dtype=torch.float64, device=DEVICE), draw(b, d, dtype=torch.float64, device=DEVICE))
    scale = torch.tensor(0.9, dtype=torch.float64, device=DEVICE, requires_grad=True)
    return (leaf(b, d), leaf(b, d), leaf(b, 2 * d), leaf(b, 2 * d), *prior, *noise, scale, 10.0, 20.0, variant,
            impl, True, True)


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck_nt_xent(impl):
    torch.library.opcheck(nt_xent_forward_op, _nt_xent_args(impl))


def test_opcheck_without_normalisation():
    """normalize=False through the ops' keyword option (the torch backend; fused kernels come with their branch)."""
    torch.library.opcheck(nt_xent_forward_op, _nt_xent_args("torch", normalize=False))
    query, key, _, _, scale, *rest = _nt_xent_args("torch", m=9, d=5)
    torch.library.opcheck(info_nce_forward_op, (query, key, scale, 1 / 0.07, None, "torch", True, False))


@pytest.mark.parametrize("impl", IMPLS)
def test_opcheck_info_nce(impl):
    query, key, _, _, scale, *rest = _nt_xent_args(impl, m=9, d=5)
    torch.library.opcheck(info_nce_forward_op, (query, key, scale, 1 / 0.07, None, impl, True, True))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", ["v", "s"])
def test_opcheck_adassl(impl, variant):
    torch.library.opcheck(adassl_forward_op, _adassl_args(impl, variant))


COMPILE_IMPLS = [pytest.param(i, marks=pytest.mark.gpu) for i in ("triton", "cuda")] if DEVICE == "cuda" else []


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["torch"] + COMPILE_IMPLS)
def test_compiled_training_step_fullgraph(impl):
    torch._dynamo.reset()
    encoder = torch.nn.Linear(8, 6, device=DEVICE)
    # posterior and prior outputs of both directions: 4 x (B, 2d), d = 3
    heads = torch.nn.Linear(6, 24, device=DEVICE)
    lam = torch.nn.Parameter(torch.tensor(0.5413, device=DEVICE))
    params = list(encoder.parameters()) + list(heads.parameters()) + [lam]

    # The GPU backends ship bf16 / fp16 configurations: the embeddings come out of a bf16 autocast there.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=impl != "torch")

    def step(x, y, noise_xy, noise_yx):
        with autocast:
            ex, ey = encoder(x), encoder(y)
        l_nt = adassl_fast.nt_xent(torch.cat([ey, ex]), torch.cat([ex, ey]), scale=torch.nn.functional.softplus(lam),
                                   impl=impl)
        with autocast:
            h = heads(torch.cat([ex, ey], 1)[:, :6])
        post_xy, post_yx, prior_xy, prior_yx = h[:, :12].split(6, 1) + h[:, 12:].split(6, 1)
        l_ssl, l_reg = adassl_fast.adassl_nt_xent(ex[:, :3], ey[:, :3], post_xy, post_yx, prior_xy, prior_yx,
                                                  noise_xy=noise_xy, noise_yx=noise_yx, impl=impl)
        return l_nt + l_ssl + 0.5 * l_reg

    x, y = torch.randn(16, 8, device=DEVICE), torch.randn(16, 8, device=DEVICE)
    n1, n2 = torch.randn(16, 3, device=DEVICE), torch.randn(16, 3, device=DEVICE)
    eager = step(x, y, n1, n2)
    eager.backward()
    eager_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    # The usual compiled training step: forward and loss in one graph (no break through our ops), and
    # AOTAutograd's compiled backward running the ops' registered backward.
    compiled = torch.compile(step, fullgraph=True)(x, y, n1, n2)
    compiled.backward()
    tol = dict(rtol=1e-5, atol=1e-6) if impl == "torch" else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(compiled, eager, **tol)
    for p, g in zip(params, eager_grads):
        torch.testing.assert_close(p.grad, g, **tol)


@pytest.mark.parametrize("module", [NTXentLoss, InfoNCELoss])
def test_compiled_loss_module_fullgraph_dynamic(module):
    """The argument checks trace (no math.isfinite on a symbolic float): one graph, any batch size."""
    torch._dynamo.reset()
    loss = module(0.2, learnable_scale=True)
    compiled = torch.compile(loss, fullgraph=True, dynamic=True)
    for m in (8, 12):  # a second batch size runs the same dynamic graph
        a, b = torch.randn(m, 5, requires_grad=True), torch.randn(m, 5)
        got = compiled(a, b)
        (got_grad,) = torch.autograd.grad(got, a)
        want = loss(a, b)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_grad, torch.autograd.grad(want, a)[0])


@pytest.fixture
def checks_on():
    adassl_fast.set_checks(True)
    yield
    adassl_fast.set_checks(False)


def test_meta_and_fake_tensors_get_the_fake_implementation_with_checks_on(checks_on):
    """Shape propagation (meta, FakeTensorMode) never reads values, even where the NaN checks would."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def losses(device):
        x = torch.randn(6, 4, device=device)
        scale = torch.tensor(1.5, device=device)
        post = torch.randn(3, 8, device=device)
        return (adassl_fast.nt_xent(x, x, scale=scale, impl="torch"), adassl_fast.info_nce(x, x, impl="torch"),
                *adassl_fast.adassl_nt_xent(x[:3], x[3:], post, post, post, post, impl="torch"))

    for out in losses("meta"):
        assert out.device.type == "meta" and out.shape == ()
    with FakeTensorMode():
        for out in losses("cpu"):
            assert out.shape == () and out.dtype == torch.float32
    # and no fake tensor outlives the mode in the ops' cached constants (index vectors, the unit scale)
    for out in losses("cpu"):
        assert torch.isfinite(out)


def test_checks_still_reject_nan_inside_a_compiled_graph(checks_on):
    torch._dynamo.reset()
    compiled = torch.compile(NTXentLoss(0.2), fullgraph=True)
    x = torch.randn(6, 4)
    compiled(x, x)
    x[2, 1] = float("nan")
    with pytest.raises(RuntimeError, match="cont contains NaN or Inf"):
        compiled(x, x)
