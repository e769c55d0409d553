"""adassl_fast.nn against hand-composed float64 paths written here from docs/spec.md's formulas (not from the package's
reference functions), the beta schedule against a literal replay of the reference's 0.5-per-call counter,
the reference's initialisation facts, and config errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import adassl_fast
from adassl_fast.nn import AdaSSL, FoldAddition, InfoNCELoss, NTXentLoss, beta_at, byol_tau, ema_update

D64 = torch.float64


# ----------------------------------------------------------------------------------------------------
# Hand-written formulas (docs/spec.md 2.1, 2.4, 2.6).


def hand_nt_xent(cont, targ, tau, lam=1.0, clamp=20.0):
    u = cont / cont.norm(dim=1, keepdim=True).clamp_min(1e-12)
    v = targ / targ.norm(dim=1, keepdim=True).clamp_min(1e-12)
    s = lam / tau * (u @ v.t())
    if clamp is not None:
        s = s.clamp(-clamp, clamp)
    n = s.shape[0]
    idx = torch.arange(n)
    excluded = torch.zeros(n, n, dtype=torch.bool)
    excluded[idx, (idx + n // 2) % n] = True
    return (torch.logsumexp(s.masked_fill(excluded, -math.inf), 1) - s[idx, idx]).mean()


def hand_info_nce(q, k, tau, lam=1.0):
    s = lam / tau * F.normalize(q, dim=1) @ F.normalize(k, dim=1).t()
    idx = torch.arange(s.shape[0])
    one = (torch.logsumexp(s, 1) - s[idx, idx]).mean()
    other = (torch.logsumexp(s.t(), 1) - s[idx, idx]).mean()
    return (one + other) / 2


def hand_logvar(pre):
    return (2 * torch.log(F.softplus(pre) + 1e-6)).clamp(-10, 10)


def hand_direction(post, prior, noise, variant):
    d_r = post.shape[1] // 2
    head, tail = post[:, :d_r], post[:, d_r:]
    if variant == "v":
        lq, lp = hand_logvar(tail), hand_logvar(prior[:, d_r:])
        dmu = head - prior[:, :d_r]
        kl = 0.5 * (lp - lq + lq.exp() / lp.exp() + dmu**2 / lp.exp() - 1)
        return head + noise * (0.5 * lq).exp(), kl.sum(1).mean()
    u = noise.clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid(head + u.log() - (1 - u).log())
    mask = (soft > 0.5).to(soft.dtype) - soft.detach() + soft
    return mask * tail, torch.sigmoid(head).sum(1).mean()


def hand_adassl(model, ex, ey, noise_xy, noise_yx, beta, tx=None, ty=None):
    """The whole AdaSSL loss composed by hand from the model's own sub-networks."""
    cy = ey if ty is None else ty
    cx = ex if tx is None else tx
    post_xy = model.posterior(torch.cat([ex, cy], 1))
    post_yx = model.posterior(torch.cat([ey, cx], 1))
    prior_xy = model.prior(ex) if model.prior is not None else None
    prior_yx = model.prior(ey) if model.prior is not None else None
    r_xy, reg_xy = hand_direction(post_xy, prior_xy, noise_xy, model.variant)
    r_yx, reg_yx = hand_direction(post_yx, prior_yx, noise_yx, model.variant)
    if model.editor_kind == "add":
        y_hat, x_hat = ex + r_xy, ey + r_yx
    elif model.editor_kind == "mlp":
        y_hat, x_hat = model.editor.mlp(torch.cat([ex, r_xy], 1)), model.editor.mlp(torch.cat([ey, r_yx], 1))
    else:
        ed = model.editor
        w_a, b_a, w_b = ed.mechanisms.weight, ed.mechanisms.bias, ed.mix.weight
        edit = lambda x, r: x + (torch.tanh(r) * (x @ w_a.t() + b_a)) @ w_b.t()
        y_hat, x_hat = edit(ex, r_xy), edit(ey, r_yx)
    if model.objective == "byol":
        cos = lambda a, b: (F.normalize(a, dim=1) * F.normalize(b, dim=1)).sum(1).mean()
        l_ssl = -cos(model.predictor(x_hat), tx) - cos(model.predictor(y_hat), ty)
    else:
        lam = 1.0 if model.lambda_train is None else F.softplus(model.lambda_train)
        l_ssl = hand_nt_xent(torch.cat([x_hat, y_hat]), torch.cat([ex, ey]), model.temperature, lam, model.clamp)
    return l_ssl, beta * (reg_xy + reg_yx) / 2


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True)


