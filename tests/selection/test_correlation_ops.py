"""The model-selection ops: the reference against hand-worked cases and scipy / numpy, then every
fast backend against the reference (random, tie-heavy and degenerate inputs), then torch
integration (torch.compile, autograd; opcheck in tests/test_ops.py)."""

import numpy as np
import pytest
import torch

import pykernels
from pykernels.backend import op_callable
from pykernels.reference import parc as ref
from tests.helpers import backend_device, backend_params, compile_and_check_ops


@pytest.fixture
def scipy_stats():
    # Per test: without scipy only the comparisons with scipy skip, never the kernel tests.
    return pytest.importorskip("scipy.stats")


def features(B, N, D, seed, dtype=torch.float64, device="cpu", kind="random"):
    """Random rows; "quantized": every row is one of 4 prototype rows (and one negated), so
    distances repeat exactly, including 0 and 2."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    else:
        protos = torch.randn(4, D, generator=g, dtype=torch.float64)
        x = protos[torch.randint(0, 4, (B, N), generator=g)]
        x[:, 1] = -x[:, 0]
    return x.to(device, dtype)


# ---------------------------------------------------------------- reference


def test_reference_distances_match_numpy_corrcoef():
    x = features(2, 30, 7, seed=0)
    for b in range(2):
        expect = 1 - np.corrcoef(x[b].numpy())
        got = ref.pairwise_corr_distance(x, triu=False)[b].numpy()
        np.testing.assert_allclose(got, expect, atol=1e-14, rtol=0)
        upper = np.triu_indices(30, 1)
        np.testing.assert_allclose(ref.pairwise_corr_distance(x, triu=True)[b].numpy(), expect[upper], atol=1e-14)


def test_reference_distances_by_hand():
    # Rows (1, 2, 3), (2, 4, 6) (perfectly correlated), (3, 2, 1) (anti-correlated), (1, 0, 1):
    # r = 1, -1 and 0 with the first row.
    x = torch.tensor([[[1.0, 2, 3], [2, 4, 6], [3, 2, 1], [1, 0, 1]]], dtype=torch.float64)
    d = ref.pairwise_corr_distance(x)[0]
    torch.testing.assert_close(d[0, :], torch.tensor([0.0, 0, 2, 1], dtype=torch.float64), atol=1e-15, rtol=0)
    assert torch.equal(d.diagonal(), torch.zeros(4, dtype=torch.float64))


def test_reference_average_ranks_match_scipy(scipy_stats):
    v = torch.tensor([3.0, 1, 3, 2, 3, -0.0, 0.0, float("inf")])
    np.testing.assert_array_equal(ref.average_ranks(v).numpy(), scipy_stats.rankdata(v.numpy()))


@pytest.mark.parametrize("kind", ["continuous", "ties"])
def test_reference_spearman_matches_scipy(kind, scipy_stats):
    g = torch.Generator().manual_seed(1)
    if kind == "continuous":
        x, y = torch.randn(3, 200, generator=g), torch.randn(3, 200, generator=g)
    else:
        x, y = torch.randint(0, 4, (3, 200), generator=g).double(), torch.randint(0, 3, (3, 200), generator=g).double()
    got = ref.spearman(x.double(), y.double())
    expect = [scipy_stats.spearmanr(x[b], y[b])[0] for b in range(3)]
    np.testing.assert_allclose(got.numpy(), expect, atol=1e-13, rtol=0)


def test_reference_parc_is_spearman_against_onehot_label_distances(scipy_stats):
    x = features(2, 40, 6, seed=2)
    classes = torch.randint(0, 4, (40,), generator=torch.Generator().manual_seed(3))
    onehot = torch.nn.functional.one_hot(classes, 4).double()
    label = ref.pairwise_corr_distance(onehot[None], triu=True)[0]
    # Up to float noise the label distance is two-valued: 0 and C / (C - 1).
    assert torch.allclose(torch.unique(label.round(decimals=12)), torch.tensor([0.0, 4 / 3], dtype=torch.float64))
    for b in range(2):
        dist = ref.pairwise_corr_distance(x[b : b + 1], triu=True)[0].numpy()
        expect = scipy_stats.spearmanr(dist, label.round(decimals=12).numpy())[0]
        torch.testing.assert_close(ref.parc_spearman(x[b : b + 1], classes)[0].item(), expect, atol=1e-13, rtol=0)


def test_closed_form_against_point_biserial_formula():
    # With no ties, PARC = 100 (2 AUC - 1) sqrt(3 n0 n1 / (M^2 - 1)) (spec: the closed form).
    x = features(1, 50, 8, seed=4)
    classes = torch.randint(0, 5, (50,), generator=torch.Generator().manual_seed(5))
    dist = ref.pairwise_corr_distance(x, triu=True)[0]
    i, j = torch.triu_indices(50, 50, 1)
    diff = classes[i] != classes[j]
    d_diff, d_same = dist[diff], dist[~diff]
    n1, n0, M = d_diff.numel(), d_same.numel(), dist.numel()
    auc = (d_diff[:, None] > d_same[None, :]).double().mean()
    expect = (2 * auc - 1) * torch.sqrt(torch.tensor(3.0 * n0 * n1 / (M**2 - 1), dtype=torch.float64))
    for backend in ["reference"] + [b for b in ("cpu",) if pykernels.backends()[b].available]:
        torch.testing.assert_close(pykernels.parc_spearman(x, classes, backend=backend)[0], expect, atol=1e-13, rtol=0)


# ---------------------------------------------------------------- backends vs reference

SHAPES = [(1, 3, 2), (2, 17, 5), (3, 70, 33), (1, 130, 9)]


def _tol(dtype):
    return 2e-6 if dtype == torch.float32 else 1e-13


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("triu", [False, True], ids=["full", "triu"])
def test_distances_match_reference(backend, dtype, triu):
    device = backend_device(backend)
    shapes = SHAPES[:3] if backend == "triton" and device == "cpu" else SHAPES  # the interpreter is slow
    for seed, (B, N, D) in enumerate(shapes):
        for kind in ("random", "quantized"):
            x = features(B, N, D, seed, dtype, device, kind)
            expect = ref.pairwise_corr_distance(x.double().cpu(), triu=triu)
            got = pykernels.pairwise_corr_distance(x, triu=triu, backend=backend)
            assert got.dtype == dtype and got.device.type == device
            torch.testing.assert_close(
                got.double().cpu(), expect, atol=_tol(dtype), rtol=0, msg=lambda m: f"B{B} N{N} D{D} {kind}: {m}"
            )
            if kind == "quantized":  # duplicates are exactly 0 apart, negations exactly 2
                assert (got == 0).sum() == (expect == 0).sum() and (got == 2).sum() == (expect == 2).sum()


@pytest.mark.parametrize("backend", backend_params())
def test_distances_of_half_precision_and_strided_inputs(backend):
    device = backend_device(backend)
    base = features(2, 20, 12, seed=7, device=device)
    for x in (base[:, ::2, 1::2], base.transpose(1, 2)[:, :10].transpose(1, 2), base.half(), base.bfloat16()):
        expect = ref.pairwise_corr_distance(x.double().cpu(), triu=True)
        got = pykernels.pairwise_corr_distance(x, triu=True, backend=backend)
        assert got.dtype in (torch.float32, torch.float64)
        torch.testing.assert_close(got.double().cpu(), expect, atol=3e-6, rtol=0)


@pytest.mark.parametrize("backend", ["reference"] + backend_params())
def test_undefined_rows_are_nan_and_nothing_else(backend):
    device = backend_device(backend) if backend != "reference" else "cpu"
    x = features(2, 12, 6, seed=8, device=device)
    x[0, 3] = 5.0  # constant sample
    x[1, 7, 2] = float("inf")
    d = pykernels.pairwise_corr_distance(x, backend=backend).cpu()
    bad = torch.zeros(2, 12, 12, dtype=torch.bool)
    bad[0, 3, :] = bad[0, :, 3] = True
    bad[1, 7, :] = bad[1, :, 7] = True
    assert torch.equal(torch.isnan(d), bad)
    r = pykernels.parc_spearman(x, torch.arange(12, device=device) % 3, backend=backend).cpu()
    assert torch.isnan(r).all()


@pytest.mark.parametrize("backend", ["reference"] + backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_constant_samples_are_nan_whatever_their_mean_rounds_to(backend, dtype):
    # One rule on every backend and dtype: all values equal -> NaN row, column and diagonal.
    # Values whose mean does not round back to themselves (0.1, 1/3, ...) used to split the
    # backends (finite 1.0 on one, NaN on another).
    device = backend_device(backend) if backend != "reference" else "cpu"
    for D in (3, 7, 33):
        x = features(1, 10, D, seed=D, dtype=dtype)
        for row, value in zip((1, 4, 6, 9), (0.1, 1 / 3, 2.7182818, -1e-3 * np.pi)):
            x[0, row] = value
        x = x.to(device)
        bad = torch.zeros(10, 10, dtype=torch.bool)
        for row in (1, 4, 6, 9):
            bad[row, :] = bad[:, row] = True
        d = pykernels.pairwise_corr_distance(x, backend=backend)[0].cpu()
        assert torch.equal(torch.isnan(d), bad), (D, torch.isnan(d).nonzero().tolist())
        expect = ref.pairwise_corr_distance(x.double().cpu())[0]
        torch.testing.assert_close(d.double(), expect, atol=_tol(dtype), rtol=0, equal_nan=True)
        triu = pykernels.pairwise_corr_distance(x, triu=True, backend=backend)[0].cpu()
        i, j = torch.triu_indices(10, 10, 1)
        assert torch.equal(torch.isnan(triu), bad[i, j])
        assert torch.isnan(pykernels.parc_spearman(x, torch.arange(10, device=device) % 2, backend=backend)).all()
        # The same values one ulp apart are a sample like any other.
        x[0, 1, 0] = torch.nextafter(x[0, 1, 0], x.new_tensor(1.0))
        d = pykernels.pairwise_corr_distance(x, backend=backend)[0].cpu()
        assert not torch.isnan(d[1, 0]) and d[1, 1] == 0


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_spearman_matches_reference(backend, dtype):
    device = backend_device(backend)
    g = torch.Generator().manual_seed(9)
    for M in (2, 3, 37, 1000):
        for kind in ("continuous", "ties"):
            if kind == "continuous":
                x = torch.randn(3, M, generator=g, dtype=torch.float64)
                y = 0.3 * x + torch.randn(3, M, generator=g, dtype=torch.float64)
            else:
                x = torch.randint(0, 5, (3, M), generator=g).double()
                y = torch.randint(0, 3, (3, M), generator=g).double()
            x, y = x.to(device, dtype), y.to(device, dtype)
            expect = ref.spearman(x.double().cpu(), y.double().cpu())
            got = pykernels.spearman(x, y, backend=backend)
            assert got.dtype == torch.float64 and got.shape == (3,)
            torch.testing.assert_close(got.cpu(), expect, atol=1e-12, rtol=0, equal_nan=True)


@pytest.mark.parametrize("backend", backend_params())
def test_spearman_shared_y_nan_and_batch_shapes(backend):
    device = backend_device(backend)
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 3, 50, generator=g, dtype=torch.float64).to(device)
    y = torch.randn(50, generator=g, dtype=torch.float64).to(device)
    x[1, 2, 4] = float("nan")
    got = pykernels.spearman(x, y, backend=backend).cpu()
    assert got.shape == (2, 3)
    expect = ref.spearman(x.reshape(6, 50).cpu(), y.cpu().expand(6, 50)).reshape(2, 3)
    torch.testing.assert_close(got, expect, atol=1e-12, rtol=0, equal_nan=True)
    assert torch.isnan(got[1, 2]) and torch.isfinite(got.flatten()[:5]).all()
    constant = pykernels.spearman(x[0], torch.ones(50, dtype=torch.float64, device=device), backend=backend)
    assert torch.isnan(constant).all()
    # Non-contiguous rows, integer and float32 mixes.
    xi = torch.randint(0, 9, (4, 60), generator=g).to(device)
    yf = torch.randn(60, 4, generator=g).to(device).T
    torch.testing.assert_close(
        pykernels.spearman(xi, yf, backend=backend).cpu(),
        ref.spearman(xi.double().cpu(), yf.double().cpu()),
        atol=1e-12,
        rtol=0,
    )


@pytest.mark.parametrize("backend", ["reference"] + backend_params())
def test_spearman_ranks_int64_exactly_past_2_53(backend, scipy_stats):
    """2^53 + k are distinct int64 values but one float64: they must not be ranked as ties (scipy
    itself converts to float64, so the expectation comes from the offsets k)."""
    device = backend_device(backend) if backend != "reference" else "cpu"
    offsets = torch.tensor([[4, 0, 1, 3, 2, 2], [0, 1, 2, 3, 4, 5]])
    big = 2**53 + offsets
    y = torch.tensor([4.0, 0.0, 1.0, 3.0, 2.0, 2.0], dtype=torch.float64)
    got = pykernels.spearman(big.to(device), y.to(device), backend=backend).cpu()
    expect = torch.tensor([scipy_stats.spearmanr(k.numpy(), y.numpy())[0] for k in offsets], dtype=torch.float64)
    torch.testing.assert_close(got, expect, atol=1e-12, rtol=0)
    assert got[0] == 1.0
    # Both sides 64-bit, y shared and negative: every row against -(2^53 + [0..5]), reversed order.
    got = pykernels.spearman(big.to(device), -big[1].to(device), backend=backend).cpu()
    expect = torch.tensor([-scipy_stats.spearmanr(k.numpy(), range(6))[0] for k in offsets], dtype=torch.float64)
    torch.testing.assert_close(got, expect, atol=1e-12, rtol=0)
    assert got[1] == -1.0


@pytest.mark.parametrize("backend", backend_params())
def test_parc_spearman_matches_reference(backend):
    device = backend_device(backend)
    shapes = [(1, 3, 2, 2), (2, 40, 6, 3), (3, 90, 33, 7), (2, 150, 4, 12)]
    if backend == "triton" and device == "cpu":
        shapes = shapes[:2] + [(1, 70, 33, 7)]  # the interpreter is slow
    for seed, (B, N, D, C) in enumerate(shapes):
        for kind in ("random", "quantized"):
            x = features(B, N, D, seed, torch.float64, device, kind)
            classes = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(seed)) * 7 - 3
            classes[:2] = torch.tensor([1, 2]) if C > 1 else 0  # at least two classes
            expect = ref.parc_spearman(x.cpu(), classes)
            got = pykernels.parc_spearman(x, classes.to(device), backend=backend)
            torch.testing.assert_close(
                got.cpu(), expect, atol=1e-12, rtol=0, equal_nan=True, msg=lambda m: f"B{B} N{N} D{D} C{C} {kind}: {m}"
            )
            got32 = pykernels.parc_spearman(x.float(), classes.to(device), backend=backend)
            expect32 = ref.parc_spearman(x.float().cpu(), classes)
            torch.testing.assert_close(got32.cpu(), expect32, atol=1e-12, rtol=0, equal_nan=True)


@pytest.mark.parametrize("backend", ["reference"] + backend_params())
def test_parc_spearman_one_sided_labels_are_nan(backend):
    device = backend_device(backend) if backend != "reference" else "cpu"
    x = features(1, 10, 4, seed=11, device=device)
    assert torch.isnan(
        pykernels.parc_spearman(x, torch.zeros(10, dtype=torch.long, device=device), backend=backend)
    ).all()
    assert torch.isnan(pykernels.parc_spearman(x, torch.arange(10, device=device), backend=backend)).all()


@pytest.mark.parametrize("backend", backend_params())
def test_ops_refuse_features_without_dims(backend):
    """The ops themselves (not only the Python wrappers) reject D = 0: the CPU kernel used to read
    past the end (a segfault) and the others returned distances of 1."""
    device = backend_device(backend)
    dist = op_callable("pairwise_corr_distance", backend)
    parc_op = op_callable("parc_spearman", backend)
    x = torch.empty(1, 300, 0, device=device)
    for triu in (False, True):
        with pytest.raises(RuntimeError, match=r"pairwise_corr_distance: .*\(D > 0\)"):
            dist(x, triu)
    with pytest.raises(RuntimeError, match=r"parc_spearman: .*\(D > 0\)"):
        parc_op(x, torch.arange(300, device=device) % 3)


@pytest.mark.parametrize("backend", ["reference"] + backend_params())
def test_spearman_of_complex_empty_and_single_value_rows(backend):
    # Complex values have no order: a named TypeError, not NaN. M < 2 has no rank correlation
    # (NaN per row) and an empty batch gives an empty result, not a reshape / index error.
    device = backend_device(backend) if backend != "reference" else "cpu"
    z = torch.randn(3, 5, dtype=torch.complex64, device=device)
    with pytest.raises(TypeError, match="x must be real .* got dtype complex64"):
        pykernels.spearman(z, z.real, backend=backend)
    with pytest.raises(TypeError, match="y must be real .* got dtype complex64"):
        pykernels.spearman(z.real, z, backend=backend)
    for shape in ((3, 0), (2, 4, 0), (3, 1)):
        x = torch.randn(shape, device=device)
        out = pykernels.spearman(x, x, backend=backend)
        assert out.shape == shape[:-1] and out.dtype == torch.float64 and torch.isnan(out).all()
    for shape in ((0, 5), (2, 0, 5), (0, 0)):
        x = torch.randn(shape, device=device)
        out = pykernels.spearman(x, torch.randn(shape[-1], device=device), backend=backend)
        assert out.shape == shape[:-1] and out.dtype == torch.float64


@pytest.mark.parametrize("backend", [b for b in backend_params() if b.id == "cuda"])
def test_cuda_spearman_and_parc_sums_are_exact_like_the_cpus(backend):
    # The CUDA kernels sum rank products and tie terms in 128-bit integers (they used double
    # atomics: order-dependent rounding): bit-equal to the CPU kernel and run to run.
    g = torch.Generator().manual_seed(12)
    x = torch.randint(0, 1000, (3, 2**20 + 7), generator=g).double()  # heavy ties, many blocks
    y = torch.randint(0, 50, (3, 2**20 + 7), generator=g).double()
    cpu = pykernels.spearman(x, y, backend="cpu")
    first = pykernels.spearman(x.cuda(), y.cuda(), backend="cuda").cpu()
    again = pykernels.spearman(x.cuda(), y.cuda(), backend="cuda").cpu()
    assert torch.equal(first, cpu) and torch.equal(again, first)
    f = features(2, 1500, 3, seed=13, kind="quantized")  # tie-heavy distances
    classes = torch.arange(1500) % 7
    cpu = pykernels.parc_spearman(f, classes, backend="cpu")
    assert torch.equal(pykernels.parc_spearman(f.cuda(), classes.cuda(), backend="cuda").cpu(), cpu)


class _LaunchLog:
    """Stands in for a Triton kernel: records each launch grid, then launches the kernel."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


