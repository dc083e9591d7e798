"""Progress through tqdm (pykernels._progress): on stderr, off by `progress=False`, on a
terminal only by default, closed with a newline; stdout (tables, results) stays clean."""

import sys

import torch
from torch import nn

from pykernels import flatness
from pykernels._progress import progress_bar, progress_callback


def test_callback_drives_one_bar_to_the_end(capsys):
    report = progress_callback("probes", unit="probe")
    for done in (2, 4, 6):
        report(done, 6)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "probes" in captured.err and "6/6" in captured.err and captured.err.endswith("\n")


def test_default_shows_only_on_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    with progress_bar(3, "quiet") as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""
    with progress_bar(3, "off", enabled=False) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""
    with progress_bar(3, "on", enabled=True) as bar:
        bar.update(3)
    assert "on" in capsys.readouterr().err


def test_hessian_trace_and_landscape_report_on_stderr(capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    quiet = flatness.hessian_trace(model, x, 4, seed=1)
    assert capsys.readouterr().err == ""
    loud = flatness.hessian_trace(model, x, 4, seed=1, progress=True)
    err = capsys.readouterr().err
    assert "hessian_trace" in err and "4/4" in err and err.endswith("\n")
    torch.testing.assert_close(loud.value, quiet.value)  # reporting changes nothing
    flatness.landscape(model, x, steps=3, dims=1, progress=True)
    err = capsys.readouterr().err
    assert "landscape" in err and "2/2" in err and err.endswith("\n")
