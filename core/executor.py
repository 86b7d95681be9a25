"""Runs a validated graph on a device, node by node, with ggml's semantics.

The executor is written once against the array API NumPy and CuPy share.
A device supplies an :class:`ArrayLib` -- the array namespace ``xp`` and the
one thing the array API does not standardise: making a typed, strided view
of a buffer's bytes. Everything else (type conversion, dequantization, the
op implementations in :mod:`rpcserver.ops`) is shared.

Memory model: every tensor of a graph is a view ``(buffer, byte offset, ne,
nb)`` validated by :mod:`rpcserver.graph`. ggml's shapes are innermost-first
(``ne[0]`` is the row length); arrays here are outermost-first, so a tensor
appears as an array of shape ``(ne3, ne2, ne1, ne0)`` with strides
``(nb3, nb2, nb1, nb0)``. Results are written into the node's own view, in
node order, because ggml's allocator reuses memory between nodes.

Ops that only reinterpret memory (NONE, VIEW, RESHAPE, PERMUTE, TRANSPOSE)
compute nothing. Every other op is looked up in ``OP_TABLE``; a missing
entry (or an unsupported type combination) fails the graph with an error
naming the op, its types and its shapes.

Converted weights: reading a quantized, F16 or BF16 tensor as float32 costs
a dequantization. Tensors in buffers that no graph has ever written to (the
model's weights) are converted once and kept in a per-device LRU cache.
Policy: the cache may hold ``Device.weight_cache_bytes`` if the plugin sets
it, else ``RPCSERVER_WEIGHT_CACHE_MIB`` MiB if that is set, else a quarter
of the device's total memory at first use (see :func:`weight_cache_budget`);
least recently used entries go first. Any write to a buffer from the network
(SET_TENSOR, MEMSET, CLEAR, COPY) bumps its generation and so invalidates
its entries; freeing it drops them. Buffers written by graphs (KV cache,
compute buffers) are never cached. Because the copies live in device memory,
GET_DEVICE_MEMORY's free figure reflects them, and llama.cpp's layer
placement sees the true headroom.
"""

from __future__ import annotations

import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from . import ggml
from .errors import GraphError

#: op number -> implementation ``fn(ctx: NodeContext) -> None``; filled by rpcserver.ops
OP_TABLE: dict[int, object] = {}

_PLAIN_DTYPES = {
    ggml.GGMLType.F32: np.float32,
    ggml.GGMLType.F16: np.float16,
    ggml.GGMLType.F64: np.float64,
    ggml.GGMLType.I8: np.int8,
    ggml.GGMLType.I16: np.int16,
    ggml.GGMLType.I32: np.int32,
    ggml.GGMLType.I64: np.int64,
    ggml.GGMLType.BF16: np.uint16,  # raw bits; converted by bf16_to_f32 / f32_to_bf16
}


def storage_dtype(type_value: int):
    """The array dtype holding one element of a non-quantized ggml type, else None."""
    return _PLAIN_DTYPES.get(type_value)


