"""PARC (Bolya, Mittapalli, Hoffman: "Scalable Diverse Model Selection for Accessible Transfer
Learning", NeurIPS 2021), batched over a bank of models, with two modes.

The method, as the paper's code (dbolya/parc, methods.PARC) computes it for features F [N, D]:
  1. PCA to f = pca_dim dims (32, the paper's "PARC f=32"; f = N if f > N; None skips it);
  2. StandardScaler on the reduced features (per column, mean 0, population std 1);
  3. rdm1 = 1 - corrcoef(rows): 1 - Pearson between samples across the f dims;
  4. rdm2 = 1 - corrcoef(onehot(y)) (one-hot over all num_classes), or the multi-hot / soft
     matrix as given;
  5. 100 * Spearman(strict upper triangles of rdm1 and rdm2).

mode="exact" (default): what the method means, deterministically.
  - PCA: eigendecomposition in float64 of the covariance (of the Gram matrix when D > N),
    each component's sign fixed so that its largest-magnitude loading is positive (the row-wise
    centring of step 3 is not sign-invariant: signs move PARC by ~0.2 points). Components beyond
    the features' numerical rank (eigenvalue <= max * max(N, D) * eps) are set to 0 rather than
    scaled up to unit-variance rounding noise.
  - StandardScaler in float64 (a constant column is left at 0, as scikit-learn does).
  - Distances in float64; with class-id labels the label distance is two-valued (0 / C/(C-1)),
    and the fused kernel (pykernels.parc_spearman) ranks only the feature side. A matrix of
    labels gets float64 label distances rounded to 12 decimals, which merges the rounding noise
    of values that are equal in exact arithmetic.
mode="reference": the reference code's numbers (to ~1e-6 of a point).
  - scikit-learn's PCA(n_components=f, svd_solver="randomized", random_state=1919,
    iterated_power=1) on the features in their dtype (float32 probes stay float32: PCA in
    float64 instead moves scores by ~1e-5), then scikit-learn's StandardScaler;
  - rdm2 computed by numpy exactly as the reference does, float noise included: in floating
    point 1 - corrcoef(onehot) is not two-valued (1.0277777777777777 next to 1.027777777777778
    for 37 classes), and the reference ranks those as distinct values;
  - Spearman of the two rank vectors (float64, exact ranks).
  Needs scikit-learn and scipy (pip install pykernels[selection]).

How far apart the modes are, on the tests' synthetic probes (N = 300; checked by
tests/selection/test_parc.py::test_how_far_apart_the_modes_are): with 37 classes and no PCA the
label noise alone puts exact at 18.7-20.4 and reference at 5.3-8.1, 10.7-13.7 points lower
(seeds 11-15); with 10 classes the label noise is harmless and randomized vs full PCA (D = 64
to 32) moves scores by up to 0.44 point (seeds 0-5). Rankings of models are what matter:
compare models within one mode.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Union

import numpy as np
import torch

from .._validation import check_choice
from ._inputs import Labels, as_labels, as_models
from .correlation import pairwise_corr_distance, parc_spearman, spearman

MODES = ("exact", "reference")
DEFAULT_PCA_DIM = 32
REFERENCE_SEED = 1919
_LABEL_DECIMALS = 12
_PAIR_BYTES_PER_CALL = 1 << 30  # distances materialised at once on the general path

FeaturesLike = Union[torch.Tensor, np.ndarray, Sequence[Union[torch.Tensor, np.ndarray]]]


# With 2 dims, every centred row is a multiple of (1, -1): each correlation is +-1, each distance
# 0 or 2, and the ranks of those ties are decided by rounding. 3 dims is the least that measures.
MIN_DIMS = 3


def _check_pca_dim(pca_dim) -> Optional[int]:
    if pca_dim is None:
        return None
    if isinstance(pca_dim, bool) or not isinstance(pca_dim, (int, np.integer)) or pca_dim < MIN_DIMS:
        raise ValueError(
            f"pca_dim must be an int >= {MIN_DIMS} or None (no PCA), got {pca_dim!r}: with 2 dims "
            f"every correlation is +-1 and rounding decides the ranks"
        )
    return int(pca_dim)


def exact_pca(x: torch.Tensor, dims: int) -> torch.Tensor:
    """Projections of x [b, N, D] onto its top `dims` principal components, in float64: full
    eigendecomposition, sign convention "largest-magnitude loading positive", components beyond
    the numerical rank set to 0. A model with NaN / Inf features gets NaN projections."""
    b, n, d = x.shape
    centred = x.to(torch.float64, copy=True)
    centred -= centred.mean(1, keepdim=True)
    features_side = d <= n  # eigendecompose the smaller of X^T X (D x D) and X X^T (N x N)
    values, vectors, finite = _top_eigenpairs(centred, dims, features_side)
    if features_side:
        loadings = vectors
    else:  # loadings = X^T u / sqrt(lambda)
        loadings = (centred.transpose(1, 2) @ vectors) / values.clamp_min(torch.finfo(torch.float64).tiny).sqrt()[
            :, None, :
        ]
    kept = values > values[:, :1].clamp_min(0) * max(n, d) * torch.finfo(torch.float64).eps
    top = loadings.abs().argmax(1, keepdim=True)
    signs = torch.where(loadings.gather(1, top) < 0, -1.0, 1.0).to(loadings.dtype)
    projected = centred @ (loadings * signs * kept[:, None, :])
    if bool(finite.all()):
        return projected
    return torch.where(finite[:, None, None], projected, torch.full_like(projected, float("nan")))


def _one_blas_thread():
    """Limits numpy's BLAS to one thread (threadpoolctl, a scikit-learn dependency), so that the
    helper thread's matmul and the LAPACK call each keep one core instead of fighting for both."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _top_eigenpairs(centred: torch.Tensor, k: int, features_side: bool):
    """Top-k eigenvalues [b, k] (descending), eigenvectors [b, m, k] of each model's X^T X
    (features_side) or X X^T, and which models were finite [b]. A NaN / Inf feature makes a
    diagonal entry (a sum of squares) non-finite; LAPACK would fail on such a matrix, so it is
    replaced by zeros.

    On the CPU with scipy, LAPACK's dsyevr computes only the k pairs wanted (about half the time
    of a full eigendecomposition at 512 x 512), model by model, while a helper thread computes
    the next models' matrices with numpy (which, unlike the LAPACK call, releases the GIL).
    Elsewhere torch.linalg.eigh computes all pairs. Either is exact up to rounding."""
    gram = lambda a: np.matmul(a.T, a) if features_side else np.matmul(a, a.T)
    scipy_eigh = None
    if centred.device.type == "cpu" and not centred.requires_grad:
        try:
            from scipy.linalg import eigh as scipy_eigh
        except ImportError:
            pass
    if scipy_eigh is None:
        sym = centred.transpose(1, 2) @ centred if features_side else centred @ centred.transpose(1, 2)
        finite = torch.isfinite(sym.diagonal(dim1=1, dim2=2).sum(-1))
        sym = torch.where(finite[:, None, None], sym, torch.zeros((), dtype=sym.dtype, device=sym.device))
        values, vectors = torch.linalg.eigh(sym)  # ascending
        return values.flip(-1)[:, :k], vectors.flip(-1)[:, :, :k], finite
    arrays = centred.numpy()
    m = arrays.shape[2] if features_side else arrays.shape[1]
    values, vectors, finite = [], [], []
    with _one_blas_thread(), ThreadPoolExecutor(1) as pool:  # two single-threaded streams, one per core
        ahead = [pool.submit(gram, a) for a in arrays[:2]]  # at most two matrices in flight
        for i in range(len(arrays)):
            sym = ahead.pop(0).result()
            if i + 2 < len(arrays):
                ahead.append(pool.submit(gram, arrays[i + 2]))
            ok = bool(np.isfinite(np.trace(sym)))
            w, v = scipy_eigh(
                sym if ok else np.zeros_like(sym), subset_by_index=[m - k, m - 1], driver="evr", check_finite=False
            )
            values.append(w[::-1])
            vectors.append(v[:, ::-1])
            finite.append(ok)
    return torch.from_numpy(np.stack(values)), torch.from_numpy(np.stack(vectors)), torch.tensor(finite)


