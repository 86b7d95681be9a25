"""The CPU plugin's numba kernels: weights read in their ggml type, never kept widened.

:func:`mul_mat_q8` multiplies activations quantized to 8 bits (:func:`quantize_q8`, as ggml
does for the 32-element types) by weight rows read block by block; :func:`mul_mat_vec` does
the same for a few float32 activation rows (the other types); :func:`dequantize_rows` widens
rows into a float32 tile that BLAS multiplies (larger batches, GET_ROWS). Each is written
once (:mod:`.blocks`, :mod:`.q8`) and specialised per type from :data:`BLOCK_KERNELS`.
"""

from __future__ import annotations

from . import floats, kquants, legacy  # noqa: F401  (registration)
from .blocks import BLOCK_KERNELS, BlockKernel, Q8Dot, dequantize_rows, mul_mat_vec, sums_of_16
from .floats import mul_mat_f16_batches, mul_mat_f32, widen_f16
from .q8 import YD_FIELDS, has_q8, mul_mat_q8, quantize_q8

__all__ = ["BLOCK_KERNELS", "YD_FIELDS", "BlockKernel", "Q8Dot", "dequantize_rows", "has_q8",
           "mul_mat_f16_batches", "mul_mat_f32", "mul_mat_q8", "mul_mat_vec", "quantize_q8",
           "sums_of_16", "widen_f16"]
