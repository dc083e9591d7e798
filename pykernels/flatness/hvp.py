"""Hessian-vector products of log p(x) with respect to the input, batched over
examples and over probe vectors.

In eval mode the input Hessian of sum_b log p(x_b) is block-diagonal over the
batch, so one batched product applies every example's own Hessian H_b to its
own vectors: v [S, B, ...] -> H v [S, B, ...].

Methods (`method=`):
  "forward-over-reverse"  jvp of the input gradient, vmapped over the S vectors
                          (torch.func). Exact.
  "forward-over-reverse-per-example"  the same with the gradient of one example,
                          vmapped over the examples and then the vectors
                          (torch.func's batching). Exact.
  "forward-adjoint"       quadratic forms v . H v (Hutchinson, the residual and
                          tr(Q^T H Q) of Hutch++): one forward tangent pass per
                          vector, weighted by second derivatives of each curved op
                          and the adjoints of one shared reverse pass
                          (_forward_adjoint.py). Exact; about half the FLOPs of
                          forward-over-reverse. Products H v: half the gradient
                          of v . H v in v, by autograd through that tangent pass
                          (no derivative of the model recomputed per vector: 2.6x
                          faster than double backward on the bench's SiLU ResNet,
                          slower on its MLPs). Needs the model's graph (make_fx):
                          a model whose graph cannot be captured (data-dependent
                          control flow) falls back to double backward, reported once.
  "double-backward"       reverse-over-reverse: the gradient with create_graph,
                          then one batched backward per chunk of vectors. Exact;
                          the fallback for ops without forward-mode AD.
  "finite-difference"     (g(x + h v) - g(x - h v)) / 2h with g the input gradient,
                          both sides in one batched gradient. Step h per example
                          and vector: fd_step * max(1, ||x_b||) / ||v|| with
                          fd_step = eps^(1/3) of the dtype unless given (~5e-3 in
                          float32, ~6e-6 in float64). O(h^2) error; on
                          piecewise-linear nets exact unless a kink lies within h.
  "gauss-newton"          J^T (diag(s) - s s^T) J v: forward-mode J v, the fused
                          logit-space step, then J^T by a vmapped vjp. Equal to
                          the Hessian almost everywhere for piecewise-linear
                          networks; elsewhere its positive semi-definite part.
                          When at least K vectors are expected (estimators say
                          how many) and J (K x D per example) fits in 2^25
                          elements, J is formed once from K batched
                          vector-Jacobian products and every product is then two
                          small matrix products around the fused step: the
                          rank <= K - 1 structure makes S probes cost K passes.
  "auto" (default)        "double-backward" when at most FEW_VECTORS vectors are
                          expected (1.4-8x faster than forward-over-reverse for
                          one vector on every smooth family of `pykernels bench
                          --ops flatness_hvp`, 2.3-2.7x faster than Gauss-Newton
                          on the piecewise-linear CNN). Otherwise "gauss-newton"
                          when every op the model runs at x is piecewise linear
                          in x (checked, see _piecewise.py); on a smooth network
                          "double-backward" for chunks of at most FEW_VECTORS,
                          else "double-backward" on the model's first operator
                          (untimed: timing costs about six products) and, from
                          its second, the fastest of "double-backward", the
                          two forward-over-reverse batchings and, where its
                          quadratic forms equal double backward's,
                          "forward-adjoint" (kept only if its products equal
                          double backward's too), timed once on a chunk in two
                          alternating rounds (each method's fastest kept) and
                          cached per model, input shape, dtype and
                          number of vectors (with 32 vectors none wins on
                          every family: forward-over-reverse was up to 1.3x
                          faster on a GELU CNN, double backward 1.4x on MLPs
                          and attention and 2.5x on a SiLU ResNet). Quadratic
                          forms (more than FEW_VECTORS) take "forward-adjoint",
                          untimed, once its values have equalled double
                          backward's on two random vectors (1.7-3.5x faster than
                          the fastest product method on every smooth family of
                          the benchmark: benchmarks/RESULTS.md, CPU flatness);
                          on a CPU, a model's first call takes "double-backward"
                          where capturing its graph would cost more than that
                          saves (a small model, few vectors: _defers_capture),
                          and the next call captures. If forward mode is not
                          supported by the model (an op or
                          autograd.Function without a forward-mode rule, a
                          torch.func limitation such as data-dependent control
                          flow under vmap), "double-backward", reported once per
                          model. Any other error (out of memory, a bug in the
                          model) is raised.

The autodiff methods differentiate torch.logsumexp (the "reference" energy) unless a
backend is given: through the fused kernel's autograd.Function wrappers they cost a fixed
8-20 ms more per call on a CPU, and the logit-space work they would speed up is K-sized.
Every method runs scaled_dot_product_attention by its math backend: the fused
CPU / GPU attention kernels have neither a forward-mode rule nor a double
backward, the math form (matmul, softmax) has both.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import time
import weakref
from collections.abc import Callable
from typing import Optional

import torch
from torch.func import grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .._validation import check_choice, check_int
from . import ops
from ._forward_adjoint import CaptureFailed, ForwardAdjointQuad, ParameterForwardAdjointQuad, describe, is_captured
from ._model import (
    TRAIN_MODES,
    NotScalarLoss,
    check_eval_for_compile,
    check_hessian_dtype,
    check_inputs,
    frozen_parameters,
    log_likelihood_fn,
    measurement_mode,
    report_once,
    scalar_loss,
    timed_validated_logits,
    validated_logits,
    with_second_order_forms,
)
from ._piecewise import curved_ops_cached, forward_ops_cached

HVP_METHODS = (
    "auto",
    "forward-over-reverse",
    "forward-over-reverse-per-example",
    "forward-adjoint",
    "double-backward",
    "finite-difference",
    "gauss-newton",
)
FORWARD_METHODS = ("forward-over-reverse", "forward-over-reverse-per-example")
# What "auto" times on smooth networks with many vectors: for products H v, and for v . H v.
TIMED_METHODS = FORWARD_METHODS + ("double-backward",)

# Up to this many vectors per example, "auto" takes double backward on smooth networks: 1.4-8x
# faster than forward-over-reverse for one vector on every smooth family of
# `pykernels bench --ops flatness_hvp`, and at least as fast up to 4-8 vectors.
FEW_VECTORS = 8
TIMING_ROUNDS = 2  # each method timed this many times on the chunk, fastest kept
# model -> {(shape, dtype, device, chunk, "matvec" or "quad"): the method chosen for it, or UNTIMED}
_timed_choice: weakref.WeakKeyDictionary[object, dict] = weakref.WeakKeyDictionary()
UNTIMED = "double-backward, untimed"  # in _timed_choice: one operator ran double backward, the next times
# In _timed_choice: a first quadratic-form call on a small model ran double backward, the next captures.
DEFERRED = "double-backward, forward-adjoint deferred"
# What a first forward-adjoint call costs beyond its quadratic forms, on the development CPU
# (the bench families, 9-26 ATen ops): capturing the graph, 1.25-1.33 ms per ATen op of the
# forward (make_fx on fake tensors, whatever the tensors' sizes), and the check against double
# backward, about 8 forwards of the batch. Against that it saves about one forward per vector
# (double backward's products cost 1.7-2.7 forwards a vector, 16 on the ResNet; forward-adjoint
# 0.8-1.0). Both counted in the forward InputHessian times, a new model's first, which ran
# 1.5-3x a warm one: so as half, 0.5 per vector and 4 for the check.
CAPTURE_SECONDS_PER_OP = 1.3e-3
CHECK_FORWARDS = 4
SAVED_FORWARDS_PER_VECTOR = 0.5


def twice_differentiable():
    """Runs scaled_dot_product_attention by its math backend: the fused attention kernels have
    no forward-mode rule and no double backward, the composite math form has both."""
    return sdpa_kernel(SDPBackend.MATH)


# What torch says when forward-mode AD or a torch.func transform does not support something the
# model does (its "not implemented" errors are NotImplementedError).
_TRANSFORM_LIMIT = re.compile(r"forward AD|forward grad|forward-mode|jvp|vmap|functorch|batching rule", re.IGNORECASE)


def forward_over_reverse(log_p: Callable, x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """H v of sum_b log_p(x)_b for every vector of V [S, *x.shape]: jvp of the gradient, vmapped
    over the vectors. A pure function: torch.compile(fullgraph=True) traces it without a graph
    break on MLPs and CNNs (log_p with the reference energy: our kernels have no forward-mode
    rule under compile), not through BatchNorm or LayerNorm (PyTorch 2.13's fake tensors fail
    on their forward-mode rules); reverse_over_reverse compiles there."""
    g = grad(lambda t: log_p(t).sum())
    return vmap(lambda v: jvp(g, (x,), (v,))[1])(V)


def forward_over_reverse_per_example(log_p: Callable, x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """The same products with the gradient of one example, vmapped over the examples and then the
    vectors: the torch.func formulation of `pykernels bench`'s baseline. Neither batching wins on
    every network on a CPU (each was up to 1.4x faster than the other across the bench's smooth
    families), so "auto" times both."""
    one = grad(lambda xb: log_p(xb.unsqueeze(0))[0])
    return vmap(vmap(lambda xb, vb: jvp(one, (xb,), (vb,))[1]), in_dims=(None, 0))(x, V)


def reverse_over_reverse(log_p: Callable, x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """The same products as the gradient of v . grad sum log_p, vmapped over the vectors (the
    primal forward and backward run once, unbatched). torch.compile(fullgraph=True) traces it
    without a graph break on every smooth family of the tests, BatchNorm and attention included."""
    g = grad(lambda t: log_p(t).sum())
    return vmap(lambda v: grad(lambda t: (g(t) * v).sum())(x))(V)


class TracedInputHessian:
    """The input Hessians as a pure operator for code traced by torch.compile (what the measures
    use under torch.compiler.is_compiling()): products by reverse_over_reverse, which
    Dynamo traces without a graph break through BatchNorm (eval) and attention too; no
    validation, timing, caches or mode switches, which would break the graph. The model must
    already be in eval mode."""

    def __init__(self, model: Callable, x: torch.Tensor, chunk_size: Optional[int] = None):
        check_eval_for_compile(model)
        check_hessian_dtype(x.dtype, "x")
        self.x, self.batch, self.shape = x.detach(), x.shape[0], tuple(x.shape[1:])
        self.dim, self.dtype, self.device = math.prod(self.shape), x.dtype, x.device
        self.chunk_size = chunk_size or default_chunk_size(self.batch * self.dim, x.device)
        self._log_p = log_likelihood_fn(model, "reference")

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        # no_grad: the parameters keep requires_grad under compile (see prepared), and products
        # differentiable in them would make AOTAutograd trace a backward through the estimators'
        # in-place writes (Lanczos). torch.func.grad ignores an outer no_grad.
        with twice_differentiable(), torch.no_grad():
            HV = reverse_over_reverse(self._log_p, self.x, V.reshape(V.shape[0], self.batch, *self.shape))
        return HV.reshape(V.shape)

    def quad(self, V: torch.Tensor) -> torch.Tensor:
        return (V * self.matvec(V)).flatten(2).sum(-1)


def transform_unsupported(exc: BaseException) -> bool:
    """Whether a product failed because the model is beyond forward-mode AD or batching (vmap,
    is_grads_batched), which the fallback does not need; not for running out of memory or a bug
    in the model."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    return isinstance(exc, NotImplementedError) or bool(_TRANSFORM_LIMIT.search(str(exc)))


