"""Attention ops: SOFT_MAX (with mask, ALiBi and sinks) and FLASH_ATTN_EXT.

SOFT_MAX (ggml-cpu/ops.cpp, ggml_compute_forward_soft_max_f32), per row of
src0 ``[ne00, ne01, ne02 = heads, ne03]``::

    w = x*scale + slope[head]*mask[i01, i02 % ne12, i03 % ne13]
    m = max(max(w), sink[head])                 # sink only with src2
    y = exp(w - m) / (sum(exp(w - m)) + exp(sink[head] - m))

The mask (F16 or F32, optional) is read at row ``i01`` -- it may have more rows
than src0 -- and repeats over dims 2 and 3 (modulo). ``slope`` is 1 unless
``max_bias > 0`` (ALiBi: ``m0^(h+1)`` for the first ``n_head_log2`` heads,
``m1^(2(h - n_head_log2) + 1)`` after). The row sum is accumulated in double
and its reciprocal multiplies the exponentials, as ggml does. A row whose
every entry is -inf gives NaN, as in ggml (exp(-inf - -inf)); with a sink it
gives zeros.

FLASH_ATTN_EXT (ggml_compute_forward_flash_attn_ext_f16)::

    q    [DK, n_q,  H,   B]    F32
    k    [DK, n_kv, Hk,  B]    any type ggml can dot with (F32, F16, BF16, quantized)
    v    [DV, n_kv, Hv,  B]    any type ggml can convert to float
    mask [n_kv, n_q(+pad), Hm, Bm]  F16, optional; repeats over dims 2/3 (modulo)
    sinks [H]                  F32, optional (src4)
    dst  [DV, H, n_q, B]       F32 -- PERMUTED: heads before queries

with op_params scale, max_bias, logit_softcap (floats), precision ([3]) and
n_kv_max ([4], a sparsity hint ggml's CPU ignores, as does this).
Query head ``h`` reads K head ``h // (H/Hk)`` and V head ``h // (H/Hv)`` (the
same grouping as MUL_MAT's broadcast). Scores are ``s = q.k * scale``, or
with a softcap ``s = softcap * tanh(q.k * (scale/softcap))`` (ggml divides
the scale by the softcap first), then ``s += slope[h]*mask``. Keys whose scaled
mask is -inf are skipped entirely: their K/V values never enter the result,
so NaN/inf left in unused KV-cache cells cannot leak (ggml's scalar path
skips them the same way; its tiled path, F16/F32 K and V with >= 64 queries,
multiplies their zero weights into GEMMs and turns such garbage into NaN --
here a masked key never matters). A NaN/inf in an unmasked V entry poisons
that output element (NaN here; NaN or inf in ggml). A query row with every key masked yields
zeros (not NaN), sinks or not. The sink adds ``exp(sink[h] - m)`` to the
denominator only.

Precision: ggml's scalar path first converts each Q row to K's ``vec_dot``
type (F16 for F16 K, BF16 for BF16 K, Q8_0-style blocks for the 32-element
quantized types, Q8_K for k-quants) and dots that with K; its tiled path
(F32/F16 K and V of one type, at least 64 query rows) keeps Q in F32. Both are
reproduced. ggml's scalar path accumulates V·softmax in F16 when V is F16;
here accumulation is always F32 (more accurate; the difference is within
test-backend-ops' 5e-4 NMSE bound for FLASH_ATTN_EXT). All precisions are
accepted (F32 accumulation satisfies every request).
"""

from __future__ import annotations

import math

import numpy as np

from ..executor import bf16_to_f32, f32_to_bf16
from ..ggml import GGMLType, Op
from . import broadcast_like, op

_f32 = np.float32

#: elements of one score chunk (n_batch * n_head * rows * n_kv) before FLASH_ATTN_EXT splits rows
SCORE_CHUNK_ELEMENTS = 1 << 24


