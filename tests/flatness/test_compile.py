"""The Hessian-vector products under torch.compile(fullgraph=True): zero graph breaks on the
smooth network families, and the same products as eager double backward (float64)."""

import pytest
import torch

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


MEASURE_CASES = [
    ("mlp-gelu", "hutchinson"),
    ("cnn-gelu", "hutchinson"),
    ("resnet-silu-batchnorm", "hutchinson"),
    ("attention", "hutchinson"),
    ("mlp-gelu", "hutch++"),
    ("resnet-silu-batchnorm", "hutch++"),
]


@pytest.mark.parametrize("family, method", MEASURE_CASES)
def test_hessian_trace_compiles_as_one_graph(family, method):
    """flatness.hessian_trace itself under torch.compile(fullgraph=True): one graph (a backend that
    counts them), and the eager estimate and standard error for the same seed (float64)."""
    model, x = SMOOTH_FAMILIES[family](), inputs()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def trace(x):
        return flatness.hessian_trace(model, x, 9, method, seed=3)

    torch._dynamo.reset()
    compiled = torch.compile(trace, fullgraph=True, backend=counting_backend)(x)
    assert len(graphs) == 1
    eager = trace(x)
    torch.testing.assert_close(compiled.value, eager.value, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(compiled.stderr, eager.stderr, rtol=1e-9, atol=1e-12)


def test_hessian_trace_under_compile_refuses_a_train_mode_model():
    """Eager measures switch a train-mode model to eval; under compile that would break the graph,
    so the user is told to call model.eval() first."""
    model, x = SMOOTH_FAMILIES["mlp-gelu"](), inputs()
    model.train()
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"call model\.eval\(\) before compiling"):
        torch.compile(lambda x: flatness.hessian_trace(model, x, 4), fullgraph=True, backend="aot_eager")(x)
