"""Calling the user's classifier: argument checks, train-mode handling, frozen
parameters, and the log-likelihood log p(x) = logsumexp f(x) (up to log Z)."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Optional

import torch

from .._validation import check_choice
from . import ops

TRAIN_MODES = ("eval", "raise")

# Layers whose train mode changes log p: batch statistics couple the examples of a
# batch; dropout makes log p random.
_BATCH_COUPLED = (torch.nn.modules.batchnorm._BatchNorm,)
_TRAIN_SPECIFIC = _BATCH_COUPLED + (torch.nn.modules.dropout._DropoutNd, torch.nn.modules.instancenorm._InstanceNorm)

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_reported: weakref.WeakKeyDictionary[object, set[str]] = weakref.WeakKeyDictionary()


def _user_stacklevel() -> int:
    """The stacklevel of the first frame outside pykernels (and contextlib), so a
    warning points at the user's call."""
    level, frame = 1, sys._getframe(2)
    while frame is not None and (
        frame.f_code.co_filename.startswith(_PACKAGE_DIR + os.sep) or frame.f_code.co_filename == contextlib.__file__
    ):
        frame, level = frame.f_back, level + 1
    return level + 1


def report_once(owner, key: str, message: str) -> None:
    """A warning the first time `key` comes up for `owner` (a model), then silence."""
    try:
        seen = _reported.setdefault(owner, set())
    except TypeError:  # not weak-referenceable: report every time
        seen = set()
    if key not in seen:
        seen.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=_user_stacklevel())


def check_inputs(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor [B, ...], got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(
            f"x must have a batch dim [B, ...] (B examples of shape ...), got shape {tuple(x.shape)}; "
            f"for a single example use x.unsqueeze(0)"
        )
    if x.shape[0] == 0:
        raise ValueError(f"x is an empty batch (shape {tuple(x.shape)}): there is nothing to measure")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {str(x.dtype).replace('torch.', '')}")
    return x


def check_hessian_dtype(dtype: torch.dtype, what: str) -> None:
    """The Hessian measures (and hvp) run in float32 or float64: refused up front for 16-bit
    inputs or models, whose second derivatives are mostly rounding error."""
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"Hessian measures need float32 or float64, got {what} in {str(dtype).replace('torch.', '')} "
            f"(second derivatives in 16-bit precision are mostly rounding error); measure a float32 copy: "
            f"copy.deepcopy(model).float() and x.float()"
        )


def check_logits(logits, batch: int) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"the model must return a logits tensor [B, K], got {type(logits).__name__} "
            f"(wrap it, e.g. lambda x: model(x).logits)"
        )
    if logits.dim() != 2 or logits.shape[0] != batch:
        raise ValueError(
            f"the model must return 2-D logits [B, K] with B = {batch} (x.shape[0]), got shape {tuple(logits.shape)}"
        )
    if logits.shape[1] < 1:
        raise ValueError("the model returned logits with no classes (K = 0)")
    return logits


def check_finite_logits(logits: torch.Tensor) -> None:
    bad = ~torch.isfinite(logits).all(dim=1)
    if bad.any():
        idx = bad.nonzero().flatten().tolist()
        shown = ", ".join(map(str, idx[:10])) + (", ..." if len(idx) > 10 else "")
        raise ValueError(
            f"the model produced NaN or infinite logits for {len(idx)} example(s) (indices {shown}); "
            f"log p and its derivatives are undefined there"
        )


def warn_if_normalized(model, logits: torch.Tensor) -> None:
    """Warns (once per model) when the outputs look normalised rather than logits: log-softmax
    outputs have logsumexp 0 in every row, so log p is constant and every measure is 0;
    probabilities (non-negative rows summing to 1) are read as logits, which they are not."""
    tol = 1e-4 if logits.dtype == torch.float64 else 1e-3
    if bool((torch.logsumexp(logits, 1).abs() < tol).all()):
        what = "log-probabilities (logsumexp = 0 for every example: log p is then constant and every measure is 0)"
    elif bool((logits >= 0).all()) and bool(((logits.sum(1) - 1).abs() < tol).all()):
        what = "probabilities (non-negative rows summing to 1, read here as logits)"
    else:
        return
    report_once(
        model,
        "normalized-output",
        f"pykernels.flatness: the model's outputs look like {what}; the measures "
        f"need pre-softmax logits (drop the final softmax / log_softmax)",
    )