def alibi_params(n_head: int, max_bias: float):
    """(m0, m1, n_head_log2) as ggml derives the ALiBi slopes from max_bias (float32);
    (1, 1, 1) when there are no slopes (max_bias <= 0)."""
    if not max_bias > 0.0 or n_head <= 0:
        return _f32(1.0), _f32(1.0), 1
    n_head_log2 = 1 << int(math.floor(math.log2(n_head)))
    m0 = _f32(2.0) ** (-_f32(max_bias) / _f32(n_head_log2))
    m1 = _f32(2.0) ** (-(_f32(max_bias) / _f32(2.0)) / _f32(n_head_log2))
    return _f32(m0), _f32(m1), n_head_log2


def alibi_slopes(n_head: int, max_bias: float):
    """Per-head ALiBi slopes as ggml computes them (float32), or None when max_bias <= 0."""
    if not max_bias > 0.0:
        return None
    m0, m1, n_head_log2 = alibi_params(n_head, max_bias)
    h = np.arange(n_head)
    return np.where(h < n_head_log2,
                    m0 ** (h + 1).astype(np.float32),
                    m1 ** (2 * (h - n_head_log2) + 1).astype(np.float32)).astype(np.float32)


def _read_mask(ctx, view, rows: int, cols: int, shape):
    """The mask's first ``rows`` rows of ``cols`` values, (ne3, ne2, rows, cols) float32."""
    m = ctx.f32(view)
    if m.shape[3] < cols or m.shape[2] < rows:
        ctx.fail(f"mask {list(view.ne)} is smaller than [{cols}, {rows}]")
    if shape[0] % m.shape[0] or shape[1] % m.shape[1]:
        ctx.fail(f"mask dims 2/3 {view.ne[2]}, {view.ne[3]} do not divide {shape[1]}, {shape[0]}")
    return m[:, :, :rows, :cols]


def _expand_mask(xp, m, shape, slopes):
    """A mask read by _read_mask, repeated over dims 2/3 to ``shape`` and scaled by the slopes."""
    m = broadcast_like(xp, m, shape)
    if slopes is not None:
        m = xp.asarray(slopes).reshape(1, -1, 1, 1) * m
    return m


def _sinks(ctx, index: int, n_head: int):
    view = ctx.src(index)
    if view.type.value != GGMLType.F32:
        ctx.fail("sinks must be F32")
    s = ctx.f32(view).reshape(-1)
    if s.shape[0] < n_head:
        ctx.fail(f"{s.shape[0]} sinks for {n_head} heads")
    return s[:n_head].reshape(1, n_head, 1, 1)


# -- SOFT_MAX -------------------------------------------------------------------------


@op(Op.SOFT_MAX)
def soft_max(ctx):
    xp = ctx.xp
    src = ctx.src(0)
    x = ctx.f32(src)
    ne00, ne01, ne02, _ = src.ne
    scale, max_bias = ctx.param_f32(0), ctx.param_f32(1)
    w = x * _f32(scale)
    if ctx.has_src(1):
        mask = ctx.src(1)
        if mask.type.value not in (GGMLType.F16, GGMLType.F32):
            ctx.fail("SOFT_MAX mask must be F16 or F32")
        if mask.ne[0] != ne00:
            ctx.fail(f"SOFT_MAX mask rows have {mask.ne[0]} elements, not {ne00}")
        m = _read_mask(ctx, mask, ne01, ne00, w.shape)
        w = w + _expand_mask(xp, m, w.shape, alibi_slopes(ne02, max_bias))
    row_max = xp.max(w, axis=-1, keepdims=True)
    sink = _sinks(ctx, 2, ne02) if ctx.has_src(2) else None
    if sink is not None:
        row_max = xp.maximum(row_max, sink)
    e = xp.exp(w - row_max)
    total = xp.sum(e, axis=-1, keepdims=True, dtype=xp.float64)
    if sink is not None:
        total = total + xp.exp(sink - row_max).astype(xp.float64)
    ctx.store(e * (1.0 / total).astype(xp.float32))


