"""Runs a validated graph on a device, node by node, with ggml's semantics.

Ops that only reinterpret memory (NONE, VIEW, RESHAPE, PERMUTE, TRANSPOSE)
compute nothing. Every other op is looked up in the op table; an op without
an implementation fails the graph with an error naming the op, its types
and shapes.
"""

from __future__ import annotations

from . import ggml
from .errors import GraphError

#: op number -> implementation; filled by rpcserver.ops
OP_TABLE: dict[int, object] = {}


def execute(device, graph) -> None:
    for node in graph.nodes:
        if node.op in ggml.VIEW_OPS:
            continue
        impl = OP_TABLE.get(node.op)
        if impl is None:
            raise GraphError(f"op not implemented on {device.name}: {node.describe()}")
        impl(device, node)
