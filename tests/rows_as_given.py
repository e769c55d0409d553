"""Float64 oracles of the backend entry points' `normalize` flag (docs/backends.md), written from the contract
with plain autograd ops: normalize=True scores the L2-normalised rows, normalize=False the rows as given
(S = scale / tau * <c_i, t_j>); the clamp, the excluded and positive columns and AdaSSL's edited rows are the
same either way. The backends' tests compare both settings with these, so a flag that is ignored or inverted
fails."""

import torch
import torch.nn.functional as F

from adassl_fast.adassl import reference_direction
from adassl_fast.core import clamp_inclusive

F64 = torch.float64


def free_rows(n, d, dtype=F64, low=0.4, high=2.5):
    """(n, d) rows in random directions whose norms spread uniformly over [low, high]: unit rows would make
    normalize=False indistinguishable from normalize=True."""
    x = torch.randn(n, d, dtype=F64)
    x = x / x.norm(dim=1, keepdim=True) * (low + (high - low) * torch.rand(n, 1, dtype=F64))
    return x.to(dtype)


def rounded_to(x, dtype):
    """x (float64) with its values rounded to `dtype` and the identity's gradient (straight-through): the
    operands a low-precision kernel streams, in a float64 oracle."""
    return x + (x.to(dtype).to(F64) - x).detach()


def _logits(cont, targ, scale, inv_t, clamp, normalize, operand_dtype=None):
    u, v = cont.to(F64), targ.to(F64)
    if normalize:
        u, v = F.normalize(u, dim=1, eps=1e-12), F.normalize(v, dim=1, eps=1e-12)
    if operand_dtype is not None:
        u, v = rounded_to(u, operand_dtype), rounded_to(v, operand_dtype)
    S = scale.to(F64) * inv_t * (u @ v.t())
    return S if clamp is None else clamp_inclusive(S, clamp)


def core_loss(cont, targ, pos, excl, scale, inv_t, clamp, normalize, operand_dtype=None):
    """(loss, lse (M,)) of the nt_xent core: pos / excl (M,) int64, -1 for none. operand_dtype: round the
    (normalised or given) rows to it first, as the kernels' operands are."""
    S = _logits(cont, targ, scale, inv_t, clamp, normalize, operand_dtype)
    columns = torch.arange(S.shape[1], device=S.device)
    dropped = (columns == excl[:, None]) & (excl >= 0)[:, None]
    lse = torch.logsumexp(S.masked_fill(dropped, float("-inf")), 1)
    positive = torch.where(pos >= 0, S.gather(1, pos.clamp_min(0)[:, None])[:, 0], 0.0)
    return (lse - positive).mean(), lse


def labelled_loss(query, key, labels, scale, inv_t, clamp, normalize):
    """(loss, lse (N,)) with label-defined positives: lse_i - the mean of S_ij over the columns of row i's label."""
    S = _logits(query, key, scale, inv_t, clamp, normalize)
    same = (labels[:, None] == labels[None, :]).to(F64)
    lse = torch.logsumexp(S, 1)
    return (lse - (S * same).sum(1) / same.sum(1)).mean(), lse


def symmetric_loss(query, key, scale, inv_t, clamp, normalize):
    """(loss, lse (2, N): row then column LSEs) of the symmetric InfoNCE op (positives on the diagonal)."""
    S = _logits(query, key, scale, inv_t, clamp, normalize)
    rows, cols, diag = torch.logsumexp(S, 1), torch.logsumexp(S, 0), S.diagonal()
    return ((rows - diag).mean() + (cols - diag).mean()) / 2, torch.stack([rows, cols])


def adassl_losses(emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx, scale, inv_t, clamp,
                  variant, normalize):
    """(l_ssl, l_reg) of the one-pass AdaSSL op: the nt_xent core (partner indices) on the edited rows
    cont = [emb_y + r_yx; emb_x + r_xy] against targ = [emb_x; emb_y]; the priors are unused for "s"."""
    up = lambda t: t.to(F64)  # noqa: E731
    r_xy, reg_xy = reference_direction(up(post_xy), up(prior_xy) if variant == "v" else None, up(noise_xy), variant)
    r_yx, reg_yx = reference_direction(up(post_yx), up(prior_yx) if variant == "v" else None, up(noise_yx), variant)
    cont = torch.cat([up(emb_y) + r_yx, up(emb_x) + r_xy])
    targ = torch.cat([up(emb_x), up(emb_y)])
    pos = torch.arange(cont.shape[0], device=cont.device)
    l_ssl, _ = core_loss(cont, targ, pos, (pos + emb_x.shape[0]) % cont.shape[0], scale, inv_t, clamp, normalize)
    return l_ssl, (reg_xy + reg_yx) / 2


def leaves(*tensors):
    """float64 copies of `tensors` that require grad (the oracle's inputs)."""
    return [t.detach().to(F64).requires_grad_() for t in tensors]


def adassl_inputs(B, d, variant, dtype=F64):
    """AdaSSL inputs whose edited rows and targets have norms spread around 1 (0.4 to ~3), so the logits of the
    rows as given stay O(scale / tau) and neither setting of normalize saturates the softmax."""
    emb_x, emb_y = free_rows(B, d), free_rows(B, d)
    if variant == "v":  # mu ~ 0.5 / row, sigma = softplus(~ -4 +- 1) ~ 0.02 - 0.05
        post_xy, post_yx = (torch.cat([0.5 * free_rows(B, d), torch.randn(B, d, dtype=F64) - 4], 1) for _ in "xy")
        prior_xy, prior_yx = (torch.cat([0.5 * free_rows(B, d), torch.randn(B, d, dtype=F64) - 4], 1) for _ in "xy")
        noise_xy, noise_yx = torch.randn(B, d, dtype=F64), torch.randn(B, d, dtype=F64)
    else:  # mask logits ~ N(0, 1), the masked values ~ 0.5 / row
        post_xy, post_yx = (torch.cat([torch.randn(B, d, dtype=F64), 0.5 * free_rows(B, d)], 1) for _ in "xy")
        prior_xy = prior_yx = torch.empty(0, dtype=F64)
        noise_xy, noise_yx = torch.rand(B, d, dtype=F64), torch.rand(B, d, dtype=F64)
    ins = [emb_x, emb_y, post_xy, post_yx, prior_xy, prior_yx, noise_xy, noise_yx]
    return [t.to(dtype) for t in ins]


def adassl_reference(ins, variant, scale, temperature, clamp, g_ssl, g_reg, normalize=False):
    """(l_ssl, l_reg, the gradients of g_ssl l_ssl + g_reg l_reg w.r.t. emb_x, emb_y, post_*, (prior_* for "v"),
    scale) by adassl_losses, float64."""
    graded = leaves(*ins[:4], *(ins[4:6] if variant == "v" else []), scale)
    tensors = graded[:4] + (graded[4:6] if variant == "v" else list(ins[4:6])) + list(ins[6:]) + [graded[-1]]
    l_ssl, l_reg = adassl_losses(*tensors, 1 / temperature, clamp, variant, normalize)
    grads = torch.autograd.grad([l_ssl, l_reg], graded, [torch.tensor(g, dtype=F64) for g in (g_ssl, g_reg)])
    return l_ssl.detach(), l_reg.detach(), list(grads)