def assert_close_grads(got, want, atol=1e-9):
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g, w, rtol=1e-7, atol=atol)


def noises(variant, b, d_r):
    draw = torch.randn if variant == "v" else torch.rand
    return draw(b, d_r, dtype=D64), draw(b, d_r, dtype=D64)


# ----------------------------------------------------------------------------------------------------
# Loss modules.


def lightly_nt_xent(out0, out1, temperature):
    """lightly 1.5 / 1.6 `NTXentLoss(temperature, memory_bank_size=0)` as its documentation states it, written
    here from that convention (not its code): out0 and out1 (B, d) are L2-normalised, the 2B rows
    [out0; out1] are compared by cosine similarity / temperature with every other row (the self-similarity
    excluded), the positive of row i is the same sample's other view, and the loss is the mean
    cross-entropy over the 2B rows."""
    z = F.normalize(torch.cat([out0, out1]), dim=1)
    n, b = z.shape[0], out0.shape[0]
    logits = (z @ z.t() / temperature).masked_fill(torch.eye(n, dtype=torch.bool), -math.inf)
    positives = torch.cat([torch.arange(b, n), torch.arange(b)])
    return F.cross_entropy(logits, positives)


@pytest.mark.parametrize("temperature", [0.5, 0.03])  # 0.03: logits up to 33, past the old default clamp of 20
def test_nt_xent_loss_is_lightlys_two_view_loss(temperature):
    b, d = 9, 5
    z0 = torch.randn(b, d, dtype=D64, requires_grad=True)
    z1 = torch.randn(b, d, dtype=D64, requires_grad=True)
    loss_fn = NTXentLoss() if temperature == 0.5 else NTXentLoss(temperature=temperature)
    got, want = loss_fn(z0, z1), lightly_nt_xent(z0, z1, temperature)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert_close_grads(grads(got, [z0, z1]), grads(want, [z0, z1]))