def standard_scale(x: torch.Tensor) -> torch.Tensor:
    """Per column of x [b, N, f]: mean 0, population std 1; a constant column stays at 0."""
    var, mean = torch.var_mean(x, dim=1, keepdim=True, correction=0)
    # One new tensor, divided in place: a second [b, N, f] temporary costs more than the
    # arithmetic (a fresh multi-MB allocation is page faults); the values are the same.
    return torch.sub(x, mean).div_(torch.where(var > 0, var.sqrt(), torch.ones_like(var)))


def _reference_reduce(x: torch.Tensor, dims: Optional[int]) -> torch.Tensor:
    """The reference pipeline for one model [N, D]: sklearn randomized PCA (input dtype), sklearn
    StandardScaler; float64 result."""
    try:
        from sklearn.decomposition import PCA
        from sklearn.preprocessing import StandardScaler
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("mode='reference' needs scikit-learn: pip install pykernels[selection]") from exc
    f = x.detach().cpu().numpy()
    if dims is not None:
        f = PCA(
            n_components=dims, svd_solver="randomized", random_state=REFERENCE_SEED, iterated_power=1
        ).fit_transform(f)
    f = StandardScaler().fit_transform(f)
    return torch.from_numpy(np.asarray(f, dtype=np.float64)).to(x.device)


