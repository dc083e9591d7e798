"""evaluate (the paper's metric and Kendall taus) against a transcription of the reference's
metrics.py; extract_features against hand-wired hooks."""

import warnings

import numpy as np
import pytest
import torch

import pykernels.selection as S

stats = pytest.importorskip("scipy.stats")


def reference_metric(scores, acc, target, run, layers=None):
    """metrics.py: optional add_plasticity (z-score over all rows, + layers / 50), then per run and
    target 100 * pearson over rows with accuracy > 0, mean over targets, then over runs."""
    s = np.asarray(scores, dtype=np.float64)
    if layers is not None:
        s = (s - s.mean()) / s.std(ddof=1) + np.asarray(layers) / 50
    per_run = []
    for r in np.unique(run):
        vals = []
        for t in np.unique(target):
            keep = (run == r) & (target == t) & (acc > 0)
            if keep.sum() >= 2:
                vals.append(stats.pearsonr(s[keep], acc[keep])[0] * 100)
        per_run.append(np.mean(vals))
    return np.mean(per_run)


def rows(seed=0, n=24):
    rng = np.random.default_rng(seed)
    target = np.repeat(["cifar", "pets", "cub"], n // 3)
    run = np.tile([0, 1], n // 2)
    acc = rng.uniform(40, 90, n)
    acc[3] = -1  # a missing fine-tune, as the reference marks it
    layers = rng.choice([8, 18, 50], n)
    good = acc + rng.normal(0, 8, n)
    noise = rng.normal(0, 1, n)
    return target, run, acc, layers, {"good": good, "noise": noise}


def test_paper_metric_matches_the_reference_transcription():
    target, run, acc, layers, scores = rows()
    table = S.evaluate(scores, acc, targets=target, runs=run)
    for name, s in scores.items():
        assert table[name].pearson == pytest.approx(reference_metric(s, acc, target, run), abs=1e-10)
        assert table[name].groups == 6
    with_capacity = S.evaluate(scores, acc, targets=target, runs=run, capacity=layers)
    for name, s in scores.items():
        assert with_capacity[name].pearson == pytest.approx(reference_metric(s, acc, target, run, layers), abs=1e-10)
    assert table["good"].pearson > 50 > table["noise"].pearson


def test_kendall_taus_average_per_group():
    target, run, acc, _, scores = rows(seed=1)
    table = S.evaluate(scores, acc, targets=target, runs=run)
    expect = []
    for r in (0, 1):
        per = []
        for t in np.unique(target):
            keep = (run == r) & (target == t) & (acc > 0)
            per.append(
                (
                    stats.kendalltau(scores["good"][keep], acc[keep])[0],
                    stats.weightedtau(scores["good"][keep], acc[keep])[0],
                )
            )
        expect.append(np.mean(per, axis=0))
    assert table["good"].kendall == pytest.approx(np.mean(expect, axis=0)[0], abs=1e-12)
    assert table["good"].weighted_kendall == pytest.approx(np.mean(expect, axis=0)[1], abs=1e-12)


def test_a_constant_group_is_skipped_and_counted_not_nan():
    target, run, acc, layers, scores = rows(seed=2)
    group = (run == 1) & (target == "pets")
    flat = scores["good"].copy()
    flat[group] = 7.0  # the method cannot tell these transfers apart: no correlation defined there
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no ConstantInputWarning from scipy
        result = S.evaluate({"flat": flat}, acc, targets=target, runs=run)["flat"]
    assert (result.groups, result.skipped) == (5, 1)
    others = ~group
    expect = reference_metric(flat[others], acc[others], target[others], run[others])
    assert result.pearson == pytest.approx(expect, abs=1e-10) and "skipped" in str(S.EvaluationTable(flat=result))
    # With capacity=, a method whose scores are all equal leaves only the capacity term.
    constant = S.evaluate({"c": np.full(len(acc), 3.0)}, acc, targets=target, runs=run, capacity=layers)["c"]
    capacity_only = S.evaluate({"cap": layers / 50.0}, acc, targets=target, runs=run)["cap"]
    assert constant.pearson == pytest.approx(capacity_only.pearson, abs=1e-10)
    assert (constant.groups, constant.skipped) == (capacity_only.groups, capacity_only.skipped)


def test_perfect_ranking_and_score_table_input():
    table = S.ScoreTable(
        ["a", "b", "c", "d"], {"parc": np.array([4.0, 3.0, np.nan, 1.0]), "logme": np.array([1.0, 2.0, 3.0, 4.0])}
    )
    result = S.evaluate(table, {"a": 90, "b": 80, "c": 70, "d": 60})
    assert result["parc"].kendall == pytest.approx(1.0) and result["parc"].pearson > 95  # NaN row left out
    assert result["logme"].kendall == pytest.approx(-1.0)
    assert str(result).splitlines()[2].startswith("parc")


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (dict(accuracies=np.ones(3)), ValueError, "accuracies have 3 rows but scores have 4"),
        (dict(targets=["a"]), ValueError, "one entry per row"),
        (dict(accuracies={"a": 1}), TypeError, "need scores as a ScoreTable"),
    ],
)
def test_evaluate_bad_input(kwargs, exc, pattern):
    args = dict(scores={"m": np.arange(4.0)}, accuracies=np.arange(1, 5.0))
    args.update(kwargs)
    with pytest.raises(exc, match=pattern):
        S.evaluate(**args)


class TwoHeads(torch.nn.Module):
    """conv -> flatten -> Linear -> ReLU -> Linear: the probe features are the last Linear's input."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)
        self.hidden = torch.nn.Linear(8, 5)
        self.head = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.relu(self.hidden(self.conv(x).flatten(1))))


def test_extract_features_captures_the_input_of_the_last_linear(capsys):
    torch.manual_seed(0)
    model = TwoHeads().train()
    x = torch.randn(10, 1, 3, 6)
    y = torch.arange(10) % 3
    probe = S.extract_features(model, (x, y), batch_size=4, progress=True)
    with torch.no_grad():
        expect = torch.relu(model.hidden(model.conv(x).flatten(1)))
        logits = model(x)
    torch.testing.assert_close(probe.features, expect)
    torch.testing.assert_close(probe.probs, torch.softmax(logits, -1))
    assert torch.equal(probe.labels, y) and model.training  # mode restored
    assert "extracting features: 10 samples" in capsys.readouterr().err
    assert not model.hidden._forward_pre_hooks and not model.head._forward_pre_hooks  # hooks removed
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=3)
    from_loader = S.extract_features(model, loader, progress=False)
    torch.testing.assert_close(from_loader.features, expect)
    assert from_loader.labels is None


def test_extract_features_bad_input():
    with pytest.raises(ValueError, match="no nn.Linear"):
        S.extract_features(torch.nn.Conv2d(1, 1, 1), torch.randn(2, 1, 3, 3))
    with pytest.raises(TypeError, match="data must be a DataLoader"):
        S.extract_features(TwoHeads(), "images/")
