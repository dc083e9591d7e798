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
sigma'(a) and lambda * sigma''(a) computed once, so each probe costs them three
multiplies; any other curved op (softmax, LayerNorm, the logsumexp of log p, a product
of two x-dependent tensors) gets its term by forward-over-reverse on that op alone (not
nested jvp: PyTorch 2.13's forward-over-forward through native_layer_norm is wrong).

The graph is the model's ATen graph for one example, captured with make_fx on fake
tensors (functionalized: no in-place ops), parameters and buffers as inputs (their
current values are used at every call), and cached per model, input shape, dtype,
device and module structure. Data-dependent control flow makes the capture fail
(CaptureFailed), so the caller uses another exact method. It runs per example under
vmap, then per probe under vmap.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable

import torch
from torch.func import functional_call, functionalize, grad, jvp, vmap
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_leaves

from ._model import log_likelihood_fn
from ._piecewise import _base_name, _is_piecewise_linear, _structure, per_model

aten = torch.ops.aten


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
    aten.avg_pool2d.default,
    aten._adaptive_avg_pool2d.default,
    aten.flatten.using_ints,
}


# Elementwise ops whose tangent _linear_tangent forms directly.
_LINEAR_ELEMENTWISE = {aten.add.Tensor, aten.sub.Tensor, aten.neg.default}


def _floating(n: torch.fx.Node) -> bool:
    """The op returns floating-point values (a comparison's booleans carry no tangent)."""
    val = n.meta.get("val")
    return any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in tree_leaves(val))


def _tensor_nodes(args) -> list:
    return [a for a in tree_leaves(args) if isinstance(a, torch.fx.Node)]


class _Graph:
    """The captured per-example graph and what is known about each node without data."""

    def __init__(self, gm: torch.fx.GraphModule, n_inputs: int):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.param_nodes, self.x_node = placeholders[:n_inputs], placeholders[n_inputs]
        (out,) = tree_leaves([n.args for n in self.nodes if n.op == "output"])
        self.output = out
        # Nodes that depend on x: they carry tangents.
        self.live = {self.x_node}
        for n in self.nodes:
            if n.op == "call_function" and any(a in self.live for a in n.all_input_nodes):
                self.live.add(n)
        self.steps = [n for n in self.nodes if n in self.live and n.op == "call_function"]
        self.curved = [n for n in self.steps if n.target is not operator.getitem and not self._piecewise_linear(n)]
        # Elementwise ops with one x-dependent input: derivatives precomputed once per x.
        self.elementwise = [
            n
            for n in self.steps
            if n.target is not operator.getitem
            and torch.Tag.pointwise in getattr(n.target, "tags", ())
            and n.target not in _LINEAR_ELEMENTWISE
            and _floating(n)
            and len([a for a in _tensor_nodes(n.args) if a in self.live]) == 1
            and not _tensor_nodes(n.kwargs)
        ]

    def _piecewise_linear(self, n) -> bool:
        tensors = _tensor_nodes((n.args, n.kwargs))
        return _is_piecewise_linear(_base_name(n.target), n.target, n.args, n.kwargs, [t in self.live for t in tensors])


def _capture(model: Callable, x: torch.Tensor) -> _Graph:
    """make_fx of log p for one example [1, ...] -> scalar, parameters and buffers as inputs."""
    names = _tensor_names(model)

    def log_p_one(flat, xb):
        if isinstance(model, torch.nn.Module):
            forward = lambda z: functional_call(model, dict(zip(names, flat)), (z,))
        else:  # a plain callable: its tensors are constants of the graph
            forward = model
        return log_likelihood_fn(forward, "reference")(xb.unsqueeze(0))[0]

    try:
        gm = make_fx(functionalize(log_p_one, remove="mutations"), tracing_mode="fake", _allow_non_fake_inputs=True)(
            _tensors(model), x[0]
        )
    except Exception as exc:  # noqa: BLE001  (any failure means: not capturable, another method is used)
        raise CaptureFailed(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}") from exc
    return _Graph(gm, len(names))


def _tensor_names(model) -> list[str]:
    if not isinstance(model, torch.nn.Module):
        return []
    return [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]


def _tensors(model) -> list[torch.Tensor]:
    if not isinstance(model, torch.nn.Module):
        return []
    return [t for _, t in model.named_parameters()] + [t for _, t in model.named_buffers()]