def reference_label_distances(labels: Labels) -> np.ndarray:
    """Strict upper triangle of 1 - np.corrcoef(onehot(y)), computed as the reference does."""
    onehot = (
        np.eye(labels.num_classes)[labels.classes.cpu().numpy()]
        if labels.matrix is None
        else labels.matrix.cpu().numpy()
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        rdm2 = 1 - np.corrcoef(onehot)
    return rdm2[np.triu_indices(onehot.shape[0], 1)]


def _exact_label_distances(labels: Labels) -> torch.Tensor:
    d = pairwise_corr_distance(labels.matrix, triu=True)
    scale = 10.0**_LABEL_DECIMALS
    return torch.round(d * scale) / scale


def _check_label_side(labels: Labels) -> Labels:
    """Errors for labels that leave PARC undefined; a one-hot matrix becomes class ids."""
    if labels.matrix is not None:
        m = labels.matrix
        if bool(((m == 0) | (m == 1)).all()) and bool((m.sum(1) == 1).all()):
            return Labels(m.argmax(1), None, m.shape[1])
        constant = (m == m[:, :1]).all(1)
        if bool(constant.any()):
            row = int(constant.nonzero()[0])
            raise ValueError(
                f"labels row {row} is constant (no class, or every class): its correlation with other "
                f"rows, and so PARC's label distance, is undefined"
            )
        return labels
    counts = torch.bincount(labels.classes)
    counts = counts[counts > 0]
    if counts.numel() < 2:
        raise ValueError("labels hold a single class; PARC needs samples of at least two classes")
    if int(counts.max()) < 2:
        raise ValueError("no two samples share a class; PARC needs at least one same-class pair")
    return labels


def parc(
    features: FeaturesLike,
    labels,
    *,
    num_classes: Optional[int] = None,
    pca_dim: Optional[int] = DEFAULT_PCA_DIM,
    mode: str = "exact",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """PARC score of each model: 100 x Spearman between pairwise feature and label distances.

    Args:
        features: one model [N, D], a batch [B, N, D], or a list of [N, D_i] (models of
            different widths); torch tensors or numpy arrays, on any device. Each row is the
            input of the model's last linear layer for one probe sample.
        labels: class ids [N] (ints in [0, num_classes)) or a multi-hot / soft matrix [N, C].
        num_classes: the target task's number of classes (the one-hot width); default
            labels.max() + 1. Only the reference mode's numbers depend on it.
        pca_dim: PCA dims (default 32, the paper's f=32; capped at N like the reference);
            None skips the PCA.
        mode: "exact" (default) or "reference"; see the module docstring.
        backend: backend of the kernels (see pykernels.backends()).

    Returns:
        float64 scores in [-100, 100], higher = predicted to transfer better: 0-d for one
        [N, D] model, else [B]. A model with NaN / Inf features, or one whose scaled features
        leave a sample constant, scores NaN with a warning.

    Raises:
        ValueError: N < 3, mismatched N, labels out of range or not matching N, a single class,
            no same-class pair, D < pca_dim, pca_dim < 3 or D < 3 (degenerate: see MIN_DIMS).
    """
    check_choice("mode", mode, MODES)
    dims = _check_pca_dim(pca_dim)
    models = as_models("features", features)
    n = models.n
    y = _check_label_side(as_labels(labels, n, num_classes, device=models.tensors[0].device))
    k = None if dims is None else min(dims, n)
    for i, t in enumerate(models.tensors):
        label = "features" if models.single else f"features[{i}]"
        if k is not None and t.shape[1] < k:
            raise ValueError(
                f"{label} has D={t.shape[1]} feature dims, fewer than pca_dim={k}; pass "
                f"pca_dim <= {t.shape[1]} or pca_dim=None"
            )
        if t.shape[1] < MIN_DIMS:
            raise ValueError(
                f"{label} has D={t.shape[1]} feature dims; PARC needs at least {MIN_DIMS} (with 2 "
                f"every correlation is +-1 and rounding decides the ranks)"
            )

    label_distances = None
    if mode == "reference":
        label_distances = torch.from_numpy(reference_label_distances(y)).to(models.tensors[0].device)
    elif y.matrix is not None:
        label_distances = _exact_label_distances(y)

    out = torch.full((len(models.tensors),), float("nan"), dtype=torch.float64, device=models.tensors[0].device)
    for indices, batch in models.groups():
        if mode == "reference":  # scikit-learn refuses NaN / Inf: such models are left at NaN
            keep = [j for j, f in enumerate(batch) if bool(torch.isfinite(f).all())]
            if not keep:
                continue
            reduced = torch.stack([_reference_reduce(batch[j], k) for j in keep])
            indices = [indices[j] for j in keep]
        else:
            # A NaN / Inf feature spreads NaN through PCA and scaling to every sample of its model,
            # which the kernels score NaN: no separate finiteness pass over the features.
            reduced = standard_scale(exact_pca(batch, k) if k is not None else batch.double())
        if label_distances is None:
            scores = parc_spearman(reduced, y.classes, backend=backend)
        else:
            scores = _spearman_chunks(reduced, label_distances, backend)
        out[torch.tensor(indices, device=out.device)] = scores
    _warn_nan(out, models)
    return 100.0 * (out[0] if models.single else out)


def _spearman_chunks(reduced: torch.Tensor, label_distances: torch.Tensor, backend) -> torch.Tensor:
    n = reduced.shape[1]
    per_model = max(1, n * (n - 1) // 2 * 8)
    step = max(1, _PAIR_BYTES_PER_CALL // per_model)
    parts = []
    for start in range(0, reduced.shape[0], step):
        dist = pairwise_corr_distance(reduced[start : start + step], triu=True, backend=backend)
        parts.append(spearman(dist, label_distances, backend=backend))
    return torch.cat(parts)


def _warn_nan(out: torch.Tensor, models) -> None:
    nan = torch.isnan(out).nonzero().flatten().tolist()
    if not nan:
        return
    non_finite = [i for i in nan if not bool(torch.isfinite(models.tensors[i]).all())]
    which = "the model" if models.single else f"model(s) {nan}"
    causes = []
    if non_finite:
        causes.append("NaN/Inf features" + ("" if models.single else f" in {non_finite}"))
    if set(nan) - set(non_finite):
        causes.append("a sample whose reduced, scaled features are constant (its correlation is undefined)")
    warnings.warn(f"PARC is NaN for {which}: {'; '.join(causes)}", RuntimeWarning, stacklevel=3)


# The reference code's target datasets and their class counts (constants.num_classes).
REFERENCE_NUM_CLASSES = {
    "nabird": 555,
    "oxford_pets": 37,
    "cub200": 200,
    "caltech101": 101,
    "stanford_dogs": 120,
    "voc2007": 21,
    "cifar10": 10,
    "imagenet": 1000,
}


class PARC:
    """Drop-in for the reference code's `methods.PARC`: the same constructor and call signature.

        method = PARC(n_dims=32)
        score = method(features=feats, probs=probs, y=y, target_dataset="cifar10")

    Unlike the reference, no TransferabilityMethod base or constants module is needed: the
    number of classes comes from `num_classes`, else the reference's table for a known
    `target_dataset`, else y.max() + 1. `mode` defaults to "reference" so that the numbers match
    the reference code; pass mode="exact" for the deterministic, faster path. Returns a float.
    """

    def __init__(
        self, n_dims: Optional[int] = None, fmt: str = "", *, mode: str = "reference", num_classes: Optional[int] = None
    ):
        self.n_dims = n_dims
        self.fmt = fmt  # accepted for compatibility; unused, as in the reference
        self.mode = check_choice("mode", mode, MODES)
        self.num_classes = num_classes

    def __call__(
        self,
        features,
        probs=None,
        y=None,
        source_dataset: Optional[str] = None,
        target_dataset: Optional[str] = None,
        architecture: Optional[str] = None,
        cache_path_fn=None,
    ) -> float:
        if y is None:
            raise TypeError("PARC needs the target labels y")
        num_classes = self.num_classes
        if num_classes is None and target_dataset is not None:
            num_classes = REFERENCE_NUM_CLASSES.get(target_dataset)
        y_arr = np.asarray(y)
        if y_arr.ndim == 2:
            num_classes = None  # the matrix is used as given
        return float(parc(features, y_arr, num_classes=num_classes, pca_dim=self.n_dims, mode=self.mode))
