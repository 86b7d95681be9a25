"""rpcserver's CPU backend: host memory held in NumPy arrays.

Buffers are aligned ``uint8`` arrays, so the network layer receives
SET_TENSOR payloads straight into them and sends GET_TENSOR replies
straight out of them. ``-t/--threads`` caps the BLAS/OpenMP pools NumPy
uses, through threadpoolctl.
"""

from __future__ import annotations

import logging
import platform
import subprocess
from importlib import metadata

import numpy as np
import psutil
from threadpoolctl import threadpool_limits

from rpcserver.device import Backend, Buffer, Device, DeviceOptions, DeviceType
from rpcserver.hookspecs import hookimpl

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


class HostBuffer(Buffer):
    """``size`` bytes of host memory: a 32-byte-aligned slice of a NumPy array."""

    def __init__(self, device: "CpuDevice", size: int):
        super().__init__(device, size)
        raw = np.empty(size + ALIGNMENT, dtype=np.uint8)
        start = (-raw.ctypes.data) % ALIGNMENT
        self.array = raw[start:start + size]

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


class CpuDevice(Device):
    name = "CPU"
    type = DeviceType.CPU
    alignment = ALIGNMENT

    def __init__(self, threads: int):
        self.description = cpu_model_name()
        self.threads = threads
        # Keep the limiter alive: it caps BLAS/OpenMP pools for the whole process.
        self._limits = threadpool_limits(limits=threads)

    def memory(self):
        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)

    def alloc_buffer(self, size):
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
