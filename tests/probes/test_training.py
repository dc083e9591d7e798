"""softmax_weighted_bce (reference vs hand-worked values and the spec's formula;
every fused backend vs autograd of the reference, gradcheck in float64), the
cumulative-max and annealed references, and LinearProbe."""

import math

import pytest
import torch

from pykernels.backend import op_callable
from pykernels.probes import LinearProbe, annealed_bce, cumulative_max_bce, probe_scores, softmax_weighted_bce
from pykernels.probes.training import threshold_for_flag_rate
from pykernels.reference import probe_guard as ref
from tests.helpers import backend_device, backend_params

ALL = ["reference"] + backend_params()


def _device(backend):
    return "cpu" if backend == "reference" else backend_device(backend)


def softplus(x):
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


# ---------------------------------------------------------------- the formula


def test_hand_worked_loss():
    # z = (1, 3, -1), window 2, y = 1: predictions at tokens 2 and 3 (1-based),
    # zbar = (2, 1); w = softmax(2, 1); BCE(1, sigmoid(x)) = softplus(-x).
    z = torch.tensor([[1.0, 3.0, -1.0]], dtype=torch.float64)
    w2 = math.e / (math.e + 1)
    expect = w2 * softplus(-2.0) + (1 - w2) * softplus(-1.0)
    got = ref.softmax_weighted_bce(z, torch.tensor([1.0], dtype=torch.float64), torch.tensor([3]), 2)
    assert got.item() == pytest.approx(expect, rel=1e-12)
    # Shorter than the window: one prediction, the mean of every token; label 0.
    short = ref.softmax_weighted_bce(z, torch.tensor([0.0], dtype=torch.float64), torch.tensor([3]), 16)
    assert short.item() == pytest.approx(softplus(1.0), rel=1e-12)
    # tau -> inf weights uniformly: the plain mean of the per-prediction BCEs.
    flat = ref.softmax_weighted_bce(z, torch.tensor([1.0], dtype=torch.float64), torch.tensor([3]), 2, tau=1e12)
    assert flat.item() == pytest.approx((softplus(-2.0) + softplus(-1.0)) / 2, rel=1e-9)


def _spec_loss(z, y, n, M, tau):
    """Literal transcription of the loss in docs/probes.md ("The maths"), one sequence, python floats."""
    zbar = {t: sum(z[t - k] for k in range(M)) / M for t in range(M - 1, n)} if n >= M else {n - 1: sum(z[:n]) / n}
    top = max(v / tau for v in zbar.values())
    weights = {t: math.exp(v / tau - top) for t, v in zbar.items()}
    total = sum(weights.values())
    bce = lambda x: -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))
    return sum(weights[t] / total * bce(v) for t, v in zbar.items())


def test_reference_matches_spec_transcription():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 30, generator=g, dtype=torch.float64)
    y = torch.rand(6, generator=g, dtype=torch.float64)
    lengths = torch.tensor([30, 17, 16, 15, 3, 1])
    for tau in (1.0, 0.3):
        got = ref.softmax_weighted_bce(z, y, lengths, 16, tau, reduction="none")
        for b in range(6):
            expect = _spec_loss(z[b].tolist(), y[b].item(), int(lengths[b]), 16, tau)
            assert got[b].item() == pytest.approx(expect, rel=1e-10), b


# ---------------------------------------------------------------- fused backends


