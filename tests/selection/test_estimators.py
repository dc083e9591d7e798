"""The transferability estimators against numpy transcriptions of their definitions
(tests/selection/transcriptions.py), batched against one-at-a-time, on random and degenerate
inputs; bad input."""

import warnings

import numpy as np
import pytest
import torch

import pykernels.selection as S
from tests.selection import transcriptions as T


def bank(B=3, N=90, D=12, C=4, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, N)
    y[:C] = np.arange(C)
    x = rng.standard_normal((B, N, D)) + np.eye(C, D)[y][None] * rng.random((B, 1, 1)) * 3
    theta = rng.dirichlet(np.ones(7) * 0.5, size=(B, N))
    return x, theta, y


FEATURE_METHODS = {
    "hscore": (S.hscore, lambda f, y, C: T.hscore(f, y)),
    "hscore_shrinkage": (S.hscore_shrinkage, lambda f, y, C: T.hscore_shrinkage(f, y)),
    "logme": (S.logme, lambda f, y, C: T.logme(f, y)),
    "one_nn_cv": (S.one_nn_cv, lambda f, y, C: T.one_nn_cv(f, y)),
    "gbc": (S.gbc, lambda f, y, C: T.gbc(f, y)),
    "gbc_spherical": (lambda f, y: S.gbc(f, y, gaussian="spherical"), lambda f, y, C: T.gbc(f, y, "spherical")),
    "transrate": (S.transrate, lambda f, y, C: T.transrate(f, y)),
}
PROB_METHODS = {
    "leep": (S.leep, lambda p, y, C: T.leep(p, y, C)),
    "nce": (S.nce, lambda p, y, C: T.nce(p, y, C)),
}
TRANSCRIBED_WITH_SKLEARN = ("hscore_shrinkage",)  # scikit-learn's Ledoit-Wolf


def cases(methods):
    """(method, transcription) test params, skipped where the transcription needs scikit-learn
    and it is missing."""
    return [
        pytest.param(*pair, id=name, marks=T.requires_sklearn if name in TRANSCRIBED_WITH_SKLEARN else ())
        for name, pair in methods.items()
    ]


def _check(method, transcription, inputs, y, C, atol):
    got = method(torch.from_numpy(inputs), y)
    expect = np.array([transcription(m, y, C) for m in inputs])
    assert got.dtype == torch.float64 and got.shape == (len(inputs),)
    np.testing.assert_allclose(got.numpy(), expect, rtol=1e-9, atol=atol)


@pytest.mark.parametrize("method, transcription", cases(FEATURE_METHODS))
@pytest.mark.parametrize("shape", [(3, 90, 12, 4), (2, 40, 60, 3), (2, 200, 33, 9)], ids=["N>D", "D>N", "9-class"])
def test_feature_methods_match_transcriptions(method, transcription, shape):
    B, N, D, C = shape
    x, _, y = bank(B, N, D, C, seed=N + D)
    _check(method, transcription, x, y, C, atol=1e-9)


@pytest.mark.parametrize("method, transcription", cases(PROB_METHODS))
def test_probability_methods_match_transcriptions(method, transcription):
    for seed in range(3):
        _, theta, y = bank(seed=seed)
        _check(method, transcription, theta, y, 4, atol=1e-12)
        theta[:, :, 3] = 0  # a source class nobody predicts: P(z) = 0
        theta /= theta.sum(-1, keepdims=True)
        _check(method, transcription, theta, y, 4, atol=1e-12)


@pytest.mark.parametrize("method, transcription", cases(FEATURE_METHODS))
def test_degenerate_inputs(method, transcription):
    """One-sample classes, a constant feature column, duplicated samples."""
    x, _, y = bank(B=2, N=60, D=10, C=5, seed=7)
    y[y == 4] = 3
    y[10] = 4  # class 4 has one sample
    x[:, :, 2] = 1.5  # a constant column
    x[:, 20] = x[:, 21]  # a duplicated sample
    _check(method, transcription, x, y, 5, atol=1e-8)