# -- FLASH_ATTN_EXT ---------------------------------------------------------------------

_VEC_DOT_F16 = {GGMLType.F16}
_VEC_DOT_BF16 = {GGMLType.BF16}
_VEC_DOT_F32 = {GGMLType.F32}


def _round_blocks(xp, x, block: int, per_block_signed_max: bool):
    """x rounded through an 8-bit block quantization (Q8_0 / Q8_K style), back as float32.

    Q8_0: d = amax/127 stored as F16, q = rint(x * 127/amax).
    Q8_K: iscale = -127/max (max: the element of largest magnitude, sign kept), d = 1/iscale
    (float32), q = min(127, rint(iscale*x)).
    """
    shape = x.shape
    b = x.reshape(shape[:-1] + (shape[-1] // block, block))
    a = xp.abs(b)
    if per_block_signed_max:
        idx = xp.argmax(a, axis=-1)[..., None]
        mx = xp.take_along_axis(b, idx, axis=-1)
        zero = mx == 0
        iscale = xp.where(zero, _f32(0), -127.0 / xp.where(zero, _f32(1), mx))
        q = xp.minimum(xp.rint(iscale * b), _f32(127))
        d = xp.where(zero, _f32(0), 1.0 / xp.where(zero, _f32(1), iscale))
    else:
        amax = xp.max(a, axis=-1, keepdims=True)
        zero = amax == 0
        d = (amax / _f32(127.0)).astype(xp.float16).astype(xp.float32)
        inv = xp.where(zero, _f32(0), 127.0 / xp.where(zero, _f32(1), amax))
        q = xp.rint(b * inv)
    return (q * d).astype(xp.float32).reshape(shape)


def q_as_vec_dot(xp, q, k_type):
    """Q converted to (and back from) the type ggml's CPU dots K rows with."""
    t = k_type.value
    if t in _VEC_DOT_F32:
        return q
    if t in _VEC_DOT_F16:
        return q.astype(xp.float16).astype(xp.float32)
    if t in _VEC_DOT_BF16:
        return bf16_to_f32(xp, f32_to_bf16(xp, q))
    if k_type.is_quantized and q.shape[-1] % k_type.block_size == 0:
        if k_type.block_size == 256:
            return _round_blocks(xp, q, 256, True)  # k-quants dot with Q8_K
        if k_type.block_size == 32:
            return _round_blocks(xp, q, 32, False)  # Q8_0 (Q8_1 rounds the same way)
    return q


def _grouped(a, groups: int):
    """(B, H, N, D) -> (B, groups, H/groups * N, D): the rows of heads sharing one K/V head."""
    b, h, n, d = a.shape
    return a.reshape(b, groups, (h // groups) * n, d)


def _match_batch(xp, a, batch: int):
    if a.shape[0] != batch:
        a = xp.repeat(a, batch // a.shape[0], axis=0)
    return a


def ggml_tiled_path(qv, kv, vv) -> bool:
    """Whether ggml's CPU takes its tiled FLASH_ATTN_EXT path (F32/F16 K and V of one type,
    at least 64 query rows), which keeps Q in float32 instead of K's vec_dot type."""
    return (kv.type.value in (GGMLType.F32, GGMLType.F16) and kv.type.value == vv.type.value
            and qv.type.value == GGMLType.F32 and qv.ne[1] >= 64)


@op(Op.FLASH_ATTN_EXT)
def flash_attn_ext(ctx):
    xp = ctx.xp
    qv, kv, vv, dst = ctx.src(0), ctx.src(1), ctx.src(2), ctx.dst
    dk, n_q, n_head, n_batch = qv.ne
    dv, n_kv = vv.ne[0], kv.ne[1]
    if kv.ne[0] != dk or vv.ne[1] != n_kv:
        ctx.fail("FLASH_ATTN_EXT: q/k head sizes or k/v lengths disagree")
    if n_head % kv.ne[2] or n_head % vv.ne[2] or n_batch % kv.ne[3] or n_batch % vv.ne[3]:
        ctx.fail("FLASH_ATTN_EXT: K/V heads or batches do not divide Q's")
    if tuple(dst.ne) != (dv, n_head, n_q, n_batch) or dst.type.value != GGMLType.F32:
        ctx.fail(f"FLASH_ATTN_EXT result must be F32 [{dv}, {n_head}, {n_q}, {n_batch}]")
    scale, max_bias, softcap = ctx.param_f32(0), ctx.param_f32(1), ctx.param_f32(2)

    tiled = ggml_tiled_path(qv, kv, vv)
    q = ctx.f32(qv)
    if not tiled:
        q = q_as_vec_dot(xp, q, kv.type)
    k = _match_batch(xp, ctx.f32(kv), n_batch)  # (B, Hk, n_kv, DK)
    v = _match_batch(xp, ctx.f32(vv), n_batch)  # (B, Hv, n_kv, DV)
    hk, hv = k.shape[1], v.shape[1]

    if softcap != 0.0:
        scale = _f32(scale) / _f32(softcap)
    scale = _f32(scale)

    has_mask = ctx.has_src(3)
    slopes = alibi_slopes(n_head, max_bias) if has_mask else None
    sink = _sinks(ctx, 4, n_head) if ctx.has_src(4) else None

    # V entries that are not finite only matter where their key is not masked (ggml skips
    # masked keys); zero them for the product and re-inject them below.
    v_bad = None
    if not bool(xp.isfinite(v).all()):
        finite = xp.isfinite(v)
        v_bad = (~finite).astype(xp.float32)
        v = xp.where(finite, v, _f32(0))

    out = xp.empty((n_batch, n_head, n_q, dv), dtype=xp.float32)
    rows = max(1, SCORE_CHUNK_ELEMENTS // max(1, n_batch * n_head * n_kv))
    mask = _read_mask(ctx, ctx.src(3), n_q, n_kv, (n_batch, n_head)) if has_mask else None
    for r0 in range(0, n_q, rows):
        r1 = min(n_q, r0 + rows)
        qc = q[:, :, r0:r1, :]
        shape = (n_batch, n_head, r1 - r0, n_kv)
        s = xp.matmul(_grouped(qc, hk), xp.swapaxes(k, -1, -2)).reshape(shape)
        s = s * scale
        if softcap != 0.0:
            s = xp.tanh(s) * _f32(softcap)
        masked = None
        if mask is not None:
            m = _expand_mask(xp, mask[:, :, r0:r1, :], shape, slopes)
            masked = m == -xp.inf
            s = xp.where(masked, -xp.inf, s + m)
        row_max = xp.max(s, axis=-1, keepdims=True)
        if sink is not None:
            row_max = xp.maximum(row_max, sink)
        safe_max = xp.where(row_max == -xp.inf, _f32(0), row_max)
        p = xp.exp(s - safe_max)
        total = xp.sum(p, axis=-1, keepdims=True)
        if sink is not None:
            total = total + xp.exp(sink - safe_max)
        acc = xp.matmul(_grouped(p, hv), v).reshape(shape[:3] + (dv,))
        if v_bad is not None:
            live = (~masked if masked is not None else xp.ones(shape, dtype=bool))
            live = live.astype(xp.float32)
            hit = xp.matmul(_grouped(live, hv), v_bad).reshape(acc.shape) > 0
            acc = xp.where(hit, _f32(np.nan), acc)
        inv = xp.where(total == 0, _f32(0), 1.0 / xp.where(total == 0, _f32(1), total))
        out[:, :, r0:r1, :] = acc * inv
    ctx.store(xp.swapaxes(out, 1, 2))  # dst is [DV, H, n_q, B]: heads are the inner row index
