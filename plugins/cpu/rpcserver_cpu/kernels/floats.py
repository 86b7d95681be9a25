"""F16 and BF16 weights, read in runs of 32 elements by the block kernels; F16 views widened.

:func:`widen_f16` is what the CPU device widens F16 tensors with (an attention step reads the
F16 KV cache through strided views): 8-15x NumPy's ``astype(float32)``, which converts halves
one at a time (0.3-0.5 G values/s here). :func:`mul_mat_f16_batches` multiplies a decode
step's queries with the F16 cache in place, without widening it.
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
def widen_f16(w, strides, out):
    """out = the F16 view as float32: the view's half bits lie in ``w`` (1-D uint16, from
    its first element) with element strides ``strides`` = (s0, s1, s2) for its first three
    axes and unit stride along the last (a view of an F16 KV cache); out (A, B, C, D)
    C-contiguous float32. Threads split the rows; each row is sliced before it is read (see
    :func:`mul_mat_f16_batches`), so the conversion vectorises."""
    n_a, n_b, n_c, n_d = out.shape
    s0, s1, s2 = strides[0], strides[1], strides[2]
    for t in prange(n_a * n_b * n_c):
        i = t // (n_b * n_c)
        j = (t // n_c) % n_b
        k = t % n_c
        start = i * s0 + j * s1 + k * s2
        row = w[start:start + n_d]
        dst = out[i, j, k]
        for m in range(n_d):
            dst[m] = half_to_f32(row[m])


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


#: cache rows one task of :func:`mul_mat_f16_batches` multiplies
_F16_BATCH_ROWS = 64


@njit(**KERNEL_OPTIONS)
def mul_mat_f16_batches(w, strides, x, out):
    """``out[i3, i2, r, m] = sum_k f16(W[i3, i2, m, k]) * x[i3, i2, r, k]``: a MUL_MAT whose
    src0 is a batched F16 view (the KV cache seen by attention), read in place.

    W is a view of the half bits in ``w`` (1-D uint16, from the view's first element) with
    element strides ``strides`` = (s3, s2, s1) and unit stride along k; x (A3, A2, R, K)
    float32, the rows of activations that share each matrix (the query heads of one KV
    head); out (A3, A2, R, M) float32. Each task takes 64 rows of one matrix. Each row is
    sliced before it is read: indexing ``w[start + k]`` directly would make numba check for
    negative indices element by element, which keeps the loop from vectorising (5x slower)."""
    n_a3, n_a2, n_r, n_m = out.shape
    n_k = x.shape[3]
    s3, s2, s1 = strides[0], strides[1], strides[2]
    n_tasks = (n_m + _F16_BATCH_ROWS - 1) // _F16_BATCH_ROWS
    for t in prange(n_a3 * n_a2 * n_tasks):
        i3 = t // (n_a2 * n_tasks)
        i2 = (t // n_tasks) % n_a2
        m0 = (t % n_tasks) * _F16_BATCH_ROWS
        for m in range(m0, min(n_m, m0 + _F16_BATCH_ROWS)):
            start = i3 * s3 + i2 * s2 + m * s1
            row = w[start:start + n_k]
            for r in range(n_r):
                xr = x[i3, i2, r]
                s = _f32(0)
                for k in range(n_k):
                    s += half_to_f32(row[k]) * xr[k]
                out[i3, i2, r, m] = s
