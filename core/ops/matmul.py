"""MUL_MAT: dst = src1 x src0^T over rows, with ggml's batch broadcasting.

ggml's convention: src0 is (ne00=K, ne01=M) -- typically the weights --, src1
is (K, N), dst is (M, N). Batch dims 2 and 3 of src0 are *repeated* (not
tiled) to match src1: batch i2 of src1 uses batch i2 // (ne12/ne02) of src0,
which is how grouped-query attention shares K/V heads.

A 2-D weight that is not F32 is widened a tile of rows at a time, never whole
(:func:`mul_mat_tiled`); batched non-F32 sources (an F16 KV cache seen through
a view) are read in place by the device's kernel (``ArrayLib.batched_product``)
where it has one, else widened for this op only, as far as the view reaches.
"""

from __future__ import annotations

from ..ggml import GGMLType, Op
from . import op


def matmul_broadcast(xp, a, b):
    """a: (A3, A2, M, K), b: (B3, B2, N, K) -> (B3, B2, N, M).

    Batch (i3, i2) of ``b`` uses batch (i3 // r3, i2 // r2) of ``a``. Rather than repeating
    ``a`` (for grouped-query attention that copies the whole K/V cache per head), the rows of
    the ``r3 * r2`` batches of ``b`` that share one batch of ``a`` are stacked and multiplied
    in one product.
    """
    if a.shape[0] == 1 and a.shape[1] == 1:
        k = a.shape[-1]
        out = b.reshape(-1, k) @ a[0, 0].T
        return out.reshape(b.shape[:3] + (a.shape[2],))
    a3, a2, m, k = a.shape
    b3, b2, n, _ = b.shape
    r3, r2 = b3 // a3, b2 // a2
    if r3 == 1 and r2 == 1:
        return xp.matmul(b, xp.swapaxes(a, -1, -2))
    # (A3, r3, A2, r2, N, K) -> (A3, A2, r3, r2, N, K): the batches sharing a[i3, i2] together
    g = xp.swapaxes(b.reshape(a3, r3, a2, r2, n, k), 1, 2).reshape(a3, a2, r3 * r2 * n, k)
    out = xp.matmul(g, xp.swapaxes(a, -1, -2))  # (A3, A2, r3*r2*N, M)
    out = xp.swapaxes(out.reshape(a3, a2, r3, r2, n, m), 1, 2)
    return out.reshape(b3, b2, n, m)


def mul_mat_tiled(ctx, w, b):
    """``b @ w^T`` for a 2-D weight ``w`` in its own type.

    b: float32 (..., N, K) -> (..., N, M). The device's kernel (``ArrayLib.weight_product``)
    when it has one for the case, else ``w`` widened a tile of rows at a time: only one tile
    of float32 weights exists at once, within the device's scratch budget
    (rpcserver.device_state).
    """
    xp = ctx.xp
    out = ctx.lib.weight_product(ctx, w, b)
    if out is not None:
        return out
    flat = b.reshape(-1, w.ne[0])
    parts = [flat @ xp.swapaxes(tile, 0, 1) for _, _, tile in ctx.row_tiles(w)]
    out = parts[0] if len(parts) == 1 else xp.concatenate(parts, axis=1)
    return out.reshape(tuple(b.shape[:-1]) + (w.ne[1],))


@op(Op.MUL_MAT)
def mul_mat(ctx):
    w = ctx.src(0)
    b = ctx.f32(ctx.src(1))
    if w.ne[2] == 1 and w.ne[3] == 1:
        if w.type.value != GGMLType.F32:
            ctx.store(mul_mat_tiled(ctx, w, b))  # a weight matrix: never widened whole
            return
        out = ctx.lib.weight_product(ctx, w, b)  # a device's own F32 kernel, if it has one
        if out is not None:
            ctx.store(out)
            return
    out = ctx.lib.batched_product(ctx, w, b)  # a device's kernel reading the cache in place
    ctx.store(matmul_broadcast(ctx.xp, ctx.f32(w), b) if out is None else out)