def _train_mode_modules(model) -> list[tuple[str, torch.nn.Module]]:
    if not isinstance(model, torch.nn.Module):
        return []
    return [(name or "<model>", m) for name, m in model.named_modules() if m.training]


@contextlib.contextmanager
def measurement_mode(model, train_mode: str = "eval", what: str = "measure") -> Iterator[None]:
    """Runs the body with the model in eval mode, restoring every module's mode after.

    If train mode matters (BatchNorm with batch statistics couples the examples of a
    batch, so one example's Hessian would depend on the others; dropout makes log p
    random), the model is measured in eval mode and this is reported once per model
    (train_mode="eval"), or refused with an error (train_mode="raise").
    """
    check_choice("train_mode", train_mode, TRAIN_MODES)
    with _second_order_forms(model):
        yield from _in_eval_mode(model, train_mode, what)


def _in_eval_mode(model, train_mode: str, what: str) -> Iterator[None]:
    training = _train_mode_modules(model)
    if not training:
        yield
        return
    special = [(name, m) for name, m in training if isinstance(m, _TRAIN_SPECIFIC)]
    if special:
        coupled = [f"{type(m).__name__} '{name}'" for name, m in special if isinstance(m, _BATCH_COUPLED)]
        others = [f"{type(m).__name__} '{name}'" for name, m in special if not isinstance(m, _BATCH_COUPLED)]
        why = (
            f"{', '.join(coupled[:3])} in train mode couples the examples of a batch"
            if coupled
            else f"{', '.join(others[:3])} in train mode makes log p random"
        )
        if train_mode == "raise":
            raise ValueError(
                f"the model is in train mode: {why}. Call model.eval() first, or pass "
                f"train_mode='eval' to {what} in eval mode"
            )
        report_once(
            model,
            f"train-mode:{what}",
            f"pykernels.flatness: the model is in train mode ({why}); "
            f"{what} runs in eval mode and the model's modes are restored after",
        )
    flags = [(m, m.training) for _, m in training]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _hardsigmoid(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """F.hardsigmoid from ops that have double backward and forward-mode rules (PyTorch 2.13's
    hardsigmoid_backward has neither): the same values, 1/6 as the derivative on (-3, 3)."""
    out = torch.where((input > -3) & (input < 3), input / 6 + 0.5, (input >= 3).to(input.dtype))
    return input.copy_(out) if inplace else out


class _SecondOrderForms(torch.overrides.TorchFunctionMode):
    """Runs the functions whose PyTorch kernels have no second derivative in a form that has one."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.nn.functional.hardsigmoid:
            return _hardsigmoid(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


# Models seen calling F.hardsigmoid as a function (no Hardsigmoid module shows it): measured
# under _SecondOrderForms from then on.
_calls_hardsigmoid: weakref.WeakSet = weakref.WeakSet()


def _takes_second_order_forms(model) -> bool:
    """The model has a Hardsigmoid module (MobileNetV3's squeeze-excitation blocks) or was seen
    calling F.hardsigmoid."""
    with contextlib.suppress(TypeError):  # not weak-referenceable: never marked
        if model in _calls_hardsigmoid:
            return True
    return isinstance(model, torch.nn.Module) and any(isinstance(m, torch.nn.Hardsigmoid) for m in model.modules())


def _second_order_forms(model):
    """_SecondOrderForms while measuring a model that needs them: only then, since a function
    mode costs every op a Python call."""
    return _SecondOrderForms() if _takes_second_order_forms(model) else contextlib.nullcontext()


def mark_calls_hardsigmoid(model) -> bool:
    """Marks the model as calling F.hardsigmoid, so that it is measured under _SecondOrderForms;
    False where that changes nothing (it has the forms already) or it cannot be marked (not
    weak-referenceable)."""
    if _takes_second_order_forms(model):
        return False
    try:
        _calls_hardsigmoid.add(model)
    except TypeError:
        return False
    return True


def with_second_order_forms(measure: Callable) -> Callable:
    """measure(model, ...), run once more under _SecondOrderForms when PyTorch had no second
    derivative for an F.hardsigmoid the model calls (the model is marked: its later calls take
    the forms from the start). A call that succeeds costs nothing more."""

    @functools.wraps(measure)
    def measured(model, *args, **kwargs):
        try:
            return measure(model, *args, **kwargs)
        except (RuntimeError, NotImplementedError) as exc:
            # PyTorch's errors for hardsigmoid's second derivative: double backward, forward mode
            if "hardsigmoid_backward" not in str(exc) or not mark_calls_hardsigmoid(model):
                raise
        return measure(model, *args, **kwargs)

    return measured


def graph_calls_hardsigmoid(output: torch.Tensor) -> bool:
    """output's autograd graph holds hardsigmoid, whose backward has no derivative in PyTorch: a
    loss built on output's gradient could not be differentiated (curvature_penalty's)."""
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__.startswith("HardsigmoidBackward"):
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


class NotScalarLoss(ValueError):
    """The loss function returned something other than a scalar tensor: the caller's error, raised
    as is by every method (never reported as a method that failed and fallen back from)."""


def scalar_loss(loss) -> torch.Tensor:
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
        what = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise NotScalarLoss(f"loss_fn(model(x), y) must return a scalar tensor (reduce it: mean or sum), got {what}")
    return loss


def check_eval_for_compile(model) -> None:
    """Under torch.compile the measures cannot switch a model to eval mode and back (a graph
    break), so a model with any module in train mode is refused with what to do."""
    if _train_mode_modules(model):
        raise ValueError(
            "under torch.compile the flatness measures cannot switch the model to eval mode "
            "(a graph break): call model.eval() before compiling"
        )


@contextlib.contextmanager
def frozen_parameters(model) -> Iterator[None]:
    """Parameters stop requiring grad for the body: input-space derivatives then
    build no graph towards the weights (measurably faster)."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def log_likelihood_fn(
    model: Callable, backend: Optional[str] = None, check_shape: bool = False
) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [B, ...] -> log p(x) + log Z = logsumexp of the logits, [B]. Under torch.compile the
    reference logsumexp: fake tensors cannot run the energy op inside torch.func transforms,
    and the compiler fuses the reference anyway. check_shape: the output must be [B, K] logits
    (check_logits; no values read, so no host sync), for callers without a validating forward."""

    def log_p(x: torch.Tensor) -> torch.Tensor:
        logits = check_logits(model(x), x.shape[0]) if check_shape else model(x)
        return -ops.energy(logits, backend="reference" if torch.compiler.is_compiling() else backend)

    return log_p


def _dtype_hint(model, x: torch.Tensor) -> str:
    params = model.parameters() if isinstance(model, torch.nn.Module) else ()
    dtypes = {p.dtype for p in params if p.is_floating_point()}
    if dtypes and x.dtype not in dtypes:
        names = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes))
        return f"; x is {str(x.dtype).replace('torch.', '')} and the model's parameters are {names}"
    return ""


def validated_logits(model: Callable, x: torch.Tensor, keep_graph: bool = False) -> torch.Tensor:
    """One plain forward at x: the model's output must be finite [B, K] logits (a warning
    when they look like probabilities or log-probabilities). Under torch.compile only the
    shape is checked: the checks that read values would break the graph. keep_graph: the
    forward runs with autograd on and the logits keep their graph, for a caller that
    differentiates them (it saves that caller a second forward)."""
    return timed_validated_logits(model, x, keep_graph)[0]


def timed_validated_logits(model: Callable, x: torch.Tensor, keep_graph: bool = False) -> tuple[torch.Tensor, float]:
    """validated_logits, and the seconds the model's forward took (the checks not counted; on
    a GPU the kernels' launch, not their run; 0 under torch.compile)."""
    clock = (lambda: 0.0) if torch.compiler.is_compiling() else time.perf_counter  # a clock breaks a graph
    with torch.enable_grad() if keep_graph else torch.no_grad():
        try:
            start = clock()
            out = model(x)
            seconds = clock() - start
        except Exception as exc:  # most often x lacks its batch dim, or is in another dtype: say what x was
            raise RuntimeError(
                f"the model failed on x of shape {tuple(x.shape)} (x must be a batch [B, ...] "
                f"of the inputs the model takes){_dtype_hint(model, x)}: {type(exc).__name__}: {exc}"
            ) from exc
        logits = check_logits(out, x.shape[0])
    if torch.compiler.is_compiling():
        return logits, seconds
    check_finite_logits(logits)
    warn_if_normalized(model, logits)
    return logits, seconds