@pytest.mark.parametrize("method, transcription", cases(FEATURE_METHODS) + cases(PROB_METHODS))
def test_absent_class_below_the_maximum_is_skipped(method, transcription):
    x, theta, y = bank(seed=8)
    y[y == 1] = 2  # class 1 absent
    if any(method is m for m, _ in PROB_METHODS.values()):
        _check(method, transcription, theta, y, 4, atol=1e-12)
    else:
        _check(method, transcription, x, y, 4, atol=1e-9)


def test_batched_list_and_single_calls_agree():
    x, _, y = bank(seed=9)
    widths = [x[0], x[1][:, :7], x[2]]
    for method, _ in FEATURE_METHODS.values():
        listed = method([torch.from_numpy(w) for w in widths], y)
        single = torch.stack([method(torch.from_numpy(w), y) for w in widths])
        torch.testing.assert_close(listed, single, atol=1e-12, rtol=1e-12)
        assert method(torch.from_numpy(x[0]), y).dim() == 0


@pytest.mark.parametrize("method", [pair[0] for pair in FEATURE_METHODS.values()], ids=list(FEATURE_METHODS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_a_model_with_non_finite_features_scores_nan_and_the_others_are_scored(method, bad):
    """As parc: NaN with a warning naming the model, not a linear-algebra error (logme, transrate)
    or a score that silently skips the entry (1-NN); the other models keep their scores."""
    x, _, y = bank(seed=3)
    clean = method(torch.from_numpy(x), y)
    x[1, 0, 0] = bad
    with pytest.warns(RuntimeWarning, match=r"NaN for model\(s\) \[1\]: NaN/Inf features"):
        got = method(torch.from_numpy(x), y)
    assert torch.isnan(got[1])
    torch.testing.assert_close(got[[0, 2]], clean[[0, 2]])
    with pytest.warns(RuntimeWarning, match="NaN for the model"):
        assert torch.isnan(method(torch.from_numpy(x[1]), y))


def test_float32_inputs_are_scored_in_float64():
    x, _, y = bank(seed=10)
    for method, _ in FEATURE_METHODS.values():
        torch.testing.assert_close(
            method(torch.from_numpy(x).float(), y), method(torch.from_numpy(x.astype(np.float32).astype(np.float64)), y)
        )


def test_inputs_that_require_grad_give_plain_scores():
    x, theta, y = bank(seed=12)
    for methods, data in ((FEATURE_METHODS, x), (PROB_METHODS, theta)):
        for method, _ in methods.values():
            expect = method(torch.from_numpy(data), y)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                got = method(torch.from_numpy(data).requires_grad_(), y)
            assert not got.requires_grad and got.grad_fn is None
            torch.testing.assert_close(got, expect, atol=0, rtol=0)


@pytest.mark.parametrize(
    "call, exc, pattern",
    [
        (lambda x, p, y: S.leep(torch.from_numpy(np.log(p)), y), ValueError, "negative values: pass probabilities"),
        (lambda x, p, y: S.leep(torch.from_numpy(p * 3), y), ValueError, "sums to 3, not 1"),
        (
            lambda x, p, y: S.nce(torch.from_numpy(p)[:, :10], y),
            ValueError,
            "labels has 90 entries but the features have N=10",
        ),
        (lambda x, p, y: S.logme(torch.from_numpy(x), np.zeros_like(y)), ValueError, "single class"),
        (lambda x, p, y: S.hscore(torch.from_numpy(x), np.eye(4)[y]), ValueError, r"needs class-id labels \[N\]"),
        (lambda x, p, y: S.gbc(torch.from_numpy(x), y, gaussian="full"), ValueError, "gaussian must be one of"),
        (
            lambda x, p, y: S.transrate(torch.from_numpy(x), y, num_classes=2),
            ValueError,
            "labels hold class 3 but num_classes is 2",
        ),
        (lambda x, p, y: S.one_nn_cv(torch.from_numpy(x)[:, :2], y[:2]), ValueError, "N=2 samples; at least 3"),
        (lambda x, p, y: S.parc(x, np.array(["cat", "dog"])[y % 2]), TypeError, "labels must hold numbers.*<U3"),
    ],
)
def test_bad_input(call, exc, pattern):
    x, theta, y = bank(seed=11)
    with pytest.raises(exc, match=pattern):
        call(x, theta, y)