def grads_per_vector(backward: Callable, vectors: torch.Tensor, model) -> tuple:
    """backward(v) (a tuple of gradients) for every v in vectors [S, ...], each output stacked
    over S: one batched call (is_grads_batched) where PyTorch's batching rules allow it, else one
    call per vector. A batched call that fails where the first vector alone succeeds failed in
    the batching, not in the model: GroupNorm's double backward in PyTorch 2.13 raises a shape
    error there. That is reported once per model; the single vector's error is raised as is."""
    try:
        return backward(vectors, is_grads_batched=True)
    except (RuntimeError, NotImplementedError) as exc:
        if isinstance(exc, torch.OutOfMemoryError):
            raise
        rows = [backward(vectors[0])]  # the model's own error, if it has one, is raised here
        report_once(
            model,
            "hvp-fallback:batched-double-backward",
            f"pykernels.flatness: batched double backward failed on this model ({describe(exc)}); "
            f"one vector at a time instead (slower)",
        )
        rows += [backward(v) for v in vectors[1:]]
        return tuple(torch.stack(parts) for parts in zip(*rows))


def default_chunk_size(rows_per_probe: int, device: torch.device) -> int:
    """Probe vectors per batched call: about 2^20 input elements on a CPU (keeps
    the tangent activations cache-sized), 2^24 on a GPU."""
    budget = 2**24 if device.type == "cuda" else 2**20
    return max(1, budget // max(1, rows_per_probe))


class InputHessian:
    """The input Hessians H_b of log p at each x_b, as one batched linear operator
    on vectors [S, B, D] (D = the flattened input size).

    Build it inside `prepared(model, x)`, which puts the model in eval mode and
    freezes its parameters for the duration.
    """

    def __init__(
        self,
        model: Callable,
        x: torch.Tensor,
        *,
        method: str = "auto",
        backend: Optional[str] = None,
        chunk_size: Optional[int] = None,
        fd_step: Optional[float] = None,
        expected_vectors: Optional[int] = None,
    ):
        check_choice("method", method, HVP_METHODS)
        if chunk_size is not None:
            check_int("chunk_size", chunk_size, minimum=1)
        if expected_vectors is not None:
            check_int("expected_vectors", expected_vectors, minimum=0)
        check_hessian_dtype(x.dtype, "x")
        self.model, self.x, self.backend = model, x.detach(), backend
        self.batch, self.shape = x.shape[0], tuple(x.shape[1:])
        self.dim = math.prod(self.shape)
        # The autodiff paths differentiate log p twice; through our energy kernel that goes via
        # autograd.Function wrappers under torch.func, a fixed 8-20 ms per call on a CPU
        # (`pykernels bench --ops flatness_hvp`) for nothing: the logit-space work is K-sized.
        # They use torch.logsumexp unless a backend is asked for.
        self._energy_backend = backend or "reference"
        self._log_p = log_likelihood_fn(model, self._energy_backend)
        self._graph: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (x, its gradient with graph)
        self.expected_vectors = expected_vectors  # in all, over every call (None: not said)
        few = expected_vectors is not None and expected_vectors <= FEW_VECTORS
        if method == "double-backward" or method == "auto" and few:
            # The validating forward builds the gradient graph too: a one-shot hvp() runs one
            # forward, not two (on an MLP a forward is a third of the plain gradient it is timed by).
            self.logits = self._build_gradient_graph()
            self._forward_seconds = None
        else:  # the forward's time: the scale of the model's work (see _capture_pays)
            self.logits, self._forward_seconds = timed_validated_logits(model, self.x)
        check_hessian_dtype(self.logits.dtype, "the model's output")
        self.chunk_size = chunk_size or default_chunk_size(self.batch * self.dim, x.device)
        self.fd_step = fd_step
        self.curved: Optional[dict[str, int]] = None
        # For "auto" on a smooth network with many vectors: chosen by timing the first chunk.
        self.timings: Optional[dict[str, float]] = None
        if method == "auto":
            self.curved = curved_ops_cached(model, self.x)
            if few:
                # One HVP or a few: double backward, the fastest on every family of the benchmark,
                # piecewise-linear ones included (a ReLU CNN's product: 1.3 plain gradients against
                # Gauss-Newton's 2.9-4.0, whose Jacobian pays for itself only over K or more vectors).
                method = "double-backward"
            elif not self.curved:
                method = "gauss-newton"
        self.method = method
        # v . H v: "forward-adjoint" where asked for or timed fastest, else from the products H v.
        self.quad_method = method
        self._forward_adjoint: Optional[ForwardAdjointQuad] = None
        self._deferred: Optional[bool] = None  # see _defers_capture
        K = self.logits.shape[1]
        self._use_jacobian = (
            method == "gauss-newton" and (expected_vectors or 0) >= K and K * self.batch * self.dim <= JACOBIAN_BUDGET
        )
        self._jacobian: Optional[torch.Tensor] = None

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    @property
    def device(self) -> torch.device:
        return self.x.device

    def _sum_log_p(self, x: torch.Tensor) -> torch.Tensor:
        return self._log_p(x).sum()

    def _choice_key(self, vectors: int, kind: str = "matvec"):
        return (tuple(self.x.shape), self.dtype, self.device, vectors, kind)

    # ---- H v ----

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        """[S, B, D] -> [S, B, D]: H_b v for every vector of every example."""
        S = V.shape[0]
        with twice_differentiable():
            out = [self._matvec_chunk(V[i : i + self.chunk_size]) for i in range(0, S, self.chunk_size)]
        return torch.cat(out) if len(out) > 1 else out[0]

    def _matvec_chunk(self, V: torch.Tensor) -> torch.Tensor:
        Vx = V.reshape(V.shape[0], self.batch, *self.shape)
        if self.method == "auto":
            if Vx.shape[0] <= FEW_VECTORS:  # e.g. Lanczos steps: double backward, no timing needed
                return self._double_backward(Vx).reshape(V.shape)
            return self._timed(Vx, "matvec").reshape(V.shape)
        if self.method == "forward-adjoint":
            return self._forward_adjoint_products(Vx).reshape(V.shape)
        if self.method in FORWARD_METHODS:
            try:
                return self._forward_over_reverse(Vx, self.method).reshape(V.shape)
            except (RuntimeError, NotImplementedError) as exc:
                if isinstance(exc, torch.OutOfMemoryError):
                    raise
                # beyond forward mode or vmap, or a torch rule that breaks under them (GRU and LSTM
                # under vmap per example: "output with shape [1, 6] doesn't match the broadcast
                # shape"): double backward, whose own failure (a bug in the model) raises exc
                return self._fall_back(exc, Vx).reshape(V.shape)
        if self.method == "double-backward":
            return self._double_backward(Vx).reshape(V.shape)
        if self.method == "finite-difference":
            return self._finite_difference(Vx).reshape(V.shape)
        return self._gauss_newton(Vx).reshape(V.shape)

    def _forward_over_reverse(self, Vx, method: str = "forward-over-reverse"):
        per_example = method == "forward-over-reverse-per-example"
        product = forward_over_reverse_per_example if per_example else forward_over_reverse
        return product(self._log_p, self.x, Vx)

    def _timed(self, Vx, kind: str = "matvec"):
        """The method "auto" runs on this chunk, chosen once per model, shape and chunk size and
        cached. Products H v: double backward on the model's first operator, untimed; the next
        one times the product methods (TIMED_METHODS) on its chunk and keeps the fastest.
        Quadratic forms v . H v take forward-adjoint untimed once its values have equalled double
        backward's on two random vectors: it beat the fastest product method 1.7-3.5x on every
        smooth family of the benchmark (benchmarks/RESULTS.md, CPU flatness), and timing the
        products made a one-shot hessian_trace 4-25x slower than the trace itself; when it is
        dropped, the products go as above. Except on a model's first operator where capturing its
        graph would not pay (_defers_capture): double backward, and the next operator captures."""
        key = self._choice_key(Vx.shape[0], kind)
        try:
            choices = _timed_choice.setdefault(self.model, {})
        except TypeError:  # not weak-referenceable: nothing cached, nothing timed
            choices = {}
        cached = choices.get(key)
        if cached not in (None, UNTIMED, DEFERRED):
            self._choose(cached, kind)
            return self._run(cached, Vx, kind)
        if kind == "quad" and cached is None and self._defers_capture(choices, Vx.shape[0]):
            # A small model's first quadratic forms: capturing its graph would cost more than
            # forward-adjoint saves on them (on an MLP a first hessian_trace took 0.65-0.78x
            # torch.func's time), so double backward now, and the next operator captures.
            choices[key] = DEFERRED
            self._choose("double-backward", kind)
            return self._run("double-backward", Vx, kind)
        if kind == "quad" and cached in (None, DEFERRED) and self._forward_adjoint_agrees():
            self._choose("forward-adjoint", kind)
            choices[key] = "forward-adjoint"
            return self._forward_adjoint_quad(Vx)
        if cached in (None, DEFERRED):
            # The model's first chunk of this size: double backward, untimed, and the next operator
            # times the three. Timing them costs about six products, which made a first Hutch++
            # (its sketch) run at 0.3-0.9x torch.func's speed; double backward was the fastest product
            # method on five of the six smooth families of the benchmark (GELU CNN: 1.1-1.3x slower).
            choices[key] = UNTIMED
            self._choose("double-backward", kind)
            return self._run("double-backward", Vx, kind)
        # Two rounds, alternating, keeping each method's fastest time: the method timed first on a
        # fresh process pays one-off costs (allocator growth, first transform call), and one
        # timing on a shared machine is noisy; a single round picked the slower method on a
        # GELU CNN (`pykernels bench --ops flatness_trace`).
        self.timings, results = {}, {}
        candidates = list(TIMED_METHODS)
        if kind == "matvec" and self._forward_adjoint_agrees():  # its products: half the gradient of its quad
            candidates.append("forward-adjoint")
        for _ in range(TIMING_ROUNDS):
            for method in list(candidates):
                if method == "double-backward":
                    self._graph = None  # timed with the gradient it builds, as a one-chunk call runs it
                start = time.perf_counter()
                try:
                    results[method] = self._run(method, Vx, kind, fall_back=False)
                except (RuntimeError, NotImplementedError) as exc:
                    if method == "double-backward" or isinstance(exc, torch.OutOfMemoryError):
                        raise
                    if not (transform_unsupported(exc) or isinstance(exc, CaptureFailed)):
                        self._run("double-backward", Vx, kind)  # a bug in the model raises here too
                    self._report_fallback(exc, method)
                    candidates = [m for m in candidates if m in ("double-backward",) or not _fails_with(method, m)]
                    continue
                self.timings[method] = min(self.timings.get(method, math.inf), time.perf_counter() - start)
        if "forward-adjoint" in self.timings and not forward_adjoint_matches(
            self.model, results["forward-adjoint"], results["double-backward"], what="products"
        ):  # its quadratic forms agreed, their gradient not (a rule autograd cannot follow)
            del self.timings["forward-adjoint"]
        choice = min(self.timings, key=self.timings.get)
        self._choose(choice, kind)
        with contextlib.suppress(TypeError):
            _timed_choice.setdefault(self.model, {})[key] = choice
        return results[choice]

    def _choose(self, method: str, kind: str) -> None:
        if kind == "quad":
            self.quad_method = method
        else:
            self.method = method

    def _run(self, method: str, Vx, kind: str, fall_back: bool = True):
        """One chunk by one exact method: H v [S, B, ...] or, for kind "quad", v . H v [S, B]."""
        if method == "forward-adjoint":
            if kind == "quad":
                return self._forward_adjoint_quad(Vx, fall_back)
            return self._forward_adjoint_products(Vx, fall_back)
        if method == "double-backward":
            Hv = self._double_backward(Vx)
        else:
            Hv = self._forward_over_reverse(Vx, method)
        return ops.probe_dots(Vx.flatten(2), Hv.flatten(2), backend=self.backend) if kind == "quad" else Hv

    def _defers_capture(self, choices: dict, vectors: int) -> bool:
        """This operator's quadratic forms take double backward without capturing the graph: it
        decided so on its first call, or it is the model's first operator and the capture does
        not pay (any later operator of the model captures, whatever its number of vectors)."""
        if self._deferred is None:
            first = DEFERRED not in choices.values()
            self._deferred = first and not self._capture_pays(max(vectors, self.expected_vectors or 0))
        return self._deferred

    def _capture_pays(self, vectors: int) -> bool:
        """Forward-adjoint's one-off costs (CAPTURE_SECONDS_PER_OP) are paid back over the
        operator's `vectors` in all (Hutch++ asks for its quadratic forms in two calls), or
        already paid (the graph is cached)."""
        if self._forward_seconds is None or self.device.type != "cpu" or is_captured(self.model, self.x):
            return True  # (the costs above were measured on a CPU)
        ops = forward_ops_cached(self.model, self.x).count
        saved = (vectors * SAVED_FORWARDS_PER_VECTOR - CHECK_FORWARDS) * self._forward_seconds
        return saved >= CAPTURE_SECONDS_PER_OP * ops

    def _forward_adjoint_agrees(self) -> bool:
        """forward-adjoint must equal double backward on two random vectors before "auto" may use
        it: a graph captured along one side of a data-dependent branch, or an op whose rules the
        capture gets wrong, gives other values. A failure is reported once and the method dropped."""
        return forward_adjoint_agrees(
            self.model,
            (2, self.batch, *self.shape),
            self,
            lambda R: self._forward_adjoint_quad(R, fall_back=False),
            lambda R: ops.probe_dots(R.flatten(2), self._double_backward(R).flatten(2), backend=self.backend),
            lambda exc: self._report_fallback(exc, "forward-adjoint"),
        )

    def _forward_adjoint_quad(self, Vx, fall_back: bool = True):
        try:
            return self._forward_adjoint_operator()(Vx)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001  (a model error shows again in double backward, and is raised there)
            if not fall_back:
                raise
            self._report_fallback(exc, "forward-adjoint")
            self.quad_method = "double-backward"
            return ops.probe_dots(Vx.flatten(2), self._double_backward(Vx).flatten(2), backend=self.backend)

    def _forward_adjoint_products(self, Vx, fall_back: bool = True):
        try:
            return self._forward_adjoint_operator().products(Vx)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001  (as in _forward_adjoint_quad)
            if not fall_back:  # to the timing, which drops a method that raises a RuntimeError
                if isinstance(exc, (RuntimeError, NotImplementedError)):
                    raise
                raise RuntimeError(f"forward-adjoint products: {describe(exc)}") from exc
            self._report_fallback(exc, "forward-adjoint")
            self.method = "double-backward"
            return self._double_backward(Vx)

    def _forward_adjoint_operator(self) -> ForwardAdjointQuad:
        if self._forward_adjoint is None:
            log_p = torch.logsumexp(self.logits.detach(), -1)  # what its graph must give at x
            self._forward_adjoint = ForwardAdjointQuad(self.model, self.x, log_p)
        return self._forward_adjoint

    def _fall_back(self, exc: Exception, Vx):
        try:
            out = self._double_backward(Vx)
        except Exception:
            raise exc  # noqa: B904  (the first method's error, with the fallback's as its context)
        self._report_fallback(exc, self.method)
        self.method = "double-backward"
        return out

    def _report_fallback(self, exc: Exception, method: str) -> None:
        if isinstance(exc, CaptureFailed):
            what = "the model's graph could not be captured"
        elif method == "forward-adjoint":
            what = "the forward-adjoint graph could not run"
        else:
            what = "forward-mode AD failed"
        report_once(
            self.model,
            f"hvp-fallback:{_failure_family(method)}",
            f"pykernels.flatness: {what} on this model ({describe(exc)}); "
            f"{method} is not used, double backward instead",
        )

    def _build_gradient_graph(self, validate: bool = True) -> torch.Tensor:
        """The input gradient with its graph, kept for every later product (Lanczos: one per
        step, each of which rebuilt it before); the logits, detached. validate: the forward is
        the operator's validating one (at construction, not when "auto" times double backward)."""
        x = self.x.clone().requires_grad_()
        with twice_differentiable(), torch.enable_grad():
            logits = validated_logits(self.model, x, keep_graph=True) if validate else self.model(x)
            log_p = -ops.energy(logits, backend=self._energy_backend)
            (g,) = torch.autograd.grad(log_p.sum(), x, create_graph=True)
        self._graph = (x, g)
        return logits.detach()

    def _gradient_graph(self):
        if self._graph is None:
            self._build_gradient_graph(validate=False)
        return self._graph

    def _double_backward(self, Vx):
        x, g = self._gradient_graph()
        with torch.enable_grad():
            if Vx.shape[0] == 1:  # one vector: no batching needed
                return torch.autograd.grad(g, x, Vx[0], retain_graph=True)[0].unsqueeze(0)
            # retain_graph: the graph serves later calls, and the loop after a failed batched attempt
            backward = functools.partial(torch.autograd.grad, g, x, retain_graph=True)
            return grads_per_vector(backward, Vx, self.model)[0]

    def _finite_difference(self, Vx):
        S = Vx.shape[0]
        eps = torch.finfo(self.dtype).eps
        base = self.fd_step if self.fd_step is not None else eps ** (1 / 3)
        x_norm = self.x.flatten(1).norm(dim=1).clamp(min=1.0)  # [B]
        v_norm = Vx.flatten(2).norm(dim=2).clamp(min=torch.finfo(self.dtype).tiny)  # [S, B]
        h = (base * x_norm / v_norm).reshape(S, self.batch, *([1] * len(self.shape)))
        points = torch.cat([self.x + h * Vx, self.x - h * Vx]).reshape(2 * S * self.batch, *self.shape)
        g = grad(self._sum_log_p)(points).reshape(2, S, self.batch, *self.shape)
        return (g[0] - g[1]) / (2 * h)

    def _logit_tangents(self, Vx):
        """The logits and J v for every vector, [S, B, K]: by forward mode, or from J where it is
        formed. Where forward mode cannot run the model (an op without a forward-mode rule: the
        fused eval attention of nn.MultiheadAttention and TransformerEncoderLayer, oneDNN's float32
        LSTM), J is formed from K reverse passes from then on: the same operator."""
        if not self._use_jacobian:
            try:
                return vmap(lambda v: jvp(self.model, (self.x,), (v,)), out_dims=(None, 0))(Vx)
            except (RuntimeError, NotImplementedError) as exc:
                if isinstance(exc, torch.OutOfMemoryError):
                    raise
                elements = self.logits.shape[1] * self.batch * self.dim
                if elements > JACOBIAN_BUDGET:
                    raise RuntimeError(
                        f"gauss-newton: forward mode failed on this model ({describe(exc)}), and its "
                        f"Jacobian ({elements} elements) is over the {JACOBIAN_BUDGET} it may hold: "
                        f"pass fewer examples at a time"
                    ) from exc
                try:
                    self.jacobian()
                except Exception:
                    raise exc  # noqa: B904  (forward mode's error, with the reverse passes' as its context)
                report_once(
                    self.model,
                    "hvp-fallback:gauss-newton",
                    f"pykernels.flatness: forward-mode AD failed on this model ({describe(exc)}); "
                    f"gauss-newton forms the Jacobian from {self.logits.shape[1]} reverse passes instead",
                )
                self._use_jacobian = True
        return self.logits, torch.einsum("bkd,sbd->sbk", self.jacobian(), Vx.flatten(2))

    def jacobian(self) -> torch.Tensor:
        """J of the logits, [B, K, D] (formed once)."""
        if self._jacobian is None:
            self._jacobian = input_jacobian(self.model, self.x).transpose(0, 1)
        return self._jacobian

    def _gauss_newton(self, Vx):
        logits, U = self._logit_tangents(Vx)
        AU = ops.logsumexp_hvp(logits, U, backend=self.backend)[2]
        if self._use_jacobian:
            return torch.einsum("bkd,sbk->sbd", self.jacobian(), AU).reshape(Vx.shape)
        _, pullback = vjp(self.model, self.x)
        return vmap(lambda a: pullback(a)[0])(AU)

    # ---- v . H v ----

    def quad(self, V: torch.Tensor) -> torch.Tensor:
        """[S, B, D] -> [S, B]: v . H_b v. The Gauss-Newton form needs only J v:
        v . J^T A J v = u . A u with u = J v (no backward pass)."""
        if self.method != "gauss-newton":
            with twice_differentiable():
                out = [self._quad_chunk(V[i : i + self.chunk_size]) for i in range(0, V.shape[0], self.chunk_size)]
            return torch.cat(out) if len(out) > 1 else out[0]
        out = []
        for i in range(0, V.shape[0], self.chunk_size):
            chunk = V[i : i + self.chunk_size]
            logits, U = self._logit_tangents(chunk.reshape(-1, self.batch, *self.shape))
            AU = ops.logsumexp_hvp(logits, U, backend=self.backend)[2]
            out.append(ops.probe_dots(U, AU, backend=self.backend))
        return torch.cat(out)

    def _quad_chunk(self, V: torch.Tensor) -> torch.Tensor:
        Vx = V.reshape(V.shape[0], self.batch, *self.shape)
        # Many vectors in this call or in all (expected_vectors): a Hutchinson run in chunks of
        # FEW_VECTORS or fewer (chunk_size=4, to bound memory) took the products otherwise, 3.2x
        # slower on the GELU CNN.
        if self.quad_method == "auto" and max(V.shape[0], self.expected_vectors or 0) > FEW_VECTORS:
            return self._timed(Vx, "quad")
        if self.quad_method == "forward-adjoint":
            return self._forward_adjoint_quad(Vx)
        return ops.probe_dots(V, self._matvec_chunk(V), backend=self.backend)


def forward_adjoint_agrees(model, shape: tuple, like, forward_adjoint, double_backward, report) -> bool:
    """Whether forward_adjoint(R) equals double_backward(R) on random vectors R of `shape` (like's
    dtype and device). A forward-adjoint that cannot run is reported (`report(exc)`) and disagrees."""
    R = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=like.dtype).to(like.device)
    try:
        quads = forward_adjoint(R)
    except (torch.OutOfMemoryError, NotScalarLoss):
        raise
    except Exception as exc:  # noqa: BLE001  (an op the graph interpreter cannot run: another method)
        report(exc)
        return False
    # Differences below 0.1 eps |R|^2 agree: with a log-softmax head (log p constant, H = 0) both
    # sides are rounding noise (1e-3 eps |R|^2 on the sweep's model), whose relative difference
    # means nothing. A real Hessian's quadratic forms are far above that floor.
    reference = double_backward(R)
    floor = 0.1 * torch.finfo(R.dtype).eps * R.square().sum().item() / _agreement_tolerance(reference.dtype)
    return forward_adjoint_matches(model, quads, reference, floor)


