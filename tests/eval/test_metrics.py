"""Metrics against closed forms and brute force."""
import math

import numpy as np
import pytest
import torch

from srdit.eval.metrics import (
    feature_stats,
    fid_from_features,
    frechet_distance,
    inception_score,
    kernel_distance,
    manifold_radii,
    mmd2_unbiased,
    polynomial_kernel,
    precision_recall,
)

# ----------------------------------------------------------------------------- FID


def test_fid_identical_is_zero():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 8))
    mu, sigma = feature_stats(a)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_fid_diagonal_closed_form():
    # diagonal Gaussians: sqrtm(S1 S2) = diag(sqrt(s1 s2)), so
    # FID = sum (m1 - m2)^2 + sum (s1 + s2 - 2 sqrt(s1 s2)), s the variances
    rng = np.random.default_rng(1)
    m1, m2 = rng.standard_normal(16), rng.standard_normal(16)
    s1, s2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    want = ((m1 - m2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    got = frechet_distance(m1, np.diag(s1), m2, np.diag(s2))
    assert got == pytest.approx(want, rel=1e-10)
    # full covariances: invariant under a common rotation of both distributions
    q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    got_rot = frechet_distance(q @ m1, q @ np.diag(s1) @ q.T, q @ m2, q @ np.diag(s2) @ q.T)
    assert got_rot == pytest.approx(want, rel=1e-8)


def test_fid_singular_and_stats():
    # rank-deficient covariances (N < D) still give a finite real value
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((5, 20)), rng.standard_normal((5, 20)) + 1
    mu1, s1 = feature_stats(a)
    mu2, s2 = feature_stats(b)
    assert np.isfinite(frechet_distance(mu1, s1, mu2, s2))
    # feature_stats: N - 1 covariance
    np.testing.assert_allclose(s1, (a - a.mean(0)).T @ (a - a.mean(0)) / 4)
    assert fid_from_features(a, mu1, s1) == pytest.approx(0.0, abs=1e-6)


def test_fid_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------- IS


def test_is_uniform_is_one():
    mean, std = inception_score(np.zeros((100, 1008)), split_size=50)
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0)


def test_is_one_hot_equal_use_is_num_classes():
    c = 10
    probs = np.eye(c)[np.arange(1000) % c]
    assert inception_score(probs, split_size=500)[0] == pytest.approx(c)
    # the same through logits: a large margin makes the softmax one-hot to float64 precision
    assert inception_score(probs * 50.0, split_size=500)[0] == pytest.approx(c, rel=1e-6)


def test_is_class_sorted_input_deflates():
    # 10 classes x 100 samples, confident but soft predictions. With splits of 100, sorted input
    # puts one class in each split: p(y) equals p(y|x), KL = 0, IS = 1. Interleaved, each split
    # holds all classes: IS near C.
    c, per = 10, 100
    labels = np.repeat(np.arange(c), per)
    logits = 6.0 * np.eye(c)[labels] + np.random.default_rng(0).standard_normal((c * per, c)) * 0.1
    sorted_is = inception_score(logits, split_size=per)[0]
    order = np.argsort(np.tile(np.arange(per), c), kind="stable")  # round-robin over classes
    mixed_is = inception_score(logits[order], split_size=per)[0]
    assert sorted_is < 1.01 and mixed_is > 5.0


def test_is_splits_are_consecutive_and_std():
    # first split uniform (IS 1), second split one-hot over 4 classes (IS 4)
    probs = np.concatenate([np.full((8, 4), 0.25), np.eye(4)[np.arange(8) % 4]])
    mean, std = inception_score(probs, split_size=8)
    assert mean == pytest.approx(2.5) and std == pytest.approx(1.5)


# ----------------------------------------------------------------------------- precision/recall


def brute_force_pr(real, fake, k=3):
    def sq(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    rad_r = np.sort(sq(real, real), axis=1)[:, k]  # index k: self (0) is index 0
    rad_f = np.sort(sq(fake, fake), axis=1)[:, k]
    d = sq(real, fake)
    precision = (d <= rad_r[:, None]).any(0).mean()
    recall = (d <= rad_f[None, :]).any(1).mean()
    return precision, recall, rad_r


def test_pr_identical_and_far_apart():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 16)).astype(np.float32)
    assert precision_recall(a, a) == (1.0, 1.0)
    assert precision_recall(a, a + 1000.0, fp16=False) == (0.0, 0.0)
    assert precision_recall(a, a + 1000.0) == (0.0, 0.0)  # fp16 overflows -> fp32 fallback


