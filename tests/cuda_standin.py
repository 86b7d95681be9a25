"""A stand-in for CuPy that runs the CUDA plugin, kernels included, on the host.

The plugin's Python side (buffers and staged transfers, ``CudaArrayLib`` views, the
dequantize and op-override plumbing, every kernel launch) runs against :class:`NumpyCupy`,
whose "device memory" is host memory: pointers are real host addresses, memcpy and memset
are ctypes', array functions are NumPy's. ``RawModule`` compiles the plugin's generated
CUDA C for the host (:mod:`cuda_host`: g++ and ``cuda_host.h``), so a launch runs the very
kernel code NVRTC compiles for a GPU, after checking each argument against the kernel's C
signature. Tests take the ``cuda`` fixture: this stand-in, then (where there is one) the
real ``CUDA0``.

Importing this module also imports the plugin: the installed ``rpcserver-cuda`` when there is
one, else plugins/cuda/rpcserver_cuda straight from the source tree.
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
import types
from importlib import metadata
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest

from rpcserver import plugins
from rpcserver.hookspecs import ENTRY_POINT_GROUP

import cuda_host

REPO = Path(__file__).resolve().parent.parent
PLUGIN_DIR = REPO / "plugins" / "cuda"

#: whether rpcserver-cuda is installed as a distribution (decided before the import below)
INSTALLED = any(ep.name == "cuda" for ep in metadata.entry_points(group=ENTRY_POINT_GROUP))


def _import_from_source_tree():
    """Import plugins/cuda/rpcserver_cuda without putting plugins/cuda on sys.path (where a
    build's egg-info would make every later in-process discover() load the plugin)."""
    pkg = PLUGIN_DIR / "rpcserver_cuda"
    spec = importlib.util.spec_from_file_location("rpcserver_cuda", pkg / "__init__.py",
                                                  submodule_search_locations=[str(pkg)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["rpcserver_cuda"] = module
    spec.loader.exec_module(module)


if not INSTALLED and "rpcserver_cuda" not in sys.modules:
    _import_from_source_tree()

from rpcserver_cuda import ops, probe  # noqa: E402

CUDA_EP = EntryPoint(name="cuda", value="rpcserver_cuda", group=ENTRY_POINT_GROUP)

class _BufferArray(np.ndarray):
    """A device buffer's bytes: ``.data`` is a device pointer, as on a cupy.ndarray."""

    @property
    def data(self):
        return _Pointer(self.base_memory, self.ctypes.data - self.base_memory.ptr)

    def __array_finalize__(self, obj):
        self.base_memory = getattr(obj, "base_memory", None)


class _Memory:
    def __init__(self, fake, size):
        self.size, self.fake = 0, fake
        if fake.allocated + size > fake.capacity:
            raise fake.cuda.memory.OutOfMemoryError(size, fake.capacity - fake.allocated)
        if cuda_host.asan_active():
            # exactly `size` bytes, so AddressSanitizer's red zone starts where the buffer ends
            # and a kernel reading one byte past it is reported (malloc's 16-byte alignment is
            # enough for the kernels)
            self.bytes = np.empty(size, np.uint8)
        else:
            raw = np.empty(size + 256, np.uint8)  # cudaMalloc's 256-byte alignment
            start = (-raw.ctypes.data) % 256
            self.bytes = raw[start:start + size]
        self.ptr = self.bytes.ctypes.data
        self.size, self.fake = size, fake
        fake.allocated += size

    def __del__(self):
        self.fake.allocated -= self.size


class _Pointer:
    def __init__(self, memory, offset=0):
        self.memory, self.offset = memory, offset

    @property
    def ptr(self):
        return self.memory.ptr + self.offset

    def __add__(self, n):
        return _Pointer(self.memory, self.offset + int(n))


class _Stream:
    def __init__(self, non_blocking=False):
        self.ptr = id(self)

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


class _PinnedBytes(bytearray):
    def __init__(self, n):
        super().__init__(n)
        self.ptr = ctypes.addressof(ctypes.c_char.from_buffer(self))


class NumpyCupy(types.ModuleType):
    """Enough of the ``cupy`` module for the plugin, on host memory (see above)."""

    def __init__(self, capacity=1 << 30):
        super().__init__("cupy")
        self.capacity, self.allocated = capacity, 0
        #: kernel name -> the host-compiled kernel (with its launch count)
        self.kernels: dict[str, cuda_host.HostKernel] = {}
        fake = self

        class OutOfMemoryError(MemoryError):
            pass

        class CUDARuntimeError(RuntimeError):
            status = 0

        def memcpy(dst, src, n, kind, stream):
            ctypes.memmove(dst, src, n)

        def memset(ptr, value, n, stream):
            ctypes.memset(ptr, value, n)

        runtime = types.SimpleNamespace(
            memcpyAsync=memcpy, memsetAsync=memset, memcpyHostToDevice=1, memcpyDeviceToHost=2,
            memcpyDeviceToDevice=3, CUDARuntimeError=CUDARuntimeError,
            memGetInfo=lambda: (fake.capacity - fake.allocated, fake.capacity))
        memory = types.SimpleNamespace(Memory=lambda size: _Memory(fake, size),
                                       MemoryPointer=_Pointer, OutOfMemoryError=OutOfMemoryError)

        class Device:
            def __init__(self, index):
                pass

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                pass

        self.cuda = types.SimpleNamespace(memory=memory, runtime=runtime, Device=Device,
                                          Stream=_Stream, alloc_pinned_memory=_PinnedBytes)

    def __getattr__(self, name):  # everything else is NumPy's
        return getattr(np, name)

    def ndarray(self, shape, dtype=np.uint8, memptr=None, strides=None):
        mem = memptr.memory
        if memptr.offset == 0 and tuple(shape) == (mem.size,) and np.dtype(dtype) == np.uint8:
            arr = mem.bytes.view(_BufferArray)
            arr.base_memory = mem
            return arr
        return np.ndarray(shape, dtype, buffer=mem.bytes, offset=memptr.offset, strides=strides)

    def asnumpy(self, a):
        return np.asarray(a)

    def get_default_memory_pool(self):
        return types.SimpleNamespace(free_bytes=lambda: 0, free_all_blocks=lambda stream=None: None)

    def RawModule(self, code, options=()):  # noqa: N802 - CuPy's name
        """The module compiled for the host; its kernels count their launches."""
        fake, module = self, cuda_host.HostModule(code)

        class Module:
            def get_function(self, name):
                if name not in fake.kernels:
                    fake.kernels[name] = module.get_function(name)
                return fake.kernels[name]

        return Module()


# ============================================================================ on a GPU (and on
# the NumPy-backed CuPy)

_CUDA_DEVICE = None


def cuda_device():
    """CUDA0 from the plugin, or skip: "no CUDA device" (with the plugin's reason)."""
    global _CUDA_DEVICE
    if _CUDA_DEVICE is None:
        registry = plugins.discover(entry_points=[CUDA_EP])
        entry = registry.find("CUDA0")
        if entry is None:
            reason = dict(registry.unavailable).get("cuda", "?")
            pytest.skip(f"no CUDA device ({reason})")
        _CUDA_DEVICE = entry.device
    return _CUDA_DEVICE


def fake_device(capacity=1 << 30):
    """The plugin's CudaDevice on :class:`NumpyCupy` (skips when there is no C++ compiler)."""
    from rpcserver_cuda.device import CudaDevice

    if cuda_host.compiler() is None:
        pytest.skip("no C++ compiler (g++) to run the CUDA kernels on the host")

    device = CudaDevice(NumpyCupy(capacity), probe.GpuInfo(0, "NumPy stand-in for a GPU", capacity,
                                                           (8, 0)))
    device.name = "CUDA-host"  # not CUDA0: a real GPU's device may be served beside it
    device.description = "the CUDA plugin, kernels compiled for the host (tests/cuda_standin.py)"
    return device


@pytest.fixture(params=["numpy-cupy", "CUDA0"])
def cuda(request):
    """The plugin's device on the NumPy-backed CuPy, then (where there is one) the real CUDA0."""
    device = fake_device() if request.param == "numpy-cupy" else cuda_device()
    yield device
    # a kernel that failed to build is switched off with a warning and the shared code runs:
    # right answers, but not the kernels under test
    assert not ops._disabled, f"kernel families switched off after a build failure: {ops._disabled}"


@pytest.fixture
def gpu():
    """A real CUDA0 only (serving it from a subprocess, timings...)."""
    return cuda_device()


def launches(device, name) -> int:
    """How often kernel ``name`` ran on the stand-in (-1 on a GPU, or when never looked up)."""
    kernels_ = getattr(device.cupy, "kernels", None)
    return kernels_[name].launches if kernels_ is not None and name in kernels_ else -1