def _agreement_tolerance(dtype: torch.dtype) -> float:
    return 1e-3 if dtype == torch.float32 else 1e-8


def forward_adjoint_matches(
    model, quads: torch.Tensor, reference: torch.Tensor, floor: float = 0.0, what: str = "quadratic forms"
) -> bool:
    """Whether forward-adjoint's quadratic forms (or products) equal double backward's (relative to
    the largest, or to floor if larger: 1e-3 in float32, 1e-8 in float64); a mismatch is reported
    once per model."""
    tol = _agreement_tolerance(reference.dtype)
    scale = reference.abs().max().clamp(min=max(floor, torch.finfo(reference.dtype).tiny))
    error = ((quads - reference).abs().max() / scale).item()
    if error <= tol:
        return True
    report_once(
        model,
        f"forward-adjoint-mismatch:{what}",
        f"pykernels.flatness: forward-adjoint {what} differ from double backward on this "
        f"model (relative error {error:.1e}); they are not used",
    )
    return False


def report_forward_adjoint_failure(model, exc: Exception) -> None:
    """Once per model: forward-adjoint could not run on it, and the products are used instead."""
    what = "could not be captured" if isinstance(exc, CaptureFailed) else "could not run"
    report_once(
        model,
        "parameter-forward-adjoint",
        f"pykernels.flatness: the loss's forward-adjoint graph {what} on this model "
        f"({describe(exc)}); parameter quadratic forms use Hessian-vector products instead",
    )


