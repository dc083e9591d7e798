"""pykernels.probe_scores: the reference against hand-worked cases and the
paper's concatenated-probe formula, then every fast backend against the
float64 reference."""

import math

import pytest
import torch

import pykernels
from pykernels.probes.scoring import default_ema_alpha
from pykernels.reference.probe_scores import probe_scores as reference_probe_scores
from tests.helpers import backend_device, backend_params, compile_and_check_ops

SMOOTHINGS = ("none", "swim", "ema")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def make_layers(L, B, T, H, dtype=torch.float32, device="cpu", seed=0, layout="contiguous"):
    """L layers [B, T, H] with integer-free random values, laid out as asked:
    contiguous, slices of one [B, T, L, H + 5] buffer, or batch-major transposed views."""
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        return [torch.randn(B, T, H, generator=g).to(device, dtype) for _ in range(L)]
    if layout == "slices":
        buf = torch.randn(B, T, L, H + 5, generator=g).to(device, dtype)
        return [buf[:, :, l, 2 : 2 + H] for l in range(L)]
    if layout == "transposed":  # stride_b < stride_t
        return [torch.randn(T, B, H, generator=g).to(device, dtype).transpose(0, 1) for _ in range(L)]
    if layout == "hidden_strided":  # hidden dim not unit-stride: the kernels copy such a layer
        return [torch.randn(B, T, 2 * H, generator=g).to(device, dtype)[:, :, ::2] for _ in range(L)]
    raise ValueError(layout)


def make_probe(L, H, K, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, H, K, generator=g).to(device) / math.sqrt(L * H), torch.randn(K, generator=g).to(device)


def ref64(layers, weight, bias, lengths=None, smoothing="swim", window=16, alpha=None):
    alpha = default_ema_alpha(window) if alpha is None else alpha
    return reference_probe_scores(
        [h.cpu() for h in layers],
        weight.cpu(),
        None if bias is None else bias.cpu(),
        None if lengths is None else lengths.cpu(),
        smoothing,
        window,
        alpha,
        dtype=torch.float64,
    )


# ---------------------------------------------------------------- reference


def test_reference_hand_worked_example():
    # Two layers, H = 2, one head; logits worked out by hand.
    h1 = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [0.0, 1.0]]])  # [B=1, T=3, H=2]
    h2 = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]])
    w = torch.tensor([[[1.0], [1.0]], [[2.0], [-1.0]]])  # W_1 = (1, 1), W_2 = (2, -1)
    b = torch.tensor([0.5])
    # z_t = h1.W1 + h2.W2 + b = (3 + 2 + .5, 7 - 1 + .5, 1 + 2 + .5)
    z = torch.tensor([5.5, 6.5, 3.5])
    out = lambda **kw: pykernels.probe_scores([h1, h2], w, b, backend="reference", **kw)[0, :, 0]
    torch.testing.assert_close(out(smoothing="none"), z)
    # SWiM, window 2: (5.5, (5.5 + 6.5) / 2, (6.5 + 3.5) / 2)
    torch.testing.assert_close(out(smoothing="swim", window=2), torch.tensor([5.5, 6.0, 5.0]))
    # EMA, a = 0.5: (5.5, 6.0, 4.75)
    torch.testing.assert_close(out(smoothing="ema", ema_alpha=0.5), torch.tensor([5.5, 6.0, 4.75]))
    # Default EMA decay: 2 / (16 + 1)
    a = 2 / 17
    torch.testing.assert_close(
        out(smoothing="ema"),
        torch.tensor([5.5, a * 6.5 + (1 - a) * 5.5, a * 3.5 + (1 - a) * (a * 6.5 + (1 - a) * 5.5)]),
    )


def test_reference_equals_concatenated_probe():
    # The paper's probe: one linear map over psi_t = [h_t^(1); ...; h_t^(L)].
    L, B, T, H, K = 4, 2, 7, 5, 3
    layers = make_layers(L, B, T, H)
    w, b = make_probe(L, H, K)
    psi = torch.cat(layers, dim=-1).double()  # [B, T, L*H]
    z = psi @ w.double().reshape(L * H, K) + b.double()
    torch.testing.assert_close(ref64(layers, w, b, smoothing="none"), z)


