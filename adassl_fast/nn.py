"""nn.Module forms of the losses: NTXentLoss, InfoNCELoss, SigLIPLoss and the whole AdaSSL head (docs/api.md 5).

`AdaSSL` owns what sits between the projector and the loss in the authors' wrapper (docs/spec.md 1-2): the
posterior (and for variant "v" the prior) network, the editor, the beta warm-up, the learnable scale
lambda and, for BYOL, the predictor. The trainer owns the encoder and, for BYOL, the EMA target network
(`byol_tau` and `ema_update` below implement docs/spec.md 2.3's schedule for it).

Data flows one way: this file calls the functional ops (adassl_fast.nt_xent, adassl_nt_xent, latent ops),
which dispatch to the backends. With the additive editor and the SimCLR objective the whole loss is the
one-pass op `adassl_nt_xent`; every other configuration composes the ops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adassl_fast import _checks
from adassl_fast.adassl import adassl_nt_xent
from adassl_fast.info_nce import info_nce
from adassl_fast.latent import bernoulli_mask, gaussian_kl, gaussian_sample, l0_penalty
from adassl_fast.nt_xent import nt_xent
from adassl_fast.siglip import siglip

LAMBDA_INIT = math.log(math.e - 1)  # softplus(LAMBDA_INIT) == 1
VARIANTS = ("v", "s")
EDITORS = ("add", "mlp", "modular")
OBJECTIVES = ("simclr", "byol")


# ----------------------------------------------------------------------------------------------------
# Building blocks (docs/spec.md 2.9): the authors' build_mlp and initialize_mlp.


def build_mlp(sizes, *, bias: bool = True, xavier: bool = True) -> nn.Sequential:
    """sizes[0] -> ... -> sizes[-1]: hidden layers Linear(no bias) + BatchNorm1d + ReLU, last Linear(bias=bias).

    `xavier`: the reference's initialize_mlp (Xavier-uniform with gain sqrt(2), biases 0); otherwise
    PyTorch's default init (the BYOL predictor).
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"an MLP needs at least two positive sizes (input, output), got {sizes}")
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-2], sizes[1:-1], strict=True):
        layers += [nn.Linear(fan_in, fan_out, bias=False), nn.BatchNorm1d(fan_out), nn.ReLU()]
    layers.append(nn.Linear(sizes[-2], sizes[-1], bias=bias))
    mlp = nn.Sequential(*layers)
    if xavier:
        for layer in mlp.modules():
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight, gain=math.sqrt(2))
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
    return mlp


class _LearnableScale(nn.Module):
    """Mixin: `lambda_train` (0-dim, init log(e - 1)) when learnable; scale = softplus(lambda_train)
    (docs/spec.md 2.1)."""

    def _init_scale(self, learnable: bool) -> None:
        self.register_parameter("lambda_train", nn.Parameter(torch.tensor(LAMBDA_INIT)) if learnable else None)

    @property
    def scale(self) -> Tensor | None:
        return None if self.lambda_train is None else F.softplus(self.lambda_train)


class FoldAddition(nn.Module):
    """The additive editor x_hat = x + r (docs/spec.md 2.7); needs d_r == d."""

    def __init__(self, emb_dim: int, latent_dim: int):
        super().__init__()
        if latent_dim != emb_dim:
            raise ValueError(
                f"the additive editor needs d_r == d: latent_dim (d_r) = {latent_dim} but emb_dim (d) = {emb_dim}; "
                'use editor="mlp" or "modular" for d_r != d'
            )

    def forward(self, x: Tensor, r: Tensor) -> Tensor:
        return x + r


class MLPEditor(nn.Module):
    """x_hat = MLP(cat[x, r]): bias-free, BatchNorm + ReLU hidden layers, Xavier init (docs/spec.md 2.7)."""

    def __init__(self, emb_dim: int, latent_dim: int, hidden=()):
        super().__init__()
        self.mlp = build_mlp([emb_dim + latent_dim, *hidden, emb_dim], bias=False)

    def forward(self, x: Tensor, r: Tensor) -> Tensor:
        return self.mlp(torch.cat([x, r.to(x.dtype)], 1))


