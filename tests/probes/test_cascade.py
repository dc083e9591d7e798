"""Cascade: decisions, calibration to target rates, the cost report, fail closed."""

import math

import pytest
import torch

from pykernels.probes import Cascade
from pykernels.probes.cascade import ESCALATED_PASS, FLAG, PASS


def _scores(n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    benign_p, benign_c = torch.randn(n, generator=g), torch.randn(n, generator=g) - 1
    harmful_p, harmful_c = torch.randn(n // 4, generator=g) + 3, torch.randn(n // 4, generator=g) + 3
    return benign_p, benign_c, harmful_p, harmful_c


def test_decisions_by_hand():
    table = {"a": (-1.0, 9.0), "b": (2.0, -3.0), "c": (2.0, 4.0)}
    calls = []

    def classifier(x):
        calls.append(x)
        return table[x][1]

    cascade = Cascade(
        lambda xs: [table[x][0] for x in xs], classifier, escalate_threshold=0.5, final_threshold=1.0, alpha=0.5
    )
    result = cascade(["a", "b", "c"])
    # a: probe -1 <= 0.5 passes without the classifier; b: 0.5*2 + 0.5*-3 = -0.5 <= 1; c: 0.5*2 + 0.5*4 = 3 > 1.
    assert result.decisions == [PASS, ESCALATED_PASS, FLAG]
    assert result.flagged.tolist() == [False, False, True]
    assert calls == ["b", "c"]
    assert math.isnan(result.classifier_logits[0]) and result.classifier_logits[2] == 4.0
    r = result.report
    assert (r.exchanges, r.escalated, r.flagged, r.fail_closed) == (3, 2, 1, 0)
    assert r.escalation_rate == pytest.approx(2 / 3) and r.classifier_calls_per_1k == pytest.approx(2000 / 3)
    assert r.flag_rate == pytest.approx(1 / 3)


def test_relative_compute_with_given_costs():
    # The paper's accounting: probe on everything, classifier on the escalated 5.5%.
    n = 1000
    logits = [1.0] * 55 + [-1.0] * (n - 55)
    cascade = Cascade(lambda xs: logits, lambda x: 0.0, 0.0, 10.0, probe_cost=1.0, classifier_cost=100.0)
    report = cascade(list(range(n))).report
    assert report.escalation_rate == pytest.approx(0.055)
    assert report.relative_compute == pytest.approx(n * 100.0 / (n * 1.0 + 55 * 100.0))
    text = str(report)
    assert "escalation rate           5.50%" in text and "classifier calls per 1k   55.0" in text


def test_measured_costs_and_probe_time_per_token():
    cascade = Cascade(lambda xs: [5.0] * len(xs), lambda x: 0.0, 0.0, 100.0)
    report = cascade(["x"] * 10, num_tokens=400).report
    assert report.probe_us_per_token == pytest.approx(1e6 * report.probe_seconds / 400)
    assert report.relative_compute > 0 and report.classifier_seconds > 0


@pytest.mark.parametrize(
    "classifier, reason",
    [
        (lambda x: 1 / 0, "classifier raised ZeroDivisionError"),
        (lambda x: float("nan"), "classifier returned nan"),
        (lambda x: float("-inf"), "classifier returned -inf"),
        (lambda x: float("inf"), "classifier returned inf"),
        (lambda x: "not a number", "classifier raised ValueError"),
    ],
)
def test_classifier_failures_fail_closed(classifier, reason):
    cascade = Cascade(lambda xs: [3.0, -3.0], classifier, 0.0, 1e9)
    with pytest.warns(RuntimeWarning, match="1 of 2 exchanges flagged because the probe or the classifier failed"):
        result = cascade(["bad", "fine"])
    assert result.flagged.tolist() == [True, False]
    assert result.decisions[0].startswith("fail-closed: " + reason)
    assert result.report.fail_closed == 1 and result.report.flagged == 1


def test_decide_flags_non_finite_classifier_logits_and_checks_shapes():
    cascade = Cascade(lambda xs: xs, lambda x: 0.0, 0.0, 1e9)
    flags = cascade.decide([1.0, 1.0, 1.0, -1.0], [float("-inf"), float("nan"), 0.0, float("nan")])
    assert flags.tolist() == [True, True, False, False]  # the last one is not escalated
    with pytest.raises(ValueError, match="classifier_logits has 1 values but probe_logits has 2"):
        cascade.decide([1.0, 2.0], [0.0])


def test_nan_probe_logit_fails_closed():
    cascade = Cascade(lambda xs: [float("nan")], lambda x: -100.0, 0.0, 0.0)
    with pytest.warns(RuntimeWarning):
        result = cascade(["x"])
    assert result.flagged.tolist() == [True] and result.decisions == ["fail-closed: probe logit is NaN"]


def test_calibration_hits_the_target_rates():
    benign_p, benign_c, harmful_p, harmful_c = _scores()
    cascade = Cascade.calibrated(
        lambda xs: xs,
        lambda x: x,
        benign_p,
        benign_c,
        target_escalation_rate=0.055,
        target_flag_rate=0.005,
        harmful_probe=harmful_p,
        harmful_classifier=harmful_c,
    )
    cal = cascade.calibration
    assert cal["benign_escalation_rate"] == pytest.approx(0.055, abs=1e-3)
    assert cal["benign_flag_rate"] == pytest.approx(0.005, abs=1e-3)
    assert cal["harmful_detection_rate"] > 0.5
    assert (benign_p > cascade.escalate_threshold).float().mean() <= 0.055
    assert cascade.decide(benign_p, benign_c).float().mean() <= 0.005


def test_bad_arguments():
    benign_p, benign_c, *_ = _scores(100)
    with pytest.raises(ValueError, match=r"rates out of order: need 0 <= target_flag_rate <= target_escalation_rate"):
        Cascade.calibrate_thresholds(benign_p, benign_c, target_escalation_rate=0.01, target_flag_rate=0.05)
    with pytest.raises(ValueError, match="benign_probe has 100 scores but benign_classifier has 99"):
        Cascade.calibrate_thresholds(benign_p, benign_c[:99], 0.1, 0.01)
    with pytest.raises(ValueError, match="escalate_threshold must be a number"):
        Cascade(lambda xs: xs, lambda x: x, float("nan"), 0.0)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\], got 1.5"):
        Cascade(lambda xs: xs, lambda x: x, 0.0, 0.0, alpha=1.5)
    with pytest.raises(TypeError, match="probe and classifier must be callables"):
        Cascade(None, lambda x: x, 0.0, 0.0)
    with pytest.raises(ValueError, match="probe returned 1 logits for 2 exchanges"):
        Cascade(lambda xs: [0.0], lambda x: x, 0.0, 0.0)(["a", "b"])
