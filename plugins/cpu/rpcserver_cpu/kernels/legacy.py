"""Block kernels of ggml's 32-element types (ggml-common.h's block_q4_0 ... block_mxfp4).

Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 are arithmetic on their bytes; IQ4_NL and MXFP4 look their
nibbles up in a 16-entry table (kvalues_iq4nl, kvalues_mxfp4). Numba would read such a table
with a gather per 16 values (8x slower than Q4_0 here), so those two types' dot products are
written as explicit vector code (:func:`_lut_dot32`) whose lookup LLVM compiles to one byte
shuffle (``pshufb`` on x86), as ggml's own kernels do.

Every type here also has a :class:`~.blocks.Q8Dot`, the form :mod:`.q8` multiplies with
8-bit activations (what ggml does for these types): its 32 quants as unsigned bytes (Q8_0's
int8 and the table types' values plus 128, the 5-bit types' fifth bit from ``qh``), its scale,
and the offset or min to take back.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from rpcserver.api import GGMLType

from . import simd
from .blocks import BlockKernel, Q8Dot, register
from .jit import INLINE_OPTIONS, f32_bits_to_f32, half_at, le_u32

_f32 = np.float32
_u8 = np.uint8
_u32 = np.uint32


# -- Q4_0: d (half), 16 bytes of nibbles; element j = d * (lo(qs[j]) - 8), j + 16 = d * (hi(qs[j]) - 8)

@njit(**INLINE_OPTIONS)
def _q4_0_dot4(kind, r0, r1, r2, r3, o, x, xs, xb):
    s0 = _f32(0)
    s1 = _f32(0)
    s2 = _f32(0)
    s3 = _f32(0)
    for j in range(16):
        xl = x[xb + j]
        xh = x[xb + 16 + j]
        q = r0[o + 2 + j]
        s0 += _f32(_u8(q & _u8(15))) * xl + _f32(_u8(q >> _u8(4))) * xh
        q = r1[o + 2 + j]
        s1 += _f32(_u8(q & _u8(15))) * xl + _f32(_u8(q >> _u8(4))) * xh
        q = r2[o + 2 + j]
        s2 += _f32(_u8(q & _u8(15))) * xl + _f32(_u8(q >> _u8(4))) * xh
        q = r3[o + 2 + j]
        s3 += _f32(_u8(q & _u8(15))) * xl + _f32(_u8(q >> _u8(4))) * xh
    c = _f32(8) * (xs[xb // 16] + xs[xb // 16 + 1])
    return (half_at(r0, o) * (s0 - c), half_at(r1, o) * (s1 - c),
            half_at(r2, o) * (s2 - c), half_at(r3, o) * (s3 - c))


@njit(**INLINE_OPTIONS)
def _q4_0_decode(row, o, out, ob):
    d = half_at(row, o)
    for j in range(16):
        q = row[o + 2 + j]
        out[ob + j] = d * _f32(np.int32(q & _u8(15)) - 8)
        out[ob + 16 + j] = d * _f32(np.int32(q >> _u8(4)) - 8)


def _d(builder, block):
    """The block's leading half, d."""
    return simd.half(builder, block, 0)


def _m(builder, block):
    """The half after d: the min m of the _1 types."""
    return simd.half(builder, block, 2)


register(BlockKernel(GGMLType.Q4_0, "Q4_0", 32, 18, _q4_0_dot4, _q4_0_decode,
                     Q8Dot(lambda builder, block: simd.nibbles32(builder, block, 2), _d, 8)))


# -- Q8_0: d (half), 32 int8; element j = d * qs[j]

@njit(**INLINE_OPTIONS)
def _q8_0_dot4(kind, r0, r1, r2, r3, o, x, xs, xb):
    s0 = _f32(0)
    s1 = _f32(0)
    s2 = _f32(0)
    s3 = _f32(0)
    for j in range(32):
        xv = x[xb + j]
        s0 += _f32(np.int8(r0[o + 2 + j])) * xv
        s1 += _f32(np.int8(r1[o + 2 + j])) * xv
        s2 += _f32(np.int8(r2[o + 2 + j])) * xv
        s3 += _f32(np.int8(r3[o + 2 + j])) * xv
    return half_at(r0, o) * s0, half_at(r1, o) * s1, half_at(r2, o) * s2, half_at(r3, o) * s3