class ModularEditor(nn.Module):
    """AdaSSL-S editor x_hat = x + W_B (tanh(r) * (W_A x + b_A)), W_B zero-initialised (docs/spec.md 2.6)."""

    def __init__(self, emb_dim: int, latent_dim: int):
        super().__init__()
        self.mechanisms = nn.Linear(emb_dim, latent_dim, bias=True)  # W_A, b_A: PyTorch default init
        self.mix = nn.Linear(latent_dim, emb_dim, bias=False)  # W_B
        nn.init.zeros_(self.mix.weight)

    def forward(self, x: Tensor, r: Tensor) -> Tensor:
        return x + self.mix(torch.tanh(r.to(x.dtype)) * self.mechanisms(x))


# ----------------------------------------------------------------------------------------------------
# Loss modules.


class NTXentLoss(_LearnableScale):
    """SimCLR's NT-Xent of two views `z0`, `z1` (B, d) of the same B samples (docs/api.md 5).

    The call lightly / PyTorch Metric Learning / solo-learn users make: each of the 2B rows is contrasted
    with the 2B - 1 others (its own similarity excluded), the other view of its sample is the positive, and
    the loss is the mean cross-entropy over the 2B rows. It equals `nt_xent([z1; z0], [z0; z1], ...)`:
    row i's excluded column i + B is then row i itself. With `learnable_scale` it owns `lambda_train`
    (init log(e - 1)); the logits are scaled by softplus(lambda_train). AdaSSL's stacked form (edited rows
    against targets) is the functional `adassl_fast.nt_xent(cont, targ)` and `AdaSSL`. normalize=False
    contrasts the rows as given (already normalised, or a dot-product loss).
    """

    def __init__(self, temperature: float = 0.5, learnable_scale: bool = False, clamp: float | None = None,
                 impl: str = "auto", process_group=None, normalize: bool = True):
        super().__init__()
        self.temperature = _checks.positive_float("temperature", temperature)
        self.clamp = _checks.optional_clamp(clamp)
        self.normalize = _checks.flag("normalize", normalize)
        self.impl = impl
        self.process_group = process_group
        self._init_scale(learnable_scale)

    def forward(self, z0: Tensor, z1: Tensor) -> Tensor:
        """z0, z1: (B, d), the two views; returns the 0-dim loss (float32, float64 for float64 input)."""
        if z0.shape != z1.shape:
            raise ValueError(f"z0 and z1 must have the same shape (B, d), got {tuple(z0.shape)} and {tuple(z1.shape)}")
        return nt_xent(torch.cat([z1, z0]), torch.cat([z0, z1]), temperature=self.temperature, scale=self.scale,
                       clamp=self.clamp, impl=self.impl, process_group=self.process_group, normalize=self.normalize)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, learnable_scale={self.lambda_train is not None}, clamp={self.clamp}, "
                f"normalize={self.normalize}")


class InfoNCELoss(_LearnableScale):
    """CLIP-style InfoNCE of `query` (N, d) against `key` (N, d); see adassl_fast.info_nce. `forward(query, key,
    negatives=None)`: negatives (K, d) are extra keys (a queue), with symmetric=False."""

    def __init__(self, temperature: float = 0.07, learnable_scale: bool = False, symmetric: bool = True,
                 clamp: float | None = None, impl: str = "auto", process_group=None, normalize: bool = True):
        super().__init__()
        self.temperature = _checks.positive_float("temperature", temperature)
        self.clamp = _checks.optional_clamp(clamp)
        self.normalize = _checks.flag("normalize", normalize)
        self.symmetric = symmetric
        self.impl = impl
        self.process_group = process_group
        self._init_scale(learnable_scale)

    def forward(self, query: Tensor, key: Tensor, negatives: Tensor | None = None) -> Tensor:
        return info_nce(query, key, temperature=self.temperature, scale=self.scale, symmetric=self.symmetric,
                        clamp=self.clamp, impl=self.impl, process_group=self.process_group, normalize=self.normalize,
                        negatives=negatives)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, learnable_scale={self.lambda_train is not None}, "
                f"symmetric={self.symmetric}, clamp={self.clamp}, normalize={self.normalize}")


