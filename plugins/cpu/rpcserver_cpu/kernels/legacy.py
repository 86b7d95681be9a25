"""Block kernels of ggml's 32-element types (Q4_0, Q8_0, ...; ggml-quants.c's block_q*)."""

from __future__ import annotations

import numpy as np
from numba import njit

from rpcserver.ggml import GGMLType

from .blocks import BlockKernel, register
from .jit import INLINE_OPTIONS, half_at

_f32 = np.float32
_u8 = np.uint8


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


register(BlockKernel(GGMLType.Q4_0, "Q4_0", 32, 18, _q4_0_dot4, _q4_0_decode))


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


register(BlockKernel(GGMLType.Q8_0, "Q8_0", 32, 34, _q8_0_dot4, _q8_0_decode))
