"""The Hessian-vector products under torch.compile(fullgraph=True): zero graph breaks on the
smooth network families, and the same products as eager double backward (float64)."""

import pytest
import torch
from torch import nn

from pykernels import flatness
from pykernels.flatness._model import log_likelihood_fn
from pykernels.flatness.hvp import forward_over_reverse, reverse_over_reverse, twice_differentiable
from tests.flatness.models import SMOOTH_FAMILIES, inputs

# forward-over-reverse does not trace through BatchNorm / LayerNorm (PyTorch's fake tensors fail
# on their forward-mode rules under compile): those families use reverse_over_reverse.
CASES = [
    ("mlp-gelu", forward_over_reverse),
    ("cnn-gelu", forward_over_reverse),
    ("resnet-silu-batchnorm", reverse_over_reverse),
    ("attention", reverse_over_reverse),
]


@pytest.mark.parametrize("family, product", CASES, ids=[f"{f}-{p.__name__}" for f, p in CASES])
def test_hvp_compiles_with_zero_graph_breaks(family, product):
    model, x = SMOOTH_FAMILIES[family](), inputs()
    for p in model.parameters():
        p.requires_grad_(False)
    V = torch.randn(3, *x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    log_p = log_likelihood_fn(model, "reference")

    def hvp(x, V):
        with twice_differentiable():
            return product(log_p, x, V)

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(hvp)(x, V)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    compiled = torch.compile(hvp, fullgraph=True, backend="aot_eager")(x, V)
    expect = flatness.hvp(model, x, V, method="double-backward")
    torch.testing.assert_close(compiled, expect, rtol=1e-6, atol=1e-9)


def labels(x: torch.Tensor) -> torch.Tensor:
    """Class labels for the parameter measures' cross-entropy, on x's device."""
    return torch.arange(x.shape[0], device=x.device) % 2


# Each measure as a function of x (the model bound), the way a user compiles it. Power iteration
# runs all its iterations under compile; tol=0 makes eager do the same.
MEASURES = {
    "log_likelihood": lambda m, x: flatness.log_likelihood(m, x),
    "grad_norm": lambda m, x: flatness.grad_norm(m, x),
    "neighborhood_drop-sigma": lambda m, x: flatness.neighborhood_drop(m, x, sigma=0.1, samples=6, chunk_size=4),
    "neighborhood_drop-eps": lambda m, x: flatness.neighborhood_drop(m, x, eps=0.1, samples=6),
    "hvp": lambda m, x: flatness.hvp(m, x, torch.ones_like(x)),
    "hessian_trace-hutchinson": lambda m, x: flatness.hessian_trace(m, x, 9, seed=3),
    "hessian_trace-hutch++": lambda m, x: flatness.hessian_trace(m, x, 9, "hutch++", seed=3),
    "top_eigenvalues-lanczos": lambda m, x: flatness.top_eigenvalues(m, x, 2, iters=8),
    "top_eigenvalues-power": lambda m, x: flatness.top_eigenvalues(m, x, 2, "power", iters=4, tol=0.0),
    "spectral_density": lambda m, x: flatness.spectral_density(m, x, starts=2, steps=6, points=16),
    "exact_trace-gauss-newton": lambda m, x: flatness.exact_trace(m, x, check=False),
    "parameter_hessian_trace": lambda m, x: flatness.parameter_hessian_trace(
        m, nn.functional.cross_entropy, x, labels(x), 5
    ),
    "parameter_hessian_trace-hutch++": lambda m, x: flatness.parameter_hessian_trace(
        m, nn.functional.cross_entropy, x, labels(x), 6, "hutch++"
    ),
    "parameter_top_eigenvalues": lambda m, x: flatness.parameter_top_eigenvalues(
        m, nn.functional.cross_entropy, x, labels(x), 2, iters=6
    ),
}
# Every measure on the GELU MLP; on the other smooth families the ones whose products differ
# (Hessian-vector products through BatchNorm, attention and convolutions).
MEASURE_CASES = [("mlp-gelu", name) for name in MEASURES] + [
    (family, name)
    for family in ("cnn-gelu", "resnet-silu-batchnorm", "attention")
    for name in ("hessian_trace-hutchinson", "top_eigenvalues-lanczos", "parameter_hessian_trace")
]


def compiled_graphs(fn, *args):
    """fn(*args) under torch.compile(fullgraph=True) with a backend that records each graph it is
    given, then runs it as traced: (result, number of graphs)."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=counting_backend)(*args), len(graphs)


@pytest.mark.parametrize("family, measure", MEASURE_CASES)
def test_measure_compiles_as_one_graph(family, measure):
    """Each measure under torch.compile(fullgraph=True): one graph, and the eager result for the
    same seed (float64; eager may choose another exact HVP method, so equal to rounding)."""
    model, x = SMOOTH_FAMILIES[family](), inputs()
    run = MEASURES[measure]
    compiled, graph_count = compiled_graphs(lambda x: run(model, x), x)
    assert graph_count == 1
    eager = run(model, x)
    for got, want in zip(torch.utils._pytree.tree_leaves(compiled), torch.utils._pytree.tree_leaves(eager)):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


CUDA_CASES = [
    ("mlp-gelu", name)
    for name in (
        "grad_norm",
        "neighborhood_drop-eps",
        "hessian_trace-hutchinson",
        "hessian_trace-hutch++",
        "top_eigenvalues-lanczos",
        "parameter_hessian_trace",
    )
] + [("resnet-silu-batchnorm", "hessian_trace-hutchinson"), ("attention", "parameter_hessian_trace")]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("family, measure", CUDA_CASES)
def test_measures_on_cuda_equal_cpu(family, measure, compiled):
    """The measures on a GPU, eager (auto's choices, forward-adjoint's capture, the CUDA kernels)
    and compiled as one graph, give the CPU's float64 results: the probes and the noise come from
    the counter-based stream, the same on every device."""
    model, x = SMOOTH_FAMILIES[family](), inputs()
    expect = MEASURES[measure](model, x)
    model, x = model.cuda(), x.cuda()
    if compiled:
        got, graph_count = compiled_graphs(lambda x: MEASURES[measure](model, x), x)
        assert graph_count == 1
    else:
        got = MEASURES[measure](model, x)
    for g, e in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(expect)):
        assert g.device.type == "cuda"
        torch.testing.assert_close(g.cpu(), e, rtol=1e-7, atol=1e-9)


def test_exact_trace_check_under_compile_says_what_to_do():
    model, x = SMOOTH_FAMILIES["mlp-gelu"](), inputs()
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"compile exact_trace\(\.\.\., check=False\)"):
        torch.compile(lambda x: flatness.exact_trace(model, x), fullgraph=True, backend="aot_eager")(x)


@pytest.mark.parametrize("measure", ["log_likelihood", "hessian_trace-hutchinson", "parameter_hessian_trace"])
def test_measures_under_compile_refuse_a_train_mode_model(measure):
    """Eager measures switch a train-mode model to eval; under compile that would break the graph,
    so the user is told to call model.eval() first."""
    model, x = SMOOTH_FAMILIES["mlp-gelu"](), inputs()
    model.train()
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"call model\.eval\(\) before compiling"):
        torch.compile(lambda x: MEASURES[measure](model, x), fullgraph=True, backend="aot_eager")(x)
