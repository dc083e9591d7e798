"""End-to-end model selection on a small, honest model bank built offline (CPU, a few minutes).

1. Source models: several architectures (two MLPs, two small CNNs) trained from scratch on
   different source tasks cut from scikit-learn's 8x8 digits (digit subsets, parity, digits
   mod 3, rotated digits), on one half of the images.
2. Target tasks on the other half: inverted-contrast digits, mirrored digits, and the number of
   closed loops in a digit. Each source model is fine-tuned on each target (new head, all
   layers trained) and its test accuracy is the oracle a selection method should predict.
3. Every estimator scores every (model, target) pair from a probe set of the target's training
   images (features = input of the last linear layer, as in the PARC paper), without
   fine-tuning; evaluate() reports the paper's metric (100 x Pearson per target, averaged) and
   Kendall's tau against the oracle, with the time each estimator took.

How this differs from the paper's benchmark (so read the numbers as a demonstration, not a
replication): 8x8 grey digits instead of ImageNet-scale images; {n_models} small models trained
from scratch in seconds instead of 32 ImageNet-pretrained ResNet/GoogLeNet/AlexNet transfers
(+39 crowd-sourced ones); sources and targets share one domain; probe sets of {n_probe} samples
instead of 500; oracles from short fine-tunes, so they carry noise of a few points; one probe
seed instead of five. The paper's capacity term (depth / 50) is left out: these models are 2 to
4 layers deep.

    python examples/model_selection_digits.py           # full bank (~2-4 minutes on 2 cores)
    python examples/model_selection_digits.py --quick   # 4 models, 1 target (~10 s)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from pykernels.selection import METHODS, evaluate, extract_features, score_models

# ---------------------------------------------------------------- data


def load_digits_halves(seed: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # [1797, 1, 8, 8]
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    half = len(y) // 2
    return (x[order[:half]], y[order[:half]]), (x[order[half:]], y[order[half:]])


LOOPS = torch.tensor([1, 0, 0, 0, 1, 0, 1, 0, 2, 1])  # closed loops in each digit's usual glyph

SOURCES = {  # name -> (input transform, label map or None for "keep only these digits")
    "digits 0-4": (lambda x: x, lambda y: torch.where(y < 5, y, -1)),
    "digits 5-9": (lambda x: x, lambda y: torch.where(y >= 5, y - 5, -1)),
    "parity": (lambda x: x, lambda y: y % 2),
    "digits mod 3": (lambda x: x, lambda y: y % 3),
    "rotated digits": (lambda x: torch.rot90(x, 1, (2, 3)), lambda y: y),
}
TARGETS = {
    "inverted digits": (lambda x: 1 - x, lambda y: y),
    "mirrored digits": (lambda x: torch.flip(x, (3,)), lambda y: y),
    "closed loops": (lambda x: x, lambda y: LOOPS[y]),
}


def task(data, transform, relabel):
    x, y = data
    labels = relabel(y)
    keep = labels >= 0
    return transform(x[keep]), labels[keep]


# ---------------------------------------------------------------- models


class MLP(nn.Module):
    def __init__(self, widths, classes):
        super().__init__()
        layers, d = [nn.Flatten()], 64
        for w in widths:
            layers += [nn.Linear(d, w), nn.ReLU()]
            d = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, classes)
        self.depth = len(widths) + 1

    def forward(self, x):
        return self.head(self.body(x))


class CNN(nn.Module):
    def __init__(self, channels, classes):
        super().__init__()
        c1, c2 = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * 16, 48),
            nn.ReLU(),
        )
        self.head = nn.Linear(48, classes)
        self.depth = 4

    def forward(self, x):
        return self.head(self.body(x))


ARCHITECTURES = {
    "mlp-small": lambda c: MLP([32], c),
    "mlp-deep": lambda c: MLP([128, 64], c),
    "cnn-small": lambda c: CNN((8, 16), c),
    "cnn-wide": lambda c: CNN((16, 32), c),
}


def train(model, x, y, epochs, seed, lr=3e-3, params=None):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(params if params is not None else model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    return 100.0 * (model(x).argmax(1) == y).double().mean().item()


def fine_tune(source_model, arch, classes, train_xy, test_xy, epochs, seed):
    """A copy of the source model with a new head, every layer trained on the target."""
    model = ARCHITECTURES[arch](classes)
    state = {k: v for k, v in source_model.state_dict().items() if not k.startswith("head.")}
    model.load_state_dict(state, strict=False)
    train(model, *train_xy, epochs=epochs, seed=seed, lr=1e-3)
    return accuracy(model, *test_xy)


# ---------------------------------------------------------------- the experiment


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 models, 1 target, short training (~10 s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe", type=int, default=300, help="probe samples per target (default 300)")
    parser.add_argument("--csv", help="write every (target, model) score and oracle to this CSV")
    args = parser.parse_args(argv)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    archs = ["mlp-small", "cnn-small"] if args.quick else list(ARCHITECTURES)
    sources = list(SOURCES)[:2] if args.quick else list(SOURCES)
    targets = list(TARGETS)[:1] if args.quick else list(TARGETS)
    source_epochs, tune_epochs = (5, 3) if args.quick else (30, 12)
    print(__doc__.split("\n\n")[2].format(n_models=len(archs) * len(sources), n_probe=args.probe))
    source_half, target_half = load_digits_halves(args.seed)

    t0 = time.perf_counter()
    bank = {}
    for s_name in sources:
        x, y = task(source_half, *SOURCES[s_name])
        for arch in archs:
            model = train(ARCHITECTURES[arch](int(y.max()) + 1), x, y, source_epochs, args.seed)
            bank[f"{arch} / {s_name}"] = (arch, model, accuracy(model, x, y))
    print(
        f"\ntrained {len(bank)} source models in {time.perf_counter() - t0:.1f} s "
        f"(train accuracy {min(a for *_, a in bank.values()):.0f}-{max(a for *_, a in bank.values()):.0f}%)"
    )

    names, oracle, target_of, rows = list(bank), [], [], {m: [] for m in METHODS}
    seconds = {m: 0.0 for m in METHODS}
    for t_name in targets:
        x, y = task(target_half, *TARGETS[t_name])
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed + 1))
        n_train = len(y) // 2
        train_xy = (x[order[:n_train]], y[order[:n_train]])
        test_xy = (x[order[n_train:]], y[order[n_train:]])
        probe_x, probe_y = train_xy[0][: args.probe], train_xy[1][: args.probe]
        classes = int(y.max()) + 1
        t1 = time.perf_counter()
        accs = [
            fine_tune(model, arch, classes, train_xy, test_xy, tune_epochs, args.seed)
            for arch, model, _ in bank.values()
        ]
        tune_s = time.perf_counter() - t1
        probes = {}
        for name, (_, model, _) in bank.items():
            p = extract_features(model, probe_x, progress=False)
            probes[name] = {"features": p.features, "probs": p.probs}
        table = score_models(probes, probe_y.numpy(), methods="all", num_classes=classes, progress=False)
        for m in table.methods:
            rows[m] += list(table[m])
            seconds[m] += table.seconds[m]
        oracle += accs
        target_of += [t_name] * len(bank)
        best = int(np.argmax(accs))
        picked = table.order("parc")[0]
        print(f"\n== target: {t_name} ({classes} classes, {n_train} fine-tuning images, probe N={len(probe_y)}) ==")
        print(f"fine-tuned {len(bank)} models in {tune_s:.1f} s; oracle accuracy {min(accs):.1f}-{max(accs):.1f}%")
        print(f"best model: {names[best]} ({accs[best]:.1f}%); PARC picks: {names[picked]} ({accs[picked]:.1f}%)")
        top = table.order("parc")[:5]
        print("PARC top 5:  " + ", ".join(f"{names[i]} ({table['parc'][i]:.1f} -> {accs[i]:.1f}%)" for i in top))

    result = evaluate({m: np.array(v) for m, v in rows.items()}, np.array(oracle), targets=target_of)
    print(
        f"\n== how well each estimator predicts the fine-tuned accuracy ({len(targets)} targets x "
        f"{len(bank)} models) =="
    )
    print(result)
    print(
        "\nseconds per target to score the whole bank: "
        + ", ".join(f"{m} {seconds[m] / len(targets) * 1e3:.0f} ms" for m in sorted(seconds, key=seconds.get))
    )
    if args.csv:
        import csv

        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["target", "model", "oracle"] + list(rows))
            for i, (t, acc) in enumerate(zip(target_of, oracle)):
                writer.writerow([t, names[i % len(names)], acc] + [rows[m][i] for m in rows])
        print(f"csv: {args.csv}")
    return result


if __name__ == "__main__":
    main()
