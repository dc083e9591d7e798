"""Transferability estimators PARC is compared with, each batched over models (one batched
linear-algebra call per group of equal-width models) and computed in float64. Higher scores
predict better transfer for every one of them.

Definitions (numpy transcriptions in tests/selection/test_estimators.py):
  leep      LEEP (Nguyen et al. 2020). theta = source-model probabilities [N, Cs];
            P(y, z) = onehot(y)^T theta / N, P(y | z) = P(y, z) / P(z);
            LEEP = mean_i log sum_z P(y_i | z) theta_iz. A source class no sample gives any
            probability has P(z) = 0; its P(y | z) is taken as 0 (it multiplies zeros).
  nce       NCE (Tran et al. 2019), as the PARC code computes it: z = argmax theta;
            P(y, z) = counts / N + 1e-5, P(z) = counts / N + 1e-5 over the Cs source classes;
            NCE = sum P(y, z) log(P(y, z) / P(z)) (= -H(Y | Z) up to the 1e-5).
  hscore    H-score (Bao et al. 2019): tr(pinv(cov(F)) cov(g)), g_i = mean feature of i's
            class, covariances with ddof 1, pinv cutoff 1e-15 x the largest eigenvalue.
  hscore_shrinkage  the shrinkage H-score (Ibrahim et al. 2022): cov(F) replaced by the
            Ledoit-Wolf estimate (scikit-learn's formula) with shrinkage a, cov(g) by
            (1 - a) cov(g).
  logme     LogME (You et al. 2021), the fixed-point version of thuml/LogME: per class
            one-vs-rest Bayesian linear regression evidence on the SVD of F (singular values
            > 1e-10), at most 11 updates of alpha, beta (stop when alpha / beta moves < 0.1 %);
            mean evidence / N over the classes present in the labels.
  one_nn_cv leave-one-out 1-nearest-neighbour accuracy x 100 (Euclidean; ties go to the
            lower sample index).
  gbc       GBC (Pandy et al. 2022): per class present, a Gaussian with the class mean and
            per-dim variance (ddof 0, floored at 1e-4); GBC = -sum_{c1 != c2} exp(-D_B) with
            the Bhattacharyya distance D_B. gaussian="spherical" uses each class's mean
            variance and, as the authors' code does, its log-determinant term once rather
            than D times.
  transrate TransRate (Huang et al. 2022): Z = F - mean; R(Z) = 1/2 logdet(I + Z^T Z / (n eps));
            TransRate = R(Z) - mean over classes present of R(Z_c), eps = 1e-4. The scale
            1 / (n eps) is the authors' published code; the paper's formula writes d / (n eps),
            which is the same with eps / d.
Classes absent from the probe set are skipped where they would enter a mean (logme,
transrate, gbc); nce and leep sum over them harmlessly.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from .._validation import check_choice
from ._inputs import Labels, Models, as_labels, as_models, require_two_classes


def _run(models: Models, fn, what: str) -> torch.Tensor:
    """fn on each group of equally wide models, in float64. A model whose features hold NaN or
    Inf scores NaN, with a warning, as in parc (its linear algebra would fail or, for 1-NN,
    silently skip the bad entries), and the others are scored."""
    out = torch.full((len(models.tensors),), float("nan"), dtype=torch.float64, device=models.tensors[0].device)
    # one host sync for the bank, not one per model
    finite = torch.stack([torch.isfinite(t).all().to(out.device) for t in models.tensors]).cpu()
    for indices, batch in models.groups():
        keep = [j for j, i in enumerate(indices) if finite[i]]
        if keep:
            rows = torch.tensor([indices[j] for j in keep], device=out.device)
            out[rows] = fn((batch if len(keep) == len(indices) else batch[keep]).double())  # no copy when all finite
    if not finite.all():
        bad = (~finite).nonzero().flatten().tolist()
        which = "the model" if models.single else f"model(s) {bad}"
        warnings.warn(f"{what} is NaN for {which}: NaN/Inf features", RuntimeWarning, stacklevel=3)
    return out[0] if models.single else out


def _prepare(features, labels, num_classes, what, min_samples=3) -> tuple[Models, Labels]:
    models = as_models("features", features, min_samples=min_samples)
    y = as_labels(labels, models.n, num_classes, device=models.tensors[0].device)
    if y.classes is None:
        raise ValueError(f"{what} needs class-id labels [N], got a [N, C] matrix")
    require_two_classes(y, what)
    return models, y


def _class_means(f: torch.Tensor, y: Labels) -> torch.Tensor:
    """g [b, N, D]: each sample's class mean."""
    onehot = y.onehot()
    counts = onehot.sum(0).clamp_min(1)
    means = (onehot.T @ f) / counts[:, None]  # [b, C, D]
    return means[:, y.classes]


