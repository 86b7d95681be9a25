"""Products with the activations quantized to 8 bits, as ggml's CPU backend computes them.

For a weight of a 32-element type ggml does not multiply float32 activations: it first
quantizes them, 32 at a time, to Q8_0 or Q8_1 (``d = max|x| / 127``, ``q = round(x / d)``,
``s = d * sum(q)``) and then takes integer dot products of the weight's quants with ``q``.
:func:`quantize_q8` does that quantization the way ggml's x86 code does (``127 / max`` as the
reciprocal, round half to even, ``d`` and ``s`` stored as halves), so the products below see
the activations ggml sees.

:func:`mul_mat_q8` then takes the dot products a tile at a time, each tile one loop written
as vector IR (:func:`_tile_intrinsic`): per block, the type's :class:`~.blocks.Q8Dot`
unpacks 32 unsigned quants ``u`` of each weight row (``w = d (u - offset) [+ m]``),
:func:`.simd.udot4` multiplies them with each activation row's 32 bytes into 8 int32 lanes
(one ``vpdpbusd`` with VNNI, started at ``-offset`` times the lane's activations, so the
offset costs nothing), and the lanes accumulate in float32 scaled by ``dy`` and ``d``; a
min is applied once per block through ``s``.

* Decode (fewer than 4 activation rows): one weight row per pass. A single stream of weight
  bytes per thread is what the hardware prefetchers follow: on this 2-core machine a decode
  step's weights (1.7B parameters, Q4_0) streamed at 26 GB/s this way, against 12 GB/s for
  four interleaved rows.
* Batches: 4 x 4 tiles (each unpacked block serves four activation rows, each activation
  block four weight rows): 5632 x 2048 Q4_0/Q8_0 at 70-91 G multiply-adds/s from 64 to 512
  activation rows, more than BLAS reaches on the same weights widened to float32.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange, types
from numba.core import cgutils, errors
from numba.extending import intrinsic, overload

from . import simd
from .blocks import BLOCK_KERNELS, Q8Dot, _literal_kernel
from .jit import KERNEL_OPTIONS, SERIAL_OPTIONS, f32_bits_to_f32

#: 32-bit fields per block in the activation scales array ``yd`` (float32): d, d * sum(q)
#: (exact), the same as ggml's Q8_1 keeps it (a half of the unrounded d times sum(q)), padding,
#: then the eight sums of four consecutive q as int32 bit patterns (what an offset subtracts
#: from each lane of :func:`.simd.udot4`)
YD_FIELDS = 12
#: bytes ahead of the block being multiplied that each row dot product prefetches
PREFETCH_BYTES = 256


@intrinsic
def _round_to_half(typingctx, value):
    """float32 ``value`` rounded to the nearest IEEE half (what a ggml_half field keeps)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return simd.round_to_half(builder, args[0])
    return types.float32(types.float32), codegen