def test_reference_swim_matches_window_definition():
    z = torch.randn(2, 40, 3, dtype=torch.float64)
    M = 16
    expect = torch.stack([z[:, max(0, t - M + 1) : t + 1].mean(1) for t in range(40)], dim=1)
    from pykernels.reference.probe_scores import swim

    torch.testing.assert_close(swim(z, M), expect)


# ---------------------------------------------------------------- backends vs reference


def _tolerance(weight, ref):
    # Float32 accumulation of L*H terms vs float64: error ~ sqrt(L*H) * eps * magnitude.
    # (Inputs in fp16/bf16 widen exactly, so every dtype gets the same bound.)
    L, H = weight.shape[0], weight.shape[1]
    return 1e-6 * math.sqrt(L * H) * (1.0 + float(ref.abs().max()))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_backend_matches_reference(backend, dtype, smoothing):
    device = backend_device(backend)
    for seed, (L, B, T, H, K, layout, window) in enumerate(
        [
            (3, 2, 37, 70, 1, "contiguous", 16),
            (5, 3, 21, 129, 4, "slices", 5),
            (2, 4, 9, 64, 6, "transposed", 16),
            (1, 1, 50, 8, 2, "hidden_strided", 3),
            (2, 2, 17, 33, 9, "contiguous", 1),
        ]
    ):
        layers = make_layers(L, B, T, H, dtype, device, seed=seed, layout=layout)
        w, b = make_probe(L, H, K, device, seed=seed + 100)
        lengths = torch.tensor([T - (i * 5) % T for i in range(B)], device=device)
        out = pykernels.probe_scores(layers, w, b, smoothing=smoothing, window=window, lengths=lengths, backend=backend)
        ref = ref64(layers, w, b, lengths, smoothing, window)
        assert out.dtype == torch.float32 and out.shape == (B, T, K) and out.device.type == device
        torch.testing.assert_close(
            out.double().cpu(),
            ref,
            rtol=0,
            atol=_tolerance(w, ref),
            msg=lambda m: f"L{L} B{B} T{T} H{H} K{K} {layout}: {m}",
        )


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("smoothing", ["swim", "ema"])
def test_long_sequences_match_reference(backend, smoothing):
    # Several scan chunks per sequence on the GPU kernels; uneven lengths.
    device = backend_device(backend)
    layers = make_layers(2, 2, 2600, 8, device=device, seed=5)
    w, b = make_probe(2, 8, 2, device)
    lengths = torch.tensor([2600, 1500], device=device)
    out = pykernels.probe_scores(layers, w, b, smoothing=smoothing, lengths=lengths, backend=backend)
    ref = ref64(layers, w, b, lengths, smoothing)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=0, atol=_tolerance(w, ref))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_many_layers_and_heads(backend, smoothing):
    # Past 64 layers the CUDA kernel launches per layer chunk and accumulates; past
    # 16 heads the Triton kernel splits heads into groups.
    device = backend_device(backend)
    L, B, T, H, K = 70, 2, 9, 16, 20
    layers = make_layers(L, B, T, H, device=device, seed=12)
    w, b = make_probe(L, H, K, device, seed=13)
    lengths = torch.tensor([9, 4], device=device)
    out = pykernels.probe_scores(layers, w, b, smoothing=smoothing, window=3, lengths=lengths, backend=backend)
    ref = ref64(layers, w, b, lengths, smoothing, 3)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=0, atol=_tolerance(w, ref))


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_cpu_kernel_every_instruction_set(isa, monkeypatch):
    if not pykernels.backends()["cpu"].available:
        pytest.skip("cpu backend unavailable")
    monkeypatch.setenv("PYKERNELS_CPU_ISA", isa)
    from pykernels import _ops

    if _ops.cpu_isa() != isa:
        pytest.skip(f"{isa} not supported by this CPU")
    for dtype in DTYPES:
        layers = make_layers(3, 2, 23, 100, dtype, seed=3, layout="slices")
        w, b = make_probe(3, 100, 5, seed=4)
        out = pykernels.probe_scores(layers, w, b, backend="cpu", window=4)
        ref = ref64(layers, w, b, window=4)
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=_tolerance(w, ref))