class SigLIPLoss(nn.Module):
    """SigLIP's sigmoid loss of `query` (N, d) against `key` (N, d); see adassl_fast.siglip.

    Learnable as in the SigLIP paper (Zhai et al. 2023, section 3): scale = exp(t') with t' initialised to
    log 10 (`log_scale`), and the bias (`bias`) initialised to -10.
    """

    def __init__(self, normalize: bool = True, impl: str = "auto", process_group=None):
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.bias = nn.Parameter(torch.tensor(-10.0))
        self.normalize = normalize
        self.impl = impl
        self.process_group = process_group

    def forward(self, query: Tensor, key: Tensor) -> Tensor:
        return siglip(query, key, scale=self.log_scale.exp(), bias=self.bias, normalize=self.normalize,
                      impl=self.impl, process_group=self.process_group)

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}"


# ----------------------------------------------------------------------------------------------------
# BYOL target network schedule (docs/spec.md 2.3). The trainer owns the target network and calls these.


def byol_tau(step: int, total_steps: int, base: float = 0.996) -> float:
    """tau_k = 1 - (1 - base) (cos(pi k / K) + 1) / 2; the first update after training step 1 uses k = 1."""
    return 1 - (1 - base) * (math.cos(math.pi * step / total_steps) + 1) / 2


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """theta_t <- theta_t + (1 - tau)(theta_o - theta_t) on parameters only (BN buffers are not averaged)."""
    for p_t, p_o in zip(target.parameters(), online.parameters(), strict=True):
        p_t.lerp_(p_o.detach(), 1 - tau)


# ----------------------------------------------------------------------------------------------------
# AdaSSL.


