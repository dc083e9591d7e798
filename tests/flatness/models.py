"""Small classifiers for the flatness tests: fast on a CPU in float64."""

import torch
from torch import nn


def small_cnn(act=nn.ReLU, batchnorm: bool = False, seed: int = 0, dtype=torch.float64) -> nn.Module:
    """Conv -> act -> max-pool -> linear -> act -> linear on [B, 1, 6, 6] inputs, 5 classes."""
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 3, 3, padding=1)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(3))
    layers += [act(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(27, 12), act(), nn.Linear(12, 5)]
    model = nn.Sequential(*layers).to(dtype).eval()
    with torch.no_grad():  # logits of order 1-10: a curved, non-saturated log p
        for p in model.parameters():
            p.mul_(3.0)
    return model


class ResidualBlock(nn.Module):
    """A ResNet basic block written the torchvision way, with in-place ops (ReLU(inplace=True),
    `out += identity`, ReLU6(inplace=True)), then a linear head: piecewise linear in x.
    square=True adds an in-place product of two x-dependent tensors, which is curved."""

    def __init__(self, square: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1, self.bn1 = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 1, 3, padding=1), nn.BatchNorm2d(1)
        self.relu, self.relu6 = nn.ReLU(inplace=True), nn.ReLU6(inplace=True)
        self.head = nn.Linear(36, 5)
        self.square = square
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(3.0)
        self.double().eval()

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += x
        if self.square:
            out *= out.clone()
        return self.head(self.relu6(out).flatten(1))


def inputs(B: int = 4, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 1, 6, 6, generator=g, dtype=torch.float64).to(dtype)


def dense_hessians(model, x: torch.Tensor) -> torch.Tensor:
    """[B, D, D]: the input Hessian of logsumexp(model(x_b)) for each example, by autograd."""
    shape = x.shape[1:]
    f = lambda xb: torch.logsumexp(model(xb.reshape(1, *shape)), -1).sum()
    return torch.stack([torch.autograd.functional.hessian(f, xb.flatten()) for xb in x])


class NoForwardMode(torch.autograd.Function):
    """tanh with a backward (twice differentiable) but no forward-mode rule."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(x) ** 2)


class NoForwardModeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = small_cnn(nn.Tanh)

    def forward(self, x):
        return self.inner(NoForwardMode.apply(x))
