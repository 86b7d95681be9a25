"""F16 and BF16 weights, read in runs of 32 elements by the block kernels; F16 views widened.

:func:`widen_f16` is what the CPU device widens F16 tensors with (an attention step reads the
F16 KV cache through strided views): 8-15x NumPy's ``astype(float32)``, which converts halves
one at a time (0.3-0.5 G values/s here).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from rpcserver.api import GGMLType

from .blocks import BlockKernel, register
from .jit import INLINE_OPTIONS, KERNEL_OPTIONS, bf16_to_f32, half_to_f32, le_u16

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


@njit(**KERNEL_OPTIONS)
def widen_f16(src, out):
    """out = src as float32: src (A, B, C, D) uint16 half bits with any strides (a view of an
    F16 KV cache), out the same shape, C-contiguous float32. Threads split the rows."""
    n_a, n_b, n_c, n_d = src.shape
    for t in prange(n_a * n_b * n_c):
        i = t // (n_b * n_c)
        j = (t // n_c) % n_b
        k = t % n_c
        for m in range(n_d):
            out[i, j, k, m] = half_to_f32(src[i, j, k, m])


@njit(**KERNEL_OPTIONS)
def mul_mat_f32(w, x, out):
    """``out[n, m] = sum_k w[m, k] * x[n, k]`` for float32 weights w (M, K) and a few
    activation rows x (N, K), out (N, M). One weight row per pass: a single stream of weight
    bytes per thread, which the hardware prefetchers follow (BLAS's sgemv reads several)."""
    for i in prange(w.shape[0]):
        row = w[i]
        for n in range(x.shape[0]):
            xn = x[n]
            s = np.float32(0)
            for k in range(row.shape[0]):
                s += row[k] * xn[k]
            out[n, i] = s
