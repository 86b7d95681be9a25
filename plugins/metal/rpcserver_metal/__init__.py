"""rpcserver's MLX backend: Apple's GPU as ``MTL0``, and MLX's CPU device as ``MLX-CPU``.

* ``MTL0`` (type GPU) exists where MLX has Metal (Apple silicon); ``rpcserver serve``
  serves it by default. Its memory figures come from MLX's device info (the
  recommended working set, minus what MLX has allocated).
* ``MLX-CPU`` (type CPU) exists wherever MLX runs, Linux included (``pip install
  "mlx[cpu]"``). ``serve`` picks the device named ``CPU`` by default, so MLX-CPU is
  served when asked for by name: ``rpcserver serve -d MLX-CPU`` or ``-d CPU,MLX-CPU``.
  It reports the host's memory.

Graphs run on rpcserver's shared executor with MLX as the array library
(:mod:`rpcserver_metal.arraylib`); buffers are lists of MLX arrays
(:mod:`rpcserver_metal.buffer`); each graph is built lazily and evaluated with
one ``mx.eval`` (:mod:`rpcserver_metal.device`). Weights stay in their ggml type: the types
that are MLX affine quantization exactly (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K) are
multiplied with ``mx.quantized_matmul`` on a repacked form the core keeps per weight, the
others widened a bounded tile of rows at a time by MLX dequantizers
(:mod:`rpcserver_metal.quants`, :meth:`rpcserver_metal.arraylib.MlxArrayLib.weight_product`).

MLX is imported when devices are enumerated, not when the plugin is loaded:
without it the backend lists no devices and says why.
"""

from __future__ import annotations

from importlib import metadata

from rpcserver.api import Backend, DeviceOptions, hookimpl

__version__ = metadata.version("rpcserver-metal")


class MetalBackend(Backend):
    name = "metal"

    def __init__(self):
        self._why: str | None = None

    def devices(self, options: DeviceOptions):
        try:
            import mlx.core  # noqa: F401
        except Exception as exc:  # ImportError, or a broken native library
            self._why = (f"mlx is not importable ({type(exc).__name__}: {exc}); install it with "
                         f"`pip install mlx` (Apple silicon) or `pip install \"mlx[cpu]\"` (Linux)")
            return []
        from .device import enumerate_devices

        return enumerate_devices(options)

    def unavailable_reason(self):
        return self._why


@hookimpl
def rpcserver_backends():
    return [MetalBackend()]
