"""MUL_MAT: dst = src1 x src0^T over rows, with ggml's batch broadcasting.

ggml's convention: src0 is (ne00=K, ne01=M) -- typically the weights --, src1
is (K, N), dst is (M, N). Batch dims 2 and 3 of src0 are *repeated* (not
tiled) to match src1: batch i2 of src1 uses batch i2 // (ne12/ne02) of src0,
which is how grouped-query attention shares K/V heads.
"""

from __future__ import annotations

from ..ggml import Op
from . import op


def matmul_broadcast(xp, a, b):
    """a: (A3, A2, M, K), b: (B3, B2, N, K) -> (B3, B2, N, M)."""
    if a.shape[0] == 1 and a.shape[1] == 1:
        k = a.shape[-1]
        out = b.reshape(-1, k) @ a[0, 0].T
        return out.reshape(b.shape[:3] + (a.shape[2],))
    r3, r2 = b.shape[0] // a.shape[0], b.shape[1] // a.shape[1]
    if r2 > 1:
        a = xp.repeat(a, r2, axis=1)
    if r3 > 1:
        a = xp.repeat(a, r3, axis=0)
    return xp.matmul(b, xp.swapaxes(a, -1, -2))


@op(Op.MUL_MAT)
def mul_mat(ctx):
    a = ctx.f32(ctx.src(0))
    b = ctx.f32(ctx.src(1))
    ctx.store(matmul_broadcast(ctx.xp, a, b))
