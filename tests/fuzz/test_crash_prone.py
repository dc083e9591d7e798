"""Inputs that could crash a C++ kernel run in a subprocess, so that a segfault (or, under
`./dev.sh sanitize`, an AddressSanitizer report) fails the test instead of killing pytest.

The compiled ops are called directly (torch.ops.pykernels.*), past the Python checks, with
inconsistent shapes, dtypes, strides and extreme scalars: the kernels' own checks must
reject what they cannot index safely ("raises"), and nothing may crash ("any": returning is
fine). A huge window must also return promptly (work bounded by T, not by the window)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pykernels

from .common import record, runnable_backends

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name -> (expectation, Python statement using torch as `torch`, ops as `P`, randn as `r`, int64 ones as `i`).
RAW_CASES = {
    "probe_scores: weight H != hidden H": (
        "raises",
        "P.probe_scores([r(2,5,4)]*2, r(2,5,3), None, None, 'none', 1, 1.)",
    ),
    "probe_scores: weight holds fewer layers": (
        "raises",
        "P.probe_scores([r(2,5,4)]*3, r(1,4,3), None, None, 'swim', 2, 1.)",
    ),
    "probe_scores: layers of different shapes": (
        "raises",
        "P.probe_scores([r(2,5,4), r(2,3,4)], r(2,4,3), None, None, 'ema', 1, .5)",
    ),
    "probe_scores: layers of different batch": (
        "raises",
        "P.probe_scores([r(2,5,4), r(1,5,4)], r(2,4,3), None, None, 'ema', 1, .5)",
    ),
    "probe_scores: no layers": ("raises", "P.probe_scores([], r(0,4,3), None, None, 'none', 1, 1.)"),
    "probe_scores: short bias": ("raises", "P.probe_scores([r(2,5,4)], r(1,4,3), r(2), None, 'none', 1, 1.)"),
    "probe_scores: short lengths": ("raises", "P.probe_scores([r(3,5,4)], r(1,4,3), None, i(1), 'none', 1, 1.)"),
    "probe_scores: lengths past T and negative": (
        "any",
        "P.probe_scores([r(2,5,4)], r(1,4,3), None, torch.tensor([99, -7]), 'swim', 3, 1.)",
    ),
    "probe_scores: window 0": ("any", "P.probe_scores([r(2,5,4)], r(1,4,3), None, None, 'swim', 0, 1.)"),
    "probe_scores: negative window": ("any", "P.probe_scores([r(2,5,4)], r(1,4,3), None, None, 'swim', -3, 1.)"),
    "probe_scores: huge window": ("any", "P.probe_scores([r(2,5,4)], r(1,4,3), None, None, 'swim', 2**62, 1.)"),
    "probe_scores: unknown smoothing": ("raises", "P.probe_scores([r(2,5,4)], r(1,4,3), None, None, 'bogus', 1, 1.)"),
    "probe_scores: integer activations": ("raises", "P.probe_scores([i(2,5,4)], r(1,4,3), None, None, 'none', 1, 1.)"),
    "probe_scores: 2-D layer": ("raises", "P.probe_scores([r(5,4)], r(1,4,3), None, None, 'none', 1, 1.)"),
    "probe_scores: 2-D weight": ("raises", "P.probe_scores([r(2,5,4)], r(4,3), None, None, 'none', 1, 1.)"),
    "probe_scores: odd strides": (
        "any",
        "P.probe_scores([r(4,9,6)[::2, ::3, ::-1].flip(2)], r(1,6,5)[:, :, ::2], None, None, 'ema', 1, 0.)",
    ),
    "probe_scores: NaN alpha": ("any", "P.probe_scores([r(2,5,4)], r(1,4,3), None, None, 'ema', 1, float('nan'))"),
    "probe_accumulate_: acc rows != hidden rows": ("raises", "P.probe_accumulate_(r(3,2), r(4,4), r(4,2))"),
    "probe_accumulate_: weight_l rows != H": ("raises", "P.probe_accumulate_(r(3,2), r(3,4), r(5,2))"),
    "probe_accumulate_: weight_l cols != K": ("raises", "P.probe_accumulate_(r(3,2), r(3,4), r(4,3))"),
    "probe_accumulate_: float64 acc": ("raises", "P.probe_accumulate_(r(3,2).double(), r(3,4), r(4,2))"),
    "probe_accumulate_: 1-D hidden": ("raises", "P.probe_accumulate_(r(3,2), r(4), r(4,2))"),
    "probe_accumulate_: strided acc": ("any", "P.probe_accumulate_(r(6,4)[::2, ::2], r(3,4), r(4,2))"),
    "probe_stream_step: ring too short for the window": (
        "raises",
        "P.probe_stream_step(r(5,2,3).zero_(), i(5,3), i(2).zero_(), torch.tensor([0,1]), r(2,3), None, r(3), 4, 1.)",
    ),
    "probe_stream_step: meta of wrong shape": (
        "raises",
        "P.probe_stream_step(r(5,1,3).zero_(), i(5,2), i(2).zero_(), torch.tensor([0,1]), r(2,3), None, r(3), 0, .5)",
    ),
    "probe_stream_step: fewer meta rows than slots": (
        "raises",
        "P.probe_stream_step(r(5,1,3).zero_(), i(2,3), i(2).zero_(), torch.tensor([3,4]), r(2,3), None, r(3), 0, .5)",
    ),
    "probe_stream_step: short status": (
        "raises",
        "P.probe_stream_step(r(5,1,3).zero_(), i(5,3), i(1).zero_(), torch.tensor([0]), r(1,3), None, r(3), 0, .5)",
    ),
    "probe_stream_step: logits of another K": (
        "raises",
        "P.probe_stream_step(r(5,1,3).zero_(), i(5,3), i(2).zero_(), torch.tensor([0,1]), r(2,4), None, r(3), 0, .5)",
    ),
    "probe_stream_step: fewer logits than ids": (
        "raises",
        "P.probe_stream_step(r(5,1,3).zero_(), i(5,3), i(2).zero_(), torch.tensor([0,1,2]), r(2,3), None, r(3), 0, .5)",
    ),
    "probe_stream_step: short threshold": (
        "raises",
        "P.probe_stream_step(r(5,1,3).zero_(), i(5,3), i(2).zero_(), torch.tensor([0,1]), r(2,3), None, r(2), 0, .5)",
    ),
    "probe_stream_step: short active": (
        "raises",
        "P.probe_stream_step(r(5,1,3).zero_(), i(5,3), i(2).zero_(), torch.tensor([0,1]), r(2,3), "
        "torch.ones(1, dtype=torch.bool), r(3), 0, .5)",
    ),
    "probe_stream_step: ids out of range": (
        "any",
        "P.probe_stream_step(r(5,1,3).zero_(), i(5,3), i(2).zero_(), torch.tensor([-1, 5, 2**40]), r(3,3), None, "
        "r(3), 0, .5)",
    ),
    "probe_stream_step: negative window": (
        "any",
        "P.probe_stream_step(r(5,2,3).zero_(), i(5,3), i(2).zero_(), torch.tensor([0]), r(1,3), None, r(3), -1, .5)",
    ),
    "softmax_weighted_bce_fwd: short labels": (
        "raises",
        "P.softmax_weighted_bce_fwd(r(3,6), r(2), torch.tensor([6,1,3]), 2, 1., False, True)",
    ),
    "softmax_weighted_bce_fwd: short lengths": (
        "raises",
        "P.softmax_weighted_bce_fwd(r(3,6), r(3), torch.tensor([6,1]), 2, 1., False, True)",
    ),
    "softmax_weighted_bce_fwd: lengths outside [1, T]": (
        "any",
        "P.softmax_weighted_bce_fwd(r(3,6), r(3), torch.tensor([0, 99, -4]), 2, 1., False, True)",
    ),
    "softmax_weighted_bce_fwd: window 0": (
        "any",
        "P.softmax_weighted_bce_fwd(r(3,6), r(3), torch.tensor([6,1,3]), 0, 1., False, True)",
    ),
    "softmax_weighted_bce_fwd: huge window": (
        "any",
        "P.softmax_weighted_bce_fwd(r(3,6), r(3), torch.tensor([6,1,3]), 2**62, 1., False, True)",
    ),
    "softmax_weighted_bce_fwd: tau 0": (
        "any",
        "P.softmax_weighted_bce_fwd(r(3,6), r(3), torch.tensor([6,1,3]), 2, 0., True, True)",
    ),
    "softmax_weighted_bce_fwd: T = 0": (
        "any",
        "P.softmax_weighted_bce_fwd(r(3,0), r(3), torch.tensor([0,0,0]), 2, 1., False, True)",
    ),
    "softmax_weighted_bce_fwd: 1-D logits": (
        "raises",
        "P.softmax_weighted_bce_fwd(r(6), r(1), torch.tensor([6]), 2, 1., False, True)",
    ),
    "energy: 0-d logits": ("any", "P.energy(torch.tensor(1.0))"),
    "energy: integer logits": ("raises", "P.energy(i(3,4))"),
    "energy: odd strides": ("any", "P.energy(r(6,8,5)[::2, ::-1].transpose(0, 2))"),
    "logsumexp_hvp: tangents of another K": ("raises", "P.logsumexp_hvp(r(3,4), r(2,3,5))"),
    "logsumexp_hvp: tangents of another batch": ("raises", "P.logsumexp_hvp(r(3,4), r(2,2,4))"),
    "logsumexp_hvp: tangents without S": ("raises", "P.logsumexp_hvp(r(3,4), r(3,4))"),
    "logsumexp_hvp: dtype mismatch": ("raises", "P.logsumexp_hvp(r(3,4), r(2,3,4).double())"),
    "fill_probes_: negative offset": ("any", "P.fill_probes_(r(5), 0, -3, 'rademacher')"),
    "fill_probes_: offset at int64 max": ("any", "P.fill_probes_(r(5), 0, 2**63 - 2, 'gaussian')"),
    "fill_probes_: unknown kind": ("raises", "P.fill_probes_(r(5), 0, 0, 'normal')"),
    "fill_probes_: integer out": ("raises", "P.fill_probes_(i(5), 0, 0, 'rademacher')"),
    "fill_probes_: overlapping out": ("any", "P.fill_probes_(r(1,3).expand(4,3), 0, 0, 'gaussian')"),
    "probe_dots: shape mismatch": ("raises", "P.probe_dots(r(2,3,4), r(2,3,5))"),
    "probe_dots: 2-D": ("raises", "P.probe_dots(r(2,3), r(2,3))"),
    "probe_dots: dtype mismatch": ("raises", "P.probe_dots(r(2,3,4), r(2,3,4).double())"),
    "pairwise_corr_distance: 2-D features": ("raises", "P.pairwise_corr_distance(r(5,4), True)"),
    "pairwise_corr_distance: 4-D features": ("raises", "P.pairwise_corr_distance(r(1,2,5,4), False)"),
    "pairwise_corr_distance: integer features": ("raises", "P.pairwise_corr_distance(i(1,5,4), False)"),
    "pairwise_corr_distance: no feature dims": ("any", "P.pairwise_corr_distance(r(1,5,0), True)"),
    "pairwise_corr_distance: no samples": ("any", "P.pairwise_corr_distance(r(2,0,3), False)"),
    "pairwise_corr_distance: non-contiguous": ("any", "P.pairwise_corr_distance(r(2,9,8)[:, ::2, 1::3], True)"),
    "spearman: y shorter than x": ("raises", "P.spearman(r(3,6), r(3,5))"),
    "spearman: fewer y rows": ("raises", "P.spearman(r(3,6), r(2,6))"),
    "spearman: 1-D x": ("raises", "P.spearman(r(6), r(6))"),
    "spearman: M = 0": ("any", "P.spearman(r(3,0), r(3,0))"),
    "spearman: no rows": ("any", "P.spearman(r(0,5), r(0,5))"),
    "spearman: float16": ("any", "P.spearman(r(3,6).half(), r(3,6).half())"),
    "spearman: integer rows": ("any", "P.spearman(i(3,6), i(3,6))"),
    "spearman: stride-0 y": ("any", "P.spearman(r(4,6), r(6).expand(4,6))"),
    "parc_spearman: short classes": ("raises", "P.parc_spearman(r(1,6,4), i(5))"),
    "parc_spearman: 2-D features": ("raises", "P.parc_spearman(r(6,4), i(6))"),
    "parc_spearman: int32 classes": ("any", "P.parc_spearman(r(1,6,4), i(6).int())"),
    "parc_spearman: extreme class ids": (
        "any",
        "P.parc_spearman(r(2,6,4), torch.tensor([-2**63, 2**63-1, 0, -1, 5, 2**40]))",
    ),
    "parc_spearman: one sample": ("any", "P.parc_spearman(r(1,1,4), i(1))"),
    "parc_spearman: no samples": ("any", "P.parc_spearman(r(1,0,4), i(0))"),
}

RUNNER = textwrap.dedent(r"""
    import json, sys, traceback
    sys.path.insert(0, sys.argv[1])
    from tests import sanitized_ops
    sanitized_ops.load()
    import torch
    import pykernels._ops
    P = torch.ops.pykernels
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    i = lambda *s: torch.ones(*s, dtype=torch.int64)
    for name, statement in json.loads(sys.stdin.read()):
        print("START " + json.dumps(name), flush=True)
        try:
            eval(statement)
            outcome = "returned"
        except Exception as exc:
            outcome = "raised " + type(exc).__name__
        print("DONE " + json.dumps([name, outcome]), flush=True)
