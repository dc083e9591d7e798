"""Probe features of a model: the input of its last linear layer (the reference's definition:
a forward pre-hook on every nn.Linear keeps the input of the last one called), and its softmax
outputs, for LEEP / NCE."""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from .._progress import progress_bar


@dataclasses.dataclass
class ProbeSet:
    features: torch.Tensor  # [N, D] float32, input of the last nn.Linear called
    probs: Optional[torch.Tensor]  # [N, C] softmax of the model's output (None if not [batch, C])
    labels: Optional[torch.Tensor]  # [N] when the data yields (input, label) pairs


def _batches(data, batch_size: int):
    if isinstance(data, torch.utils.data.DataLoader):
        yield from data
        return
    if isinstance(data, torch.Tensor):
        for i in range(0, data.shape[0], batch_size):
            yield data[i : i + batch_size]
        return
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(d, torch.Tensor) for d in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"inputs have {x.shape[0]} samples but labels have {y.shape[0]}")
        for i in range(0, x.shape[0], batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]
        return
    if isinstance(data, torch.utils.data.Dataset):
        yield from torch.utils.data.DataLoader(data, batch_size=batch_size)
        return
    raise TypeError(f"data must be a DataLoader, Dataset, tensor or (inputs, labels) pair, got {type(data).__name__}")


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    data,
    *,
    batch_size: int = 128,
    device: Union[str, torch.device, None] = None,
    progress: Optional[bool] = None,
) -> ProbeSet:
    """Runs `model` (in eval mode) over `data` and captures the probe features.

    Args:
        model: any nn.Module with at least one nn.Linear.
        data: a DataLoader or Dataset yielding inputs or (inputs, labels); a tensor of inputs; or
            an (inputs, labels) pair of tensors.
        batch_size: for tensors and datasets.
        device: where to run (default: the model's device).
        progress: print progress to stderr (default: when stderr is a terminal).
    """
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear: there is no last linear layer whose input to capture")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    captured: list[torch.Tensor] = []

    def hook(module, args):
        captured[:] = [args[0]]

    handles = [m.register_forward_pre_hook(hook) for m in linears]
    was_training = model.training
    model.eval()
    feats, probs, labels = [], [], []
    bar = progress_bar(None, "extracting features", progress, unit=" samples")  # a counter: "10 samples"
    try:
        for batch in _batches(data, batch_size):
            if isinstance(batch, (tuple, list)):  # (inputs,) or (inputs, labels, ...)
                x, y = batch[0], (batch[1] if len(batch) > 1 else None)
            else:
                x, y = batch, None
            captured.clear()
            out = model(x.to(device))
            if not captured:
                raise RuntimeError("no nn.Linear ran in the forward pass")
            feats.append(captured[0].flatten(1).float().cpu())
            if isinstance(out, torch.Tensor) and out.dim() == 2:
                probs.append(torch.softmax(out.float(), dim=-1).cpu())
            if y is not None:
                labels.append(torch.as_tensor(y).cpu())
            bar.update(x.shape[0])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
        bar.close()
    if not feats:
        raise ValueError("data yielded no batch")
    return ProbeSet(
        torch.cat(feats),
        torch.cat(probs) if len(probs) == len(feats) else None,
        torch.cat(labels) if len(labels) == len(feats) else None,
    )
