"""ADM-compatible sample metrics from features: FID / sFID, Inception Score, improved
precision/recall, and the kernel (DINOv2) distance KDD. No network; numpy/scipy, and torch for the
O(N^2) nearest-neighbour work.

Reference: the ADM evaluator (openai/guided-diffusion `evaluations/evaluator.py`), reimplemented
from its math; what it does that is easy to get wrong is stated where we do it:
  * FID: mu = mean, sigma = np.cov(rowvar=False) (N - 1); sqrtm(sigma1 sigma2) with scipy; if it
    is not finite, retry with eps I added to both covariances; an imaginary part on the diagonal
    larger than 1e-3 is an error, a smaller one is dropped. ADM evaluates sample.frechet(ref),
    i.e. sample statistics first, as `fid_from_features` does.
  * IS: softmax over 1008 logits (pool_3 @ W, no bias), consecutive splits of 5,000, no shuffle.
  * Precision/recall: k = 3, radius = (k+1)-th smallest squared distance counting the point
    itself, distances computed from fp16 features with fp32 fallback (see `_sq_distances`).
  * KDD: unbiased MMD^2, polynomial kernel (x.y / d + 1)^3, 100 subsets of 1,000, raw value.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg, special

# ----------------------------------------------------------------------------- FID


def require_finite(name: str, *arrays) -> None:
    """A ValueError naming `name` when an array holds NaN or Inf: LAPACK's square root can spin
    for many minutes on them, and a metric of garbage must never look like a result."""
    for a in arrays:
        if not np.isfinite(np.asarray(a)).all():
            raise ValueError(f"{name} holds non-finite values (NaN or Inf)")


def feature_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu [D], sigma [D, D]) of [N, D] features; sigma uses N - 1 (np.cov, rowvar=False).
    Both in float64 (ADM keeps mu in the features' float32; the difference is ~1e-7 relative)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2)).

    sqrtm is scipy.linalg.sqrtm of the product, as in ADM / pytorch-fid. If the result is not
    finite (singular product), eps I is added to both covariances and it is recomputed. If the
    result is complex, a diagonal imaginary part above 1e-3 raises ValueError and otherwise the
    real part is kept."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    require_finite("the statistics given to frechet_distance", mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of "
                      "cov estimates", RuntimeWarning, stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if np.abs(np.diagonal(covmean).imag).max() > 1e-3:
            raise ValueError(f"imaginary component {np.abs(covmean.imag).max()} in sqrtm")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(features, ref_mu, ref_sigma) -> float:
    """FID (or sFID, given spatial features and `mu_s`/`sigma_s`) of sample features against
    reference statistics, e.g. the ADM npz's `mu`/`sigma`."""
    mu, sigma = feature_stats(features)
    return frechet_distance(mu, sigma, ref_mu, ref_sigma)


def frechet_distance_eigh(features, ref_mu, ref_sigma, device=None) -> float:
    """FID of [N, D] features against (ref_mu, ref_sigma) without a general matrix square root.

    tr sqrtm(S1 S2) is the sum of the square roots of the eigenvalues of S1 S2 (real, >= 0 for
    PSD S1, S2), which are those of the symmetric matrix F^T S2 F for any factor S1 = F F^T:
    F = Xc^T / sqrt(N - 1) [D, N] (Xc the centred features) when N <= D, else F = V sqrt(W) from
    eigh(S1). Symmetric eigensolvers in float64 (torch, on `device`) instead of scipy's Schur-based
    sqrtm: seconds instead of minutes at D = 2048 on a CPU. Same value as `fid_from_features` up to
    rounding (tests); eigenvalues below zero from rounding are clipped where ADM drops a small
    imaginary part. For quick evaluations; reported numbers use the ADM path."""
    require_finite("the features or statistics given to frechet_distance_eigh", features, ref_mu, ref_sigma)
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64, device=device)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {tuple(x.shape)}")
    mu2 = torch.as_tensor(np.asarray(ref_mu), dtype=torch.float64, device=x.device)
    s2 = torch.as_tensor(np.asarray(ref_sigma), dtype=torch.float64, device=x.device)
    if mu2.shape != x.shape[1:] or s2.shape != (x.shape[1], x.shape[1]):
        raise ValueError(f"shape mismatch: features {tuple(x.shape)}, mu {tuple(mu2.shape)}, sigma {tuple(s2.shape)}")
    n = x.shape[0]
    mu1 = x.mean(0)
    xc = x - mu1
    if n <= x.shape[1]:
        factor = xc.T / (n - 1) ** 0.5  # [D, N]
    else:
        w, v = torch.linalg.eigh(xc.T @ xc / (n - 1))
        factor = v * w.clamp_min(0).sqrt()  # [D, D]
    eig = torch.linalg.eigvalsh(factor.T @ s2 @ factor)
    tr_covmean = eig.clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    tr1 = (xc * xc).sum() / (n - 1)
    return float(diff @ diff + tr1 + torch.trace(s2) - 2 * tr_covmean)


