"""Matrix-free estimators on a batch of symmetric operators H_b (one per example),
given as an object with `matvec([S, B, D]) -> [S, B, D]`, `quad([S, B, D]) -> [S, B]`
(v . H_b v), `batch`, `dim`, `dtype` and `device` (hvp.InputHessian,
hvp.ParameterHessian). Every estimator treats all B examples at once.

  hutchinson     tr H ~ mean_s v_s . H v_s over S Rademacher (or Gaussian) probes;
                 standard error = sample std / sqrt(S). Variance ~ 2 ||H||_F^2 / S.
  hutch_plus_plus  (Meyer, Musco, Musco, Woodruff 2021) S/3 probes sketch the top
                 range Q of H, tr(Q^T H Q) is exact, and Hutchinson with S/3 probes
                 projected off Q estimates the rest; the standard error is that of
                 the projected part, given the sketch.
  power          subspace iteration (k + 2 vectors) with a Rayleigh-Ritz step: the k
                 eigenvalues of largest magnitude.
  lanczos        Lanczos with full reorthogonalisation (restarted on breakdown); the
                 k Ritz values of largest magnitude.
  slq            stochastic Lanczos quadrature: nodes and weights of the spectral
                 density (Ubaru, Chen, Saad 2017).

Probes come from pykernels.probes (seed + element counter): the same seed gives
the same probes on every backend and for any chunking.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple, Optional

import torch

from . import ops


class Estimate(NamedTuple):
    """An estimate per example and its standard error (NaN when undefined)."""

    value: torch.Tensor
    stderr: torch.Tensor


ProgressFn = Optional[Callable[[int, int], None]]  # (done, total)


def draw_probes(op, count: int, seed: int, kind: str, first: int = 0) -> torch.Tensor:
    """Probes first .. first + count - 1 of the stream `seed`, shape [count, B, D]."""
    shape = (count, op.batch, op.dim)
    return ops.probe_vectors(shape, seed, kind=kind, offset=first * op.batch * op.dim, dtype=op.dtype, device=op.device)


def _mean_and_stderr(samples: torch.Tensor) -> Estimate:
    n = samples.shape[0]
    value = samples.mean(0)
    if n < 2:
        return Estimate(value, torch.full_like(value, float("nan")))
    return Estimate(value, samples.std(0) / math.sqrt(n))


def hutchinson_samples(
    op, num_probes: int, seed: int, kind: str = "rademacher", chunk: Optional[int] = None, progress: ProgressFn = None
) -> torch.Tensor:
    """The S quadratic forms v_s . H_b v_s, [S, B]."""
    chunk = chunk or num_probes
    out = []
    for s0 in range(0, num_probes, chunk):
        count = min(chunk, num_probes - s0)
        out.append(op.quad(draw_probes(op, count, seed, kind, first=s0)))
        if progress:
            progress(s0 + count, num_probes)
    return torch.cat(out)


def hutchinson(
    op,
    num_probes: int,
    seed: int = 0,
    kind: str = "rademacher",
    chunk: Optional[int] = None,
    progress: ProgressFn = None,
) -> Estimate:
    return _mean_and_stderr(hutchinson_samples(op, num_probes, seed, kind, chunk, progress))


def _per_example(V: torch.Tensor) -> torch.Tensor:
    """[S, B, D] -> [B, D, S] (columns per example)."""
    return V.permute(1, 2, 0)


def _as_vectors(M: torch.Tensor) -> torch.Tensor:
    """[B, D, S] -> [S, B, D]."""
    return M.permute(2, 0, 1).contiguous()


def _range_basis(M: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning the numerical range of each M_b [B, D, k], zero columns for
    the rest. A sketch H S is rank-deficient when two probes coincide (Rademacher probes in a few
    dims often do) or H has low rank; QR would then fill the deficient columns (and orthogonalise
    every later column against them) with directions made of rounding noise, which differ per
    backend and moved Hutch++ by up to 8%. The span of the kept singular vectors depends only on
    the range, so every backend gets the same estimate up to rounding."""
    U, sv, _ = torch.linalg.svd(M, full_matrices=False)
    tol = sv[:, :1] * max(M.shape[1], M.shape[2]) * torch.finfo(sv.dtype).eps
    return U * (sv > tol).unsqueeze(1)


