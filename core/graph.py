"""GRAPH_COMPUTE payloads: parsing and validation.

Wire layout (little-endian, packed)::

    | device u32 | n_nodes u32 | node ids u64 * n_nodes | n_tensors u32 | rpc_tensor * n_tensors |

The tensor list holds every node and everything nodes reach through
``src`` and ``view_src``; ids are the client's pointers and serve only as
keys. Validation checks, for every tensor: a known type and op (function-
pointer ops refused), a buffer of this session on the graph's device, a byte
extent inside that buffer, and for views that ``data == view_src.data +
view_offs`` inside the same buffer. Node ids and source ids must name tensors
of the payload. The result is a :class:`Graph` an executor can run without
re-checking memory safety.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from . import ggml
from .buffers import BufferTable, TensorRef
from .errors import GraphError, SessionError
from .protocol import GRAPH_COUNT, GRAPH_HEADER, RPC_TENSOR_SIZE, RpcTensor


@dataclass(eq=False)
class GraphTensor:
    """A validated tensor of a graph, linked to its sources."""

    ref: TensorRef
    src: list["GraphTensor | None"] = field(default_factory=list)
    view_src: "GraphTensor | None" = None

    @property
    def rpc(self) -> RpcTensor:
        return self.ref.tensor

    @property
    def op(self) -> int:
        return self.ref.tensor.op

    def describe(self) -> str:
        t = self.ref.tensor
        srcs = ", ".join(f"{ggml.TYPES[s.rpc.type].name}{list(s.rpc.ne)}" for s in self.src if s)
        return f"{ggml.op_name(t.op)} -> {t.describe()} from [{srcs}]"


@dataclass(eq=False)
class Graph:
    device: int
    nodes: list[GraphTensor]
    tensors: list[GraphTensor]
    buffer_handles: frozenset[int]
    #: executor-owned state (prepared views, kernels); reused by GRAPH_RECOMPUTE
    plan: object = None


def parse_header(payload) -> tuple[int, list[int], int, int]:
    """(device, node ids, n_tensors, offset of the tensor array); checks the sizes add up exactly."""
    if len(payload) < GRAPH_HEADER.size:
        raise GraphError(f"GRAPH_COMPUTE payload of {len(payload)} bytes is shorter than its "
                         f"{GRAPH_HEADER.size}-byte header")
    device, n_nodes = GRAPH_HEADER.unpack_from(payload, 0)
    pos = GRAPH_HEADER.size
    if len(payload) < pos + 8 * n_nodes + GRAPH_COUNT.size:
        raise GraphError(f"GRAPH_COMPUTE declares {n_nodes} nodes but the payload has only "
                         f"{len(payload)} bytes")
    nodes = list(struct.unpack_from(f"<{n_nodes}Q", payload, pos))
    pos += 8 * n_nodes
    (n_tensors,) = GRAPH_COUNT.unpack_from(payload, pos)
    pos += GRAPH_COUNT.size
    expected = pos + n_tensors * RPC_TENSOR_SIZE
    if len(payload) != expected:
        raise GraphError(f"GRAPH_COMPUTE with {n_nodes} nodes and {n_tensors} tensors must be "
                         f"{expected} bytes, got {len(payload)}")
    return device, nodes, n_tensors, pos


def parse_graph(payload, buffers: BufferTable, n_devices: int, device_of) -> Graph:
    """Parse and validate a GRAPH_COMPUTE payload against a session's buffers.

    ``device_of(handle)`` gives the device index a buffer lives on.
    """
    device, node_ids, n_tensors, pos = parse_header(payload)
    if device >= n_devices:
        raise GraphError(f"GRAPH_COMPUTE for device {device}, but this server has {n_devices} device(s)")
    wire = RpcTensor.unpack_array(payload, n_tensors, pos)

    by_id: dict[int, GraphTensor] = {}
    for t in wire:
        if t.id == 0:
            raise GraphError(f"graph tensor with id 0 ({t.describe()})")
        if t.id in by_id:
            raise GraphError(f"graph lists tensor id 0x{t.id:x} twice")
        if t.op >= ggml.OP_COUNT:
            raise GraphError(f"{t.describe()}: op {t.op} is not an op of ggml 0.25.3 "
                             f"(GGML_OP_COUNT={ggml.OP_COUNT})")
        if t.op in ggml.FUNCTION_POINTER_OPS:
            raise GraphError(f"{t.describe()}: op {ggml.OPS[t.op]} carries a host function pointer "
                             f"and is never executed by an RPC server")
        try:
            ref = buffers.resolve(t, need_buffer=False)
        except SessionError as exc:
            raise GraphError(f"graph tensor 0x{t.id:x}: {exc}") from None
        if ref.buffer is None and ref.nbytes > 0:
            raise GraphError(f"{t.describe()}: a graph tensor with {ref.nbytes} bytes of data "
                             f"has no buffer on this server")
        if ref.buffer is not None and device_of(ref.buffer) != device:
            raise GraphError(f"{t.describe()} lives in {ref.buffer.describe()} on device "
                             f"{device_of(ref.buffer)}, but the graph runs on device {device}")
        by_id[t.id] = GraphTensor(ref)

    def lookup(ident: int, what: str, owner: RpcTensor) -> GraphTensor:
        try:
            return by_id[ident]
        except KeyError:
            raise GraphError(f"{owner.describe()}: {what} id 0x{ident:x} is not among the graph's "
                             f"{n_tensors} tensors") from None

    for gt in by_id.values():
        t = gt.rpc
        gt.src = [lookup(s, f"src[{i}]", t) if s else None for i, s in enumerate(t.src)]
        while gt.src and gt.src[-1] is None:
            gt.src.pop()
        if t.view_src:
            vs = lookup(t.view_src, "view_src", t)
            gt.view_src = vs
            if vs.ref.buffer is not gt.ref.buffer:
                raise GraphError(f"{t.describe()}: a view must share its view_src's buffer")
            if t.data != vs.rpc.data + t.view_offs:
                raise GraphError(f"{t.describe()}: view data 0x{t.data:x} != view_src data "
                                 f"0x{vs.rpc.data:x} + view_offs {t.view_offs}")

    nodes = []
    for i, ident in enumerate(node_ids):
        if ident == 0:
            continue  # the reference tolerates null node slots; so do we
        if ident not in by_id:
            raise GraphError(f"graph node {i} has id 0x{ident:x}, which is not among the graph's "
                             f"{n_tensors} tensors")
        nodes.append(by_id[ident])
    handles = frozenset(gt.ref.buffer.handle for gt in by_id.values() if gt.ref.buffer)
    return Graph(device, nodes, list(by_id.values()), handles)
