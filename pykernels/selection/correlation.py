"""The model-selection ops: row-wise Pearson distances, Spearman correlation, and PARC's fused
distance -> rank -> correlation kernel.

pairwise_corr_distance(features)
    d_ij = 1 - r_ij, r_ij the Pearson correlation between samples i and j across the feature
    dims (each row centred on its own mean), clipped to [-1, 1] as np.corrcoef does. Batched
    over models; the strict upper triangle (M = N(N-1)/2 pairs, row-major, as
    np.triu_indices(N, 1) orders them) can be produced without the N x N matrix.

spearman(x, y)
    Spearman's rho over the last dim with average ranks for ties (scipy.stats.spearmanr). Ranks
    are exact integers (never rounded to the input dtype: float32 ranks stop being exact past
    2^24 values); correlations are computed in float64 and returned as float64. A y shared by
    every row (e.g. one label-distance vector against many models) is ranked once.

parc_spearman(features, classes)
    Spearman between the feature distances of all pairs (float64) and the label distance of
    one-hot class labels, which is two-valued: 0 for a same-class pair, C / (C - 1) otherwise.
    Only the feature side is ranked: with U the Mann-Whitney count of (different, same) pairs
    whose different-class distance is larger (ties 1/2),
        rho = (U - n0 n1 / 2) / (sqrt(n0 n1) sigma_R),  12 M sigma_R^2 = M^3 - M - sum(t^3 - t)
    over the tie groups t of the distances (n0 / n1 same / different-class pairs). The samples
    are ordered by class once per call, so every same-class pair lies in a diagonal block.
    pykernels.selection.parc multiplies by 100 and adds the PCA and scaling of the paper.

NaN: a sample whose features are constant or non-finite has no correlation with anything: its
distances are NaN (its diagonal entry too), and a model holding one gets a NaN rho. The rule is
the same on every backend: a sample is constant when all its values are equal (compared as
given, not after the mean is subtracted, so rounding of the mean cannot decide it); it is also
undefined when its centred norm is 0 or overflows in float64 (values near 1e-160 or 1e154).
Means and norms are computed in float64 for float32 input too. spearman returns NaN for a row
that holds a NaN or whose x or y is constant, and for M < 2.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import backend as _backend
from .._validation import check_tensor

_FEATURE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _feature_batch(name: str, features) -> tuple[torch.Tensor, bool]:
    """[N, D] or [B, N, D] float features -> ([B, N, D] float32/float64, had a batch dim)."""
    check_tensor(name, features, dtypes=_FEATURE_DTYPES)
    if features.dim() not in (2, 3):
        raise ValueError(f"{name} must be [N, D] or [B, N, D], got shape {tuple(features.shape)}")
    batched = features.dim() == 3
    x = features if batched else features.unsqueeze(0)
    if x.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one feature dim, got shape {tuple(features.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # float16 / bfloat16 are computed in float32
    return x.contiguous(), batched


def pairwise_corr_distance(
    features: torch.Tensor, *, triu: bool = False, backend: Optional[str] = None
) -> torch.Tensor:
    """1 - Pearson correlation between every pair of rows (samples) of each model's features.

    Args:
        features: [N, D] or [B, N, D]; float32 or float64 (float16 / bfloat16 are widened to
            float32). Differentiable (float32 / float64).
        triu: return only the strict upper triangle, [..., N(N-1)/2] in np.triu_indices order;
            the N x N matrix is never built by the compiled backends.
        backend: "reference", "cpu", "cuda" or "triton"; default: $PYKERNELS_BACKEND, else the
            fastest available for the tensors' device (pykernels.backends()).

    Returns:
        [B, N, N] (zero diagonal) or [B, N(N-1)/2], without B for 2-D input; float32, or float64
        for float64 features. Rows of a constant or non-finite sample are NaN.
    """
    x, batched = _feature_batch("features", features)
    op = _backend.resolve("pairwise_corr_distance", x.device, backend)
    out = op(x, bool(triu))
    return out if batched else out[0]


def _spearman_dtype(x: torch.Tensor, y: torch.Tensor) -> torch.dtype:
    wide = (torch.float64,) + tuple(t for t in (x.dtype, y.dtype) if not t.is_floating_point)
    return torch.float64 if x.dtype in wide or y.dtype in wide else torch.float32


def _rankable(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """values in `dtype`, keeping their order and ties exactly. 64-bit integers are replaced by
    their dense rank among all the values (float64 would merge distinct values past 2^53);
    Spearman depends only on order and ties, so the result is the same."""
    if values.dtype not in (torch.int64, torch.uint64):
        return values.to(dtype)
    flat = values.reshape(-1)
    ordered, index = torch.sort(flat)
    new_value = torch.ones_like(flat, dtype=torch.bool)
    new_value[1:] = ordered[1:] != ordered[:-1]
    codes = torch.empty(flat.shape, dtype=dtype, device=flat.device)
    return codes.scatter_(0, index, torch.cumsum(new_value, 0).to(dtype)).reshape(values.shape)


def spearman(x: torch.Tensor, y: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Spearman's rank correlation over the last dim, with average ranks for ties.

    Args:
        x: [..., M] values (float or integer; float16 / bfloat16 are ranked as float32; int64
            exactly, also past 2^53, where float64 would tie distinct values).
        y: the same shape as x, or broadcastable to it (e.g. [M] shared by every row: ranked
            once).
        backend: see pairwise_corr_distance.

    Returns:
        float64 [...]: one rho per row; NaN where a row holds a NaN, or x or y is constant, or
        M < 2 (an empty batch gives an empty result).
    """
    check_tensor("x", x)
    check_tensor("y", y, device=x.device)
    for name, t in (("x", x), ("y", y)):
        if t.is_complex():  # complex values have no order to rank by
            raise TypeError(f"{name} must be real (float or integer), got dtype {str(t.dtype).replace('torch.', '')}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dim [..., M], got a 0-d tensor")
    dtype = _spearman_dtype(x, y)
    xs, ys = _rankable(x, dtype), _rankable(y, dtype)  # before broadcasting: a shared y stays one row
    try:
        ys = ys.expand_as(xs)
    except RuntimeError:
        raise ValueError(f"y of shape {tuple(y.shape)} does not broadcast to x's shape {tuple(x.shape)}") from None
    lead, m = x.shape[:-1], x.shape[-1]
    if m < 2 or xs.numel() == 0:  # no pair of values to rank (or no rows): rho is undefined
        return torch.full(lead, float("nan"), dtype=torch.float64, device=x.device)
    xs = xs.reshape(-1, m)
    if all(ys.stride(i) == 0 or ys.shape[i] == 1 for i in range(len(lead))):
        ys = ys[(0,) * len(lead)].expand(xs.shape[0], m)  # row stride 0: the kernels rank y once
    else:
        ys = ys.reshape(-1, m)
    op = _backend.resolve("spearman", x.device, backend)
    return op(xs, ys).reshape(lead)


def parc_spearman(features: torch.Tensor, classes: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Spearman between each model's pairwise feature distances and the same/different-class
    label distances: PARC / 100, without its PCA and scaling (see pykernels.selection.parc).

    Args:
        features: [N, D] or [B, N, D] (float16 / bfloat16 widened; distances in float64).
        classes: [N] integer class ids (any values; equal ids = same class).
        backend: see pairwise_corr_distance.

    Returns:
        float64 [B] (0-d for 2-D features); NaN for a model with a constant or non-finite sample,
        or when every pair is same-class or every pair is different-class.
    """
    x, batched = _feature_batch("features", features)
    check_tensor("classes", classes, ndim=1, device=x.device, shape_doc="[N]")
    if classes.dtype.is_floating_point or classes.dtype == torch.bool:
        raise TypeError(f"classes must hold integer class ids, got dtype {str(classes.dtype).replace('torch.', '')}")
    if classes.shape[0] != x.shape[1]:
        raise ValueError(f"classes has {classes.shape[0]} labels but features have N={x.shape[1]} samples")
    ids = classes.to(torch.int64).contiguous()
    op = _backend.resolve("parc_spearman", x.device, backend)
    out = op(x, ids)
    return out if batched else out[0]