def _inputs(device, dtype, seed, B=7, T=41, window=16):
    g = torch.Generator().manual_seed(seed)
    z = (2 * torch.randn(B, T, generator=g, dtype=torch.float64)).to(device, dtype)
    y = torch.rand(B, generator=g, dtype=torch.float64).to(device, dtype)
    y[0], y[1] = 0.0, 1.0
    lengths = torch.tensor([T, 1, max(1, window - 1), window, window + 1, T - 3, 5][:B]).to(device)
    return z, y, lengths


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("compute_grad", [True, False])
def test_fused_op_matches_its_reference(backend, compute_grad):
    """The op itself (losses and, when asked, their gradient) against the reference with its schema."""
    device = backend_device(backend)
    z, y, lengths = _inputs(device, torch.float64, seed=3, window=5)
    loss, grad = op_callable("softmax_weighted_bce_fwd", backend)(z, y, lengths, 5, 0.7, False, compute_grad)
    ref_loss, ref_grad = ref.softmax_weighted_bce_fwd(z.cpu(), y.cpu(), lengths.cpu(), 5, 0.7, False, compute_grad)
    torch.testing.assert_close(loss.cpu(), ref_loss)
    torch.testing.assert_close(grad.cpu(), ref_grad)
    assert ref_grad.shape == ((7, 41) if compute_grad else (0,))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(
    "tau,detach", [(1.0, False), (1.0, True), (0.3, False), (4.0, True)]
)  # 0.3: not exact in float32
@pytest.mark.parametrize("window", [16, 1, 5])
def test_fused_matches_autograd_of_reference(backend, dtype, tau, detach, window):
    device = backend_device(backend)
    z, y, lengths = _inputs(device, dtype, seed=window, window=window)
    zr = z.detach().double().cpu().requires_grad_()
    expect = ref.softmax_weighted_bce(zr, y.double().cpu(), lengths.cpu(), window, tau, detach, "none")
    upstream = torch.linspace(0.5, 2.0, z.shape[0], dtype=torch.float64)
    (expect_grad,) = torch.autograd.grad(expect, zr, upstream)
    zk = z.detach().requires_grad_()
    got = softmax_weighted_bce(zk, y, lengths, window, tau, detach, reduction="none", backend=backend)
    (grad,) = torch.autograd.grad(got, zk, upstream.to(device, dtype))
    assert got.dtype == dtype and grad.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.double().cpu(), expect.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double().cpu(), expect_grad, rtol=tol, atol=tol)
    # Tokens past each length get exactly zero gradient.
    pad = torch.arange(z.shape[1], device=device)[None, :] >= lengths[:, None]
    assert (grad[pad] == 0).all()


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_gradcheck_float64(backend, tau):
    # Finite differences see the true derivative, so only with the weights not
    # detached (detached weights are checked against autograd above).
    device = backend_device(backend)
    z, y, lengths = _inputs(device, torch.float64, seed=11, B=4, T=20, window=6)
    z.requires_grad_()
    fn = lambda z: softmax_weighted_bce(z, y, lengths, 6, tau, reduction="none", backend=backend)
    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-8)


def test_mean_reduction_and_default_backend():
    z, y, lengths = _inputs("cpu", torch.float32, seed=2)
    per = softmax_weighted_bce(z, y, lengths, reduction="none")
    torch.testing.assert_close(softmax_weighted_bce(z, y, lengths), per.mean())


@pytest.mark.parametrize("backend", ALL)
def test_nan_in_padding_is_ignored_and_nan_in_a_sequence_is_not(backend):
    device = _device(backend)
    z, y, lengths = _inputs(device, torch.float32, seed=3)
    clean = softmax_weighted_bce(z, y, lengths, reduction="none", backend=backend)
    poisoned = z.clone()
    poisoned[5, lengths[5] :] = float("nan")  # padding
    torch.testing.assert_close(softmax_weighted_bce(poisoned, y, lengths, reduction="none", backend=backend), clean)
    poisoned[0, 20] = float("nan")
    out = softmax_weighted_bce(poisoned, y, lengths, reduction="none", backend=backend)
    assert torch.isnan(out[0]) and torch.isfinite(out[1:]).all()