def _cov(x: torch.Tensor) -> torch.Tensor:
    c = x - x.mean(1, keepdim=True)
    return c.transpose(1, 2) @ c / (x.shape[1] - 1)


def _check_probs(models: Models) -> None:
    for i, t in enumerate(models.tensors):
        label = "probs" if models.single else f"probs[{i}]"
        if not torch.isfinite(t).all():
            raise ValueError(f"{label} holds NaN or Inf")
        if bool((t < 0).any()):
            raise ValueError(f"{label} holds negative values: pass probabilities (softmax outputs), not logits")
        sums = t.double().sum(1)
        worst = int((sums - 1).abs().argmax())
        if abs(float(sums[worst]) - 1) > 1e-3:
            raise ValueError(
                f"{label} row {worst} sums to {float(sums[worst]):.4g}, not 1: pass probabilities "
                f"(softmax outputs), not logits"
            )


def leep(probs, labels, *, num_classes: Optional[int] = None) -> torch.Tensor:
    """LEEP score(s) from source-model probabilities [N, Cs] / [B, N, Cs] / list (see the module
    docstring). Returns float64, 0-d for one model."""
    models, y = _prepare(probs, labels, num_classes, "LEEP", min_samples=1)
    _check_probs(models)
    onehot = y.onehot()

    def score(theta):
        joint = onehot.T @ theta  # [b, C, Cs], unnormalised
        marginal = theta.sum(1, keepdim=True)  # [b, 1, Cs]
        conditional = torch.where(marginal > 0, joint / marginal.clamp_min(1e-300), torch.zeros_like(joint))
        eep = (conditional[:, y.classes] * theta).sum(-1)  # [b, N]
        return eep.log().mean(1)

    return _run(models, score, "LEEP")


def nce(probs, labels, *, num_classes: Optional[int] = None) -> torch.Tensor:
    """NCE score(s) from source-model probabilities (only their argmax is used)."""
    models, y = _prepare(probs, labels, num_classes, "NCE", min_samples=1)
    C = y.num_classes

    def score(theta):
        b, n, cs = theta.shape
        z = theta.argmax(-1)  # [b, N]
        flat = (torch.arange(b, device=z.device)[:, None] * C + y.classes[None, :]) * cs + z
        counts = torch.zeros(b * C * cs, dtype=torch.float64, device=z.device)
        counts.index_add_(0, flat.flatten(), torch.ones(flat.numel(), dtype=torch.float64, device=z.device))
        counts = counts.view(b, C, cs)
        joint = counts / n + 1e-5
        marginal = counts.sum(1, keepdim=True) / n + 1e-5
        return (joint * (joint / marginal).log()).sum((1, 2))

    return _run(models, score, "NCE")


def hscore(features, labels, *, num_classes: Optional[int] = None) -> torch.Tensor:
    """H-score(s): tr(pinv(cov(F)) cov(g))."""
    models, y = _prepare(features, labels, num_classes, "H-score")

    def score(f):
        pinv = torch.linalg.pinv(_cov(f), rtol=1e-15, hermitian=True)
        return (pinv * _cov(_class_means(f, y))).sum((1, 2))  # tr(A B) for symmetric B

    return _run(models, score, "H-score")