def _failure_family(method: str) -> str:
    """Methods that fail together: the forward-mode ones share forward-mode AD."""
    return "forward-adjoint" if method == "forward-adjoint" else "forward-mode"


def _fails_with(failed: str, method: str) -> bool:
    return _failure_family(failed) == _failure_family(method)


JACOBIAN_BUDGET = 2**25  # elements of J (K * B * D) the Gauss-Newton path may hold


def input_hessian(
    model: Callable, x: torch.Tensor, *, method: str = "auto", chunk_size: Optional[int] = None, **options
):
    """The operator the measures use: InputHessian (options: its backend, fd_step and
    expected_vectors), or under torch.compile the pure TracedInputHessian (reverse-over-reverse
    whatever `method` says: choosing, timing and validating would break the graph)."""
    if torch.compiler.is_compiling():
        check_choice("method", method, HVP_METHODS)
        return TracedInputHessian(model, x, chunk_size)
    return InputHessian(model, x, method=method, chunk_size=chunk_size, **options)


def input_jacobian(model: Callable, x: torch.Tensor) -> torch.Tensor:
    """d logits / d x for each example, [K, B, D]: K vector-Jacobian products, batched."""
    logits, pullback = vjp(model, x)
    B, K = logits.shape
    eye = torch.eye(K, dtype=logits.dtype, device=logits.device).unsqueeze(1)  # [K, 1, K]
    return vmap(lambda e: pullback(e.expand(B, K))[0])(eye).reshape(K, B, -1)