@pytest.mark.parametrize("backend", backend_params())
def test_stacked_tensor_input_equals_list(backend):
    device = backend_device(backend)
    layers = make_layers(3, 2, 11, 40, device=device)
    w, b = make_probe(3, 40, 2, device)
    stacked = torch.stack(layers)
    a = pykernels.probe_scores(layers, w, b, backend=backend)
    c = pykernels.probe_scores(stacked, w, b, backend=backend)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference"] + backend_params())
def test_padding_is_zero_and_never_read(backend):
    device = backend_device(backend) if backend != "reference" else "cpu"
    L, B, T, H, K = 2, 3, 12, 24, 2
    layers = make_layers(L, B, T, H, device=device)
    w, b = make_probe(L, H, K, device)
    lengths = torch.tensor([12, 5, 0], device=device)
    clean = pykernels.probe_scores(layers, w, b, lengths=lengths, smoothing="ema", backend=backend)
    poisoned = [h.clone() for h in layers]
    for h in poisoned:
        h[1, 5:] = float("nan")
        h[2] = float("inf")
    out = pykernels.probe_scores(poisoned, w, b, lengths=lengths, smoothing="ema", backend=backend)
    torch.testing.assert_close(out, clean, rtol=0, atol=0)
    assert (out[1, 5:] == 0).all() and (out[2] == 0).all()
    full = pykernels.probe_scores([h[:1] for h in layers], w, b, smoothing="ema", backend=backend)
    torch.testing.assert_close(out[:1], full, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference"] + backend_params())
@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_padding_is_never_read_by_the_backward(backend, smoothing):
    # NaN / Inf activations in padding give the same (finite) gradients as clean padding.
    device = backend_device(backend) if backend != "reference" else "cpu"
    L, B, T, H, K = 2, 3, 12, 24, 2
    layers = make_layers(L, B, T, H, device=device)
    w, b = make_probe(L, H, K, device)
    lengths = torch.tensor([12, 5, 0], device=device)
    poisoned = [h.clone() for h in layers]
    for h in poisoned:
        h[1, 5:] = float("nan")
        h[2] = float("inf")
    grads = []
    for acts in (layers, poisoned):
        acts = [h.clone().requires_grad_() for h in acts]
        wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
        out = pykernels.probe_scores(acts, wg, bg, lengths=lengths, smoothing=smoothing, window=4, backend=backend)
        grads.append(torch.autograd.grad((out * out).sum(), [wg, bg, *acts]))
    for clean, got in zip(*grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, clean, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference"] + backend_params())
def test_a_window_past_the_sequence_costs_what_the_sequence_costs(backend):
    # Work is bounded by T, not by the window: 2^40 returns at once, with the scores of window T.
    device = backend_device(backend) if backend != "reference" else "cpu"
    layers = make_layers(2, 2, 9, 8, device=device)
    w, b = make_probe(2, 8, 2, device)
    lengths = torch.tensor([9, 4], device=device)
    huge = pykernels.probe_scores(layers, w, b, lengths=lengths, window=2**40, backend=backend)
    torch.testing.assert_close(huge, pykernels.probe_scores(layers, w, b, lengths=lengths, window=9, backend=backend))


def _expected_nonfinite(T, t_bad, smoothing, window):
    t = torch.arange(T)
    if smoothing == "none":
        return t == t_bad
    if smoothing == "swim":
        return (t >= t_bad) & (t < t_bad + window)
    return t >= t_bad


@pytest.mark.parametrize("backend", ["reference"] + backend_params())
@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_nan_reaches_exactly_the_affected_scores(backend, smoothing):
    device = backend_device(backend) if backend != "reference" else "cpu"
    # T spans several scan chunks of the GPU kernels (128 tokens in CUDA, 1024 in Triton).
    L, B, T, H, K, window = 3, 3, 2100, 16, 2, 4
    layers = make_layers(L, B, T, H, device=device)
    w, b = make_probe(L, H, K, device)
    t_bad = 1030
    layers[1][1, t_bad, 3] = float("nan")
    out = pykernels.probe_scores(
        layers, w, b, smoothing=smoothing, window=window, ema_alpha=0.5 if smoothing == "ema" else None, backend=backend
    ).cpu()
    expect = torch.zeros(B, T, K, dtype=torch.bool)
    expect[1] = _expected_nonfinite(T, t_bad, smoothing, window)[:, None]
    assert torch.equal(~torch.isfinite(out), expect)


@pytest.mark.parametrize("backend", ["reference"] + backend_params())
def test_ema_alpha_one_forgets_nan(backend):
    device = backend_device(backend) if backend != "reference" else "cpu"
    layers = make_layers(2, 1, 10, 8, device=device)
    w, b = make_probe(2, 8, 1, device)
    layers[0][0, 3, 0] = float("nan")
    out = pykernels.probe_scores(layers, w, b, smoothing="ema", ema_alpha=1.0, backend=backend).cpu()
    assert torch.equal(torch.isnan(out[0, :, 0]), torch.arange(10) == 3)


@pytest.mark.parametrize("backend", ["reference"] + backend_params())
@pytest.mark.parametrize("shape", [(0, 5, 8, 2), (2, 0, 8, 2), (2, 5, 8, 0)], ids=["B0", "T0", "K0"])
def test_empty_inputs_give_empty_result(backend, shape):
    device = backend_device(backend) if backend != "reference" else "cpu"
    B, T, H, K = shape
    layers = [torch.randn(B, T, H, device=device) for _ in range(2)]
    out = pykernels.probe_scores(layers, torch.randn(2, H, K, device=device), backend=backend)
    assert out.shape == (B, T, K) and out.dtype == torch.float32


# ---------------------------------------------------------------- torch integration


@pytest.mark.parametrize("backend", backend_params())
def test_torch_compile_fullgraph_calls_the_kernel(backend, monkeypatch):
    device = backend_device(backend)
    monkeypatch.setenv("PYKERNELS_BACKEND", backend)
    layers = make_layers(2, 2, 8, 16, device=device)
    w, b = make_probe(2, 16, 2, device)

    def guard(hs, w, b):
        return pykernels.probe_scores(hs, w, b, smoothing="ema").sigmoid().amax(dim=1)

    compile_and_check_ops(guard, (layers, w, b), backend, ("probe_scores",))


def test_cpu_kernel_allocates_no_stacked_copy():
    if not pykernels.backends()["cpu"].available:
        pytest.skip("cpu backend unavailable")
    L, B, T, H, K = 8, 2, 256, 512, 4
    layers = make_layers(L, B, T, H)
    w, b = make_probe(L, H, K)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        pykernels.probe_scores(layers, w, b, backend="cpu")
    allocated = sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)
    activation_bytes = L * B * T * H * 4
    # Output + transposed weights only: far below one layer's worth of activations.
    assert 0 < allocated < activation_bytes / L, f"allocated {allocated} bytes for {activation_bytes} of activations"


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("smoothing", SMOOTHINGS)
def test_gradients_match_reference_autograd(backend, smoothing):
    # Gradients for probe training (weight, bias) and for the activations,
    # against float64 autograd through the reference.
    device = backend_device(backend)
    L, B, T, H, K = 3, 2, 19, 24, 2
    layers = [h.requires_grad_() for h in make_layers(L, B, T, H, device=device, seed=7)]
    w, b = make_probe(L, H, K, device, seed=8)
    w.requires_grad_()
    b.requires_grad_()
    lengths = torch.tensor([19, 11], device=device)
    upstream = torch.randn(B, T, K, generator=torch.Generator().manual_seed(9)).to(device)
    out = pykernels.probe_scores(layers, w, b, smoothing=smoothing, window=5, lengths=lengths, backend=backend)
    got = torch.autograd.grad(out, [*layers, w, b], upstream)

    ref_in = [t.detach().double().cpu().requires_grad_() for t in (*layers, w, b)]
    ref = reference_probe_scores(
        ref_in[:L], ref_in[L], ref_in[L + 1], lengths.cpu(), smoothing, 5, default_ema_alpha(5), dtype=torch.float64
    )
    expect = torch.autograd.grad(ref, ref_in, upstream.double().cpu())
    for name, g, e in zip([f"layer {l}" for l in range(L)] + ["weight", "bias"], got, expect):
        torch.testing.assert_close(g.double().cpu(), e, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
