"""Bad input to pykernels.probe_scores: errors that name the argument, the
expected and the actual value."""

import pytest
import torch

import pykernels


def layers(L=2, B=2, T=5, H=8, dtype=torch.float32):
    return [torch.randn(B, T, H, dtype=dtype) for _ in range(L)]


W = torch.randn(2, 8, 3)


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (dict(hidden_states=[]), ValueError, "at least one layer"),
        (
            dict(hidden_states=torch.randn(0, 2, 5, 8)),
            ValueError,
            r"at least one layer \(L >= 1\), got shape \(0, 2, 5, 8\)",
        ),
        (dict(hidden_states="x"), TypeError, "hidden_states must be a .* got str"),
        (
            dict(hidden_states=torch.randn(2, 5, 8)),
            ValueError,
            r"hidden_states must have 4 dims .* got shape \(2, 5, 8\)",
        ),
        (
            dict(hidden_states=[torch.randn(5, 8), torch.randn(5, 8)]),
            ValueError,
            r"hidden_states\[0\] must have 3 dims",
        ),
        (
            dict(hidden_states=layers(dtype=torch.float64)),
            TypeError,
            r"hidden_states\[0\] must have dtype in \(float32, float16, bfloat16\), got float64",
        ),
        (
            dict(hidden_states=[torch.randn(2, 5, 8), torch.randn(2, 5, 8).half()]),
            TypeError,
            r"hidden_states\[1\] must have dtype in \(float32\)",
        ),
        (
            dict(hidden_states=[torch.randn(2, 5, 8), torch.randn(2, 6, 8)]),
            ValueError,
            r"hidden_states\[1\] has shape \(2, 6, 8\) but layer 0 has \(2, 5, 8\)",
        ),
        (dict(weight=torch.randn(3, 8, 3)), ValueError, "weight has 3 at dim 0 but the number of layers L is 2"),
        (dict(weight=torch.randn(2, 9, 3)), ValueError, "weight has 9 at dim 1 but the hidden size H"),
        (dict(weight=torch.randn(2, 8)), ValueError, r"weight must have 3 dims \[L, H, K\]"),
        (dict(weight=torch.randint(0, 2, (2, 8, 3))), TypeError, "weight must have dtype in"),
        (dict(bias=torch.randn(4)), ValueError, "bias has 4 at dim 0 but the number of heads K"),
        (dict(smoothing="mean"), ValueError, r"smoothing must be one of \('none', 'swim', 'ema'\), got 'mean'"),
        (dict(window=0), ValueError, "window must be >= 1, got 0"),
        (dict(window=2.5), TypeError, "window must be an int, got float"),
        (dict(window=2**63), ValueError, f"window must be <= {2**63 - 1}, got {2**63}"),
        (dict(smoothing="ema", ema_alpha=0.0), ValueError, r"ema_alpha must lie in \(0, 1\], got 0.0"),
        (dict(smoothing="ema", ema_alpha=1.5), ValueError, r"ema_alpha must lie in \(0, 1\], got 1.5"),
        (dict(smoothing="swim", ema_alpha=0.5), ValueError, "ema_alpha only applies to smoothing='ema'"),
        (dict(lengths=torch.tensor([5, 6])), ValueError, r"lengths must lie in \[0, T=5\], got values in \[5, 6\]"),
        (dict(lengths=torch.tensor([-1, 2])), ValueError, r"lengths must lie in \[0, T=5\]"),
        (dict(lengths=torch.tensor([5, 5, 5])), ValueError, "lengths has 3 at dim 0 but the batch size B is 2"),
        (dict(lengths=torch.tensor([5.0, 5.0])), TypeError, "lengths must have dtype in"),
        (dict(weight=torch.randn(2, 8, 3, device="meta")), ValueError, "weight must be on cpu .* got meta"),
    ],
)
def test_bad_input(kwargs, exc, pattern):
    # Checked at the Python boundary, before a backend is chosen.
    args = dict(hidden_states=layers(), weight=W)
    args.update(kwargs)
    with pytest.raises(exc, match=pattern):
        pykernels.probe_scores(**args)


@pytest.mark.parametrize(
    "args, pattern",
    [
        (lambda: ([], W, None, None, "swim", 4, 0.5), "at least one layer"),
        (lambda: (layers(), torch.randn(3, 8, 3), None, None, "swim", 4, 0.5), r"weight must be \[L=2, H=8, K\]"),
        (lambda: (layers(), W, torch.randn(4), None, "swim", 4, 0.5), r"bias must be \[K=3\]"),
        (lambda: (layers(), W, None, torch.tensor([9, 1]), "swim", 4, 0.5), r"lengths must lie in \[0, T=5\]"),
        (lambda: (layers(), W, None, None, "mean", 4, 0.5), "smoothing must be 'none', 'swim' or 'ema'"),
        (lambda: (layers(), W, None, None, "swim", 0, 0.5), "window must be >= 1"),
        (lambda: (layers(), W, None, None, "ema", 4, 1.5), r"ema_alpha must lie in \(0, 1\]"),
        (
            lambda: (
                [torch.randn(2, 5, 8), torch.randn(2, 5, 8).double()],
                torch.randn(2, 8, 3),
                None,
                None,
                "swim",
                4,
                0.5,
            ),
            "every layer must match layer 0",
        ),
    ],
)
def test_compiled_op_checks_its_arguments(args, pattern):
    # C++ hosts call the op without the Python checks: the binding's own checks.
    if not pykernels.backends()["cpu"].available:
        pytest.skip("cpu backend unavailable")
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.pykernels.probe_scores(*args())


def test_ema_alpha_follows_one_rule_everywhere():
    # probe_scores, ProbeStream and LinearProbe refuse ema_alpha without EMA smoothing alike.
    from pykernels.probes import LinearProbe, ProbeStream

    for smoothing in ("swim", "none"):
        with pytest.raises(ValueError, match="ema_alpha only applies to smoothing='ema'"):
            pykernels.probe_scores(layers(), W, smoothing=smoothing, ema_alpha=0.5)
        with pytest.raises(ValueError, match="ema_alpha only applies to smoothing='ema'"):
            ProbeStream(2, smoothing=smoothing, ema_alpha=0.5)
        with pytest.raises(ValueError, match="ema_alpha only applies to smoothing='ema'"):
            LinearProbe(2, 8, smoothing=smoothing, ema_alpha=0.5)
    with pytest.raises(ValueError, match=r"ema_alpha must lie in \(0, 1\]"):
        LinearProbe(2, 8, smoothing="ema", ema_alpha=0.0)
    assert LinearProbe(2, 8, smoothing="ema", ema_alpha=0.25).resolved_ema_alpha == 0.25
