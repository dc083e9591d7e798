"""The end-to-end example (examples/model_selection_digits.py) on its smallest bank."""

import importlib.util
import math
from pathlib import Path

import pytest

from pykernels.selection import METHODS

pytest.importorskip("sklearn")
pytest.importorskip("scipy")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "model_selection_digits.py"


def test_example_prints_the_evaluation_table(capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("model_selection_digits", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--quick", "--probe", "120", "--csv", str(tmp_path / "scores.csv")])
    out = capsys.readouterr().out
    assert "How this differs from the paper's benchmark" in out
    assert "trained 4 source models" in out and "== target: inverted digits" in out
    assert "how well each estimator predicts the fine-tuned accuracy" in out
    assert set(result) == set(METHODS)
    assert all(math.isfinite(e.pearson) and math.isfinite(e.kendall) for e in result.values())
    lines = (tmp_path / "scores.csv").read_text().splitlines()
    assert lines[0].startswith("target,model,oracle,parc") and len(lines) == 1 + 4
