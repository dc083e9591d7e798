"""Is the network piecewise linear in its input at x?

For such networks (ReLU, max-pool, eval-mode BatchNorm, ...) every logit is
locally linear, so the Hessian of log p is exactly J^T (diag(s) - s s^T) J almost
everywhere: exact_trace is exact and the Gauss-Newton HVP equals the full one.

Checked by running the model once under a dispatch mode that follows which
tensors depend on x (x, then every output of an op with an x-dependent input)
and records every ATen op applied to them. An op is piecewise linear in x when
it is in _PIECEWISE_LINEAR, or is multilinear (products) with at most one
factor depending on x, or is a division whose divisor does not depend on x, or
is eval-mode batch norm. An in-place op (add_, hardtanh_, ...) is judged as its
out-of-place form.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

_PIECEWISE_LINEAR = {
    # linear maps and sums
    "add",
    "sub",
    "rsub",
    "neg",
    "sum",
    "mean",
    "cumsum",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "_adaptive_avg_pool2d",
    "_adaptive_avg_pool3d",
    "upsample_nearest1d",
    "upsample_nearest2d",
    "upsample_nearest3d",
    "upsample_linear1d",
    "upsample_bilinear2d",
    "upsample_trilinear3d",
    "_upsample_nearest_exact2d",
    "constant_pad_nd",
    "reflection_pad1d",
    "reflection_pad2d",
    "replication_pad1d",
    "replication_pad2d",
    "im2col",
    "col2im",
    "flip",
    "roll",
    "trace",
    "diagonal",
    # piecewise-linear selections and activations
    "relu",
    "leaky_relu",
    "hardtanh",
    "hardsigmoid",
    "hardshrink",
    "softshrink",
    "clamp",
    "clamp_min",
    "clamp_max",
    "threshold",
    "abs",
    "maximum",
    "minimum",
    "max",
    "min",
    "amax",
    "amin",
    "where",
    "masked_fill",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "max_pool2d_with_indices",
    "max_pool3d_with_indices",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
    "sort",
    "topk",
    "sign",
    "round",
    "floor",
    "ceil",
    # comparisons and logic: piecewise constant (a mask that multiplies an x-dependent tensor
    # is a second x-dependent factor, so such a product is still judged curved)
    "gt",
    "lt",
    "ge",
    "le",
    "eq",
    "ne",
    "logical_and",
    "logical_or",
    "logical_not",
    "bitwise_and",
    "bitwise_or",
    "bitwise_not",
    "isnan",
    "isinf",
    "isfinite",
    # layout, copies and constants
    "view",
    "_unsafe_view",
    "reshape",
    "_reshape_alias",
    "permute",
    "transpose",
    "t",
    "expand",
    "squeeze",
    "unsqueeze",
    "flatten",
    "unflatten",
    "slice",
    "select",
    "index_select",
    "embedding",
    "index",
    "gather",
    "cat",
    "stack",
    "split",
    "split_with_sizes",
    "chunk",
    "unbind",
    "clone",
    "contiguous",
    "_to_copy",
    "to",
    "copy",
    "detach",
    "alias",
    "narrow",
    "repeat",
    "pixel_shuffle",
    "pixel_unshuffle",
    "as_strided",
    "lift_fresh",
    "lift_fresh_copy",
    "unfold",
    "empty_like",
    "zeros_like",
    "ones_like",
    "fill",
    "new_zeros",
    "new_empty",
    "expand_as",
    "view_as",
}
_MULTILINEAR = {
    "mul",
    "mm",
    "bmm",
    "addmm",
    "addmv",
    "mv",
    "baddbmm",
    "addbmm",
    "dot",
    "vdot",
    "matmul",
    "convolution",
    "_convolution",
    "linear",
    "prelu",
    "_prelu_kernel",
    "einsum",
}
_BATCH_NORM_EVAL = {"_native_batch_norm_legit_no_training"}


def _base_name(func) -> str:
    """The op's name, in-place forms (a trailing "_": add_, hardtanh_) as their out-of-place op,
    which computes the same values: `out += x` and ReLU6(inplace=True) are as linear as
    `out + x` and ReLU6()."""
    name = func._schema.name.split("::")[-1]
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def _is_piecewise_linear(name: str, func, args, kwargs, depends: list[bool]) -> bool:
    if name in _PIECEWISE_LINEAR:
        return True
    if name in _BATCH_NORM_EVAL:  # (input, weight, ...): (input - mean) * rstd * weight + bias
        return not (depends[0] and len(depends) > 1 and depends[1])
    if name in ("div", "floor_divide", "remainder"):
        return not (len(depends) > 1 and depends[1])  # x / const is linear, anything / x is not
    if name == "native_batch_norm":  # (input, weight, bias, running_mean, running_var, training, ...)
        training = args[5] if len(args) > 5 else kwargs.get("training", True)
        return not training and not any(depends[1:])
    if name in ("nll_loss_forward", "nll_loss2d_forward"):  # (input, target, weight, ...): a weighted selection
        return not any(depends[1:])
    if name in ("addmm", "addmv", "baddbmm", "addbmm"):  # bias + product: the bias is additive
        return sum(depends[1:3]) <= 1
    if name in _MULTILINEAR:
        return sum(depends) <= 1
    return False


def _written(func, args, kwargs) -> list[torch.Tensor]:
    """The tensors an op writes into (in-place ops' self, out= arguments)."""
    written = []
    for i, arg in enumerate(func._schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        if isinstance(value, torch.Tensor) and arg.alias_info is not None and arg.alias_info.is_write:
            written.append(value)
    return written


class _Recorder(TorchDispatchMode):
    """Follows x's dependents by tensor, and by storage for those written in place: after
    `buf[:, :k] = h` (a copy into a view of buf), buf itself depends on x."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.depends_on_x = WeakIdKeyDictionary({x: True})
        self.written_storages: set[int] = set()
        self._alive: list[torch.Tensor] = []  # keeps those storages' addresses from being reused during the forward
        self.curved: dict[str, int] = {}
        self.count = 0

    def _depends(self, t: torch.Tensor) -> bool:
        return t in self.depends_on_x or bool(self.written_storages) and _storage(t) in self.written_storages

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.count += 1
        tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        depends = [self._depends(t) for t in tensors]
        out = func(*args, **kwargs)
        if any(depends):
            name = _base_name(func)
            if not _is_piecewise_linear(name, func, args, kwargs, depends):
                self.curved[name] = self.curved.get(name, 0) + 1
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.depends_on_x[t] = True
            for t in _written(func, args, kwargs):
                if (key := _storage(t)) is not None:
                    self.written_storages.add(key)
                    self._alive.append(t)
        return out


def _storage(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor without storage
        return None


class ForwardOps(NamedTuple):
    curved: dict[str, int]  # the ATen ops through which the model is not piecewise linear in x, with call counts
    count: int  # every ATen op the forward ran (what capturing its graph costs grows with)


def forward_ops(model: Callable, x: torch.Tensor) -> ForwardOps:
    """The model's ATen ops at x. Runs the model once on x."""
    x = x.detach()
    recorder = _Recorder(x)
    with torch.no_grad(), recorder:
        model(x)
    return ForwardOps(recorder.curved, recorder.count)


def curved_ops(model: Callable, x: torch.Tensor) -> dict[str, int]:
    """ATen ops (with call counts) through which the model is not piecewise linear
    in x; empty when it is. Runs the model once on x."""
    return forward_ops(model, x).curved


# model -> {(input shape, dtype, device, the model's modules and modes): forward_ops at such an x}
_checked: weakref.WeakKeyDictionary[object, dict] = weakref.WeakKeyDictionary()


def _structure(model) -> tuple:
    """Each submodule's name, type and mode, and each tensor's name, shape and dtype: what a
    captured graph or a check depends on besides the values."""
    if not isinstance(model, torch.nn.Module):
        return ()
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    return tuple((name, type(m), m.training) for name, m in model.named_modules()) + tuple(
        (name, tuple(t.shape), t.dtype) for name, t in tensors
    )


def forward_ops_cached(model: Callable, x: torch.Tensor) -> ForwardOps:
    """forward_ops, run once per model, input shape, dtype, device and structure (see curved_ops_cached)."""
    key = (tuple(x.shape), x.dtype, x.device, _structure(model))
    return per_model(_checked, model, key, lambda: forward_ops(model, x))


def curved_ops_cached(model: Callable, x: torch.Tensor) -> dict[str, int]:
    """curved_ops, run once per model, input shape, dtype, device and structure (_structure: each
    submodule's name, type and mode, each tensor's shape and dtype) and then taken from a cache:
    the check is a forward under a Python dispatch mode, a third of a plain gradient on small networks
    (`pykernels bench --ops flatness_hvp`, one-shot hvp()). A model whose ops at x depend on
    the values of x (data-dependent branches) or whose forward is replaced in place keeps its
    first answer: call curved_ops for those."""
    return dict(forward_ops_cached(model, x).curved)


def per_model(store: weakref.WeakKeyDictionary, model, key, compute: Callable):
    """compute() once per model and key, kept in store; every time for a model that cannot be
    weakly referenced."""
    try:
        cache = store.setdefault(model, {})
    except TypeError:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return cache[key]