def test_nt_xent_loss_learnable_scale_and_clamp():
    loss_fn = NTXentLoss(temperature=0.2, learnable_scale=True, clamp=3.0).double()
    assert float(loss_fn.scale.detach()) == pytest.approx(1.0, abs=1e-7)  # float32 init
    with torch.no_grad():
        loss_fn.lambda_train.fill_(0.7)
    z0 = torch.randn(7, 3, dtype=D64, requires_grad=True)
    z1 = torch.randn(7, 3, dtype=D64, requires_grad=True)
    got = loss_fn(z0, z1)
    want = hand_nt_xent(torch.cat([z1, z0]), torch.cat([z0, z1]), 0.2, F.softplus(loss_fn.lambda_train), clamp=3.0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    wrt = [z0, z1, loss_fn.lambda_train]
    assert_close_grads(grads(got, wrt), grads(want, wrt))


def test_nt_xent_loss_rejects_views_of_different_shapes():
    with pytest.raises(ValueError, match="z0 and z1 must have the same shape"):
        NTXentLoss()(torch.randn(4, 3), torch.randn(5, 3))


def test_info_nce_loss_matches_hand_path():
    loss_fn = InfoNCELoss(temperature=0.1, learnable_scale=True).double()
    q = torch.randn(7, 3, dtype=D64, requires_grad=True)
    k = torch.randn(7, 3, dtype=D64, requires_grad=True)
    got = loss_fn(q, k)
    want = hand_info_nce(q, k, 0.1, F.softplus(loss_fn.lambda_train))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    wrt = [q, k, loss_fn.lambda_train]
    assert_close_grads(grads(got, wrt), grads(want, wrt))


def test_lambda_is_one_at_init_and_in_state_dict():
    for module in (NTXentLoss(learnable_scale=True), InfoNCELoss(learnable_scale=True),
                   AdaSSL(4, 4, learnable_scale=True)):
        assert float(module.lambda_train.detach()) == pytest.approx(math.log(math.e - 1))
        assert float(module.scale.detach()) == pytest.approx(1.0, abs=1e-7)
        assert "lambda_train" in module.state_dict()
    assert NTXentLoss().scale is None and "lambda_train" not in NTXentLoss().state_dict()


# ----------------------------------------------------------------------------------------------------
# AdaSSL against the hand-composed path.

CONFIGS = [
    dict(variant="v", editor="add", d_r=6),  # one-pass op
    dict(variant="s", editor="add", d_r=6),  # one-pass op
    dict(variant="v", editor="mlp", d_r=3, editor_hidden=(8,)),
    dict(variant="v", editor="mlp", d_r=4),
    dict(variant="s", editor="modular", d_r=4),
    dict(variant="v", editor="modular", d_r=5),
    dict(variant="s", editor="modular", d_r=4, objective="byol"),
    dict(variant="v", editor="add", d_r=6, objective="byol"),
]


def _model(cfg, **kw):
    cfg = dict(cfg)
    d_r = cfg.pop("d_r")
    model = AdaSSL(6, d_r, hidden=(16,), temperature=0.3, beta=0.7, **cfg, **kw).double()
    if cfg.get("editor") == "modular":  # W_B is zero at init: make the editor path non-trivial
        with torch.no_grad():
            model.editor.mix.weight.normal_()
    return model


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
@pytest.mark.parametrize("learnable", [False, True])
def test_adassl_matches_hand_composition(cfg, learnable):
    if learnable and cfg.get("objective") == "byol":
        pytest.skip("no lambda for BYOL")
    model = _model(cfg, learnable_scale=learnable)
    b = 5
    ex = torch.randn(b, 6, dtype=D64, requires_grad=True)
    ey = torch.randn(b, 6, dtype=D64, requires_grad=True)
    tx = ty = None
    if cfg.get("objective") == "byol":
        tx, ty = torch.randn(b, 6, dtype=D64), torch.randn(b, 6, dtype=D64)
    nxy, nyx = noises(cfg["variant"], b, model.latent_dim)
    out = model(ex, ey, tx, ty, noise_xy=nxy, noise_yx=nyx)
    assert set(out) >= {"l_ssl", "l_reg", "loss"}
    assert out["l_ssl"].dtype == D64
    l_ssl, l_reg = hand_adassl(model, ex, ey, nxy, nyx, 0.7, tx, ty)
    torch.testing.assert_close(out["l_ssl"], l_ssl, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out["l_reg"], l_reg, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out["loss"], l_ssl + l_reg, rtol=1e-10, atol=1e-10)
    wrt = [ex, ey] + [p for p in model.parameters()]
    assert_close_grads(grads(out["loss"], wrt), grads(l_ssl + l_reg, wrt))


def test_additive_simclr_uses_the_one_pass_op(monkeypatch):
    import adassl_fast.nn as nn_module

    calls = []
    real = nn_module.adassl_nt_xent
    monkeypatch.setattr(nn_module, "adassl_nt_xent", lambda *a, **k: calls.append(1) or real(*a, **k))
    for variant in ("v", "s"):
        model = AdaSSL(4, 4, variant=variant, editor="add")
        assert model.uses_one_pass
        model(torch.randn(3, 4), torch.randn(3, 4))
    assert len(calls) == 2
    model = AdaSSL(4, 4, variant="v", editor="mlp")
    assert not model.uses_one_pass
    model(torch.randn(3, 4), torch.randn(3, 4))
    assert len(calls) == 2


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("variant", ["v", "s"])
def test_one_pass_equals_composed_ops(variant, normalize):
    torch.manual_seed(0)
    fused = AdaSSL(5, 5, variant=variant, hidden=(12,), learnable_scale=True, normalize=normalize).double()
    composed = AdaSSL(5, 5, variant=variant, hidden=(12,), learnable_scale=True, fused=False,
                      normalize=normalize).double()
    composed.load_state_dict(fused.state_dict())
    ex, ey = torch.randn(6, 5, dtype=D64), torch.randn(6, 5, dtype=D64)
    nxy, nyx = noises(variant, 6, 5)
    a = fused(ex, ey, noise_xy=nxy, noise_yx=nyx)
    b = composed(ex, ey, noise_xy=nxy, noise_yx=nyx)
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-12, atol=1e-12)
    assert_close_grads(grads(a["loss"], list(fused.parameters())), grads(b["loss"], list(composed.parameters())))


def test_noise_drawn_from_torch_rng_is_reproducible():
    model = AdaSSL(4, 4, variant="v").eval()
    ex, ey = torch.randn(3, 4), torch.randn(3, 4)
    torch.manual_seed(5)
    a = model(ex, ey)["loss"]
    torch.manual_seed(5)
    b = model(ex, ey)["loss"]
    assert torch.equal(a, b)