# model -> {(shape, dtype, device, structure): _Graph}
_graphs: weakref.WeakKeyDictionary[object, dict] = weakref.WeakKeyDictionary()


def captured(model: Callable, x: torch.Tensor) -> _Graph:
    """The graph for examples shaped like x[0], captured once per model, input shape, dtype,
    device and module structure (CaptureFailed is raised again each time)."""
    key = (tuple(x.shape[1:]), x.dtype, x.device, _structure(model))
    return per_model(_graphs, model, key, lambda: _capture(model, x))


def _substituted(n: torch.fx.Node, env: dict, replace: dict):
    """n's positional and keyword arguments with nodes read from env, except those in replace."""
    pick = lambda m: replace[m] if m in replace else env[m]
    return torch.fx.node.map_arg(n.args, pick), torch.fx.node.map_arg(n.kwargs, pick)


def _call(n: torch.fx.Node, env: dict, replace: dict):
    args, kwargs = _substituted(n, env, replace)
    return n.target(*args, **kwargs)


def _detached(value):
    return tuple(t.detach() for t in value) if isinstance(value, (tuple, list)) else value.detach()


def _key(n: torch.fx.Node, index: int) -> str:
    return f"{n.name}/{index}"


def _outputs(n: torch.fx.Node) -> int:
    """How many outputs the op returns (1 for a single tensor)."""
    val = n.meta.get("val")
    return len(val) if isinstance(val, (tuple, list)) else 1


class ForwardAdjointQuad:
    """v . H_b v for every probe and example, [S, B, ...] -> [S, B], at a fixed x [B, ...].

    Build inside `prepared(model, x)` (eval mode, frozen parameters). The primal values,
    adjoints and elementwise derivatives are computed on the first call and kept."""

    def __init__(self, model: Callable, x: torch.Tensor):
        self.model, self.x = model, x.detach()
        self.graph = captured(model, self.x)
        self._state = None

    def _constants(self) -> dict:
        """Every node that does not depend on x (parameters, buffers, their transposes), once."""
        g, env = self.graph, {}
        for node, tensor in zip(g.param_nodes, _tensors(self.model)):
            env[node] = tensor.detach()
        for n in g.nodes:
            if n.op == "get_attr":
                env[n] = getattr(g.gm, n.target)
            elif n.op == "call_function" and n not in g.live:
                env[n] = _call(n, env, {})
        return env

    def _prepare(self):
        g = self.graph
        constants = self._constants()

        def primal(xb):
            env = {**constants, g.x_node: xb}
            for n in g.steps:
                env[n] = _call(n, env, {})
            return env[g.output], {n.name: env[n] for n in g.steps}

        x = self.x.clone().requires_grad_()
        with torch.enable_grad():
            out, values = vmap(primal)(x)
            wrt = {}  # the float outputs of the curved ops: their adjoints are needed
            for n in g.curved:
                outputs = values[n.name] if isinstance(values[n.name], (tuple, list)) else [values[n.name]]
                for i, v in enumerate(outputs):
                    if isinstance(v, torch.Tensor) and v.is_floating_point() and v.requires_grad:
                        wrt[_key(n, i)] = v
            grads = torch.autograd.grad(out.sum(), list(wrt.values()), allow_unused=True) if wrt else ()
        adjoints = {k: a for k, a in zip(wrt, grads) if a is not None}
        values = {k: _detached(v) for k, v in values.items()}
        values[g.x_node.name] = self.x

        d1, c2 = {}, {}  # sigma'(a) and lambda * sigma''(a) of the elementwise ops
        for n in g.elementwise:
            (a_node,) = [a for a in _tensor_nodes(n.args) if a in g.live]

            def first(a, n=n, a_node=a_node):
                f = lambda b: _call(n, constants, {a_node: b})
                return jvp(f, (a,), (torch.ones_like(a),))[1]

            a, adjoint = values[a_node.name], adjoints.pop(_key(n, 0), None)
            if adjoint is None:  # its output does not reach log p
                d1[n.name] = vmap(first)(a)
            else:  # sigma' and sigma'' in one pass: the jvp of sigma' returns both
                d1[n.name], second = vmap(lambda b, first=first: jvp(first, (b,), (torch.ones_like(b),)))(a)
                c2[n.name] = adjoint * second
        self._state = constants, (values, adjoints, d1, c2)

    def _quad_one(self, constants: dict, vb: torch.Tensor, values: dict, adjoints: dict, d1: dict, c2: dict):
        """v . H v of one example and one probe (under vmap over both)."""
        g = self.graph
        env = {**constants, g.x_node: values[g.x_node.name]}
        for n in g.steps:
            env[n] = values[n.name]
        tan = {g.x_node: vb}
        q = vb.new_zeros(())
        for n in g.steps:
            if n.target is operator.getitem:
                src = tan[n.args[0]]
                tan[n] = src[n.args[1]]
                continue
            if not _floating(n):  # booleans and indices: constants for what follows
                continue
            live = [a for a in _tensor_nodes((n.args, n.kwargs)) if a in tan]
            if not live:  # x reaches it only through booleans (a mask cast to float): a constant
                continue
            if n.name in d1:
                t = tan[live[0]]
                tan[n] = d1[n.name] * t
                if n.name in c2:
                    q = q + (c2[n.name] * t * t).sum()
                continue
            direct = _linear_tangent(n, env, tan, live)
            if direct is not None:
                tan[n] = direct
                continue
            f = lambda *ts, n=n, live=live: _call(n, env, dict(zip(live, ts)))
            primals, tangents = tuple(env[a] for a in live), tuple(tan[a] for a in live)
            tan[n] = jvp(f, primals, tangents)[1]
            weights = [(i, adjoints.get(_key(n, i))) for i in range(_outputs(n))]
            weights = [(i, w) for i, w in weights if w is not None]
            if n in g.curved and weights:
                # t . grad^2 <lambda, op(a)> t, forward-over-reverse on this op alone. Not nested jvp:
                # forward-over-forward drops second-order terms of ops whose jvp rule reads
                # outputs saved without tangents (native_layer_norm's mean and rstd in PyTorch 2.13).
                def weighted(*a, f=f, weights=weights):
                    out = f(*a)
                    return sum((w * (out[i] if isinstance(out, (tuple, list)) else out)).sum() for i, w in weights)

                hessian_t = jvp(grad(weighted, argnums=tuple(range(len(live)))), primals, tangents)[1]
                q = q + sum((t * h).sum() for t, h in zip(tangents, hessian_t))
        return q

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        """V [S, B, ...] (x's shape after S) -> [S, B]."""
        if self._state is None:
            self._prepare()
        constants, state = self._state
        one = lambda vb, values, adjoints, d1, c2: self._quad_one(constants, vb, values, adjoints, d1, c2)
        per_probe = vmap(one, in_dims=(0, 0, 0, 0, 0))
        return vmap(per_probe, in_dims=(0, None, None, None, None))(V, *state)