def _choice(name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def beta_at(step: int, beta: float, warmup_steps: int) -> float:
    """beta_k = beta * min(k, W) / W at 1-indexed training step k; W = 0 -> beta (docs/spec.md 2.5).

    This is what the reference's `current_step += 0.5` per sampler call gives for both calls of a step.
    """
    if warmup_steps == 0:
        return beta
    return beta * min(step, warmup_steps) / warmup_steps


class AdaSSL(_LearnableScale):
    """The AdaSSL head (docs/spec.md 2.2-2.8) on top of an encoder's embeddings.

    Args:
        emb_dim: d, the embedding (projector output) dim.
        latent_dim: d_r, the dim of the latent r.
        variant: "v" (Gaussian posterior/prior, KL) or "s" (straight-through Bernoulli mask, expected L0).
        editor: "add" (x + r, needs d_r == d), "mlp" (MLP on cat[x, r]) or "modular" (the AdaSSL-S editor);
            None picks the reference's: "add" for "v", "modular" for "s".
        hidden: hidden sizes of the posterior / prior networks (3DIdent: (128, 128)).
        editor_hidden: hidden sizes of the "mlp" editor (() is one bias-free linear map, 3DIdent's 32-16).
        objective: "simclr" (NT-Xent of [x_hat; y_hat] against [e_x; e_y]) or "byol" (predictor after the
            editor, -cos against the detached EMA targets).
        predictor_hidden: hidden sizes of the BYOL predictor (default (4 d,)).
        beta, beta_warmup_steps: the regulariser weight and its linear warm-up W (docs/spec.md 2.5). The step
            counter is the `step` buffer (in the state_dict, so a resumed run continues the schedule); it
            advances once per forward in training mode (the reference's 0.5 per sampler call, two calls).
        temperature, learnable_scale, clamp, impl, process_group: for the NT-Xent (SimCLR objective).
        normalize: the NT-Xent's (default True, the paper's cosine similarities); False contrasts the edited
            rows and the targets as given.
        fused: use the one-pass `adassl_nt_xent` where the configuration allows (additive editor, SimCLR);
            False always composes the ops (same values, more memory).

    `forward(emb_x, emb_y, target_x=None, target_y=None, *, noise_xy=None, noise_yx=None)` returns a dict
    with `l_ssl`, `l_reg` (already multiplied by beta_k), `loss` = l_ssl + l_reg, `reg` (unweighted)
    and `beta`. `target_*` are the embeddings the posterior conditions on: required for BYOL (the EMA
    target network's f_EMA(x), f_EMA(y), also the regression targets); for SimCLR optional, the second
    augmentation's embeddings with the reference's --additional_view (docs/spec.md 2.8), default emb_*.
    `noise_*` (B, d_r): standard normal ("v") or uniform ("s") noise of each direction, drawn from the
    torch RNG when None. Direction xy predicts y from x: y_hat = edit(e_x, r_xy).
    """

    def __init__(self, emb_dim: int, latent_dim: int, *, variant: str = "v", editor: str | None = None,
                 hidden=(128, 128), editor_hidden=(), objective: str = "simclr", predictor_hidden=None,
                 beta: float = 0.5, beta_warmup_steps: int = 0, temperature: float = 0.1,
                 learnable_scale: bool = False, clamp: float | None = 20.0, impl: str = "auto",
                 process_group=None, fused: bool = True, normalize: bool = True):
        super().__init__()
        d, d_r = _positive_int("emb_dim", emb_dim), _positive_int("latent_dim", latent_dim)
        self.variant = _choice("variant", variant, VARIANTS)
        editor = ("add" if variant == "v" else "modular") if editor is None else editor
        self.editor_kind = _choice("editor", editor, EDITORS)
        self.objective = _choice("objective", objective, OBJECTIVES)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (beta >= 0 and math.isfinite(beta)):
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        if isinstance(beta_warmup_steps, bool) or not isinstance(beta_warmup_steps, int) or beta_warmup_steps < 0:
            raise ValueError(f"beta_warmup_steps must be an int >= 0, got {beta_warmup_steps!r}")
        if learnable_scale and objective == "byol":
            raise ValueError("learnable_scale applies to the NT-Xent (objective='simclr'), not to BYOL")
        self.emb_dim, self.latent_dim = d, d_r
        self.beta, self.beta_warmup_steps = float(beta), beta_warmup_steps
        self.temperature = _checks.positive_float("temperature", temperature)
        self.clamp = _checks.optional_clamp(clamp)
        self.normalize = _checks.flag("normalize", normalize)
        self.impl, self.process_group, self.fused = impl, process_group, fused

        hidden = tuple(hidden)
        self.posterior = build_mlp([2 * d, *hidden, 2 * d_r])
        self.prior = build_mlp([d, *hidden, 2 * d_r]) if variant == "v" else None
        if editor == "add":
            self.editor = FoldAddition(d, d_r)
        elif editor == "mlp":
            self.editor = MLPEditor(d, d_r, editor_hidden)
        else:
            self.editor = ModularEditor(d, d_r)
        self.predictor = None
        if objective == "byol":
            predictor_hidden = (4 * d,) if predictor_hidden is None else tuple(predictor_hidden)
            self.predictor = build_mlp([d, *predictor_hidden, d], bias=False, xavier=False)
        self._init_scale(learnable_scale)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def uses_one_pass(self) -> bool:
        return self.fused and self.editor_kind == "add" and self.objective == "simclr"

    def current_beta(self) -> float:
        """beta_k at the current step (0 before the first training step when W > 0, as in the reference)."""
        return beta_at(int(self.step), self.beta, self.beta_warmup_steps)

    def _check(self, name: str, t: Tensor | None, like: Tensor) -> None:
        if t is None:
            return
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != tuple(like.shape):
            raise ValueError(f"{name} must have shape {tuple(like.shape)} (B, emb_dim), got {tuple(t.shape)}")

    def forward(self, emb_x: Tensor, emb_y: Tensor, target_x: Tensor | None = None, target_y: Tensor | None = None,
                *, noise_xy: Tensor | None = None, noise_yx: Tensor | None = None) -> dict[str, Tensor]:
        if not isinstance(emb_x, Tensor) or emb_x.dim() != 2 or emb_x.shape[1] != self.emb_dim:
            shape = tuple(emb_x.shape) if isinstance(emb_x, Tensor) else type(emb_x).__name__
            raise ValueError(f"emb_x must be (B, emb_dim={self.emb_dim}), got {shape}")
        if emb_y is None:
            raise ValueError("emb_y is required: the (B, emb_dim) embeddings of the paired views")
        for name, t in (("emb_y", emb_y), ("target_x", target_x), ("target_y", target_y)):
            self._check(name, t, emb_x)
        if self.objective == "byol":
            if target_x is None or target_y is None:
                raise ValueError("objective='byol' needs target_x and target_y (the EMA target network's embeddings)")
            target_x, target_y = target_x.detach(), target_y.detach()
        tgt_x = emb_x if target_x is None else target_x
        tgt_y = emb_y if target_y is None else target_y

        if self.training:
            self.step += 1
        beta = self.current_beta()

        # Both directions run the networks separately (BatchNorm statistics per call, as the reference).
        post_xy = self.posterior(torch.cat([emb_x, tgt_y], 1))
        post_yx = self.posterior(torch.cat([emb_y, tgt_x], 1))
        prior_xy = self.prior(emb_x) if self.prior is not None else None
        prior_yx = self.prior(emb_y) if self.prior is not None else None

        if self.uses_one_pass:
            dt = emb_x.dtype
            cast = lambda t: None if t is None else t.to(dt)
            l_ssl, reg = adassl_nt_xent(
                emb_x, emb_y.to(dt), cast(post_xy), cast(post_yx), cast(prior_xy), cast(prior_yx),
                variant=self.variant, temperature=self.temperature, scale=self.scale, clamp=self.clamp,
                noise_xy=noise_xy, noise_yx=noise_yx, impl=self.impl, process_group=self.process_group,
                normalize=self.normalize,
            )
        else:
            r_xy, reg_xy = self._latent(post_xy, prior_xy, noise_xy)
            r_yx, reg_yx = self._latent(post_yx, prior_yx, noise_yx)
            y_hat = self.editor(emb_x, r_xy)
            x_hat = self.editor(emb_y, r_yx)
            reg = (reg_xy + reg_yx) / 2
            l_ssl = self._ssl(x_hat, y_hat, emb_x, emb_y, target_x, target_y)
        l_reg = beta * reg
        return {"l_ssl": l_ssl, "l_reg": l_reg, "loss": l_ssl + l_reg, "reg": reg.detach(),
                "beta": torch.tensor(beta, dtype=torch.float64)}

    def _latent(self, post: Tensor, prior: Tensor | None, noise: Tensor | None) -> tuple[Tensor, Tensor]:
        d_r = self.latent_dim
        head, tail = post[:, :d_r], post[:, d_r:]
        if self.variant == "v":
            return gaussian_sample(head, tail, noise), gaussian_kl(head, tail, prior[:, :d_r], prior[:, d_r:])
        return bernoulli_mask(head, noise) * tail, l0_penalty(head)

    def _ssl(self, x_hat, y_hat, emb_x, emb_y, target_x, target_y) -> Tensor:
        if self.objective == "byol":
            return (-F.cosine_similarity(self.predictor(x_hat), target_x, dim=1, eps=1e-8).mean()
                    - F.cosine_similarity(self.predictor(y_hat), target_y, dim=1, eps=1e-8).mean())
        cont, targ = torch.cat([x_hat, y_hat]), torch.cat([emb_x, emb_y])
        dt = torch.promote_types(cont.dtype, targ.dtype)
        return nt_xent(cont.to(dt), targ.to(dt), temperature=self.temperature, scale=self.scale, clamp=self.clamp,
                       impl=self.impl, process_group=self.process_group, normalize=self.normalize)

    def extra_repr(self) -> str:
        return (f"emb_dim={self.emb_dim}, latent_dim={self.latent_dim}, variant={self.variant!r}, "
                f"editor={self.editor_kind!r}, objective={self.objective!r}, beta={self.beta}, "
                f"beta_warmup_steps={self.beta_warmup_steps}, temperature={self.temperature}")
