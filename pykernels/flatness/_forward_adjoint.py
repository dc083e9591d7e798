"""v . H v on smooth networks from one tangent pass per probe ("forward-adjoint").

log p is a graph of ops y = op(a). Its second directional derivative along v is

    v . H v = sum over the ops of  < lambda_y , D^2 op(a)[t_a, t_a] >

with t_a = (J v) at the op's inputs (first-order tangents) and lambda_y = d log p / dy
the adjoint of its output. Linear and piecewise-linear ops (matrix products with one
x-dependent factor, convolutions, BatchNorm in eval mode, max-pooling, ReLU, views)
have D^2 op = 0 and add nothing. So every quadratic form costs one forward tangent pass,
and one reverse pass per example, shared by every probe, gives the adjoints:
forward-over-reverse also runs the tangent backward (about as many FLOPs again).
Elementwise ops with one x-dependent input (GELU, SiLU, tanh, softplus, ...) get
sigma'(a) and lambda * sigma''(a) computed once (closed forms for the common activations,
nested forward mode for the rest), so each probe costs them one read and one write of its
tangent (ops.curvature_step_, in place where the pass owns the input's tangent). Products
of two x-dependent factors (matmul, convolution, mul, BatchNorm in eval mode: B(t_a, t_b)
once more; a matmul's term as whichever association writes the smallest matrix), softmax
(through the same kernel), log_softmax, logsumexp, LayerNorm and nll_loss have direct rules,
and so has max pooling (the tangent gathered at the primal's indices); linear ops (views,
clone, scalings) map the tangent alone; any other op runs through jvp, and a
curved one gets its term by forward-over-reverse on that op alone (not nested jvp: PyTorch
2.13's forward-over-forward through native_layer_norm is wrong).

Input Hessians (ForwardAdjointQuad): the graph is log p of one example, run per example
under vmap, then per probe under vmap. Parameter Hessians (ParameterForwardAdjointQuad):
the graph is the loss of the whole batch, with the trainable parameters as the seeds, run
per probe under vmap; there every layer's weight times its input is a product of two live
factors. Both are ATen graphs captured with make_fx on fake tensors (functionalized: no
in-place ops), with parameters and buffers as inputs (their current values are used at
every call), cached per model and shapes. Data-dependent control flow makes the capture
fail (CaptureFailed), so the caller uses another exact method.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import weakref
from collections.abc import Callable, Iterator
from typing import Optional

import torch
from torch.func import functional_call, functionalize, grad, jvp, vmap
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_leaves

from . import ops
from ._model import log_likelihood_fn, scalar_loss
from ._piecewise import _base_name, _is_piecewise_linear, _structure, per_model

aten = torch.ops.aten

try:  # torch's private vmap internals, for the fast path that calls the kernel under the wrappers
    from torch._C._functorch import _add_batch_dim, get_unwrapped, is_batchedtensor, maybe_get_bdim, maybe_get_level
except ImportError:  # a torch without them: nothing looks batched, so that path steps aside

    def is_batchedtensor(x) -> bool:
        return False


def describe(exc: BaseException) -> str:
    """ "Type: the first line of the message" (up to 200 characters), for one-line reports."""
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


class CaptureFailed(RuntimeError):
    """The model's graph could not be captured for one example (data-dependent control flow,
    an op fake tensors cannot run, a forward that needs the batch)."""


# Ops whose tangent is the op itself applied to the tangent (linear and homogeneous in their
# one tensor input; the other arguments are shapes, dims, flags).
_HOMOGENEOUS = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.permute.default,
    aten.transpose.int,
    aten.t.default,
    aten.expand.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
    aten.select.int,
    aten.slice.Tensor,
    aten.clone.default,
    aten.alias.default,
    aten.sum.dim_IntList,
    aten.mean.dim,
    aten.neg.default,
    aten.mul.Scalar,
    aten.div.Scalar,
    aten.avg_pool2d.default,
    aten._adaptive_avg_pool2d.default,
    aten.flatten.using_ints,
}


_VIEWS = {aten.view.default, aten._unsafe_view.default}
# Ops whose tangent may be the input's tangent itself, or a view of it (the graph is functional:
# a copy for the primal's layout is not needed by the tangents, whose rules take any strides).
_ALIASES = _VIEWS | {aten.clone.default}

# Elementwise ops whose tangent _linear_tangent forms directly.
_LINEAR_ELEMENTWISE = {aten.add.Tensor, aten.sub.Tensor, aten.neg.default}


def _floating(n: torch.fx.Node) -> bool:
    """The op returns floating-point values (a comparison's booleans carry no tangent)."""
    val = n.meta.get("val")
    return any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in tree_leaves(val))


def _tensor_nodes(args) -> list:
    return [a for a in tree_leaves(args) if isinstance(a, torch.fx.Node)]


class _Graph:
    """A captured graph and what is known about each node without data: the seeds are the
    placeholders the directions v act on (x for input Hessians, the trainable parameters for
    parameter Hessians); every other placeholder is a constant."""

    def __init__(self, gm: torch.fx.GraphModule, seeds: range):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.seeds = [placeholders[i] for i in seeds]
        self.constant_inputs = [n for n in placeholders if n not in self.seeds]
        (out,) = tree_leaves([n.args for n in self.nodes if n.op == "output"])
        self.output = out
        # Nodes that depend on a seed: they carry tangents.
        self.live = set(self.seeds)
        for n in self.nodes:
            if n.op == "call_function" and any(a in self.live for a in n.all_input_nodes):
                self.live.add(n)
        # ... and reach the output (not a detached copy kept for a backward, an unused output).
        needed, stack = set(), [out]
        while stack:
            n = stack.pop()
            if n not in needed:
                needed.add(n)
                stack.extend(n.all_input_nodes)
        self.steps = [n for n in self.nodes if n in self.live and n in needed and n.op == "call_function"]
        # Per step, what `quad` would otherwise work out on every call (pytree walks, ~0.5 ms a
        # call on a small MLP): its tensor inputs, and whether it returns floating values.
        self.inputs = {n: _tensor_nodes((n.args, n.kwargs)) for n in self.steps}
        self.floating = {n for n in self.steps if _floating(n)}
        # Multi-output ops of which only the first output is used (LayerNorm's mean and rstd unused).
        self.first_output_only = {
            n
            for n in self.steps
            if all(u.target is operator.getitem and u.args[1] == 0 for u in n.users if u in needed)
        }
        self.curved = [n for n in self.steps if n.target is not operator.getitem and not self._piecewise_linear(n)]
        # Elementwise ops with one live input: derivatives precomputed once.
        self.elementwise = [
            n
            for n in self.steps
            if n.target is not operator.getitem
            and torch.Tag.pointwise in getattr(n.target, "tags", ())
            and n.target not in _LINEAR_ELEMENTWISE | _HOMOGENEOUS  # linear: no derivatives to keep
            and _floating(n)
            and len([a for a in _tensor_nodes(n.args) if a in self.live]) == 1
            and not _tensor_nodes(n.kwargs)
        ]
        # Tangents no step reads after step i: dropped before step i + 1, so that the tangents
        # held at once (S x B times a layer's width each) stay few and their memory is reused.
        last_read = {}
        for i, n in enumerate(self.steps):
            for a in n.all_input_nodes:
                last_read[a] = i
        self.dead_after = [[] for _ in self.steps]
        for a, i in last_read.items():
            self.dead_after[i].append(a)
        # Steps that are the only reader of a live input's tangent (not a seed's: those are the
        # caller's): they may hand that tangent's memory on to their own (see _Evaluator.quad).
        readers = {}
        for n in self.steps:
            for a in set(n.all_input_nodes) & self.live - set(self.seeds):
                readers.setdefault(a, []).append(n)
        self.sole_reader = {a: ns[0] for a, ns in readers.items() if len(ns) == 1}

    def _piecewise_linear(self, n) -> bool:
        tensors = _tensor_nodes((n.args, n.kwargs))
        return _is_piecewise_linear(_base_name(n.target), n.target, n.args, n.kwargs, [t in self.live for t in tensors])