@numba.njit(**SERIAL_OPTIONS)
def quantize_q8(x, qy, yd):
    """x: (N, K) float32 -> qy: (N, K) int8 and yd: (N, K // 32, YD_FIELDS) float32.

    Serial: an activation row is a few thousand values, less than waking the workers costs.
    """
    for n in range(x.shape[0]):
        for b in range(x.shape[1] // 32):
            base = 32 * b
            amax = np.float32(0)
            for j in range(32):
                amax = max(amax, abs(x[n, base + j]))
            d = amax / np.float32(127)
            inv = np.float32(127) / amax if amax != np.float32(0) else np.float32(0)
            total = 0
            for j in range(32):
                q = np.int32(np.rint(x[n, base + j] * inv))
                qy[n, base + j] = q
                total += q
            dh = _round_to_half(d)
            yd[n, b, 0] = dh
            yd[n, b, 1] = dh * np.float32(total)
            yd[n, b, 2] = _round_to_half(d * np.float32(total))
            yd[n, b, 3] = np.float32(0)
            for lane in range(8):
                four = (np.int32(qy[n, base + 4 * lane]) + np.int32(qy[n, base + 4 * lane + 1])
                        + np.int32(qy[n, base + 4 * lane + 2])
                        + np.int32(qy[n, base + 4 * lane + 3]))
                yd[n, b, 4 + lane] = f32_bits_to_f32(np.uint32(four & 0xFFFFFFFF))


def _rows(context, builder, aryty, ary, first, count):
    """``i8*`` pointers to rows ``first .. first + count - 1`` of a 2-d or 3-d array."""
    a = context.make_array(aryty)(context, builder, ary)
    data = builder.bitcast(a.data, simd.I8.as_pointer())
    stride = cgutils.unpack_tuple(builder, a.strides)[0]
    first = context.cast(builder, first[0], first[1], types.intp)
    return [simd.at(builder, data, builder.mul(builder.add(first, simd.I64(k)), stride))
            for k in range(count)]


def _tile_intrinsic(spec: Q8Dot, nbytes: int, n_rows: int, n_cols: int):
    """An intrinsic ``tile(w, i, qy, yd, n, n_blocks)``: the float32 dot products of weight
    rows ``w[i : i + n_rows]`` (n_blocks blocks of ``nbytes``, unit stride within a row) with
    quantized activation rows ``qy[n : n + n_cols]`` (int8, contiguous rows) and their scales
    ``yd[n : n + n_cols]`` ((n_blocks, YD_FIELDS) float32, contiguous), as a tuple indexed
    ``r * n_cols + c``. Each block's quants are unpacked once for all the columns."""

    @intrinsic
    def tile(typingctx, w, i, qy, yd, n, n_blocks):
        if not (isinstance(w, types.Array) and w.dtype == types.uint8 and w.ndim == 2
                and isinstance(qy, types.Array) and qy.dtype == types.int8 and qy.ndim == 2
                and isinstance(yd, types.Array) and yd.dtype == types.float32 and yd.ndim == 3
                and all(isinstance(v, types.Integer) for v in (i, n, n_blocks))):
            return None

        def codegen(context, builder, signature, args):
            wty, ity, qty, ydty, nty, bty = signature.args
            rows = _rows(context, builder, wty, args[0], (args[1], ity), n_rows)
            ys = _rows(context, builder, qty, args[2], (args[4], nty), n_cols)
            fields = _rows(context, builder, ydty, args[3], (args[4], nty), n_cols)
            count = context.cast(builder, args[5], bty, types.intp)
            f32x8 = simd.vec(simd.F32, 8)
            i32x8 = simd.vec(simd.I32, 8)
            pairs = [(r, c) for r in range(n_rows) for c in range(n_cols)]

            def zeros(ty, value):
                slot = builder.alloca(ty)
                builder.store(value, slot)
                return slot
            acc = {p: zeros(f32x8, simd.const(f32x8, [0.0] * 8)) for p in pairs}
            mins = {p: zeros(simd.F32, simd.F32(0.0)) for p in pairs}  # sum of m * s

            def add(slot, value):
                builder.store(builder.fadd(builder.load(slot), value, flags=simd.FAST), slot)
            with cgutils.for_range(builder, count) as loop:
                b = loop.index
                blocks = [simd.at(builder, row, builder.mul(b, simd.I64(nbytes))) for row in rows]
                for block in blocks:
                    simd.prefetch(builder, block, PREFETCH_BYTES)
                u = [spec.values(builder, block) for block in blocks]
                d = [simd.splat(builder, spec.scale(builder, block), 8) for block in blocks]
                m = [spec.min(builder, block) for block in blocks] if spec.min else None
                yoff = builder.mul(b, simd.I64(32))
                foff = builder.mul(b, simd.I64(4 * YD_FIELDS))
                for c in range(n_cols):
                    q = simd.load(builder, simd.at(builder, ys[c], yoff), simd.vec(simd.I8, 32))
                    f = simd.at(builder, fields[c], foff)
                    dy = simd.splat(builder, simd.load(builder, f, simd.F32), 8)
                    # the offset enters as the dot product's starting value: -offset times
                    # each lane's four activations
                    start = None
                    if spec.offset:
                        start = builder.mul(simd.load(builder, f, i32x8, 16),
                                            simd.const(i32x8, [-spec.offset] * 8))
                    s = simd.load(builder, f, simd.F32, 8) if m is not None else None
                    for r in range(n_rows):
                        dots = simd.udot4(builder, u[r], q, start)
                        products = builder.fmul(builder.sitofp(dots, f32x8), dy, flags=simd.FAST)
                        add(acc[r, c], builder.fmul(products, d[r], flags=simd.FAST))
                        if m is not None:
                            add(mins[r, c], builder.fmul(m[r], s, flags=simd.FAST))
            out = []
            for p in pairs:
                total = simd.hsum(builder, builder.load(acc[p]))
                out.append(builder.fadd(total, builder.load(mins[p])))
            return context.make_tuple(builder, signature.return_type, out)
        return types.UniTuple(types.float32, n_rows * n_cols)(w, i, qy, yd, n, n_blocks), codegen
    return tile


_TILES: dict[tuple, object] = {}


def _tile_for(kind, n_rows: int, n_cols: int):
    k = _literal_kernel(kind)
    if k.q8 is None:
        raise errors.TypingError(f"no 8-bit product for ggml type {kind.literal_value}")
    key = (k.type_value, n_rows, n_cols)
    fn = _TILES.get(key)
    if fn is None:
        fn = _TILES[key] = _tile_intrinsic(k.q8, k.nbytes, n_rows, n_cols)
    return fn


def _tile_function(n_rows: int, n_cols: int):
    """``dot_RxC(kind, w, i, qy, yd, n, n_blocks)``: the type's :func:`_tile_intrinsic`."""
    def dot(kind, w, i, qy, yd, n, n_blocks):
        """Dot products of an n_rows x n_cols tile (see _tile_intrinsic)."""

    @overload(dot, inline="always")
    def _dot(kind, w, i, qy, yd, n, n_blocks):
        fn = _tile_for(kind, n_rows, n_cols)
        return lambda kind, w, i, qy, yd, n, n_blocks: fn(w, i, qy, yd, n, n_blocks)
    return dot


#: the tiles the kernel uses: one row by one column (decode), four rows by four columns
#: (batches) and the edge of the latter
dot_1x1 = _tile_function(1, 1)
dot_4x4 = _tile_function(4, 4)
dot_4x1 = _tile_function(4, 1)
#: fewest activation rows for which the kernel walks 4 x 4 tiles
TILE_MIN_COLS = 4


@numba.njit(**KERNEL_OPTIONS)
def mul_mat_q8(kind, w, qy, yd, out):
    """``out[n, m] = sum_k w[m, k] * y[n, k]``, y the activations :func:`quantize_q8` made.

    w: (M, row bytes) uint8 in type ``kind``, unit stride within a row; qy: (N, K) int8;
    yd: (N, K // 32, YD_FIELDS) float32, both C-contiguous; out: (N, M) float32. Threads
    split the rows.
    """
    numba.literally(kind)
    m_rows = w.shape[0]
    n_cols = qy.shape[0]
    n_blocks = qy.shape[1] // 32
    if n_cols < TILE_MIN_COLS:
        for i in prange(m_rows):
            for n in range(n_cols):
                out[n, i] = dot_1x1(kind, w, i, qy, yd, n, n_blocks)[0]
        return
    for g in prange((m_rows + 3) // 4):
        i = 4 * g
        if i + 4 > m_rows:  # the last 1-3 rows
            for r in range(i, m_rows):
                for n in range(n_cols):
                    out[n, r] = dot_1x1(kind, w, r, qy, yd, n, n_blocks)[0]
            continue
        n = 0
        while n + 4 <= n_cols:
            t = dot_4x4(kind, w, i, qy, yd, n, n_blocks)
            for c in range(4):
                for r in range(4):
                    out[n + c, i + r] = t[4 * r + c]
            n += 4
        while n < n_cols:
            t1 = dot_4x1(kind, w, i, qy, yd, n, n_blocks)
            for r in range(4):
                out[n, i + r] = t1[r]
            n += 1


def has_q8(type_value: int) -> bool:
    k = BLOCK_KERNELS.get(type_value)
    return k is not None and k.q8 is not None


__all__ = ["YD_FIELDS", "has_q8", "mul_mat_q8", "quantize_q8"]
