"""The plugin API: the one module a backend plugin imports.

A plugin is a module registered in the ``rpcserver.backends`` entry-point
group whose :func:`hookimpl`-marked ``rpcserver_backends()`` returns
:class:`Backend` objects; a backend's ``devices()`` returns :class:`Device`
objects, which allocate :class:`Buffer` objects. A device that computes on
something other than host memory through NumPy supplies an
:class:`ArrayLib`. Everything a plugin may rely on is named here and
documented on the object itself; docs/plugins.md walks through a complete
third-party plugin that imports nothing else from rpcserver.

::

    from rpcserver.api import Backend, Buffer, Device, DeviceOptions, hookimpl
"""

from __future__ import annotations

from .device import Backend, Buffer, Device, DeviceOptions, DeviceType
from .device_state import DeviceState, state_of
from .errors import GraphError
from .executor import ArrayLib, NodeContext, TensorView, execute
from .ggml import TYPES, GGMLType, GluOp, Op, TypeInfo
from .hookspecs import hookimpl
from .ops.rope import RopeTables, rope_tables

__all__ = [
    # the hook and what it returns
    "hookimpl", "Backend", "Device", "Buffer", "DeviceType", "DeviceOptions",
    # computing
    "ArrayLib", "NodeContext", "TensorView", "execute", "DeviceState", "state_of",
    "GraphError",
    # what a device's own op kernels reuse from the shared ops
    "RopeTables", "rope_tables",
    # ggml's vocabulary
    "GGMLType", "GluOp", "Op", "TYPES", "TypeInfo",
]