@pytest.mark.parametrize("fp16", (False, True))
def test_pr_matches_brute_force(fp16):
    rng = np.random.default_rng(3)
    real = rng.standard_normal((300, 32)).astype(np.float32)
    fake = (rng.standard_normal((250, 32)) * 1.05 + 0.2).astype(np.float32)
    p_bf, r_bf, rad_bf = brute_force_pr(real.astype(np.float64), fake.astype(np.float64))
    # small blocks exercise the blocking; results do not depend on it
    p, r = precision_recall(real, fake, batch=64, fp16=fp16)
    assert 0.05 < p_bf < 0.95 and 0.05 < r_bf < 0.95  # a non-trivial case
    # fp32: equal up to rounding ties (none at this seed); fp16: distances carry ~1e-3 relative
    # error, so a point at a ball's edge may flip: allow one point per set.
    tol = 0 if not fp16 else 1 / 250
    assert abs(p - p_bf) <= tol and abs(r - r_bf) <= (0 if not fp16 else 1 / 300)
    rad = manifold_radii(real, 3, batch=64, fp16=fp16).double().numpy()
    np.testing.assert_allclose(rad, rad_bf, rtol=1e-5 if not fp16 else 3e-3)


def test_pr_k_counts_self():
    # 1-D points 0, 1, 3, 6, 10: for k = 1 the radius of point 0 is 1 (its nearest other point),
    # i.e. the 2nd smallest distance including itself.
    pts = np.array([[0.0], [1.0], [3.0], [6.0], [10.0]], np.float32)
    rad = manifold_radii(pts, k=1, fp16=False).numpy()
    np.testing.assert_array_equal(rad, [1.0, 1.0, 4.0, 9.0, 16.0])
    rad3 = manifold_radii(pts, k=3, fp16=False).numpy()
    np.testing.assert_array_equal(rad3, [36.0, 25.0, 9.0, 25.0, 81.0])


# ----------------------------------------------------------------------------- KDD


def test_kernel_formula():
    x = np.array([[1.0, 2.0, 3.0, 4.0]])
    y = np.array([[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    want = [((0.5 - 2 + 6) / 4 + 1) ** 3, ((1 + 2 + 3 + 4) / 4 + 1) ** 3]
    np.testing.assert_allclose(polynomial_kernel(x, y), [want])


def double_loop_mmd2(x, y):
    def k(a, b):
        return (a @ b / len(a) + 1.0) ** 3

    m = len(x)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return sxx / (m * (m - 1)) + syy / (m * (m - 1)) - 2 * sxy / (m * m)


def test_mmd_against_double_loop():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((12, 5)), rng.standard_normal((12, 5)) + 0.5
    assert mmd2_unbiased(x, y) == pytest.approx(double_loop_mmd2(x, y), rel=1e-12)


def test_kernel_distance_subsets_against_double_loop():
    rng = np.random.default_rng(5)
    real, fake = rng.standard_normal((30, 6)), rng.standard_normal((25, 6)) * 1.2
    mean, std = kernel_distance(real, fake, n_subsets=4, subset_size=10, seed=7)
    draw = np.random.RandomState(7)
    vals = []
    for _ in range(4):
        xs = real[draw.choice(30, 10, replace=False)]
        ys = fake[draw.choice(25, 10, replace=False)]
        vals.append(double_loop_mmd2(xs, ys))
    assert mean == pytest.approx(np.mean(vals), rel=1e-10)
    assert std == pytest.approx(np.std(vals), rel=1e-8)


def test_kernel_distance_same_distribution_near_zero():
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((400, 8)), rng.standard_normal((400, 8))
    mean_same, _ = kernel_distance(a, b, n_subsets=10, subset_size=200)
    mean_diff, _ = kernel_distance(a, b + 1.0, n_subsets=10, subset_size=200)
    # unbiased: E = 0 for equal distributions; a unit mean shift gives a clearly larger value
    assert abs(mean_same) < 0.05 * mean_diff and mean_diff > 0.1
    # subset size is clipped to the smaller set
    assert math.isfinite(kernel_distance(a[:50], b, n_subsets=2, subset_size=1000)[0])


def test_inputs_may_be_torch():
    a = torch.randn(100, 8)
    assert precision_recall(a, a) == (1.0, 1.0)