def test_additional_view_targets_feed_only_the_posterior():
    model = AdaSSL(6, 6, variant="v", hidden=(16,), temperature=0.3, beta=0.7).double()
    ex, ey, tx, ty = (torch.randn(4, 6, dtype=D64) for _ in range(4))
    nxy, nyx = noises("v", 4, 6)
    out = model(ex, ey, tx, ty, noise_xy=nxy, noise_yx=nyx)
    l_ssl, l_reg = hand_adassl(model, ex, ey, nxy, nyx, 0.7, tx, ty)
    torch.testing.assert_close(out["loss"], l_ssl + l_reg, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------------
# The beta schedule (docs/spec.md 2.5).


class ReferenceSampler:
    """A literal replay of LatentSampler.update_reg_beta: +0.5 per sampler call, two calls per step."""

    def __init__(self, beta, warmup):
        self.beta, self.warmup, self.current_step, self.reg_beta = beta, warmup, 0.0, 0.0

    def call(self):
        self.current_step += 0.5
        if self.current_step < self.warmup:
            self.reg_beta = self.beta * math.ceil(self.current_step) / self.warmup
        else:
            self.reg_beta = self.beta
        return self.reg_beta


@pytest.mark.parametrize("warmup", [0, 1, 7, 10])
def test_beta_schedule_matches_reference_quirk(warmup):
    model = AdaSSL(4, 4, beta=0.5, beta_warmup_steps=warmup, hidden=(8,))
    ref = ReferenceSampler(0.5, warmup)
    x, y = torch.randn(4, 4), torch.randn(4, 4)
    for k in range(1, 2 * warmup + 3):
        out = model(x, y)
        both = (ref.call(), ref.call())
        assert both[0] == both[1]
        assert float(out["beta"]) == pytest.approx(both[0], abs=1e-12), k
        assert float(out["l_reg"].detach()) == pytest.approx(both[0] * float(out["reg"]), rel=1e-5, abs=1e-6)
        assert int(model.step) == k


def test_beta_schedule_values_from_spec():
    w = 10
    assert beta_at(1, 0.5, w) == pytest.approx(0.05)
    assert beta_at(w // 2, 0.5, w) == pytest.approx(0.25)
    assert beta_at(w, 0.5, w) == pytest.approx(0.5)
    assert beta_at(3 * w, 0.5, w) == pytest.approx(0.5)
    assert beta_at(1, 0.5, 0) == 0.5
    assert AdaSSL(4, 4, beta_warmup_steps=w).current_beta() == 0.0  # reg_beta = 0 before the first call


def test_beta_does_not_advance_in_eval_and_resumes_from_state_dict():
    model = AdaSSL(4, 4, beta=1.0, beta_warmup_steps=10, hidden=(8,))
    x, y = torch.randn(4, 4), torch.randn(4, 4)
    for _ in range(3):
        model(x, y)
    model.eval()
    assert float(model(x, y)["beta"]) == pytest.approx(0.3)
    assert int(model.step) == 3
    resumed = AdaSSL(4, 4, beta=1.0, beta_warmup_steps=10, hidden=(8,))
    resumed.load_state_dict(model.state_dict())
    assert float(resumed(x, y)["beta"]) == pytest.approx(0.4)


# ----------------------------------------------------------------------------------------------------
# Initialisation facts.


def test_reference_initialisation():
    model = AdaSSL(16, 8, variant="v", editor="mlp", hidden=(128, 128))
    sizes = [[m.in_features, m.out_features] for m in model.posterior if isinstance(m, torch.nn.Linear)]
    assert sizes == [[32, 128], [128, 128], [128, 16]]
    sizes = [[m.in_features, m.out_features] for m in model.prior if isinstance(m, torch.nn.Linear)]
    assert sizes == [[16, 128], [128, 128], [128, 16]]
    for net in (model.posterior, model.prior, model.editor.mlp):
        linears = [m for m in net if isinstance(m, torch.nn.Linear)]
        assert all(m.bias is None for m in linears[:-1])
        assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in net) == len(linears) - 1
        for m in linears:
            bound = math.sqrt(2) * math.sqrt(6 / (m.in_features + m.out_features))
            assert m.weight.abs().max() <= bound
            assert m.weight.abs().max() > 0.8 * bound  # Xavier-uniform fills its range
    assert torch.count_nonzero(model.posterior[-1].bias) == 0
    assert model.editor.mlp[-1].bias is None


def test_modular_editor_is_identity_with_zero_dr_at_init():
    model = AdaSSL(6, 4, variant="s", editor="modular", hidden=(8,)).double()
    assert torch.count_nonzero(model.editor.mix.weight) == 0
    x = torch.randn(5, 6, dtype=D64)
    r = torch.randn(5, 4, dtype=D64, requires_grad=True)
    x_hat = model.editor(x, r)
    assert torch.equal(x_hat, x)
    (dr,) = torch.autograd.grad(hand_nt_xent(torch.cat([x_hat, x]), torch.cat([x, x_hat]), 0.1), r)
    assert torch.count_nonzero(dr) == 0
    # Through the whole module: the posterior's first gradient comes only from the L0 term.
    ex, ey = torch.randn(5, 6, dtype=D64), torch.randn(5, 6, dtype=D64)
    params = list(model.posterior.parameters())
    g_ssl = grads(model(ex, ey)["l_ssl"], params)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in g_ssl)


