"""rpcserver's CPU backend: host memory held in NumPy arrays, numba kernels for the weights.

Buffers are ``uint8`` arrays over their own anonymous memory maps, so the
network layer receives SET_TENSOR payloads straight into them, sends
GET_TENSOR replies straight out of them, and freeing a buffer hands its
pages back to the operating system at once (a heap allocation would stay
with the allocator). Weights stay in their ggml type: the kernels in
:mod:`rpcserver_cpu.kernels` read their blocks directly (see
:mod:`rpcserver_cpu.arraylib`). ``-t/--threads`` sets the kernels' threads
and caps the BLAS/OpenMP pools NumPy uses, through threadpoolctl.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import platform
import subprocess
from importlib import metadata

import numpy as np
import psutil
from threadpoolctl import threadpool_limits

from rpcserver.api import Backend, Buffer, Device, DeviceOptions, DeviceType, hookimpl

from .arraylib import CpuArrayLib
from .kernels.launch import prepare_runtime

__version__ = metadata.version("rpcserver-cpu")
log = logging.getLogger("rpcserver.cpu")

ALIGNMENT = 32  # ggml's TENSOR_ALIGNMENT, what the reference CPU buffer type reports


def cpu_model_name() -> str:
    """The CPU's marketing name, as ggml's CPU device describes itself."""
    try:
        if platform.system() == "Linux":
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        elif platform.system() == "Darwin":
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                 capture_output=True, text=True, timeout=5)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def release_freed_memory_promptly() -> None:
    """Make glibc's malloc serve large blocks from their own maps for good.

    By default glibc raises its mmap threshold each time a large block is freed, so later
    temporaries of that size come from the heap and their pages stay with the process after
    they are freed. A fixed threshold (setting it disables the adjustment) keeps every block
    of 1 MiB or more in a map of its own, returned to the system when freed.
    """
    if platform.system() != "Linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 8 << 20)
    except (OSError, AttributeError):  # not glibc: its allocator's own policy applies
        pass


class HostBuffer(Buffer):
    """``size`` bytes of host memory: a NumPy array over an anonymous memory map.

    The map is page-aligned (more than ggml's 32 bytes), its pages are only
    committed when written, and :meth:`free` unmaps it as soon as no array
    views it any more.
    """

    def __init__(self, device: "CpuDevice", size: int):
        super().__init__(device, size)
        self._map = mmap.mmap(-1, size)
        self.array = np.frombuffer(self._map, dtype=np.uint8)

    def host_view(self, offset, size):
        return memoryview(self.array[offset:offset + size])

    def write(self, offset, data):
        self.array[offset:offset + len(memoryview(data).cast("B"))] = np.frombuffer(data, np.uint8)

    def read(self, offset, size):
        return self.array[offset:offset + size].tobytes()

    def fill(self, offset, size, value):
        self.array[offset:offset + size] = value

    def copy_from(self, src, src_offset, dst_offset, size):
        self.array[dst_offset:dst_offset + size] = src.array[src_offset:src_offset + size]

    def free(self):
        self.array = None
        mapping, self._map = self._map, None
        try:
            mapping.close()  # unmapped now, unless a view is still alive (then when it dies)
        except BufferError:
            pass


class CpuDevice(Device):
    name = "CPU"
    type = DeviceType.CPU
    alignment = ALIGNMENT

    def __init__(self, threads: int):
        self.description = cpu_model_name()
        self.threads = threads
        # Keep the limiter alive: it caps BLAS/OpenMP pools for the whole process.
        self._limits = threadpool_limits(limits=threads)
        # kernels are loaded (or compiled in the background) on first use, for the types a
        # model has: rpcserver_cpu.kernels.launch
        self.array_lib = CpuArrayLib(threads)
        self._runtime_requested = False
        release_freed_memory_promptly()

    def memory(self):
        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)

    def alloc_buffer(self, size):
        if not self._runtime_requested:  # the first allocation comes before any weights
            self._runtime_requested = True
            prepare_runtime()
        free, _ = self.memory()
        if size > free:
            log.warning("CPU: refusing a %d-byte buffer, only %d bytes of host memory are free",
                        size, free)
            return None
        try:
            return HostBuffer(self, size)
        except MemoryError:
            return None


class CpuBackend(Backend):
    name = "cpu"

    def devices(self, options: DeviceOptions):
        return [CpuDevice(max(1, options.threads))]


@hookimpl
def rpcserver_backends():
    return [CpuBackend()]
