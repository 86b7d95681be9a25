"""The small ops of every layer, row by row: RMS_NORM, SOFT_MAX, ROPE's rotation, GLU,
the binary ops and SET_ROWS, on float32 rows.

A decode step runs each of these a few dozen times on a few thousand values; in NumPy each
node is 5-15 array calls and 15-120 us (measured on a 160M model, 2 cores), more than the
arithmetic by two orders of magnitude. Here a node is one call of a few microseconds.

Every kernel takes 4-D arrays in the executor's order (ne3, ne2, ne1, ne0) with any strides
(views of the buffers, results written in place) and rounds where ggml's C code rounds:
:data:`~.jit.EXACT_OPTIONS` has no fastmath, so sums run in ggml's order and precision
(``ggml_float``, a double, where ggml uses one) and no multiply-add is contracted that ggml's
build does not contract. Each walks the rows (``ne3 * ne2 * ne1`` of them, :func:`row_of`).
Scalar parameters come in small arrays (``params``), as :func:`~.launch.launch` passes arrays
only.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from rpcserver.api import GGMLType

from .jit import EXACT_OPTIONS, INLINE_OPTIONS, f32_to_half

_f32 = np.float32
_f64 = np.float64
_F16 = int(GGMLType.F16)

#: ``kind`` of :func:`binary_rows`: ggml's ADD, SUB, MUL, DIV
BINARY_ADD, BINARY_SUB, BINARY_MUL, BINARY_DIV = 0, 1, 2, 3


@njit(**INLINE_OPTIONS)
def rows_of(shape):
    """How many rows a (ne3, ne2, ne1, ne0) array has."""
    return shape[0] * shape[1] * shape[2]


@njit(**INLINE_OPTIONS)
def row_of(r, shape):
    """The index (i3, i2, i1) of row ``r`` of a (ne3, ne2, ne1, ne0) array, in C order."""
    n2, n1 = shape[1], shape[2]
    return r // (n2 * n1), (r // n1) % n2, r % n1


@njit(**EXACT_OPTIONS)
def rms_norm_rows(x, out, params):
    """``out = x / sqrt(mean(x*x) + eps)`` per row (ggml_compute_forward_rms_norm_f32: the
    squares summed in double, the mean and the scale in float); ``params = [eps]``."""
    eps = params[0]
    n0 = x.shape[3]
    for r in range(rows_of(x.shape)):
        i3, i2, i1 = row_of(r, x.shape)
        row = x[i3, i2, i1]
        dst = out[i3, i2, i1]
        s = _f64(0)
        for i0 in range(n0):
            v = row[i0]
            s += _f64(v * v)
        scale = _f32(1) / np.sqrt(_f32(s / n0) + eps)
        for i0 in range(n0):
            dst[i0] = row[i0] * scale


@njit(**EXACT_OPTIONS)
def soft_max_rows(x, mask, out, params):
    """``out = softmax(x*scale + mask)`` per row (ggml_compute_forward_soft_max_f32 without
    ALiBi or sinks: the exponentials summed in double, scaled by the float reciprocal).

    ``params = [scale, has_mask]``; mask (m3, m2, m1 >= ne1, ne0) float32, broadcast over
    dims 3 and 2 (row ``i1`` of matrix ``(i3 % m3, i2 % m2)``); ignored unless has_mask."""
    scale = params[0]
    has_mask = params[1] != 0
    n0 = x.shape[3]
    m3, m2 = mask.shape[0], mask.shape[1]
    w = np.empty(n0, np.float32)
    for r in range(rows_of(x.shape)):
        i3, i2, i1 = row_of(r, x.shape)
        row = x[i3, i2, i1]
        mx = _f32(-np.inf)
        if has_mask:
            mrow = mask[i3 % m3, i2 % m2, i1]
            for i0 in range(n0):
                v = row[i0] * scale + mrow[i0]
                w[i0] = v
                mx = v if v > mx else mx
        else:
            for i0 in range(n0):
                v = row[i0] * scale
                w[i0] = v
                mx = v if v > mx else mx
        s = _f64(0)
        for i0 in range(n0):
            e = np.exp(w[i0] - mx)
            w[i0] = e
            s += _f64(e)
        inv = _f32(1.0 / s)
        dst = out[i3, i2, i1]
        for i0 in range(n0):
            dst[i0] = w[i0] * inv


@njit(**EXACT_OPTIONS)
def rope_rows(x, cos, sin, out, pairs):
    """ROPE's rotation: for every row (token ``i2``) and pair ``k`` of channels
    ``a = pairs[0] + pairs[1]*k``, ``b = pairs[2] + pairs[3]*k``:
    ``out[a] = x[a]*cos - x[b]*sin`` and ``out[b] = x[a]*sin + x[b]*cos``, each a fused
    multiply-add of the float32 products as ggml's build computes them (the second product
    rounded first); the other channels are copied. cos, sin (tokens, pairs) float32."""
    a0, a_step, b0, b_step = pairs[0], pairs[1], pairs[2], pairs[3]
    n0 = x.shape[3]
    n_pairs = cos.shape[1]
    for r in range(rows_of(x.shape)):
        i3, i2, i1 = row_of(r, x.shape)
        c_row = cos[i2]
        s_row = sin[i2]
        row = x[i3, i2, i1]
        dst = out[i3, i2, i1]
        for i0 in range(n0):
            dst[i0] = row[i0]
        for k in range(n_pairs):
            c = c_row[k]
            s = s_row[k]
            ia = a0 + a_step * k
            ib = b0 + b_step * k
            v0 = row[ia]
            v1 = row[ib]
            dst[ia] = _f32(_f64(v0) * _f64(c) + _f64(-(v1 * s)))
            dst[ib] = _f32(_f64(v0) * _f64(s) + _f64(v1 * c))


@njit(**EXACT_OPTIONS)
def swiglu_rows(x, g, out):
    """``out = silu(x) * g`` with ggml's ``silu(x) = x / (1 + exp(-x))``."""
    n0 = x.shape[3]
    for r in range(rows_of(x.shape)):
        i3, i2, i1 = row_of(r, x.shape)
        xr = x[i3, i2, i1]
        gr = g[i3, i2, i1]
        dst = out[i3, i2, i1]
        for i0 in range(n0):
            v = xr[i0]
            dst[i0] = v / (_f32(1) + np.exp(-v)) * gr[i0]


