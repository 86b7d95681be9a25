"""NumPy for the shared ops, with the numba kernels for weights in their ggml type.

* :meth:`CpuArrayLib.weight_product`: a matrix product reads the weight
  blocks directly. For the 32-element types the
  activations are quantized to 8 bits first, as ggml does, and
  :func:`rpcserver_cpu.kernels.mul_mat_q8` takes integer dot products, for
  any number of rows (measured 5632 x 2048 Q4_0/Q8_0, 2 threads: 70-91 G
  MAC/s from 64 to 512 rows, against 38-77 for BLAS on widened tiles); the
  other types use :func:`rpcserver_cpu.kernels.mul_mat_vec` on float32
  activations, up to :data:`MMV_MAX_COLS` rows. Larger batches of those
  return None, so the shared code widens the weights a tile of rows at a
  time and BLAS multiplies the tiles.
* :meth:`CpuArrayLib.dequantize`: widening rows (those tiles, GET_ROWS) runs
  the type's numba decoder on every thread; types without one use gguf's
  reference decoder.

A kernel is made ready on its first use (:mod:`rpcserver_cpu.kernels.launch`):
loaded from numba's disk cache at once, or compiled in the background while
the shared code computes its cases, so no request waits for the compiler.
``RPCSERVER_CPU_WAIT_FOR_KERNELS=1`` makes requests wait instead (the test
suite sets it, so the kernels are what it checks).
"""

from __future__ import annotations

import math
import os

import numpy as np

from rpcserver.api import ArrayLib, GGMLType

from . import kernels
from .kernels.launch import launch
from .ops import OVERRIDES

#: most activation rows (columns of dst) a product with float32 activations reads the weight
#: blocks for directly; above it, widening a tile once and multiplying it with BLAS is faster
MMV_MAX_COLS = 8
#: most activation rows per cache matrix :meth:`CpuArrayLib.batched_product` takes (a decode
#: step has one per query head of a KV head); above, BLAS on the widened view is faster
BATCHED_MAX_ROWS = 16
#: fewest F16 values :meth:`CpuArrayLib.widen` runs its kernel for (below, NumPy's astype)
WIDEN_MIN_VALUES = 4096


def _wait_for_kernels() -> bool:
    return os.environ.get("RPCSERVER_CPU_WAIT_FOR_KERNELS", "") not in ("", "0")