class ArrayLib:
    """The array library a device computes with. NumPy by default; CuPy and MLX subclass it."""

    name = "numpy"
    xp = np
    #: views alias buffer memory, so they can be made once per graph and reused
    views_alias = True
    #: op number -> device-specific implementation ``fn(ctx) -> bool``, tried before the shared
    #: one; it returns False when a node does not fit it (the shared implementation then runs)
    op_overrides: dict = {}

    def bytes_of(self, buffer):
        """The buffer's memory as a 1-D uint8 array.

        ``buffer.array`` when the plugin keeps one (NumPy/CuPy buffers), else a NumPy
        array over the buffer's host view.
        """
        arr = getattr(buffer, "array", None)
        if arr is not None:
            return arr
        view = buffer.host_view(0, buffer.size)
        if view is None:
            raise GraphError(f"{buffer.device.name}: its buffers are not host memory and it "
                             f"provides no ArrayLib (Device.array_lib) to compute on them")
        return np.frombuffer(view, np.uint8)

    def view(self, buffer, offset: int, shape, strides, dtype):
        """A writable strided view of ``buffer`` (bounds were validated by the graph parser)."""
        raw = self.bytes_of(buffer)
        return np.ndarray(shape, dtype=dtype, buffer=raw, offset=offset, strides=strides)

    def write(self, buffer, offset: int, shape, strides, dtype, values, index=None) -> None:
        """``view[...] = values`` (or ``view[index] = values``) for the strided view of ``buffer``.

        Only called for libraries whose views do not alias buffer memory (``views_alias``
        False, e.g. MLX): aliasing ones are written through the views the executor caches.
        ``values`` is already of ``dtype``'s kind (converted by :meth:`NodeContext.store`);
        ``index`` indexes the outer dims (ne3, ne2, ne1) as in ``NodeContext.store``.
        """
        view = self.view(buffer, offset, shape, strides, dtype)
        if index is None:
            view[...] = values
        else:
            view[index] = values

    def to_numpy(self, a):
        return np.asarray(a)

    def from_numpy(self, a):
        return a

    def dequantize(self, raw_rows, type_value: int):
        """Quantized rows (uint8, last axis = row bytes) -> float32 (last axis = elements)."""
        import gguf.quants

        return gguf.quants.dequantize(self.to_numpy(raw_rows), gguf.GGMLQuantizationType(type_value))

    def quantize(self, values, type_value: int):
        import gguf.quants

        try:
            return gguf.quants.quantize(self.to_numpy(values).astype(np.float32),
                                        gguf.GGMLQuantizationType(type_value))
        except NotImplementedError:
            raise GraphError(f"writing {ggml.TYPES[type_value].name} data (quantizing) is not "
                             f"supported") from None


NUMPY = ArrayLib()


def bf16_to_f32(xp, bits):
    return (bits.astype(xp.uint32) << 16).view(xp.float32)


def f32_to_bf16(xp, values):
    """Round-to-nearest-even, NaNs kept quiet: ggml's conversion."""
    u = xp.ascontiguousarray(values, dtype=xp.float32).view(xp.uint32)
    rounded = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(xp.uint16)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return xp.where(nan, ((u >> 16) | 64).astype(xp.uint16), rounded)


class DequantCache:
    """float32 copies of weights, LRU-bounded by ``budget`` bytes (see the module docstring)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.used = 0
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def drop_buffer(self, serial: int) -> None:
        """Forget every entry converted from the buffer with this serial."""
        with self._lock:
            for key in [k for k in self._entries if k[0] == serial]:
                _, n = self._entries.pop(key)
                self.used -= n

    def put(self, key, value, nbytes: int):
        if nbytes > self.budget:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = (value, nbytes)
            self.used += nbytes
            while self.used > self.budget and self._entries:
                _, (_, n) = self._entries.popitem(last=False)
                self.used -= n


@dataclass
class TensorView:
    """Where a graph tensor's elements live, in array terms."""

    buffer: object  # the device Buffer
    offset: int
    type: ggml.TypeInfo
    ne: tuple
    nb: tuple

    @property
    def shape(self):
        return (self.ne[3], self.ne[2], self.ne[1], self.ne[0])

    @property
    def strides(self):
        return (self.nb[3], self.nb[2], self.nb[1], self.nb[0])

    def key(self):
        return (self.buffer.serial, self.buffer.generation, self.offset, self.type.value,
                self.ne, self.nb)


def tensor_view(gt) -> TensorView:
    ref = gt.ref
    return TensorView(ref.buffer.buffer if ref.buffer else None, ref.offset, ref.type,
                      ref.tensor.ne, ref.tensor.nb)


