"""`pykernels bench`: runs every suite's cases, prints one table per op, and
writes results.json plus one PNG per op."""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import os
import pkgutil
import platform
import sys
import time
from collections.abc import Sequence
from typing import Optional

import torch

import pykernels
from pykernels._progress import progress_bar
from pykernels.bench._core import BenchContext, Case, Measurement, measure_read_bandwidth, run_case


def suite_names() -> list[str]:
    import pykernels.bench as package

    return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_"))


def collect_cases(ctx: BenchContext, ops: Optional[Sequence[str]] = None) -> list[Case]:
    cases: list[Case] = []
    for name in suite_names():
        module = importlib.import_module(f"pykernels.bench.{name}")
        if ops and not set(ops) & set(module.OPS):
            continue  # building a suite's inputs can cost seconds and gigabytes
        cases += [c for c in module.cases(ctx) if not ops or c.op in ops]
    return cases


def _fmt(x: Optional[float], digits: int = 2) -> str:
    return "-" if x is None or x != x else f"{x:.{digits}f}"


def format_table(rows: list[Measurement]) -> str:
    baselines = list(dict.fromkeys(r.name for r in rows if r.kind == "baseline"))
    header = ["shape", "dtype", "implementation", "median ms"] + [f"x vs {b}" for b in baselines] + ["GB/s", "% bw"]
    lines = [header]
    for r in rows:
        if r.error:
            lines.append([r.shape, r.dtype, r.name, f"error: {r.error[:60]}"] + [""] * (len(header) - 4))
            continue
        speed = [_fmt(r.speedups.get(b)) + "x" if b in r.speedups else "" for b in baselines]
        lines.append(
            [r.shape, r.dtype, r.name + ("" if r.kind == "ours" else " (baseline)"), _fmt(r.median_ms, 3)]
            + speed
            + [_fmt(r.gbps, 1), _fmt(r.pct_bandwidth, 0)]
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def plot_op(op: str, rows: list[Measurement], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = list(dict.fromkeys(f"{r.shape}\n{r.dtype}" for r in rows))
    names = list(dict.fromkeys(r.name for r in rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) * max(1, len(names)) / 3), 4.5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs, ys = [], []
        for g, group in enumerate(groups):
            for r in rows:
                if r.name == name and f"{r.shape}\n{r.dtype}" == group and r.error is None:
                    xs.append(g + i * width)
                    ys.append(r.median_ms)
        ax.bar(xs, ys, width, label=name)
    ax.set_yscale("log")
    ax.set_ylabel("median time per call (ms, log scale; lower is better)")
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels(groups, fontsize=7)
    ax.set_title(f"pykernels bench: {op}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(ctx: BenchContext, bandwidth: float) -> dict:
    from pykernels import _ops

    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(ctx.device) if ctx.is_cuda else _cpu_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_isa": _ops.cpu_isa(),
        "read_bandwidth_GBps": bandwidth / 1e9,
        "quick": ctx.quick,
        "backends": {n: s.available for n, s in pykernels.backends().items()},
        # glibc's malloc settings move CPU figures: by default it hands freed multi-MB blocks back
        # to the OS, and re-touching them costs page faults (docs/flatness.md, "Benchmarks").
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }
    return info


def run(
    ops: Optional[Sequence[str]] = None,
    device: Optional[str] = None,
    quick: bool = False,
    out_dir: str = "bench-results",
    plot: bool = True,
    stream=sys.stdout,
) -> list[Measurement]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu":  # every core this process may run on
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    ctx = BenchContext(device=dev, quick=quick, budget_s=0.4 if quick else 1.5)
    print(f"pykernels bench on {dev} ({'quick' if quick else 'full'} run)", file=stream)
    bandwidth = measure_read_bandwidth(ctx)
    env = environment(ctx, bandwidth)
    print(
        f"device: {env['device']}, torch {env['torch']}, {env['threads']} threads, CPU ISA {env['cpu_isa']}",
        file=stream,
    )
    print(
        f"measured read bandwidth (large tensor.sum()): {bandwidth / 1e9:.1f} GB/s at the start; "
        "'% bw' uses the same measurement repeated just before each memory-bound case",
        file=stream,
    )
    cases = collect_cases(ctx, ops)
    if not cases:
        raise SystemExit(f"no benchmark cases for ops={ops} (suites: {suite_names()})")
    rows: list[Measurement] = []
    t0 = time.perf_counter()
    with progress_bar(len(cases), "bench", enabled=True, unit="case") as bar:
        for case in cases:
            bar.set_postfix_str(f"{case.op} {case.shape} {case.dtype}", refresh=True)
            rows += run_case(case, ctx)
            bar.update()
    os.makedirs(out_dir, exist_ok=True)
    for op in dict.fromkeys(r.op for r in rows):
        op_rows = [r for r in rows if r.op == op]
        print(f"\n== {op} ==\n{format_table(op_rows)}", file=stream)
        notes = {c.notes for c in cases if c.op == op and c.notes}
        for note in notes:
            print(f"note: {note}", file=stream)
        for case in cases:
            if case.op == op and case.summary is not None:
                print(case.summary(), file=stream)
        if plot and plot_op(op, op_rows, os.path.join(out_dir, f"{op}.png")):
            print(f"plot: {os.path.join(out_dir, op + '.png')}", file=stream)
    if plot:  # suites may draw their own figures (e.g. scaling curves) with a plot(rows, out_dir)
        for name in suite_names():
            draw = getattr(importlib.import_module(f"pykernels.bench.{name}"), "plot", None)
            for path in draw(rows, out_dir) if draw else []:
                print(f"plot: {path}", file=stream)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"environment": env, "results": [dataclasses.asdict(r) for r in rows]}, f, indent=1)
    print(f"\nresults: {os.path.join(out_dir, 'results.json')} ({time.perf_counter() - t0:.0f} s)", file=stream)
    return rows
