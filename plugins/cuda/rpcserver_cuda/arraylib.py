"""The shared executor's view of a CUDA device: CuPy arrays over device buffers."""

from __future__ import annotations

import logging
import threading

import numpy as np

from rpcserver import ggml
from rpcserver.api import ArrayLib

from . import dispatch, kernels

log = logging.getLogger("rpcserver.cuda")

#: options every module is compiled with (the generated code needs nothing else)
NVRTC_OPTIONS = ("-std=c++17",)


class KernelCache:
    """Compiled modules of one device, built on first use (CuPy caches the binaries on disk too)."""

    def __init__(self, cupy):
        self.cupy = cupy
        self._modules: dict[str, object] = {}
        self._lock = threading.Lock()

    def module(self, name: str):
        with self._lock:
            mod = self._modules.get(name)
            if mod is None:
                mod = self._modules[name] = self.cupy.RawModule(code=kernels.module_source(name),
                                                                options=NVRTC_OPTIONS)
            return mod

    def kernel(self, module: str, name: str):
        return self.module(module).get_function(name)


class CudaArrayLib(ArrayLib):
    """``xp = cupy``; buffers viewed in place; dequantization by the generated kernels.

    Weights stay in their ggml type in device memory. :meth:`weight_product` reads quantized
    weights in place for a few columns (decode); larger products return None and the shared
    code widens the weights a tile of rows at a time into scratch (within the device's
    ``scratch_bytes``, :mod:`rpcserver.device_state`) and multiplies with cuBLAS. No float32
    copy of a weight outlives the op.
    """

    name = "cupy"
    views_alias = True

    def __init__(self, device):
        from . import ops

        self.device = device
        self.cupy = device.cupy
        self.xp = device.cupy
        self.kernels = KernelCache(device.cupy)
        self._ops = ops
        self.op_overrides = ops.OVERRIDES  # the generated kernels, tried before the shared ops

    def bytes_of(self, buffer):
        return buffer.array

    def weight_product(self, ctx, w, b):
        """The fused quantized mat-vec kernel where it applies (ops.mul_mat_vec), else None."""
        return self._ops.mul_mat_vec(ctx, w, b)

    def view(self, buffer, offset, shape, strides, dtype):
        cp = self.cupy
        return cp.ndarray(tuple(shape), dtype=dtype, memptr=buffer.array.data + int(offset),
                          strides=tuple(strides))

    def to_numpy(self, a):
        return self.cupy.asnumpy(a)

    def from_numpy(self, a):
        return self.cupy.asarray(a)

    def dequantize(self, raw_rows, type_value: int):
        """(..., row bytes) uint8 device array -> (..., elements) float32 device array."""
        spec = kernels.QUANT_SPECS_BY_VALUE.get(type_value)
        if spec is None or not dispatch.kernels_enabled("dequantize"):
            if type_value not in _warned:
                _warned.add(type_value)
                log.info("%s: %s data is dequantized on the host (%s)", self.device.name,
                         ggml.TYPES[type_value].name, dispatch.DEQUANTIZE[type_value].note)
            return self.from_numpy(super().dequantize(raw_rows, type_value))
        return dequantize_on_device(self, spec, raw_rows)


_warned: set[int] = set()


def dequantize_on_device(lib: CudaArrayLib, spec, raw_rows):
    cp = lib.cupy
    rows = cp.ascontiguousarray(raw_rows)
    row_bytes = rows.shape[-1]
    if row_bytes % spec.type_size:
        raise ValueError(f"{spec.name} rows of {row_bytes} bytes are not whole blocks")
    per_row = row_bytes // spec.type_size * spec.block_size
    out = cp.empty(rows.shape[:-1] + (per_row,), dtype=cp.float32)
    n = out.size
    if n:
        threads = kernels.DEQUANT_THREADS
        blocks = min((n + threads - 1) // threads, 1 << 20)
        kern = lib.kernels.kernel(f"quant_{spec.ident}", spec.dequantize_kernel)
        kern((blocks,), (threads,), (rows, out, np.int64(n)))
    return out