@njit(**EXACT_OPTIONS)
def binary_rows(kind, a, b, out):
    """``out = a (op) b``, op by ``kind`` (:data:`BINARY_ADD` ...), b repeated over a as ggml
    broadcasts (each of its dims divides a's: element ``i`` reads ``b[i % b.shape]``)."""
    n0 = a.shape[3]
    b3, b2, b1, b0 = b.shape
    for r in range(rows_of(a.shape)):
        i3, i2, i1 = row_of(r, a.shape)
        ar = a[i3, i2, i1]
        br = b[i3 % b3, i2 % b2, i1 % b1]
        dst = out[i3, i2, i1]
        for i0 in range(n0):
            bv = br[i0] if b0 == n0 else br[i0 % b0]
            if kind == BINARY_ADD:
                dst[i0] = ar[i0] + bv
            elif kind == BINARY_SUB:
                dst[i0] = ar[i0] - bv
            elif kind == BINARY_MUL:
                dst[i0] = ar[i0] * bv
            else:
                dst[i0] = ar[i0] / bv


@njit(**EXACT_OPTIONS)
def set_rows_f32(kind, src, idx, dst, status):
    """SET_ROWS from float32 rows: row ``(i3, i2, i1)`` of src goes to row
    ``idx[i3 % I2, i2 % I1, i1]`` of matrix ``(i3, i2)`` of dst: float32 (``kind`` is
    GGMLType.F32), or the bits of an F16 dst as uint16 (``kind`` GGMLType.F16: rounded to
    nearest, ties to even, as ggml converts). idx (I2, I1, I0)
    int32 or int64. Nothing is written, and ``status[0] = 1``, if an index is outside dst's
    rows; else ``status[0] = 0``."""
    n0 = src.shape[3]
    k2, k1 = idx.shape[0], idx.shape[1]
    n_dst = dst.shape[2]
    for r in range(rows_of(src.shape)):
        i3, i2, i1 = row_of(r, src.shape)
        target = idx[i3 % k2, i2 % k1, i1]
        if target < 0 or target >= n_dst:
            status[0] = 1
            return
    status[0] = 0
    for r in range(rows_of(src.shape)):
        i3, i2, i1 = row_of(r, src.shape)
        s = src[i3, i2, i1]
        d = dst[i3, i2, idx[i3 % k2, i2 % k1, i1]]
        if kind == _F16:
            for i0 in range(n0):
                d[i0] = f32_to_half(s[i0])
        else:
            for i0 in range(n0):
                d[i0] = s[i0]
