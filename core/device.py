"""The device interface every backend plugin implements.

A :class:`Backend` (one per plugin) enumerates :class:`Device` objects. A
device hands out :class:`Buffer` objects: flat ranges of device memory
addressed by byte offset, exactly what ggml's backend buffers are. The
server never sees a pointer: it checks every (offset, size) against the
buffer before calling into the plugin, so an implementation may assume its
arguments are in range.

The interface is shaped so that three very different array libraries fit:

* NumPy (CPU): a buffer is one aligned ``uint8`` array; :meth:`Buffer.host_view`
  exposes it so the network layer receives straight into it.
* CuPy (CUDA): a buffer is a ``cupy`` ``uint8`` array in device memory; it has no
  host view, so transfers go through :meth:`Buffer.writer` / :meth:`Buffer.reader`,
  which a CUDA plugin overrides to stage through pinned host memory.
* MLX (Metal / MLX CPU): arrays are immutable and lazily evaluated; a buffer
  keeps an MLX array plus its own bookkeeping and implements
  :meth:`write`/:meth:`read`/:meth:`fill` by producing new arrays.

Graph execution (:meth:`Device.graph_compute`) receives a validated
:class:`rpcserver.graph.Graph`; how ops map onto the array library is the
executor's business (see docs/architecture.md).
"""

from __future__ import annotations

import itertools
import os
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Iterator

from . import ggml

if TYPE_CHECKING:  # pragma: no cover
    from .graph import Graph
    from .protocol import RpcTensor


class DeviceType(IntEnum):
    """enum ggml_backend_dev_type."""

    CPU = 0    # system memory, computed on the host CPU
    GPU = 1    # dedicated device memory
    IGPU = 2   # integrated GPU sharing host memory
    ACCEL = 3  # accelerator used together with the CPU (BLAS, AMX...)

    @property
    def label(self) -> str:
        return {0: "cpu", 1: "gpu", 2: "igpu", 3: "accelerator"}[self.value]


def default_threads() -> int:
    """Half the cores, as llama.cpp's rpc-server defaults to."""
    return max(1, (os.cpu_count() or 2) // 2)


@dataclass
class DeviceOptions:
    """What the server's command line tells backends when they enumerate devices."""

    threads: int = field(default_factory=default_threads)


_buffer_serials = itertools.count(1)


class Buffer(ABC):
    """``size`` bytes of memory on ``device``.

    Offsets and sizes passed to these methods have already been checked by
    the server: ``0 <= offset`` and ``offset + size <= self.size``.
    """

    def __init__(self, device: "Device", size: int):
        self.device = device
        self.size = size
        #: unique for the server's lifetime (unlike id()), keys prepared forms
        self.serial = next(_buffer_serials)
        #: bumped on every write from the network; keys prepared forms of the contents
        #: (rpcserver.device_state)
        self.generation = 0

    def mark_written(self) -> None:
        """Record that the contents changed outside a graph (invalidates prepared forms)."""
        self.generation += 1

    @abstractmethod
    def write(self, offset: int, data) -> None:
        """Copy the host bytes ``data`` (any buffer-protocol object) to ``offset``."""

    @abstractmethod
    def read(self, offset: int, size: int):
        """Return ``size`` bytes from ``offset`` as a host buffer-protocol object."""

    @abstractmethod
    def fill(self, offset: int, size: int, value: int) -> None:
        """Set ``size`` bytes from ``offset`` to the byte ``value``."""

    @abstractmethod
    def copy_from(self, src: "Buffer", src_offset: int, dst_offset: int, size: int) -> None:
        """Copy ``size`` bytes from ``src`` (a buffer of the same device) into this buffer."""

    def free(self) -> None:
        """Release the memory. The server never touches the buffer afterwards."""

    def host_view(self, offset: int, size: int) -> memoryview | None:
        """A writable memoryview aliasing the buffer's bytes, if they live in host memory.

        Returning a view lets the network layer receive and send without any
        intermediate copy. Devices whose memory the host cannot address return None.
        """
        return None

    @contextmanager
    def writer(self, offset: int, size: int) -> Iterator[memoryview]:
        """Host memory for the caller to fill with ``size`` bytes bound for ``offset``.

        With a host view the bytes land in place as they are written; otherwise
        they are staged and committed when the ``with`` block exits normally
        (and dropped if it raises). The default stages through a plain
        bytearray; a device with faster staging (pinned memory) overrides it.
        """
        view = self.host_view(offset, size)
        if view is not None:
            yield view
            return
        staging = bytearray(size)
        yield memoryview(staging)
        self.write(offset, staging)

    @contextmanager
    def reader(self, offset: int, size: int) -> Iterator[memoryview]:
        """The ``size`` bytes at ``offset`` as host memory, valid inside the ``with`` block."""
        view = self.host_view(offset, size)
        if view is not None:
            yield view
            return
        yield memoryview(self.read(offset, size)).cast("B")


class Device(ABC):
    """One ggml-style device, as the RPC protocol exposes it."""

    #: ggml-style name: "CPU", "CUDA0", "MTL0", ...
    name: str = "?"
    #: human-readable description (CPU model, GPU name)
    description: str = ""
    type: DeviceType = DeviceType.CPU
    #: required alignment of every tensor's data address, in bytes
    alignment: int = 32
    #: largest single buffer the device can allocate, in bytes
    max_buffer_size: int = 2**64 - 1
    #: the array library graphs compute with (None: NumPy); see rpcserver.executor.ArrayLib
    array_lib = None
    #: bytes of scratch an op may take to widen weights (None: RPCSERVER_SCRATCH_MIB, else
    #: 64 MiB); see rpcserver.device_state. A GPU may want more: larger tiles, fewer launches
    scratch_bytes: int | None = None

    @abstractmethod
    def memory(self) -> tuple[int, int]:
        """(free, total) device memory in bytes, as reported by the hardware or OS."""

    @abstractmethod
    def alloc_buffer(self, size: int) -> Buffer | None:
        """Allocate ``size`` bytes (``size > 0``); None when the device is out of memory."""

    def alloc_size(self, tensor: "RpcTensor") -> int:
        """Bytes a buffer must reserve for ``tensor``; ggml's default is ggml_nbytes."""
        return ggml.nbytes(ggml.type_info(tensor.type), tensor.ne, tensor.nb)

    def init_tensor(self, buffer: Buffer, offset: int, tensor: "RpcTensor") -> None:
        """Prepare device-specific state for a tensor placed at ``offset`` (default: none)."""

    def graph_compute(self, graph: "Graph") -> None:
        """Execute a validated graph. Raises :class:`rpcserver.errors.GraphError` on failure."""
        from .executor import execute

        execute(self, graph)

    def close(self) -> None:
        """Release device-wide resources when the server stops."""


class Backend(ABC):
    """What a plugin contributes: a named family of devices."""

    #: short name shown by ``rpcserver plugins`` ("cpu", "cuda", "metal")
    name: str = "?"

    @abstractmethod
    def devices(self, options: DeviceOptions) -> list[Device]:
        """Enumerate this backend's usable devices (possibly none)."""

    def unavailable_reason(self) -> str | None:
        """Why :meth:`devices` returned nothing ("no CUDA driver", ...); None if it has devices."""
        return None


@dataclass
class PluginRecord:
    """A plugin found through the ``rpcserver.backends`` entry-point group."""

    name: str
    distribution: str
    version: str
    backends: list[Backend] = field(default_factory=list)
    error: str | None = None  # what is wrong with the plugin (rpcserver.plugins), None if nothing