def _linear_tangent(n: torch.fx.Node, env: dict, tan: dict, live: list):
    """The tangent of a linear op computed from the tangents alone (no primal recomputed), or
    None where the generic jvp is needed."""
    target, args = n.target, n.args
    if target in _HOMOGENEOUS and live == [args[0]]:
        return _call(n, env, {args[0]: tan[args[0]]})
    if target in (aten.add.Tensor, aten.sub.Tensor) and set(n.kwargs) <= {"alpha"}:
        alpha = n.kwargs.get("alpha", 1)
        sign = -alpha if target is aten.sub.Tensor else alpha
        parts = [tan[args[0]] if args[0] in tan else None, sign * tan[args[1]] if args[1] in tan else None]
        parts = [p for p in parts if p is not None]
        out = parts[0] if len(parts) == 1 else parts[0] + parts[1]
        shape = n.meta["val"].shape
        return out if out.shape == shape else out.expand(shape)
    if n.kwargs:
        return None
    if target in (aten.mm.default, aten.bmm.default) and len(live) == 1:
        return _call(n, env, {live[0]: tan[live[0]]})
    if target is aten.addmm.default and len(live) == 1 and live[0] is not args[0]:
        mat1, mat2 = (tan[args[1]], env[args[2]]) if live[0] is args[1] else (env[args[1]], tan[args[2]])
        return aten.mm.default(mat1, mat2)
    if target is aten.convolution.default and live == [args[0]]:
        return aten.convolution.default(tan[args[0]], env[args[1]], None, *args[3:])
    return None
