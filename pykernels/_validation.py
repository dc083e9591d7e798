"""Argument checks for the public API: each error names the argument, what was
expected and what was given."""

from __future__ import annotations

from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    value,
    *,
    ndim: int | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
    shape_doc: str = "",
) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        doc = f" {shape_doc}" if shape_doc else ""
        raise ValueError(f"{name} must have {ndim} dims{doc}, got shape {tuple(value.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            raise TypeError(
                f"{name} must have dtype in ({_names(dtypes)}), got {str(value.dtype).replace('torch.', '')}"
            )
    if device is not None and not same_device(value.device, device):
        raise ValueError(f"{name} must be on {device} (like the other inputs), got {value.device}")
    return value


def same_device(a, b) -> bool:
    """One device, where a device without an index ("cuda") stands for whichever index the other
    names: a tensor made on "cuda" reports "cuda:0", which must not fail a check against "cuda"."""
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def check_dim(name: str, value: torch.Tensor, dim: int, expected: int, meaning: str) -> None:
    if value.shape[dim] != expected:
        raise ValueError(
            f"{name} has {value.shape[dim]} at dim {dim} but {meaning} is {expected} (shape {tuple(value.shape)})"
        )


INT64_MAX = 2**63 - 1  # the largest int a torch op's `int` argument takes


def check_int(name: str, value, *, minimum: int, maximum: int = INT64_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value
