"""The benchmark runner (`pykernels bench`): suites build their cases, the
runner times them and writes the tables, results.json and the plots. Speed
itself is never asserted here (that is what the benchmarks report)."""

import importlib
import importlib.util
import io
import json
import os

import torch

from pykernels.bench._core import BenchContext, Case, time_interleaved
from pykernels.bench._runner import collect_cases, run, suite_names


def test_every_suite_builds_its_cases_and_declares_their_ops():
    ctx = BenchContext(device=torch.device("cpu"), quick=True)
    for name in suite_names():
        module = importlib.import_module(f"pykernels.bench.{name}")
        missing = [m for m in getattr(module, "REQUIRES", ()) if importlib.util.find_spec(m) is None]
        if missing:  # e.g. vllm_guard outside .venv-vllm: builds nothing, says why, does not fail
            assert module.cases(ctx) == [], f"suite {name} built cases without {missing}"
            continue
        cases = module.cases(ctx)
        assert cases, f"suite {name} built no cases"
        for case in cases:
            assert case.op in module.OPS, f"{name}: case op {case.op!r} not in OPS {module.OPS}"
            assert case.implementations or case.baselines, f"{name}: {case.shape} has nothing to time"
            assert all(callable(f) for f in {**case.implementations, **case.baselines}.values())


def test_ops_filter_builds_only_the_suites_asked_for():
    ctx = BenchContext(device=torch.device("cpu"), quick=True)
    cases = collect_cases(ctx, ["probe_stream_step"])
    assert cases and {c.op for c in cases} == {"probe_stream_step"}


def test_interleaved_timing_rotates_the_order_every_round():
    # A fixed order lets what runs just before a call move its time the same way every round.
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    case = Case("op", "shape", "float32", {"c": fns["c"]}, {"a": fns["a"], "b": fns["b"]}, interleaved_rounds=6)
    times = time_interleaved(case, BenchContext(device=torch.device("cpu"), quick=True))
    assert {name: rounds for name, (_, rounds) in times.items()} == {"a": 6, "b": 6, "c": 6}
    rounds = [calls[i : i + 3] for i in range(3, len(calls), 3)]  # after one warm-up call each
    assert rounds[:3] == [list("abc"), list("bca"), list("cab")]
    assert all(sorted(r) == list("abc") for r in rounds)


def test_runner_prints_tables_and_writes_results_and_plots(tmp_path):
    out = io.StringIO()
    rows = run(ops=["probe_stream_step", "energy"], device="cpu", quick=True, out_dir=str(tmp_path), stream=out)
    text = out.getvalue()
    assert "== probe_stream_step ==" in text and "== energy ==" in text
    assert all(r.error is None for r in rows), [r.error for r in rows if r.error]
    assert all(r.median_ms > 0 for r in rows)
    ours = [r for r in rows if r.kind == "ours"]
    assert ours and all(r.speedups for r in ours)  # every implementation is compared with a baseline
    energy = [r for r in rows if r.op == "energy" and r.kind == "ours"]
    assert all(r.gbps and r.pct_bandwidth and r.bandwidth_gbps for r in energy)  # memory-bound: GB/s and % bw
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["environment"]["read_bandwidth_GBps"] > 0
    assert len(results["results"]) == len(rows)
    for op in ("probe_stream_step", "energy"):
        assert os.path.getsize(tmp_path / f"{op}.png") > 1000
