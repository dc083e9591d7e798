"""How well transferability scores predict fine-tuned accuracy: the PARC paper's metric and
(weighted) Kendall tau.

The paper's metric (dbolya/parc, metrics.py): per run and target dataset, 100 x Pearson
between a method's scores and the fine-tuned accuracies over the transfers, averaged over
targets, then over runs. Optionally first (capacity=...) every method's scores are z-scored
over all rows (sample std) and capacity_weight x capacity / 50 is added, capacity being the
source model's depth in layers (the paper's "capacity to learn" term); a method whose scores
are all equal has no spread to z-score by and contributes 0 there. Rows whose accuracy is
<= 0 are left out, as the reference does (it marks missing fine-tunes so); rows whose score is
NaN are left out of that method (the reference fills them with 0 instead). A (run, target) group
whose correlations are undefined (fewer than two rows left, or constant scores or accuracies)
is skipped and counted, rather than making the method's average NaN.

Kendall's tau-b and scipy's weighted tau (hyperbolic weights favouring the top) are averaged
the same way; later papers rank estimators by them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Optional, Union

import numpy as np

from .bank import ScoreTable


@dataclasses.dataclass
class Evaluation:
    """One method's agreement with the accuracies: `pearson` is the paper's metric (x 100)."""

    pearson: float
    kendall: float
    weighted_kendall: float
    groups: int  # (run, target) groups averaged
    skipped: int = 0  # groups left out: fewer than 2 rows, or constant scores or accuracies


class EvaluationTable(dict):
    """method -> Evaluation, printable as a table (best paper metric first)."""

    def __str__(self) -> str:
        header = ["method", "pearson x100", "kendall tau", "weighted tau", "groups", "skipped"]
        rows = [header] + [
            [m, f"{e.pearson:.2f}", f"{e.kendall:.3f}", f"{e.weighted_kendall:.3f}", str(e.groups), str(e.skipped)]
            for m, e in sorted(self.items(), key=lambda kv: -_sortable(kv[1].pearson))
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    __repr__ = __str__


def _sortable(x: float) -> float:
    return -math.inf if math.isnan(x) else x


def _as_columns(scores) -> tuple[dict[str, np.ndarray], Optional[list[str]]]:
    if isinstance(scores, ScoreTable):
        return {m: np.asarray(scores[m], dtype=np.float64) for m in scores.methods}, scores.names
    if isinstance(scores, Mapping):
        return {str(m): np.asarray(v, dtype=np.float64).reshape(-1) for m, v in scores.items()}, None
    return {"score": np.asarray(scores, dtype=np.float64).reshape(-1)}, None


def evaluate(
    scores: Union[ScoreTable, Mapping[str, Sequence[float]], Sequence[float]],
    accuracies,
    *,
    targets: Optional[Sequence] = None,
    runs: Optional[Sequence] = None,
    capacity: Optional[Sequence[float]] = None,
    capacity_weight: float = 1.0,
) -> EvaluationTable:
    """Agreement of each method's scores with fine-tuned accuracies.

    Args:
        scores: a ScoreTable, a mapping method -> scores [R], or one score array [R].
        accuracies: fine-tuned accuracy of each row [R], or (with a ScoreTable) a mapping model
            name -> accuracy.
        targets: target dataset of each row: metrics are computed per target and averaged
            (default: all rows are one target).
        runs: run (probe-set seed) of each row: averaged last.
        capacity: per-row model depth in layers: enables the paper's z-scoring + capacity term.
        capacity_weight: weight of capacity / 50 (the paper: 1).

    Returns:
        EvaluationTable: method -> Evaluation(pearson, kendall, weighted_kendall, groups, skipped);
        NaN metrics (and groups 0) for a method whose every group was skipped.
    """
    try:
        from scipy import stats
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("evaluate needs scipy: pip install pykernels[selection]") from exc
    columns, names = _as_columns(scores)
    rows = len(next(iter(columns.values())))
    if isinstance(accuracies, Mapping):
        if names is None:
            raise TypeError("accuracies given by model name need scores as a ScoreTable")
        missing = [n for n in names if n not in accuracies]
        if missing:
            raise KeyError(f"no accuracy for model(s) {missing}")
        acc = np.array([float(accuracies[n]) for n in names])
    else:
        acc = np.asarray(accuracies, dtype=np.float64).reshape(-1)
    for name, col in columns.items():
        if len(col) != rows:
            raise ValueError(f"scores for {name!r} have {len(col)} rows, others {rows}")
    if len(acc) != rows:
        raise ValueError(f"accuracies have {len(acc)} rows but scores have {rows}")
    target = np.asarray(targets if targets is not None else np.zeros(rows))
    run = np.asarray(runs if runs is not None else np.zeros(rows))
    if len(target) != rows or len(run) != rows:
        raise ValueError(f"targets and runs must have one entry per row ({rows})")
    if capacity is not None:
        cap = np.asarray(capacity, dtype=np.float64).reshape(-1)
        if len(cap) != rows:
            raise ValueError(f"capacity has {len(cap)} rows but scores have {rows}")
        columns = {m: _zscore(c) + capacity_weight * cap / 50 for m, c in columns.items()}

    table = EvaluationTable()
    for method, col in columns.items():
        per_run, skipped = [], 0
        for r in np.unique(run):
            per_target = []
            for t in np.unique(target[run == r]):
                keep = (run == r) & (target == t) & (acc > 0) & np.isfinite(col) & np.isfinite(acc)
                x, a = col[keep], acc[keep]
                if len(x) < 2 or np.ptp(x) == 0 or np.ptp(a) == 0:  # no correlation defined
                    skipped += 1
                    continue
                per_target.append(
                    (100 * stats.pearsonr(x, a)[0], stats.kendalltau(x, a)[0], stats.weightedtau(x, a)[0])
                )
            if per_target:
                per_run.append((np.mean(per_target, axis=0), len(per_target)))
        if per_run:
            means = np.mean([m for m, _ in per_run], axis=0)
            table[method] = Evaluation(
                float(means[0]), float(means[1]), float(means[2]), sum(g for _, g in per_run), skipped
            )
        else:
            table[method] = Evaluation(math.nan, math.nan, math.nan, 0, skipped)
    return table


def _zscore(scores: np.ndarray) -> np.ndarray:
    """(scores - mean) / sample std over the finite scores; 0 where they have no spread."""
    finite = scores[np.isfinite(scores)]
    spread = np.std(finite, ddof=1) if len(finite) > 1 else 0.0
    centred = scores - (np.mean(finite) if len(finite) else 0.0)
    return centred / spread if spread > 0 else np.where(np.isfinite(scores), 0.0, scores)
