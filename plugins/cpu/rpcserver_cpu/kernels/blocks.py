"""The block-kernel registry, and the kernels that are written once for every block type.

A weight type is described by one :class:`BlockKernel`: its block geometry
and the functions that the kernels inline for it --

* ``dot4(kind, r0, r1, r2, r3, o, x, xs, xb)``: the dot products of the block at
  byte ``o`` of four weight rows with the activations ``x[xb : xb + block]``,
  scales applied, as a tuple of four float32. ``xs`` holds the sums of ``x``
  over each run of 16 elements (``xs[i] = sum(x[16 i : 16 i + 16])``), so a
  type whose values carry an offset (``q - 8``, a min) can apply it once per
  sub-block instead of once per weight.
* ``decode(row, o, out, ob)``: the block at byte ``o`` of ``row`` as float32
  values in ``out[ob : ob + block]``, exactly as ggml's ``to_float`` gives them.
* optionally ``q8``, a :class:`Q8Dot`: how the type's blocks multiply activations
  quantized to 8 bits, which is what ggml does for the 32-element types (:mod:`.q8`).

Plain Python functions, compiled by numba when a kernel is specialised for
the type (the type number is a compile-time literal, so a model's kernels
compile only for the types it uses, once, and are cached on disk).

Each kernel here walks rows and blocks; the types' modules only describe
blocks. :func:`register` is how a module adds its types.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import numba
import numpy as np
from numba import prange, types
from numba.core import errors
from numba.extending import overload

from .jit import INLINE_OPTIONS, KERNEL_OPTIONS, SERIAL_OPTIONS


@dataclass(frozen=True)
class Q8Dot:
    """How a 32-element type's blocks multiply activations quantized to 8 bits (:mod:`.q8`).

    A weight value is ``d * (u - offset) + m``, ``u`` an unsigned quant of at most 8 bits.
    The three functions build LLVM IR (:mod:`.simd`) from the block's ``i8*`` pointer:
    ``values`` gives the 32 ``u`` as a <32 x i8> vector in element order, ``scale`` the
    float ``d``, ``min`` (None for types without one) the float ``m``.
    """

    values: Callable
    scale: Callable
    offset: int = 0
    min: Optional[Callable] = None


@dataclass(frozen=True)
class BlockKernel:
    """How the kernels read one ggml weight type."""

    type_value: int
    name: str
    #: elements per block as the kernels walk it (plain types use a run of 32 elements)
    block: int
    #: bytes per block
    nbytes: int
    dot4: Callable
    decode: Callable
    #: the product with 8-bit activations, ggml's for this type; None: float32 activations
    q8: Optional[Q8Dot] = None


#: ggml type value -> its BlockKernel; filled by the type modules through register()
BLOCK_KERNELS: dict[int, BlockKernel] = {}


def register(kernel: BlockKernel) -> BlockKernel:
    """Add ``kernel`` to :data:`BLOCK_KERNELS` (one per type)."""
    kernel = replace(kernel, type_value=int(kernel.type_value))
    if kernel.type_value in BLOCK_KERNELS:
        raise ValueError(f"{kernel.name}: a block kernel is already registered for type "
                         f"{kernel.type_value}")
    BLOCK_KERNELS[kernel.type_value] = kernel
    return kernel


def _literal_kernel(kind) -> BlockKernel:
    if not isinstance(kind, types.IntegerLiteral):
        raise errors.TypingError("the weight type must be a compile-time literal")
    try:
        return BLOCK_KERNELS[kind.literal_value]
    except KeyError:
        raise errors.TypingError(f"no block kernel for ggml type {kind.literal_value}") from None


def block_geometry(kind):
    """(elements, bytes) of one block of type ``kind``."""


def block_dot4(kind, r0, r1, r2, r3, o, x, xs, xb):
    """``BlockKernel.dot4`` of type ``kind``."""


def block_decode(kind, row, o, out, ob):
    """``BlockKernel.decode`` of type ``kind``."""


@overload(block_geometry, inline="always")
def _geometry(kind):
    k = _literal_kernel(kind)
    block, nbytes = k.block, k.nbytes
    return lambda kind: (block, nbytes)


@overload(block_dot4, inline="always", jit_options=dict(fastmath=True, error_model="numpy"))
def _dot4(kind, r0, r1, r2, r3, o, x, xs, xb):
    return _literal_kernel(kind).dot4.py_func


@overload(block_decode, inline="always", jit_options=dict(fastmath=True, error_model="numpy"))
def _decode(kind, row, o, out, ob):
    fn = _literal_kernel(kind).decode
    return lambda kind, row, o, out, ob: fn(row, o, out, ob)


@numba.njit(**KERNEL_OPTIONS)
def mul_mat_vec(kind, w, x, xs, out):
    """``out[n, m] = sum_k w[m, k] * x[n, k]`` for a few activation rows ``n``.

    w: (M, row bytes) uint8, the weight rows in their ggml type; x: (N, K) float32;
    xs: (N, K // 16) float32 sums of x over runs of 16; out: (N, M) float32.
    Four weight rows per pass share each activation load; threads split the rows.
    """
    numba.literally(kind)
    block, nbytes = block_geometry(kind)
    m_rows = w.shape[0]
    n_cols = x.shape[0]
    n_blocks = x.shape[1] // block
    for g in prange((m_rows + 3) // 4):
        i0 = 4 * g
        i1 = min(i0 + 1, m_rows - 1)
        i2 = min(i0 + 2, m_rows - 1)
        i3 = min(i0 + 3, m_rows - 1)
        r0, r1, r2, r3 = w[i0], w[i1], w[i2], w[i3]
        for n in range(n_cols):
            xn = x[n]
            sn = xs[n]
            t0 = np.float32(0)
            t1 = np.float32(0)
            t2 = np.float32(0)
            t3 = np.float32(0)
            for b in range(n_blocks):
                s0, s1, s2, s3 = block_dot4(kind, r0, r1, r2, r3, b * nbytes, xn, sn, b * block)
                t0 += s0
                t1 += s1
                t2 += s2
                t3 += s3
            out[n, i0] = t0
            if i0 + 1 < m_rows:
                out[n, i1] = t1
            if i0 + 2 < m_rows:
                out[n, i2] = t2
            if i0 + 3 < m_rows:
                out[n, i3] = t3


@numba.njit(**KERNEL_OPTIONS)
def dequantize_rows(kind, rows, out):
    """rows: (R, row bytes) uint8 in type ``kind`` -> out: (R, K) float32, as ggml's to_float."""
    numba.literally(kind)
    block, nbytes = block_geometry(kind)
    n_blocks = out.shape[1] // block
    for r in prange(rows.shape[0]):
        row = rows[r]
        dst = out[r]
        for b in range(n_blocks):
            block_decode(kind, row, b * nbytes, dst, b * block)


@numba.njit(**SERIAL_OPTIONS)
def sums_of_16(x, xs):
    """xs[n, i] = sum(x[n, 16 i : 16 i + 16]) (the ``xs`` argument of the block kernels).

    Serial: a few thousand additions, less than waking the parallel workers would cost."""
    for n in range(x.shape[0]):
        for i in range(xs.shape[1]):
            s = np.float32(0)
            for j in range(16):
                s += x[n, 16 * i + j]
            xs[n, i] = s
