"""F16 and BF16 weights, read in runs of 32 elements by the block kernels."""

from __future__ import annotations

import numpy as np
from numba import njit

from rpcserver.ggml import GGMLType

from .blocks import BlockKernel, register
from .jit import INLINE_OPTIONS, bf16_to_f32, half_to_f32, le_u16

_f32 = np.float32


def _make(name, widen):
    @njit(**INLINE_OPTIONS)
    def dot4(kind, r0, r1, r2, r3, o, x, xs, xb):
        s0 = _f32(0)
        s1 = _f32(0)
        s2 = _f32(0)
        s3 = _f32(0)
        for j in range(32):
            xv = x[xb + j]
            p = o + 2 * j
            s0 += widen(le_u16(r0, p)) * xv
            s1 += widen(le_u16(r1, p)) * xv
            s2 += widen(le_u16(r2, p)) * xv
            s3 += widen(le_u16(r3, p)) * xv
        return s0, s1, s2, s3

    @njit(**INLINE_OPTIONS)
    def decode(row, o, out, ob):
        for j in range(32):
            out[ob + j] = widen(le_u16(row, o + 2 * j))

    register(BlockKernel(GGMLType[name], name, 32, 64, dot4, decode))


_make("F16", half_to_f32)
_make("BF16", bf16_to_f32)
