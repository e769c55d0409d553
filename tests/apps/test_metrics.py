"""The identifiability metrics on hand-checked cases."""

import itertools

import numpy as np
import pytest

from adassl_fast.apps import metrics


def _latents(n=2000, k=5, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, k))


def test_linear_latents_give_r2_one_and_mcc_one():
    z = _latents()
    a = np.random.default_rng(1).normal(size=(5, 8))
    h = z @ a + 3.0
    r2 = metrics.linear_r2(h, z)
    assert r2["mean"] == pytest.approx(1.0, abs=1e-10)
    assert np.allclose(r2["per_factor"], 1.0)
    assert metrics.mcc(z, z)["mean"] == pytest.approx(1.0)


def test_held_out_r2_of_a_linear_map_is_one():
    z_tr, z_te = _latents(seed=2), _latents(seed=3)
    a = np.random.default_rng(4).normal(size=(5, 5))
    assert metrics.linear_r2(z_tr @ a, z_tr, z_te @ a, z_te)["mean"] == pytest.approx(1.0, abs=1e-10)


def test_shuffled_latents_give_about_zero():
    z = _latents(n=4000)
    h = z[np.random.default_rng(5).permutation(len(z))]
    z_te = _latents(n=4000, seed=6)
    h_te = z_te[np.random.default_rng(7).permutation(len(z_te))]
    assert abs(metrics.linear_r2(h, z, h_te, z_te)["mean"]) < 0.02
    assert metrics.mcc(z, h)["mean"] < 0.06
    # DCI-D is a ratio of importances, undefined for pure noise; the cross-validated Lasso zeroes them instead.
    assert metrics.importance_matrix(h, z).sum() < 0.1


def test_permuted_scaled_identity_gives_mcc_one_and_dci_one():
    z = _latents(k=6)
    perm = [3, 0, 5, 1, 4, 2]
    scale = np.array([2.0, -0.5, 3.0, -1.0, 0.1, 7.0])
    h = z[:, perm] * scale
    m = metrics.mcc(z, h)
    assert m["mean"] == pytest.approx(1.0)
    assert [m["matching"][f] for f in perm] == list(range(6))
    d = metrics.dci(h, z)
    assert d["disentanglement"] == pytest.approx(1.0, abs=1e-3)
    assert d["completeness"] == pytest.approx(1.0, abs=1e-3)


def test_mcc_with_more_codes_than_factors():
    z = _latents(k=3)
    noise = np.random.default_rng(8).normal(size=(len(z), 5))
    h = np.hstack([noise[:, :2], z[:, [2]], noise[:, 2:], -z[:, [0]], 4 * z[:, [1]]])
    m = metrics.mcc(z, h)
    assert m["mean"] == pytest.approx(1.0)
    assert m["matching"] == [6, 7, 2]


def test_entangled_codes_have_low_disentanglement():
    z = _latents(k=4)
    rot = np.linalg.qr(np.random.default_rng(9).normal(size=(4, 4)))[0]
    d = metrics.dci(z @ rot, z)["disentanglement"]
    assert d < 0.6
    assert metrics.dci(z, z)["disentanglement"] > 0.99


def test_dci_from_a_hand_computed_importance_matrix():
    # Code 0 explains factor 0 only (D = 1); code 1 splits evenly over both factors (D = 0).
    r = np.array([[1.0, 0.0], [0.5, 0.5]])
    out = metrics.dci_from_importance(r)
    assert out["per_code"] == pytest.approx([1.0, 0.0])
    assert out["disentanglement"] == pytest.approx(0.5)  # weights 1/2, 1/2


@pytest.mark.parametrize("shape", [(4, 4), (3, 6), (6, 3), (1, 5), (5, 5)])
def test_hungarian_matches_brute_force(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(5):
        cost = rng.normal(size=shape)
        n, m = shape
        if n <= m:
            best = min(sum(cost[i, c] for i, c in enumerate(p)) for p in itertools.permutations(range(m), n))
            got = cost[np.arange(n), metrics._hungarian(cost)].sum()
        else:
            best = min(sum(cost[r, j] for j, r in enumerate(p)) for p in itertools.permutations(range(n), m))
            rows, cols = metrics.linear_sum_assignment(cost)
            got = cost[rows, cols].sum()
        assert got == pytest.approx(best)


def test_lasso_path_matches_coordinate_descent():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(500, 6))
    x[:, 1] += 0.8 * x[:, 0]
    y = x @ np.array([1.0, 0.0, -2.0, 0.0, 0.5, 0.0]) + 0.1 * rng.normal(size=500)
    xc, yc = x - x.mean(0), (y - y.mean())[:, None]
    alpha = 0.05
    w = metrics.lasso_path(xc.T @ xc, xc.T @ yc, 500, np.array([alpha]))[0, :, 0]
    ref = np.zeros(6)
    for _ in range(500):  # textbook coordinate descent on (1/2n)||y - Xw||^2 + alpha ||w||_1
        for j in range(6):
            rho = xc[:, j] @ (yc[:, 0] - xc @ ref + xc[:, j] * ref[j]) / 500
            ref[j] = np.sign(rho) * max(abs(rho) - alpha, 0) / (xc[:, j] @ xc[:, j] / 500)
    assert np.allclose(w, ref, atol=1e-7)


def test_bad_shapes():
    with pytest.raises(ValueError, match="2-D"):
        metrics.mcc(np.zeros(5), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="same number"):
        metrics.mcc(np.zeros((5, 2)), np.zeros((4, 2)))
