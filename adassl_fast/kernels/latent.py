"""The AdaSSL latent prologue and epilogue in Triton: edited rows formed, and differentiated, in registers.

The kernels read a side's rows through two-part sources (kernels/rows.py). PROLOGUE selects how a tile of
`cont` rows is formed (constexpr, so each mode compiles to its own kernel):
  0: plain load of cont;
  1: AdaSSL-V: r = mu + eps * exp(clamp(2 log(softplus(a) + 1e-6), -10, 10) / 2), cont = emb + r;
  2: AdaSSL-S: mask = [logits + log u - log(1 - u) > 0], r = mask * rt, cont = emb + r.
All latent math runs in the statistics dtype (fp32, fp64 for fp64 inputs) with plain tl.exp / tl.log,
because libdevice does not exist in the interpreter.
"""

import triton
import triton.language as tl

from .rows import load_rows, round_to, store_rows


@triton.jit
def _log1p(x):
    # log(1 + x) accurate for small x without libdevice (Goldberg): log(u) * x / (u - 1), u = fl(1 + x).
    u = 1.0 + x
    safe = tl.where(u == 1.0, 1.0, u - 1.0)  # keeps the unused branch finite
    return tl.where(u == 1.0, x, tl.log(u) * (x / safe))


@triton.jit
def softplus(a):
    # torch.nn.functional.softplus with threshold 20: the identity above it.
    return tl.where(a > 20.0, a, tl.maximum(a, 0.0) + _log1p(tl.exp(-tl.abs(a))))


@triton.jit
def softplus_grad(a):
    # sigmoid(a), exactly 1 above torch's threshold.
    return tl.where(a > 20.0, 1.0, 1.0 / (1.0 + tl.exp(-a)))


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def logvar(a):
    """(clamped logvar, inclusive in-range indicator) of sigma = softplus(a) + 1e-6."""
    lv = 2.0 * tl.log(softplus(a) + 1e-6)
    inside = (lv >= -10.0) & (lv <= 10.0)
    return tl.minimum(tl.maximum(lv, -10.0), 10.0), inside


@triton.jit
def logistic(noise):
    u = tl.minimum(tl.maximum(noise, 1e-6), 1.0 - 1e-6)
    return tl.log(u) - tl.log(1.0 - u)


@triton.jit
def build_rows(rows, cols, half, n_rows, d,
               emb_a, emb_b, post_a, post_b, prior_a, prior_b, noise_a, noise_b,
               ACC: tl.constexpr, PROLOGUE: tl.constexpr):
    """(cont tile in the input dtype, per-row regulariser sum in ACC) for rows of cont.

    PROLOGUE 0 reads cont from emb_a/emb_b; 1/2 form emb + r in registers (never stored).
    Out-of-range entries are exactly 0 (and contribute 0 to the regulariser).
    """
    if PROLOGUE == 0:
        x = load_rows(emb_a, emb_b, rows, cols, half, n_rows, d, d, True)
        reg = tl.zeros([x.shape[0]], ACC)
    else:
        valid = (rows[:, None] < n_rows) & (cols[None, :] < d)
        emb = load_rows(emb_a, emb_b, rows, cols, half, n_rows, d, d, True).to(ACC)
        first = load_rows(post_a, post_b, rows, cols, half, n_rows, d, 2 * d, True).to(ACC)
        second = load_rows(post_a + d, post_b + d, rows, cols, half, n_rows, d, 2 * d, True).to(ACC)
        noise = load_rows(noise_a, noise_b, rows, cols, half, n_rows, d, d, True).to(ACC)
        if PROLOGUE == 1:
            lvq, _ = logvar(second)
            x = emb + first + noise * tl.exp(0.5 * lvq)
            mup = load_rows(prior_a, prior_b, rows, cols, half, n_rows, d, 2 * d, True).to(ACC)
            ap = load_rows(prior_a + d, prior_b + d, rows, cols, half, n_rows, d, 2 * d, True).to(ACC)
            lvp, _ = logvar(ap)
            diff = first - mup
            kl = 0.5 * (lvp - lvq + tl.exp(lvq - lvp) + diff * diff * tl.exp(-lvp) - 1.0)
            reg = tl.sum(tl.where(valid, kl, 0.0), 1)
        else:
            keep = (first + logistic(noise)) > 0.0
            x = emb + tl.where(keep, second, 0.0)
            reg = tl.sum(tl.where(valid, sigmoid(first), 0.0), 1)
        x = round_to(x, emb_a.dtype.element_ty)
    return x, reg


