"""Reference model-selection ops (maths: docs/selection.md; API docs:
pykernels/selection/correlation.py): the definitions, written plainly, in the
input's dtype (float64 in tests)."""

from __future__ import annotations

import torch

DUPLICATE_GATE = 0.999  # kDuplicateGate in csrc/core/parc.h: only saves work


def normalized_rows(features: torch.Tensor) -> torch.Tensor:
    """Each row centred on its mean and scaled to unit norm, with the statistics in float64 (as
    every kernel computes them) and the result in the input's dtype. NaN rows where that is
    undefined: a constant row (every value equal: decided on the values, never on how the mean
    rounds), a non-finite value, or a centred norm that is 0 or overflows in float64."""
    x = features.double()
    centred = x - x.mean(-1, keepdim=True)
    norm = centred.norm(dim=-1, keepdim=True)
    varies = (x != x[..., :1]).any(-1, keepdim=True)
    valid = varies & (norm > 0) & torch.isfinite(norm)
    return torch.where(valid, centred / norm, torch.full_like(centred, float("nan"))).to(features.dtype)


def correlations(z: torch.Tensor, rows_per_chunk: int = 64) -> torch.Tensor:
    """z z^T for normalised rows z [..., N, D], each entry summed on its own over D in one fixed
    order, so equal pairs of rows give bit-equal values wherever they sit (a blocked matmul
    rounds by position). Bit-equal rows (duplicated samples) correlate exactly 1, exact
    negatives exactly -1, instead of 1 +- a few ulps that would split ties."""
    chunks = []
    for i in range(0, z.shape[-2], rows_per_chunk):
        zi = z[..., i : i + rows_per_chunk, None, :]
        zj = z[..., None, :, :]
        r = (zi * zj).sum(-1)
        r = torch.where((r >= DUPLICATE_GATE) & (zi == zj).all(-1), torch.ones_like(r), r)
        r = torch.where((r <= -DUPLICATE_GATE) & (zi == -zj).all(-1), -torch.ones_like(r), r)
        chunks.append(r)
    return torch.cat(chunks, dim=-2) if chunks else z.new_empty(z.shape[:-1] + (z.shape[-2],))


def pairwise_corr_distance(features: torch.Tensor, triu: bool = False) -> torch.Tensor:
    """1 - Pearson correlation between the rows of features [B, N, D], the correlation clipped
    to [-1, 1] as np.corrcoef does. [B, N, N] with a zero diagonal, or the strict upper
    triangle [B, N(N-1)/2] in row-major order."""
    z = normalized_rows(features)
    dist = 1 - correlations(z).clamp(-1, 1)
    n = features.shape[-2]
    undefined = torch.isnan(z[..., 0])
    diagonal = torch.where(undefined, torch.full_like(undefined, float("nan"), dtype=dist.dtype), 0)
    dist.diagonal(dim1=-2, dim2=-1).copy_(diagonal)
    if not triu:
        return dist
    i, j = torch.triu_indices(n, n, 1, device=features.device)
    return dist[..., i, j]


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, tied values sharing the mean of their ranks (scipy's
    rankdata(method="average")), in float64."""
    _, inverse, counts = torch.unique(values, sorted=True, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2  # mean of ranks end - count + 1 .. end
    return mean_rank[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman's rho of each row of x [B, M] with the same row of y, with average ranks for
    ties; NaN for a row holding a NaN or a constant side (as scipy.stats.spearmanr)."""
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for b in range(x.shape[0]):
        if torch.isnan(x[b]).any() or torch.isnan(y[b]).any() or x.shape[1] < 2:
            out[b] = float("nan")
            continue
        rx = average_ranks(x[b])
        ry = average_ranks(y[b])
        cx, cy = rx - rx.mean(), ry - ry.mean()
        out[b] = (cx * cy).sum() / torch.sqrt((cx * cx).sum() * (cy * cy).sum())
    return out


def parc_spearman(features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """PARC's correlation before the factor 100: Spearman between the feature distances of every
    pair of samples (float64) and the label distance, 0 for a same-class pair and 1 otherwise
    (any two increasing values give the same ranks). NaN for a model with an undefined row."""
    dist = pairwise_corr_distance(features.double(), triu=True)
    n = features.shape[-2]
    i, j = torch.triu_indices(n, n, 1, device=features.device)
    different = (classes[i] != classes[j]).double()
    return spearman(dist, different.expand_as(dist))


def pairwise_corr_distance_backward(features: torch.Tensor, triu: bool, grad: torch.Tensor) -> torch.Tensor:
    """Gradient of pairwise_corr_distance w.r.t. features [B, N, D], given the output's gradient.

    d = 1 - clip(z z^T) with z the normalised rows: dL/dr = -grad off the diagonal and inside
    the clip, dL/dz = (G + G^T) z, then back through the row scaling and centring.
    """
    n = features.shape[-2]
    if triu:
        full = grad.new_zeros(grad.shape[:-1] + (n, n))
        i, j = torch.triu_indices(n, n, 1, device=grad.device)
        full[..., i, j] = grad
        grad = full
    centred = features - features.mean(-1, keepdim=True)
    norm = centred.norm(dim=-1, keepdim=True)
    z = centred / norm
    r = z @ z.transpose(-1, -2)
    inside = (r > -1) & (r < 1)
    inside.diagonal(dim1=-2, dim2=-1).fill_(False)  # the diagonal is the constant 0
    g_r = torch.where(inside, -grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
    g_z = (g_r + g_r.transpose(-1, -2)) @ z
    g_centred = (g_z - z * (z * g_z).sum(-1, keepdim=True)) / norm
    return g_centred - g_centred.mean(-1, keepdim=True)