# ----------------------------------------------------------------------------- IS


def inception_score(
    logits_or_probs, split_size: int = 5000, *, from_logits: bool | None = None
) -> tuple[float, float]:
    """Inception score: mean and std over consecutive splits of exp(E_x KL(p(y|x) || p(y))),
    p(y) the split's mean prediction. Returns (mean, std); ADM reports the mean.

    Input: [N, C] logits (softmax applied here, in float64) or probabilities. from_logits=None
    guesses: probabilities if every row is non-negative and sums to 1 within 1e-3. 0 log 0 = 0.
    Splits are consecutive (no shuffle) and the last may be short, as in ADM. Consecutive splits
    make the score depend on order: the split's p(y) must be spread over classes, so samples
    sorted by class (e.g. generated class by class) deflate IS, since each split then covers few
    classes. Balanced labels (label = index mod 1000) give every split all classes equally.
    """
    x = np.asarray(logits_or_probs, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected [N, C], got shape {x.shape}")
    if from_logits is None:
        from_logits = not ((x >= 0).all() and np.allclose(x.sum(axis=1), 1.0, atol=1e-3))
    if from_logits:
        logp = special.log_softmax(x, axis=1)
        p = np.exp(logp)
    else:
        p = x
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        py = part.mean(axis=0, keepdims=True)
        ent = special.xlogy(part, part) if not from_logits else part * logp[i:i + split_size]
        kl = (ent - special.xlogy(part, py)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


# ----------------------------------------------------------------------------- precision/recall


def _sq_distances(u: torch.Tensor, v: torch.Tensor, fp16: bool) -> torch.Tensor:
    """Squared Euclidean distances [len(u), len(v)] as ADM's DistanceBlock computes them:
    max(|u|^2 - 2 u.v + |v|^2, 0) first with the features cast to fp16, every intermediate
    rounded to fp16 (squares, norms and the matmul accumulate in fp32 and are rounded once, as
    TF's fp16 GEMM/reductions on GPU do), and each elementwise op rounded to fp16; if any entry of
    the block is not finite (fp16 overflow), the whole block is recomputed in fp32. The result is
    fp32. fp16=False computes in fp32 directly."""
    if fp16:
        u16, v16 = u.half().float(), v.half().float()
        nu = (u16 * u16).half().float().sum(1).half()
        nv = (v16 * v16).half().float().sum(1).half()
        mm = (u16 @ v16.T).half()
        d = ((nu[:, None] - 2 * mm) + nv[None, :]).clamp_min(0)
        if bool(torch.isfinite(d).all()):
            return d.float()
    nu, nv = (u * u).sum(1), (v * v).sum(1)
    return ((nu[:, None] - 2 * (u @ v.T)) + nv[None, :]).clamp_min(0)


def _to_torch(x, device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    return t.to(device=device, dtype=torch.float32)


def manifold_radii(features, k: int = 3, batch: int = 10000, *, fp16: bool = True,
                   device=None) -> torch.Tensor:
    """[N] radius of each point: the (k+1)-th smallest squared distance to the set, the point
    itself (distance 0) included, i.e. the distance to its k-th nearest other point. ADM takes
    index k of the partitioned distance row, which is the same thing."""
    f = _to_torch(features, device)
    n = f.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} points, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=f.device)
    for r in range(0, n, batch):
        rows = f[r:r + batch]
        d = torch.cat([_sq_distances(rows, f[c:c + batch], fp16) for c in range(0, n, batch)], 1)
        radii[r:r + batch] = d.kthvalue(k + 1, dim=1).values
    return radii


def precision_recall(real, fake, k: int = 3, batch: int = 10000, *, fp16: bool = True,
                     device=None) -> tuple[float, float]:
    """Improved precision/recall (Kynkaanniemi et al.), ADM's implementation.

    precision = fraction of fake points inside some real point's k-NN ball (d <= radius),
    recall    = fraction of real points inside some fake point's k-NN ball.
    Squared distances everywhere (radii and tests), fp16 first per (batch x batch) block as in
    `_sq_distances`; batch is ADM's row and column block size (10,000). SPEC: 10K reference
    images vs the 50K samples. device: where to compute (default: the input tensor's, or CPU);
    on GPU keep TF32 matmuls off (torch.backends.cuda.matmul.allow_tf32 = False) so that the
    fp32 fallback blocks really are fp32. Memory: one [batch, N] fp32 distance block."""
    r = _to_torch(real, device)
    f = _to_torch(fake, r.device)
    rad_r = manifold_radii(r, k, batch, fp16=fp16)
    rad_f = manifold_radii(f, k, batch, fp16=fp16)
    real_in = torch.zeros(len(r), dtype=torch.bool, device=r.device)
    fake_in = torch.zeros(len(f), dtype=torch.bool, device=r.device)
    for i in range(0, len(r), batch):
        for j in range(0, len(f), batch):
            d = _sq_distances(r[i:i + batch], f[j:j + batch], fp16)
            real_in[i:i + batch] |= (d <= rad_f[None, j:j + batch]).any(1)
            fake_in[j:j + batch] |= (d <= rad_r[i:i + batch, None]).any(0)
    return fake_in.double().mean().item(), real_in.double().mean().item()


# ----------------------------------------------------------------------------- KDD


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / d + 1)^3, d the feature width; [n, d] x [m, d] -> [n, m]."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size sets: off-diagonal means of k(x, x) and k(y, y) minus
    twice the full mean of k(x, y)."""
    m = x.shape[0]
    if y.shape[0] != m or m < 2:
        raise ValueError(f"need two sets of equal size >= 2, got {x.shape[0]} and {y.shape[0]}")
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    sxx = kxx.sum() - np.trace(kxx)
    syy = kyy.sum() - np.trace(kyy)
    return float((sxx + syy) / (m * (m - 1)) - 2 * kxy.sum() / (m * m))


def kernel_distance(real, fake, n_subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """KDD (KID with DINOv2 features): mean and std over n_subsets of the unbiased MMD^2 between
    random subsets (size min(subset_size, len(real), len(fake)), drawn without replacement,
    real then fake per subset, from np.random.RandomState(seed)). Reported raw, no x1000."""
    x = np.asarray(real, dtype=np.float64)
    y = np.asarray(fake, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"features must be [N, D] with equal D, got {x.shape} and {y.shape}")
    m = min(subset_size, len(x), len(y))
    rng = np.random.RandomState(seed)
    mmds = np.empty(n_subsets)
    for i in range(n_subsets):
        xs = x[rng.choice(len(x), m, replace=False)]
        ys = y[rng.choice(len(y), m, replace=False)]
        mmds[i] = mmd2_unbiased(xs, ys)
    return float(mmds.mean()), float(mmds.std())