@triton.jit
def latent_epilogue(dc, rows, cols, half, n_rows, d,
                    emb_a, emb_b, post_a, post_b, prior_a, prior_b, noise_a, noise_b,
                    demb_a, demb_b, dpost_a, dpost_b, dprior_a, dprior_b, reg_grad,
                    ACC: tl.constexpr, PROLOGUE: tl.constexpr, ACCUM: tl.constexpr):
    """Turn dcont rows (ACC) into d emb (+=, additive editor) and d post / d prior (docs/spec.md 3.3, 3.4, 3.6).

    reg_grad = grad_reg / (2B): the regulariser's share, one factor per element.
    """
    store_rows(demb_a, demb_b, rows, cols, half, n_rows, d, d, dc, True, ACCUM)
    first = load_rows(post_a, post_b, rows, cols, half, n_rows, d, 2 * d, True).to(ACC)
    second = load_rows(post_a + d, post_b + d, rows, cols, half, n_rows, d, 2 * d, True).to(ACC)
    noise = load_rows(noise_a, noise_b, rows, cols, half, n_rows, d, d, True).to(ACC)
    if PROLOGUE == 1:
        lvq, inq = logvar(second)
        mup = load_rows(prior_a, prior_b, rows, cols, half, n_rows, d, 2 * d, True).to(ACC)
        ap = load_rows(prior_a + d, prior_b + d, rows, cols, half, n_rows, d, 2 * d, True).to(ACC)
        lvp, inp = logvar(ap)
        diff = first - mup
        w = tl.exp(-lvp)
        rho = tl.exp(lvq - lvp)
        dmu = dc + reg_grad * diff * w
        # d logvar_q: the sample path (r = mu + eps exp(lv / 2)) plus the KL path, both through the clamp.
        dlvq = (dc * noise * 0.5 * tl.exp(0.5 * lvq) + reg_grad * 0.5 * (rho - 1.0))
        dlvq = tl.where(inq, dlvq, 0.0)
        dlvp = tl.where(inp, reg_grad * 0.5 * (1.0 - rho - diff * diff * w), 0.0)
        # d logvar / d a = 2 sigmoid(a) / (softplus(a) + 1e-6)
        da = dlvq * 2.0 * softplus_grad(second) / (softplus(second) + 1e-6)
        dap = dlvp * 2.0 * softplus_grad(ap) / (softplus(ap) + 1e-6)
        store_rows(dprior_a, dprior_b, rows, cols, half, n_rows, d, 2 * d, -reg_grad * diff * w, True, False)
        store_rows(dprior_a + d, dprior_b + d, rows, cols, half, n_rows, d, 2 * d, dap, True, False)
        store_rows(dpost_a, dpost_b, rows, cols, half, n_rows, d, 2 * d, dmu, True, False)
        store_rows(dpost_a + d, dpost_b + d, rows, cols, half, n_rows, d, 2 * d, da, True, False)
    else:
        z = first + logistic(noise)
        keep = z > 0.0
        y = sigmoid(z)
        s = sigmoid(first)
        # straight-through: the mask's gradient is that of y = sigmoid(logits + g)
        dlogit = dc * second * y * (1.0 - y) + reg_grad * s * (1.0 - s)
        store_rows(dpost_a, dpost_b, rows, cols, half, n_rows, d, 2 * d, dlogit, True, False)
        store_rows(dpost_a + d, dpost_b + d, rows, cols, half, n_rows, d, 2 * d,
                   tl.where(keep, dc, 0.0), True, False)