def test_fold_addition_needs_matching_dims():
    with pytest.raises(ValueError, match="d_r"):
        FoldAddition(16, 8)
    with pytest.raises(ValueError, match="d_r"):
        AdaSSL(16, 8, editor="add")
    AdaSSL(16, 8, editor="mlp")


# ----------------------------------------------------------------------------------------------------
# BYOL schedule helpers (docs/spec.md 2.3).


def test_byol_tau_and_ema_update():
    assert byol_tau(1, 1000) == pytest.approx(0.99600001, abs=1e-8)
    assert byol_tau(500, 1000) == pytest.approx(0.998)
    assert byol_tau(1000, 1000) == pytest.approx(1.0)
    online, target = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        online.weight.fill_(2.0)
        online.running_mean.fill_(5.0)
    ema_update(target, online, 0.75)
    torch.testing.assert_close(target.weight, torch.full((3,), 1.25))
    assert torch.count_nonzero(target.running_mean) == 0  # buffers are not averaged


# ----------------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(variant="x"), "variant"),
        (dict(editor="conv"), "editor"),
        (dict(objective="moco"), "objective"),
        (dict(beta=-1.0), "beta"),
        (dict(beta_warmup_steps=-3), "beta_warmup_steps"),
        (dict(beta_warmup_steps=2.5), "beta_warmup_steps"),
        (dict(temperature=0.0), "temperature"),
        (dict(objective="byol", learnable_scale=True), "learnable_scale"),
        (dict(hidden=(0,)), "positive sizes"),
    ],
)
def test_bad_config_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        AdaSSL(4, 4, **kwargs)


def test_bad_dims_and_inputs():
    with pytest.raises(ValueError, match="emb_dim"):
        AdaSSL(0, 4)
    with pytest.raises(ValueError, match="latent_dim"):
        AdaSSL(4, -1, editor="mlp")
    model = AdaSSL(4, 4)
    with pytest.raises(ValueError, match="emb_x"):
        model(torch.randn(3, 5), torch.randn(3, 5))
    with pytest.raises(ValueError, match="emb_y"):
        model(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="target_x"):
        AdaSSL(4, 4, objective="byol")(torch.randn(3, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature=-1.0)


def test_adassl_normalize_false_is_the_dot_product_loss():
    """normalize=False reaches the loss: it equals nt_xent(normalize=False) of the composed edited rows."""
    torch.manual_seed(1)
    head = AdaSSL(5, 5, hidden=(12,), normalize=False, clamp=None).double()
    ex, ey = 3 * torch.randn(6, 5, dtype=D64), 3 * torch.randn(6, 5, dtype=D64)
    nxy, nyx = noises("v", 6, 5)
    got = head(ex, ey, noise_xy=nxy, noise_yx=nyx)["l_ssl"]
    r_xy, _ = head._latent(head.posterior(torch.cat([ex, ey], 1)), head.prior(ex), nxy)
    r_yx, _ = head._latent(head.posterior(torch.cat([ey, ex], 1)), head.prior(ey), nyx)
    want = adassl_fast.nt_xent(torch.cat([ey + r_yx, ex + r_xy]), torch.cat([ex, ey]), temperature=0.1, clamp=None,
                               impl="reference", normalize=False)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
