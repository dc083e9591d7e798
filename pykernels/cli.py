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
    print(f"{args.path}: LinearProbe over {probe.num_layers} layers x {probe.hidden_size} hidden, "
          f"{probe.num_heads} head(s)")
    print(f"smoothing {probe.smoothing}, window {probe.window}" + (f", ema_alpha {alpha:.4g}" if alpha else ""))
    print("thresholds " + ", ".join(f"{t:.4g}" for t in probe.threshold.tolist()))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pykernels", description=__doc__)
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

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
