"""hessian_trace with "auto" against double backward on models forward-adjoint used to fall back
on (to double backward, with a warning), in one process, order alternating every round:
a float32 nn.LSTM classifier (oneDNN's mkldnn_rnn_layer had no forward mode) and a scripted
GELU CNN (TorchScript refused functional_call). The CHANGELOG figures of those fixes.

    taskset -c 0 python benchmarks/forward_adjoint_coverage.py [--rounds 7]
"""

import argparse
import warnings

import torch
from torch import nn

from pykernels import flatness
from pykernels.bench import flatness as bench
from pykernels.bench._core import rotated_medians_ms


class LSTMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lstm, self.head = nn.LSTM(8, 64, batch_first=True), nn.Linear(64, 10)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def cases():
    """(name, model, x, probes)"""
    yield "float32 LSTM (hidden 64, 16 steps), B=64 S=32", LSTMClassifier().eval(), torch.randn(64, 16, 8), 32
    model, x = bench.family("gelu-cnn", 64, "cpu")
    yield "scripted GELU CNN, B=32 S=64", torch.jit.script(model), x[:32], 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, model, x, S in cases():
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # auto must not fall back
            flatness.hessian_trace(model, x, S, hvp="forward-adjoint")
        runs = {
            "auto": lambda: flatness.hessian_trace(model, x, S),  # noqa: B023  (called within this iteration)
            "double-backward": lambda: flatness.hessian_trace(model, x, S, hvp="double-backward"),  # noqa: B023
        }
        medians = rotated_medians_ms(runs, args.rounds, warm_up=3)
        print(
            f"{name}: auto {medians['auto']:.1f} ms, double backward {medians['double-backward']:.1f} ms, "
            f"{medians['double-backward'] / medians['auto']:.2f}x (medians of {args.rounds} rounds)"
        )


if __name__ == "__main__":
    main()
