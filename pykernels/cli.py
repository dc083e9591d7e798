"""The `pykernels` command line."""

from __future__ import annotations

import argparse
import sys


def _cmd_backends(args) -> int:
    import pykernels

    for status in pykernels.backends().values():
        print(status)
    return 0


def _cmd_bench(args) -> int:
    from pykernels.bench._runner import run

    ops = [o for o in (args.ops or "").split(",") if o]
    run(ops=ops or None, device=args.device, quick=args.quick, out_dir=args.out, plot=not args.no_plot)
    return 0


def _cmd_probe_info(args) -> int:
    from pykernels.probes import LinearProbe

    probe = LinearProbe.load(args.path)
    alpha = probe.resolved_ema_alpha if probe.smoothing == "ema" else None
    print(
        f"{args.path}: LinearProbe over {probe.num_layers} layers x {probe.hidden_size} hidden, "
        f"{probe.num_heads} head(s)"
    )
    print(f"smoothing {probe.smoothing}, window {probe.window}" + (f", ema_alpha {alpha:.4g}" if alpha else ""))
    print("thresholds " + ", ".join(f"{t:.4g}" for t in probe.threshold.tolist()))
    return 0


def _cmd_select(args) -> int:
    from pykernels.selection import score_models
    from pykernels.selection.bank import load_entry

    labels = load_entry(args.labels, "labels")[0]
    if labels.dim() != 1 and not (args.methods == "parc" and labels.dim() == 2):
        raise SystemExit(f"--labels must hold class ids [N], got shape {tuple(labels.shape)}")
    table = score_models(
        args.bank,
        labels.numpy() if labels.dim() == 1 else labels,
        methods=args.methods.split(",") if args.methods != "all" else "all",
        num_classes=args.num_classes,
        pca_dim=None if args.pca_dim == 0 else args.pca_dim,
        mode=args.mode,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.no_progress,
    )
    print(table)
    if args.csv:
        table.to_csv(args.csv)
        print(f"csv: {args.csv}")
    if args.json:
        table.to_json(args.json)
        print(f"json: {args.json}")
    return 0


def _version() -> str:
    import torch

    import pykernels
    from pykernels import _ops

    built = f"built for torch {_ops.BUILT_FOR_TORCH}" if _ops.BUILT_FOR_TORCH else "no compiled kernels built"
    return f"pykernels {pykernels.__version__} ({built}; torch {torch.__version__} installed)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pykernels", description=__doc__)
    # Building the parser imports pykernels (and torch) already: see add_flatness_parser.
    parser.add_argument(
        "--version",
        action="version",
        version=_version(),
        help="print the version and the torch the compiled kernels were built for, and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("backends", help="which backends can run here, and why not")
    p.set_defaults(func=_cmd_backends)

    p = sub.add_parser("bench", help="run the benchmarks and print one table per op")
    p.add_argument("--quick", action="store_true", help="smaller shapes and fewer repeats (about a minute)")
    p.add_argument("--ops", help="comma-separated ops to run (default: all)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default="bench-results", help="folder for results.json and the plots")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("probe-info", help="describe a saved LinearProbe (.safetensors)")
    p.add_argument("path")
    p.set_defaults(func=_cmd_probe_info)

    from pykernels.flatness.cli import add_parser as add_flatness_parser

    add_flatness_parser(sub)

    p = sub.add_parser("select", help="rank a bank of models for a target task (PARC and other estimators)")
    p.add_argument(
        "--bank",
        required=True,
        help="folder of per-model probe features (.npy/.npz/.pt/.pth/.safetensors; dicts may add 'probs')",
    )
    p.add_argument("--labels", required=True, help="the probe set's class ids [N] (.npy/.pt/.safetensors)")
    p.add_argument(
        "--methods",
        default="parc",
        help="comma-separated: parc, leep, nce, hscore, hscore_shrinkage, logme, one_nn_cv, gbc, "
        "transrate; or 'all' (default: parc)",
    )
    p.add_argument("--num-classes", type=int, help="number of target classes (default: labels.max() + 1)")
    p.add_argument("--pca-dim", type=int, default=32, help="PARC's PCA dims (default 32; 0 = no PCA)")
    p.add_argument("--mode", choices=("exact", "reference"), default="exact", help="PARC mode (default exact)")
    p.add_argument("--batch-size", type=int, default=16, help="models loaded and scored together (default 16)")
    p.add_argument("--device", help="cpu or cuda (default: cpu)")
    p.add_argument("--csv", help="also write the table as CSV")
    p.add_argument("--json", help="also write the table as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_select)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