def ledoit_wolf(f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ledoit-Wolf shrunk covariance [b, D, D] (population) and shrinkage [b], by
    scikit-learn's formula (sklearn.covariance.ledoit_wolf_shrinkage)."""
    b, n, p = f.shape
    x = f - f.mean(1, keepdim=True)
    emp = x.transpose(1, 2) @ x / n
    trace = x.pow(2).sum(1) / n  # [b, p] diagonal of emp
    mu = trace.sum(1) / p
    x2 = x.pow(2)
    beta_ = (x2.transpose(1, 2) @ x2).sum((1, 2))
    delta_ = (x.transpose(1, 2) @ x).pow(2).sum((1, 2)) / n**2
    beta = (beta_ / n - delta_) / (p * n)
    delta = (delta_ - 2 * mu * trace.sum(1) + p * mu**2) / p
    beta = torch.minimum(beta, delta)
    shrinkage = torch.where(beta == 0, torch.zeros_like(beta), beta / delta)
    if p == 1:
        shrinkage = torch.zeros_like(shrinkage)
    eye = torch.eye(p, dtype=f.dtype, device=f.device)
    cov = (1 - shrinkage)[:, None, None] * emp + (shrinkage * mu)[:, None, None] * eye
    return cov, shrinkage


def hscore_shrinkage(features, labels, *, num_classes: Optional[int] = None) -> torch.Tensor:
    """Shrinkage H-score(s): tr(pinv(cov_LW(F)) (1 - a) cov(g))."""
    models, y = _prepare(features, labels, num_classes, "H-score")

    def score(f):
        cov, a = ledoit_wolf(f)
        pinv = torch.linalg.pinv(cov, rtol=1e-15, hermitian=True)
        return (1 - a) * (pinv * _cov(_class_means(f, y))).sum((1, 2))

    return _run(models, score, "shrinkage H-score")


def logme(features, labels, *, num_classes: Optional[int] = None) -> torch.Tensor:
    """LogME score(s) (fixed-point iteration, as thuml/LogME)."""
    models, y = _prepare(features, labels, num_classes, "LogME")
    present = y.present()
    targets = (y.classes[:, None] == present[None, :]).double()  # [N, C'] one-vs-rest

    def score(f):
        b, n, d = f.shape
        u, s, _ = torch.linalg.svd(f, full_matrices=False)
        keep = s > 1e-10
        sigma = (s * keep)[:, :, None].pow(2)  # [b, k, 1]; dropped values contribute 0 ...
        x = (u * keep[:, None, :]).transpose(1, 2) @ targets  # [b, k, C']
        x2 = x.pow(2)
        res_x2 = targets.pow(2).sum(0) - x2.sum(1)  # [b, C']
        alpha, beta = torch.ones_like(res_x2), torch.ones_like(res_x2)
        last_m2, last_res2 = torch.zeros_like(res_x2), torch.zeros_like(res_x2)  # of the last update
        active = torch.ones_like(res_x2, dtype=torch.bool)
        mask = keep[:, :, None].double()  # ... and are left out of gamma and the log terms
        for _ in range(11):  # thuml: "should converge after at most 10 steps"
            t = (alpha / beta)[:, None, :]
            gamma = (mask * sigma / (sigma + t)).sum(1)
            m2 = (sigma * x2 / (t + sigma).pow(2)).sum(1)
            res2 = (x2 / (1 + sigma / t).pow(2)).sum(1) + res_x2
            new_alpha = gamma / (m2 + 1e-5)
            new_beta = (n - gamma) / (res2 + 1e-5)
            alpha, beta = torch.where(active, new_alpha, alpha), torch.where(active, new_beta, beta)
            last_m2, last_res2 = torch.where(active, m2, last_m2), torch.where(active, res2, last_res2)
            converged = ((alpha / beta - t[:, 0]).abs() / t[:, 0]) <= 1e-3
            active = active & ~converged
            if not bool(active.any()):
                break
        logs = (mask * torch.log(alpha[:, None, :] + beta[:, None, :] * sigma)).sum(1)
        evidence = (
            d / 2 * alpha.log()
            + n / 2 * beta.log()
            - 0.5 * logs
            - beta / 2 * last_res2
            - alpha / 2 * last_m2
            - n / 2 * math.log(2 * math.pi)
        ) / n
        return evidence.mean(1)

    return _run(models, score, "LogME")


def one_nn_cv(features, labels, *, num_classes: Optional[int] = None, rows_per_chunk: int = 1024) -> torch.Tensor:
    """Leave-one-out 1-NN accuracy x 100 (Euclidean distance)."""
    models, y = _prepare(features, labels, num_classes, "1-NN CV")

    def score(f):
        b, n, _ = f.shape
        hits = torch.zeros(b, dtype=torch.float64, device=f.device)
        for i0 in range(0, n, rows_per_chunk):
            dist = torch.cdist(f[:, i0 : i0 + rows_per_chunk], f)  # [b, c, N]
            rows = torch.arange(i0, min(n, i0 + rows_per_chunk), device=f.device)
            dist[:, rows - i0, rows] = float("inf")  # leave the sample itself out
            nearest = dist.argmin(-1)  # first index among ties
            hits += (y.classes[nearest] == y.classes[rows][None, :]).double().sum(1)
        return 100.0 * hits / n

    return _run(models, score, "1-NN accuracy")


GAUSSIANS = ("diagonal", "spherical")


def gbc(features, labels, *, num_classes: Optional[int] = None, gaussian: str = "diagonal") -> torch.Tensor:
    """GBC score(s): -sum over pairs of distinct classes of the Bhattacharyya coefficient."""
    check_choice("gaussian", gaussian, GAUSSIANS)
    models, y = _prepare(features, labels, num_classes, "GBC")
    present, inverse = torch.unique(y.classes, return_inverse=True)
    member = (inverse[None, :] == torch.arange(present.numel(), device=inverse.device)[:, None]).double()  # [C', N]
    counts = member.sum(1)[:, None]

    def score(f):
        mean = member @ f / counts  # [b, C', D]
        var = (member @ (f - mean[:, inverse]).pow(2) / counts).clamp_min(1e-4)
        if gaussian == "spherical":
            var = var.mean(-1, keepdim=True)
        avg = (var[:, :, None] + var[:, None, :]) / 2  # [b, C', C', D or 1]
        diff2 = (mean[:, :, None] - mean[:, None, :]).pow(2)
        log_var = var.log()
        distance = (diff2 / avg).sum(-1) / 8 + 0.5 * (
            avg.log().sum(-1) - 0.5 * log_var.sum(-1)[:, :, None] - 0.5 * log_var.sum(-1)[:, None, :]
        )
        coefficient = torch.exp(-distance)
        off_diagonal = 1 - torch.eye(present.numel(), dtype=f.dtype, device=f.device)
        return -(coefficient * off_diagonal).sum((1, 2))

    return _run(models, score, "GBC")


def _coding_rate(z: torch.Tensor, n: int, eps: float) -> torch.Tensor:
    """1/2 logdet(I + Z^T Z / (n eps)) for z [b, n, d], via the smaller Gram matrix."""
    gram = z.transpose(1, 2) @ z if z.shape[2] <= z.shape[1] else z @ z.transpose(1, 2)
    eye = torch.eye(gram.shape[-1], dtype=z.dtype, device=z.device)
    chol = torch.linalg.cholesky(eye + gram / (n * eps))
    return chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)  # = 1/2 logdet


def transrate(features, labels, *, num_classes: Optional[int] = None, eps: float = 1e-4) -> torch.Tensor:
    """TransRate score(s): R(Z) - mean_c R(Z_c)."""
    models, y = _prepare(features, labels, num_classes, "TransRate")
    present = y.present().tolist()

    def score(f):
        z = f - f.mean(1, keepdim=True)
        total = _coding_rate(z, z.shape[1], eps)
        within = torch.zeros_like(total)
        for c in present:
            zc = z[:, y.classes == c]
            within += _coding_rate(zc, zc.shape[1], eps)
        return total - within / len(present)

    return _run(models, score, "TransRate")
