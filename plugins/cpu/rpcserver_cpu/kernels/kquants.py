"""Block kernels of ggml's 256-element super-block types: Q2_K ... Q6_K and IQ4_XS.

The layouts are ggml-common.h's ``block_q2_K`` ... ``block_q6_K`` and
``block_iq4_xs`` (each section below restates its own); the values are those
of ggml-quants.c's ``dequantize_row_*``.

How the dot products are arranged, so that numba/LLVM vectorise them:

* A super-block's sub-block scales and mins are decoded once per row, as
  scalars (the 12 packed bytes of Q3_K/Q4_K/Q5_K a 32-bit word at a time, as
  ggml does).
* One inner loop runs over 16 or 32 consecutive elements and sums
  ``scale * q * x`` in float32 for each of the four rows: the scales of the
  sub-blocks it covers (2 to 8) are applied inside the loop, so a row needs one
  horizontal reduction (~8 instructions) per 64 or 128 elements rather than
  one per 16 or 32.
* Offsets and mins are applied once per sub-block through the sums of ``x``
  (``xs``): ``sum(sc (q - c) x) = sc sum(q x) - sc c sum(x)``.
* Quants are cut out of uint8 lanes: every operation is cast back to uint8
  (numba's integer operators give 64-bit results, and 64-bit lanes run 2-4x
  slower); a bit whose position changes from one pass to the next is tested
  against a mask (:func:`_flag`), since a variable shift cannot be narrowed.
* Array indices in the loops are unsigned: numba wraps negative signed indices,
  and where LLVM cannot prove an index non-negative it assembles each vector
  load byte by byte (``vpinsrb``).
* Each dot product prefetches its rows two blocks ahead (:func:`_prefetch4`).
* IQ4_XS's 32-element sub-blocks are IQ4_NL blocks with their own scales:
  legacy.py's IQ4_NL intrinsics (a byte shuffle looks the values up) do them.

Decoding repeats ggml's float32 arithmetic. Its products are exact but for
Q6_K's (a half, 11 significant bits, times a 6-bit scale times a quant of at
most 7 bits fits float32's 24), so neither FMA contraction nor re-association
can change them; Q6_K's ``(d * scale) * q`` (8-bit scales) can need 25 bits
and must round where ggml rounds: :func:`_mul`, which fastmath leaves alone,
keeps that order.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from rpcserver.api import GGMLType

from . import simd
from .blocks import BlockKernel, register
from .jit import INLINE_OPTIONS, half_at, le_u32
from .legacy import KVALUES_IQ4NL, _lut_decode32, _lut_dot32

_f32 = np.float32
_i32 = np.int32
_u8 = np.uint8
_u32 = np.uint32
_u64 = np.uint64
#: the per-element helpers are compiled on their own and inlined by LLVM, not numba: numba's
#: inlining copies and re-types a callee at each of its hundreds of call sites (Q3_K's
#: mul_mat_vec compiled in 54 s that way, 15 s this way, to the same machine code)
_LEAF = dict(fastmath=True, error_model="numpy")


@intrinsic
def _mul(typingctx, a, b):
    """``a * b`` (float32) rounded on its own: never contracted into an FMA or re-associated.

    Numba's fastmath pass flags only the float instructions that have no flags yet;
    ``afn`` (which concerns library calls only) keeps this one out of it.
    """
    def codegen(context, builder, signature, args):
        return builder.fmul(args[0], args[1], flags=("afn",))
    return types.float32(types.float32, types.float32), codegen


@intrinsic
def _prefetch(typingctx, row, o):
    """Ask the CPU to bring byte ``o`` of the uint8 array ``row`` into the caches (a hint:
    never faults, so ``o`` may lie past the end)."""
    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        offset = context.cast(builder, args[1], signature.args[1], types.intp)
        simd.prefetch(builder, builder.bitcast(data, simd.I8.as_pointer()), offset)
        return context.get_dummy_value()
    return types.void(row, o), codegen


@njit(**INLINE_OPTIONS)
def _prefetch4(r0, r1, r2, r3, o, nbytes):
    """Prefetch, in each row, the block two blocks after the one at byte ``o``.

    Without it the hardware prefetchers fall behind four interleaved row streams once the
    weights do not fit in the caches: Q6_K over 22528 x 2048 weights ran at half the speed it
    has when they do (a block's arithmetic is long enough that few of its loads are in flight).
    """
    p = o + 2 * nbytes
    for k in range(0, nbytes, 64):
        _prefetch(r0, p + k)
        _prefetch(r1, p + k)
        _prefetch(r2, p + k)
        _prefetch(r3, p + k)


@njit(**_LEAF)
def _byte(word, i):
    """Byte ``i`` of a uint64 ``word``, as float32."""
    return _f32(_u8((word >> _u64(8 * i)) & _u64(255)))


@njit(**_LEAF)
def _lo(q):
    return _u8(q & _u8(15))


@njit(**_LEAF)
def _hi(q):
    return _u8(q >> _u8(4))


@njit(**_LEAF)
def _crumb(q, shift):
    """Bits ``shift, shift + 1`` of the uint8 ``q``."""
    return _u8(_u8(q >> _u8(shift)) & _u8(3))


@njit(**_LEAF)
def _or(a, b):
    """``a | b`` of two uint8, as uint8 (numba's ``|`` gives uint64)."""
    return _u8(a | b)


@njit(**_LEAF)
def _flag(u, m, v):
    """The uint8 ``v`` where ``u & m`` is not 0, else 0 (a select: no variable shift, which would
    widen the lanes to 64 bits)."""
    return v if _u8(u & m) != _u8(0) else _u8(0)


# -- Q2_K (84 bytes): scales[16] (scale | min << 4), qs[64] (2-bit quants), d, dmin (halves).
# Element 128 n + 32 k + l (n < 2, k < 4, l < 32) is bits 2k of qs[32 n + l], in sub-block
# 8 n + 2 k + l // 16: d * (scale & 15) * q - dmin * (scale >> 4).
#
# Q2_K, Q3_K and Q6_K have 16-element sub-blocks. Their dot products run one loop over l < 16 per
# half (n) of a super-block, and in it sum all 8 of the half's sub-blocks j (element 16 j + l of
# the half) with their scales applied inside the loop: each row needs one sum, so one horizontal
# reduction, per half rather than one per sub-block.

@njit(**INLINE_OPTIONS)
def _x8(x, xo, l):
    """Element l of each of the 8 sub-blocks of 16 from x[xo]."""
    return (x[xo + l], x[xo + 16 + l], x[xo + 32 + l], x[xo + 48 + l], x[xo + 64 + l],
            x[xo + 80 + l], x[xo + 96 + l], x[xo + 112 + l])


@njit(**INLINE_OPTIONS)
def _dot8(c, xs, z):
    """sum of c[j] * xs[z + j] over j < 8."""
    return (c[0] * xs[z] + c[1] * xs[z + 1] + c[2] * xs[z + 2] + c[3] * xs[z + 3]
            + c[4] * xs[z + 4] + c[5] * xs[z + 5] + c[6] * xs[z + 6] + c[7] * xs[z + 7])


@njit(**INLINE_OPTIONS)
def _q2_k_scales(r, p):
    """The 8 scales of the sub-blocks whose bytes are r[p : p + 8], as float32."""
    return (_f32(_lo(r[p])), _f32(_lo(r[p + 1])), _f32(_lo(r[p + 2])), _f32(_lo(r[p + 3])),
            _f32(_lo(r[p + 4])), _f32(_lo(r[p + 5])), _f32(_lo(r[p + 6])), _f32(_lo(r[p + 7])))


@njit(**INLINE_OPTIONS)
def _q2_k_mins(r, p):
    """The 8 mins of the sub-blocks whose bytes are r[p : p + 8], as float32."""
    return (_f32(_hi(r[p])), _f32(_hi(r[p + 1])), _f32(_hi(r[p + 2])), _f32(_hi(r[p + 3])),
            _f32(_hi(r[p + 4])), _f32(_hi(r[p + 5])), _f32(_hi(r[p + 6])), _f32(_hi(r[p + 7])))


@njit(**INLINE_OPTIONS)
def _q2_k_terms(r, i, c, y):
    """sum over the 8 sub-blocks j of a half of quant * scale c[j] * x y[j], at one l < 16
    (i = qs + 32 n + l)."""
    v = r[i]
    w = r[i + _u64(16)]
    return (_f32(_crumb(v, 0)) * c[0] * y[0] + _f32(_crumb(w, 0)) * c[1] * y[1]
            + _f32(_crumb(v, 2)) * c[2] * y[2] + _f32(_crumb(w, 2)) * c[3] * y[3]
            + _f32(_crumb(v, 4)) * c[4] * y[4] + _f32(_crumb(w, 4)) * c[5] * y[5]
            + _f32(_crumb(v, 6)) * c[6] * y[6] + _f32(_crumb(w, 6)) * c[7] * y[7])


@njit(**INLINE_OPTIONS)
def _q2_k_dot4(kind, r0, r1, r2, r3, o, x, xs, xb):
    _prefetch4(r0, r1, r2, r3, o, 84)
    a0 = _f32(0)
    a1 = _f32(0)
    a2 = _f32(0)
    a3 = _f32(0)
    m0 = _f32(0)
    m1 = _f32(0)
    m2 = _f32(0)
    m3 = _f32(0)
    for n in range(2):
        q = o + 16 + 32 * n
        xo = xb + 128 * n
        p = o + 8 * n
        c0 = _q2_k_scales(r0, p)
        c1 = _q2_k_scales(r1, p)
        c2 = _q2_k_scales(r2, p)
        c3 = _q2_k_scales(r3, p)
        s0 = _f32(0)
        s1 = _f32(0)
        s2 = _f32(0)
        s3 = _f32(0)
        for l in range(16):
            y = _x8(x, xo, l)
            i = _u64(q + l)  # unsigned: no negative-index wrap-around, so LLVM loads vectors
            s0 += _q2_k_terms(r0, i, c0, y)
            s1 += _q2_k_terms(r1, i, c1, y)
            s2 += _q2_k_terms(r2, i, c2, y)
            s3 += _q2_k_terms(r3, i, c3, y)
        z = xb // 16 + 8 * n
        a0 += s0
        a1 += s1
        a2 += s2
        a3 += s3
        m0 += _dot8(_q2_k_mins(r0, p), xs, z)
        m1 += _dot8(_q2_k_mins(r1, p), xs, z)
        m2 += _dot8(_q2_k_mins(r2, p), xs, z)
        m3 += _dot8(_q2_k_mins(r3, p), xs, z)
    return (half_at(r0, o + 80) * a0 - half_at(r0, o + 82) * m0,
            half_at(r1, o + 80) * a1 - half_at(r1, o + 82) * m1,
            half_at(r2, o + 80) * a2 - half_at(r2, o + 82) * m2,
            half_at(r3, o + 80) * a3 - half_at(r3, o + 82) * m3)


@njit(**INLINE_OPTIONS)
def _q2_k_decode(row, o, out, ob):
    d = half_at(row, o + 80)
    dmin = half_at(row, o + 82)
    for c in range(4):  # sub-blocks 8 n + 2 k + h read bits 2 k of qs[32 n + 16 h + l]
        n = c >> 1
        h = c & 1
        q = o + 16 + 32 * n + 16 * h
        p = o + 8 * n + h
        v0 = d * _f32(_lo(row[p]))
        v1 = d * _f32(_lo(row[p + 2]))
        v2 = d * _f32(_lo(row[p + 4]))
        v3 = d * _f32(_lo(row[p + 6]))
        w0 = dmin * _f32(_hi(row[p]))
        w1 = dmin * _f32(_hi(row[p + 2]))
        w2 = dmin * _f32(_hi(row[p + 4]))
        w3 = dmin * _f32(_hi(row[p + 6]))
        e = ob + 128 * n + 16 * h
        for l in range(16):
            v = row[_u64(q + l)]
            out[_u64(e + l)] = _mul(v0, _f32(_crumb(v, 0))) - w0
            out[_u64(e + 32 + l)] = _mul(v1, _f32(_crumb(v, 2))) - w1
            out[_u64(e + 64 + l)] = _mul(v2, _f32(_crumb(v, 4))) - w2
            out[_u64(e + 96 + l)] = _mul(v3, _f32(_crumb(v, 6))) - w3


register(BlockKernel(GGMLType.Q2_K, "Q2_K", 256, 84, _q2_k_dot4, _q2_k_decode))


# -- Q3_K (110 bytes): hmask[32] (high bits), qs[64] (low 2 bits), scales[12] (16 6-bit),
# d (half). Element 128 n + 32 k + l: low bits 2k of qs[32 n + l], high bit 4 n + k of
# hmask[l]; value d * (scale - 32) * (low - (0 if high else 4)), sub-block 8 n + 2 k + l // 16.
# (low | high << 2) is the quant + 4; the -4 is applied per sub-block through xs.

@njit(**INLINE_OPTIONS)
def _q3_k_words(r, p):
    """The 16 6-bit scales at r[p : p + 12] as the bytes of two uint64 (0..63; ggml's aux)."""
    a = le_u32(r, p)
    b = le_u32(r, p + 4)
    t = le_u32(r, p + 8)
    lo = _u32(0x0F0F0F0F)
    hi = _u32(0x03030303)
    s0 = (a & lo) | ((t & hi) << _u32(4))
    s1 = (b & lo) | (((t >> _u32(2)) & hi) << _u32(4))
    s2 = ((a >> _u32(4)) & lo) | (((t >> _u32(4)) & hi) << _u32(4))
    s3 = ((b >> _u32(4)) & lo) | (((t >> _u32(6)) & hi) << _u32(4))
    return _u64(s0) | (_u64(s1) << _u64(32)), _u64(s2) | (_u64(s3) << _u64(32))


@njit(**INLINE_OPTIONS)
def _q3_k_scales(w):
    """The 8 scales (- 32, as float32) in the bytes of w (one half's sub-blocks)."""
    return (_byte(w, 0) - _f32(32), _byte(w, 1) - _f32(32), _byte(w, 2) - _f32(32),
            _byte(w, 3) - _f32(32), _byte(w, 4) - _f32(32), _byte(w, 5) - _f32(32),
            _byte(w, 6) - _f32(32), _byte(w, 7) - _f32(32))


@njit(**_LEAF)
def _q3_k_quant(v, u, shift, m):
    """The quant + 4 (0..7): bits ``shift`` of ``v``, and 4 where ``u & m``."""
    return _f32(_or(_crumb(v, shift), _flag(u, m, _u8(4))))


@njit(**INLINE_OPTIONS)
def _q3_k_terms(r, i, j, b, c, y):
    """sum over the 8 sub-blocks k of a half of (quant + 4) * scale c[k] * x y[k], at one l < 16
    (i = qs + 32 n + l, j = hmask + l; b: the mask of high bit 4 n)."""
    v = r[i]
    w = r[i + _u64(16)]
    u = r[j]
    t = r[j + _u64(16)]
    b1 = _u8(b << _u8(1))
    b2 = _u8(b << _u8(2))
    b3 = _u8(b << _u8(3))
    return (_q3_k_quant(v, u, 0, b) * c[0] * y[0] + _q3_k_quant(w, t, 0, b) * c[1] * y[1]
            + _q3_k_quant(v, u, 2, b1) * c[2] * y[2] + _q3_k_quant(w, t, 2, b1) * c[3] * y[3]
            + _q3_k_quant(v, u, 4, b2) * c[4] * y[4] + _q3_k_quant(w, t, 4, b2) * c[5] * y[5]
            + _q3_k_quant(v, u, 6, b3) * c[6] * y[6] + _q3_k_quant(w, t, 6, b3) * c[7] * y[7])


@njit(**INLINE_OPTIONS)
def _q3_k_dot4(kind, r0, r1, r2, r3, o, x, xs, xb):
    _prefetch4(r0, r1, r2, r3, o, 110)
    w00, w01 = _q3_k_words(r0, o + 96)
    w10, w11 = _q3_k_words(r1, o + 96)
    w20, w21 = _q3_k_words(r2, o + 96)
    w30, w31 = _q3_k_words(r3, o + 96)
    a0 = _f32(0)
    a1 = _f32(0)
    a2 = _f32(0)
    a3 = _f32(0)
    m0 = _f32(0)
    m1 = _f32(0)
    m2 = _f32(0)
    m3 = _f32(0)
    for n in range(2):
        q = o + 32 + 32 * n
        xo = xb + 128 * n
        b = _u8(_u8(1) << _u8(4 * n))  # the mask of high bit 4 n
        c0 = _q3_k_scales(w01 if n else w00)
        c1 = _q3_k_scales(w11 if n else w10)
        c2 = _q3_k_scales(w21 if n else w20)
        c3 = _q3_k_scales(w31 if n else w30)
        s0 = _f32(0)
        s1 = _f32(0)
        s2 = _f32(0)
        s3 = _f32(0)
        for l in range(16):
            y = _x8(x, xo, l)
            i = _u64(q + l)
            j = _u64(o + l)
            s0 += _q3_k_terms(r0, i, j, b, c0, y)
            s1 += _q3_k_terms(r1, i, j, b, c1, y)
            s2 += _q3_k_terms(r2, i, j, b, c2, y)
            s3 += _q3_k_terms(r3, i, j, b, c3, y)
        z = xb // 16 + 8 * n
        a0 += s0
        a1 += s1
        a2 += s2
        a3 += s3
        m0 += _dot8(c0, xs, z)
        m1 += _dot8(c1, xs, z)
        m2 += _dot8(c2, xs, z)
        m3 += _dot8(c3, xs, z)
    c = _f32(4)
    return (half_at(r0, o + 108) * (a0 - c * m0), half_at(r1, o + 108) * (a1 - c * m1),
            half_at(r2, o + 108) * (a2 - c * m2), half_at(r3, o + 108) * (a3 - c * m3))


@njit(**INLINE_OPTIONS)
def _q3_k_decode(row, o, out, ob):
    d = half_at(row, o + 108)
    w0, w1 = _q3_k_words(row, o + 96)
    for c in range(4):
        n = c >> 1
        h = c & 1
        q = o + 32 + 32 * n + 16 * h
        hm = o + 16 * h
        e = ob + 128 * n + 16 * h
        b0 = _u8(_u8(1) << _u8(4 * n))
        b1 = _u8(b0 << _u8(1))
        b2 = _u8(b0 << _u8(2))
        b3 = _u8(b0 << _u8(3))
        w = (w1 if n else w0) >> _u64(8 * h)  # scales of sub-blocks 8 n + h + 2 k: bytes 2 k
        f = _f32(32)
        d0 = d * (_byte(w, 0) - f)
        d1 = d * (_byte(w, 2) - f)
        d2 = d * (_byte(w, 4) - f)
        d3 = d * (_byte(w, 6) - f)
        f = _f32(4)
        for l in range(16):
            v = row[_u64(q + l)]
            u = row[_u64(hm + l)]
            out[_u64(e + l)] = _mul(d0, _q3_k_quant(v, u, 0, b0) - f)
            out[_u64(e + 32 + l)] = _mul(d1, _q3_k_quant(v, u, 2, b1) - f)
            out[_u64(e + 64 + l)] = _mul(d2, _q3_k_quant(v, u, 4, b2) - f)
            out[_u64(e + 96 + l)] = _mul(d3, _q3_k_quant(v, u, 6, b3) - f)


register(BlockKernel(GGMLType.Q3_K, "Q3_K", 256, 110, _q3_k_dot4, _q3_k_decode))


# -- Q4_K (144 bytes) and Q5_K (176 bytes): d, dmin (halves), scales[12] (8 6-bit scales and
# 8 6-bit mins), [Q5_K: qh[32], the fifth bits], qs[128] (nibbles). Element 64 g + l
# (g < 4, l < 32) is the low nibble of qs[32 g + l] (+ 16 * bit 2g of qh[l]), element
# 64 g + 32 + l its high nibble (+ 16 * bit 2g + 1); sub-blocks of 32:
# d * scale * q - dmin * min.

@njit(**INLINE_OPTIONS)
def _k4_scales(r, p):
    """The 8 scales and the 8 mins at r[p : p + 12] (ggml's get_scale_min_k4), as the bytes of
    two uint64."""
    a = le_u32(r, p)
    b = le_u32(r, p + 4)
    t = le_u32(r, p + 8)
    six = _u32(0x3F3F3F3F)
    lo = _u32(0x0F0F0F0F)
    top = _u32(0x03030303)
    sc_hi = (t & lo) | (((a >> _u32(6)) & top) << _u32(4))
    mn_hi = ((t >> _u32(4)) & lo) | (((b >> _u32(6)) & top) << _u32(4))
    return (_u64(a & six) | (_u64(sc_hi) << _u64(32)),
            _u64(b & six) | (_u64(mn_hi) << _u64(32)))


@njit(**INLINE_OPTIONS)
def _k4_pair(sc, g):
    """The scales (or mins) of sub-blocks 2g and 2g + 1, as float32."""
    return _byte(sc, 2 * g), _byte(sc, 2 * g + 1)


@njit(**INLINE_OPTIONS)
def _q4_k_sums(r0, r1, r2, r3, o, q, x, xo, c, ml, mh):
    """For each row, sum(scale q x) over sub-blocks 2g and 2g + 1: the 32 low nibbles of
    r*[q : q + 32] (x from xo) and their high nibbles (x from xo + 32), with the scales
    c = (row 0 low, row 0 high, row 1 low, ...)."""
    s0 = _f32(0)
    s1 = _f32(0)
    s2 = _f32(0)
    s3 = _f32(0)
    for l in range(32):
        xl = x[xo + l]
        xh = x[xo + 32 + l]
        i = _u64(q + l)
        v = r0[i]
        s0 += _f32(_lo(v)) * c[0] * xl + _f32(_hi(v)) * c[1] * xh
        v = r1[i]
        s1 += _f32(_lo(v)) * c[2] * xl + _f32(_hi(v)) * c[3] * xh
        v = r2[i]
        s2 += _f32(_lo(v)) * c[4] * xl + _f32(_hi(v)) * c[5] * xh
        v = r3[i]
        s3 += _f32(_lo(v)) * c[6] * xl + _f32(_hi(v)) * c[7] * xh
    return s0, s1, s2, s3


@njit(**INLINE_OPTIONS)
def _q5_k_sums(r0, r1, r2, r3, o, q, x, xo, c, ml, mh):
    """:func:`_q4_k_sums` with the fifth bits: mask ``ml`` (``mh``) of qh[l] for the low (high)
    nibbles."""
    s0 = _f32(0)
    s1 = _f32(0)
    s2 = _f32(0)
    s3 = _f32(0)
    k = _u8(16)
    for l in range(32):
        xl = x[xo + l]
        xh = x[xo + 32 + l]
        i = _u64(q + l)
        j = _u64(o + 16 + l)
        v = r0[i]
        u = r0[j]
        s0 += (_f32(_or(_lo(v), _flag(u, ml, k))) * c[0] * xl
               + _f32(_or(_hi(v), _flag(u, mh, k))) * c[1] * xh)
        v = r1[i]
        u = r1[j]
        s1 += (_f32(_or(_lo(v), _flag(u, ml, k))) * c[2] * xl
               + _f32(_or(_hi(v), _flag(u, mh, k))) * c[3] * xh)
        v = r2[i]
        u = r2[j]
        s2 += (_f32(_or(_lo(v), _flag(u, ml, k))) * c[4] * xl
               + _f32(_or(_hi(v), _flag(u, mh, k))) * c[5] * xh)
        v = r3[i]
        u = r3[j]
        s3 += (_f32(_or(_lo(v), _flag(u, ml, k))) * c[6] * xl
               + _f32(_or(_hi(v), _flag(u, mh, k))) * c[7] * xh)
    return s0, s1, s2, s3


def _make_k4(five):
    qs = 48 if five else 16
    nbytes = 176 if five else 144
    sums = _q5_k_sums if five else _q4_k_sums

    @njit(**INLINE_OPTIONS)
    def dot4(kind, r0, r1, r2, r3, o, x, xs, xb):
        _prefetch4(r0, r1, r2, r3, o, nbytes)
        sc0, mn0 = _k4_scales(r0, o + 4)
        sc1, mn1 = _k4_scales(r1, o + 4)
        sc2, mn2 = _k4_scales(r2, o + 4)
        sc3, mn3 = _k4_scales(r3, o + 4)
        a0 = _f32(0)
        a1 = _f32(0)
        a2 = _f32(0)
        a3 = _f32(0)
        m0 = _f32(0)
        m1 = _f32(0)
        m2 = _f32(0)
        m3 = _f32(0)
        for g in range(4):  # sub-blocks 2g (low nibbles) and 2g + 1 (high nibbles)
            ml = _u8(_u8(1) << _u8(2 * g))  # their fifth bits in qh (Q5_K)
            c = _k4_pair(sc0, g) + _k4_pair(sc1, g) + _k4_pair(sc2, g) + _k4_pair(sc3, g)
            s0, s1, s2, s3 = sums(r0, r1, r2, r3, o, o + qs + 32 * g, x, xb + 64 * g, c, ml,
                                  _u8(ml << _u8(1)))
            z = xb // 16 + 4 * g
            yl = xs[z] + xs[z + 1]
            yh = xs[z + 2] + xs[z + 3]
            a0 += s0
            a1 += s1
            a2 += s2
            a3 += s3
            n0, n1 = _k4_pair(mn0, g)
            m0 += n0 * yl + n1 * yh
            n0, n1 = _k4_pair(mn1, g)
            m1 += n0 * yl + n1 * yh
            n0, n1 = _k4_pair(mn2, g)
            m2 += n0 * yl + n1 * yh
            n0, n1 = _k4_pair(mn3, g)
            m3 += n0 * yl + n1 * yh
        return (half_at(r0, o) * a0 - half_at(r0, o + 2) * m0,
                half_at(r1, o) * a1 - half_at(r1, o + 2) * m1,
                half_at(r2, o) * a2 - half_at(r2, o + 2) * m2,
                half_at(r3, o) * a3 - half_at(r3, o + 2) * m3)

    if five:
        @njit(**INLINE_OPTIONS)
        def decode(row, o, out, ob):
            d = half_at(row, o)
            dmin = half_at(row, o + 2)
            sc, mn = _k4_scales(row, o + 4)
            k = _u8(16)
            for g in range(4):
                q = o + 48 + 32 * g
                e = ob + 64 * g
                d1 = d * _byte(sc, 2 * g)
                m1 = dmin * _byte(mn, 2 * g)
                d2 = d * _byte(sc, 2 * g + 1)
                m2 = dmin * _byte(mn, 2 * g + 1)
                bl = _u8(_u8(1) << _u8(2 * g))
                bh = _u8(bl << _u8(1))
                for l in range(32):
                    v = row[_u64(q + l)]
                    u = row[_u64(o + 16 + l)]
                    out[_u64(e + l)] = _mul(d1, _f32(_or(_lo(v), _flag(u, bl, k)))) - m1
                    out[_u64(e + 32 + l)] = _mul(d2, _f32(_or(_hi(v), _flag(u, bh, k)))) - m2
    else:
        @njit(**INLINE_OPTIONS)
        def decode(row, o, out, ob):
            d = half_at(row, o)
            dmin = half_at(row, o + 2)
            sc, mn = _k4_scales(row, o + 4)
            for g in range(4):
                q = o + 16 + 32 * g
                e = ob + 64 * g
                d1 = d * _byte(sc, 2 * g)
                m1 = dmin * _byte(mn, 2 * g)
                d2 = d * _byte(sc, 2 * g + 1)
                m2 = dmin * _byte(mn, 2 * g + 1)
                for l in range(32):
                    v = row[_u64(q + l)]
                    out[_u64(e + l)] = _mul(d1, _f32(_lo(v))) - m1
                    out[_u64(e + 32 + l)] = _mul(d2, _f32(_hi(v))) - m2

    return dot4, decode


_q4_k_dot4, _q4_k_decode = _make_k4(False)
_q5_k_dot4, _q5_k_decode = _make_k4(True)
register(BlockKernel(GGMLType.Q4_K, "Q4_K", 256, 144, _q4_k_dot4, _q4_k_decode))
register(BlockKernel(GGMLType.Q5_K, "Q5_K", 256, 176, _q5_k_dot4, _q5_k_decode))


# -- Q6_K (210 bytes): ql[128] (low nibbles), qh[64] (high 2 bits), scales[16] (int8), d.
# In half n (128 elements; ql from 64 n, qh from 32 n), for l < 32: element l is
# lo(ql[l]) | bits 0-1 of qh[l] (as bits 4-5 of the 6-bit quant), l + 32 is lo(ql[l + 32]) |
# bits 2-3, l + 64 is hi(ql[l]) | bits 4-5, l + 96 is hi(ql[l + 32]) | bits 6-7; value
# d * scale * (quant - 32), sub-blocks of 16 (the -32 is applied per sub-block through xs).

@njit(**_LEAF)
def _q6_k_quants(a, b, u):
    """The 4 6-bit quants (+ 32) of low-nibble bytes a, b and high-bit byte u, as float32."""
    m = _u8(48)
    return (_f32(_or(_lo(a), _u8(_u8(u << _u8(4)) & m))),
            _f32(_or(_lo(b), _u8(_u8(u << _u8(2)) & m))),
            _f32(_or(_hi(a), _u8(u & m))),
            _f32(_or(_hi(b), _u8(_u8(u >> _u8(2)) & m))))


@njit(**INLINE_OPTIONS)
def _q6_k_scales(r, p):
    """The 8 int8 scales r[p : p + 8] (one half's sub-blocks), as float32."""
    return (_f32(np.int8(r[p])), _f32(np.int8(r[p + 1])), _f32(np.int8(r[p + 2])),
            _f32(np.int8(r[p + 3])), _f32(np.int8(r[p + 4])), _f32(np.int8(r[p + 5])),
            _f32(np.int8(r[p + 6])), _f32(np.int8(r[p + 7])))


@njit(**INLINE_OPTIONS)
def _q6_k_terms(r, a, q, c, y):
    """sum over the 8 sub-blocks j of a half of (quant + 32) * scale c[j] * x y[j], at one l < 16:
    a = ql + l, q = qh + l (sub-block j is element 16 j + l of the half)."""
    p0, p2, p4, p6 = _q6_k_quants(r[a], r[a + _u64(32)], r[q])
    p1, p3, p5, p7 = _q6_k_quants(r[a + _u64(16)], r[a + _u64(48)], r[q + _u64(16)])
    return (p0 * c[0] * y[0] + p1 * c[1] * y[1] + p2 * c[2] * y[2] + p3 * c[3] * y[3]
            + p4 * c[4] * y[4] + p5 * c[5] * y[5] + p6 * c[6] * y[6] + p7 * c[7] * y[7])


@njit(**INLINE_OPTIONS)
def _q6_k_dot4(kind, r0, r1, r2, r3, o, x, xs, xb):
    _prefetch4(r0, r1, r2, r3, o, 210)
    a0 = _f32(0)
    a1 = _f32(0)
    a2 = _f32(0)
    a3 = _f32(0)
    m0 = _f32(0)
    m1 = _f32(0)
    m2 = _f32(0)
    m3 = _f32(0)
    for n in range(2):  # one loop over l < 16 per half, for its 8 sub-blocks: one sum per row
        ql = o + 64 * n
        qh = o + 128 + 32 * n
        xo = xb + 128 * n
        p = o + 192 + 8 * n
        c0 = _q6_k_scales(r0, p)
        c1 = _q6_k_scales(r1, p)
        c2 = _q6_k_scales(r2, p)
        c3 = _q6_k_scales(r3, p)
        s0 = _f32(0)
        s1 = _f32(0)
        s2 = _f32(0)
        s3 = _f32(0)
        for l in range(16):
            y = _x8(x, xo, l)
            a = _u64(ql + l)
            q = _u64(qh + l)
            s0 += _q6_k_terms(r0, a, q, c0, y)
            s1 += _q6_k_terms(r1, a, q, c1, y)
            s2 += _q6_k_terms(r2, a, q, c2, y)
            s3 += _q6_k_terms(r3, a, q, c3, y)
        z = xb // 16 + 8 * n
        a0 += s0
        a1 += s1
        a2 += s2
        a3 += s3
        m0 += _dot8(c0, xs, z)
        m1 += _dot8(c1, xs, z)
        m2 += _dot8(c2, xs, z)
        m3 += _dot8(c3, xs, z)
    c = _f32(32)
    return (half_at(r0, o + 208) * (a0 - c * m0), half_at(r1, o + 208) * (a1 - c * m1),
            half_at(r2, o + 208) * (a2 - c * m2), half_at(r3, o + 208) * (a3 - c * m3))


@njit(**INLINE_OPTIONS)
def _q6_k_decode(row, o, out, ob):
    d = half_at(row, o + 208)
    f = _f32(32)
    for c in range(4):  # l = 16 h ... of half n: sub-blocks 8 n + h + 2 k
        n = c >> 1
        h = c & 1
        ql = o + 64 * n + 16 * h
        qh = o + 128 + 32 * n + 16 * h
        p = o + 192 + 8 * n + h
        e = ob + 128 * n + 16 * h
        d0 = d * _f32(np.int8(row[p]))
        d1 = d * _f32(np.int8(row[p + 2]))
        d2 = d * _f32(np.int8(row[p + 4]))
        d3 = d * _f32(np.int8(row[p + 6]))
        for l in range(16):
            a = _u64(ql + l)
            q0, q1, q2, q3 = _q6_k_quants(row[a], row[a + _u64(32)], row[_u64(qh + l)])
            out[_u64(e + l)] = _mul(d0, q0 - f)
            out[_u64(e + 32 + l)] = _mul(d1, q1 - f)
            out[_u64(e + 64 + l)] = _mul(d2, q2 - f)
            out[_u64(e + 96 + l)] = _mul(d3, q3 - f)


register(BlockKernel(GGMLType.Q6_K, "Q6_K", 256, 210, _q6_k_dot4, _q6_k_decode))


# -- IQ4_XS (136 bytes): d (half), scales_h (uint16: 2 high bits per sub-block), scales_l[4]
# (a nibble per sub-block), qs[128]. Sub-block ib (32 elements) is an IQ4_NL block with the scale
# d * ((low nibble | high bits << 4) - 32) and its 16 bytes of nibbles at qs[16 ib]: element
# 32 ib + j = scale * kvalues_iq4nl[lo(qs[16 ib + j])], 32 ib + 16 + j the same of the high
# nibble. legacy.py's IQ4_NL intrinsics compute those blocks (a byte shuffle looks the 16
# values up; LLVM turns a lookup written in numba into a gather, at half the speed).

_iq4nl_dot = _lut_dot32(KVALUES_IQ4NL)
_iq4nl_decode = _lut_decode32(KVALUES_IQ4NL)
_KVALUES = np.array(KVALUES_IQ4NL, np.float32)


@njit(**INLINE_OPTIONS)
def _iq4_xs_scale(r, o, ib):
    """The scale of sub-block ib (as float32, -32 ... 31)."""
    low = _u8(_u8(r[o + 4 + (ib >> 1)] >> _u8(4 * (ib & 1))) & _u8(15))
    high = _u8(_u8(r[o + 2 + (ib >> 2)] >> _u8(2 * (ib & 3))) & _u8(3))
    return _f32(_i32(_or(low, _u8(high << _u8(4)))) - _i32(32))


@njit(**INLINE_OPTIONS)
def _iq4_xs_dot1(r, q, x, xo):
    """sum(kvalues_iq4nl[quant] * x) over the 32 elements whose nibbles are r[q : q + 16]."""
    if r.strides[0] == 1 and x.strides[0] == 4:  # what the intrinsic reads
        return _iq4nl_dot(r, q, x, xo)
    s = _f32(0)
    for j in range(16):
        v = r[q + j]
        s += _KVALUES[_lo(v)] * x[xo + j] + _KVALUES[_hi(v)] * x[xo + 16 + j]
    return s


@njit(**INLINE_OPTIONS)
def _iq4_xs_dot4(kind, r0, r1, r2, r3, o, x, xs, xb):
    _prefetch4(r0, r1, r2, r3, o, 136)
    a0 = _f32(0)
    a1 = _f32(0)
    a2 = _f32(0)
    a3 = _f32(0)
    for ib in range(8):
        q = o + 8 + 16 * ib
        xo = xb + 32 * ib
        a0 += _iq4_xs_scale(r0, o, ib) * _iq4_xs_dot1(r0, q, x, xo)
        a1 += _iq4_xs_scale(r1, o, ib) * _iq4_xs_dot1(r1, q, x, xo)
        a2 += _iq4_xs_scale(r2, o, ib) * _iq4_xs_dot1(r2, q, x, xo)
        a3 += _iq4_xs_scale(r3, o, ib) * _iq4_xs_dot1(r3, q, x, xo)
    return half_at(r0, o) * a0, half_at(r1, o) * a1, half_at(r2, o) * a2, half_at(r3, o) * a3


@njit(**INLINE_OPTIONS)
def _iq4_xs_decode(row, o, out, ob):
    d = half_at(row, o)
    fast = row.strides[0] == 1 and out.strides[0] == 4  # what the intrinsic reads and writes
    for ib in range(8):
        dl = d * _iq4_xs_scale(row, o, ib)
        q = o + 8 + 16 * ib
        e = ob + 32 * ib
        if fast:
            _iq4nl_decode(row, q, dl, out, e)
        else:
            for j in range(16):
                v = row[q + j]
                out[e + j] = _mul(dl, _KVALUES[_lo(v)])
                out[e + 16 + j] = _mul(dl, _KVALUES[_hi(v)])


register(BlockKernel(GGMLType.IQ4_XS, "IQ4_XS", 256, 136, _iq4_xs_dot4, _iq4_xs_decode))