class NodeContext:
    """What an op implementation sees: its node, its sources, and how to read and write them."""

    def __init__(self, device, lib: ArrayLib, node, cache: DequantCache | None):
        self.device = device
        self.lib = lib
        self.xp = lib.xp
        self.node = node
        self.cache = cache
        # Resolved once per graph and reused by GRAPH_RECOMPUTE (see GraphPlan).
        self.dst = tensor_view(node)
        self._srcs = [tensor_view(s) if s is not None else None for s in node.src]
        self._raw: dict[tuple, object] = {}

    # -- description ------------------------------------------------------

    def src(self, i: int) -> TensorView | None:
        return self._srcs[i] if i < len(self._srcs) else None

    def has_src(self, i: int) -> bool:
        return i < len(self.node.src) and self.node.src[i] is not None

    def param_i32(self, i: int) -> int:
        return self.node.rpc.op_params[i]

    def param_f32(self, i: int) -> float:
        return struct.unpack("<f", struct.pack("<i", self.node.rpc.op_params[i]))[0]

    def fail(self, why: str):
        raise GraphError(f"{why}: {self.node.describe()}")

    # -- reading ------------------------------------------------------------

    def raw(self, tv: TensorView):
        """The elements in their storage dtype (plain types only), shape (ne3, ne2, ne1, ne0)."""
        dtype = storage_dtype(tv.type.value)
        if dtype is None:
            self.fail(f"{tv.type.name} data cannot be read element-wise here")
        if tv.buffer is None:
            return self.xp.zeros(tv.shape, dtype=dtype)
        if not self.lib.views_alias:
            return self.lib.view(tv.buffer, tv.offset, tv.shape, tv.strides, dtype)
        key = (tv.buffer.serial, tv.offset, tv.ne, tv.nb, dtype)
        view = self._raw.get(key)
        if view is None:
            view = self._raw[key] = self.lib.view(tv.buffer, tv.offset, tv.shape, tv.strides, dtype)
        return view

    def f32(self, tv: TensorView):
        """The elements as float32, shape (ne3, ne2, ne1, ne0), dequantizing when needed."""
        t = tv.type.value
        if t == ggml.GGMLType.F32:
            return self.raw(tv)
        cacheable = (self.cache is not None and tv.buffer is not None
                     and not getattr(tv.buffer, "graph_written", False))
        if cacheable:
            key = tv.key()
            hit = self.cache.get(key)
            if hit is not None:
                return hit[0]
        out = self._convert_f32(tv)
        if cacheable:
            self.cache.put(key, out, out.size * 4)
        return out

    def _convert_f32(self, tv: TensorView):
        xp, t = self.xp, tv.type.value
        if t == ggml.GGMLType.BF16:
            return bf16_to_f32(xp, self.raw(tv))
        if tv.type.is_quantized:
            rows = self.lib.view(tv.buffer, tv.offset, tv.shape[:3] + (tv.type.row_size(tv.ne[0]),),
                                 tv.strides[:3] + (1,), np.uint8)
            return self.lib.dequantize(rows, t).reshape(tv.shape)
        return self.raw(tv).astype(xp.float32)

    # -- writing ------------------------------------------------------------

    def store(self, values, tv: TensorView | None = None, index=None):
        """Write ``values`` into ``tv`` (default: the node), converting to its type.

        Without ``index`` the values broadcast to the whole tensor. With ``index`` (an
        index over the outer dims (ne3, ne2, ne1)), only those rows are written, in place.
        """
        tv = tv or self.dst
        if tv.buffer is None:
            return
        tv.buffer.graph_written = True
        xp, t = self.xp, tv.type.value
        if tv.type.is_quantized:
            shape = tv.shape[:3] + (tv.type.row_size(tv.ne[0]),)
            strides = tv.strides[:3] + (1,)
            rows_shape = _indexed_shape(xp, shape, index)
            values = xp.broadcast_to(values, rows_shape[:-1] + (tv.ne[0],))
            packed = self.lib.from_numpy(self.lib.quantize(values.reshape(-1, tv.ne[0]), t))
            packed = packed.reshape(rows_shape)
            if not self.lib.views_alias:
                self.lib.write(tv.buffer, tv.offset, shape, strides, np.uint8, packed, index)
                return
            rows = self.lib.view(tv.buffer, tv.offset, shape, strides, np.uint8)
            if index is None:
                rows[...] = packed
            else:
                rows[index] = packed
            return
        if not self.lib.views_alias:
            # the library's arrays do not alias the buffer (MLX): no view to assign through
            if t == ggml.GGMLType.BF16 and not _is_bf16_bits(values):
                values = f32_to_bf16(xp, xp.broadcast_to(values, _indexed_shape(xp, tv.shape, index)))
            self.lib.write(tv.buffer, tv.offset, tv.shape, tv.strides, storage_dtype(t), values, index)
            return
        out = self.raw(tv)
        if t == ggml.GGMLType.BF16 and not _is_bf16_bits(values):
            shape = out[index].shape if index is not None else tv.shape
            values = f32_to_bf16(xp, xp.broadcast_to(values, shape))
        if index is None:
            out[...] = values
        else:
            out[index] = values