def _traced(f: Callable, *inputs) -> torch.fx.GraphModule:
    """make_fx of f on fake tensors, functionalized (no in-place ops); CaptureFailed if it cannot be.
    Ops that decompose below the functionalization (nn.LSTM's cell: sigmoid_, add_) leave in-place
    ops in the graph, which would overwrite the values the tangents are taken at: such a graph is
    traced once more, through functionalize, and refused if that leaves any. oneDNN is off while
    tracing: with it, a float32 nn.LSTM on a CPU is one mkldnn_rnn_layer op, which has no forward
    mode and no vmap rule; without it, its cells' matmuls and activations."""
    try:
        trace = lambda g: make_fx(
            functionalize(g, remove="mutations"), tracing_mode="fake", _allow_non_fake_inputs=True
        )
        with _onednn_off():
            gm = trace(f)(*inputs)
            if _mutating(gm):
                gm = trace(gm)(*inputs)
    except Exception as exc:  # noqa: BLE001  (any failure means: not capturable, another method is used)
        raise CaptureFailed(describe(exc)) from exc
    if _mutating(gm):
        raise CaptureFailed(f"in-place ops left in the graph: {sorted({str(n.target) for n in _mutating(gm)})}")
    return _vmappable_slice_writes(gm)


@contextlib.contextmanager
def _onednn_off() -> Iterator[None]:
    """torch.backends.mkldnn.enabled = False for the body (mkldnn.flags() would also reset the
    user's other oneDNN settings, warning about TF32)."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def _vmappable_slice_writes(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """What functionalization makes of a write into a slice (`buf[:, 8:] = h`: copy, then
    slice_scatter; `buf[:, 0] = h`: select_scatter), rewritten for vmap's rules in PyTorch 2.13:
    - slice_scatter fails on an open end (INT64_MAX, "cannot be represented as a SymInt") or a
      negative start: both become indices in [0, size];
    - select_scatter's backward under vmap is wrong (the source's gradient summed over the
      whole dim: 16x too large into a dim of 16): it becomes a slice_scatter of width one;
    - copy has no batching rule (the fallback loops over the batch): a copy of a value already
      in the destination's shape and dtype becomes that value;
    - nor has fill (`out[:, 3:5] = 0.5`; the fallback also prints a warning per call): the value
      expanded to the shape, which no longer depends on the tensor it overwrote."""
    graph = gm.graph
    for n in list(graph.nodes):
        if n.op != "call_function" or n.kwargs:
            continue
        if n.target in _FILLS:
            _expand_fill(graph, n)
            continue
        values = [a.meta.get("val") if isinstance(a, torch.fx.Node) else None for a in n.args[:2]]
        if not all(isinstance(v, torch.Tensor) for v in values):
            continue
        if n.target is aten.slice_scatter.default:
            base, src, dim, start, end, step = (*n.args, *(0, None, None, 1)[len(n.args) - 2 :])
            size = values[0].shape[dim]
            n.args = (base, src, dim, _in_range(start, size, 0), _in_range(end, size, size), step)
        elif n.target is aten.select_scatter.default:
            base, src, dim, i = n.args
            i = _in_range(i, values[0].shape[dim], None)
            with graph.inserting_before(n):
                column = graph.call_function(aten.unsqueeze.default, (src, dim))
                column.meta["val"] = values[1].unsqueeze(dim)
                width_one = graph.call_function(aten.slice_scatter.default, (base, column, dim, i, i + 1, 1))
            width_one.meta = dict(n.meta)
            n.replace_all_uses_with(width_one)
            graph.erase_node(n)
        elif n.target is aten.copy.default and len(n.args) == 2:
            dst, src = values
            if (dst.shape, dst.dtype, dst.device) == (src.shape, src.dtype, src.device):
                n.replace_all_uses_with(n.args[1])
                graph.erase_node(n)
    gm.recompile()
    return gm


_FILLS = {aten.fill.Scalar, aten.fill.Tensor, aten.zero.default}


def _expand_fill(graph: torch.fx.Graph, n: torch.fx.Node) -> None:
    """fill(t, value) (zero(t): value 0) as the value, in t's dtype, expanded to t's shape."""
    filled = n.meta.get("val")
    if not isinstance(filled, torch.Tensor):
        return
    value = n.args[1] if n.target is not aten.zero.default else 0
    with graph.inserting_before(n):
        if not isinstance(value, torch.fx.Node):  # a number
            value = graph.call_function(
                aten.scalar_tensor.default, (value,), {"dtype": filled.dtype, "device": filled.device}
            )
            value.meta["val"] = filled.new_empty(())
        elif getattr(value.meta.get("val"), "dtype", None) != filled.dtype:  # a 0-dim tensor
            value = graph.call_function(aten._to_copy.default, (value,), {"dtype": filled.dtype})
            value.meta["val"] = filled.new_empty(())
        expanded = graph.call_function(aten.expand.default, (value, list(filled.shape)))
    expanded.meta = dict(n.meta)
    n.replace_all_uses_with(expanded)
    graph.erase_node(n)


def _in_range(index: Optional[int], size: int, default: Optional[int]) -> Optional[int]:
    """A Python slice index (negative: from the end, None: default) as one in [0, size]."""
    if index is None:
        return default
    return min(max(index + size if index < 0 else index, 0), size)


def _mutating(gm: torch.fx.GraphModule) -> list:
    schema = lambda n: getattr(n.target, "_schema", None)
    return [n for n in gm.graph.nodes if n.op == "call_function" and schema(n) is not None and schema(n).is_mutable]


def _capture(model: Callable, x: torch.Tensor) -> _Graph:
    """log p of one example [1, ...] -> scalar; inputs: the model's parameters and buffers, x."""
    names = _tensor_names(model)

    def log_p_one(flat, xb):
        if _swaps_tensors(model):
            forward = lambda z: functional_call(model, dict(zip(names, flat)), (z,))
        else:  # a plain callable or a TorchScript module: its tensors are constants of the graph
            forward = model
        return log_likelihood_fn(forward, "reference")(xb.unsqueeze(0))[0]

    gm = _traced(log_p_one, _tensors(model), x[0])
    return _Graph(gm, range(len(names), len(names) + 1))


def _swaps_tensors(model) -> bool:
    """The graph takes the model's parameters and buffers as inputs (functional_call), so that one
    graph serves later weights; TorchScript modules refuse functional_call ("The stateless API
    can't be used with Jitted modules") and, like plain callables, have theirs baked in."""
    return isinstance(model, torch.nn.Module) and not isinstance(model, torch.jit.ScriptModule)


def _tensor_names(model) -> list[str]:
    if not _swaps_tensors(model):
        return []
    return [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]


