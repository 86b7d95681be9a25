"""rpcserver's CUDA backend: NVIDIA GPUs through CuPy.

One device per GPU the CUDA runtime shows, named ``CUDA0``, ``CUDA1``... in the
runtime's order, exactly as ggml's CUDA backend names them
(``CUDA_VISIBLE_DEVICES`` and ``CUDA_DEVICE_ORDER`` apply); the description is
the GPU's name, memory comes from ``cudaMemGetInfo``. Buffers live in device
memory (see :mod:`rpcserver_cuda.device`); graphs run on the shared executor
with CuPy plus this plugin's kernels (:mod:`rpcserver_cuda.ops`,
:mod:`rpcserver_cuda.dispatch`).

Without CuPy, a driver or a GPU the plugin still loads: it reports no
devices, and ``rpcserver list-devices`` shows why.
"""

from __future__ import annotations

import logging
from importlib import metadata

from rpcserver.api import Backend, DeviceOptions, hookimpl

from . import probe as _probe

try:
    __version__ = metadata.version("rpcserver-cuda")
except metadata.PackageNotFoundError:  # imported from a source tree
    __version__ = "0+unknown"

log = logging.getLogger("rpcserver.cuda")


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self):
        self._reason: str | None = None

    def devices(self, options: DeviceOptions):
        result = _probe.probe()
        for line in result.skipped:
            log.warning("%s", line)
        if not result.gpus:
            self._reason = result.reason or "no CUDA device found"
            return []
        # CuPy runs nothing without NVRTC, and float products need cuBLAS
        problem = _probe.nvrtc_problem(result.cupy) or _probe.cublas_problem(result.cupy)
        if problem:
            names = ", ".join(f"CUDA{g.index} ({g.name})" for g in result.gpus)
            self._reason = f"found {names}, but {problem}"
            return []
        self._reason = None
        from .device import CudaDevice

        return [CudaDevice(result.cupy, info) for info in result.gpus]

    def unavailable_reason(self):
        return self._reason


@hookimpl
def rpcserver_backends():
    return [CudaBackend()]