class CpuArrayLib(ArrayLib):
    name = "numpy+numba"
    #: RMS_NORM, SOFT_MAX, ROPE, GLU, SET_ROWS and the binary ops on float32 rows (.ops)
    op_overrides = OVERRIDES

    def __init__(self, threads: int):
        self.threads = threads
        self.wait = _wait_for_kernels()

    def activation_type(self, weight_type: int, n_cols: int) -> int | None:
        k = kernels.BLOCK_KERNELS.get(weight_type)
        if k is None or k.q8 is None:
            return None
        return int(GGMLType.Q8_0 if k.q8.min is None else GGMLType.Q8_1)

    def weight_product(self, ctx, w, b):
        n_k, m = w.ne[0], w.ne[1]
        n_cols = math.prod(b.shape[:-1])
        if w.type.value == GGMLType.F32:
            return self._f32_product(w, b, n_cols)
        k = kernels.BLOCK_KERNELS.get(w.type.value)
        if k is None or w.buffer is None or n_cols == 0 or n_k % k.block or n_k % 16 or m == 0:
            return None
        if k.q8 is None and n_cols > MMV_MAX_COLS:
            return None
        rows = self.view(w.buffer, w.offset, (m, w.type.row_size(n_k)), (w.nb[1], 1), np.uint8)
        x = np.ascontiguousarray(b.reshape(n_cols, n_k), dtype=np.float32)
        out = np.empty((n_cols, m), np.float32)
        if k.q8 is not None:
            qy = np.empty((n_cols, n_k), np.int8)
            yd = np.empty((n_cols, n_k // 32, kernels.YD_FIELDS), np.float32)
            ran = (launch(kernels.quantize_q8, None, x, qy, yd, wait=self.wait)
                   and launch(kernels.mul_mat_q8, w.type.value, rows, qy, yd, out,
                              threads=self.threads, wait=self.wait))
        else:
            xs = np.empty((n_cols, n_k // 16), np.float32)
            ran = (launch(kernels.sums_of_16, None, x, xs, wait=self.wait)
                   and launch(kernels.mul_mat_vec, w.type.value, rows, x, xs, out,
                              threads=self.threads, wait=self.wait))
        if not ran:
            return None  # still compiling: the shared tiled path computes it meanwhile
        return out.reshape(tuple(b.shape[:-1]) + (m,))

    def _f32_product(self, w, b, n_cols: int):
        """Decode-sized products with F32 weights (:func:`kernels.mul_mat_f32`); None for
        larger batches (BLAS multiplies the weights' view, no copy) and strided rows."""
        n_k, m = w.ne[0], w.ne[1]
        if w.buffer is None or not 0 < n_cols <= MMV_MAX_COLS or m == 0 or w.nb[0] != 4:
            return None
        rows = self.view(w.buffer, w.offset, (m, n_k), (w.nb[1], 4), np.float32)
        x = np.ascontiguousarray(b.reshape(n_cols, n_k), dtype=np.float32)
        out = np.empty((n_cols, m), np.float32)
        if not launch(kernels.mul_mat_f32, None, rows, x, out, threads=self.threads,
                      wait=self.wait):
            return None
        return out.reshape(tuple(b.shape[:-1]) + (m,))

    def batched_product(self, ctx, a, b):
        """Attention's products with an F16 KV cache, for a few rows per cache matrix (a decode
        step: the query heads sharing a KV head): :func:`kernels.mul_mat_f16_batches` reads
        the cache view in place. None otherwise (the shared code widens the view; for prompt
        batches BLAS then multiplies it faster)."""
        if a.type.value != GGMLType.F16 or a.buffer is None or b.ndim != 4:
            return None
        a3, a2, m, k = a.shape
        b3, b2, n, _ = b.shape
        if b3 % a3 or b2 % a2 or 0 in (m, k, n):
            return None
        r3, r2 = b3 // a3, b2 // a2
        rows = r3 * r2 * n
        if rows > BATCHED_MAX_ROWS:
            return None
        halves = _flat_halves(self.view(a.buffer, a.offset, a.shape, a.strides, np.uint16))
        if halves is None:
            return None
        # (A3, r3, A2, r2, N, K) -> (A3, A2, r3 * r2 * N, K): the rows sharing a matrix together
        x = np.ascontiguousarray(np.swapaxes(b.reshape(a3, r3, a2, r2, n, k), 1, 2)
                                 .reshape(a3, a2, rows, k), dtype=np.float32)
        out = np.empty((a3, a2, rows, m), np.float32)
        if not launch(kernels.mul_mat_f16_batches, None, *halves, x, out,
                      threads=self.threads, wait=self.wait):
            return None
        return np.swapaxes(out.reshape(a3, a2, r3, r2, n, m), 1, 2).reshape(b3, b2, n, m)

    def widen(self, raw, type_value: int):
        if type_value != GGMLType.F16 or raw.ndim > 4 or raw.size < WIDEN_MIN_VALUES:
            return super().widen(raw, type_value)
        src = raw.view(np.uint16)
        src = src.reshape((1,) * (4 - src.ndim) + src.shape) if src.ndim < 4 else src
        halves = _flat_halves(src)
        if halves is None:
            return super().widen(raw, type_value)
        out = np.empty(src.shape, np.float32)
        if not launch(kernels.widen_f16, None, *halves, out, threads=self.threads,
                      wait=self.wait):
            return super().widen(raw, type_value)
        return out.reshape(raw.shape)

    def dequantize(self, raw_rows, type_value: int):
        k = kernels.BLOCK_KERNELS.get(type_value)
        row_bytes = raw_rows.shape[-1]
        if k is None or row_bytes % k.nbytes:
            return super().dequantize(raw_rows, type_value)
        rows = raw_rows.reshape(-1, row_bytes)
        out = np.empty((rows.shape[0], row_bytes // k.nbytes * k.block), np.float32)
        if rows.shape[0] and not launch(kernels.dequantize_rows, type_value, rows, out,
                                        threads=self.threads, wait=self.wait):
            return super().dequantize(raw_rows, type_value)  # still compiling
        return out.reshape(tuple(raw_rows.shape[:-1]) + (out.shape[1],))


def _flat_halves(view):
    """A 4-D view of F16 bits (uint16) as the kernels read it: (its elements as one flat run
    from its first one, the element strides of its first three axes); None unless its last
    axis is contiguous and every stride is a whole number of halves."""
    st = view.strides
    if (view.size == 0 or (view.shape[3] > 1 and st[3] != 2)
            or any(n < 0 or n % 2 for n in st[:3])):
        return None
    extent = sum((n - 1) * s for n, s in zip(view.shape, st)) // 2 + 1
    flat = np.lib.stride_tricks.as_strided(view, shape=(extent,), strides=(2,))
    return flat, np.array([s // 2 for s in st[:3]], np.int64)
