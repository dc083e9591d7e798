"""probe_accumulate_ and ProbeStream: every backend against the reference and
against probe_scores on whole sequences; slot isolation, reuse, padding,
flags, bad slot ids, threads, torch integration."""

import math
import threading

import pytest
import torch

import pykernels
from pykernels._ops import triton_name
from pykernels.probes import ProbeStream, probe_accumulate_, probe_scores
from tests.helpers import backend_device, backend_params
from tests.probes.test_scoring import make_layers, make_probe

ALL = ["reference"] + backend_params()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _device(backend):
    return "cpu" if backend == "reference" else backend_device(backend)


# ---------------------------------------------------------------- probe_accumulate_


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accumulate_matches_float64(backend, dtype):
    device = _device(backend)
    for seed, (N, H, K, layout) in enumerate(
        [(1, 70, 1, "rows"), (5, 129, 4, "last_token"), (17, 64, 6, "rows"), (3, 33, 9, "hidden_strided")]
    ):
        g = torch.Generator().manual_seed(seed)
        if layout == "last_token":  # what a decode hook passes: [B, T, H][:, -1]
            hidden = torch.randn(N, 3, H, generator=g).to(device, dtype)[:, -1]
        elif layout == "hidden_strided":
            hidden = torch.randn(N, 2 * H, generator=g).to(device, dtype)[:, ::2]
        else:
            hidden = torch.randn(N, H, generator=g).to(device, dtype)
        w = torch.randn(H, K, generator=g).to(device)
        start = torch.randn(N, K, generator=g).to(device)
        acc = start.clone()
        out = probe_accumulate_(acc, hidden, w, backend=backend)
        assert out is acc
        expect = start.double().cpu() + hidden.double().cpu() @ w.double().cpu()
        tol = 1e-5 * math.sqrt(H) * (1 + float(expect.abs().max()))
        torch.testing.assert_close(acc.double().cpu(), expect, rtol=0, atol=tol, msg=lambda m: f"N{N} H{H} K{K}: {m}")


