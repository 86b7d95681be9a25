"""MLX devices: ``MTL0`` (Apple's GPU, where Metal is available) and ``MLX-CPU``."""

from __future__ import annotations

import logging
import threading

import mlx.core as mx
import psutil

from rpcserver.api import Device, DeviceOptions, DeviceType, GraphError, execute

from .arraylib import MlxArrayLib
from .buffer import MLX_THREAD, MlxBuffer

log = logging.getLogger("rpcserver.metal")

ALIGNMENT = 32  # what ggml's Metal and CPU buffer types report


def metal_available() -> bool:
    try:
        return bool(mx.metal.is_available())
    except Exception:  # builds without the metal submodule
        return False


def _info(device) -> dict:
    try:
        return dict(mx.device_info(device))
    except Exception:
        return {}


class MlxDevice(Device):
    """One MLX device. Graphs run on the shared executor with :class:`MlxArrayLib`, lazily,
    and are evaluated once at the end (see :meth:`graph_compute`)."""

    alignment = ALIGNMENT

    def __init__(self, mlx_device, *, name: str, type_: DeviceType, description: str):
        self.mlx_device = mlx_device
        self.name = name
        self.type = type_
        self.description = description
        gpu = mlx_device == mx.gpu
        self.array_lib = MlxArrayLib(float64=not gpu)
        self._dirty: set = set()
        self._dirty_lock = threading.Lock()

    # -- buffers ---------------------------------------------------------------------

    def alloc_buffer(self, size):
        free, _ = self.memory()
        if size > free:
            log.warning("%s: refusing a %d-byte buffer, only %d bytes are free", self.name, size, free)
            return None
        return MlxBuffer(self, size)

    def touched(self, buffer) -> None:
        """``buffer`` has unevaluated contents (called by the buffer on every write)."""
        with self._dirty_lock:
            self._dirty.add(buffer)

    def forget(self, buffer) -> None:
        with self._dirty_lock:
            self._dirty.discard(buffer)

    # -- graphs ----------------------------------------------------------------------

    def graph_compute(self, graph):
        """The shared executor builds the whole graph as lazy MLX operations; one ``mx.eval``
        of the buffers it wrote then computes it (MLX schedules the work and frees the
        intermediates as it goes). Ops that need a value on the host (index range checks,
        expert ids) evaluate just what they read. Runs on the plugin's MLX thread."""
        MLX_THREAD.call(self._graph_compute, graph)

    def _graph_compute(self, graph):
        with mx.stream(self.mlx_device):
            try:
                execute(self, graph)
            finally:
                failed = None
                try:
                    self.evaluate()
                except Exception as exc:  # MLX reports some errors only when it evaluates
                    failed = exc
                self.array_lib.graph_done()
            if failed is not None:
                raise GraphError(f"{self.name}: MLX failed to evaluate the graph: "
                                 f"{type(failed).__name__}: {failed}") from failed

    def evaluate(self) -> None:
        """Evaluate every buffer written since the last call (one ``mx.eval``)."""
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
        arrays = [a for b in dirty for a in b.arrays()]
        if arrays:
            mx.eval(arrays)


class MlxCpuDevice(MlxDevice):
    """MLX's CPU device. Its memory is the host's."""

    def __init__(self):
        model = _info(mx.cpu).get("device_name") or "CPU"
        super().__init__(mx.cpu, name="MLX-CPU", type_=DeviceType.CPU,
                         description=f"MLX on the CPU ({model})")

    def memory(self):
        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)


class MetalDevice(MlxDevice):
    """Apple's GPU through MLX's Metal backend (unified memory)."""

    def __init__(self):
        info = _info(mx.gpu)
        super().__init__(mx.gpu, name="MTL0", type_=DeviceType.GPU,
                         description=str(info.get("device_name") or "Apple GPU (Metal)"))
        self._info = info
        if info.get("max_buffer_length"):
            self.max_buffer_size = int(info["max_buffer_length"])

    def memory(self):
        # as ggml's Metal backend: the recommended working set, less what is allocated
        total = int(self._info.get("max_recommended_working_set_size")
                    or self._info.get("memory_size") or self._info.get("total_memory")
                    or psutil.virtual_memory().total)
        try:
            used = int(mx.get_active_memory())
        except Exception:
            used = 0
        return max(0, total - used), total


def enumerate_devices(options: DeviceOptions) -> list[MlxDevice]:
    devices: list[MlxDevice] = []
    if metal_available():
        devices.append(MetalDevice())
    devices.append(MlxCpuDevice())
    return devices
