"""Scoring a bank of models: streaming, batching, progress, sharding across torch.distributed
ranks, and the result table (printable, CSV, JSON)."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .._progress import progress_bar
from . import estimators
from .parc import DEFAULT_PCA_DIM, parc

FILE_SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors")


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    source: str  # "features" or "probs": what the method reads
    fn: Callable  # (inputs, labels, options) -> float64 [B]


def _features_method(fn):
    return lambda x, y, o: fn(x, y, num_classes=o["num_classes"])


METHODS = {
    "parc": Method(
        "parc",
        "features",
        lambda x, y, o: parc(
            x, y, num_classes=o["num_classes"], pca_dim=o["pca_dim"], mode=o["mode"], backend=o["backend"]
        ),
    ),
    "leep": Method("leep", "probs", _features_method(estimators.leep)),
    "nce": Method("nce", "probs", _features_method(estimators.nce)),
    "hscore": Method("hscore", "features", _features_method(estimators.hscore)),
    "hscore_shrinkage": Method("hscore_shrinkage", "features", _features_method(estimators.hscore_shrinkage)),
    "logme": Method("logme", "features", _features_method(estimators.logme)),
    "one_nn_cv": Method("one_nn_cv", "features", _features_method(estimators.one_nn_cv)),
    "gbc": Method("gbc", "features", _features_method(estimators.gbc)),
    "transrate": Method("transrate", "features", _features_method(estimators.transrate)),
}


@dataclasses.dataclass
class ScoreTable:
    """Scores of a bank of models: one row per model, one column per method (higher = predicted
    to transfer better), plus each method's ranks (1 = best; NaN scores are not ranked)."""

    names: list[str]
    scores: dict[str, np.ndarray]  # method -> float64 [models]
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # time spent per method

    @property
    def methods(self) -> list[str]:
        return list(self.scores)

    def __getitem__(self, method: str) -> np.ndarray:
        return self.scores[method]

    def __len__(self) -> int:
        return len(self.names)

    def ranks(self, method: str) -> np.ndarray:
        s = self.scores[method]
        ranks = np.full(len(s), np.nan)
        order = [i for i in np.argsort(-s, kind="stable") if not math.isnan(s[i])]
        ranks[order] = np.arange(1, len(order) + 1)
        return ranks

    def order(self, by: Optional[str] = None) -> list[int]:
        """Row indices, best first by `by` (default: the first method); NaN scores last."""
        s = self.scores[by or self.methods[0]]
        return sorted(range(len(s)), key=lambda i: (math.isnan(s[i]), -s[i] if not math.isnan(s[i]) else 0, i))

    def rows(self, by: Optional[str] = None) -> list[dict]:
        ranks = {m: self.ranks(m) for m in self.methods}
        out = []
        for i in self.order(by):
            row = {"model": self.names[i]}
            for m in self.methods:
                row[m] = float(self.scores[m][i])
                row[f"{m}_rank"] = None if math.isnan(ranks[m][i]) else int(ranks[m][i])
            out.append(row)
        return out

    def to_csv(self, path: Union[str, os.PathLike, None] = None, by: Optional[str] = None) -> str:
        buf = io.StringIO()
        rows = self.rows(by)
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["model"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_json(self, path: Union[str, os.PathLike, None] = None, by: Optional[str] = None) -> str:
        rows = [
            {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in self.rows(by)
        ]
        text = json.dumps({"methods": self.methods, "seconds": self.seconds, "models": rows}, indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    def __str__(self) -> str:
        header = ["rank", "model"] + self.methods
        lines = [header]
        rows = self.rows()
        digits = {m: _distinguishing_digits([r[m] for r in rows]) for m in self.methods}
        for r in rows:
            first = r[f"{self.methods[0]}_rank"]
            lines.append(
                [str(first) if first is not None else "-", r["model"]]
                + [
                    _fmt_score(r[m], digits[m])
                    + (f" ({r[m + '_rank']})" if len(self.methods) > 1 and r[m + "_rank"] else "")
                    for m in self.methods
                ]
            )
        widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
        text = [
            "  ".join(c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in lines
        ]
        text.insert(1, "  ".join("-" * w for w in widths))
        note = f"ranked by {self.methods[0]} (higher = predicted to transfer better)"
        if len(self.methods) > 1:
            note += "; (n) = rank by that method"
        return "\n".join(text + [note])

    __repr__ = __str__


def _fmt_score(v: float, digits: int = 4) -> str:
    return "nan" if math.isnan(v) else f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.{digits}e}"


def _distinguishing_digits(values: list[float]) -> int:
    """Significant digits (4 to 12) at which a column's different scores print differently
    (H-scores of similar models agree to several digits)."""
    distinct = {v for v in values if not math.isnan(v)}
    for digits in range(4, 13):
        if len({_fmt_score(v, digits) for v in distinct}) == len(distinct):
            return digits
    return 12


# ---- loading a bank ----


def _entries(bank) -> list[tuple[str, object]]:
    if isinstance(bank, (str, os.PathLike)):
        folder = Path(bank)
        if not folder.is_dir():
            raise FileNotFoundError(f"bank {str(bank)!r} is not a folder")
        files = sorted(p for p in folder.iterdir() if p.suffix in FILE_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"bank folder {str(bank)!r} holds no {', '.join(FILE_SUFFIXES)} files")
        return [(p.stem, p) for p in files]
    if isinstance(bank, Mapping):
        return [(str(k), v) for k, v in bank.items()]
    if isinstance(bank, (list, tuple)):
        return [(Path(p).stem, p) for p in bank]
    raise TypeError(f"bank must be a mapping name -> features, a folder, or a list of files, got {type(bank).__name__}")


def _pick(d: Mapping, key: str, where: str, required: bool):
    if key in d:
        return d[key]
    if required and len(d) == 1:
        return next(iter(d.values()))
    if required:
        raise KeyError(f"{where} holds {sorted(d)} but no {key!r} entry")
    return None


def load_entry(entry, name: str = "model") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(features, probs or None) of one bank entry: a tensor / array, a dict with "features" (and
    optionally "probs"), or a .npy / .npz / .pt / .pth / .safetensors file holding either."""
    if isinstance(entry, (str, os.PathLike)):
        path = Path(entry)
        if not path.exists():
            raise FileNotFoundError(f"{name}: no such file {str(path)!r}")
        if path.suffix == ".npy":
            return torch.from_numpy(np.array(np.load(path, mmap_mode="r"))), None
        if path.suffix == ".npz":
            with np.load(path) as z:
                entry = {k: z[k] for k in z.files}
        elif path.suffix in (".pt", ".pth"):
            entry = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            entry = load_file(str(path))
        else:
            raise ValueError(f"{name}: unsupported file type {path.suffix!r} (expected one of {FILE_SUFFIXES})")
        where = f"{name} ({path.name})"
    else:
        where = name
    if isinstance(entry, Mapping):
        feats = _pick(entry, "features", where, True)
        probs = _pick(entry, "probs", where, False)
    else:
        feats, probs = entry, None
    as_t = lambda v: None if v is None else (v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)))
    return as_t(feats), as_t(probs)


# ---- scoring ----


def _distributed(flag: Optional[bool]) -> tuple[int, int]:
    ready = torch.distributed.is_available() and torch.distributed.is_initialized()
    if flag and not ready:
        raise RuntimeError("distributed=True but torch.distributed is not initialized (init_process_group first)")
    if flag is False or not ready:
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def score_models(
    bank,
    labels,
    methods: Union[str, Sequence[str]] = ("parc",),
    *,
    source_probs=None,
    num_classes: Optional[int] = None,
    pca_dim: Optional[int] = DEFAULT_PCA_DIM,
    mode: str = "exact",
    batch_size: int = 16,
    device: Union[str, torch.device, None] = None,
    progress: Optional[bool] = None,
    distributed: Optional[bool] = None,
    backend: Optional[str] = None,
) -> ScoreTable:
    """Scores every model of a bank on one probe set with one or more methods.

    Args:
        bank: name -> features mapping (tensors, arrays, dicts with "features" / "probs", or
            file paths), a folder of .npy / .npz / .pt / .pth / .safetensors files (one per model,
            named by file stem), or a list of such files. Files are loaded `batch_size` models at
            a time, so a bank larger than memory can be scored.
        labels: the probe set's class ids [N] (or a [N, C] matrix: PARC only).
        methods: names from METHODS ("parc", "leep", "nce", "hscore", "hscore_shrinkage",
            "logme", "one_nn_cv", "gbc", "transrate"), or "all" (every method the inputs allow).
        source_probs: name -> source-model probabilities [N, Cs] for LEEP / NCE (else they come
            from the bank's "probs" entries).
        num_classes, pca_dim, mode, backend: passed to the methods (see pykernels.selection.parc).
        batch_size: models loaded and scored together.
        device: where to score (default: where the features are, i.e. the CPU for files).
        progress: show a progress bar on stderr (default: when stderr is a terminal).
        distributed: shard the bank across torch.distributed ranks (model i on rank
            i % world_size) and gather one table on every rank. Default: when a process group
            is initialized with more than one rank.

    Returns:
        ScoreTable with the models in bank order.
    """
    entries = _entries(bank)
    if not entries:
        raise ValueError("bank holds no model")
    names = [n for n, _ in entries]
    if len(set(names)) != len(names):
        raise ValueError("bank has duplicate model names")
    chosen = _choose_methods(methods, source_probs, entries)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    rank, world = _distributed(distributed)
    mine = [i for i in range(len(entries)) if i % world == rank]
    options = dict(num_classes=num_classes, pca_dim=pca_dim, mode=mode, backend=backend)
    scores = {m.name: np.full(len(entries), np.nan) for m in chosen}
    seconds = {m.name: 0.0 for m in chosen}
    bar = progress_bar(len(mine), "scoring models", progress, unit="model")
    for start in range(0, len(mine), batch_size):
        chunk = mine[start : start + batch_size]
        feats, probs = [], []
        for i in chunk:
            name, entry = entries[i]
            f, p = load_entry(entry, name)
            if source_probs is not None and name in source_probs:
                p = load_entry(source_probs[name], f"source_probs[{name!r}]")[0]
            feats.append(f if device is None else f.to(device))
            probs.append(p if p is None or device is None else p.to(device))
        for m in chosen:
            inputs = feats if m.source == "features" else probs
            missing = [entries[i][0] for i, x in zip(chunk, inputs) if x is None]
            if missing:
                raise ValueError(f"{m.name} needs source-model probabilities; none for {missing}")
            t0 = time.perf_counter()
            result = m.fn(inputs, labels, options)
            seconds[m.name] += time.perf_counter() - t0
            scores[m.name][chunk] = result.detach().cpu().numpy().reshape(-1)
        bar.update(len(chunk))
    bar.close()
    if world > 1:
        scores, seconds = _gather(scores, seconds, mine)
    return ScoreTable(names, scores, seconds)


def _choose_methods(methods, source_probs, entries) -> list[Method]:
    if isinstance(methods, str):
        if methods == "all":
            has_probs = source_probs is not None or _first_has_probs(entries)
            return [m for m in METHODS.values() if m.source == "features" or has_probs]
        methods = [methods]
    if not methods:
        raise ValueError("methods is empty")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)} or 'all'")
    return [METHODS[m] for m in dict.fromkeys(methods)]


def _first_has_probs(entries) -> bool:
    name, entry = entries[0]
    return load_entry(entry, name)[1] is not None


def _gather(scores: dict, seconds: dict, mine: Iterable[int]):
    """Every rank's scores of its own models -> the full table on every rank."""
    mine = list(mine)
    local = {m: (mine, s[mine].tolist()) for m, s in scores.items()}
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, (local, seconds))
    merged = {m: np.full_like(s, np.nan) for m, s in scores.items()}
    total = {m: 0.0 for m in seconds}
    for part, part_seconds in gathered:
        for m, (idx, vals) in part.items():
            merged[m][idx] = vals
        for m, t in part_seconds.items():
            total[m] += t
    return merged, total
