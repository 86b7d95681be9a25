"""Buffer handles, base addresses, and resolving a tensor's ``data`` to (buffer, offset).

The client sees two numbers per buffer: a handle (``remote_ptr``) and a base
address (``BUFFER_GET_BASE``). Both are values this module makes up -- no
Python object id or real pointer ever leaves the server. Handles are unique
across the whole server and never reused, so a handle from another session
(or a stale one) is recognised and refused. Base addresses are carved from a
virtual 64-bit address space, one disjoint range per buffer, aligned for any
device.

Every tensor that arrives over the wire is resolved against the session's
own :class:`BufferTable`: its buffer must belong to the session and its byte
extent (ggml_nbytes from ne/nb, computed without overflow) must lie inside
that buffer.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

from . import ggml
from .device import Buffer
from .errors import BoundsError
from .protocol import RpcTensor

_BASE_ALIGN = 1 << 21  # 2 MiB: more than any device alignment
_FIRST_BASE = 1 << 32
_GUARD = 1 << 21  # unmapped gap between consecutive buffers


class AddressSpace:
    """Hands out handles and disjoint virtual address ranges, server-wide."""

    def __init__(self):
        self._lock = threading.Lock()
        self._handles = itertools.count(1)
        self._next_base = _FIRST_BASE

    def reserve(self, size: int) -> tuple[int, int]:
        """A fresh (handle, base) pair for a buffer of ``size`` bytes (base 0 for size 0)."""
        with self._lock:
            handle = next(self._handles)
            if size == 0:
                return handle, 0
            base = self._next_base
            end = base + size + _GUARD
            self._next_base = (end + _BASE_ALIGN - 1) // _BASE_ALIGN * _BASE_ALIGN
            if self._next_base >= 1 << 63:
                raise MemoryError("virtual address space exhausted; restart the server")
            return handle, base


@dataclass
class SessionBuffer:
    handle: int
    base: int
    size: int
    device_index: int
    buffer: Buffer | None  # None for zero-sized buffers

    def describe(self) -> str:
        return f"buffer 0x{self.handle:x} [0x{self.base:x}, 0x{self.base + self.size:x})"


@dataclass(frozen=True)
class TensorRef:
    """A wire tensor resolved against a session's buffers."""

    tensor: RpcTensor
    type: ggml.TypeInfo
    buffer: SessionBuffer | None
    offset: int  # byte offset of ``data`` inside the buffer (0 when no buffer)
    nbytes: int


class BufferTable:
    """The buffers one session owns, by handle."""

    def __init__(self):
        self._buffers: dict[int, SessionBuffer] = {}

    def __len__(self):
        return len(self._buffers)

    def __iter__(self):
        return iter(list(self._buffers.values()))

    def add(self, entry: SessionBuffer) -> None:
        self._buffers[entry.handle] = entry

    def pop(self, handle: int) -> SessionBuffer:
        entry = self.get(handle)
        del self._buffers[handle]
        return entry

    def get(self, handle: int) -> SessionBuffer:
        try:
            return self._buffers[handle]
        except KeyError:
            raise BoundsError(
                f"buffer 0x{handle:x} is not a buffer of this session (it was never allocated on "
                f"this connection, or was freed); this session holds {len(self._buffers)} buffer(s)"
            ) from None

    def resolve(self, tensor: RpcTensor, *, need_buffer: bool = True) -> TensorRef:
        """Check a tensor's type, shape and placement; return where its bytes live."""
        try:
            info = ggml.check_shape(tensor.type, tensor.ne)
        except ValueError as exc:
            raise BoundsError(f"{tensor.describe()}: {exc}") from None
        size = ggml.nbytes(info, tensor.ne, tensor.nb)
        if tensor.buffer == 0:
            if need_buffer:
                raise BoundsError(f"{tensor.describe()}: the tensor has no buffer (buffer=0)")
            if tensor.data != 0:
                raise BoundsError(f"{tensor.describe()}: data=0x{tensor.data:x} without a buffer")
            return TensorRef(tensor, info, None, 0, size)
        entry = self.get(tensor.buffer)
        offset = tensor.data - entry.base
        if offset < 0 or offset + size > entry.size or (entry.size == 0 and size > 0):
            raise BoundsError(
                f"{tensor.describe()}: data 0x{tensor.data:x} + {size} bytes lies outside "
                f"{entry.describe()}")
        return TensorRef(tensor, info, entry, offset, size)

    def region(self, ref: TensorRef, offset: int, size: int, what: str) -> tuple[SessionBuffer, int]:
        """Check that ``[offset, offset+size)`` lies within the tensor; return (buffer, byte offset)."""
        if offset < 0 or size < 0 or offset + size > ref.nbytes:
            raise BoundsError(
                f"{what}: region offset={offset} size={size} is outside the tensor's "
                f"{ref.nbytes} bytes ({ref.tensor.describe()})")
        assert ref.buffer is not None
        return ref.buffer, ref.offset + offset