def _tensors(model) -> list[torch.Tensor]:
    if not _swaps_tensors(model):
        return []
    return [t for _, t in model.named_parameters()] + [t for _, t in model.named_buffers()]


# model -> {(shape, dtype, device, structure): _Graph}
_graphs: weakref.WeakKeyDictionary[object, dict] = weakref.WeakKeyDictionary()


def captured(model: Callable, x: torch.Tensor) -> _Graph:
    """The graph for examples shaped like x[0], captured once per model, input shape, dtype,
    device and module structure (CaptureFailed is raised again each time)."""
    return per_model(_graphs, model, _graph_key(model, x), lambda: _capture(model, x))


def _graph_key(model: Callable, x: torch.Tensor) -> tuple:
    return (tuple(x.shape[1:]), x.dtype, x.device, _structure(model))


def is_captured(model: Callable, x: torch.Tensor) -> bool:
    """captured(model, x) would come from the cache."""
    try:
        return _graph_key(model, x) in _graphs.get(model, {})
    except TypeError:  # a model that cannot be weakly referenced: nothing is cached
        return False


def _trainable_first(model: torch.nn.Module) -> tuple[list[str], int]:
    """The model's tensor names, parameters that require grad first, and how many those are."""
    params = list(model.named_parameters())
    trainable = [n for n, p in params if p.requires_grad]
    frozen = [n for n, p in params if not p.requires_grad]
    return trainable + frozen + [n for n, _ in model.named_buffers()], len(trainable)


def _capture_loss(model: torch.nn.Module, loss_fn: Callable, x: torch.Tensor, y) -> _Graph:
    """loss_fn(model(x), y) -> scalar over the whole batch; inputs: the trainable parameters
    (the seeds), the other parameters and buffers, x and (a tensor) y."""
    names, trainable = _trainable_first(model)
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    y_is_input = isinstance(y, torch.Tensor)

    def loss(flat, xb, *yb):
        return loss_fn(functional_call(model, dict(zip(names, flat)), (xb,)), yb[0] if y_is_input else y)

    gm = _traced(loss, [state[n] for n in names], x, *((y,) if y_is_input else ()))
    graph = _Graph(gm, range(trainable))
    scalar_loss(graph.output.meta.get("val"))  # the caller's error, raised as such
    return graph


# model -> {(x, y and parameter layout, structure): WeakKeyDictionary loss_fn -> _Graph}
_loss_graphs: weakref.WeakKeyDictionary[object, dict] = weakref.WeakKeyDictionary()


def captured_loss(model: torch.nn.Module, loss_fn: Callable, x: torch.Tensor, y) -> _Graph:
    """The whole-batch loss graph, once per model, loss function, shapes, dtypes, device,
    trainable parameters and module structure; a y that is not a tensor is part of the graph,
    so that graph is not kept."""
    if not isinstance(y, torch.Tensor):
        return _capture_loss(model, loss_fn, x, y)
    by_loss = per_model(_loss_graphs, model, _loss_graph_key(model, x, y), weakref.WeakKeyDictionary)
    return per_model(by_loss, loss_fn, (), lambda: _capture_loss(model, loss_fn, x, y))


