"""Argument handling shared by the selection API: features of one or many models, labels, and
grouping models of equal width into batches."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch


def as_tensor(name: str, value) -> torch.Tensor:
    """A tensor, or numpy data as one; detached: the selection scores are not differentiable
    (ranks, PCA with fixed signs, argmax), so no autograd graph is built through them."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, np.ndarray) or isinstance(value, (list, tuple)):
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":  # strings, objects, complex: torch cannot hold them
            raise TypeError(
                f"{name} must hold numbers, got a numpy array of dtype {array.dtype} "
                f"(map class names to ids 0..C-1 first, e.g. np.unique(names, return_inverse=True)[1])"
            )
        return torch.as_tensor(array)
    raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(value).__name__}")


@dataclasses.dataclass
class Models:
    """Features of B models on one probe set of N samples (widths may differ)."""

    tensors: list[torch.Tensor]  # [N, D_i] each
    single: bool  # given as one [N, D] matrix: results are 0-d
    batch: Optional[torch.Tensor] = None  # the [B, N, D] tensor when given as one

    @property
    def n(self) -> int:
        return self.tensors[0].shape[0]

    def groups(self):
        """(indices, [b, N, D] batch) for runs of models with equal width, dtype and device."""
        if self.batch is not None:
            yield list(range(self.batch.shape[0])), self.batch
            return
        by_kind: dict[tuple, list[int]] = {}
        for i, t in enumerate(self.tensors):
            by_kind.setdefault((t.shape[1], t.dtype, t.device), []).append(i)
        for indices in by_kind.values():
            yield indices, torch.stack([self.tensors[i] for i in indices])


def as_models(name: str, features, *, min_samples: int = 3) -> Models:
    """[N, D], [B, N, D] or a sequence of [N, D_i] (tensors or arrays) -> Models."""
    if isinstance(features, (list, tuple)) and features and not np.isscalar(features[0]):
        tensors = [as_tensor(f"{name}[{i}]", f) for i, f in enumerate(features)]
        for i, t in enumerate(tensors):
            if t.dim() != 2:
                raise ValueError(
                    f"{name}[{i}] must be [N, D], got shape {tuple(t.shape)}: {name} was given as a list, "
                    f"which is read as a list of models; for one model pass a tensor or array [N, D]"
                )
        single = False
    else:
        t = as_tensor(name, features)
        if t.dim() == 2:
            tensors, single = [t], True
        elif t.dim() == 3:
            tensors, single = list(t.unbind(0)), False
        else:
            raise ValueError(f"{name} must be [N, D], [B, N, D] or a list of [N, D_i], got shape {tuple(t.shape)}")
    if not tensors:
        raise ValueError(f"{name} holds no model")
    n0 = tensors[0].shape[0]
    for i, t in enumerate(tensors):
        label = name if single else f"{name}[{i}]"
        if not (
            t.dtype.is_floating_point or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
        ):
            raise TypeError(f"{label} must hold numbers, got dtype {str(t.dtype).replace('torch.', '')}")
        if t.shape[0] != n0:
            raise ValueError(
                f"{label} has N={t.shape[0]} samples but {name}[0] has N={n0}: every model must see the same probe set"
            )
        if t.shape[1] == 0:
            raise ValueError(f"{label} has no feature dims (shape {tuple(t.shape)})")
        if t.device != tensors[0].device:
            raise ValueError(f"{label} is on {t.device} but {name}[0] is on {tensors[0].device}")
    if n0 < min_samples:
        raise ValueError(f"{name} has N={n0} samples; at least {min_samples} are needed")
    tensors = [t if t.dtype.is_floating_point else t.double() for t in tensors]
    batch = features.detach() if isinstance(features, torch.Tensor) and features.dim() == 3 else None
    return Models(tensors, single, batch if batch is not None and batch.dtype.is_floating_point else None)


@dataclasses.dataclass
class Labels:
    """Target labels of the probe set: class ids, or a multi-hot / soft matrix."""

    classes: Optional[torch.Tensor]  # [N] int64, when given as class ids
    matrix: Optional[torch.Tensor]  # [N, C] float64, when given as a matrix
    num_classes: int

    def onehot(self) -> torch.Tensor:
        if self.matrix is not None:
            return self.matrix
        return torch.nn.functional.one_hot(self.classes, self.num_classes).double()

    def present(self) -> torch.Tensor:
        """Class ids that occur in the probe set (class-id labels only)."""
        return torch.unique(self.classes)


def as_labels(labels, n: int, num_classes: Optional[int] = None, *, device=None) -> Labels:
    y = as_tensor("labels", labels)
    if device is not None:
        y = y.to(device)
    if y.dim() not in (1, 2):
        raise ValueError(
            f"labels must be class ids [N] or a multi-hot / soft matrix [N, C], got shape {tuple(y.shape)}"
        )
    if y.shape[0] != n:
        raise ValueError(f"labels has {y.shape[0]} entries but the features have N={n} samples")
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1
    ):
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if y.dim() == 2:
        if num_classes is not None and y.shape[1] != num_classes:
            raise ValueError(f"labels matrix has {y.shape[1]} columns but num_classes is {num_classes}")
        m = y.double()
        if not torch.isfinite(m).all():
            raise ValueError("labels matrix holds NaN or Inf")
        return Labels(None, m, y.shape[1])
    if y.dtype.is_floating_point:
        if not torch.equal(y, y.round()):
            raise TypeError(
                "labels [N] must be integer class ids (got non-integral floats); pass a [N, C] matrix for soft labels"
            )
    elif y.dtype == torch.bool:
        raise TypeError("labels must be integer class ids, got bool")
    classes = y.to(torch.int64)
    if n and int(classes.min()) < 0:
        raise ValueError(f"labels must be class ids >= 0, got {int(classes.min())}")
    top = int(classes.max()) if n else -1
    if num_classes is None:
        num_classes = top + 1
    elif top >= num_classes:
        raise ValueError(f"labels hold class {top} but num_classes is {num_classes} (ids must be < num_classes)")
    return Labels(classes, None, int(num_classes))


def require_two_classes(labels: Labels, what: str) -> None:
    if labels.classes is not None and torch.unique(labels.classes).numel() < 2:
        raise ValueError(f"labels hold a single class; {what} needs at least two classes")


def finite_models(models: Sequence[torch.Tensor]) -> list[bool]:
    return [bool(torch.isfinite(t).all()) for t in models]
