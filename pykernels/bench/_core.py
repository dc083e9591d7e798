"""Benchmark cases, timing and the machine's memory bandwidth.

A Case is one shape of one op: the implementations to time (our backends) and
the baselines a user would otherwise run, each a zero-argument callable. Every
callable of a case is timed in the same process, back to back, and reported as
the median of repeats; speedups are ratios of those medians.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any, Optional

import torch


@dataclasses.dataclass
class BenchContext:
    device: torch.device
    quick: bool
    min_repeats: int = 5
    budget_s: float = 1.0  # time spent measuring one callable, after warm-up

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclasses.dataclass
class Case:
    op: str  # table this case belongs to, e.g. "probe_scores"
    shape: str  # human-readable shape, e.g. "L=32 H=1024 tokens=4096 K=4"
    dtype: str
    implementations: dict[str, Callable[[], Any]]  # ours: "cpu", "cuda", "triton", ...
    baselines: dict[str, Callable[[], Any]]  # what a user would run instead
    bytes_read: Optional[int] = None  # minimum bytes the op must read (memory-bound ops)
    notes: str = ""
    summary: Optional[Callable[[], str]] = None  # printed under the table after the case ran
    # Factor applied to a callable's measured time: a per-item loop timed on a subset of the
    # items (e.g. 8 of 256 models) is reported for all of them.
    scale: dict[str, float] = dataclasses.field(default_factory=dict)
    # > 0: time every callable once per round, the order rotated every round, for this many
    # rounds (A/B interleaving: on a shared machine slow phases then hit every callable alike).
    interleaved_rounds: int = 0


@dataclasses.dataclass
class Measurement:
    op: str
    shape: str
    dtype: str
    name: str
    kind: str  # "ours" or "baseline"
    median_ms: float
    repeats: int
    gbps: Optional[float] = None
    pct_bandwidth: Optional[float] = None  # of bandwidth_gbps
    bandwidth_gbps: Optional[float] = None  # tensor.sum() read rate measured just before the case
    speedups: dict[str, float] = dataclasses.field(default_factory=dict)  # vs each baseline
    error: Optional[str] = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(fn: Callable[[], Any], ctx: BenchContext) -> tuple[float, int]:
    """Median seconds per call and the number of timed calls."""
    fn()  # warm-up (compilation, caches, allocator)
    _sync(ctx.device)
    start = time.perf_counter()
    fn()
    _sync(ctx.device)
    first = max(time.perf_counter() - start, 1e-7)
    repeats = int(min(200, max(ctx.min_repeats, ctx.budget_s / first)))
    times = []
    if ctx.is_cuda:
        for _ in range(repeats):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times), repeats


_BANDWIDTH_BUFFERS: dict = {}


def measure_read_bandwidth(ctx: BenchContext) -> float:
    """Bytes/s of a large `tensor.sum()` on the device: the read rate the
    memory-bound kernels are compared with."""
    n = (64 if ctx.quick else 128) * 2**20 if ctx.device.type == "cpu" else 512 * 2**20
    key = (str(ctx.device), n)
    if key not in _BANDWIDTH_BUFFERS:
        _BANDWIDTH_BUFFERS[key] = torch.randn(n, dtype=torch.float32, device=ctx.device)
    x = _BANDWIDTH_BUFFERS[key]
    seconds, _ = time_callable(lambda: x.sum(), ctx)
    return n * 4 / seconds


def time_interleaved(case: Case, ctx: BenchContext) -> dict[str, Any]:
    """{name: (median seconds, rounds) or the exception it raised}, every callable
    timed once per round after one warm-up call each, the order rotated every round: what runs
    just before a call (its allocations and frees, its cache footprint) moves that call's time,
    so a fixed order favours or penalises the same callable every round (two identical
    versions timed in a fixed order measured 8.6 against 7.0 ms)."""
    fns = {**case.baselines, **case.implementations}
    times: dict[str, Any] = {}
    for name, fn in fns.items():
        try:
            fn()
            times[name] = []
        except Exception as exc:  # reported in its row; the others still run
            times[name] = exc
    live = {name: fns[name] for name in fns if isinstance(times[name], list)}
    times |= rotated_times(live, case.interleaved_rounds, lambda: _sync(ctx.device))
    return {name: (statistics.median(t), len(t)) if isinstance(t, list) else t for name, t in times.items()}


def rotated_times(fns: dict[str, Callable], rounds: int, sync: Callable = lambda: None) -> dict[str, list]:
    """{name: seconds of each round}: every callable once a round, the order rotated every round
    (see time_interleaved); no warm-up. For the A/B scripts of benchmarks/ too."""
    names, times = list(fns), {name: [] for name in fns}
    for r in range(rounds if names else 0):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def rotated_medians_ms(fns: dict[str, Callable], rounds: int, warm_up: int = 2) -> dict[str, float]:
    """{name: median milliseconds} of rotated_times, after warm_up calls of each callable."""
    for _ in range(warm_up):
        for fn in fns.values():
            fn()
    return {name: statistics.median(t) * 1e3 for name, t in rotated_times(fns, rounds).items()}


def run_case(case: Case, ctx: BenchContext) -> list[Measurement]:
    """Times every callable of `case`. For a memory-bound case the read
    bandwidth is measured again right before it: on a shared machine it drifts
    by tens of percent over a run, and "% bw" must compare like with like."""
    bandwidth = measure_read_bandwidth(ctx) if case.bytes_read else None
    interleaved = time_interleaved(case, ctx) if case.interleaved_rounds else {}
    rows: list[Measurement] = []
    for kind, fns in (("baseline", case.baselines), ("ours", case.implementations)):
        for name, fn in fns.items():
            row = Measurement(case.op, case.shape, case.dtype, name, kind, float("nan"), 0)
            try:
                if isinstance(interleaved.get(name), Exception):
                    raise interleaved[name]
                seconds, row.repeats = interleaved[name] if interleaved else time_callable(fn, ctx)
            except Exception as exc:  # one failing implementation must not end the run
                row.error = f"{type(exc).__name__}: {exc}"
                rows.append(row)
                continue
            row.median_ms = seconds * case.scale.get(name, 1.0) * 1e3
            if case.bytes_read:
                row.gbps = case.bytes_read / seconds / 1e9
                row.pct_bandwidth = 100.0 * case.bytes_read / seconds / bandwidth
                row.bandwidth_gbps = bandwidth / 1e9
            rows.append(row)
    base = {r.name: r.median_ms for r in rows if r.kind == "baseline" and r.error is None}
    for r in rows:
        if r.error is None:
            r.speedups = {b: ms / r.median_ms for b, ms in base.items() if b != r.name}
    return rows
