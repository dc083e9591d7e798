"""The Triton kernels' offset arithmetic past 2^31 (pykernels/triton/_index.py), under the
interpreter: buffers that large do not fit a CI machine, the arithmetic does. Arguments below
2^31 arrive as int32, as on a GPU, so an int32 product would wrap here too."""

import pytest
import torch

triton = pytest.importorskip("triton")
tl = triton.language

from pykernels.triton._index import block_range, triu_offset, triu_pairs  # noqa: E402


@triton.jit
def _offsets_kernel(out_ptr, block, b, i, j, n, stride, BLOCK: tl.constexpr):
    tl.store(out_ptr + tl.arange(0, BLOCK), block_range(block, BLOCK))
    tl.store(out_ptr + BLOCK, triu_pairs(n))
    tl.store(out_ptr + BLOCK + 1, triu_offset(b, i, j, n))
    tl.store(out_ptr + BLOCK + 2 + tl.arange(0, BLOCK), block_range(block, BLOCK) * stride)


def _offsets(block, b, i, j, n, stride, BLOCK=4):
    out = torch.zeros(2 * BLOCK + 2, dtype=torch.int64)
    _offsets_kernel[(1,)](out, block, b, i, j, n, stride, BLOCK=BLOCK)
    return out.tolist()


@pytest.mark.parametrize("n", [46_342, 65_536 + 7])  # B >= 2 and n (n - 1) / 2 * 2 >= 2^31
def test_offsets_past_two_to_the_31(n):
    BLOCK = 4
    block = 2**31 // BLOCK + 3  # the first index of the block is past 2^31
    stride = 3
    b, i, j = 1, n - 2, n - 1
    out = _offsets(block, b, i, j, n, stride, BLOCK)
    first = block * BLOCK
    assert out[:BLOCK] == list(range(first, first + BLOCK))
    pairs = n * (n - 1) // 2
    assert out[BLOCK] == pairs
    assert out[BLOCK + 1] == b * pairs + i * (2 * n - i - 1) // 2 + (j - i - 1) == 2 * pairs - 1
    assert out[BLOCK + 2 :] == [(first + k) * stride for k in range(BLOCK)]


def test_block_range_of_a_large_grid_times_a_row_stride():
    # row * stride for row < 2^31 and a stride past 1: the products of energy / logsumexp_hvp
    # (N * K >= 2^31) and of probe scoring (B * T * K >= 2^31).
    out = _offsets(block=1000, b=0, i=0, j=1, n=2, stride=2**22 + 1)
    assert out[6:] == [(4000 + k) * (2**22 + 1) for k in range(4)]