def _is_bf16_bits(values) -> bool:
    """True when ``values`` already are BF16 bit patterns (uint16, e.g. from ``raw`` of a BF16
    tensor) rather than numbers to convert; works for NumPy, CuPy and MLX dtypes."""
    return str(getattr(values, "dtype", "")).endswith("uint16")


def _indexed_shape(xp, shape, index) -> tuple:
    """The shape of ``a[index]`` for an array ``a`` of ``shape`` (``index`` None: ``shape``)."""
    if index is None:
        return tuple(shape)
    probe = xp.broadcast_to(xp.zeros((1,) * len(shape), dtype=xp.int8), tuple(shape))
    return tuple(probe[index].shape)


def weight_cache_budget(device) -> int:
    """How many bytes of converted weights ``device`` may keep (the policy in the module doc)."""
    if device.weight_cache_bytes is not None:
        return device.weight_cache_bytes
    env = os.environ.get("RPCSERVER_WEIGHT_CACHE_MIB")
    if env:
        return int(env) << 20
    return device.memory()[1] // 4


_cache_lock = threading.Lock()


def weight_cache(device) -> DequantCache:
    """The device's converted-weight cache, created on first use."""
    with _cache_lock:
        cache = device.__dict__.get("_weight_cache")
        if cache is None:
            cache = device._weight_cache = DequantCache(weight_cache_budget(device))
        return cache


def forget_buffer(buffer) -> None:
    """Drop cached conversions of a buffer that is being freed."""
    cache = buffer.device.__dict__.get("_weight_cache")
    if cache is not None:
        cache.drop_buffer(buffer.serial)


def _with_fallback(override, shared):
    """An implementation that tries a device's own kernel first, else the shared code."""
    def impl(ctx):
        if not override(ctx):
            shared(ctx)

    impl.override, impl.shared = override, shared
    return impl


class GraphPlan:
    """A graph prepared for execution: each node's implementation and resolved views.

    Built at GRAPH_COMPUTE and kept with the graph, so GRAPH_RECOMPUTE neither
    re-parses nor re-resolves anything. The session drops the graph (and so the
    plan) when any buffer it touches is freed.
    """

    def __init__(self, device, graph):
        from . import ops  # noqa: F401  (fills OP_TABLE)
        from .ops.support import check_support

        lib = device.array_lib or NUMPY
        cache = weight_cache(device)
        self.steps = []
        for node in graph.nodes:
            if node.op in ggml.VIEW_OPS:
                continue
            impl = OP_TABLE.get(node.op)
            if impl is None:
                raise GraphError(f"op not implemented on {device.name}: {node.describe()}")
            check_support(node)  # type combination listed in rpcserver.ops.support, else GraphError
            override = lib.op_overrides.get(node.op)
            if override is not None:
                impl = _with_fallback(override, impl)
            self.steps.append((impl, NodeContext(device, lib, node, cache)))

    def run(self) -> None:
        for impl, ctx in self.steps:
            try:
                impl(ctx)
            except GraphError:
                raise
            except Exception as exc:
                raise GraphError(f"{type(exc).__name__} in {ctx.node.describe()}: {exc}") from exc


def execute(device, graph) -> None:
    """Run every node of ``graph`` on ``device`` in order (preparing its plan on first use)."""
    if graph.plan is None:
        graph.plan = GraphPlan(device, graph)
    graph.plan.run()
