"""Row gathers and scatters: GET_ROWS and SET_ROWS."""

from __future__ import annotations

from ..ggml import Op
from . import op


@op(Op.GET_ROWS)
def get_rows(ctx):
    """dst row (i10, i11, i12) = src0 row (src1[i12, i11, i10], i11, i12)."""
    xp = ctx.xp
    src, idx_view, dst = ctx.src(0), ctx.src(1), ctx.dst
    idx = ctx.raw(idx_view)[0].astype(xp.int64)  # (ne12, ne11, ne10)
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= src.ne[1]):
        ctx.fail(f"GET_ROWS index out of range [0, {src.ne[1]})")
    n12, n11, _ = idx.shape
    i12 = xp.arange(n12).reshape(n12, 1, 1) % src.ne[3]
    i11 = xp.arange(n11).reshape(1, n11, 1) % src.ne[2]
    if src.type.is_quantized:
        # gather the named rows' blocks, then widen only those (never the whole table)
        blocks = ctx.blocks(src)[i12, i11, idx]
        rows = ctx.lib.dequantize(blocks.reshape(-1, blocks.shape[-1]), src.type.value)
        ctx.store(rows.reshape(dst.shape))
        return
    rows = ctx.raw(src)[i12, i11, idx]  # (ne12, ne11, ne10, ne00) in the storage dtype
    if src.type.value != dst.type.value:
        rows = ctx.widen(rows, src.type.value)
    ctx.store(rows.reshape(dst.shape))


@op(Op.SET_ROWS)
def set_rows(ctx):
    """dst row (src1[i02 % ne12 .., i01], i02, i03) = src0 row (i01, i02, i03), written in place.

    src1 (I64 or I32 row indices, shape ne10 x ne11 x ne12) broadcasts over src0's dims 2 and 3;
    the rows of dst that no index names keep their contents (this is how the KV cache is filled).
    """
    xp = ctx.xp
    src, idx_view, dst = ctx.src(0), ctx.src(1), ctx.dst
    same_plain = src.type.value == dst.type.value and not src.type.is_quantized
    values = ctx.raw(src) if same_plain else ctx.f32(src)  # (ne03, ne02, ne01, ne00)
    idx = ctx.raw(idx_view)[0].astype(xp.int64)  # (ne12, ne11, ne10)
    n03, n02, n01, _ = values.shape
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= dst.ne[1]):
        ctx.fail(f"SET_ROWS index out of range [0, {dst.ne[1]})")
    for i03 in range(n03):
        for i02 in range(n02):
            rows = idx[i03 % idx.shape[0], i02 % idx.shape[1], :n01]
            ctx.store(values[i03, i02], dst, index=(i03, i02, rows))
