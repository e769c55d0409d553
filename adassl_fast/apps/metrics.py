"""Identifiability metrics on held-out latents, in numpy only (no scikit-learn, scipy optional).

* `linear_r2`: least-squares regression (with intercept) from representations to each factor, fitted on
  one split and scored on another (cl-ica / AdaSSL's linear R^2); per factor and mean.
* `mcc`: mean correlation coefficient: |Pearson| between every factor and every representation dim,
  matched one-to-one with the Hungarian method (cl-ica's "permutation disentanglement").
* `dci`: DCI disentanglement (and completeness) of Eastwood & Williams with AdaSSL's protocol: inputs and
  targets z-scored, importance R = |Lasso coefficients| with the penalty picked by 5-fold CV (what
  sklearn's LassoCV does), D_i = 1 - H_K(P_i), weighted by each code's share of the importance.
"""

from __future__ import annotations

import math

import numpy as np


def _np(a) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().double().numpy()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D (samples, dims) array, got shape {a.shape}")
    return a


def _zscore(a: np.ndarray, ref: np.ndarray | None = None) -> np.ndarray:
    ref = a if ref is None else ref
    sd = ref.std(0)
    return (a - ref.mean(0)) / np.where(sd > 0, sd, 1.0)


# ----------------------------------------------------------------------------------------------------
# Linear R^2.


def linear_r2(h_train, z_train, h_test=None, z_test=None) -> dict:
    """R^2 of the least-squares map h -> z (with intercept) per factor, fitted on train, scored on test.

    Without a test split it scores on the training data (cl-ica's default). Returns
    {"per_factor": [K floats], "mean": float}.
    """
    h_train, z_train = _np(h_train), _np(z_train)
    h_test = h_train if h_test is None else _np(h_test)
    z_test = z_train if z_test is None else _np(z_test)
    if len(h_train) != len(z_train) or len(h_test) != len(z_test):
        raise ValueError("representations and latents must have the same number of samples")
    design = lambda h: np.hstack([h, np.ones((len(h), 1))])
    coef, *_ = np.linalg.lstsq(design(h_train), z_train, rcond=None)
    resid = ((z_test - design(h_test) @ coef) ** 2).sum(0)
    total = ((z_test - z_test.mean(0)) ** 2).sum(0)
    r2 = 1 - resid / np.where(total > 0, total, 1.0)
    return {"per_factor": r2.tolist(), "mean": float(r2.mean())}


# ----------------------------------------------------------------------------------------------------
# MCC with the Hungarian method.