def hutch_plus_plus(op, num_probes: int, seed: int = 0, kind: str = "rademacher") -> Estimate:
    sketch = min(num_probes // 3, op.dim)
    residual = num_probes - 2 * sketch
    S = draw_probes(op, sketch, seed, kind)
    Q = _range_basis(_per_example(op.matvec(S)))  # [B, D, sketch]
    Qv = _as_vectors(Q)
    top = op.quad(Qv).sum(0)  # tr(Q^T H Q), [B]: quadratic forms, which forward-adjoint computes for less
    G = _per_example(draw_probes(op, residual, seed, kind, first=sketch))
    G = _as_vectors(G - Q @ (Q.transpose(1, 2) @ G))  # projected off range(Q)
    rest = _mean_and_stderr(op.quad(G))
    return Estimate(top + rest.value, rest.stderr)


class Eigen(NamedTuple):
    values: torch.Tensor  # [B, k], largest magnitude first
    vectors: Optional[torch.Tensor]  # [B, k, D] or None
    iterations: int


def _rayleigh_ritz(V: torch.Tensor, HV: torch.Tensor):
    """Ritz values (by magnitude, descending) and vectors of the per-example
    subspaces spanned by the orthonormal columns of V [B, D, k]."""
    T = V.transpose(1, 2) @ HV
    theta, Y = torch.linalg.eigh((T + T.transpose(1, 2)) / 2)
    order = theta.abs().argsort(dim=1, descending=True)
    theta = theta.gather(1, order)
    Y = Y.gather(2, order.unsqueeze(1).expand_as(Y))
    return theta, V @ Y


def power_iteration(op, k: int, iters: int = 100, tol: float = 1e-4, seed: int = 0) -> Eigen:
    """Subspace iteration on k + 2 vectors per example (the two extra speed up
    convergence of the k-th value), with Rayleigh-Ritz every step; stops when
    every example's top k values moved by <= tol (relative). Under torch.compile it runs
    all `iters` iterations: the stopping test reads values, which would break the graph."""
    p = min(op.dim, k + 2)
    V = torch.linalg.qr(_per_example(draw_probes(op, p, seed, "gaussian"))).Q  # [B, D, p]
    theta = None
    for it in range(1, iters + 1):
        HV = _per_example(op.matvec(_as_vectors(V)))
        new_theta, ritz = _rayleigh_ritz(V, HV)
        new_theta, ritz = new_theta[:, :k], ritz[:, :, :k]
        done = (
            theta is not None
            and not torch.compiler.is_compiling()
            and bool(((new_theta - theta).abs() <= tol * new_theta.abs().clamp(min=torch.finfo(V.dtype).tiny)).all())
        )
        theta = new_theta
        if done:
            return Eigen(theta, ritz.transpose(1, 2), it)
        V = torch.linalg.qr(HV).Q  # Householder: orthonormal even when H V is rank-deficient
    return Eigen(theta, ritz.transpose(1, 2), iters)


def lanczos(op, steps: int, starts: int = 1, seed: int = 0):
    """Lanczos tridiagonalisation with full reorthogonalisation, `starts`
    independent runs per example (random Gaussian starts).

    Returns (T [starts, B, m, m] tridiagonal, Q [starts, B, m, D]). A breakdown
    (an invariant subspace found, e.g. the rank <= K - 1 Hessian of a
    piecewise-linear net) restarts with a random vector orthogonal to Q and a
    zero coupling, so T stays exact. The restart vectors come from the probe stream
    seed + 1 and replace w only where a run broke down, without a branch on the values
    (torch.compile traces the loop as one graph).
    """
    B, D = op.batch, op.dim
    m = min(steps, D)
    dtype, device = op.dtype, op.device
    q = draw_probes(op, starts, seed, "gaussian")
    q = q / q.norm(dim=2, keepdim=True)
    Q = torch.zeros(starts, B, m, D, dtype=dtype, device=device)
    alpha = torch.zeros(starts, B, m, dtype=dtype, device=device)
    beta = torch.zeros(starts, B, m, dtype=dtype, device=device)  # beta[j] couples q_j and q_{j+1}

    def orthogonalised(w: torch.Tensor, j: int) -> torch.Tensor:
        for _ in range(2):  # full reorthogonalisation against q_0 .. q_j, twice is enough
            w = w - torch.einsum("sbjd,sbj->sbd", Q[:, :, : j + 1], torch.einsum("sbjd,sbd->sbj", Q[:, :, : j + 1], w))
        return w

    for j in range(m):
        Q[:, :, j] = q
        w = op.matvec(q)
        alpha[:, :, j] = (w * q).sum(-1)
        w = orthogonalised(w, j)
        if j + 1 == m:
            break
        b = w.norm(dim=-1)
        scale = alpha[:, :, : j + 1].abs().amax(-1).clamp(min=torch.finfo(dtype).tiny)
        broke = b <= 1e3 * torch.finfo(dtype).eps * scale
        fresh = orthogonalised(draw_probes(op, starts, seed + 1, "gaussian", first=j * starts), j)
        w = torch.where(broke.unsqueeze(-1), fresh, w)  # those runs restart, orthogonal to Q
        b = torch.where(broke, torch.zeros_like(b), b)
        beta[:, :, j] = b
        q = w / w.norm(dim=-1, keepdim=True)
    T = torch.diag_embed(alpha) + torch.diag_embed(beta[..., : m - 1], 1) + torch.diag_embed(beta[..., : m - 1], -1)
    return T, Q


def lanczos_eigen(op, k: int, steps: int, seed: int = 0, vectors: bool = False) -> Eigen:
    T, Q = lanczos(op, steps, 1, seed)
    theta, Y = torch.linalg.eigh(T[0])  # [B, m], [B, m, m]
    order = theta.abs().argsort(dim=1, descending=True)[:, :k]
    values = theta.gather(1, order)
    vecs = None
    if vectors:
        Yk = Y.gather(2, order.unsqueeze(1).expand(-1, Y.shape[1], -1))  # [B, m, k]
        vecs = (Q[0].transpose(1, 2) @ Yk).transpose(1, 2)  # [B, k, D]
    return Eigen(values, vecs, T.shape[-1])


def slq(op, steps: int, starts: int, seed: int = 0):
    """Nodes [B, starts * m] and weights (summing to 1 per example) of the spectral
    density: Ritz values and squared first components of the Ritz vectors."""
    T, _ = lanczos(op, steps, starts, seed)
    theta, Y = torch.linalg.eigh(T)  # [starts, B, m], [starts, B, m, m]
    weights = Y[..., 0, :].square() / starts
    return theta.permute(1, 0, 2).flatten(1), weights.permute(1, 0, 2).flatten(1)