@pytest.mark.parametrize("backend", ALL)
def test_accumulate_weight_layouts_and_noncontiguous_acc(backend):
    device = _device(backend)
    hidden = torch.randn(6, 40, device=device)
    w_t = torch.randn(3, 40, device=device)  # LinearProbe's layout: read in place
    expect = hidden.double() @ w_t.t().double()
    for weight in (w_t.t(), w_t.t().contiguous(), w_t.t().double(), w_t.t().half()):
        acc = torch.zeros(6, 3, device=device)
        probe_accumulate_(acc, hidden, weight, backend=backend)
        torch.testing.assert_close(
            acc.double(), expect.to(device), rtol=0, atol=1e-2 if weight.dtype == torch.half else 1e-4
        )
    big = torch.zeros(3, 6, device=device)
    acc = big.t()  # non-contiguous [6, 3]
    probe_accumulate_(acc, hidden, w_t.t(), backend=backend)
    torch.testing.assert_close(big.t().double(), expect, rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", backend_params())
def test_accumulate_layers_equal_probe_scores(backend):
    device = backend_device(backend)
    layers = make_layers(4, 3, 5, 48, device=device, seed=2)
    w, b = make_probe(4, 48, 2, device)
    acc = b.expand(15, 2).clone()
    for l, h in enumerate(layers):
        probe_accumulate_(acc, h.reshape(15, 48), w[l], backend=backend)
    full = probe_scores(layers, w, b, smoothing="none", backend=backend).reshape(15, 2)
    torch.testing.assert_close(acc, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params())
def test_accumulate_under_torch_compile(backend):
    # opcheck of the ops: tests/test_ops.py
    device = backend_device(backend)

    def probe_two_layers(h1, h2, w):
        acc = torch.zeros(h1.shape[0], w.shape[2], device=h1.device)
        probe_accumulate_(acc, h1, w[0], backend=backend)
        probe_accumulate_(acc, h2, w[1], backend=backend)
        return acc.sigmoid()

    h1, h2 = torch.randn(5, 16, device=device), torch.randn(5, 16, device=device)
    w2 = torch.randn(2, 16, 3, device=device)
    compiled = torch.compile(probe_two_layers, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(h1, h2, w2), probe_two_layers(h1, h2, w2))


# ---------------------------------------------------------------- ProbeStream vs probe_scores


def _stream_whole(stream, slot_ids, z):
    """Step z [n, T, K] token by token into `slot_ids`; returns scores [n, T, K], flags [n, T]."""
    scores, flags = [], []
    for t in range(z.shape[1]):
        s, f = stream.step(slot_ids, z[:, t])
        scores.append(s)
        flags.append(f)
    return torch.stack(scores, 1), torch.stack(flags, 1)


def _expected_flags(full, threshold):
    crossed = ~(full <= threshold).all(-1)  # any head above (or NaN)
    return crossed.cummax(dim=1).values


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize(
    "smoothing,window,alpha",
    [("ema", 16, None), ("ema", 4, 0.5), ("swim", 16, None), ("swim", 5, None), ("swim", 1, None), ("none", 16, None)],
)
def test_stepping_equals_probe_scores(backend, smoothing, window, alpha):
    device = _device(backend)
    L, B, T, H, K = 3, 4, 45, 32, 3
    layers = make_layers(L, B, T, H, device=device, seed=window)
    w, b = make_probe(L, H, K, device)
    full = probe_scores(layers, w, b, smoothing=smoothing, window=window, ema_alpha=alpha, backend="reference")
    z = probe_scores(layers, w, b, smoothing="none", backend="reference")
    threshold = torch.tensor([0.4, 0.6, 10.0])
    stream = ProbeStream(
        7, K, smoothing=smoothing, window=window, ema_alpha=alpha, threshold=threshold, device=device, backend=backend
    )
    slots = torch.tensor([6, 0, 3, 2], device=device)
    scores, flags = _stream_whole(stream, slots, z)
    torch.testing.assert_close(scores, full, rtol=0, atol=2e-6)
    expect_flags = _expected_flags(full.cpu(), threshold)
    assert torch.equal(flags.cpu(), expect_flags)
    flagged, token = stream.flags(slots)
    assert torch.equal(flagged, expect_flags[:, -1])
    first = torch.where(expect_flags.any(1), expect_flags.float().argmax(1), torch.tensor(-1))
    assert torch.equal(token, first)
    assert torch.equal(stream.tokens_seen(slots).cpu(), torch.full((B,), T))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("smoothing, alpha", [("none", None), ("ema", 1.0), ("ema", 0.5)])
def test_stepping_after_a_nan_matches_probe_scores(backend, smoothing, alpha):
    # With alpha = 1 (and "none") the state is forgotten exactly: a NaN logit marks
    # its own token only; with alpha < 1 it reaches every later token.
    device = _device(backend)
    z = torch.tensor([[[1.0], [float("nan")], [2.0], [3.0]]], device=device)
    stream = ProbeStream(1, 1, smoothing=smoothing, ema_alpha=alpha, threshold=1e9, device=device, backend=backend)
    scores, _ = _stream_whole(stream, torch.tensor([0], device=device), z)
    full = probe_scores(
        [z], torch.ones(1, 1, 1, device=device), smoothing=smoothing, ema_alpha=alpha, backend="reference"
    )
    assert torch.equal(torch.isnan(scores.cpu()), torch.isnan(full.cpu()))
    torch.testing.assert_close(scores.cpu(), full.cpu(), equal_nan=True)


def test_cpu_stepping_is_bit_identical_to_the_cpu_kernel():
    if not pykernels.backends()["cpu"].available:
        pytest.skip("cpu backend unavailable")
    layers = make_layers(2, 3, 70, 24, seed=9)
    w, b = make_probe(2, 24, 2)
    z = probe_scores(layers, w, b, smoothing="none", backend="cpu")
    for smoothing in ("ema", "swim"):
        full = probe_scores(layers, w, b, smoothing=smoothing, backend="cpu")
        stream = ProbeStream(3, 2, smoothing=smoothing, backend="cpu")
        scores, _ = _stream_whole(stream, [0, 1, 2], z)
        assert torch.equal(scores, full), smoothing


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("smoothing", ["ema", "swim"])
def test_slots_are_isolated_and_reuse_starts_clean(backend, smoothing):
    device = _device(backend)
    T, K = 30, 2
    g = torch.Generator().manual_seed(3)
    za, zb, zc = (torch.randn(1, T, K, generator=g).to(device) for _ in range(3))
    alone = {}
    for name, z in (("a", za), ("b", zb), ("c", zc)):
        s = ProbeStream(1, K, smoothing=smoothing, window=6, threshold=1.0, device=device, backend=backend)
        alone[name] = _stream_whole(s, [0], z)
    # a and b interleaved in slots 2 and 0, b leaving halfway; c then reuses b's slot.
    stream = ProbeStream(3, K, smoothing=smoothing, window=6, threshold=1.0, device=device, backend=backend)
    got_a, got_b = [], []
    for t in range(T):
        if t < T // 2:
            s, f = stream.step([2, 0], torch.cat([za[:, t], zb[:, t]]))
            got_b.append((s[1:], f[1:]))
        else:
            s, f = stream.step([2], za[:, t])
        got_a.append((s[:1], f[:1]))
    stream.reset([0])
    got_c = _stream_whole(stream, [0], zc)
    torch.testing.assert_close(torch.stack([s for s, _ in got_a], 1), alone["a"][0], rtol=0, atol=0)
    assert torch.equal(torch.stack([f for _, f in got_a], 1), alone["a"][1])
    torch.testing.assert_close(torch.stack([s for s, _ in got_b], 1), alone["b"][0][:, : T // 2], rtol=0, atol=0)
    torch.testing.assert_close(got_c[0], alone["c"][0], rtol=0, atol=0)
    assert torch.equal(got_c[1], alone["c"][1])
    assert stream.tokens_seen([0]).item() == T and stream.tokens_seen([1]).item() == 0


@pytest.mark.parametrize("backend", ALL)
def test_inactive_rows_leave_their_slot_untouched(backend):
    device = _device(backend)
    z = torch.randn(2, 12, 1, generator=torch.Generator().manual_seed(4)).to(device)
    active = torch.rand(12, generator=torch.Generator().manual_seed(5)) > 0.4
    stream = ProbeStream(2, 1, smoothing="swim", window=3, threshold=5.0, device=device, backend=backend)
    kept = []
    for t in range(12):
        s, _ = stream.step([0, 1], z[:, t], active=torch.tensor([True, bool(active[t])], device=device))
        if active[t]:
            kept.append(s[1])
        else:
            assert s[1].item() == 0.0
    ref = ProbeStream(1, 1, smoothing="swim", window=3, threshold=5.0, device=device, backend=backend)
    expect, _ = _stream_whole(ref, [0], z[1:, active.to(device)])
    torch.testing.assert_close(torch.stack(kept, 0)[None], expect, rtol=0, atol=0)
    assert stream.tokens_seen([1]).item() == int(active.sum())


@pytest.mark.parametrize("backend", ALL)
def test_nan_logit_flags_and_stays_flagged(backend):
    device = _device(backend)
    stream = ProbeStream(2, 1, smoothing="ema", threshold=100.0, device=device, backend=backend)
    stream.step([0, 1], torch.tensor([[0.0], [0.0]], device=device))
    s, f = stream.step([0, 1], torch.tensor([[float("nan")], [0.0]], device=device))
    assert torch.isnan(s[0]).all() and f.tolist() == [True, False]
    s, f = stream.step([0, 1], torch.tensor([[0.0], [0.0]], device=device))
    assert f.tolist() == [True, False]
    assert stream.flags()[1].tolist() == [1, -1]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize(
    "ids, pattern",
    [
        ([0, 5], r"slot ids must lie in \[0, max_slots=4\) \(got \[5\]\)"),
        ([-1], r"must lie in \[0, max_slots=4\) \(got \[-1\]\)"),
        ([1, 2, 1], r"slot ids must be distinct within one step \(got \[1\] more"),
    ],
)
def test_bad_slot_ids_raise_and_change_nothing(backend, ids, pattern):
    device = _device(backend)
    stream = ProbeStream(4, 1, smoothing="swim", window=3, device=device, backend=backend)
    stream.step([0, 1, 2], torch.ones(3, 1, device=device))
    before = (stream._state.clone(), stream._meta[:, :2].clone())
    with pytest.raises(ValueError, match=pattern):
        stream.step(ids, torch.ones(len(ids), 1, device=device))
    assert torch.equal(stream._state, before[0]) and torch.equal(stream._meta[:, :2], before[1])
    stream.check()  # the error was reported once and cleared
    s, f = stream.step([0], torch.ones(1, 1, device=device))  # and the stream still works
    assert f.tolist() == [True] and s.item() == 1.0


@pytest.mark.parametrize("backend", ALL)
def test_reset_bad_ids_raise_and_reset_the_valid_ones(backend):
    device = _device(backend)
    stream = ProbeStream(3, 1, device=device, backend=backend)
    stream.step([0, 1], torch.full((2, 1), 5.0, device=device))
    with pytest.raises(ValueError, match=r"ProbeStream reset: slot ids must lie in \[0, max_slots=3\) \(got \[7\]\)"):
        stream.reset([1, 7])
    assert stream.flags()[0].tolist() == [True, False, False]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("ids", [[-1, 1], [3], [-2]])
def test_reading_bad_slot_ids_raises(backend, ids):
    # Slot max_slots is a spare row and -k would wrap: neither may pass as "not flagged".
    device = _device(backend)
    stream = ProbeStream(3, 1, device=device, backend=backend)
    stream.step([0, 1, 2], torch.full((3, 1), 5.0, device=device))
    with pytest.raises(ValueError, match=r"slot ids must lie in \[0, max_slots=3\)"):
        stream.flags(ids)
    with pytest.raises(ValueError, match=r"slot ids must lie in \[0, max_slots=3\)"):
        stream.tokens_seen(ids)
    device_ids = torch.tensor(ids, device=device)
    if device_ids.is_cuda:  # no sync: reported by the next check()
        stream.tokens_seen(device_ids)
        with pytest.raises(ValueError, match="slot ids must lie"):
            stream.check()


def test_concurrent_streams_in_threads_are_independent():
    if not pykernels.backends()["cpu"].available:
        pytest.skip("cpu backend unavailable")
    z = torch.randn(4, 200, 2, generator=torch.Generator().manual_seed(8))
    expect = [_stream_whole(ProbeStream(1, 2, smoothing="swim", backend="cpu"), [0], z[i : i + 1])[0] for i in range(4)]
    results = [None] * 4

    def work(i):
        results[i] = _stream_whole(ProbeStream(1, 2, smoothing="swim", backend="cpu"), [0], z[i : i + 1])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert torch.equal(results[i], expect[i])


@pytest.mark.parametrize("backend", backend_params())
def test_stream_step_under_torch_compile(backend):
    device = backend_device(backend)
    eager = ProbeStream(3, 1, smoothing="ema", threshold=0.5, device=device, backend=backend)
    compiled_stream = ProbeStream(3, 1, smoothing="ema", threshold=0.5, device=device, backend=backend)
    step = torch.compile(lambda ids, z: compiled_stream.step(ids, z), fullgraph=True, backend="aot_eager")
    ids = torch.tensor([2, 0], device=device)
    for t in range(5):
        z = torch.full((2, 1), 0.3 * t, device=device)
        a, b = eager.step(ids, z), step(ids, z)
        torch.testing.assert_close(a[0], b[0])
        assert torch.equal(a[1], b[1])
    assert torch.equal(eager.flags()[1], compiled_stream.flags()[1])


def test_stream_argument_errors():
    with pytest.raises(ValueError, match="max_slots must be >= 1"):
        ProbeStream(0)
    with pytest.raises(ValueError, match="smoothing must be one of"):
        ProbeStream(2, smoothing="mean")
    with pytest.raises(ValueError, match="ema_alpha only applies to smoothing='ema'"):
        ProbeStream(2, smoothing="swim", ema_alpha=0.3)
    with pytest.raises(ValueError, match=r"ema_alpha must lie in \(0, 1\]"):
        ProbeStream(2, ema_alpha=0.0)
    with pytest.raises(ValueError, match=r"threshold must be a float or 2 floats \(one per head\), got 3"):
        ProbeStream(2, 2, threshold=[1.0, 2.0, 3.0])
    s = ProbeStream(2, 2)
    with pytest.raises(ValueError, match="token_logits has 3 at dim 0 but the number of slot_ids n is 2"):
        s.step([0, 1], torch.zeros(3, 2))
    with pytest.raises(ValueError, match="token_logits has 1 at dim 1 but num_heads K is 2"):
        s.step([0, 1], torch.zeros(2, 1))
    with pytest.raises(TypeError, match="slot_ids must have dtype in"):
        s.step(torch.tensor([0.0, 1.0]), torch.zeros(2, 2))
    with pytest.raises(TypeError, match=r"active must have dtype in \(bool\)"):
        s.step([0, 1], torch.zeros(2, 2), active=torch.ones(2))
    with pytest.raises(ValueError, match="token_logits must be on cpu"):
        s.step([0, 1], torch.zeros(2, 2, device="meta"))


def test_accumulate_argument_errors():
    acc = torch.zeros(3, 2)
    with pytest.raises(TypeError, match=r"acc must have dtype in \(float32\), got float64"):
        probe_accumulate_(acc.double(), torch.randn(3, 8), torch.randn(8, 2))
    with pytest.raises(ValueError, match="hidden has 4 at dim 0 but the number of rows N of acc is 3"):
        probe_accumulate_(acc, torch.randn(4, 8), torch.randn(8, 2))
    with pytest.raises(ValueError, match="weight_l has 9 at dim 0 but the hidden size H of hidden is 8"):
        probe_accumulate_(acc, torch.randn(3, 8), torch.randn(9, 2))
    with pytest.raises(ValueError, match="weight_l has 3 at dim 1 but the number of heads K of acc is 2"):
        probe_accumulate_(acc, torch.randn(3, 8), torch.randn(8, 3))
    with pytest.raises(ValueError, match=r"hidden must have 2 dims \[N, H\]"):
        probe_accumulate_(acc, torch.randn(1, 3, 8), torch.randn(8, 2))
    with pytest.raises(ValueError, match="weight_l must be on cpu"):
        probe_accumulate_(acc, torch.randn(3, 8), torch.randn(8, 2, device="meta"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("varlen", [False, True], ids=["step", "step_varlen"])
def test_stream_step_replays_in_a_cuda_graph(backend, varlen):
    # No host sync: slot ids (and segments) are read on the device.
    if not pykernels.backends()[backend].available:
        pytest.skip(f"{backend} backend unavailable")
    eager = ProbeStream(8, 2, smoothing="swim", window=4, threshold=0.5, device="cuda", backend=backend)
    graphed = ProbeStream(8, 2, smoothing="swim", window=4, threshold=0.5, device="cuda", backend=backend)
    ids = torch.tensor([5, 1, 6], device="cuda")
    segments = [torch.tensor(v, device="cuda") for v in ([0, 3, 9], [3, 5, 1])] if varlen else []
    step = (lambda s, z: s.step_varlen(ids, *segments, z)) if varlen else (lambda s, z: s.step(ids, z))
    z_in = torch.zeros(11 if varlen else 3, 2, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (Triton compiles here)
        step(graphed, z_in)
        graphed.reset()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_scores, out_flags = step(graphed, z_in)
    z = torch.randn(10, *z_in.shape, generator=torch.Generator().manual_seed(0)).cuda()
    for t in range(10):
        z_in.copy_(z[t])
        graph.replay()
        s, f = step(eager, z[t])
        torch.testing.assert_close(out_scores, s, rtol=0, atol=0)
        assert torch.equal(out_flags, f)
    assert torch.equal(graphed.flags(ids)[1], eager.flags(ids)[1])


# ---------------------------------------------------------------- step_varlen (a segment of tokens per slot)


def _random_segments(g, n, max_count):
    """n segments in increasing order with random gaps; some empty. Returns starts, counts, N."""
    counts = torch.randint(0, max_count + 1, (n,), generator=g)
    counts[torch.randperm(n, generator=g)[: max(1, n // 4)]] = 0
    gaps = torch.randint(0, 3, (n + 1,), generator=g)
    starts = torch.cumsum(gaps[:n], 0) + torch.cumsum(counts, 0) - counts
    return starts, counts, int(starts[-1] + counts[-1] + gaps[n])


def _step_token_by_token(stream, slot_ids, starts, counts, z):
    """What step_varlen must equal: one `step` per token position, each slot's
    segment advancing one token while it lasts (inactive afterwards)."""
    scores = torch.zeros(z.shape[0], z.shape[1], device=z.device)
    for t in range(int(counts.max())):
        live = t < counts
        rows = torch.where(live, starts + t, torch.zeros_like(starts))  # inactive rows: any valid row
        s, _ = stream.step(slot_ids, z[rows.to(z.device)], active=live.to(z.device))
        scores[rows[live].to(z.device)] = s[live.to(z.device)]
    return scores, stream.flags(slot_ids)[0]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize(
    "smoothing,window,alpha,K",
    [
        ("ema", 16, None, 1),
        ("ema", 4, 0.5, 5),
        ("swim", 3, None, 2),
        ("swim", 40, None, 1),
        ("swim", 1, None, 5),
        ("none", 16, None, 5),
    ],
)
def test_step_varlen_equals_token_by_token_steps(backend, smoothing, window, alpha, K):
    # Three calls over 6 of 9 slots with reuse (slot 4 is reset between calls), segments
    # shorter and longer than the SWiM window, empty segments and a NaN logit.
    device = _device(backend)
    g = torch.Generator().manual_seed(window * 10 + K)
    threshold = torch.linspace(0.3, 1.2, K)
    make = lambda b: ProbeStream(
        9, K, smoothing=smoothing, window=window, ema_alpha=alpha, threshold=threshold, device=device, backend=b
    )
    varlen, tokenwise, reference = make(backend), make(backend), make("reference")
    for call in range(3):
        slots = torch.randperm(9, generator=g)[:6].to(device)
        starts, counts, N = _random_segments(g, 6, 7)
        z = (torch.randn(N, K, generator=g) * 0.8 + 0.2).to(device)
        if call == 1:
            z[int(starts[counts.argmax()]) + 1, K - 1] = float("nan")
        if call == 2:
            for s in (varlen, tokenwise, reference):
                s.reset([4])
        starts_d, counts_d = starts.to(device), counts.to(device, torch.int32 if call == 1 else torch.int64)
        scores, flagged = varlen.step_varlen(slots, starts_d, counts_d, z)
        expect, expect_flagged = _step_token_by_token(tokenwise, slots, starts, counts, z)
        ref_scores, ref_flagged = reference.step_varlen(slots.cpu(), starts, counts, z.cpu())
        assert scores.shape == (N, K) and flagged.shape == (6,)
        torch.testing.assert_close(scores, expect, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(scores.cpu(), ref_scores, rtol=0, atol=2e-6, equal_nan=True)
        assert torch.equal(flagged.cpu(), expect_flagged) and torch.equal(ref_flagged, expect_flagged)
        outside = torch.ones(N, dtype=torch.bool)
        for begin, count in zip(starts.tolist(), counts.tolist()):
            outside[begin : begin + count] = False
        assert (scores.cpu()[outside] == 0).all()
        assert torch.equal(varlen._meta[:, :2], tokenwise._meta[:, :2])
        assert torch.equal(varlen._meta[:, :2].cpu(), reference._meta[:, :2])
        torch.testing.assert_close(varlen._state, tokenwise._state, rtol=0, atol=0, equal_nan=True)
    assert varlen._status[0].item() == 3  # one step per call
    assert varlen.flags()[0].any() and not varlen.flags()[0].all()  # the thresholds are neither trivial nor unreachable


@pytest.mark.parametrize("backend", ALL)
def test_step_varlen_of_one_token_segments_equals_step(backend):
    device = _device(backend)
    z = torch.randn(3, 2, generator=torch.Generator().manual_seed(1)).to(device)
    a = ProbeStream(4, 2, smoothing="swim", window=2, threshold=0.1, device=device, backend=backend)
    b = ProbeStream(4, 2, smoothing="swim", window=2, threshold=0.1, device=device, backend=backend)
    for _ in range(3):
        got = a.step_varlen([3, 0, 1], [0, 1, 2], [1, 1, 1], z)
        expect = b.step([3, 0, 1], z)
        assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])
    empty = a.step_varlen(torch.zeros(0, dtype=torch.int64), [], [], torch.zeros(0, 2, device=device))
    assert empty[0].shape == (0, 2) and empty[1].shape == (0,)
    assert a._status[0].item() == 4


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize(
    "ids, starts, counts, pattern",
    [
        ([0, 5, 1], [0, 2, 4], [2, 2, 1], r"slot ids must lie in \[0, max_slots=4\) \(got \[5\]\)"),
        ([1, 2, 1], [0, 2, 4], [2, 2, 1], r"slot ids must be distinct within one step \(got \[1\] more"),
        (
            [0, 1, 2],
            [0, 2, 4],
            [2, 2, 3],
            r"token segments must lie in \[0, N\).*\(got starts \[0, 2, 4\], counts "
            r"\[2, 2, 3\] for N=6 token rows\)",
        ),
        ([0, 1, 2], [-1, 2, 4], [2, 2, 1], "token segments must lie"),
        ([0, 1, 2], [0, 2, 4], [2, -1, 1], "token segments must lie"),
        ([0, 1, 2], [0, 1, 4], [2, 2, 1], "token segments must lie"),  # overlap
        ([0, 1, 2], [2, 0, 4], [1, 2, 1], "token segments must lie"),  # out of order
        ([0, 1, 2], [0, 2, 7], [2, 2, 0], "token segments must lie"),  # empty, but starts past N
    ],
)
def test_step_varlen_bad_input_raises_and_changes_nothing(backend, ids, starts, counts, pattern):
    device = _device(backend)
    stream = ProbeStream(4, 2, smoothing="swim", window=3, device=device, backend=backend)
    stream.step_varlen([0, 1, 2], [0, 1, 3], [1, 2, 1], torch.ones(5, 2, device=device))
    before = (stream._state.clone(), stream._meta[:, :2].clone(), int(stream._status[0]))
    z = torch.full((6, 2), 0.5, device=device)
    with pytest.raises(ValueError, match=pattern):
        stream.step_varlen(ids, starts, counts, z)
    assert torch.equal(stream._state, before[0]) and torch.equal(stream._meta[:, :2], before[1])
    assert int(stream._status[0]) == before[2] + 1
    # Fail closed: NaN scores for the segments' tokens inside [0, N), every row flagged.
    op_scores, op_flagged = stream._step_varlen_trusted(
        torch.tensor(ids, device=device), torch.tensor(starts, device=device), torch.tensor(counts, device=device), z
    )
    assert op_flagged.all()
    in_segment = torch.zeros(6, dtype=torch.bool)
    for begin, count in zip(starts, counts):
        in_segment[max(begin, 0) : max(begin + count, 0)] = True
    assert torch.isnan(op_scores.cpu()[in_segment]).all() and (op_scores.cpu()[~in_segment] == 0).all()
    with pytest.raises(ValueError, match=pattern.split(r"\(got")[0].rstrip()):
        stream.check()
    assert torch.equal(stream._state, before[0]) and torch.equal(stream._meta[:, :2], before[1])
    s, f = stream.step_varlen([0], [1], [2], z[:3])  # and the stream still works
    assert s[0].tolist() == [0.0, 0.0] and f.item()  # flagged since the first step (threshold 0)
    torch.testing.assert_close(s[1:].cpu(), torch.tensor([[0.75, 0.75], [2 / 3, 2 / 3]]))


def test_step_varlen_argument_errors():
    s = ProbeStream(2, 2)
    with pytest.raises(ValueError, match="token_starts has 1 at dim 0 but the number of slot_ids n is 2"):
        s.step_varlen([0, 1], [0], [1, 1], torch.zeros(2, 2))
    with pytest.raises(ValueError, match="token_counts has 3 at dim 0 but the number of slot_ids n is 2"):
        s.step_varlen([0, 1], [0, 1], [1, 1, 0], torch.zeros(2, 2))
    with pytest.raises(TypeError, match="token_counts must have dtype in"):
        s.step_varlen([0, 1], [0, 1], torch.ones(2), torch.zeros(2, 2))
    with pytest.raises(TypeError, match=r"token_starts must have dtype in \(int64, int32\), got int16"):
        s.step_varlen([0, 1], torch.tensor([0, 1], dtype=torch.int16), [1, 1], torch.zeros(2, 2))
    with pytest.raises(ValueError, match="token_logits has 1 at dim 1 but num_heads K is 2"):
        s.step_varlen([0, 1], [0, 1], [1, 1], torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"token_logits must have 2 dims \[N, K\]"):
        s.step_varlen([0, 1], [0, 1], [1, 1], torch.zeros(2))


@pytest.mark.parametrize("backend", backend_params())
def test_stream_step_varlen_under_torch_compile(backend):
    device = backend_device(backend)
    eager = ProbeStream(3, 2, smoothing="swim", window=2, threshold=0.5, device=device, backend=backend)
    compiled_stream = ProbeStream(3, 2, smoothing="swim", window=2, threshold=0.5, device=device, backend=backend)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    step = torch.compile(
        lambda ids, starts, counts, z: compiled_stream.step_varlen(ids, starts, counts, z),
        fullgraph=True,
        backend=capture,
    )
    ids, starts, counts = (torch.tensor(v, device=device) for v in ([2, 0], [0, 4], [3, 2]))
    z = torch.randn(4, 6, 2, generator=torch.Generator().manual_seed(2)).to(device)
    for t in range(4):
        a, b = eager.step_varlen(ids, starts, counts, z[t]), step(ids, starts, counts, z[t])
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
        assert torch.equal(a[1], b[1])
    assert torch.equal(eager.flags()[1], compiled_stream.flags()[1])
    op = triton_name("probe_stream_step_varlen") if backend == "triton" else "probe_stream_step_varlen"
    assert any(str(n.target) == f"pykernels.{op}.default" for g in graphs for n in g.graph.nodes)
