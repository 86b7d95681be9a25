"""An example third-party rpcserver backend: one device, EXAMPLE0, whose buffers are bytearrays.

The whole plugin API in one file:

* the ``rpcserver_backends`` hook returns this plugin's Backend;
* the Backend enumerates its Devices;
* the Device reports its memory and hands out Buffers;
* a Buffer is a plain ``bytearray`` with write/read/fill/copy_from, and
  host_view() lets the server receive and send tensor data in place;
* graphs run on the shared NumPy executor, which reads the buffers through host_view().
"""

from __future__ import annotations

import threading

from rpcserver.api import Backend, Buffer, Device, DeviceOptions, DeviceType, hookimpl

#: bytearrays live in host RAM, which the device does not own: it sets itself
#: a budget and reports that through memory() instead of a hardware figure.
CAPACITY = 256 * 1024 * 1024


class ByteArrayBuffer(Buffer):
    """``size`` bytes in one bytearray. The server has already checked every offset and size."""

    def __init__(self, device: "ExampleDevice", size: int):
        super().__init__(device, size)  # required: the base class keeps bookkeeping too
        self.data = bytearray(size)

    def write(self, offset, data):
        src = memoryview(data).cast("B")
        self.data[offset:offset + len(src)] = src

    def read(self, offset, size):
        return bytes(self.data[offset:offset + size])

    def fill(self, offset, size, value):
        self.data[offset:offset + size] = bytes((value,)) * size

    def copy_from(self, src, src_offset, dst_offset, size):
        # Slicing a bytearray copies first, so overlapping ranges of one buffer are safe.
        self.data[dst_offset:dst_offset + size] = src.data[src_offset:src_offset + size]

    def host_view(self, offset, size):
        return memoryview(self.data)[offset:offset + size]

    def free(self):
        self.device.release(self.size)
        self.data = None


class ExampleDevice(Device):
    name = "EXAMPLE0"
    description = "example plugin: host memory in Python bytearrays"
    # CPU rather than ACCEL: in ggml an ACCEL device (BLAS, AMX) works on the CPU
    # backend's buffers, while EXAMPLE0 owns its memory, and that memory is host
    # RAM. `rpcserver serve` picks GPUs by default, else the device named CPU, so
    # EXAMPLE0 is served when asked for with -d EXAMPLE0 (or when it is the only
    # CPU-type device installed).
    type = DeviceType.CPU
    alignment = 32

    def __init__(self, capacity: int = CAPACITY):
        self.capacity = capacity
        self.max_buffer_size = capacity
        self.allocated = 0
        self._lock = threading.Lock()  # every client session runs on its own thread

    def memory(self):
        with self._lock:
            return self.capacity - self.allocated, self.capacity

    def alloc_buffer(self, size):
        with self._lock:
            if self.allocated + size > self.capacity:
                return None  # the client is told "out of memory" (remote_ptr 0)
            buffer = ByteArrayBuffer(self, size)
            self.allocated += size
        return buffer

    def release(self, size: int) -> None:
        with self._lock:
            self.allocated -= size


class ExampleBackend(Backend):
    name = "example"

    def devices(self, options: DeviceOptions):
        # options.threads does not matter here: EXAMPLE0 starts no threads of its own.
        return [ExampleDevice()]


@hookimpl
def rpcserver_backends():
    return [ExampleBackend()]
