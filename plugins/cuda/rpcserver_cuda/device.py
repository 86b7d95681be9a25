"""CUDA devices and buffers, on CuPy.

Memory model
------------
A :class:`CudaBuffer` is one ``cudaMalloc`` allocation (``cupy.cuda.memory.Memory``,
outside CuPy's memory pool, so freeing a buffer returns its memory to the driver
at once and ``memory()`` sees it), wrapped as a 1-D ``cupy`` ``uint8`` array
(``buffer.array``) that the executor views with any dtype, shape and strides.

Transfers
---------
The host cannot address device memory, so ``host_view()`` is None and the
session moves tensor data through :meth:`CudaBuffer.writer` / :meth:`CudaBuffer.reader`,
at most 64 MiB per call. Both stage through page-locked (pinned) host memory
taken from a small per-device pool of reusable areas:

* SET_TENSOR: the socket receives straight into the pinned area (one copy,
  kernel to pinned memory), then one DMA copy to the device
  (``cudaMemcpyAsync`` host-to-device on a transfer stream, waited for before
  the call returns so the area can be reused and the data is visible to graphs).
* GET_TENSOR: one DMA copy device-to-pinned, then the socket sends from the
  pinned area.

That is the minimum for a GPU without GPUDirect networking. ``write``/``read``
(cache hits, the defaults) copy from/to ordinary host memory. ``fill`` is
``cudaMemsetAsync``; ``copy_from`` (COPY_TENSOR) is a device-to-device
``cudaMemcpyAsync`` (through a temporary when a buffer copies onto an
overlapping range of itself). Nothing ever leaves the device for those.

Streams and threads
-------------------
Each session thread gets its own non-blocking transfer stream per device;
graphs run on the device's worker thread, on the device's compute stream, and
are waited for before ``graph_compute`` returns. A buffer belongs to one
session, which issues one command at a time, so no buffer is written by a
transfer and a graph at once.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager

import numpy as np

from rpcserver.api import Buffer, Device, DeviceType

from .probe import GpuInfo

log = logging.getLogger("rpcserver.cuda")

#: ggml's CUDA buffer type reports 128-byte alignment
ALIGNMENT = 128
MIB = 1 << 20
#: the session moves at most this much per writer()/reader() call
MAX_TRANSFER = 64 * MIB
#: pinned staging areas kept for reuse, per device (bytes); larger sets are trimmed
STAGING_POOL_BYTES = int(os.environ.get("RPCSERVER_CUDA_STAGING_MIB", "256")) * MIB
#: bounds of a GPU's scratch budget (see :func:`scratch_bytes_for`)
SCRATCH_MIN = 256 * MIB
SCRATCH_MAX = 2048 * MIB


def scratch_bytes_for(total: int) -> int:
    """The scratch budget of a GPU with ``total`` bytes: 1/16 of it, within [256 MiB, 2 GiB].

    Scratch holds the float32 tile of a weight that a prompt-size product widens before
    cuBLAS multiplies it (rpcserver.ops.matmul.mul_mat_tiled); GET_DEVICE_MEMORY reserves
    the whole budget, so it is memory the client cannot place layers in. Why these figures:

    * Efficiency needs tiles of a few thousand rows: a tile is then a GEMM of
      rows x K x n_tokens, far above the size where cuBLAS reaches its throughput, and the
      dequantization kernel that fills it is memory-bound whatever its size. 256 MiB holds
      16384 rows at K = 4096 (a whole 7B-8B weight matrix in one tile, a 128k-row output
      projection in 8) and still 2340 rows at K = 28672 (the widest FFN in common models),
      so even the floor never makes a product launch-bound. It is also the floor because a
      small card's 1/16 would fall below it.
    * 1/16 (about 6%) of the card keeps the reserve of the order of the compute buffers
      llama.cpp allocates for prompt processing anyway (hundreds of MiB to a few GiB), so
      layer placement moves by a layer or two at most.
    * Above 2 GiB a bigger tile only saves a few launches per matrix (2 GiB widens a
      K = 8192 matrix of 65536 rows whole), while the reserve keeps growing with the card.

    ``RPCSERVER_SCRATCH_MIB`` still overrides it (rpcserver.device_state).
    """
    return max(SCRATCH_MIN, min(SCRATCH_MAX, int(total) // 16))


def _size_class(n: int) -> int:
    """Staging areas come in powers of two from 1 MiB, so a few areas serve every size."""
    size = MIB
    while size < n:
        size <<= 1
    return size


class StagingPool:
    """Reusable pinned host areas (``cupy.cuda.alloc_pinned_memory``) for one device."""

    def __init__(self, cupy, limit: int = STAGING_POOL_BYTES):
        self.cupy = cupy
        self.limit = limit
        self._free: dict[int, list] = {}
        self._kept = 0
        self._lock = threading.Lock()

    def take(self, n: int):
        size = _size_class(n)
        with self._lock:
            areas = self._free.get(size)
            if areas:
                self._kept -= size
                return areas.pop()
        return self.cupy.cuda.alloc_pinned_memory(size), size

    def give(self, area) -> None:
        mem, size = area
        with self._lock:
            if self._kept + size <= self.limit:
                self._free.setdefault(size, []).append(area)
                self._kept += size
                return
        # over the limit: dropping the last reference frees the pinned memory

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._kept = 0


class CudaBuffer(Buffer):
    """``size`` bytes of device memory, as a 1-D CuPy ``uint8`` array in ``self.array``."""

    def __init__(self, device: "CudaDevice", size: int, memory):
        super().__init__(device, size)
        cp = device.cupy
        self._memory = memory
        self.array = cp.ndarray((size,), dtype=cp.uint8,
                                memptr=cp.cuda.memory.MemoryPointer(memory, 0))
        self.ptr = int(memory.ptr)

    # -- staged transfers -----------------------------------------------------------------

    @contextmanager
    def writer(self, offset, size):
        dev = self.device
        area = dev.staging.take(size)
        try:
            host = np.frombuffer(area[0], np.uint8, size)
            yield memoryview(host)
            with dev.activate():
                stream = dev.transfer_stream()
                dev.runtime.memcpyAsync(self.ptr + offset, area[0].ptr, size,
                                        dev.runtime.memcpyHostToDevice, stream.ptr)
                stream.synchronize()
        finally:
            dev.staging.give(area)

    @contextmanager
    def reader(self, offset, size):
        dev = self.device
        area = dev.staging.take(size)
        try:
            with dev.activate():
                stream = dev.transfer_stream()
                dev.runtime.memcpyAsync(area[0].ptr, self.ptr + offset, size,
                                        dev.runtime.memcpyDeviceToHost, stream.ptr)
                stream.synchronize()
            yield memoryview(np.frombuffer(area[0], np.uint8, size))
        finally:
            dev.staging.give(area)

    # -- the rest of the Buffer interface ---------------------------------------------------

    def write(self, offset, data):
        src = np.frombuffer(data, np.uint8)
        if src.size == 0:
            return
        dev = self.device
        with dev.activate():
            stream = dev.transfer_stream()
            # pageable source: the driver stages it; synchronous with respect to the host
            dev.runtime.memcpyAsync(self.ptr + offset, src.ctypes.data, src.size,
                                    dev.runtime.memcpyHostToDevice, stream.ptr)
            stream.synchronize()

    def read(self, offset, size):
        out = np.empty(size, np.uint8)
        if size:
            dev = self.device
            with dev.activate():
                stream = dev.transfer_stream()
                dev.runtime.memcpyAsync(out.ctypes.data, self.ptr + offset, size,
                                        dev.runtime.memcpyDeviceToHost, stream.ptr)
                stream.synchronize()
        return memoryview(out)

    def fill(self, offset, size, value):
        if not size:
            return
        dev = self.device
        with dev.activate():
            stream = dev.transfer_stream()
            dev.runtime.memsetAsync(self.ptr + offset, int(value) & 0xFF, size, stream.ptr)
            stream.synchronize()

    def copy_from(self, src, src_offset, dst_offset, size):
        if not size:
            return
        dev = self.device
        with dev.activate():
            stream = dev.transfer_stream()
            s, d = src.ptr + src_offset, self.ptr + dst_offset
            if src is self and s < d + size and d < s + size and s != d:
                # overlapping ranges of one buffer: cudaMemcpy's result would be undefined
                with stream:
                    tmp = src.array[src_offset:src_offset + size].copy()
                dev.runtime.memcpyAsync(d, tmp.data.ptr, size, dev.runtime.memcpyDeviceToDevice,
                                        stream.ptr)
                stream.synchronize()
                del tmp
            elif s != d:
                dev.runtime.memcpyAsync(d, s, size, dev.runtime.memcpyDeviceToDevice, stream.ptr)
                stream.synchronize()

    def free(self):
        # (the session drops what the core prepared from this buffer first)
        self.array = None
        memory, self._memory = self._memory, None
        if memory is not None:
            with self.device.activate():
                del memory  # cudaFree


class CudaDevice(Device):
    """One CUDA GPU, as ggml's CUDA backend names and describes it."""

    type = DeviceType.GPU
    alignment = ALIGNMENT

    def __init__(self, cupy, info: GpuInfo):
        self.cupy = cupy
        self.runtime = cupy.cuda.runtime
        self.info = info
        self.index = info.index
        self.name = f"CUDA{info.index}"
        self.description = info.name
        self._local = threading.local()
        self._lock = threading.Lock()
        self._compute_stream = None
        self._staging = None
        self._array_lib = None
        self._ops = None
        #: scratch for widened weight tiles (the core's DeviceState reads it on first use)
        self.scratch_bytes = scratch_bytes_for(info.total_memory)

    # -- CUDA context helpers ----------------------------------------------------------------

    def activate(self):
        """A context manager making this GPU current for the calling thread."""
        return self.cupy.cuda.Device(self.index)

    def transfer_stream(self):
        """This thread's transfer stream on this device (call with the device active)."""
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = self.cupy.cuda.Stream(non_blocking=True)
        return stream

    @property
    def compute_stream(self):
        with self._lock:
            if self._compute_stream is None:
                with self.activate():
                    self._compute_stream = self.cupy.cuda.Stream(non_blocking=True)
            return self._compute_stream

    @property
    def staging(self) -> StagingPool:
        with self._lock:
            if self._staging is None:
                self._staging = StagingPool(self.cupy)
            return self._staging

    @property
    def array_lib(self):
        if self._array_lib is None:
            from .arraylib import CudaArrayLib

            self._array_lib = CudaArrayLib(self)
        return self._array_lib

    # -- the Device interface ------------------------------------------------------------------

    def memory(self):
        """(free, total) from ``cudaMemGetInfo``, free plus what CuPy's pool holds unused.

        The pool's unused blocks are mostly scratch of past products (widened weight tiles,
        temporaries); the next op reuses them, and :meth:`alloc_buffer` hands them back to
        the driver when a buffer would not fit otherwise, so they are free to the client. The
        session then subtracts the scratch budget ops may still take (DeviceState.reported_free).
        """
        with self.activate():
            free, total = self.runtime.memGetInfo()
            try:  # memory CuPy's pool holds but does not use is free for our purposes
                free += self.cupy.get_default_memory_pool().free_bytes()
            except Exception:  # noqa: BLE001
                pass
        return int(free), int(total)

    def alloc_buffer(self, size):
        memory = self._cuda_malloc(size)
        if memory is None and self._release_pool():
            # memory() counts what CuPy's pool holds unused (scratch tiles of past products) as
            # free, so the client may ask for it: hand it back to the driver and try again
            memory = self._cuda_malloc(size)
        if memory is None:
            return None  # the session logs the failed ALLOC_BUFFER
        return CudaBuffer(self, size, memory)

    def _cuda_malloc(self, size):
        """A ``cudaMalloc`` of ``size`` bytes (outside CuPy's pool), or None when out of memory."""
        cp = self.cupy
        try:
            with self.activate():
                return cp.cuda.memory.Memory(size)
        except (cp.cuda.memory.OutOfMemoryError, MemoryError):
            return None
        except cp.cuda.runtime.CUDARuntimeError as exc:
            if getattr(exc, "status", None) == 2:  # cudaErrorMemoryAllocation
                return None
            raise

    def _release_pool(self) -> bool:
        """Return the blocks CuPy's memory pool holds unused to the driver; whether there were any."""
        try:
            with self.activate():
                pool = self.cupy.get_default_memory_pool()
                if not pool.free_bytes():
                    return False
                pool.free_all_blocks()
            return True
        except Exception:  # noqa: BLE001 - an older CuPy, a stand-in: nothing to release
            return False

    def graph_compute(self, graph):
        from .ops import run_graph

        with self.activate():
            stream = self.compute_stream
            with stream:
                run_graph(self, graph)
            stream.synchronize()

    def close(self):
        try:
            if self._compute_stream is not None:
                self._compute_stream.synchronize()
        finally:
            if self._staging is not None:
                self._staging.clear()
