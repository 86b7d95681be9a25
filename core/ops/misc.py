"""Assorted ops: sorting and selection, tiling and concatenation, generators, masks, padding,
small reductions and resampling.

Semantics follow ggml's CPU backend (ggml-cpu/ops.cpp); the points where it is
not what one would guess:

* ARGSORT sorts each row with ``std::sort``; ties keep index order here (what
  libstdc++'s insertion sort does for rows of up to 16 elements -- longer rows
  with ties have no specified order in ggml either).
* TOP_K returns the k largest indices in descending order of value, *then
  swaps the first two* (ggml does so to stress that the order is not part of
  the contract). Tensors are I32.
* ARGSORT, TOP_K and LEAKY_RELU address row ``i`` at ``i * nb[1]`` (the rows of
  all dims 1..3 taken as one list), as ggml does.
* ARGMAX returns the LAST index of the maximum.
* COUNT_EQUAL reproduces ggml's row enumeration, which is only right for
  tensors with ``ne[2] == ne[3] == 1`` (or a few other shapes); shapes where it
  would read outside the tensor fail.
* FILL does not read its source; ARANGE has none.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..executor import storage_dtype
from ..ggml import GGMLType, Op
from . import op
from .elementwise import _as_bytes

# enum ggml_sort_order / ggml_tri_type / ggml_scale_mode
SORT_ASC, SORT_DESC = 0, 1
TRI_UPPER_DIAG, TRI_UPPER, TRI_LOWER_DIAG, TRI_LOWER = 0, 1, 2, 3
SCALE_NEAREST, SCALE_BILINEAR, SCALE_BICUBIC = 0, 1, 2
SCALE_FLAG_ALIGN_CORNERS, SCALE_FLAG_ANTIALIAS = 1 << 8, 1 << 9


# --------------------------------------------------------------------------- helpers


def _values(ctx, tv, like=None):
    """Elements in their storage dtype when ``like`` (default: dst) has the same plain type
    (an exact copy, integers included), else as float32."""
    like = like or ctx.dst
    if tv.type.value == like.type.value and not tv.type.is_quantized:
        return ctx.raw(tv)
    return ctx.f32(tv)


def _extent(tv) -> int:
    """Bytes from the first element to just past the last one, for a non-empty view."""
    return sum((n - 1) * b for n, b in zip(tv.ne, tv.nb)) + tv.type.row_size(tv.type.block_size)


def _row_list(ctx, tv):
    """``tv`` seen as ggml's row-enumerating ops see it: row ``i`` (over dims 1..3) at ``i*nb[1]``.

    Identical to the tensor itself when its rows are evenly spaced; for other
    layouts this is the memory ggml really touches (refused if it lies outside the view).
    """
    ne, nb = tv.ne, tv.nb
    nr = ne[1] * ne[2] * ne[3]
    rows = replace(tv, ne=(ne[0], nr, 1, 1), nb=(nb[0], nb[1], nb[1] * nr, nb[1] * nr))
    even = (ne[2] == 1 or nb[2] == nb[1] * ne[1]) and (ne[3] == 1 or nb[3] == nb[2] * ne[2])
    if not even and nr and ne[0] and _extent(rows) > _extent(tv):
        ctx.fail("rows of this layout would be read outside the tensor")
    return rows


def _stable_argsort(xp, x):
    try:
        return xp.argsort(x, axis=-1, kind="stable")
    except (TypeError, NotImplementedError, ValueError):  # libraries whose sort is always stable
        return xp.argsort(x, axis=-1)


def _argsort_desc(xp, x):
    """Indices sorting each row by decreasing value, ties in increasing index order."""
    return _stable_argsort(xp, -x)


def _param_f32s(ctx, n):
    return [ctx.param_f32(i) for i in range(n)]


# --------------------------------------------------------------------------- sorting and selection


@op(Op.ARGSORT)
def argsort(ctx):
    xp = ctx.xp
    src, dst = ctx.src(0), ctx.dst
    order = ctx.param_i32(0)
    if order not in (SORT_ASC, SORT_DESC):
        ctx.fail(f"invalid sort order {order}")
    x = ctx.f32(_row_list(ctx, src))[0, 0]  # (rows, ne0)
    idx = _stable_argsort(xp, x) if order == SORT_ASC else _argsort_desc(xp, x)
    ctx.store(idx.astype(xp.int32)[None, None], _row_list(ctx, dst))


@op(Op.TOP_K)
def top_k(ctx):
    xp = ctx.xp
    src, dst = ctx.src(0), ctx.dst
    k, n = dst.ne[0], src.ne[0]
    if k > n or dst.ne[1:] != src.ne[1:]:
        ctx.fail("TOP_K shapes do not agree")
    x = ctx.f32(_row_list(ctx, src))[0, 0]  # (rows, n)
    if 0 < k and 4 * k < n:
        # the k largest (unordered), then ordered by value, ties by index
        cand = xp.sort(xp.argpartition(-x, k - 1, axis=-1)[:, :k], axis=-1)
        vals = xp.take_along_axis(x, cand, axis=-1)
        idx = xp.take_along_axis(cand, _argsort_desc(xp, vals), axis=-1)
    else:
        idx = _argsort_desc(xp, x)[:, :k]
    if k > 1:
        idx = xp.concatenate([idx[:, 1:2], idx[:, 0:1], idx[:, 2:]], axis=-1)
    ctx.store(idx.astype(xp.int32)[None, None], _row_list(ctx, dst))


@op(Op.ARGMAX)
def argmax(ctx):
    """I32 [ne1]: per row, the last index holding the row's maximum."""
    xp = ctx.xp
    src = ctx.src(0)
    x = ctx.f32(src)[0, 0]  # (ne1, ne0); ggml only takes matrices
    n = x.shape[-1]
    last = (n - 1) - xp.argmax(x[:, ::-1], axis=-1)
    ctx.store(last.astype(xp.int32).reshape(ctx.dst.shape))


