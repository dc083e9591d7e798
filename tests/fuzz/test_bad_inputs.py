"""Every class of bad input to the public API raises a named Python error (TypeError or
ValueError whose message names the argument), on every backend, before any kernel runs;
values inside each class are drawn by hypothesis."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import strategies as st

import pykernels
from pykernels.probes import ProbeStream
from pykernels.probes.training import LinearProbe, softmax_weighted_bce

from .common import device_of, fuzz, record, runnable_backends


@dataclasses.dataclass
class BadInput:
    name: str  # "<op>: <class of bad input>"
    call: Callable  # call(backend, device, value) must raise
    error: type | tuple
    match: str  # a regex the message must contain: the argument's name
    values: st.SearchStrategy = st.just(None)
    backends: tuple = ("reference", "cpu", "triton", "cuda")  # backends where it applies / fails


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=torch.float64).to(device, dtype)


def layers(device, L=2, B=2, T=5, H=4, dtype=torch.float32):
    return [t(B, T, H, dtype=dtype, device=device) for _ in range(L)]


def scores(b, d, *, hidden=None, weight=None, **kw):
    hidden = layers(d) if hidden is None else hidden
    weight = t(2, 4, 3, device=d) if weight is None else weight
    return pykernels.probe_scores(hidden, weight, backend=b, **kw)


def loss(b, d, *, logits=None, labels=None, lengths=None, **kw):
    logits = t(3, 6, device=d) if logits is None else logits
    labels = torch.tensor([0.0, 1.0, 0.5], device=d) if labels is None else labels
    lengths = torch.tensor([6, 1, 3], device=d) if lengths is None else lengths
    return softmax_weighted_bce(logits, labels, lengths, backend=b, **kw)


def stream(b, d, **kw):
    return ProbeStream(4, 2, device=d, backend=b, **kw)


ints_below_1 = st.integers(-(2**70), 0)
not_ints = st.one_of(st.floats(allow_nan=True), st.booleans(), st.text(max_size=3), st.none())
bad_alphas = st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0, exclude_min=True), st.just(math.nan))

CASES = [
    # ---- probe_scores
    BadInput(
        "probe_scores: hidden_states of another type",
        lambda b, d, v: scores(b, d, hidden=v),
        TypeError,
        "hidden_states",
        st.sampled_from([3, "x", 2.5, {"a": 1}]),
    ),
    BadInput("probe_scores: no layers", lambda b, d, v: scores(b, d, hidden=[]), ValueError, "hidden_states"),
    BadInput(
        "probe_scores: a stacked tensor with 3 dims",
        lambda b, d, v: scores(b, d, hidden=t(2, 5, 4, device=d)),
        ValueError,
        "hidden_states",
    ),
    BadInput(
        "probe_scores: a stacked tensor with 0 layers",
        lambda b, d, v: scores(b, d, hidden=t(0, 2, 5, 4, device=d)),
        ValueError,
        "hidden_states",
    ),
    BadInput(
        "probe_scores: integer activations",
        lambda b, d, v: scores(b, d, hidden=[torch.ones(2, 5, 4, dtype=v, device=d)] * 2),
        TypeError,
        r"hidden_states\[0\]",
        st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.bool]),
    ),
    BadInput(
        "probe_scores: float64 activations",
        lambda b, d, v: scores(b, d, hidden=layers(d, dtype=torch.float64)),
        TypeError,
        r"hidden_states\[0\]",
    ),
    BadInput(
        "probe_scores: layers of different shapes",
        lambda b, d, v: scores(b, d, hidden=[t(2, 5, 4, device=d), t(2, 6, 4, device=d)]),
        ValueError,
        r"hidden_states\[1\]",
    ),
    BadInput(
        "probe_scores: layers of different dtypes",
        lambda b, d, v: scores(b, d, hidden=[t(2, 5, 4, device=d), t(2, 5, 4, dtype=torch.float16, device=d)]),
        TypeError,
        r"hidden_states\[1\]",
    ),
    BadInput(
        "probe_scores: weight of wrong rank",
        lambda b, d, v: scores(b, d, weight=t(*v, device=d)),
        ValueError,
        "weight",
        st.sampled_from([(4, 3), (2, 4, 3, 1), (8,)]),
    ),
    BadInput(
        "probe_scores: weight for another L or H",
        lambda b, d, v: scores(b, d, weight=t(*v, device=d)),
        ValueError,
        "weight",
        st.sampled_from([(3, 4, 3), (1, 4, 3), (2, 5, 3), (2, 3, 3)]),
    ),
    BadInput(
        "probe_scores: integer weight",
        lambda b, d, v: scores(b, d, weight=torch.ones(2, 4, 3, dtype=torch.int64)),
        TypeError,
        "weight",
    ),
    BadInput(
        "probe_scores: bias of wrong shape",
        lambda b, d, v: pykernels.probe_scores(layers(d), t(2, 4, 3, device=d), t(*v, device=d), backend=b),
        ValueError,
        "bias",
        st.sampled_from([(2,), (4,), (3, 1)]),
    ),
    BadInput(
        "probe_scores: unknown smoothing",
        lambda b, d, v: scores(b, d, smoothing=v),
        ValueError,
        "smoothing",
        st.sampled_from(["mean", "", "EMA", "swim "]),
    ),
    BadInput("probe_scores: window < 1", lambda b, d, v: scores(b, d, window=v), ValueError, "window", ints_below_1),
    BadInput("probe_scores: window not an int", lambda b, d, v: scores(b, d, window=v), TypeError, "window", not_ints),
    BadInput(
        "probe_scores: window past int64",
        lambda b, d, v: scores(b, d, window=v),
        (ValueError, TypeError),
        "window",
        st.integers(2**63, 2**80),
    ),
    BadInput(
        "probe_scores: ema_alpha outside (0, 1]",
        lambda b, d, v: scores(b, d, smoothing="ema", ema_alpha=v),
        ValueError,
        "ema_alpha",
        bad_alphas,
    ),
    BadInput(
        "probe_scores: ema_alpha without EMA smoothing",
        lambda b, d, v: scores(b, d, smoothing=v, ema_alpha=0.5),
        ValueError,
        "ema_alpha",
        st.sampled_from(["none", "swim"]),
    ),
    BadInput(
        "probe_scores: float lengths",
        lambda b, d, v: scores(b, d, lengths=torch.tensor([5.0, 3.0], device=d)),
        TypeError,
        "lengths",
    ),
    BadInput(
        "probe_scores: lengths of wrong shape",
        lambda b, d, v: scores(b, d, lengths=torch.ones(*v, dtype=torch.int64, device=d)),
        ValueError,
        "lengths",
        st.sampled_from([(3,), (1,), (2, 1)]),
    ),
    BadInput(
        "probe_scores: lengths outside [0, T]",
        lambda b, d, v: scores(b, d, lengths=torch.tensor([2, v], device=d)),
        ValueError,
        "lengths",
        st.one_of(st.integers(-(2**62), -1), st.integers(6, 2**62)),
    ),
    # ---- probe_accumulate_
    BadInput(
        "probe_accumulate_: acc not float32",
        lambda b, d, v: pykernels.probe_accumulate_(
            torch.zeros(3, 2, dtype=v, device=d), t(3, 4, device=d), t(4, 2, device=d), backend=b
        ),
        TypeError,
        "acc",
        st.sampled_from([torch.float64, torch.float16, torch.int64]),
    ),
    BadInput(
        "probe_accumulate_: integer hidden",
        lambda b, d, v: pykernels.probe_accumulate_(
            torch.zeros(3, 2, device=d), torch.ones(3, 4, dtype=torch.int32, device=d), t(4, 2, device=d), backend=b
        ),
        TypeError,
        "hidden",
    ),
    BadInput(
        "probe_accumulate_: hidden rows != acc rows",
        lambda b, d, v: pykernels.probe_accumulate_(
            torch.zeros(3, 2, device=d), t(v, 4, device=d), t(4, 2, device=d), backend=b
        ),
        ValueError,
        "hidden",
        st.sampled_from([0, 2, 4]),
    ),
    BadInput(
        "probe_accumulate_: weight_l of wrong shape",
        lambda b, d, v: pykernels.probe_accumulate_(
            torch.zeros(3, 2, device=d), t(3, 4, device=d), t(*v, device=d), backend=b
        ),
        ValueError,
        "weight_l",
        st.sampled_from([(5, 2), (4, 3), (2, 4), (4,)]),
    ),
    # ---- softmax_weighted_bce
    BadInput(
        "softmax_weighted_bce: token_logits not [B, T]",
        lambda b, d, v: loss(b, d, logits=t(*v, device=d)),
        ValueError,
        "token_logits",
        st.sampled_from([(3,), (3, 6, 1)]),
    ),
    BadInput(
        "softmax_weighted_bce: integer token_logits",
        lambda b, d, v: loss(b, d, logits=torch.ones(3, 6, dtype=torch.int64, device=d)),
        TypeError,
        "token_logits",
    ),
    BadInput(
        "softmax_weighted_bce: labels outside [0, 1]",
        lambda b, d, v: loss(b, d, labels=torch.tensor([0.0, v, 1.0], device=d)),
        ValueError,
        "labels",
        st.one_of(st.floats(max_value=-1e-6), st.floats(min_value=1.000001), st.just(math.nan)),
    ),
    BadInput(
        "softmax_weighted_bce: labels of wrong shape",
        lambda b, d, v: loss(b, d, labels=torch.zeros(*v, device=d)),
        ValueError,
        "labels",
        st.sampled_from([(2,), (4,), (3, 1)]),
    ),
    BadInput(
        "softmax_weighted_bce: lengths outside [1, T]",
        lambda b, d, v: loss(b, d, lengths=torch.tensor([6, v, 2], device=d)),
        ValueError,
        "lengths",
        st.one_of(st.integers(-(2**62), 0), st.integers(7, 2**62)),
    ),
    BadInput(
        "softmax_weighted_bce: float lengths",
        lambda b, d, v: loss(b, d, lengths=torch.tensor([6.0, 1.0, 3.0], device=d)),
        TypeError,
        "lengths",
    ),
    BadInput(
        "softmax_weighted_bce: tau not positive and finite",
        lambda b, d, v: loss(b, d, tau=v),
        ValueError,
        "tau",
        st.one_of(st.floats(max_value=0.0), st.sampled_from([math.inf, math.nan])),
    ),
    BadInput(
        "softmax_weighted_bce: window < 1", lambda b, d, v: loss(b, d, window=v), ValueError, "window", ints_below_1
    ),
    BadInput(
        "softmax_weighted_bce: unknown reduction",
        lambda b, d, v: loss(b, d, reduction=v),
        ValueError,
        "reduction",
        st.sampled_from(["sum", "", None]),
    ),
    BadInput(
        "softmax_weighted_bce: T = 0", lambda b, d, v: loss(b, d, logits=t(3, 0, device=d)), ValueError, "token_logits"
    ),
    # ---- flatness ops
    BadInput(
        "energy: not a float tensor",
        lambda b, d, v: pykernels.energy(
            v if not isinstance(v, torch.dtype) else torch.ones(3, 4, dtype=v, device=d), backend=b
        ),
        TypeError,
        "logits",
        st.sampled_from([torch.int64, torch.bool, torch.complex64, [1.0, 2.0], 3.0]),
    ),
    BadInput(
        "energy: 0-d logits",
        lambda b, d, v: pykernels.energy(torch.tensor(1.0, device=d), backend=b),
        ValueError,
        "logits",
    ),
    BadInput(
        "logsumexp_hvp: 16-bit logits",
        lambda b, d, v: pykernels.logsumexp_hvp(t(3, 4, dtype=v, device=d), t(1, 3, 4, dtype=v, device=d), backend=b),
        TypeError,
        "logits",
        st.sampled_from([torch.float16, torch.bfloat16]),
    ),
    BadInput(
        "logsumexp_hvp: tangents of another dtype",
        lambda b, d, v: pykernels.logsumexp_hvp(
            t(3, 4, device=d), t(1, 3, 4, dtype=torch.float64, device=d), backend=b
        ),
        TypeError,
        "tangents",
    ),
    BadInput(
        "logsumexp_hvp: tangents not [S, *logits.shape]",
        lambda b, d, v: pykernels.logsumexp_hvp(t(3, 4, device=d), t(*v, device=d), backend=b),
        ValueError,
        "tangents",
        st.sampled_from([(3, 4), (1, 3, 5), (2, 4, 4), (1, 1, 3, 4)]),
    ),
    BadInput(
        "fill_probes_: out not float32 / float64",
        lambda b, d, v: pykernels.fill_probes_(torch.zeros(5, dtype=v, device=d), 0, backend=b),
        TypeError,
        "out",
        st.sampled_from([torch.float16, torch.bfloat16, torch.int64, torch.complex64]),
    ),
    BadInput(
        "fill_probes_: seed not an int",
        lambda b, d, v: pykernels.fill_probes_(torch.zeros(5, device=d), v, backend=b),
        TypeError,
        "seed",
        not_ints,
    ),
    BadInput(
        "fill_probes_: seed past int64",
        lambda b, d, v: pykernels.fill_probes_(torch.zeros(5, device=d), v, backend=b),
        ValueError,
        "seed",
        st.one_of(st.integers(2**63, 2**90), st.integers(-(2**90), -(2**63) - 1)),
    ),
    BadInput(
        "fill_probes_: negative offset",
        lambda b, d, v: pykernels.fill_probes_(torch.zeros(5, device=d), 0, offset=v, backend=b),
        ValueError,
        "offset",
        st.integers(-(2**70), -1),
    ),
    BadInput(
        "fill_probes_: offset past int64",
        lambda b, d, v: pykernels.fill_probes_(torch.zeros(5, device=d), 0, offset=v, backend=b),
        (ValueError, TypeError),
        "offset",
        st.integers(2**63, 2**80),
    ),
    BadInput(
        "fill_probes_: unknown kind",
        lambda b, d, v: pykernels.fill_probes_(torch.zeros(5, device=d), 0, kind=v, backend=b),
        ValueError,
        "kind",
        st.sampled_from(["normal", "", "Gaussian"]),
    ),
    BadInput(
        "probe_vectors: integer dtype",
        lambda b, d, v: pykernels.probe_vectors((2, 3), 0, dtype=v, device=d, backend=b),
        TypeError,
        "dtype",
        st.sampled_from([torch.int64, torch.float16]),
    ),
    BadInput(
        "probe_dots: fewer than 3 dims",
        lambda b, d, v: pykernels.probe_dots(t(*v, device=d), t(*v, device=d), backend=b),
        ValueError,
        "v",
        st.sampled_from([(3,), (3, 4)]),
    ),
    BadInput(
        "probe_dots: w of another dtype or shape",
        lambda b, d, v: pykernels.probe_dots(t(2, 3, 4, device=d), t(*v[0], dtype=v[1], device=d), backend=b),
        (TypeError, ValueError),
        "w",
        st.sampled_from([((2, 3, 4), torch.float64), ((2, 3, 5), torch.float32), ((1, 3, 4), torch.float32)]),
    ),
    # ---- model selection
    BadInput(
        "pairwise_corr_distance: features not [N, D] / [B, N, D]",
        lambda b, d, v: pykernels.pairwise_corr_distance(t(*v, device=d), backend=b),
        ValueError,
        "features",
        st.sampled_from([(5,), (2, 3, 4, 5), (4, 0), (2, 4, 0)]),
    ),
    BadInput(
        "pairwise_corr_distance: integer features",
        lambda b, d, v: pykernels.pairwise_corr_distance(torch.ones(4, 3, dtype=v, device=d), backend=b),
        TypeError,
        "features",
        st.sampled_from([torch.int64, torch.uint8, torch.bool, torch.complex64]),
    ),
    BadInput(
        "spearman: 0-d x",
        lambda b, d, v: pykernels.spearman(torch.tensor(1.0, device=d), t(1, device=d), backend=b),
        ValueError,
        "x",
    ),
    BadInput(
        "spearman: y that does not broadcast",
        lambda b, d, v: pykernels.spearman(t(3, 5, device=d), t(*v, device=d), backend=b),
        ValueError,
        "y",
        st.sampled_from([(4,), (2, 5), (3, 5, 1)]),
    ),
    BadInput(
        "spearman: complex values",
        lambda b, d, v: pykernels.spearman(t(3, 5, device=d).to(torch.complex64), t(3, 5, device=d), backend=b),
        TypeError,
        "x",
    ),
    BadInput(
        "parc_spearman: non-integer classes",
        lambda b, d, v: pykernels.parc_spearman(t(6, 4, device=d), torch.zeros(6, dtype=v, device=d), backend=b),
        TypeError,
        "classes",
        st.sampled_from([torch.float32, torch.float64, torch.bool]),
    ),
    BadInput(
        "parc_spearman: classes of wrong shape",
        lambda b, d, v: pykernels.parc_spearman(
            t(6, 4, device=d), torch.zeros(v, dtype=torch.int64, device=d), backend=b
        ),
        ValueError,
        "classes",
        st.sampled_from([(5,), (7,), (6, 1), ()]),
    ),
    # ---- ProbeStream
    BadInput(
        "ProbeStream: max_slots / num_heads < 1",
        lambda b, d, v: ProbeStream(v[0], v[1], device=d, backend=b),
        ValueError,
        "max_slots|num_heads",
        st.sampled_from([(0, 1), (1, 0), (-3, 2)]),
    ),
    BadInput(
        "ProbeStream: ema_alpha without EMA smoothing",
        lambda b, d, v: stream(b, d, smoothing=v, ema_alpha=0.5),
        ValueError,
        "ema_alpha",
        st.sampled_from(["none", "swim"]),
    ),
    BadInput(
        "ProbeStream: ema_alpha outside (0, 1]",
        lambda b, d, v: stream(b, d, ema_alpha=v),
        ValueError,
        "ema_alpha",
        bad_alphas,
    ),
    BadInput(
        "ProbeStream: threshold count != heads",
        lambda b, d, v: stream(b, d, threshold=[0.0] * v),
        ValueError,
        "threshold",
        st.sampled_from([0, 3, 5]),
    ),
    BadInput(
        "ProbeStream.step: slot ids outside [0, max_slots) or repeated",
        lambda b, d, v: stream(b, d).step(v, t(len(v), 2, device=d)),
        ValueError,
        "slot ids",
        st.sampled_from([[4], [-1], [0, 0], [1, 2, 1], [2**40]]),
    ),
    BadInput(
        "ProbeStream.step: token_logits of wrong shape",
        lambda b, d, v: stream(b, d).step([0, 1], t(*v, device=d)),
        ValueError,
        "token_logits",
        st.sampled_from([(2, 3), (3, 2), (2,), (1, 2)]),
    ),
    BadInput(
        "ProbeStream.step: float slot ids",
        lambda b, d, v: stream(b, d).step(torch.tensor([0.0, 1.0], device=d), t(2, 2, device=d)),
        TypeError,
        "slot_ids",
    ),
    BadInput(
        "ProbeStream.step: active not bool [n]",
        lambda b, d, v: stream(b, d).step([0, 1], t(2, 2, device=d), active=v.to(d)),
        (TypeError, ValueError),
        "active",
        st.sampled_from([torch.ones(2), torch.ones(3, dtype=torch.bool), torch.ones(2, dtype=torch.int64)]),
    ),
    BadInput(
        "ProbeStream.reset: slot ids outside [0, max_slots)",
        lambda b, d, v: stream(b, d).reset(v),
        ValueError,
        "slot ids",
        st.sampled_from([[4], [-1], [0, 9]]),
    ),
    # ---- LinearProbe (backend independent)
    BadInput(
        "LinearProbe: ema_alpha without EMA smoothing",
        lambda b, d, v: LinearProbe(2, 4, smoothing=v, ema_alpha=0.5),
        ValueError,
        "ema_alpha",
        st.sampled_from(["none", "swim"]),
        backends=("reference",),
    ),
]


def _params():
    for case in CASES:
        for p in runnable_backends():
            backend = p.values[0]
            if backend not in case.backends:
                continue
            yield pytest.param(case, backend, marks=p.marks, id=f"{case.name} [{backend}]")


@pytest.mark.parametrize("case, backend", list(_params()))
def test_bad_input_raises_named_error(case, backend):
    device = device_of(backend)

    def body(value):
        record("bad input: " + case.name.split(":")[0], backend)
        with pytest.raises(case.error, match=case.match):
            case.call(backend, device, value)

    fuzz(backend, case.values, body, scale=0.15)