@contextlib.contextmanager
def prepared(model, x, train_mode: str = "eval", what: str = "measure", freeze: bool = True):
    """Validates x, puts the model in eval mode (see _model.measurement_mode) and,
    with freeze, stops its parameters requiring grad for the body.

    Under torch.compile it only validates: switching modes or requires_grad would break the
    graph, so the model must come in eval mode, and its parameters stay as they are (the
    input-space derivatives are taken with respect to x alone, so that costs graph size, not
    correctness)."""
    check_inputs(x)
    if torch.compiler.is_compiling():
        check_choice("train_mode", train_mode, TRAIN_MODES)
        check_eval_for_compile(model)
        yield
        return
    with measurement_mode(model, train_mode, what), frozen_parameters(model) if freeze else contextlib.nullcontext():
        yield


@with_second_order_forms
def hvp(
    model: Callable,
    x: torch.Tensor,
    v: torch.Tensor,
    *,
    method: str = "auto",
    backend: Optional[str] = None,
    chunk_size: Optional[int] = None,
    fd_step: Optional[float] = None,
    train_mode: str = "eval",
) -> torch.Tensor:
    """Input-space Hessian-vector products of log p (module docstring: methods).

    Args:
        model: a classifier x [B, ...] -> logits [B, K] (an nn.Module, a TorchScript
            module or any callable).
        x: [B, ...] inputs.
        v: [S, B, ...] vectors (S per example), or [B, ...] for one vector each.
        method: see the module docstring. chunk_size: vectors per batched call
            (default: about 2^20 input elements on a CPU). fd_step: relative
            finite-difference step. backend: for the energy / logit-space kernels.
        train_mode: "eval" (default) measures a train-mode model in eval mode,
            "raise" refuses it (BatchNorm batch statistics couple the examples).

    Returns:
        H v in the shape of v (detached).
    """
    with prepared(model, x, train_mode, "hvp"):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"v must be a torch.Tensor, got {type(v).__name__}")
        single = v.shape == x.shape
        V = v.unsqueeze(0) if single else v
        if V.dim() != x.dim() + 1 or V.shape[1:] != x.shape:
            raise ValueError(
                f"v must be [S, *x.shape] = [S, {', '.join(map(str, x.shape))}] or x's shape, got {tuple(v.shape)}"
            )
        H = input_hessian(
            model,
            x,
            method=method,
            backend=backend,
            chunk_size=chunk_size,
            fd_step=fd_step,
            expected_vectors=V.shape[0],
        )
        out = H.matvec(V.to(x.dtype).reshape(V.shape[0], H.batch, H.dim)).reshape(V.shape).detach()
        return out[0] if single else out


