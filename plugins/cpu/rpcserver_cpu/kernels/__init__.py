"""The CPU plugin's numba kernels: weights read in their ggml type, never kept widened.

:func:`mul_mat_vec` multiplies a few activation rows (decode) by weight rows
read block by block; :func:`dequantize_rows` widens rows into a float32 tile
that BLAS multiplies (prompt batches, GET_ROWS). Both are written once
(:mod:`.blocks`) and specialised per type from :data:`BLOCK_KERNELS`.
"""

from __future__ import annotations

from . import floats, kquants, legacy  # noqa: F401  (registration)
from .blocks import BLOCK_KERNELS, BlockKernel, dequantize_rows, mul_mat_vec, sums_of_16

__all__ = ["BLOCK_KERNELS", "BlockKernel", "dequantize_rows", "mul_mat_vec", "sums_of_16"]
