"""Straightforward numpy transcriptions, one model at a time, of the estimators' definitions
(pykernels/selection/estimators.py) and of the reference PARC code path (dbolya/parc,
methods.PARC + feature_reduce): what the batched torch versions are tested against."""

import importlib.util

import numpy as np
import pytest

# For the tests that need scikit-learn (the reference PARC path, the Ledoit-Wolf transcription)
# or scipy; a module-level skip would hide every other test of the file as well.
requires_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None, reason="needs scikit-learn (pip install pykernels[selection])"
)
requires_scipy = pytest.mark.skipif(
    importlib.util.find_spec("scipy") is None, reason="needs scipy (pip install pykernels[selection])"
)


def leep(theta, y, n_y):
    joint = np.eye(n_y)[y].T @ theta
    marginal = theta.sum(0)
    conditional = np.divide(joint, marginal[None, :], out=np.zeros_like(joint), where=marginal[None, :] > 0)
    return np.log((conditional[y] * theta).sum(-1)).sum() / theta.shape[0]


def nce(theta, y, n_y, eps=1e-5):
    z = theta.argmax(-1)
    n, n_z = theta.shape
    joint = (np.eye(n_y)[y].T @ np.eye(n_z)[z]) / n + eps
    marginal = np.eye(n_z)[z].sum(0) / n + eps
    return (joint * np.log(joint / marginal[None, :])).sum()


def _class_means(f, y):
    g = np.zeros_like(f)
    for c in np.unique(y):
        g[y == c] = f[y == c].mean(0)
    return g


def hscore(f, y):
    return np.trace(np.linalg.pinv(np.cov(f, rowvar=False), rcond=1e-15) @ np.cov(_class_means(f, y), rowvar=False))


def hscore_shrinkage(f, y):
    from sklearn.covariance import LedoitWolf

    lw = LedoitWolf().fit(f)
    return np.trace(
        np.linalg.pinv(lw.covariance_, rcond=1e-15) @ ((1 - lw.shrinkage_) * np.cov(_class_means(f, y), rowvar=False))
    )


def logme(f, y):
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    k = int((s > 1e-10).sum())
    u, sigma = u[:, :k], (s[:k] ** 2)
    evidences = []
    for c in np.unique(y):
        t_y = (y == c).astype(np.float64)
        x2 = (u.T @ t_y) ** 2
        res_x2 = (t_y**2).sum() - x2.sum()
        alpha, beta = 1.0, 1.0
        for _ in range(11):
            t = alpha / beta
            gamma = (sigma / (sigma + t)).sum()
            m2 = (sigma * x2 / (t + sigma) ** 2).sum()
            res2 = (x2 / (1 + sigma / t) ** 2).sum() + res_x2
            alpha = gamma / (m2 + 1e-5)
            beta = (n - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - t) / t <= 1e-3:
                break
        evidence = (
            d / 2 * np.log(alpha)
            + n / 2 * np.log(beta)
            - 0.5 * np.sum(np.log(alpha + beta * sigma))
            - beta / 2 * res2
            - alpha / 2 * m2
            - n / 2 * np.log(2 * np.pi)
        )
        evidences.append(evidence / n)
    return np.mean(evidences)


def one_nn_cv(f, y):
    dist = np.sqrt(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    return 100 * (y[dist.argmin(1)] == y).mean()


def gbc(f, y, gaussian="diagonal"):
    stats = {}
    for c in np.unique(y):
        part = f[y == c]
        var = np.maximum(part.var(0), 1e-4)
        stats[c] = (part.mean(0), var.mean() if gaussian == "spherical" else var)
    total = 0.0
    for c1 in stats:
        for c2 in stats:
            if c1 == c2:
                continue
            (m1, v1), (m2, v2) = stats[c1], stats[c2]
            avg = (v1 + v2) / 2
            distance = np.sum((m1 - m2) ** 2 / avg) / 8 + 0.5 * (
                np.sum(np.log(avg)) - 0.5 * np.sum(np.log(v1)) - 0.5 * np.sum(np.log(v2))
            )
            total += np.exp(-distance)
    return -total


def _coding_rate(z, eps):
    n, d = z.shape
    return 0.5 * np.linalg.slogdet(np.eye(d) + z.T @ z / (n * eps))[1]


def transrate(f, y, eps=1e-4):
    z = f - f.mean(0, keepdims=True)
    classes = np.unique(y)
    return _coding_rate(z, eps) - sum(_coding_rate(z[y == c], eps) for c in classes) / len(classes)


def reference_parc(features, y, num_classes, n_dims=32):
    """methods.PARC(n_dims)(features=..., y=...) of the reference code, step by step."""
    import scipy.stats
    import sklearn.decomposition
    import sklearn.preprocessing

    if n_dims is not None:
        if n_dims > features.shape[0]:
            n_dims = features.shape[0]
        features = sklearn.decomposition.PCA(
            n_components=n_dims, svd_solver="randomized", random_state=1919, iterated_power=1
        ).fit_transform(features)
    labels = np.eye(num_classes)[y] if y.ndim == 1 else y
    feats = sklearn.preprocessing.StandardScaler().fit_transform(features)
    rdm1 = 1 - np.corrcoef(feats)
    rdm2 = 1 - np.corrcoef(labels)
    upper = np.triu_indices(rdm1.shape[0], 1)
    return scipy.stats.spearmanr(rdm1[upper], rdm2[upper])[0] * 100
