"""The digits example runs end to end on small sizes and writes its table and plots."""

import importlib.util
import json
import os

import pytest

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "digits_flatness.py")


def test_digits_example_quick(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("digits_flatness", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert set(results) == set(example.DEFENCES)
    for d in example.DEFENCES:
        r = results[d]
        assert 0.0 <= r["robust acc"] <= r["clean acc"] + 0.2 and r["clean acc"] > 0.2, (d, r)
        assert {"trace (exact)", "trace (Hutchinson)", "top eigenvalue", "grad norm"} <= set(r["measures"])
        assert d in out
    assert "PGD acc" in out and ("Verdict: " in out or "does not test the claim" in out)
    for name in ("landscape_random.png", "landscape_adversarial.png", "slice_adversarial.png", "table.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["verdict"] and saved["results"]["standard"]["measures"]["trace (exact)"]["mean"] > 0
