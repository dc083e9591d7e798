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


class SmoothResNet(nn.Module):
    """Conv -> BatchNorm (eval) -> SiLU, one residual block of the same, pooled, linear head."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem, self.bn0 = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.act = nn.SiLU()
        self.head = nn.Linear(4 * 9, 5)
        with torch.no_grad():
            for bn in (self.bn0, self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.3, 0.3)
                bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        h = self.act(self.bn0(self.stem(x)))
        h = self.act(h + self.bn2(self.conv2(self.act(self.bn1(self.conv1(h))))))
        return self.head(nn.functional.avg_pool2d(h, 2).flatten(1))


class AttentionBlock(nn.Module):
    """A pre-norm transformer block on the 6 rows of a 6 x 6 input as tokens (nn.MultiheadAttention,
    which runs scaled_dot_product_attention), mean-pooled, linear head."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(6, 8)
        self.ln1, self.ln2 = nn.LayerNorm(8), nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.embed(x.reshape(x.shape[0], 6, 6))
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.ln2(h))
        return self.head(h.mean(1))


class LSTMClassifier(nn.Module):
    """An LSTM over the 6 rows of a 6 x 6 input, its last hidden state to 5 logits: the LSTM cell
    decomposes into in-place ops (sigmoid_, add_) below functionalization."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.lstm = nn.LSTM(6, 8, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.lstm(x.reshape(x.shape[0], 6, 6))[0][:, -1])


def smooth_mlp(act=nn.GELU, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), act(), nn.Linear(16, 16), act(), nn.Linear(16, 5))


def scaled(model: nn.Module, factor: float = 2.0, dtype=torch.float64) -> nn.Module:
    """In float64 and eval mode, weights scaled so that log p is curved and not saturated."""
    model = model.to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" not in name:
                p.mul_(factor)
    return model


# Every network family the Hessian paths are checked on: name -> float64 model (inputs() shape).
SMOOTH_FAMILIES = {
    "mlp-gelu": lambda: scaled(smooth_mlp(nn.GELU)),
    "mlp-tanh": lambda: scaled(smooth_mlp(nn.Tanh)),
    "mlp-softplus": lambda: scaled(smooth_mlp(nn.Softplus)),
    "mlp-silu": lambda: scaled(smooth_mlp(nn.SiLU)),
    "cnn-gelu": lambda: small_cnn(nn.GELU),
    "resnet-silu-batchnorm": lambda: scaled(SmoothResNet()),
    "attention": lambda: scaled(AttentionBlock(), 1.5),
}


class _TanhBackward(torch.autograd.Function):
    """grad * (1 - tanh(x)^2) as a function of (grad, x), whose own backward (run by double
    backward's second pass) can be made non-batchable."""

    generate_vmap_rule = True
    backward_item = False  # calls .item() in its backward: fails under vmap, works vector by vector

    @staticmethod
    def forward(grad, x):
        return grad * (1 - torch.tanh(x) ** 2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, out_grad):
        grad, x = ctx.saved_tensors
        if _TanhBackward.backward_item:
            out_grad.sum().item()
        t = torch.tanh(x)
        return out_grad * (1 - t**2), out_grad * grad * (-2 * t * (1 - t**2))

    @staticmethod
    def jvp(ctx, d_grad, d_x):
        grad, x = ctx.saved_tensors
        t = torch.tanh(x)
        return d_grad * (1 - t**2) + grad * (-2 * t * (1 - t**2)) * d_x


class _Tanh(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        return _TanhBackward.apply(grad, ctx.saved_tensors[0])

    @staticmethod
    def jvp(ctx, d_x):
        return _TanhBackward.apply(d_x, ctx.saved_tensors[0])


class TanhNet(nn.Module):
    """A tanh MLP whose tanh second derivatives go through _TanhBackward."""

    def __init__(self):
        super().__init__()
        self.inner = scaled(smooth_mlp(nn.Identity))

    def forward(self, x):
        h = self.inner[1](self.inner[0](x))
        return self.inner[5](_Tanh.apply(self.inner[3](_Tanh.apply(h))))
