"""The CPU device's own implementations of the small ops every layer runs (``op_overrides``).

Each takes the common case -- float32 rows, no ALiBi, no sinks -- to one kernel of
:mod:`.kernels.rowops` and returns True; any other case, or a kernel that is still being
compiled, returns False and the shared implementation (:mod:`rpcserver.ops`) computes the
node, with its checks and error messages. They read and write the buffers in place through
the executor's views (``NodeContext.raw``), so a node allocates nothing but what the shared
code would.
"""

from __future__ import annotations

import numpy as np

from rpcserver.api import GGMLType, GluOp, Op, rope_tables

from .kernels import rowops
from .kernels.launch import launch

_F32, _F16 = int(GGMLType.F32), int(GGMLType.F16)
_INDEX_TYPES = (int(GGMLType.I32), int(GGMLType.I64))
_BINARY_KIND = {int(Op.ADD): rowops.BINARY_ADD, int(Op.SUB): rowops.BINARY_SUB,
                int(Op.MUL): rowops.BINARY_MUL, int(Op.DIV): rowops.BINARY_DIV}


def _f32_rows(ctx, tv):
    """The float32 elements of ``tv`` in place, (ne3, ne2, ne1, ne0); None if it is not F32
    or has no memory."""
    if tv is None or tv.type.value != _F32 or tv.buffer is None:
        return None
    return ctx.raw(tv)


def _run(ctx, kernel, kind, *arrays) -> bool:
    return launch(kernel, kind, *arrays, wait=ctx.lib.wait)


def _divides(small, big) -> bool:
    return all(s > 0 and b % s == 0 for s, b in zip(small, big))


def _eps(ctx):
    return np.array([ctx.param_f32(0)], np.float32)


def rms_norm(ctx) -> bool:
    x, out = _f32_rows(ctx, ctx.src(0)), _f32_rows(ctx, ctx.dst)
    if x is None or out is None or x.shape != out.shape:
        return False
    return _run(ctx, rowops.rms_norm_rows, None, x, out, ctx.prepared(_eps))


_NO_MASK = np.zeros((1, 1, 1, 1), np.float32)


def _soft_max_params(ctx):
    """[scale, has_mask], or None when the node needs the shared code (ALiBi, sinks, a mask
    the kernel cannot read)."""
    if ctx.param_f32(1) != 0.0 or ctx.has_src(2):
        return None
    src = ctx.src(0)
    has_mask = ctx.has_src(1)
    if has_mask:
        m = ctx.src(1)
        if (m.type.value not in (_F32, _F16) or m.buffer is None or m.ne[0] != src.ne[0]
                or m.ne[1] < src.ne[1] or not _divides(m.ne[2:4], src.ne[2:4])):
            return None
    return np.array([ctx.param_f32(0), 1.0 if has_mask else 0.0], np.float32)


def soft_max(ctx) -> bool:
    x, out = _f32_rows(ctx, ctx.src(0)), _f32_rows(ctx, ctx.dst)
    params = ctx.prepared(_soft_max_params)
    if x is None or out is None or params is None or x.shape != out.shape:
        return False
    mask = ctx.f32(ctx.src(1)) if params[1] else _NO_MASK
    return _run(ctx, rowops.soft_max_rows, None, x, mask, out, params)


def _rope_pairs(ctx):
    """[start, step] of the first and of the second channel of ROPE's pairs."""
    t = rope_tables(ctx)
    return np.array([t.first.start, t.first.step or 1, t.second.start, t.second.step or 1],
                    np.int64)


def rope(ctx) -> bool:
    x, out = _f32_rows(ctx, ctx.src(0)), _f32_rows(ctx, ctx.dst)
    if x is None or out is None or x.shape != out.shape:
        return False
    t = rope_tables(ctx)
    pairs = ctx.prepared(_rope_pairs)
    return _run(ctx, rowops.rope_rows, None, x, t.cos, t.sin, out, pairs)


def glu(ctx) -> bool:
    if ctx.param_i32(0) != GluOp.SWIGLU:
        return False
    a, out = _f32_rows(ctx, ctx.src(0)), _f32_rows(ctx, ctx.dst)
    if a is None or out is None:
        return False
    if ctx.has_src(1):
        x, g = a, _f32_rows(ctx, ctx.src(1))
        if g is None:
            return False
    else:
        n = ctx.dst.ne[0]
        x, g = a[..., :n], a[..., n:2 * n]
        if ctx.param_i32(1):
            x, g = g, x
    if x.shape != out.shape or g.shape != out.shape:
        return False
    return _run(ctx, rowops.swiglu_rows, None, x, g, out)


def binary(ctx) -> bool:
    a, b, out = (_f32_rows(ctx, tv) for tv in (ctx.src(0), ctx.src(1), ctx.dst))
    if a is None or b is None or out is None or a.shape != out.shape:
        return False
    if not _divides(b.shape, a.shape):
        return False
    return _run(ctx, rowops.binary_rows, _BINARY_KIND[ctx.node.op], a, b, out)


def set_rows(ctx) -> bool:
    src, idx_view, dst = ctx.src(0), ctx.src(1), ctx.dst
    values = _f32_rows(ctx, src)
    if (values is None or dst.buffer is None or dst.type.value not in (_F32, _F16)
            or idx_view.type.value not in _INDEX_TYPES or idx_view.buffer is None):
        return False
    idx = ctx.raw(idx_view)[0]  # (ne12, ne11, ne10)
    rows = ctx.raw(dst)
    if dst.type.value == _F16:
        rows = rows.view(np.uint16)
    n3, n2, n1, n0 = values.shape
    if (rows.shape[0] < n3 or rows.shape[1] < n2 or rows.shape[3] != n0 or idx.shape[2] < n1
            or 0 in idx.shape):
        return False
    status = np.zeros(1, np.int64)
    if not _run(ctx, rowops.set_rows_f32, dst.type.value, values, idx, rows, status):
        return False
    if status[0]:
        ctx.fail(f"SET_ROWS index out of range [0, {dst.ne[1]})")
    return True


#: op -> the CPU device's implementation, tried before the shared one (see the module doc)
OVERRIDES = {
    int(Op.RMS_NORM): rms_norm,
    int(Op.SOFT_MAX): soft_max,
    int(Op.ROPE): rope,
    int(Op.GLU): glu,
    int(Op.SET_ROWS): set_rows,
    **{op: binary for op in _BINARY_KIND},
}
