"""`pykernels flatness`: flatness measures and landscape plots for a saved classifier
on a saved batch of inputs.

  pykernels flatness --model model.pt --data test.pt --out flatness-out

--model: a TorchScript file (torch.jit.save), or a state dict together with
--arch package.module:Factory (called with --arch-kwargs JSON to build the
model), or, with --trust-pickle only, a whole pickled nn.Module.
--data: .pt/.pth holding a tensor, an (x, y) pair or a dict (keys --x-key,
--y-key; default x/inputs/images and y/labels/targets), .npy, .npz, or
.safetensors. Labels are optional (the adversarial direction then uses the
model's predictions).

Prints one row per measure (mean, std, median, min, max over the examples) and
writes measures.csv (one row per example), summary.json and landscape_*.png.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os

import torch

MEASURES = ("log_likelihood", "grad_norm", "trace", "exact_trace", "top_eigenvalue", "neighborhood_drop")
_X_KEYS = ("x", "inputs", "images", "data")
_Y_KEYS = ("y", "labels", "targets", "target")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "flatness",
        help="flatness measures and likelihood-landscape plots of a saved classifier",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="TorchScript file, or state dict with --arch")
    p.add_argument("--arch", help="package.module:Factory building the model for a state dict")
    p.add_argument("--arch-kwargs", default="{}", help="JSON keyword arguments for --arch (default {})")
    p.add_argument("--trust-pickle", action="store_true", help="allow loading a pickled nn.Module (runs code!)")
    p.add_argument("--data", required=True, help="inputs (and labels): .pt/.pth, .npy, .npz or .safetensors")
    p.add_argument("--x-key", help="key of the inputs in a dict-like data file")
    p.add_argument("--y-key", help="key of the labels in a dict-like data file")
    p.add_argument("--examples", type=int, default=64, help="use the first N examples (default 64)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per call (default 32)")
    p.add_argument(
        "--measures",
        default=",".join(MEASURES),
        help=f"comma-separated subset of {','.join(MEASURES)} (default all; exact_trace is "
        f"skipped with a note for models that are not piecewise linear)",
    )
    p.add_argument("--num-probes", type=int, default=64, help="Hutchinson probes for the trace (default 64)")
    p.add_argument("--sigma", type=float, default=0.1, help="Gaussian noise std of neighborhood_drop (default 0.1)")
    p.add_argument("--samples", type=int, default=64, help="noise draws of neighborhood_drop (default 64)")
    p.add_argument(
        "--directions",
        default="random,adversarial",
        help="landscape directions, comma-separated from random,adversarial,pgd,gradient ('' for none)",
    )
    p.add_argument("--radius", type=float, default=1.0, help="landscape radius, in L2 units (default 1.0)")
    p.add_argument("--steps", type=int, default=41, help="landscape grid points per axis (default 41)")
    p.add_argument(
        "--plot-examples", type=int, default=1, help="examples to plot per direction (default 1; 0: no landscapes)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="compute dtype")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="probe and noise seed (default 0); the batch starting at example i uses seed + i, so no two "
        "batches share their random draws",
    )
    p.add_argument("--out", default="flatness-out", help="output folder (default flatness-out)")
    p.set_defaults(func=run)


def load_model(path: str, arch=None, arch_kwargs: str = "{}", trust_pickle: bool = False):
    if not os.path.exists(path):
        raise SystemExit(f"--model: no such file {path!r}")
    try:
        return torch.jit.load(path, map_location="cpu")
    except Exception:
        pass  # not TorchScript
    if arch:
        module_name, _, attr = arch.partition(":")
        if not attr:
            raise SystemExit(f"--arch must look like package.module:Factory, got {arch!r}")
        factory = getattr(importlib.import_module(module_name), attr)
        model = factory(**json.loads(arch_kwargs))
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        return model
    if trust_pickle:
        return torch.load(path, map_location="cpu", weights_only=False)
    raise SystemExit(
        f"--model {path!r} is not TorchScript; for a state dict pass --arch package.module:Factory "
        f"(or --trust-pickle for a pickled nn.Module you trust)"
    )


def _pick(mapping, key, candidates, what):
    if key is not None:
        if key not in mapping:
            raise SystemExit(f"--data has no key {key!r} (keys: {sorted(mapping)})")
        return mapping[key]
    for k in candidates:
        if k in mapping:
            return mapping[k]
    if what == "labels":
        return None
    raise SystemExit(f"--data: cannot tell which entry holds the inputs (keys: {sorted(mapping)}); pass --x-key")


def load_data(path: str, x_key=None, y_key=None):
    """(x, y or None) from a data file."""
    if not os.path.exists(path):
        raise SystemExit(f"--data: no such file {path!r}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        import numpy as np

        obj = torch.from_numpy(np.load(path))
    elif ext == ".npz":
        import numpy as np

        obj = {k: torch.from_numpy(v) for k, v in np.load(path).items()}
        if x_key is None and "arr_0" in obj:
            x_key = "arr_0"
    elif ext == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(path)
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, torch.Tensor):
        return obj, None
    if isinstance(obj, (tuple, list)) and len(obj) == 2:
        return obj[0], obj[1]
    if isinstance(obj, dict):
        return _pick(obj, x_key, _X_KEYS, "inputs"), _pick(obj, y_key, _Y_KEYS, "labels")
    raise SystemExit(f"--data: expected a tensor, an (x, y) pair or a dict, got {type(obj).__name__}")


def _summary_rows(values: dict[str, torch.Tensor]):
    rows = []
    for name, v in values.items():
        v = v.double()
        rows.append(
            (
                name,
                v.mean().item(),
                v.std().item() if v.numel() > 1 else float("nan"),
                v.median().item(),
                v.min().item(),
                v.max().item(),
            )
        )
    return rows


def _format(rows) -> str:
    header = ("measure", "mean", "std", "median", "min", "max")
    lines = [header] + [(r[0],) + tuple(f"{x:.4g}" for x in r[1:]) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))) for line in lines
    ]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def _check_options(args) -> None:
    """Every option checked before anything is loaded or measured (SystemExit naming the option)."""
    from .landscape import NAMED_DIRECTIONS

    unknown = [d for d in args.directions.split(",") if d and d not in NAMED_DIRECTIONS]
    if unknown:
        raise SystemExit(f"--directions: unknown {unknown}; choose from {NAMED_DIRECTIONS} ('' for none)")
    minimums = {"examples": 1, "batch_size": 1, "num_probes": 1, "samples": 1, "steps": 2, "plot_examples": 0}
    for name, minimum in minimums.items():
        if getattr(args, name) < minimum:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= {minimum}, got {getattr(args, name)}")
    for name in ("sigma", "radius"):
        if not getattr(args, name) > 0:
            raise SystemExit(f"--{name} must be > 0, got {getattr(args, name)}")


def run(args) -> int:
    from .._progress import progress_bar
    from . import (
        exact_trace,
        grad_norm,
        hessian_trace,
        landscape,
        log_likelihood,
        neighborhood_drop,
        plot_landscape,
        top_eigenvalues,
    )
    from ._piecewise import curved_ops

    measures = [m for m in args.measures.split(",") if m]
    unknown = [m for m in measures if m not in MEASURES]
    if unknown:
        raise SystemExit(f"--measures: unknown {unknown}; choose from {MEASURES}")
    _check_options(args)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    model = load_model(args.model, args.arch, args.arch_kwargs, args.trust_pickle)
    if isinstance(model, torch.nn.Module):
        model = model.to(device=device, dtype=dtype).eval()
    x, y = load_data(args.data, args.x_key, args.y_key)
    x = x[: args.examples].to(device=device, dtype=dtype)
    y = y[: args.examples].to(device=device).long() if y is not None else None
    print(f"model: {args.model}; data: {tuple(x.shape)} from {args.data}" + ("" if y is not None else " (no labels)"))
    with torch.no_grad():
        curved = curved_ops(model, x[:1])
    print(
        "piecewise linear in x: "
        + ("yes (exact_trace is exact)" if not curved else f"no (curved ops: {', '.join(sorted(curved))})")
    )
    if curved and "exact_trace" in measures:
        measures.remove("exact_trace")
        print("note: exact_trace skipped (it is exact only for piecewise-linear networks)")

    per_example: dict[str, list[torch.Tensor]] = {m: [] for m in measures}
    if "trace" in measures:
        per_example["trace_stderr"] = []
    bar = progress_bar(x.shape[0], "measured", enabled=True, unit="example")
    for b0 in range(0, x.shape[0], args.batch_size):
        xb = x[b0 : b0 + args.batch_size]
        seed = args.seed + b0  # the same seed would give example b0 + i the probes / noise of example i
        for m in measures:
            if m == "log_likelihood":
                per_example[m].append(log_likelihood(model, xb))
            elif m == "grad_norm":
                per_example[m].append(grad_norm(model, xb))
            elif m == "trace":
                est = hessian_trace(model, xb, args.num_probes, seed=seed)
                per_example[m].append(est.value)
                per_example["trace_stderr"].append(est.stderr)
            elif m == "exact_trace":
                per_example[m].append(exact_trace(model, xb))
            elif m == "top_eigenvalue":
                per_example[m].append(top_eigenvalues(model, xb, 1, seed=seed)[:, 0])
            elif m == "neighborhood_drop":
                per_example[m].append(
                    neighborhood_drop(model, xb, sigma=args.sigma, samples=args.samples, seed=seed).value
                )
        bar.update(xb.shape[0])
    bar.close()
    values = {m: torch.cat(v).cpu() for m, v in per_example.items() if v}
    rows = _summary_rows(values)
    print(_format(rows))

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "measures.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["example"] + list(values))
        for i in range(x.shape[0]):
            writer.writerow([i] + [f"{values[m][i].item():.8g}" for m in values])
    summary = {
        "model": args.model,
        "data": args.data,
        "examples": x.shape[0],
        "piecewise_linear": not curved,
        "settings": {k: getattr(args, k) for k in ("num_probes", "sigma", "samples", "radius", "steps", "seed")},
        "measures": {r[0]: dict(zip(("mean", "std", "median", "min", "max"), r[1:])) for r in rows},
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(
        f"per-example values: {os.path.join(args.out, 'measures.csv')}; summary: "
        f"{os.path.join(args.out, 'summary.json')}"
    )
    shown = x[: args.plot_examples]
    for direction in [d for d in args.directions.split(",") if d] if args.plot_examples else []:
        L = landscape(
            model,
            shown,
            direction,
            radius=args.radius,
            steps=args.steps,
            seed=args.seed,
            y=y[: args.plot_examples] if y is not None else None,
        )
        for i in range(shown.shape[0]):
            path = plot_landscape(L, os.path.join(args.out, f"landscape_{direction}_{i}.png"), example=i)
            print(f"plot: {path}")
    return 0