PARAMETER_HVP_METHODS = ("auto", "forward-over-reverse", "forward-adjoint", "double-backward", "double-backward-loop")
# What "auto" times for parameter products H v (forward-adjoint gives quadratic forms only).
PARAMETER_PRODUCT_METHODS = ("forward-over-reverse", "double-backward", "double-backward-loop")
# model -> {(parameter count, input shape, dtype, device, chunk[, "quad"]): the method chosen}
_parameter_choice: weakref.WeakKeyDictionary[object, dict] = weakref.WeakKeyDictionary()


def parameter_quad_choice(model) -> Optional[str]:
    """The method "auto" kept for the model's parameter quadratic forms (chosen and cached by
    ParameterHessian on its first chunk of more than FEW_VECTORS vectors), or None."""
    with contextlib.suppress(TypeError):  # not weak-referenceable: nothing cached
        choices = [m for key, m in _parameter_choice.get(model, {}).items() if key[-1] == "quad"]
        return choices[0] if choices else None
    return None


class ParameterHessian:
    """The Hessian of a scalar loss with respect to the model's parameters (those
    requiring grad), as a linear operator on flattened parameter vectors [S, 1, D]
    (one "example"), so the same estimators apply.

    method: "forward-over-reverse" (jvp of the gradient, vmap over the vectors),
    "double-backward" (the gradient once with create_graph, then one backward batched
    over the vectors, is_grads_batched), "double-backward-loop" (the same graph, one
    backward per vector: PyHessian's loop), "forward-adjoint" (quadratic forms v . H v
    only, from one tangent pass per vector through the loss's captured graph, weighted by
    one shared reverse pass: _forward_adjoint.py; its products H v use double backward)
    or "auto" (default). "auto" times the three product methods once on the first chunk of
    vectors and keeps the fastest (none wins everywhere: the loop on a SiLU ResNet with
    BatchNorm, where convolutions with a batch of weight tangents are slow on a CPU); for
    quadratic forms of more than FEW_VECTORS vectors in a call or in all (expected_vectors;
    Hutchinson, Hutch++) it takes forward-adjoint, untimed, once its values have equalled double
    backward's on two random vectors (the fastest on all seven families of `pykernels bench
    --ops flatness_parameter_trace`). Choices are cached per model, parameter count, input shape,
    dtype and chunk (`timings` shows the times of the products). The gradient graph is built once per
    operator and kept for every later product (Lanczos: one per step)."""

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Callable,
        x: torch.Tensor,
        y,
        *,
        chunk_size: Optional[int] = None,
        method: str = "auto",
        expected_vectors: Optional[int] = None,
    ):
        """expected_vectors: how many vectors the caller will pass in all, over every call (as
        for InputHessian; None: not said)."""
        check_choice("method", method, PARAMETER_HVP_METHODS)
        if chunk_size is not None:
            check_int("chunk_size", chunk_size, minimum=1)
        if expected_vectors is not None:
            check_int("expected_vectors", expected_vectors, minimum=0)
        self.expected_vectors = expected_vectors
        self.model, self.loss_fn, self.x, self.y = model, loss_fn, x, y
        self.params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("the model has no parameters that require grad")
        self._leaves = [p for p in model.parameters() if p.requires_grad]
        self.names = list(self.params)
        self.sizes = [p.numel() for p in self.params.values()]
        self.batch, self.dim = 1, sum(self.sizes)
        first = next(iter(self.params.values()))
        check_hessian_dtype(first.dtype, "the model's parameters")
        self._dtype, self._device = first.dtype, first.device
        self._chunk_given = chunk_size
        self.chunk_size = chunk_size or default_chunk_size(self.dim, self._device)
        self._loss = lambda: scalar_loss(loss_fn(model(x), y))

        def loss(params):
            return scalar_loss(loss_fn(torch.func.functional_call(model, params, (x,)), y))

        self._grad = grad(loss)
        self._graph: Optional[torch.Tensor] = None  # the flat gradient with its graph (double backward)
        # forward-adjoint's products H v (Lanczos) by double backward: it runs wherever backward does
        self.method = "double-backward" if method == "forward-adjoint" else method
        self.quad_method = method  # v . H v: "forward-adjoint", from the products, or "auto"
        self._forward_adjoint: Optional[ParameterForwardAdjointQuad] = None
        self._expected_loss: Optional[torch.Tensor] = None  # the model's own, for forward-adjoint's check
        self.timings: Optional[dict[str, float]] = None
        self._key = (self.dim, tuple(x.shape), self._dtype, self._device)

    @property
    def dtype(self):
        return self._dtype

    @property
    def device(self):
        return self._device

    def _unflatten(self, flat: torch.Tensor) -> dict:
        return {n: t.view_as(self.params[n]) for n, t in zip(self.names, flat.split(self.sizes))}

    def _chunks(self, flat: torch.Tensor, run: Callable, size: Optional[int] = None) -> torch.Tensor:
        size = size or self.chunk_size
        with twice_differentiable():
            out = [run(flat[i : i + size]) for i in range(0, flat.shape[0], size)]
        return torch.cat(out) if len(out) > 1 else out[0]

    # ---- H v ----

    def matvec(self, V: torch.Tensor) -> torch.Tensor:
        return self._chunks(V.reshape(V.shape[0], self.dim), self._products).reshape(V.shape)

    def _products(self, flat: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._reverse_over_reverse(flat)
        if self.method == "auto":
            return self._timed(flat)
        if self.method == "forward-over-reverse":
            try:
                return self._forward_over_reverse(flat)
            except (RuntimeError, NotImplementedError) as exc:
                # forward mode through a PyTorch rule that fails (mse_loss in 2.13: "ZeroTensors
                # are immutable"): double backward, whose own failure (a bug in the model) raises exc
                if isinstance(exc, torch.OutOfMemoryError):
                    raise
                try:
                    out = self._double_backward(flat, batched=True)
                except Exception:
                    raise exc  # noqa: B904
                report_once(
                    self.model,
                    "parameter-forward-over-reverse",
                    f"pykernels.flatness: forward-over-reverse failed on this model and loss ({describe(exc)}); "
                    f"double backward is used instead",
                )
                self.method = "double-backward"
                return out
        return self._double_backward(flat, batched=self.method == "double-backward")

    def _timed(self, flat: torch.Tensor) -> torch.Tensor:
        """Every product method on this chunk, timed once (one round: forward-over-reverse costs
        seconds per chunk on a ResNet); the fastest is kept (and cached for the model). The
        double-backward methods are timed with the gradient graph they build, as a one-chunk call
        runs them."""
        key = self._key + (flat.shape[0],)
        with contextlib.suppress(TypeError):  # a model that is not weak-referenceable: nothing cached
            cached = _parameter_choice.get(self.model, {}).get(key)
            if cached is not None:
                self.method = cached
                return self._products(flat)
        self.timings, out = {}, None
        for method in PARAMETER_PRODUCT_METHODS:
            self._graph = None
            start = time.perf_counter()
            try:
                result = (
                    self._forward_over_reverse(flat)
                    if method == "forward-over-reverse"
                    else self._double_backward(flat, batched=method == "double-backward")
                )
            except (RuntimeError, NotImplementedError) as exc:
                # beyond forward mode or batching, or a PyTorch rule that fails (forward-over-reverse
                # through mse_loss in 2.13: "ZeroTensors are immutable"): the loop runs wherever
                # backward does, and its error (a bug in the model) is the one raised
                if method == "double-backward-loop" or isinstance(exc, torch.OutOfMemoryError):
                    raise
                continue
            self.timings[method] = time.perf_counter() - start
            out = result
        self.method = min(self.timings, key=self.timings.get)
        with contextlib.suppress(TypeError):
            _parameter_choice.setdefault(self.model, {})[key] = self.method
        return out

    def _forward_over_reverse(self, flat: torch.Tensor) -> torch.Tensor:
        def one(v):
            tangent = jvp(self._grad, (self.params,), (self._unflatten(v),))[1]
            return torch.cat([tangent[n].reshape(-1) for n in self.names])

        return vmap(one)(flat)

    def _reverse_over_reverse(self, flat: torch.Tensor) -> torch.Tensor:
        """The products under torch.compile, whatever the method: the gradient of v . grad loss,
        vmapped over the vectors, which Dynamo traces as one graph (BatchNorm in eval and
        attention included); the methods above time, cache or hold a graph across calls.
        no_grad: the products need no graph towards the live parameters (torch.func.grad
        ignores an outer no_grad)."""

        def one(v):
            tangent = self._unflatten(v)
            hv = grad(lambda p: sum((g * tangent[n]).sum() for n, g in self._grad(p).items()))(self.params)
            return torch.cat([hv[n].reshape(-1) for n in self.names])

        with torch.no_grad():
            return vmap(one)(flat)

    def _gradient_graph(self) -> torch.Tensor:
        if self._graph is None:
            with torch.enable_grad():
                grads = torch.autograd.grad(
                    self._loss(), self._leaves, create_graph=True, allow_unused=True, materialize_grads=True
                )
                self._graph = torch.cat([g.reshape(-1) for g in grads])
        return self._graph

    def _double_backward(self, flat: torch.Tensor, batched: bool) -> torch.Tensor:
        g = self._gradient_graph()
        if not g.requires_grad:  # the loss is at most linear in the parameters
            return torch.zeros_like(flat)
        backward = functools.partial(
            torch.autograd.grad, g, self._leaves, retain_graph=True, allow_unused=True, materialize_grads=True
        )
        with torch.enable_grad():
            if batched and flat.shape[0] > 1:
                hv = grads_per_vector(backward, flat, self.model)
                return torch.cat([h.reshape(flat.shape[0], -1) for h in hv], 1)
            rows = [backward(v) for v in flat]
        return torch.stack([torch.cat([h.reshape(-1) for h in hv]) for hv in rows])

    # ---- v . H v ----

    def quad(self, V: torch.Tensor) -> torch.Tensor:
        """[S, 1, D] -> [S, 1]: v . H v."""
        with twice_differentiable():  # also while the loss's graph is captured
            return self._quad(V.reshape(V.shape[0], self.dim)).reshape(V.shape[0], 1)

    def _quad(self, flat: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # no timing, no captured graph: see _reverse_over_reverse
            return self._chunks(flat, lambda f: (f * self._reverse_over_reverse(f)).sum(-1))
        out = []
        if self.quad_method == "auto" and max(flat.shape[0], self.expected_vectors or 0) > FEW_VECTORS:
            out.append(self._chosen_quad(flat[: self.chunk_size]))
            flat = flat[self.chunk_size :]
        if flat.shape[0]:
            # forward-adjoint sizes its own chunks by the tangents, not by D
            forward_adjoint = self.quad_method == "forward-adjoint"
            out.append(self._forward_adjoint_quad(flat) if forward_adjoint else self._chunks(flat, self._product_quads))
        return torch.cat(out)

    def _product_quads(self, flat: torch.Tensor) -> torch.Tensor:
        return ops.probe_dots(flat.unsqueeze(1), self._products(flat).unsqueeze(1))[:, 0]

    def _chosen_quad(self, flat: torch.Tensor) -> torch.Tensor:
        """The quadratic forms of "auto" for this chunk: forward-adjoint, untimed, once its values have
        equalled double backward's on two random vectors (it beat every product method on all
        seven families of `pykernels bench --ops flatness_parameter_trace`, and timing the
        products made the first trace of a model 1.2-25x slower than PyHessian's); else the
        products (timed if the method is "auto"). The choice is cached for the model."""
        key = self._key + (flat.shape[0], "quad")
        with contextlib.suppress(TypeError):
            cached = _parameter_choice.get(self.model, {}).get(key)
            if cached is not None:
                self.quad_method = cached
                return self._quad(flat)
        self._model_loss()
        if self._forward_adjoint_agrees():
            self.quad_method = "forward-adjoint"
            out = self._forward_adjoint_quad(flat)
        else:  # the products; their method is chosen as they run where it is "auto"
            out = self._chunks(flat, self._product_quads)
            self.quad_method = self.method  # never "auto" here: that would choose again, forever
        with contextlib.suppress(TypeError):
            _parameter_choice.setdefault(self.model, {})[key] = self.quad_method
        return out

    def _forward_adjoint_operator(self) -> ParameterForwardAdjointQuad:
        if self._forward_adjoint is None:
            self._forward_adjoint = ParameterForwardAdjointQuad(
                self.model, self.loss_fn, self.x, self.y, self._model_loss()
            )
        return self._forward_adjoint

    def _model_loss(self) -> torch.Tensor:
        """The loss by the model itself (forward-adjoint's graph must give the same), computed before
        forward-adjoint runs: an error of the model or of loss_fn (labels that do not fit the
        logits) is then raised as it is, not reported as forward-adjoint's and retried."""
        if self._expected_loss is None:
            with torch.no_grad():
                self._expected_loss = self._loss().detach()
        return self._expected_loss

    def _forward_adjoint_quad(self, flat: torch.Tensor, fall_back: bool = True) -> torch.Tensor:
        self._model_loss()
        try:
            op = self._forward_adjoint_operator()
            return self._chunks(flat, op, self._chunk_given or op.default_chunk_size())
        except (torch.OutOfMemoryError, NotScalarLoss):
            raise
        except Exception as exc:  # noqa: BLE001  (a model error shows again in the products, and is raised there)
            if not fall_back:
                raise
            report_forward_adjoint_failure(self.model, exc)
            out = self._chunks(flat, self._product_quads)
            self.quad_method = self.method  # chosen by now (see _chosen_quad)
            return out

    def _forward_adjoint_agrees(self) -> bool:
        """forward-adjoint's v . H v against double backward's on two random vectors (see
        InputHessian._forward_adjoint_agrees)."""
        return forward_adjoint_agrees(
            self.model,
            (2, self.dim),
            self,
            lambda R: self._forward_adjoint_quad(R, fall_back=False),
            lambda R: (R * self._double_backward(R, batched=False)).sum(1),
            lambda exc: report_forward_adjoint_failure(self.model, exc),
        )