@pytest.mark.parametrize("backend", [b for b in backend_params() if b.id == "triton"])
def test_triton_ranking_grids_stay_on_axis_0_and_parc_works_model_by_model(backend, monkeypatch):
    """GPU grids allow 2^31 - 1 programs on axis 0 but 65,535 on axes 1-2, which the blocks of
    M = N(N-1)/2 pairs pass at N ~ 11,600: each ranking kernel must put all its programs on axis 0.
    parc_spearman must sort a bounded chunk of models at a time (here one), not all B at once."""
    import triton

    from pykernels.triton import parc as tp

    device = backend_device(backend)
    logs = {
        name: _LaunchLog(getattr(tp, name))
        for name in ("_midrank_kernel", "_rank_products_kernel", "_parc_count_kernel", "_parc_keys_kernel")
    }
    for name, log in logs.items():
        monkeypatch.setattr(tp, name, log)
    y = torch.randn(3, 2500, dtype=torch.float64, device=device)
    torch.testing.assert_close(
        pykernels.spearman(y, y.flip(1), backend=backend).cpu(),
        ref.spearman(y.cpu(), y.flip(1).cpu()),
        atol=1e-12,
        rtol=0,
    )
    for name in ("_midrank_kernel", "_rank_products_kernel"):
        assert logs[name].grids and all(g == (3 * triton.cdiv(2500, 1024),) for g in logs[name].grids), name
    x = features(3, 50, 4, seed=20, device=device)
    classes = torch.arange(50) % 4
    pairs = 50 * 49 // 2
    monkeypatch.setattr(tp, "_KEY_BYTES_PER_CHUNK", 8 * pairs)  # one model's keys
    torch.testing.assert_close(
        pykernels.parc_spearman(x, classes.to(device), backend=backend).cpu(),
        ref.parc_spearman(x.cpu(), classes),
        atol=1e-12,
        rtol=0,
    )
    assert [g[0] for g in logs["_parc_keys_kernel"].grids] == [1, 1, 1]
    assert logs["_parc_count_kernel"].grids == [(triton.cdiv(pairs, 1024),)] * 3