""")

_results: dict = {}


def _run_raw_cases() -> dict:
    """Runs every case in subprocesses; after a crash, a new one resumes past the crashed case."""
    if _results:
        return _results
    pending = list(RAW_CASES)
    while pending:
        proc = subprocess.run(
            [sys.executable, "-c", RUNNER, ROOT],
            cwd=ROOT,
            capture_output=True,
            text=True,
            input=json.dumps([(n, RAW_CASES[n][1]) for n in pending]),
            timeout=600,
        )
        started = None
        for line in proc.stdout.splitlines():
            if line.startswith("START "):
                started = json.loads(line[6:])
            elif line.startswith("DONE "):
                name, outcome = json.loads(line[5:])
                _results[name] = outcome
                started = None
        if proc.returncode != 0:
            crashed = started if started is not None else pending[0]
            _results[crashed] = f"crashed (exit {proc.returncode}): {proc.stderr[-3000:]}"
        pending = [n for n in pending if n not in _results]
    return _results


@pytest.mark.skipif(not pykernels.backends()["cpu"].available, reason="the compiled extension is not loaded")
@pytest.mark.parametrize("name", list(RAW_CASES))
def test_compiled_op_survives_bad_input(name):
    expectation = RAW_CASES[name][0]
    outcome = _run_raw_cases()[name]
    record("compiled op, bad input (subprocess)", "cpu")
    assert not outcome.startswith("crashed"), f"{name}: {outcome}"
    if expectation == "raises":
        assert outcome.startswith("raised"), f"{name}: the kernel accepted inconsistent input ({outcome})"


HUGE_WINDOW = textwrap.dedent(r"""
    import sys
    sys.path.insert(0, sys.argv[1])
    import os
    device = sys.argv[3]
    if sys.argv[2] == "triton" and device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from tests import sanitized_ops
    sanitized_ops.load()
    import torch, pykernels
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(2, 7, 4, generator=g).to(device)]
    w = torch.randn(1, 4, 3, generator=g).to(device)
    for smoothing in ("swim", "ema"):
        huge = pykernels.probe_scores(layers, w, smoothing=smoothing, window=2**40, backend=sys.argv[2])
        alpha = 2.0 / (2**40 + 1)
        same = pykernels.probe_scores(layers, w, smoothing=smoothing, window=7,
                                      ema_alpha=alpha if smoothing == "ema" else None, backend=sys.argv[2])
        torch.testing.assert_close(huge, same, rtol=1e-6, atol=1e-6)  # a window past T acts as window T
    print("ok")
""")


@pytest.mark.parametrize("backend", runnable_backends())
def test_window_past_int32_returns_promptly(backend):
    record("probe_scores window=2**40 (subprocess)", backend)
    gpu = backend == "cuda" or (backend == "triton" and torch.cuda.is_available())
    device = "cuda" if gpu else "cpu"
    try:
        proc = subprocess.run(
            [sys.executable, "-c", HUGE_WINDOW, ROOT, backend, device],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("probe_scores(window=2**40) did not return within 60 s")
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr[-3000:]