def _hungarian(cost: np.ndarray) -> np.ndarray:
    """Min-cost assignment of every row of an (n, m) cost, n <= m, to a distinct column (O(n^2 m))."""
    n, m = cost.shape
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    owner = np.zeros(m + 1, dtype=int)  # owner[j]: 1-based row assigned to column j (0 = free)
    way = np.zeros(m + 1, dtype=int)
    for i in range(1, n + 1):
        owner[0] = i
        j0 = 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = owner[j0]
            free = ~used[1:]
            cur = cost[i0 - 1] - u[i0] - v[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            cand = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(cand)) + 1
            delta = cand[j1 - 1]
            u[owner[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    cols = np.zeros(n, dtype=int)
    for j in range(1, m + 1):
        if owner[j]:
            cols[owner[j] - 1] = j - 1
    return cols


def linear_sum_assignment(cost) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the min-cost assignment; scipy's when importable, else the numpy Hungarian above."""
    cost = np.asarray(cost, dtype=np.float64)
    try:
        from scipy.optimize import linear_sum_assignment as scipy_lsa
    except ImportError:
        if cost.shape[0] <= cost.shape[1]:
            return np.arange(cost.shape[0]), _hungarian(cost)
        cols = _hungarian(cost.T)
        order = np.argsort(cols)
        return cols[order], np.arange(cost.shape[1])[order]
    return scipy_lsa(cost)


def mcc(z, h) -> dict:
    """Mean |Pearson correlation| between each factor and its Hungarian-matched representation dim.

    z: (n, K) latents, h: (n, d) representations (d >= K for every factor to get its own dim).
    Returns {"mean": float, "per_factor": [K floats], "matching": [K dims]}.
    """
    z, h = _np(z), _np(h)
    if len(z) != len(h):
        raise ValueError("z and h must have the same number of samples")
    zs, hs = _zscore(z), _zscore(h)
    corr = np.abs(zs.T @ hs / len(z))  # (K, d)
    rows, cols = linear_sum_assignment(-corr)
    per = np.zeros(z.shape[1])
    match = [-1] * z.shape[1]
    for r, c in zip(rows, cols, strict=True):
        per[r], match[r] = corr[r, c], int(c)
    return {"mean": float(per[rows].mean()), "per_factor": per.tolist(), "matching": match}


# ----------------------------------------------------------------------------------------------------
# DCI with a cross-validated Lasso.


def lasso_path(gram: np.ndarray, xty: np.ndarray, n: int, alphas: np.ndarray, iters: int = 1000,
               tol: float = 1e-7) -> np.ndarray:
    """Lasso (1/2n)||y - Xw||^2 + alpha ||w||_1 (sklearn's objective) for every target column of `xty` (d, T)
    and every alpha at once, by FISTA on the Gram matrix: -> (A, d, T)."""
    step = n / max(np.linalg.eigvalsh(gram)[-1], 1e-12)
    thresh = (alphas * step)[:, None, None]
    c = np.broadcast_to(xty, (len(alphas), *xty.shape))
    w = np.zeros_like(c)
    z, t = w.copy(), 1.0
    for _ in range(iters):
        grad = (gram @ z - c) / n
        v = z - step * grad
        w_new = np.sign(v) * np.maximum(np.abs(v) - thresh, 0.0)
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        z = w_new + (t - 1) / t_new * (w_new - w)
        delta = np.abs(w_new - w).max()
        w, t = w_new, t_new
        if delta < tol:
            break
    return w


def lasso_cv(x: np.ndarray, y: np.ndarray, n_alphas: int = 20, folds: int = 5, seed: int = 0) -> np.ndarray:
    """(d, T) Lasso coefficients of x (n, d) -> each column of y (n, T), each column's alpha chosen by k-fold CV
    on a log grid of 20 alphas over three decades (what sklearn's LassoCV does, with a common grid)."""
    n = len(x)
    xc, yc = x - x.mean(0), y - y.mean(0)
    alpha_max = np.abs(xc.T @ yc).max() / n
    if alpha_max == 0:
        return np.zeros((x.shape[1], y.shape[1]))
    alphas = alpha_max * np.logspace(0, -3, n_alphas)
    fold = np.random.default_rng(seed).permutation(n) % folds
    errors = np.zeros((n_alphas, y.shape[1]))
    for f in range(folds):
        tr, te = fold != f, fold == f
        xm, ym = x[tr].mean(0), y[tr].mean(0)
        xt, yt = x[tr] - xm, y[tr] - ym
        w = lasso_path(xt.T @ xt, xt.T @ yt, int(tr.sum()), alphas)  # (A, d, T)
        pred = np.einsum("nd,adt->ant", x[te] - xm, w) + ym
        errors += ((pred - y[te]) ** 2).mean(1)
    best = np.argmin(errors, 0)  # (T,)
    w = lasso_path(xc.T @ xc, xc.T @ yc, n, alphas)
    return w[best, :, np.arange(y.shape[1])].T


def importance_matrix(h, z, method: str = "lasso") -> np.ndarray:
    """(d, K) |coefficients| of per-factor regressions on z-scored inputs and targets ('lasso' or 'ridge')."""
    hs, zs = _zscore(_np(h)), _zscore(_np(z))
    if method == "ridge":
        coef = np.linalg.solve(hs.T @ hs + 1e-2 * len(hs) * np.eye(hs.shape[1]), hs.T @ zs)
        return np.abs(coef)
    if method != "lasso":
        raise ValueError(f"method must be 'lasso' or 'ridge', got {method!r}")
    return np.abs(lasso_cv(hs, zs))


def _entropy(p: np.ndarray, base: int) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(-1) / np.log(base)


def dci_from_importance(r: np.ndarray) -> dict:
    """D and C of an importance matrix r (d codes x K factors)."""
    r = np.asarray(r, dtype=np.float64)
    total = r.sum()
    if total == 0:
        return {"disentanglement": 0.0, "completeness": 0.0, "per_code": [0.0] * r.shape[0]}
    code_sums = r.sum(1, keepdims=True)
    p = r / np.where(code_sums > 0, code_sums, 1.0)
    d_i = np.where(code_sums[:, 0] > 0, 1 - _entropy(p, r.shape[1]), 0.0)
    rho = code_sums[:, 0] / total
    factor_sums = r.sum(0, keepdims=True)
    q = r / np.where(factor_sums > 0, factor_sums, 1.0)
    c_k = 1 - _entropy(q.T, max(r.shape[0], 2))
    return {"disentanglement": float((rho * d_i).sum()), "completeness": float((factor_sums[0] / total * c_k).sum()),
            "per_code": d_i.tolist()}


def dci(h, z, method: str = "lasso") -> dict:
    """DCI disentanglement / completeness of representations h (n, d) for factors z (n, K)."""
    return dci_from_importance(importance_matrix(h, z, method))


def evaluate(h_train, z_train, h_test, z_test, dci_method: str = "lasso") -> dict:
    """The benchmark's three numbers on held-out data: linear R^2 (fit on train), MCC and DCI-D (on test)."""
    r2 = linear_r2(h_train, z_train, h_test, z_test)
    m = mcc(z_test, h_test)
    d = dci(h_test, z_test, dci_method)
    return {"r2": r2["mean"], "r2_per_factor": r2["per_factor"], "mcc": m["mean"],
            "dci_d": d["disentanglement"], "dci_c": d["completeness"]}