@op(Op.COUNT_EQUAL)
def count_equal(ctx):
    xp = ctx.xp
    a_v, b_v = ctx.src(0), ctx.src(1)
    if a_v.ne != b_v.ne:
        ctx.fail("COUNT_EQUAL needs sources of the same shape")
    ne00, ne01, ne02, ne03 = a_v.ne
    # ggml's enumeration of the rows (faithful, including its index arithmetic)
    ir = np.arange(ne01 * ne02 * ne03, dtype=np.int64)
    i03 = ir // max(ne02 * ne01, 1)
    i02 = (ir - i03 * ne03) // max(ne01, 1)
    i01 = ir - i03 * ne03 - i02 * ne02
    if ir.size and ((i01 < 0) | (i01 >= ne01) | (i02 < 0) | (i02 >= ne02) | (i03 >= ne03)).any():
        ctx.fail("ggml's COUNT_EQUAL would read outside the tensor for this shape")
    a, b = ctx.raw(a_v), ctx.raw(b_v)
    sel = tuple(ctx.lib.from_numpy(i) for i in (i03, i02, i01))
    total = xp.sum(a[sel] == b[sel], dtype=xp.int64)
    ctx.store(total.reshape(1, 1, 1, 1))


# --------------------------------------------------------------------------- tiling and joining