@pytest.mark.parametrize("backend", backend_params())
def test_gradient_under_torch_compile(backend):
    # opcheck of the fused op: tests/test_ops.py
    device = backend_device(backend)
    z, y, lengths = _inputs(device, torch.float32, seed=4, B=3, T=10, window=4)

    def step(z):
        return softmax_weighted_bce(z, y, lengths, 4, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    za, zb = z.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()
    step(za).backward()
    compiled(zb).backward()
    torch.testing.assert_close(za.grad, zb.grad)


def test_double_backward_is_refused():
    z, y, lengths = _inputs("cpu", torch.float64, seed=5)
    z.requires_grad_()
    loss = softmax_weighted_bce(z, y, lengths, backend="cpu")
    with pytest.raises(NotImplementedError, match="first-order gradients only"):
        torch.autograd.grad(loss, z, create_graph=True)


# ---------------------------------------------------------------- the alternatives


def test_cumulative_max_and_annealed_by_hand():
    # window 1: zbar = z. probabilities p = sigmoid(z) = (0.5, 0.88, 0.27); running max (0.5, 0.88, 0.88).
    z = torch.tensor([[0.0, 2.0, -1.0]], dtype=torch.float64)
    y, n = torch.tensor([0.0], dtype=torch.float64), torch.tensor([3])
    p = torch.sigmoid(z[0])
    run = torch.tensor([p[0], p[1], p[1]])
    bce0 = lambda q: -torch.log(1 - q)
    assert cumulative_max_bce(z, y, n, window=1).item() == pytest.approx(bce0(run).mean().item())
    assert annealed_bce(z, y, n, mix=0.0, window=1).item() == pytest.approx(bce0(p).mean().item())
    assert annealed_bce(z, y, n, mix=1.0, window=1).item() == pytest.approx(bce0(run).mean().item())
    half = annealed_bce(z, y, n, mix=0.5, window=1).item()
    assert half == pytest.approx(bce0(0.5 * p + 0.5 * run).mean().item())


def test_alternatives_are_differentiable_and_respect_lengths():
    z, y, lengths = _inputs("cpu", torch.float64, seed=6)
    for fn in (lambda z: cumulative_max_bce(z, y, lengths), lambda z: annealed_bce(z, y, lengths, 0.3)):
        zz = z.clone().requires_grad_()
        fn(zz).backward()
        pad = torch.arange(z.shape[1])[None, :] >= lengths[:, None]
        assert torch.isfinite(zz.grad).all() and (zz.grad[pad] == 0).all()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (
            dict(labels=torch.tensor([0.5, 1.5])),
            ValueError,
            r"labels must lie in \[0, 1\] .* got values in \[0.5, 1.5\]",
        ),
        (dict(labels=torch.tensor([float("nan"), 0.0])), ValueError, r"labels must lie in \[0, 1\]"),
        (dict(lengths=torch.tensor([5, 6])), ValueError, r"lengths must lie in \[1, T=5\] .* got values in \[5, 6\]"),
        (dict(lengths=torch.tensor([0, 5])), ValueError, r"lengths must lie in \[1, T=5\]"),
        (dict(lengths=torch.tensor([5])), ValueError, "lengths has 1 at dim 0 but the batch size B is 2"),
        (dict(labels=torch.tensor([0.0, 1.0, 1.0])), ValueError, "labels has 3 at dim 0 but the batch size B is 2"),
        (dict(token_logits=torch.randn(2, 5, 1)), ValueError, r"token_logits must have 2 dims \[B, T\]"),
        (dict(labels=torch.tensor([0.0, 1.0], requires_grad=True)), ValueError, "labels must not require grad"),
        (dict(tau=0.0), ValueError, "tau must be a positive finite float, got 0.0"),
        (dict(window=0), ValueError, "window must be >= 1"),
        (dict(reduction="sum"), ValueError, r"reduction must be one of \('mean', 'none'\)"),
        (dict(lengths=torch.tensor([5.0, 5.0])), TypeError, "lengths must have dtype in"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_input(kwargs, exc, pattern, backend):
    args = dict(
        token_logits=torch.randn(2, 5), labels=torch.tensor([0.0, 1.0]), lengths=torch.tensor([5, 3]), backend=backend
    )
    args.update(kwargs)
    with pytest.raises(exc, match=pattern):
        softmax_weighted_bce(**args)


# ---------------------------------------------------------------- LinearProbe


def _separable_batches(L=2, H=12, n_batches=6, B=8, T=24, seed=0):
    """Harmful sequences carry a signal along one direction in a span of tokens."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(H, generator=g)
    batches = []
    for _ in range(n_batches):
        hs = torch.randn(L, B, T, H, generator=g)
        labels = (torch.arange(B) % 2).float()
        lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
        for b in range(B):
            if labels[b]:
                start = int(torch.randint(0, int(lengths[b]) - 6, (1,), generator=g))
                hs[:, b, start : start + 6] += 1.5 * direction
        batches.append((hs, labels, lengths))
    return batches


def test_linear_probe_learns_and_calibrates(tmp_path):
    train, test = _separable_batches(seed=0), _separable_batches(seed=1, n_batches=4)
    probe = LinearProbe(2, 12, smoothing="ema", window=4)
    history = probe.fit(lambda: iter(train), epochs=12, lr=3e-2, window=4, progress=False)
    assert history[-1] < 0.5 * history[0]
    scores = torch.cat([probe.exchange_scores(h, n)[:, 0] for h, _, n in test])
    labels = torch.cat([y for _, y, _ in test])
    assert scores[labels == 1].min() > scores[labels == 0].median()
    benign = [(h[:, y == 0], n[y == 0]) for h, y, n in train]
    thr = probe.calibrate(benign, target_flag_rate=0.25)
    benign_scores = torch.cat([probe.exchange_scores(h, n)[:, 0] for h, n in benign])
    rate = (benign_scores > thr).float().mean().item()
    assert 0.25 - 2 / len(benign_scores) <= rate <= 0.25  # the target, to within a tie (+inf would not pass)
    # Training logits are the fused kernel's "none" scores.
    h, _, _ = test[0]
    torch.testing.assert_close(
        probe.token_logits(h).detach(), probe_scores(h, probe.weight.detach(), probe.bias.detach(), smoothing="none")
    )
    path = str(tmp_path / "probe.safetensors")
    probe.save(path)
    loaded = LinearProbe.load(path)
    assert (loaded.smoothing, loaded.window, loaded.ema_alpha) == ("ema", 4, None)
    assert torch.equal(loaded.threshold, probe.threshold) and torch.equal(loaded.weight_t, probe.weight_t)
    torch.testing.assert_close(loaded(h), probe(h), rtol=0, atol=0)


@pytest.mark.parametrize("loss", ["cumulative_max", "annealed"])
def test_linear_probe_fits_with_the_alternative_losses(loss):
    train = _separable_batches(seed=2, n_batches=3)
    probe = LinearProbe(2, 12, 2, window=4)
    history = probe.fit(train, epochs=1, lr=1e-2, loss=loss, progress=False)
    assert len(history) == 1 and math.isfinite(history[0])


def test_linear_probe_file_errors(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "x.safetensors")
    save_file({"w": torch.zeros(1)}, path, metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="is not a saved LinearProbe"):
        LinearProbe.load(path)
    probe = LinearProbe(1, 4)
    probe.save(path)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, path, metadata={**meta, "version": "99"})
    with pytest.raises(ValueError, match="has LinearProbe format version 99; this pykernels reads version 1"):
        LinearProbe.load(path)


def test_linear_probe_layer_weight_is_read_in_place():
    probe = LinearProbe(3, 16, 2)
    w = probe.layer_weight(1)
    assert w.shape == (16, 2) and w.t().is_contiguous() and w.data_ptr() == probe.weight_t[1].data_ptr()


def test_threshold_for_flag_rate():
    s = torch.arange(100.0)
    assert threshold_for_flag_rate(s, 0.05) == 94.0  # 95..99 are above: 5%
    assert (s > threshold_for_flag_rate(s, 0.0)).sum() == 0
    assert threshold_for_flag_rate(s, 1.0) == -math.inf
    with pytest.raises(ValueError, match=r"target flag rate must lie in \[0, 1\], got 1.5"):
        threshold_for_flag_rate(s, 1.5)
    with pytest.raises(ValueError, match="1 calibration scores are NaN"):
        threshold_for_flag_rate(torch.tensor([1.0, float("nan")]), 0.1)


def test_fit_with_an_exhausted_generator_says_so():
    probe = LinearProbe(2, 12)
    batches = iter(_separable_batches(n_batches=1))
    probe.fit(batches, epochs=1, progress=False)
    with pytest.raises(ValueError, match="fit got no batches"):
        probe.fit(batches, epochs=1, progress=False)


def test_cli_describes_a_saved_probe(tmp_path, capsys):
    from pykernels.cli import main

    path = str(tmp_path / "p.safetensors")
    LinearProbe(3, 8, 2, smoothing="ema", window=8, threshold=[0.5, 1.25]).save(path)
    assert main(["probe-info", path]) == 0
    out = capsys.readouterr().out
    assert "LinearProbe over 3 layers x 8 hidden, 2 head(s)" in out
    assert "smoothing ema, window 8, ema_alpha 0.2222" in out and "thresholds 0.5, 1.25" in out


def test_probe_stream_carries_the_probe_config():
    probe = LinearProbe(2, 8, 3, smoothing="swim", window=5, threshold=[0.1, 0.2, 0.3])
    stream = probe.stream(4)
    assert (stream.num_heads, stream.smoothing, stream.window) == (3, "swim", 5)
    assert stream.threshold.tolist() == pytest.approx([0.1, 0.2, 0.3])
    ema = LinearProbe(2, 8, smoothing="ema", window=7).stream(2)
    assert ema.ema_alpha == pytest.approx(2 / 8)


def test_linear_probe_threshold_count_error():
    with pytest.raises(ValueError, match=r"threshold must be a float or 3 floats \(one per head\), got 2"):
        LinearProbe(2, 8, 3, threshold=[0.1, 0.2])


def test_reference_loss_ignores_non_finite_padding_in_the_gradient():
    # Padding is never read: a NaN / Inf logit there leaves every gradient finite and equal
    # to the clean one (the reference is the executable spec, so it must hold there too).
    z, y, lengths = _inputs("cpu", torch.float64, seed=4)
    clean = z.clone().requires_grad_()
    (g_clean,) = torch.autograd.grad(ref.softmax_weighted_bce(clean, y, lengths, reduction="none").sum(), clean)
    poisoned = z.clone()
    poisoned[5, lengths[5] :] = float("nan")
    poisoned[6, lengths[6] :] = float("inf")
    poisoned.requires_grad_()
    (g,) = torch.autograd.grad(ref.softmax_weighted_bce(poisoned, y, lengths, reduction="none").sum(), poisoned)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g, g_clean, rtol=0, atol=0)


def test_reference_loss_is_exact_in_float64_past_softplus_threshold():
    # softplus(x) = x + log1p(exp(-x)): F.softplus returns x alone past x = 20, dropping ~1e-9.
    z = torch.full((1, 4), 21.0, dtype=torch.float64)
    y = torch.zeros(1, dtype=torch.float64)
    loss = ref.softmax_weighted_bce(z, y, torch.tensor([4]), window=2, reduction="none")
    exact = 21.0 + math.log1p(math.exp(-21.0))  # every prediction has zbar = 21, label 0
    assert abs(loss.item() - exact) <= 4e-16 * exact, (loss.item(), exact)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("T", [65_536, 2**20 + 3])  # past 2^20: Triton's largest block
def test_loss_of_long_sequences_matches_the_reference(backend, T):
    # The Triton kernel loops over T in blocks (one block of next_pow2(T) fails past 2^20,
    # and on a GPU long before); the window is short so that this stays fast.
    device = backend_device(backend)
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2, T, generator=g, dtype=torch.float64)
    y = torch.tensor([0.0, 1.0], dtype=torch.float64)
    lengths = torch.tensor([T, T // 3 + 1])
    zr = z.clone().requires_grad_()
    expect = ref.softmax_weighted_bce(zr, y, lengths, 3, 0.5, False, "none")
    (expect_grad,) = torch.autograd.grad(expect.sum(), zr)
    zk = z.to(device).requires_grad_()
    got = softmax_weighted_bce(zk, y.to(device), lengths.to(device), 3, 0.5, reduction="none", backend=backend)
    (grad,) = torch.autograd.grad(got.sum(), zk)
    torch.testing.assert_close(got.cpu(), expect.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad.cpu(), expect_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", ALL)
def test_a_loss_window_past_the_sequence_costs_what_the_sequence_costs(backend):
    device = _device(backend)
    z, y, lengths = _inputs(device, torch.float64, seed=6)
    T = z.shape[1]
    huge = softmax_weighted_bce(z, y, lengths, window=2**40, reduction="none", backend=backend)
    torch.testing.assert_close(huge, softmax_weighted_bce(z, y, lengths, window=T, reduction="none", backend=backend))
