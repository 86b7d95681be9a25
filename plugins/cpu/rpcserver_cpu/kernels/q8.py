"""Products with the activations quantized to 8 bits, as ggml's CPU backend computes them.

For a weight of a 32-element type ggml does not multiply float32 activations: it first
quantizes them, 32 at a time, to Q8_0 or Q8_1 (``d = max|x| / 127``, ``q = round(x / d)``,
``s = d * sum(q)``) and then takes integer dot products of the weight's quants with ``q``.
:func:`quantize_q8` does that quantization the way ggml's x86 code does (``127 / max`` as the
reciprocal, round half to even, ``d`` and ``s`` stored as halves), so the products below see
the activations ggml sees.

:func:`mul_mat_q8` then walks one weight row at a time (threads split the rows). A row's dot
product is one loop written as vector IR (:func:`_row_dot_intrinsic`): per block, the type's
:class:`~.blocks.Q8Dot` unpacks 32 unsigned quants ``u`` (``w = d (u - offset) [+ m]``),
:func:`.simd.udot4` multiplies them with the 32 activation bytes into 8 int32 lanes (one
``vpdpbusd`` with VNNI), and the lanes accumulate in float32 scaled by ``d * dy``; the offset
and min terms are applied once per block through ``s``. One row per pass keeps a single
stream of weight bytes per thread, which the hardware prefetchers follow: on this 2-core
machine a decode step's weights (1.7B parameters, Q4_0) streamed at 26 GB/s this way, against
12 GB/s for four interleaved rows.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange, types
from numba.core import cgutils, errors
from numba.extending import intrinsic, overload

from . import simd
from .blocks import BLOCK_KERNELS, Q8Dot
from .jit import KERNEL_OPTIONS, SERIAL_OPTIONS

#: floats per block in the activation scales array ``yd``: d, d*sum(q) (exact), the same as
#: ggml's Q8_1 keeps it (a half of the unrounded d times sum(q)), padding
YD_FIELDS = 4
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


def _row_dot_intrinsic(spec: Q8Dot, nbytes: int):
    """An intrinsic ``dot(row, qy, yd, n_blocks)``: the float32 dot product of the weight
    ``row`` (n_blocks blocks of ``nbytes``, uint8, unit stride) with quantized activations
    ``qy`` (int8) and their scales ``yd`` ((n_blocks, YD_FIELDS) float32), both contiguous."""

    @intrinsic
    def dot(typingctx, row, qy, yd, n_blocks):
        if not (isinstance(row, types.Array) and row.dtype == types.uint8 and row.ndim == 1
                and isinstance(qy, types.Array) and qy.dtype == types.int8
                and isinstance(yd, types.Array) and yd.dtype == types.float32
                and isinstance(n_blocks, types.Integer)):
            return None

        def codegen(context, builder, signature, args):
            rty, qty, ydty, nty = signature.args
            w = simd.array_data(context, builder, rty, args[0])
            y = simd.array_data(context, builder, qty, args[1])
            ys = simd.array_data(context, builder, ydty, args[2])
            count = context.cast(builder, args[3], nty, types.intp)
            f32x8 = simd.vec(simd.F32, 8)
            acc = builder.alloca(f32x8)
            builder.store(simd.const(f32x8, [0.0] * 8), acc)
            corr = builder.alloca(simd.F32)  # sum of d * s: the offset's share
            builder.store(simd.F32(0.0), corr)
            mins = builder.alloca(simd.F32)  # sum of m * s: the mins' share
            builder.store(simd.F32(0.0), mins)
            with cgutils.for_range(builder, count) as loop:
                b = loop.index
                block = simd.at(builder, w, builder.mul(b, simd.I64(nbytes)))
                simd.prefetch(builder, block, PREFETCH_BYTES)
                fields = simd.at(builder, ys, builder.mul(b, simd.I64(4 * YD_FIELDS)))
                dy = simd.load(builder, fields, simd.F32)
                q = simd.load(builder, simd.at(builder, y, builder.mul(b, simd.I64(32))),
                              simd.vec(simd.I8, 32))
                d = spec.scale(builder, block)
                products = builder.sitofp(simd.udot4(builder, spec.values(builder, block), q),
                                          f32x8)
                scale = simd.splat(builder, builder.fmul(d, dy, flags=simd.FAST), 8)
                builder.store(builder.fadd(builder.load(acc),
                                           builder.fmul(products, scale, flags=simd.FAST),
                                           flags=simd.FAST), acc)
                if spec.offset:
                    s = simd.load(builder, fields, simd.F32, 4)
                    builder.store(builder.fadd(builder.load(corr),
                                               builder.fmul(d, s, flags=simd.FAST),
                                               flags=simd.FAST), corr)
                if spec.min is not None:
                    s = simd.load(builder, fields, simd.F32, 8)
                    builder.store(builder.fadd(builder.load(mins),
                                               builder.fmul(spec.min(builder, block), s,
                                                            flags=simd.FAST),
                                               flags=simd.FAST), mins)
            total = simd.hsum(builder, builder.load(acc))
            total = builder.fsub(total, builder.fmul(simd.F32(float(spec.offset)),
                                                     builder.load(corr)))
            return builder.fadd(total, builder.load(mins))
        return types.float32(row, qy, yd, n_blocks), codegen
    return dot


_ROW_DOTS: dict[int, object] = {}


def _row_dot_for(kind):
    if not isinstance(kind, types.IntegerLiteral):
        raise errors.TypingError("the weight type must be a compile-time literal")
    k = BLOCK_KERNELS.get(kind.literal_value)
    if k is None or k.q8 is None:
        raise errors.TypingError(f"no 8-bit product for ggml type {kind.literal_value}")
    fn = _ROW_DOTS.get(k.type_value)
    if fn is None:
        fn = _ROW_DOTS[k.type_value] = _row_dot_intrinsic(k.q8, k.nbytes)
    return fn


def row_q8_dot(kind, row, qy, yd, n_blocks):
    """The dot product of one weight row of type ``kind`` with quantized activations."""


@overload(row_q8_dot, inline="always")
def _row_q8_dot(kind, row, qy, yd, n_blocks):
    fn = _row_dot_for(kind)
    return lambda kind, row, qy, yd, n_blocks: fn(row, qy, yd, n_blocks)


@numba.njit(**KERNEL_OPTIONS)
def mul_mat_q8(kind, w, qy, yd, out):
    """``out[n, m] = sum_k w[m, k] * y[n, k]``, y the activations :func:`quantize_q8` made.

    w: (M, row bytes) uint8 in type ``kind``, unit stride within a row; qy: (N, K) int8;
    yd: (N, K // 32, YD_FIELDS) float32; out: (N, M) float32. Threads split the rows.
    """
    numba.literally(kind)
    n_blocks = qy.shape[1] // 32
    for i in prange(w.shape[0]):
        row = w[i]
        for n in range(qy.shape[0]):
            out[n, i] = row_q8_dot(kind, row, qy[n], yd[n], n_blocks)


def has_q8(type_value: int) -> bool:
    k = BLOCK_KERNELS.get(type_value)
    return k is not None and k.q8 is not None


__all__ = ["YD_FIELDS", "has_q8", "mul_mat_q8", "quantize_q8", "row_q8_dot"]