def _loss_graph_key(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple:
    names, trainable = _trainable_first(model)
    return (tuple(x.shape), x.dtype, x.device, tuple(y.shape), y.dtype, tuple(names[:trainable]), _structure(model))


def forget(store: weakref.WeakKeyDictionary, model, key) -> None:
    """Drops a cached graph."""
    with contextlib.suppress(TypeError):
        store.get(model, {}).pop(key, None)


def forget_loss_graph(model: torch.nn.Module, loss_fn: Callable, x: torch.Tensor, y) -> None:
    if isinstance(y, torch.Tensor):  # (else nothing was cached)
        with contextlib.suppress(TypeError):
            _loss_graphs.get(model, {}).get(_loss_graph_key(model, x, y), {}).pop(loss_fn, None)


def checked_against(expected: Optional[torch.Tensor], prepare: Callable, forget_graph: Callable) -> tuple:
    """prepare()'s state, once the graph's output equals `expected` (the model's own value at the
    same inputs). A graph is cached by shapes and module structure, while make_fx bakes into it
    whatever else the forward read: a Python attribute (logits / self.T), a plain callable's
    tensors. When those changed since, the outputs differ: the graph is captured once more,
    and if it still differs CaptureFailed is raised (the caller falls back to double backward)."""
    for _ in range(2):
        output, state = prepare()
        if expected is None or _close(output, expected):
            return state
        forget_graph()
    raise CaptureFailed(
        "the captured graph's value differs from the model's at these inputs "
        f"(largest difference {(output - expected).abs().max().item():.3g})"
    )


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    tol = 1e-8 if b.dtype == torch.float64 else 1e-3
    a = a.reshape(b.shape)
    if not b.numel():
        return True
    scale = 1.0 + torch.nan_to_num(b, nan=0.0, posinf=0.0, neginf=0.0).abs().max()
    # equal infinities compare equal (their difference is NaN); a NaN never does
    return bool((((a - b).abs() <= tol * scale) | (a == b)).all())


def _substituted(n: torch.fx.Node, env: dict, replace: dict):
    """n's positional and keyword arguments with nodes read from env, except those in replace."""
    pick = lambda m: replace[m] if m in replace else env[m]
    return torch.fx.node.map_arg(n.args, pick), torch.fx.node.map_arg(n.kwargs, pick)


def _call(n: torch.fx.Node, env: dict, replace: dict):
    args, kwargs = _substituted(n, env, replace)
    # A view traced on fake tensors can meet other strides at run time (vmap's batched
    # convolution of a channels-last input): reshape is the same view where one exists.
    target = aten.reshape.default if n.target in _VIEWS else n.target
    return target(*args, **kwargs)


def _detached(value):
    return tuple(t.detach() for t in value) if isinstance(value, (tuple, list)) else value.detach()


def _key(n: torch.fx.Node, index: int) -> str:
    return f"{n.name}/{index}"


def _outputs(n: torch.fx.Node) -> int:
    """How many outputs the op returns (1 for a single tensor)."""
    val = n.meta.get("val")
    return len(val) if isinstance(val, (tuple, list)) else 1


class _Evaluator:
    """Runs a captured graph at fixed seed values: the primal values, the adjoints of the curved
    ops' outputs and the elementwise ops' derivatives once (`prepare`), then v . H v for one set
    of seed tangents (`quad`), under whatever vmap the caller applies."""

    def __init__(self, graph: _Graph, constant_inputs: list):
        if len(constant_inputs) != len(graph.constant_inputs):  # a stale cached graph: never zip short
            raise CaptureFailed(f"the graph takes {len(graph.constant_inputs)} constants, got {len(constant_inputs)}")
        self.graph = graph
        g, env = graph, {}
        for node, tensor in zip(g.constant_inputs, constant_inputs):
            env[node] = tensor.detach()
        for n in g.nodes:  # every node that does not depend on a seed (weights' transposes, ...), once
            if n.op == "get_attr":  # a plain callable's tensors: detached, as prepared() freezes a module's
                env[n] = _detached(getattr(g.gm, n.target))
            elif n.op == "call_function" and n not in g.live:
                env[n] = _call(n, env, {})
        self.constants = env

    def prepare(self, seeds: tuple, per_example: bool) -> tuple[torch.Tensor, tuple]:
        """The graph's output, and the state `quad` takes (values, adjoints, sigma', lambda *
        sigma'') at these seed values; per_example: the one seed is a batch of examples [B, ...]
        and the graph is one example's (vmapped)."""
        g, constants = self.graph, self.constants
        if len(seeds) != len(g.seeds):
            raise CaptureFailed(f"the graph takes {len(g.seeds)} seeds, got {len(seeds)}")
        batched = vmap if per_example else lambda f: f

        def primal(*seed_values):
            env = {**constants, **dict(zip(g.seeds, seed_values))}
            for n in g.steps:
                env[n] = _call(n, env, {})
            return env[g.output], {n.name: env[n] for n in g.steps}

        leaves = [s.detach().requires_grad_() for s in seeds]  # new leaves sharing the storage
        with torch.enable_grad():
            out, values = batched(primal)(*leaves)
            wrt = {}  # the float outputs of the curved ops: their adjoints are needed
            for n in g.curved:
                outputs = values[n.name] if isinstance(values[n.name], (tuple, list)) else [values[n.name]]
                for i, v in enumerate(outputs):
                    if isinstance(v, torch.Tensor) and v.is_floating_point() and v.requires_grad:
                        wrt[_key(n, i)] = v
            grads = torch.autograd.grad(out.sum(), list(wrt.values()), allow_unused=True) if wrt else ()
        adjoints = {k: a for k, a in zip(wrt, grads) if a is not None}
        values = {k: _detached(v) for k, v in values.items()}
        for node, s in zip(g.seeds, seeds):
            values[node.name] = s.detach()

        d1, c2 = {}, {}  # sigma'(a) and lambda * sigma''(a) of the elementwise ops
        for n in g.elementwise:
            (a_node,) = [a for a in _tensor_nodes(n.args) if a in g.live]
            a, adjoint = values[a_node.name], adjoints.pop(_key(n, 0), None)
            derivatives = closed_form_derivatives(n, a, values[n.name])
            if derivatives is None:  # sigma'' only where it is used: hardsigmoid has no rule for it
                derivatives = _nested_forward_derivatives(n, a_node, a, constants, batched, second=adjoint is not None)
            first, second = derivatives
            d1[n.name] = first.contiguous()  # read once per probe: a strided layout slows every read
            if adjoint is not None:  # else it is piecewise linear, or its output does not reach the output
                c2[n.name] = (adjoint * second).contiguous()
        return out.detach(), (values, adjoints, d1, c2)

    def quad(
        self, tangents: tuple, values: dict, adjoints: dict, d1: dict, c2: dict, differentiable: bool = False
    ) -> torch.Tensor:
        """v . H v for the seed tangents v (under vmap over probes, and examples if per example).
        differentiable: no in-place writes and no fused kernel, so that autograd can take the
        gradient 2 H v of v . H v with respect to v (ForwardAdjointQuad.products)."""
        g = self.graph
        env = dict(self.constants)
        for n in g.seeds + g.steps:
            env[n] = values[n.name]
        tan = dict(zip(g.seeds, tangents))
        # Steps whose (first) tangent this pass allocated and no other tangent shares. The only
        # reader of such a tangent may write into it: a fresh multi-MB tangent often costs more in
        # page faults than in arithmetic on a CPU (the allocator returns freed memory to the OS; on
        # the bench's tanh MLP a fresh 2 MB activation tangent took 0.9 ms, its multiply 0.07 ms).
        owned = set()
        mine = lambda a, n: not differentiable and a in owned and g.sole_reader.get(a) is n
        q = 0  # a Python 0 until the first term: an add under two vmap levels costs ~30 us
        for i, n in enumerate(g.steps):
            for dead in g.dead_after[i - 1] if i else ():
                tan.pop(dead, None)
            if n.target is operator.getitem:
                src = tan[n.args[0]]
                tan[n] = src[n.args[1]]
                if n.args[1] == 0 and mine(n.args[0], n):
                    owned.add(n)
                continue
            if n not in g.floating:  # booleans and indices: constants for what follows
                continue
            live = [a for a in g.inputs[n] if a in tan]
            if not live:  # a seed reaches it only through booleans (a mask cast to float): a constant
                continue
            if n.name in d1:
                t = tan[live[0]]
                in_place = mine(live[0], n) and _same_layout(live[0], n)
                term = _fused_step(t, d1[n.name], c2[n.name]) if in_place and n.name in c2 else None
                if term is not None:
                    q = _plus(q, term)
                    tan[n] = t
                else:
                    if n.name in c2:  # in place on the temporary (see _pair_term) unless differentiated
                        q = _plus(q, ((c2[n.name] * t) * t if differentiable else (c2[n.name] * t).mul_(t)).sum())
                    tan[n] = _scaled(t, d1[n.name], in_place=in_place)
                owned.add(n)
                continue
            direct = _linear_tangent(n, env, tan, live, in_place=[a for a in live if mine(a, n)])
            if direct is not None:
                tan[n] = direct
                if n.target in _ALIASES and mine(live[0], n) or n.target in _LINEAR_ELEMENTWISE and len(live) == 2:
                    owned.add(n)
                continue
            # A direct rule; for a multi-output op only where its other outputs go unused (the
            # rules give them zero tangents: LayerNorm's mean and rstd, eval BatchNorm's empties).
            rule = (_RULES if differentiable else _FUSED_RULES).get(n.target)
            result = rule(n, env, tan, adjoints) if rule and (_outputs(n) == 1 or n in g.first_output_only) else None
            if result is not None:
                tan[n], term = result
                q = _plus(q, term)
                if rule in _FRESH_RULES:
                    owned.add(n)
                continue
            f = lambda *ts, n=n, live=live: _call(n, env, dict(zip(live, ts)))
            primals, tangents_in = tuple(env[a] for a in live), tuple(tan[a] for a in live)
            tan[n] = jvp(f, primals, tangents_in)[1]
            weights = [(i, adjoints.get(_key(n, i))) for i in range(_outputs(n))]
            weights = [(i, w) for i, w in weights if w is not None]
            if n in g.curved and weights:
                # t . grad^2 <lambda, op(a)> t, forward-over-reverse on this op alone. Not nested jvp:
                # forward-over-forward drops second-order terms of ops whose jvp rule reads
                # outputs saved without tangents (native_layer_norm's mean and rstd in PyTorch 2.13).
                def weighted(*a, f=f, weights=weights):
                    out = f(*a)
                    return sum((w * (out[i] if isinstance(out, (tuple, list)) else out)).sum() for i, w in weights)

                hessian_t = jvp(grad(weighted, argnums=tuple(range(len(live)))), primals, tangents_in)[1]
                q = _plus(q, sum((t * h).sum() for t, h in zip(tangents_in, hessian_t)))
        return tangents[0].new_zeros(()) if isinstance(q, int) else q


def _plus(q, term):
    """q + term, where either may be the Python 0 of no term (a rule's term where the output's
    adjoint is absent)."""
    if isinstance(term, int):
        return q
    return term if isinstance(q, int) else q + term


_SQRT_HALF, _INV_SQRT_2PI, _TANH_GELU_K, _TANH_GELU_C = 0.5**0.5, (2 * math.pi) ** -0.5, (2 / math.pi) ** 0.5, 0.044715


def _gelu(a: torch.Tensor, approximate: str = "none"):
    if approximate == "tanh":
        u1 = _TANH_GELU_K * (1 + 3 * _TANH_GELU_C * a * a)  # u = k (a + c a^3), T = tanh(u)
        T = torch.tanh(_TANH_GELU_K * (a + _TANH_GELU_C * a * a * a))
        sech2 = 1 - T * T
        d1 = 0.5 * (1 + T) + 0.5 * a * sech2 * u1
        return d1, sech2 * (u1 + 0.5 * a * (6 * _TANH_GELU_K * _TANH_GELU_C * a - 2 * T * u1 * u1))
    pdf = torch.exp(-0.5 * a * a) * _INV_SQRT_2PI
    return 0.5 * (1 + torch.erf(a * _SQRT_HALF)) + a * pdf, pdf * (2 - a * a)


def _tanh_from_output(y: torch.Tensor):
    d1 = 1 - y * y
    return d1, -2 * y * d1


def _sigmoid_from_output(s: torch.Tensor):
    d1 = s * (1 - s)
    return d1, d1 * (1 - 2 * s)


def _silu(a: torch.Tensor):
    s = torch.sigmoid(a)
    return s * (1 + a * (1 - s)), s * (1 - s) * (2 + a * (1 - 2 * s))


def _softplus(a: torch.Tensor, beta=1, threshold=20):
    # Identity above the threshold; at beta * a == threshold PyTorch's first derivative takes the
    # curved branch and its second the linear one: both kept, so that double backward agrees.
    s = torch.sigmoid(beta * a)
    return torch.where(beta * a > threshold, 1.0, s), torch.where(beta * a < threshold, beta * s * (1 - s), 0.0)


def _exp_from_output(y: torch.Tensor):
    return y, y


# sigma' and sigma'' of common activations in closed form: a few elementwise ops, where nested
# forward mode costs about 0.5 ms per op whatever its size. Each takes the op's arguments after a.
_CLOSED_FORMS = {
    aten.gelu.default: _gelu,
    aten.silu.default: _silu,
    aten.softplus.default: _softplus,
}
# Those whose derivatives are functions of the op's output y = sigma(a): no second tanh, sigmoid
# or exp per activation (the primal pass has y already).
_CLOSED_FORMS_OF_OUTPUT = {
    aten.tanh.default: _tanh_from_output,
    aten.sigmoid.default: _sigmoid_from_output,
    aten.exp.default: _exp_from_output,
}


def _nested_forward_derivatives(
    n: torch.fx.Node, a_node: torch.fx.Node, a: torch.Tensor, constants: dict, batched, second: bool = True
):
    """(sigma'(a), sigma''(a)) of the elementwise op n by nested forward mode: the jvp of sigma'
    returns both (second=False: sigma' alone, and None). An op whose output has its input's shape
    broadcasts its constants into that shape, so it runs on all examples at once, without vmap's
    per-op cost; else per example."""

    def first(b):
        return jvp(lambda u: _call(n, constants, {a_node: u}), (b,), (torch.ones_like(b),))[1]

    over = batched if n.meta["val"].shape != a_node.meta["val"].shape else lambda f: f
    if not second:
        return over(first)(a), None
    return over(lambda b: jvp(first, (b,), (torch.ones_like(b),)))(a)


def closed_form_derivatives(n: torch.fx.Node, a: torch.Tensor, y: torch.Tensor):
    """(sigma'(a), sigma''(a)) of the elementwise op n at a, whose output is y = sigma(a), or None
    where no closed form is known (the op, or an argument that is not a plain number or string)."""
    if n.target in _CLOSED_FORMS_OF_OUTPUT and len(n.args) == 1 and not n.kwargs:
        return _CLOSED_FORMS_OF_OUTPUT[n.target](y)
    rule = _CLOSED_FORMS.get(n.target)
    rest = n.args[1:]
    if rule is None or not all(isinstance(v, (int, float, str)) for v in (*rest, *n.kwargs.values())):
        return None
    return rule(a, *rest, **n.kwargs)


class ForwardAdjointQuad:
    """v . H_b v of log p for every probe and example, [S, B, ...] -> [S, B], at a fixed x [B, ...].

    Build inside `prepared(model, x)` (eval mode, frozen parameters). The primal values,
    adjoints and elementwise derivatives are computed on the first call and kept."""

    def __init__(self, model: Callable, x: torch.Tensor, log_p: Optional[torch.Tensor] = None):
        """log_p [B]: the model's log p at x, from a forward of its own; the cached graph must give
        the same, else it is captured again (see checked_against)."""
        self.model, self.x = model, x.detach()
        self._log_p = None if log_p is None else log_p.detach()
        self._evaluator: Optional[_Evaluator] = None
        self._state = None

    def _prepared(self) -> tuple:
        def prepare():
            self._evaluator = _Evaluator(captured(self.model, self.x), [t.detach() for t in _tensors(self.model)])
            return self._evaluator.prepare((self.x,), per_example=True)

        key = _graph_key(self.model, self.x)
        return checked_against(self._log_p, prepare, lambda: forget(_graphs, self.model, key))

    def __call__(self, V: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        """V [S, B, ...] (x's shape after S) -> [S, B]."""
        if self._state is None:
            self._state = self._prepared()
        one = lambda vb, *state: self._evaluator.quad((vb,), *state, differentiable=differentiable)
        per_probe = vmap(one, in_dims=(0, 0, 0, 0, 0))
        return vmap(per_probe, in_dims=(0, None, None, None, None))(V, *self._state)

    def products(self, V: torch.Tensor) -> torch.Tensor:
        """H_b v for V [S, B, ...]: half the gradient of v . H v with respect to v, by autograd
        through the tangent pass (its transposed linear maps plus the second-order terms: about
        the FLOPs of one more tangent pass, against double backward's recomputed derivatives)."""
        V = V.detach().requires_grad_()
        with torch.enable_grad():
            quads = self(V, differentiable=True)
            if not quads.requires_grad:  # no term depends on v: nothing curved reaches log p, H = 0
                return torch.zeros_like(V)
            (twice,) = torch.autograd.grad(quads.sum(), V)
        return twice.mul_(0.5)


class ParameterForwardAdjointQuad:
    """v . H v of loss_fn(model(x), y) over the trainable parameters (those requiring grad) for
    flattened vectors [S, D] -> [S] (parameters in model.named_parameters() order). The graph
    is the whole batch's (the loss need not be a sum over examples); products of two live
    factors (a layer's weight and its input, both depending on the parameters) are the usual
    curved ops here, and cost one product of the two tangents each."""

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, x: torch.Tensor, y, loss: torch.Tensor):
        """loss: the loss evaluated by the model itself; the cached graph must give the same,
        else it is captured again (see checked_against)."""
        names, trainable = _trainable_first(model)
        state = dict(model.named_parameters()) | dict(model.named_buffers())
        self._params = [state[n].detach() for n in names[:trainable]]
        constants = [state[n].detach() for n in names[trainable:]] + [x.detach()]
        constants += [y.detach()] if isinstance(y, torch.Tensor) else []
        self._capture = lambda: _Evaluator(captured_loss(model, loss_fn, x, y), constants)
        self._forget = lambda: forget_loss_graph(model, loss_fn, x, y)
        self._loss = loss
        self._evaluator = self._capture()
        self._state = None

    def default_chunk_size(self) -> int:
        """Probes per vmapped call: about 2^20 elements in the largest tangent, which keeps the
        tangents cache-sized (on a SiLU ResNet 32 probes at once were 2x slower than one)."""
        largest = max(
            (math.prod(v.shape) for n in self._evaluator.graph.steps for v in _tensor_values(n)),
            default=1,
        )
        return max(1, 2**20 // max(1, largest))

    def __call__(self, flat: torch.Tensor) -> torch.Tensor:
        """flat [S, D] -> [S]."""
        if self._state is None:

            def prepare():
                if self._evaluator is None:
                    self._evaluator = self._capture()
                return self._evaluator.prepare(tuple(self._params), per_example=False)

            def forget():
                self._forget()
                self._evaluator = None

            self._state = checked_against(self._loss, prepare, forget)
        sizes = [p.numel() for p in self._params]

        def one(v):
            tangents = tuple(t.view_as(p) for t, p in zip(v.split(sizes), self._params))
            return self._evaluator.quad(tangents, *self._state)

        return vmap(one)(flat)


def _tensor_values(n: torch.fx.Node) -> list:
    return [v for v in tree_leaves(n.meta.get("val")) if isinstance(v, torch.Tensor)]


def _same_layout(a: torch.fx.Node, n: torch.fx.Node) -> bool:
    """a's values have n's shape and dtype: n's result may be written into a's tangent."""
    va, vn = a.meta.get("val"), n.meta.get("val")
    tensors = isinstance(va, torch.Tensor) and isinstance(vn, torch.Tensor)
    return tensors and (va.shape, va.dtype) == (vn.shape, vn.dtype)


def _scaled(t: torch.Tensor, d: torch.Tensor, in_place: bool) -> torch.Tensor:
    """d * t, written into t where allowed and vmap allows it (t carries every vmap level d has)."""
    if in_place:
        try:
            return t.mul_(d)
        except RuntimeError:  # vmap refuses before writing: t is batched on fewer levels than d
            pass
    return d * t


def _fused_step(t: torch.Tensor, d1: torch.Tensor, c2: torch.Tensor) -> Optional[torch.Tensor]:
    """sum c2 t^2, with t overwritten by d1 * t, in one pass (ops.curvature_step_: no temporary
    the size of t, whose page faults cost several times the arithmetic on a CPU); None, with t
    untouched, where the kernel does not apply (16-bit, or t batched on fewer vmap levels than
    the factors) or is not known to win: on a GPU the caching allocator has no page faults to
    save, and the CUDA and Triton kernels have not been timed on one yet."""
    if t.device.type != "cpu" or t.dtype not in ops.REAL_DTYPES:
        return None
    direct = _unbatched_step(t, d1, c2)
    if direct is not None:
        return direct
    try:
        return ops.curvature_step_(t.unsqueeze(0), d1.unsqueeze(0), c2.unsqueeze(0))[0]
    except RuntimeError:  # refused before writing: see _ops._curvature_step_vmap
        return None


def _levels(x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """x's plain tensor under its vmap wrappers, and their levels, innermost vmap first."""
    levels = []
    while is_batchedtensor(x):
        if maybe_get_bdim(x) != 0:
            return x, None
        levels.append(maybe_get_level(x))
        x = get_unwrapped(x)
    return x, levels


def _unbatched_step(t: torch.Tensor, d1: torch.Tensor, c2: torch.Tensor) -> Optional[torch.Tensor]:
    """The kernel called once on the tensors under the vmap wrappers, in the layout the pass
    makes (every vmap dim leading, the factors batched over the inner levels of t's): the op's
    vmap rules cost about 0.1 ms of Python per level and call, as much as the kernel. None in
    any other layout."""
    t_plain, t_levels = _levels(t)
    d1_plain, d1_levels = _levels(d1)
    c2_plain, c2_levels = _levels(c2)
    if not t_levels or d1_levels != c2_levels or d1_levels is None or t_levels[: len(d1_levels)] != d1_levels:
        return None
    if not (t_plain.is_contiguous() and t.numel() and d1.shape == c2.shape == t.shape):
        return None
    width = t.numel()  # per example, as vmap shows it
    rows = t_plain.view(-1, width)
    q = ops.curvature_step_(rows, d1_plain.reshape(-1, width), c2_plain.reshape(-1, width))
    q = q.view(t_plain.shape[: len(t_levels)])
    for level in reversed(t_levels):  # the outermost vmap's dim first
        q = _add_batch_dim(q, 0, level)
    return q


def _linear_tangent(n: torch.fx.Node, env: dict, tan: dict, live: list, in_place=()):
    """The tangent of a linear op computed from the tangents alone (no primal recomputed), or
    None where another rule is needed. in_place: inputs whose tangent the result may overwrite."""
    target, args = n.target, n.args
    if target in _VIEWS and live == [args[0]] and not n.kwargs:
        # a tangent need not have its primal's strides (expand, transposes): reshape, not view
        return aten.reshape.default(tan[args[0]], args[1])
    if target is aten.clone.default and live == [args[0]]:
        return tan[args[0]]
    if target is aten.slice_scatter.default and not n.kwargs:  # linear in the buffer and the slice
        base, src = (tan[a] if a in tan else torch.zeros_like(env[a]) for a in args[:2])
        return target(base, src, *args[2:])
    if target in _HOMOGENEOUS and live == [args[0]]:
        return _call(n, env, {args[0]: tan[args[0]]})
    if target in (aten.add.Tensor, aten.sub.Tensor) and set(n.kwargs) <= {"alpha"}:
        alpha = n.kwargs.get("alpha", 1)
        sign = -alpha if target is aten.sub.Tensor else alpha
        a, b = args[0], args[1]
        if a in tan and b in tan:
            if a in in_place and _same_layout(a, n):
                try:
                    return tan[a].add_(tan[b], alpha=sign)
                except RuntimeError:  # see _scaled
                    pass
            return torch.add(tan[a], tan[b], alpha=sign)
        out = tan[a] if a in tan else sign * tan[b]
        shape = n.meta["val"].shape
        return out if out.shape == shape else out.expand(shape)
    return None


def _pair_term(n: torch.fx.Node, adjoints: dict, both):
    """<lambda, D^2 B[t, t]> = 2 <lambda, B(t_a, t_b)> of a product B of two live factors."""
    weight = adjoints.get(_key(n, 0))
    # In place on a temporary: a fresh multi-MB result often costs more in page faults than in
    # arithmetic on a CPU (the allocator returns freed memory to the OS). The temporary carries
    # the tangents' vmap levels, which include every level the values and adjoints have.
    return 0 if both is None or weight is None else 2 * both.mul_(weight).sum()


def _product_tangent(n: torch.fx.Node, env: dict, tan: dict, adjoints: dict):
    """A product B(a, b) (mm, bmm, addmm, convolution, mul: bilinear in a and b, plus an
    additive bias): its tangent B(t_a, b) + B(a, t_b) [+ t_bias], and the term of B(t_a, t_b)
    when both factors are live. None when neither factor is live."""
    if n.kwargs:
        return None
    first, second, bias_at = _PRODUCTS[n.target]
    a, b = n.args[first], n.args[second]
    bias = n.args[bias_at] if bias_at is not None else None
    is_live = lambda m: isinstance(m, torch.fx.Node) and m in tan
    value = lambda m: env[m] if isinstance(m, torch.fx.Node) else m
    if not (is_live(a) or is_live(b)):
        return None
    if n.target is aten.convolution.default:
        apply = lambda u, w, t_bias=None: aten.convolution.default(u, w, t_bias, *n.args[3:])
    elif n.target is aten.addmm.default:
        apply = lambda u, w, t_bias=None: aten.mm.default(u, w) if t_bias is None else aten.addmm.default(t_bias, u, w)
    else:
        apply = lambda u, w, t_bias=None: n.target(u, w)
    t_bias = tan[bias] if is_live(bias) else None
    parts = []
    joined = is_live(a) and is_live(b) and n.target in _MATRIX_PRODUCTS and _joined_pays(tan[a], tan[b])
    if joined:  # B(t_a, b) + B(a, t_b) as one product, [t_a, a] @ [b; t_b]
        parts.append(apply(torch.cat([tan[a], value(a)], -1), torch.cat([value(b), tan[b]], -2), t_bias))
    elif is_live(a):
        parts.append(apply(tan[a], value(b), t_bias))
        t_bias = None
    if is_live(b) and not joined:
        parts.append(apply(value(a), tan[b], t_bias))
    out = parts[0] if len(parts) == 1 else parts[0].add_(parts[1])  # in place: see _pair_term
    shape = n.meta["val"].shape
    out = out if out.shape == shape else out.expand(shape)
    if not (is_live(a) and is_live(b)):
        return out, 0
    if n.target in _MATRIX_PRODUCTS:
        return out, _matrix_pair_term(tan[a], tan[b], adjoints.get(_key(n, 0)))
    return out, _pair_term(n, adjoints, apply(tan[a], tan[b]))


def _joined_pays(t_a: torch.Tensor, t_b: torch.Tensor) -> bool:
    """Whether [t_a, a] @ [b; t_b] (copies of the factors, one product written) costs less memory
    traffic than t_a @ b + a @ t_b (two products written and added): where the [m, n] product is
    larger than its [m, k] and [k, n] factors (attention's per-head and projection matrices in
    parameter space; not an MLP's square layers, 0.8x there)."""
    m, k, n = t_a.shape[-2], t_a.shape[-1], t_b.shape[-1]
    return m * k + k * n < m * n


def _matrix_pair_term(t_a: torch.Tensor, t_b: torch.Tensor, weight: Optional[torch.Tensor]):
    """2 <lambda, t_a @ t_b> (mm, bmm, addmm), associated so that the matrix product written is
    the smallest of t_a @ t_b [m, n], lambda @ t_b^T [m, k] and t_a^T @ lambda [k, n]: the same
    FLOPs, but on a CPU writing a large product of a short inner dimension costs more than its
    arithmetic (a linear layer's weight and input in parameter space: [1024, 96] against [32, 96]
    per probe; attention's scores: 16 x 16 against 16 x 8)."""
    if weight is None:
        return 0
    m, k, n = t_a.shape[-2], t_a.shape[-1], t_b.shape[-1]
    if m * n <= min(m * k, k * n):
        return 2 * (t_a @ t_b).mul_(weight).sum()
    if m * k <= k * n:
        return 2 * (weight @ t_b.transpose(-1, -2)).mul_(t_a).sum()
    return 2 * (t_a.transpose(-1, -2) @ weight).mul_(t_b).sum()


def _log_softmax_tangent(n: torch.fx.Node, env: dict, tan: dict, adjoints: dict):
    """log_softmax and logsumexp of one live input z along dims, s = softmax(z): the tangent
    (t - <s, t>, resp. <s, t>) and <lambda, D^2 op[t, t]>, where D^2 logsumexp[t, t] =
    <s, t^2> - <s, t>^2 per row (log_softmax: minus that, for every entry of the row). Computed
    directly: forward-over-reverse costs each probe several small kernels more."""
    if n.kwargs or n.args[0] not in tan:
        return None
    z, t = env[n.args[0]], tan[n.args[0]]
    if n.target is aten._log_softmax.default:
        if n.args[2] is not False:
            return None
        dims, s = n.args[1], env[n].exp()
    else:  # logsumexp
        dims, keepdim = n.args[1], n.args[2] if len(n.args) > 2 else False
        kept = [1 if d in _dims(dims, z.dim()) else k for d, k in enumerate(z.shape)]
        out = env[n] if keepdim else env[n].reshape(kept)
        s = (z - out).exp()
    dims = _dims(dims, z.dim())
    mean_t = (s * t).sum(dims, keepdim=True)
    adjoint = adjoints.get(_key(n, 0))
    if n.target is aten._log_softmax.default:
        tangent = t - mean_t
        row_weight = None if adjoint is None else -adjoint.sum(dims, keepdim=True)
    else:
        tangent = mean_t if keepdim else mean_t.squeeze(dims)
        row_weight = None if adjoint is None else adjoint.reshape(mean_t.shape)
    if row_weight is None:
        return tangent, 0
    variance = (s * t * t).sum(dims, keepdim=True) - mean_t * mean_t
    return tangent, (row_weight * variance).sum()


def _softmax_tangent(n: torch.fx.Node, env: dict, tan: dict, adjoints: dict, fused: bool = False):
    """softmax s of one live input along dim: tangent s u with u = t - <s, t>, and
    <lambda, D^2 s[t, t]> = sum lambda s (u^2 - <s, u^2>) (per row) = sum c u^2 with
    c = lambda s - s <lambda, s>, the same for every probe. fused: the term and the tangent in
    one pass over u (ops.curvature_step_, writing s u into u), as an elementwise op's."""
    if n.kwargs or n.args[0] not in tan:
        return None
    extra = n.args[2] if len(n.args) > 2 else None  # _softmax's half_to_float, _safe_softmax's dtype
    if extra not in (None, False):
        return None
    s, t, dim = env[n], tan[n.args[0]], n.args[1]
    u = t - (s * t).sum(dim, keepdim=True)
    adjoint = adjoints.get(_key(n, 0))
    if adjoint is None:
        return s * u, 0
    weighted = adjoint * s
    c = weighted - s * weighted.sum(dim, keepdim=True)
    term = _fused_step(u, s, c) if fused else None
    if term is not None:
        return u, term
    return s * u, (c * u * u).sum()


def _layer_norm_tangent(n: torch.fx.Node, env: dict, tan: dict, adjoints: dict):
    """native_layer_norm, out = x_hat * w + b with x_hat = (x - mean) * r over the normalised dims,
    r = 1 / sqrt(var + eps). With t_c = t - mean(t) and a = mean(x_hat t_c) per row:
    t_x_hat = r (t_c - x_hat a) and D^2 x_hat[t, t] = r^2 (x_hat (3 a^2 - mean(t_c^2)) - 2 a t_c);
    x_hat * w is a product (2 <lambda, t_x_hat t_w>, summed over the rows before t_w multiplies).
    The output's tangent is built in place on the fresh t_x_hat.
    The caller checks that the mean and rstd outputs are unused."""
    if n.kwargs:
        return None
    x, shape, weight, bias, _ = n.args
    if any(m in tan for m in _tensor_nodes(shape)):
        return None
    dims = list(range(env[x].dim() - len(shape), env[x].dim()))
    _, mean, rstd = env[n]
    x_hat = (env[x] - mean) * rstd
    w = None if weight is None else env[weight]
    t_w = tan.get(weight) if weight is not None else None
    out, term = None, 0
    if x in tan:
        t_c = tan[x] - tan[x].mean(dims, keepdim=True)
        a = (x_hat * t_c).mean(dims, keepdim=True)
        out = (x_hat * a).sub_(t_c).mul_(-rstd)  # t_x_hat; in place on temporaries (addcmul_ has no vmap rule)
        adjoint = adjoints.get(_key(n, 0))
        if adjoint is not None:
            scaled = adjoint if w is None else adjoint * w
            curvature = (scaled * x_hat).sum(dims, keepdim=True) * (3 * a * a - (t_c * t_c).mean(dims, keepdim=True))
            curvature = curvature - 2 * a * (scaled * t_c).sum(dims, keepdim=True)
            term = (rstd * rstd * curvature).sum()
            if t_w is not None:
                weighted = adjoint * out
                rows = list(range(dims[0]))  # none: sum([]) would sum over every dim
                term = term + 2 * ((weighted.sum(rows) if rows else weighted) * t_w).sum()
        if w is not None:
            out = out.mul_(w)
    if t_w is not None:
        out = x_hat * t_w if out is None else out.add_(x_hat * t_w)
    if bias is not None and bias in tan:
        out = tan[bias].expand(env[n][0].shape) if out is None else out.add_(tan[bias])
    if out is None:
        return None
    return (out, torch.zeros_like(mean), torch.zeros_like(rstd)), term


def _mse_tangent(n: torch.fx.Node, env: dict, tan: dict, adjoints: dict):
    """mse_loss(a, b) = reduce((a - b)^2): tangent reduce(2 d t) and <lambda, reduce(2 t^2)>, with
    d = a - b and t its tangent. Direct, and also needed: PyTorch 2.13's forward-over-reverse
    through mse_loss fails ("ZeroTensors are immutable")."""
    if n.kwargs:
        return None
    a, b = n.args[0], n.args[1]
    reduction = n.args[2] if len(n.args) > 2 else 1  # 0 none, 1 mean, 2 sum
    t = tan[a] if a in tan else -tan[b]
    if a in tan and b in tan:
        t = t - tan[b]
    reduce = {0: lambda z: z, 1: torch.mean, 2: torch.sum}[reduction]
    tangent = reduce(2 * (env[a] - env[b]) * t)
    adjoint = adjoints.get(_key(n, 0))
    return tangent, 0 if adjoint is None else (adjoint * reduce(2 * t * t)).sum()


def _nll_loss_tangent(n: torch.fx.Node, env: dict, tan: dict, adjoints: dict):
    """nll_loss_forward (and 2d) is linear in its input: the tangent is the op on the tangent, the
    total weight's is zero. Direct: the generic jvp costs each probe chunk several ms under vmap."""
    if n.kwargs or n.args[0] not in tan or any(m in tan for m in _tensor_nodes(n.args[1:])):
        return None
    out = _call(n, env, {n.args[0]: tan[n.args[0]]})[0]
    return (out, torch.zeros_like(env[n][1])), 0


def _dims(dims, rank: int) -> list[int]:
    dims = [dims] if isinstance(dims, int) else list(dims)
    return sorted(d % rank for d in dims) if dims else list(range(rank))


def _batch_norm_eval_tangent(n: torch.fx.Node, env: dict, tan: dict, adjoints: dict):
    """BatchNorm in eval mode, (x - mean) * rstd * weight + bias with constant running statistics:
    a product of the normalised input and the weight, as _product_tangent returns it (the op's
    other two outputs are empty in eval mode: zero tangents)."""
    if n.kwargs:
        return None
    if n.target is aten._native_batch_norm_legit_no_training.default:
        x, weight, bias, mean, var, _, eps = n.args
    elif n.target is aten.native_batch_norm.default and n.args[5] is False:
        x, weight, bias, mean, var, _, _, eps = n.args
    else:
        return None
    if mean in tan or var in tan or x not in tan:
        return None  # a live input is what makes the op curved; without it the generic rule is cheap
    shape = [1, -1] + [1] * (env[x].dim() - 2)
    rstd = torch.rsqrt(env[var] + eps).reshape(shape)
    both = None
    if weight is not None and weight in tan:
        t_normalised, t_weight = tan[x] * rstd, tan[weight].reshape(shape)
        out = t_normalised * env[weight].reshape(shape) + (env[x] - env[mean].reshape(shape)) * rstd * t_weight
        both = t_normalised * t_weight
    else:  # one multiply of the (large) tangent: the scale is per channel
        out = tan[x] * (rstd if weight is None else rstd * env[weight].reshape(shape))
    if bias is not None and bias in tan:
        out = out + tan[bias].reshape(shape)
    empty = [torch.zeros_like(v) for v in env[n][1:]]
    return (out, *empty), _pair_term(n, adjoints, both)


# max pooling ops (values, indices into the flattened spatial dims) -> how many spatial dims
_MAX_POOLS = {
    aten.max_pool2d_with_indices.default: 2,
    aten.max_pool3d_with_indices.default: 3,
    aten.adaptive_max_pool2d.default: 2,
    aten.adaptive_max_pool3d.default: 3,
}


def _max_pool_tangent(n: torch.fx.Node, env: dict, tan: dict, adjoints: dict):
    """Max pooling: the tangent is t at the primal's argmax, its indices output. The generic
    rule ran the pooling again for every probe chunk through jvp (on the ReLU CNN's parameter
    trace, 4 % of the time). Piecewise linear: no curvature term."""
    x = n.args[0]
    if x not in tan or n.kwargs:
        return None
    values, indices = env[n][0], env[n][1]
    spatial = _MAX_POOLS[n.target]
    out = tan[x].flatten(-spatial).gather(-1, indices.flatten(-spatial)).view(values.shape)
    return (out, None), 0


# Rules whose tangent (the first, for several outputs) is a fresh tensor.
_FRESH_RULES = {_product_tangent, _batch_norm_eval_tangent, _max_pool_tangent}


# product op -> (position of the first factor, of the second, of an additive bias or None)
_PRODUCTS = {
    aten.mm.default: (0, 1, None),
    aten.bmm.default: (0, 1, None),
    aten.mul.Tensor: (0, 1, None),
    aten.addmm.default: (1, 2, 0),
    aten.convolution.default: (0, 1, 2),
}
_MATRIX_PRODUCTS = {aten.mm.default, aten.bmm.default, aten.addmm.default}

# op -> its direct rule: (n, env, tangents, adjoints) -> (tangent, <lambda, D^2 op[t, t]>) or None
_RULES = (
    {
        aten._log_softmax.default: _log_softmax_tangent,
        aten.logsumexp.default: _log_softmax_tangent,
        aten._softmax.default: _softmax_tangent,
        aten._safe_softmax.default: _softmax_tangent,
        aten.mse_loss.default: _mse_tangent,
        aten.nll_loss_forward.default: _nll_loss_tangent,
        aten.nll_loss2d_forward.default: _nll_loss_tangent,
        aten.native_layer_norm.default: _layer_norm_tangent,
        aten._native_batch_norm_legit_no_training.default: _batch_norm_eval_tangent,
        aten.native_batch_norm.default: _batch_norm_eval_tangent,
    }
    | dict.fromkeys(_PRODUCTS, _product_tangent)
    | dict.fromkeys(_MAX_POOLS, _max_pool_tangent)
)
# ... where the pass may write into its fresh temporaries (not differentiated: see quad)
_FUSED_RULES = _RULES | dict.fromkeys(
    (aten._softmax.default, aten._safe_softmax.default), functools.partial(_softmax_tangent, fused=True)
)