@op(Op.REPEAT)
def repeat(ctx):
    xp = ctx.xp
    src, dst = ctx.src(0), ctx.dst
    if dst.ne.count(0):
        return
    if any(s == 0 or d % s for s, d in zip(src.ne, dst.ne)):
        ctx.fail("REPEAT: the destination shape is not a multiple of the source shape")
    x = _values(ctx, src)
    reps = tuple(d // s for s, d in zip(src.shape, dst.shape))
    ctx.store(xp.tile(x, reps) if any(r > 1 for r in reps) else x)


@op(Op.CONCAT)
def concat(ctx):
    xp = ctx.xp
    a_v, b_v, dst = ctx.src(0), ctx.src(1), ctx.dst
    dim = ctx.param_i32(0)
    if not 0 <= dim < 4:
        ctx.fail(f"CONCAT dim {dim} out of range")
    axis = 3 - dim
    if a_v.type.value != dst.type.value or b_v.type.value != dst.type.value:
        ctx.fail("CONCAT needs sources of the destination's type")
    if storage_dtype(dst.type.value) is not None:
        ctx.store(xp.concatenate([ctx.raw(a_v), ctx.raw(b_v)], axis=axis))
        return
    # quantized: whole blocks are copied, byte for byte (dim 0 joins rows of blocks)
    joined = xp.concatenate([ctx.raw(_as_bytes(a_v)), ctx.raw(_as_bytes(b_v))], axis=axis)
    ctx.store(joined, _as_bytes(dst))


# --------------------------------------------------------------------------- generators


@op(Op.FILL)
def fill(ctx):
    ctx.store(ctx.xp.asarray(ctx.param_f32(0), dtype=ctx.xp.float32))


@op(Op.ARANGE)
def arange(ctx):
    xp = ctx.xp
    start, stop, step = (np.float32(v) for v in _param_f32s(ctx, 3))
    with np.errstate(all="ignore"):
        steps = float(np.ceil((stop - start) / step))
    n = ctx.dst.ne[0] * ctx.dst.ne[1] * ctx.dst.ne[2] * ctx.dst.ne[3]
    if steps != n:
        ctx.fail(f"ARANGE({start}, {stop}, {step}) has {steps} steps, the tensor {n} elements")
    # start + step*i with a single rounding, as ggml's build computes it (a fused multiply-add):
    # the product is exact in float64 (24-bit mantissa times an integer below 2**24)
    i = np.arange(n, dtype=np.float64)
    values = (np.float64(step) * i + np.float64(start)).astype(np.float32)
    ctx.store(ctx.lib.from_numpy(values.reshape(ctx.dst.shape)))


@op(Op.TIMESTEP_EMBEDDING)
def timestep_embedding(ctx):
    """dst row i = [cos(t_i f_j) for j < half] + [sin(t_i f_j) for j < half] (+ [0] if dim is odd)."""
    xp = ctx.xp
    dim, max_period = ctx.param_i32(0), ctx.param_i32(1)
    t = ctx.f32(ctx.src(0))[0, 0, 0]  # (n,)
    dst = ctx.dst
    half = dim // 2
    if dst.ne[0] < dim or dst.ne[1] != t.shape[0]:
        ctx.fail("TIMESTEP_EMBEDDING shapes do not agree")
    j = xp.arange(half, dtype=xp.float32)
    freq = xp.exp(j * -np.log(np.float32(max_period)) / np.float32(max(half, 1)))
    arg = t[:, None] * freq[None, :]
    parts = [xp.cos(arg), xp.sin(arg)]
    if dim % 2:
        parts.append(xp.zeros((t.shape[0], 1), dtype=xp.float32))
    emb = xp.concatenate(parts, axis=-1)
    if dst.ne[0] == dim:
        ctx.store(emb.reshape(dst.shape))
    else:  # any extra columns are left as they are, as ggml does
        ctx.store(emb.reshape(1, 1, t.shape[0], dim), replace(dst, ne=(dim,) + dst.ne[1:]))


# --------------------------------------------------------------------------- element-wise and masks


@op(Op.CUMSUM)
def cumsum(ctx):
    ctx.store(ctx.xp.cumsum(ctx.f32(ctx.src(0)), axis=-1, dtype=ctx.xp.float32))


@op(Op.TRI)
def tri(ctx):
    xp = ctx.xp
    kind = ctx.param_i32(0)
    x = ctx.f32(ctx.src(0))
    i0 = xp.arange(x.shape[3]).reshape(1, -1)
    i1 = xp.arange(x.shape[2]).reshape(-1, 1)
    keep = {TRI_LOWER: i0 < i1, TRI_LOWER_DIAG: i0 <= i1,
            TRI_UPPER: i0 > i1, TRI_UPPER_DIAG: i0 >= i1}.get(kind)
    if keep is None:
        ctx.fail(f"invalid TRI type {kind}")
    ctx.store(xp.where(keep, x, np.float32(0.0)))


@op(Op.LEAKY_RELU)
def leaky_relu(ctx):
    xp = ctx.xp
    slope = np.float32(ctx.param_f32(0))
    x = ctx.f32(_row_list(ctx, ctx.src(0)))
    zero = np.float32(0.0)
    y = xp.where(x > 0, x, zero) + xp.where(x < 0, x, zero) * slope
    ctx.store(y, _row_list(ctx, ctx.dst))


@op(Op.DIAG_MASK_INF, Op.DIAG_MASK_ZERO)
def diag_mask(ctx):
    xp = ctx.xp
    n_past = ctx.param_i32(0)
    if n_past < 0:
        ctx.fail("n_past must not be negative")
    x = ctx.f32(ctx.src(0))
    value = -np.inf if ctx.node.op == Op.DIAG_MASK_INF else 0.0
    col = xp.arange(x.shape[3]).reshape(1, -1)
    row = xp.arange(x.shape[2]).reshape(-1, 1)
    ctx.store(xp.where(col > row + n_past, np.float32(value), x))


@op(Op.GROUP_NORM)
def group_norm(ctx):
    """Normalise groups of channels (dim 2) over (ne0, ne1, channels of the group), per dim-3 index."""
    xp = ctx.xp
    n_groups, eps = ctx.param_i32(0), np.float32(ctx.param_f32(1))
    x = ctx.f32(ctx.src(0))  # (ne3, C, ne1, ne0)
    n_ch = x.shape[1]
    if n_groups <= 0:
        ctx.fail(f"invalid group count {n_groups}")
    per = (n_ch + n_groups - 1) // n_groups
    group_of = np.arange(n_ch) // per  # the groups that exist, in order
    n_real = int(group_of.max()) + 1 if n_ch else 0
    onehot = ctx.lib.from_numpy((group_of[:, None] == np.arange(n_real)[None, :]).astype(np.float64))
    count = ctx.lib.from_numpy((np.bincount(group_of, minlength=n_real) * x.shape[2] * x.shape[3])
                               .astype(np.float64))
    ch_sum = xp.sum(x.astype(xp.float64), axis=(2, 3))  # (ne3, C)
    mean = ((ch_sum @ onehot) / count).astype(xp.float32)  # (ne3, G)
    group_of_d = ctx.lib.from_numpy(group_of)
    centered = x - xp.take(mean, group_of_d, axis=1)[:, :, None, None]
    sq = xp.sum((centered * centered).astype(xp.float64), axis=(2, 3))
    var = ((sq @ onehot) / count).astype(xp.float32)
    scale = 1.0 / xp.sqrt(var + eps)
    ctx.store(centered * xp.take(scale, group_of_d, axis=1)[:, :, None, None])


# --------------------------------------------------------------------------- writes into a copy


def _strided_targets(ctx, src1, params_dst):
    """Flat element indices of dst that ACC/SET address: offset + i1*nb1 + i2*nb2 + i3*nb3 (bytes)."""
    nb1, nb2, nb3, offset = (ctx.param_i32(i) for i in range(4))
    es = params_dst.type.type_size
    if params_dst.type.is_quantized or any(v % es for v in (nb1, nb2, nb3, offset)):
        ctx.fail("ACC/SET strides must be whole elements of a plain type")
    ne10, ne11, ne12, ne13 = src1.ne
    idx = (offset // es
           + np.arange(ne13).reshape(-1, 1, 1, 1) * (nb3 // es)
           + np.arange(ne12).reshape(1, -1, 1, 1) * (nb2 // es)
           + np.arange(ne11).reshape(1, 1, -1, 1) * (nb1 // es)
           + np.arange(ne10).reshape(1, 1, 1, -1))
    n = params_dst.ne[0] * params_dst.ne[1] * params_dst.ne[2] * params_dst.ne[3]
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
        ctx.fail("ACC/SET writes outside the destination")
    return ctx.lib.from_numpy(idx.reshape(-1))


def _flat(tv):
    n = tv.ne[0] * tv.ne[1] * tv.ne[2] * tv.ne[3]
    es = tv.type.type_size
    return replace(tv, ne=(n, 1, 1, 1), nb=(es, es * n, es * n, es * n))


@op(Op.ACC, Op.SET)
def acc_set(ctx):
    """dst = src0, then src1 added (ACC) or written (SET) at the byte strides/offset in op_params."""
    xp = ctx.xp
    a_v, b_v, dst = ctx.src(0), ctx.src(1), ctx.dst
    if a_v.ne != dst.ne:
        ctx.fail("ACC/SET needs src0 and dst of the same shape")
    is_acc = ctx.node.op == Op.ACC
    if is_acc and not (a_v.type.value == b_v.type.value == dst.type.value == GGMLType.F32):
        ctx.fail("ACC is defined for F32 only")
    targets = _strided_targets(ctx, b_v, dst)
    base = _values(ctx, a_v).reshape(-1)
    base = xp.array(base, copy=True)
    vals = _values(ctx, b_v).reshape(-1)
    if is_acc:
        base[targets] = base[targets] + vals
    else:
        base[targets] = vals.astype(base.dtype)
    ctx.store(base.reshape(dst.shape))


@op(Op.GET_ROWS_BACK)
def get_rows_back(ctx):
    """dst (F32 [ne0, n_rows]) = zeros, then row ids[i] += src0 row i, in order."""
    xp = ctx.xp
    g_v, ids_v, dst = ctx.src(0), ctx.src(1), ctx.dst
    if ids_v.type.value != GGMLType.I32 or g_v.ne[0] != dst.ne[0]:
        ctx.fail("GET_ROWS_BACK shapes/types do not agree")
    ids = ctx.raw(ids_v).reshape(-1).astype(xp.int64)
    n = int(ids.shape[0])
    if n and (int(ids.min()) < 0 or int(ids.max()) >= dst.ne[1]):
        ctx.fail(f"GET_ROWS_BACK index out of range [0, {dst.ne[1]})")
    grads = ctx.f32(g_v).reshape(-1, g_v.ne[0])[:n]
    out = xp.zeros((dst.ne[1] * dst.ne[2] * dst.ne[3], dst.ne[0]), dtype=xp.float32)
    add_at = getattr(xp.add, "at", None)
    if add_at is not None:
        add_at(out, ids, grads)
    else:  # CuPy without ufunc.at
        import cupyx

        cupyx.scatter_add(out, ids, grads)
    ctx.store(out.reshape(dst.shape))


# --------------------------------------------------------------------------- padding and shifting


@op(Op.PAD)
def pad(ctx):
    """Zero padding (or, with op_params[8], wrap-around) by lp/rp elements per dim."""
    xp = ctx.xp
    src, dst = ctx.src(0), ctx.dst
    lp = [ctx.param_i32(2 * d) for d in range(4)]
    rp = [ctx.param_i32(2 * d + 1) for d in range(4)]
    circular = bool(ctx.param_i32(8))
    x = ctx.f32(src)
    out = x
    mask = None
    for d in range(4):
        axis, n_out, n_in = 3 - d, dst.ne[d], src.ne[d]
        i = np.arange(n_out)
        if circular:
            pos = (i - lp[d]) % n_in
        else:
            valid = (i >= lp[d]) & (i < n_out - rp[d])
            pos = np.clip(i - lp[d], 0, n_in - 1)
            shape = [1, 1, 1, 1]
            shape[axis] = n_out
            v = ctx.lib.from_numpy(valid.reshape(shape))
            mask = v if mask is None else (mask & v)
        if not (n_out == n_in and (pos == np.arange(n_in)).all()):
            out = xp.take(out, ctx.lib.from_numpy(pos), axis=axis)
    if mask is not None:
        out = xp.where(mask, out, np.float32(0.0))
    ctx.store(out)


@op(Op.ROLL)
def roll(ctx):
    shifts = tuple(ctx.param_i32(3 - a) for a in range(4))  # per array axis (ne3..ne0)
    x = _values(ctx, ctx.src(0))
    ctx.store(ctx.xp.roll(x, shifts, axis=(0, 1, 2, 3)))


# --------------------------------------------------------------------------- resampling


def _source_index_nearest(xp, n_out, sf):
    return (xp.arange(n_out, dtype=xp.float32) / np.float32(sf)).astype(xp.int64)


def _bilinear_axis(xp, n_out, n_in, sf, offset):
    """Lower/upper source index and the (clamped) weight of the upper one, along one axis."""
    pos = (xp.arange(n_out, dtype=xp.float32) + np.float32(offset)) / np.float32(sf) - np.float32(offset)
    lo = xp.floor(pos).astype(xp.int64)
    hi = lo + 1
    lo = xp.clip(lo, 0, n_in - 1)
    hi = xp.clip(hi, 0, n_in - 1)
    frac = xp.clip(pos - lo.astype(xp.float32), np.float32(0.0), np.float32(1.0))
    return lo, hi, frac


def _bicubic_weights(xp, t):
    a = np.float32(-0.75)

    def near(v):  # |v| <= 1
        return (v * (a + 2) - (a + 3)) * v * v + 1

    def far(v):  # 1 < |v| < 2
        return ((v * a - 5 * a) * v + 8 * a) * v - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


@op(Op.UPSCALE)
def upscale(ctx):
    xp = ctx.xp
    src, dst = ctx.src(0), ctx.dst
    flags = ctx.param_i32(0)
    mode = flags & 0xFF
    x = ctx.f32(src)  # (ne03, ne02, ne01, ne00)
    f32 = np.float32
    sf = [f32(dst.ne[d]) / f32(src.ne[d]) for d in range(4)]
    offset = 0.5
    if flags & SCALE_FLAG_ALIGN_CORNERS:
        offset = 0.0
        for d in (0, 1):
            if dst.ne[d] > 1 and src.ne[d] > 1:
                sf[d] = f32(dst.ne[d] - 1) / f32(src.ne[d] - 1)
    # dims 2 and 3 are always nearest
    x = xp.take(x, _source_index_nearest(xp, dst.ne[3], sf[3]), axis=0)
    x = xp.take(x, _source_index_nearest(xp, dst.ne[2], sf[2]), axis=1)
    if mode == SCALE_NEAREST:
        x = xp.take(x, _source_index_nearest(xp, dst.ne[1], sf[1]), axis=2)
        ctx.store(xp.take(x, _source_index_nearest(xp, dst.ne[0], sf[0]), axis=3))
    elif mode == SCALE_BILINEAR and not flags & SCALE_FLAG_ANTIALIAS:
        y0, y1, dy = _bilinear_axis(xp, dst.ne[1], src.ne[1], sf[1], offset)
        x0, x1, dx = _bilinear_axis(xp, dst.ne[0], src.ne[0], sf[0], offset)
        top, bot = xp.take(x, y0, axis=2), xp.take(x, y1, axis=2)
        a, b = xp.take(top, x0, axis=3), xp.take(top, x1, axis=3)
        c, d = xp.take(bot, x0, axis=3), xp.take(bot, x1, axis=3)
        dy = dy[:, None]
        one = 1.0
        ctx.store(a * (one - dx) * (one - dy) + b * dx * (one - dy)
                  + c * (one - dx) * dy + d * dx * dy)
    elif mode == SCALE_BICUBIC:
        def axis_taps(n_out, n_in, s):
            pos = (xp.arange(n_out, dtype=xp.float32) + np.float32(offset)) / np.float32(s) \
                - np.float32(offset)
            base = xp.floor(pos)
            t = pos - base
            base = base.astype(xp.int64)
            taps = [xp.clip(base + k, 0, n_in - 1) for k in (-1, 0, 1, 2)]
            return taps, _bicubic_weights(xp, t)

        ytaps, wy = axis_taps(dst.ne[1], src.ne[1], sf[1])
        xtaps, wx = axis_taps(dst.ne[0], src.ne[0], sf[0])
        out = None
        for yt, wyk in zip(ytaps, wy):
            rows = xp.take(x, yt, axis=2)
            acc = None
            for xt, wxk in zip(xtaps, wx):
                term = xp.take(rows, xt, axis=3) * wxk
                acc = term if acc is None else acc + term
            term = acc * wyk[:, None]
            out = term if out is None else out + term
        ctx.store(out)
    else:
        ctx.fail(f"UPSCALE mode {mode} (flags {flags:#x}) is not supported")
