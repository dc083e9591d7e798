"""`pykernels flatness` on saved models and data files."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from pykernels import flatness
from pykernels.cli import main
from tests.flatness.models import inputs, small_cnn


def tiny_factory():
    return small_cnn(nn.ReLU, dtype=torch.float32)


@pytest.fixture()
def files(tmp_path):
    model = small_cnn(nn.ReLU, dtype=torch.float32)
    x = inputs(B=6, dtype=torch.float32)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    torch.jit.save(torch.jit.script(model), tmp_path / "model.pt")
    torch.save(model.state_dict(), tmp_path / "state.pt")
    torch.save({"images": x, "labels": y}, tmp_path / "data.pt")
    np.save(tmp_path / "x.npy", x.numpy())
    return tmp_path


def test_torchscript_model_on_a_dict_of_tensors(files, capsys):
    out = files / "out"
    assert (
        main(
            [
                "flatness",
                "--model",
                str(files / "model.pt"),
                "--data",
                str(files / "data.pt"),
                "--batch-size",
                "4",
                "--num-probes",
                "8",
                "--samples",
                "8",
                "--steps",
                "5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "piecewise linear in x: yes" in text
    for measure in ("log_likelihood", "grad_norm", "trace", "exact_trace", "top_eigenvalue", "neighborhood_drop"):
        assert measure in text
    rows = (out / "measures.csv").read_text().strip().splitlines()
    assert len(rows) == 7 and rows[0].startswith("example,log_likelihood")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["examples"] == 6 and summary["piecewise_linear"]
    assert (out / "landscape_random_0.png").exists() and (out / "landscape_adversarial_0.png").exists()


def test_each_batch_draws_its_own_probes_and_noise(files, capsys):
    """Four copies of one example in batches of 2: with one seed for every batch, examples 0 and 2
    got the same probes and noise, hence the same estimates."""
    same = inputs(B=1, dtype=torch.float32).expand(4, -1, -1, -1).clone()
    torch.save({"images": same}, files / "same.pt")
    out = files / "out_same"
    main(
        [
            "flatness",
            "--model",
            str(files / "model.pt"),
            "--data",
            str(files / "same.pt"),
            "--batch-size",
            "2",
            "--measures",
            "trace,neighborhood_drop",
            "--num-probes",
            "4",
            "--samples",
            "4",
            "--seed",
            "7",
            "--directions",
            "",
            "--out",
            str(out),
        ]
    )
    capsys.readouterr()
    rows = np.loadtxt(out / "measures.csv", delimiter=",", skiprows=1)  # example, trace, drop, trace_stderr
    for column in (1, 2):
        assert len(set(rows[:, column].tolist())) == 4, rows[:, column]
    model = torch.jit.load(files / "model.pt")
    second_batch = flatness.hessian_trace(model, same[2:], 4, seed=7 + 2).value
    np.testing.assert_allclose(rows[2:, 1], second_batch.numpy(), rtol=1e-6)


def test_state_dict_with_arch_on_npy(files, capsys):
    out = files / "out2"
    main(
        [
            "flatness",
            "--model",
            str(files / "state.pt"),
            "--arch",
            "tests.flatness.test_cli:tiny_factory",
            "--data",
            str(files / "x.npy"),
            "--measures",
            "trace,exact_trace",
            "--num-probes",
            "8",
            "--directions",
            "",
            "--out",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert "(no labels)" in text and "exact_trace" in text and "grad_norm" not in text
    assert not list(out.glob("*.png"))


def test_curved_model_skips_exact_trace(files, capsys):
    torch.jit.save(torch.jit.script(small_cnn(nn.GELU, dtype=torch.float32)), files / "gelu.pt")
    main(
        [
            "flatness",
            "--model",
            str(files / "gelu.pt"),
            "--data",
            str(files / "data.pt"),
            "--measures",
            "trace,exact_trace",
            "--num-probes",
            "4",
            "--directions",
            "",
            "--out",
            str(files / "out3"),
        ]
    )
    text = capsys.readouterr().out
    assert "piecewise linear in x: no (curved ops: gelu)" in text and "exact_trace skipped" in text


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--model", "missing.pt"], "no such file"),
        (["--model", "STATE"], "is not TorchScript; for a state dict pass --arch"),
        (["--model", "MODEL", "--measures", "trace,curvature"], r"unknown \['curvature'\]"),
        (["--model", "MODEL", "--x-key", "pixels"], "has no key 'pixels'"),
        (["--model", "STATE", "--arch", "nocolon"], "--arch must look like package.module:Factory"),
        # checked before the model is loaded or anything is measured
        (["--model", "missing.pt", "--directions", "random,sideways"], r"--directions: unknown \['sideways'\]"),
        (["--model", "missing.pt", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--model", "missing.pt", "--steps", "1"], "--steps must be >= 2, got 1"),
        (["--model", "missing.pt", "--radius", "0"], "--radius must be > 0"),
    ],
)
def test_bad_arguments(files, extra, pattern):
    args = ["flatness", "--data", str(files / "data.pt")] + [
        a.replace("STATE", str(files / "state.pt")).replace("MODEL", str(files / "model.pt")) for a in extra
    ]
    with pytest.raises(SystemExit, match=pattern):
        main(args)
