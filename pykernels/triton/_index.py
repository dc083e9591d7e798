"""Index arithmetic shared by the Triton kernels, in 64 bits.

Triton types a program id and an int argument below 2^31 as int32, so a product such as
row * stride or b * N * (N - 1) / 2 wraps silently once it reaches 2^31. Every offset that
can pass 2^31 is built from these helpers (tested past 2^31 in tests/test_triton_index.py).
"""

import triton
import triton.language as tl


@triton.jit
def block_range(block, BLOCK: tl.constexpr):
    """int64 indices block * BLOCK + [0, BLOCK): the elements of block number `block`."""
    return block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)


@triton.jit
def triu_pairs(n):
    """n (n - 1) / 2 in int64: the strict upper triangle of an n x n matrix."""
    n64 = n.to(tl.int64)
    return n64 * (n64 - 1) // 2


@triton.jit
def triu_offset(b, i, j, n):
    """Position of pair (i, j), i < j, of model b in a [batch, n (n - 1) / 2] row-major
    strict upper triangle, in int64 (i, j may be blocks)."""
    n64 = n.to(tl.int64)
    i64 = i.to(tl.int64)
    return b.to(tl.int64) * triu_pairs(n) + i64 * (2 * n64 - i64 - 1) // 2 + (j.to(tl.int64) - i64 - 1)