@pytest.mark.parametrize("backend", [b for b in backend_params() if b.id == "triton"])
def test_triton_parc_spearman_does_not_sync_the_host(backend):
    """The label side stays on the device (n_same is read by the kernel), so a GPU call queues
    its work without waiting; one-sided labels still come out NaN."""
    if backend_device(backend) != "cuda":
        pytest.skip("host syncs only exist on a GPU")
    x = features(2, 40, 6, seed=21, device="cuda")
    for classes in (torch.arange(40) % 3, torch.zeros(40, dtype=torch.long)):
        on_device = classes.cuda()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = pykernels.parc_spearman(x, on_device, backend=backend)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(got.cpu(), ref.parc_spearman(x.cpu(), classes), atol=1e-12, rtol=0, equal_nan=True)


@pytest.mark.slow
def test_cpu_parc_ranks_exactly_past_float32_precision():
    """Ranks beyond 2^24 pairs: N = 5,800 samples give M = 16.8M > 2^24 pairs. Features with
    many exact ties (rows from a small set) make every rank matter; the fused kernel must equal
    the rank-sum formula evaluated on float64 distances sorted by torch."""
    if not pykernels.backends()["cpu"].available:
        pytest.skip("cpu backend unavailable")
    N = 5800
    x = features(1, N, 3, seed=12, kind="quantized")
    x = x + 1e-3 * torch.randn(1, N, 3, generator=torch.Generator().manual_seed(13), dtype=torch.float64).round(
        decimals=1
    )
    classes = torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(14))
    got = pykernels.parc_spearman(x, classes, backend="cpu")
    dist = pykernels.pairwise_corr_distance(x, triu=True, backend="cpu")[0]
    assert dist.numel() > 2**24
    i, j = torch.triu_indices(N, N, 1)
    different = classes[i] != classes[j]
    del i, j
    # Average ranks from a float64 sort: run starts/ends by value.
    values, order = torch.sort(dist)
    _, counts = torch.unique_consecutive(values, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = torch.repeat_interleave(ends - (counts.double() - 1) / 2, counts)
    rank_sum_diff = mean_rank[different[order]].sum()
    n1 = int(different.sum())
    n0 = dist.numel() - n1
    M = dist.numel()
    twice_u = 2 * rank_sum_diff - n1 * (n1 + 1)
    ties = (counts.double() ** 3 - counts.double()).sum()
    spread = (M**3 - M - float(ties)) / (12 * M)
    expect = (float(twice_u) - n0 * n1) / (2 * np.sqrt(n0 * n1 * spread))
    assert abs(got.item() - expect) < 1e-9
    # Ranks held in float32 would be wrong here: they round beyond 2^24.
    assert not torch.equal(mean_rank.float().double(), mean_rank)


# ---------------------------------------------------------------- torch integration


@pytest.mark.parametrize("backend", backend_params())
def test_torch_compile_fullgraph_calls_the_kernels(backend, monkeypatch):
    device = backend_device(backend)
    monkeypatch.setenv("PYKERNELS_BACKEND", backend)

    def rank_models(x, classes, y):
        d = pykernels.pairwise_corr_distance(x, triu=True)
        return pykernels.parc_spearman(x, classes) * 100, pykernels.spearman(d, y)

    x = features(2, 12, 5, seed=16, device=device)
    classes = torch.arange(12, device=device) % 4
    y = torch.randn(66, device=device, dtype=torch.float64)
    compile_and_check_ops(
        rank_models, (x, classes, y), backend, ("pairwise_corr_distance", "spearman", "parc_spearman")
    )


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("triu", [False, True], ids=["full", "triu"])
def test_distance_gradient_matches_autograd_of_the_reference(backend, triu):
    device = backend_device(backend)
    x = features(2, 7, 5, seed=17, device=device).requires_grad_(True)
    weights = torch.randn(2, 21 if triu else 49, generator=torch.Generator().manual_seed(18), dtype=torch.float64)
    weights = weights.to(device).reshape((2, 21) if triu else (2, 7, 7))
    (pykernels.pairwise_corr_distance(x, triu=triu, backend=backend) * weights).sum().backward()
    xr = x.detach().cpu().clone().requires_grad_(True)
    (ref.pairwise_corr_distance(xr, triu=triu) * weights.cpu()).sum().backward()
    torch.testing.assert_close(x.grad.cpu(), xr.grad, atol=1e-12, rtol=0)
    if backend == "triton" and device == "cpu":
        return  # the backward is the same plain-PyTorch code; finite differences are slow interpreted
    assert torch.autograd.gradcheck(
        lambda t: pykernels.pairwise_corr_distance(t, triu=triu, backend=backend),
        (x.detach().clone().requires_grad_(True),),
    )


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in backend_params() if b.id == "cpu"])
def test_spearman_ranks_exactly_past_float32_precision(backend, scipy_stats):
    """M = 2^24 + 3 values with heavy ties: scipy (float64 average ranks) agrees to 1e-12."""
    m = 2**24 + 3
    g = torch.Generator().manual_seed(19)
    x = torch.randint(0, 5000, (1, m), generator=g).double()
    y = x + torch.randint(0, 3000, (1, m), generator=g).double()
    got = pykernels.spearman(x, y, backend=backend)
    expect = scipy_stats.spearmanr(x[0].numpy(), y[0].numpy())[0]
    assert abs(got.item() - expect) < 1e-12