@njit(**INLINE_OPTIONS)
def _q8_0_decode(row, o, out, ob):
    d = half_at(row, o)
    for j in range(32):
        out[ob + j] = d * _f32(np.int8(row[o + 2 + j]))


def _q8_0_values(builder, block):
    """The int8 quants + 128, as unsigned bytes (flipping the sign bit adds 128)."""
    q = simd.load(builder, block, simd.vec(simd.I8, 32), 2)
    return builder.xor(q, simd.const(simd.vec(simd.I8, 32), [-128] * 32))


register(BlockKernel(GGMLType.Q8_0, "Q8_0", 32, 34, _q8_0_dot4, _q8_0_decode,
                     Q8Dot(_q8_0_values, _d, 128)))


# -- helpers

def _i32(builder, v):
    """The LLVM integer ``v`` as i32 (zero-extended or truncated)."""
    i32 = ir.IntType(32)
    if v.type.width < 32:
        return builder.zext(v, i32)
    return builder.trunc(v, i32) if v.type.width > 32 else v


@intrinsic
def _shr_and16(typingctx, v, n):
    """``(v >> n) & 16`` of the low 32 bits of ``v`` (n < 32), in 32-bit arithmetic: numba
    widens integer operations to 64 bits, and LLVM cannot narrow a variable shift back, so the
    vectorised loop would run on int64 lanes."""
    if not (isinstance(v, types.Integer) and isinstance(n, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        value, shift = (_i32(builder, a) for a in args)
        return builder.and_(builder.lshr(value, shift), ir.Constant(value.type, 16))
    return types.uint32(v, n), codegen


# -- Q4_1: d, m (halves), 16 bytes of nibbles; element j = d * lo(qs[j]) + m,
#    j + 16 = d * hi(qs[j]) + m

@njit(**INLINE_OPTIONS)
def _q4_1_dot4(kind, r0, r1, r2, r3, o, x, xs, xb):
    s0 = _f32(0)
    s1 = _f32(0)
    s2 = _f32(0)
    s3 = _f32(0)
    for j in range(16):
        xl = x[xb + j]
        xh = x[xb + 16 + j]
        q = r0[o + 4 + j]
        s0 += _f32(_u8(q & _u8(15))) * xl + _f32(_u8(q >> _u8(4))) * xh
        q = r1[o + 4 + j]
        s1 += _f32(_u8(q & _u8(15))) * xl + _f32(_u8(q >> _u8(4))) * xh
        q = r2[o + 4 + j]
        s2 += _f32(_u8(q & _u8(15))) * xl + _f32(_u8(q >> _u8(4))) * xh
        q = r3[o + 4 + j]
        s3 += _f32(_u8(q & _u8(15))) * xl + _f32(_u8(q >> _u8(4))) * xh
    c = xs[xb // 16] + xs[xb // 16 + 1]  # the min m applies to the block's sum of x
    return (half_at(r0, o) * s0 + half_at(r0, o + 2) * c,
            half_at(r1, o) * s1 + half_at(r1, o + 2) * c,
            half_at(r2, o) * s2 + half_at(r2, o + 2) * c,
            half_at(r3, o) * s3 + half_at(r3, o + 2) * c)


@njit(**INLINE_OPTIONS)
def _q4_1_decode(row, o, out, ob):
    d = half_at(row, o)
    m = half_at(row, o + 2)
    for j in range(16):
        q = row[o + 4 + j]
        out[ob + j] = _f32(_u8(q & _u8(15))) * d + m  # q * d is exact: no rounding to fuse
        out[ob + 16 + j] = _f32(_u8(q >> _u8(4))) * d + m


register(BlockKernel(GGMLType.Q4_1, "Q4_1", 32, 20, _q4_1_dot4, _q4_1_decode,
                     Q8Dot(lambda builder, block: simd.nibbles32(builder, block, 4), _d,
                           min=_m)))


# -- Q5_0: d (half), qh (uint32), 16 bytes of nibbles; q_j = lo(qs[j]) | bit j of qh << 4,
#    q_(j+16) = hi(qs[j]) | bit (j + 16) of qh << 4; element = d * (q - 16)
# -- Q5_1: d, m (halves), qh, nibbles; element = d * q + m

@njit(**INLINE_OPTIONS)
def _q5_dot1(r, o, x, xb):
    """sum_j q_j * x[xb + j] of the 5-bit values whose qh is at byte ``o`` of ``r``."""
    h = le_u32(r, o)
    h4 = _u32(h << _u32(4))  # bit j of qh at bit j + 4
    s = _f32(0)
    for j in range(16):
        q = r[o + 4 + j]
        lo = _u32(_u32(q & _u8(15)) | _shr_and16(h4, j))
        hi = _u32(_u32(q >> _u8(4)) | _shr_and16(h, j + 12))
        s += _f32(lo) * x[xb + j] + _f32(hi) * x[xb + 16 + j]
    return s


@njit(**INLINE_OPTIONS)
def _q5_0_dot4(kind, r0, r1, r2, r3, o, x, xs, xb):
    c = _f32(16) * (xs[xb // 16] + xs[xb // 16 + 1])
    return (half_at(r0, o) * (_q5_dot1(r0, o + 2, x, xb) - c),
            half_at(r1, o) * (_q5_dot1(r1, o + 2, x, xb) - c),
            half_at(r2, o) * (_q5_dot1(r2, o + 2, x, xb) - c),
            half_at(r3, o) * (_q5_dot1(r3, o + 2, x, xb) - c))


@njit(**INLINE_OPTIONS)
def _q5_0_decode(row, o, out, ob):
    d = half_at(row, o)
    h = le_u32(row, o + 2)
    h4 = _u32(h << _u32(4))
    for j in range(16):
        q = row[o + 6 + j]
        lo = _u32(_u32(q & _u8(15)) | _shr_and16(h4, j))
        hi = _u32(_u32(q >> _u8(4)) | _shr_and16(h, j + 12))
        out[ob + j] = d * _f32(np.int32(lo) - 16)
        out[ob + 16 + j] = d * _f32(np.int32(hi) - 16)


def _q5_values(qh: int, qs: int):
    """IR for the 32 5-bit quants: nibbles at byte ``qs``, bit j of the uint32 at byte ``qh``
    as bit 4 of element j."""
    def values(builder, block):
        high = simd.bits32(builder, simd.load(builder, block, simd.I32, qh), 16)
        return builder.or_(simd.nibbles32(builder, block, qs), high)
    return values


register(BlockKernel(GGMLType.Q5_0, "Q5_0", 32, 22, _q5_0_dot4, _q5_0_decode,
                     Q8Dot(_q5_values(2, 6), _d, 16)))


@njit(**INLINE_OPTIONS)
def _q5_1_dot4(kind, r0, r1, r2, r3, o, x, xs, xb):
    c = xs[xb // 16] + xs[xb // 16 + 1]
    return (half_at(r0, o) * _q5_dot1(r0, o + 4, x, xb) + half_at(r0, o + 2) * c,
            half_at(r1, o) * _q5_dot1(r1, o + 4, x, xb) + half_at(r1, o + 2) * c,
            half_at(r2, o) * _q5_dot1(r2, o + 4, x, xb) + half_at(r2, o + 2) * c,
            half_at(r3, o) * _q5_dot1(r3, o + 4, x, xb) + half_at(r3, o + 2) * c)


@njit(**INLINE_OPTIONS)
def _q5_1_decode(row, o, out, ob):
    d = half_at(row, o)
    m = half_at(row, o + 2)
    h = le_u32(row, o + 4)
    h4 = _u32(h << _u32(4))
    for j in range(16):
        q = row[o + 8 + j]
        lo = _u32(_u32(q & _u8(15)) | _shr_and16(h4, j))
        hi = _u32(_u32(q >> _u8(4)) | _shr_and16(h, j + 12))
        out[ob + j] = _f32(lo) * d + m
        out[ob + 16 + j] = _f32(hi) * d + m


register(BlockKernel(GGMLType.Q5_1, "Q5_1", 32, 24, _q5_1_dot4, _q5_1_decode,
                     Q8Dot(_q5_values(4, 8), _d, min=_m)))


# -- the 16-entry table types: a scale, 16 bytes of nibbles; element j = scale * T[lo(qs[j])],
#    j + 16 = scale * T[hi(qs[j])]
#    IQ4_NL: scale d (half), T = kvalues_iq4nl; MXFP4: scale e8m0 (1 byte, the "half" reading
#    2^(e - 128), since T = kvalues_mxfp4 holds the e2m1 values doubled)

KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
KVALUES_MXFP4 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)

_V16I8 = ir.VectorType(ir.IntType(8), 16)
_V16F32 = ir.VectorType(ir.FloatType(), 16)


def _lookup16(builder, table, idx):
    """``table[idx[i]]`` for each of the 16 lanes of ``idx`` (<16 x i8>, values < 16), as
    <16 x float> (:func:`.simd.lookup16`, one byte shuffle)."""
    vec = simd.lookup16(builder, table, idx)
    return builder.sitofp(builder.sext(vec, ir.VectorType(ir.IntType(32), 16)), _V16F32)


def _nibbles16(builder, table, q):
    """(T[lo(q)], T[hi(q)]) of the 16 bytes ``q`` (<16 x i8>)."""
    lo = _lookup16(builder, table, builder.and_(q, ir.Constant(_V16I8, [15] * 16)))
    hi = _lookup16(builder, table, builder.lshr(q, ir.Constant(_V16I8, [4] * 16)))
    return lo, hi


def _lut_dot32(values):
    """An intrinsic ``dot(r, o, x, xb)``: sum over j < 16 of T[lo(r[o + j])] * x[xb + j] +
    T[hi(r[o + j])] * x[xb + 16 + j], T = ``values``. ``r`` (uint8) and ``x`` (float32) must be
    1-d with unit strides (the caller checks)."""
    table = ir.Constant(_V16I8, list(values))

    @intrinsic
    def dot(typingctx, r, o, x, xb):
        if not (isinstance(r, types.Array) and r.dtype == types.uint8 and r.ndim == 1
                and isinstance(x, types.Array) and x.dtype == types.float32 and x.ndim == 1):
            return None

        def codegen(context, builder, signature, args):
            rty, oty, xty, xbty = signature.args
            q = builder.load(simd.vector_at(builder, simd.item_pointer(context, builder, rty, args[0],
                                                               args[1], oty), _V16I8), align=1)
            lo, hi = _nibbles16(builder, table, q)
            px = simd.item_pointer(context, builder, xty, args[2], args[3], xbty)
            xl = builder.load(simd.vector_at(builder, px, _V16F32), align=4)
            xh = builder.load(simd.vector_at(builder, px, _V16F32, 16), align=4)
            fast = ("fast",)
            v = builder.fadd(builder.fmul(lo, xl, flags=fast), builder.fmul(hi, xh, flags=fast),
                             flags=fast)
            return simd.hsum(builder, v)
        return types.float32(r, o, x, xb), codegen
    return dot


def _lut_decode32(values):
    """An intrinsic ``decode(row, o, d, out, ob)``: out[ob + j] = T[lo(row[o + j])] * d,
    out[ob + 16 + j] = T[hi(row[o + j])] * d for j < 16, T = ``values``; ``row`` and ``out``
    must be 1-d with unit strides (the caller checks)."""
    table = ir.Constant(_V16I8, list(values))

    @intrinsic
    def decode(typingctx, row, o, d, out, ob):
        if not (isinstance(row, types.Array) and row.dtype == types.uint8 and row.ndim == 1
                and isinstance(out, types.Array) and out.dtype == types.float32 and out.ndim == 1
                and d == types.float32):
            return None

        def codegen(context, builder, signature, args):
            rty, oty, _, outty, obty = signature.args
            q = builder.load(simd.vector_at(builder, simd.item_pointer(context, builder, rty, args[0],
                                                               args[1], oty), _V16I8), align=1)
            lo, hi = _nibbles16(builder, table, q)
            scale = simd.splat(builder, args[2], 16)
            p = simd.item_pointer(context, builder, outty, args[3], args[4], obty)
            builder.store(builder.fmul(lo, scale), simd.vector_at(builder, p, _V16F32), align=4)
            builder.store(builder.fmul(hi, scale), simd.vector_at(builder, p, _V16F32, 16), align=4)
            return context.get_dummy_value()
        return types.none(row, o, d, out, ob), codegen
    return decode


def _lut16(values):
    """An intrinsic ``lut(q)``: T[q & 15] as float32, T = ``values`` (for the scalar paths)."""
    table = ir.Constant(ir.VectorType(ir.FloatType(), 16), [float(v) for v in values])

    @intrinsic
    def lut(typingctx, q):
        if not isinstance(q, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            i = builder.and_(_i32(builder, args[0]), ir.Constant(ir.IntType(32), 15))
            return builder.extract_element(table, i)
        return types.float32(q), codegen
    return lut


@njit(**INLINE_OPTIONS)
def _e8m0_half_at(row, o):
    """ggml's GGML_E8M0_TO_FP32_HALF of the byte at ``o``: 2^(e - 128), exactly (e < 2: a
    denormal)."""
    e = _u32(row[o])
    if e < _u32(2):
        return f32_bits_to_f32(_u32(_u32(0x00200000) << e))
    return f32_bits_to_f32(_u32((e - _u32(1)) << _u32(23)))


def _e8m0_half(builder, block):
    """IR of :func:`_e8m0_half_at` for the block's first byte."""
    e = builder.zext(simd.load(builder, block, simd.I8), simd.I32)
    small = builder.icmp_unsigned("<", e, simd.I32(2))
    bits = builder.select(small, builder.shl(simd.I32(0x00200000), e),
                          builder.shl(builder.sub(e, simd.I32(1)), simd.I32(23)))
    return builder.bitcast(bits, simd.F32)


def _table_q8(values, scale_bytes, scale):
    """The Q8Dot of a table type: T[nibble] + 128 as the unsigned quant, offset 128."""
    shifted = ir.Constant(_V16I8, [v + 128 - 256 * (v + 128 > 127) for v in values])

    def unsigned(builder, block):
        return simd.lookup16(builder, shifted, simd.nibbles32(builder, block, scale_bytes))
    return Q8Dot(unsigned, scale, 128)


def _register_table_type(name, values, scale_bytes, scale, q8_scale):
    vdot = _lut_dot32(values)
    vdecode = _lut_decode32(values)
    lut = _lut16(values)

    @njit(**INLINE_OPTIONS)
    def dot1(r, o, x, xb):
        if r.strides[0] == 1 and x.strides[0] == 4:
            return vdot(r, o, x, xb)
        s = _f32(0)
        for j in range(16):
            q = r[o + j]
            s += lut(q) * x[xb + j] + lut(q >> _u8(4)) * x[xb + 16 + j]
        return s

    @njit(**INLINE_OPTIONS)
    def dot4(kind, r0, r1, r2, r3, o, x, xs, xb):
        p = o + scale_bytes
        return (scale(r0, o) * dot1(r0, p, x, xb), scale(r1, o) * dot1(r1, p, x, xb),
                scale(r2, o) * dot1(r2, p, x, xb), scale(r3, o) * dot1(r3, p, x, xb))

    @njit(**INLINE_OPTIONS)
    def decode(row, o, out, ob):
        d = scale(row, o)
        p = o + scale_bytes
        if row.strides[0] == 1 and out.strides[0] == 4:
            vdecode(row, p, d, out, ob)
            return
        for j in range(16):
            q = row[p + j]
            out[ob + j] = lut(q) * d
            out[ob + 16 + j] = lut(q >> _u8(4)) * d

    return register(BlockKernel(GGMLType[name], name, 32, scale_bytes + 16, dot4, decode,
                                _table_q8(values, scale_bytes, q8_scale)))


_register_table_type("IQ4_NL", KVALUES_IQ4NL, 2, half_at, _d)
_register_table_type("MXFP4", KVALUES_MXFP4, 1, _e8m0_half_at, _e8m0_half)
