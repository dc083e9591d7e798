"""Model selection (PARC) against the paper's reference code path, in the same process.

Baseline "reference code": dbolya/parc's methods.PARC, one model at a time: scikit-learn
randomized PCA (f=32, seed 1919, iterated_power=1), StandardScaler, 1 - np.corrcoef for both
distance matrices, scipy.stats.spearmanr of the upper triangles. Needs scipy + scikit-learn
(the suite skips the baselines without them).

Cases (full run; --quick shrinks them):
  parc        16 models x N=1000 x D=512, 50 classes, PCA to 32 included (target: >= 5x on CPU);
              16 models x N=1000 x 32-d features, no PCA: distances + ranks + correlation
              (target: >= 25x on CPU); on a GPU also 256 models (target: >= 200x the CPU
              reference, timed on 8 models and scaled by 32) and one model at N=20,000.
  spearman    rows of 499,500 pairs against scipy.stats.spearmanr.
  pairwise_corr_distance   16 x 1000 x 32 against np.corrcoef and torch.corrcoef.
  parc_scaling time vs N (one model) and vs number of models, plotted as curves.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

import pykernels
from pykernels.bench._core import BenchContext, Case
from pykernels.selection import pairwise_corr_distance, parc, spearman

CLASSES = 50
_SCALING: dict[str, tuple[str, int]] = {}  # shape -> ("N" or "models", value), for plot()


def _probe(models: int, n: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    centers = torch.randn(CLASSES, d, generator=g)
    strength = torch.rand(models, 1, 1, generator=g)
    x = strength * centers[y] + torch.randn(models, n, d, generator=g)
    return x.float(), y


def _reference_available() -> Optional[str]:
    try:
        import scipy.stats  # noqa: F401
        import sklearn.decomposition  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


def reference_code(features: np.ndarray, y: np.ndarray, n_dims: Optional[int]) -> list[float]:
    """The reference code path (methods.PARC), model by model."""
    import scipy.stats
    import sklearn.decomposition
    import sklearn.preprocessing

    labels = np.eye(CLASSES)[y]
    rdm2_upper = None
    scores = []
    for f in features:
        if n_dims is not None:
            f = sklearn.decomposition.PCA(
                n_components=min(n_dims, f.shape[0]), svd_solver="randomized", random_state=1919, iterated_power=1
            ).fit_transform(f)
        f = sklearn.preprocessing.StandardScaler().fit_transform(f)
        upper = np.triu_indices(f.shape[0], 1)
        rdm1 = 1 - np.corrcoef(f)
        rdm2_upper = (1 - np.corrcoef(labels))[upper]  # the reference recomputes it for every model
        scores.append(scipy.stats.spearmanr(rdm1[upper], rdm2_upper)[0] * 100)
    return scores


def _parc_case(ctx, ours, models, n, d, n_dims, reference_models=None, note="") -> Case:
    x, y = _probe(models, n, d)
    x = x.to(ctx.device)
    y_dev = y.to(ctx.device)
    impls = {f"exact ({b})": (lambda b=b: parc(x, y_dev, num_classes=CLASSES, pca_dim=n_dims, backend=b)) for b in ours}
    baselines, scale = {}, {}
    if _reference_available() is None:
        sub = min(reference_models or models, models)
        xs, ys = x[:sub].cpu().numpy(), y.numpy()
        baselines["reference code"] = lambda: reference_code(xs, ys, n_dims)
        if sub != models:  # a per-model loop: time a subset, report it for all models
            scale["reference code"] = models / sub
            note = (note + "; " if note else "") + f"reference code timed on {sub} of {models} models and scaled"
        if ctx.device.type == "cpu" and not ctx.quick:
            impls["reference mode (cpu)"] = lambda: parc(x, y, num_classes=CLASSES, pca_dim=n_dims, mode="reference")
    pca = f"PCA to {n_dims}" if n_dims else "no PCA"
    return Case(
        op="parc",
        shape=f"{models} model{'s' if models > 1 else ''} x N={n} x D={d}, {pca}",
        dtype="float32",
        implementations=impls,
        baselines=baselines,
        scale=scale,
        notes=note or "x = reference time / our time; reference = dbolya/parc methods.PARC per model",
    )


def _spearman_case(ctx, ours, rows, m):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, m, generator=g, dtype=torch.float64).to(ctx.device)
    y = (torch.randn(m, generator=g, dtype=torch.float64) > 0).double().to(ctx.device)  # two-valued, ties
    impls = {b: (lambda b=b: spearman(x, y, backend=b)) for b in ours}
    baselines = {}
    if _reference_available() is None:
        import scipy.stats

        xs, ys = x.cpu().numpy(), y.cpu().numpy()
        baselines["scipy.stats.spearmanr"] = lambda: [scipy.stats.spearmanr(r, ys)[0] for r in xs]
    return Case(
        op="spearman",
        shape=f"{rows} rows x M={m} (y shared, two-valued)",
        dtype="float64",
        implementations=impls,
        baselines=baselines,
    )


def _distance_case(ctx, ours, models, n, d, dtype):
    x = _probe(models, n, d)[0].to(ctx.device, dtype)
    impls = {b: (lambda b=b: pairwise_corr_distance(x, triu=True, backend=b)) for b in ours}
    xs = x.cpu().numpy()
    baselines = {
        "np.corrcoef + triu": lambda: [(1 - np.corrcoef(f))[np.triu_indices(n, 1)] for f in xs],
        "torch.corrcoef + triu": lambda: [
            (1 - torch.corrcoef(f))[tuple(torch.triu_indices(n, n, 1, device=f.device))] for f in x
        ],
    }
    return Case(
        op="pairwise_corr_distance",
        shape=f"{models} x N={n} x D={d}, upper triangle",
        dtype=str(dtype).replace("torch.", ""),
        implementations=impls,
        baselines=baselines,
        bytes_read=x.numel() * x.element_size(),
    )


def _scaling_cases(ctx, ours, quick):
    cases = []
    ns = (250, 500, 1000) if quick else (250, 500, 1000, 2000, 4000)
    for n in ns:
        case = _parc_case(ctx, ours, 1, n, 32, None, note="time vs N: one model, 32-d, no PCA")
        case.op, case.shape = "parc_scaling", f"1 model x N={n}"
        _SCALING[case.shape] = ("N", n)
        cases.append(case)
    for models in (1, 4, 16) if quick else (1, 4, 16, 64):
        case = _parc_case(
            ctx,
            ours,
            models,
            500,
            32,
            None,
            reference_models=min(models, 8),
            note="time vs number of models: N=500, 32-d, no PCA",
        )
        case.op, case.shape = "parc_scaling", f"N=500, {models} model{'s' if models > 1 else ''}"
        _SCALING[case.shape] = ("models", models)
        cases.append(case)
    return cases


# The tables this suite fills (the runner skips the suite when --ops names none of them).
OPS = ("parc", "parc_scaling", "spearman", "pairwise_corr_distance")


def cases(ctx: BenchContext) -> list[Case]:
    status = pykernels.backends()
    ours = [b for b in (["cuda", "triton"] if ctx.is_cuda else ["cpu"]) if status[b].available]
    if not ours:
        return []
    quick = ctx.quick
    models, n = (4, 500) if quick else (16, 1000)
    out = [
        _parc_case(ctx, ours, models, n, 512, 32),
        _parc_case(ctx, ours, models, n, 32, None),
    ]
    if ctx.is_cuda:
        out.append(_parc_case(ctx, ["cuda"] if "cuda" in ours else ours, 256, 1000, 512, 32, reference_models=8))
        out.append(_parc_case(ctx, ["cuda"] if "cuda" in ours else ours, 256, 1000, 32, None, reference_models=8))
        big = _parc_case(
            ctx,
            ["cuda"] if "cuda" in ours else ours,
            1,
            20000,
            32,
            None,
            note="N = 20,000: 2e8 pairs ranked in float64 on one GPU",
        )
        big.baselines, big.scale = {}, {}
        out.append(big)
    out.append(_spearman_case(ctx, ours, 4 if quick else 16, 499500))
    for dtype in (torch.float32, torch.float64):
        out.append(_distance_case(ctx, ours, models, n, 32, dtype))
    out += _scaling_cases(ctx, ours, quick)
    return out


def plot(rows, out_dir: str) -> list[str]:
    """Curves of time vs N and vs models for each implementation (log-log)."""
    scaling = [r for r in rows if r.op == "parc_scaling" and r.error is None and r.shape in _SCALING]
    if not scaling:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, axis, label in (
        (axes[0], "N", "probe samples N (1 model, 32-d)"),
        (axes[1], "models", "models in the batch (N=500, 32-d)"),
    ):
        for name in dict.fromkeys(r.name for r in scaling):
            pts = sorted(
                (_SCALING[r.shape][1], r.median_ms) for r in scaling if r.name == name and _SCALING[r.shape][0] == axis
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = sorted({v for a, v in _SCALING.values() if a == axis})
        ax.minorticks_off()
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel(label)
        ax.set_ylabel("median time (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("PARC scaling (lower is better)")
    fig.tight_layout()
    path = os.path.join(out_dir, "parc_scaling_curves.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
