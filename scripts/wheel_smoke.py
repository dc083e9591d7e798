"""Smoke test of an installed pykernels wheel (./dev.sh wheel-check runs it).

Run it with the python of a fresh venv the wheel was installed into, from a
folder outside the source tree:

    cd /tmp && /path/to/venv/bin/python /path/to/scripts/wheel_smoke.py /path/to/source [REPORT]

It checks that pykernels is imported from that venv (not the checkout), that the
compiled CPU kernels loaded with the torch the wheel pins, the metadata (version,
licence, torch pin), the command line (`pykernels --version`, `pykernels backends`)
and one call per op family on the cpu backend against the reference. REPORT, the
`pip install --dry-run --report` of the wheel with [all] into that venv, must
install no GPU package and leave torch as it is.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys

import torch

import pykernels
from pykernels import _ops

# Packages that need (or pull) an NVIDIA GPU stack: no CPU extra may install them.
GPU_PACKAGES = re.compile(r"^(torch|triton|vllm|nvidia-.*|cuda-.*|cupy.*|flash-attn|xformers|bitsandbytes|deepspeed)$")


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SystemExit(f"wheel smoke test FAILED: {message}")


def check_installed_copy(source_root: str) -> None:
    package_dir = os.path.dirname(os.path.realpath(pykernels.__file__))
    check(
        package_dir.startswith(os.path.realpath(sys.prefix)),
        f"pykernels imported from {package_dir}, not from this venv ({sys.prefix})",
    )
    check(
        package_dir != os.path.realpath(os.path.join(source_root, "pykernels")),
        f"pykernels imported from the source tree ({package_dir})",
    )
    check(_ops.LOADED, f"the compiled extension did not load: {_ops.LOAD_ERROR}")
    check(
        _ops.BUILT_FOR_TORCH == torch.__version__,
        f"built for torch {_ops.BUILT_FOR_TORCH}, running {torch.__version__}",
    )
    print(f"imported {package_dir}, _C built for torch {_ops.BUILT_FOR_TORCH}")


def check_metadata() -> None:
    dist = importlib.metadata.distribution("pykernels")
    check(
        re.fullmatch(r"\d+\.\d+\.\d+", pykernels.__version__) is not None,
        f"__version__ {pykernels.__version__!r} is not MAJOR.MINOR.PATCH",
    )
    check(dist.version == pykernels.__version__, f"metadata version {dist.version} != {pykernels.__version__}")
    check(
        dist.metadata["License-Expression"] == "Apache-2.0",
        f"License-Expression is {dist.metadata['License-Expression']!r}",
    )
    check(any(f.name == "LICENSE" for f in dist.files), "LICENSE is not in the wheel")
    pin = f"torch=={torch.__version__.split('+')[0]}"
    requires = [r.replace(" ", "") for r in dist.requires or []]
    check(pin in requires, f"the wheel does not pin {pin}: {requires}")
    print(f"metadata: pykernels {dist.version}, Apache-2.0, requires {pin}")


def check_cli() -> None:
    exe = os.path.join(sys.prefix, "bin", "pykernels")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    check(
        version.startswith(f"pykernels {pykernels.__version__} (built for torch {torch.__version__}"),
        f"pykernels --version printed {version!r}",
    )
    lines = subprocess.run([exe, "backends"], capture_output=True, text=True, check=True).stdout.splitlines()
    cpu = [line for line in lines if line.split()[:1] == ["cpu"]]
    check(len(cpu) == 1 and cpu[0].split()[1] == "yes", f"`pykernels backends` does not show cpu available: {lines}")
    print(version.strip())
    print(cpu[0])


def check_ops() -> None:
    """One call per op family, cpu backend against the reference."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    def same(name, fn, **tolerance):
        ours, ref = fn("cpu"), fn("reference")
        torch.testing.assert_close(ours, ref, msg=lambda m: f"{name}: cpu vs reference: {m}", **tolerance)
        print(f"{name}: cpu matches the reference")

    # Activation probes: scoring, and the guard's per-layer accumulation.
    layers = [randn(2, 37, 64) for _ in range(3)]
    weight = randn(3, 64, 2) / 8
    same(
        "probe_scores",
        lambda b: pykernels.probe_scores(layers, weight, smoothing="swim", window=4, backend=b),
        rtol=1e-4,
        atol=1e-4,
    )
    hidden = randn(5, 64)
    same(
        "probe_accumulate_",
        lambda b: pykernels.probe_accumulate_(torch.zeros(5, 2), hidden, weight[0], backend=b),
        rtol=1e-4,
        atol=1e-4,
    )
    # Flatness: the energy and the logit-space Hessian-vector product.
    logits = randn(8, 10)
    same("energy", lambda b: pykernels.energy(logits, backend=b), rtol=1e-5, atol=1e-5)
    tangents = randn(3, 8, 10)
    same("logsumexp_hvp", lambda b: pykernels.logsumexp_hvp(logits, tangents, backend=b), rtol=1e-5, atol=1e-5)
    # Model selection: correlation distances and PARC's fused Spearman.
    features = randn(40, 16)
    classes = torch.randint(0, 4, (40,), generator=gen)
    same(
        "pairwise_corr_distance", lambda b: pykernels.pairwise_corr_distance(features, backend=b), rtol=1e-4, atol=1e-5
    )
    same("parc_spearman", lambda b: pykernels.parc_spearman(features, classes, backend=b), rtol=1e-6, atol=1e-8)


def check_resolution(report_path: str) -> None:
    """What pip would add for pykernels[all] next to the CPU torch: no GPU package, and
    torch stays (the wheel's pin keeps e.g. torchvision at the release built for it)."""
    with open(report_path) as f:
        names = sorted(item["metadata"]["name"].lower().replace("_", "-") for item in json.load(f)["install"])
    # torchvision (curvlinops -> BackPACK) passes by name: which build it is depends on the
    # index it comes from (PyPI's is a CUDA build; README's install section says so).
    gpu = [n for n in names if GPU_PACKAGES.match(n)]
    check(not gpu, f"pykernels[all] would install GPU packages (or replace torch): {gpu}")
    print(f"pykernels[all] adds {len(names)} packages, no GPU package: {', '.join(names)}")


def main(source_root: str, report_path: str | None) -> None:
    check(os.path.realpath(os.getcwd()) != os.path.realpath(source_root), "run this from outside the source tree")
    check_installed_copy(source_root)
    check_metadata()
    check_cli()
    check_ops()
    if report_path:
        check_resolution(report_path)
    print("wheel smoke test passed")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit("usage: wheel_smoke.py SOURCE_ROOT [PIP_REPORT_FOR_ALL]")
    main(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else None)
