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

Weights stay in their ggml type. Reading a quantized, F16 or BF16 tensor as
float32 widens it for the one op that reads it, never for longer: large
weights are widened a tile of rows at a time (:meth:`NodeContext.row_tiles`)
within the device's scratch budget (:mod:`rpcserver.device_state`), and a
device's own kernels (``ArrayLib.weight_product``) read the blocks directly.
Nothing converted outlives the op, so the server holds the weights' bytes
plus compute buffers, as llama.cpp's own server does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from . import ggml
from .device_state import DeviceState, state_of
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

    def weight_product(self, ctx, w, b):
        """``b @ w^T`` computed by the device's own kernel on the weights in their ggml type,
        or None to let the shared code widen ``w`` tile by tile (the default).

        ``w`` is a 2-D :class:`TensorView` (ne2 = ne3 = 1) of any type, F32 included (for
        F32 the shared code multiplies the buffer's view directly when this returns None),
        ``b`` the float32 activations, shape (..., N, K); the result has shape (..., N, M).
        """
        return None

    def batched_product(self, ctx, a, b):
        """MUL_MAT's ``b @ a^T`` for a src0 ``a`` that is not one weight matrix (ne2 or ne3 > 1:
        attention's view of a KV cache), computed by the device's own kernel on ``a`` in its
        type, or None to let the shared code widen ``a`` for this op (the default).

        ``b``: the float32 activations, shape (B3, B2, N, K); batch (i3, i2) of ``b`` uses batch
        (i3 // (B3/A3), i2 // (B2/A2)) of ``a``, as in ggml; the result has shape (B3, B2, N, M).
        Also offered a 2-D F32 ``a`` that :meth:`weight_product` declined.
        """
        return None

    def activation_type(self, weight_type: int, n_cols: int) -> int | None:
        """The ggml type :meth:`weight_product` rounds float32 activations to before it
        multiplies ``n_cols`` of them with weights of ``weight_type``, as ggml's CPU backend
        does (its ``vec_dot_type``: Q8_0 for Q4_0, ...); None when it multiplies them in
        float32 (the default). Tests read it to pick their exact reference."""
        return None

    def widen(self, raw, type_value: int):
        """Elements of the plain type ``type_value`` in their storage dtype (``raw``, any
        strides: often a view of a KV cache) as float32; F32 is returned as it is."""
        if type_value == ggml.GGMLType.BF16:
            return bf16_to_f32(self.xp, raw)
        if type_value == ggml.GGMLType.F32:
            return raw
        return raw.astype(self.xp.float32)

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


def tensor_view(gt) -> TensorView:
    ref = gt.ref
    return TensorView(ref.buffer.buffer if ref.buffer else None, ref.offset, ref.type,
                      ref.tensor.ne, ref.tensor.nb)


class NodeContext:
    """What an op implementation sees: its node, its sources, and how to read and write them."""

    def __init__(self, device, lib: ArrayLib, node, state: DeviceState):
        self.device = device
        self.lib = lib
        self.xp = lib.xp
        self.node = node
        #: the core's record of the device: scratch budget, prepared forms
        self.state = state
        # Resolved once per graph and reused by GRAPH_RECOMPUTE (see GraphPlan).
        self.dst = tensor_view(node)
        self._srcs = [tensor_view(s) if s is not None else None for s in node.src]
        self._raw: dict[tuple, object] = {}
        self._params_f32: tuple | None = None
        self._prepared: dict = {}

    # -- description ------------------------------------------------------

    def src(self, i: int) -> TensorView | None:
        return self._srcs[i] if i < len(self._srcs) else None

    def has_src(self, i: int) -> bool:
        return i < len(self.node.src) and self.node.src[i] is not None

    def param_i32(self, i: int) -> int:
        return self.node.rpc.op_params[i]

    def param_f32(self, i: int) -> float:
        if self._params_f32 is None:  # unpacked once: the plan (and so this context) is reused
            ints = self.node.rpc.op_params
            self._params_f32 = struct.unpack(f"<{len(ints)}f", struct.pack(f"<{len(ints)}i", *ints))
        return self._params_f32[i]

    def prepared(self, make):
        """``make(self)``, worked out on the node's first run and kept with the plan (which
        GRAPH_RECOMPUTE reruns): for what an op derives from the node alone -- its parameters,
        shapes and the checks on them -- not from the tensors' contents."""
        value = self._prepared.get(make)
        if value is None:
            value = self._prepared[make] = make(self)
        return value

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
        """The elements as float32, shape (ne3, ne2, ne1, ne0), widened for this op only.

        For a large weight prefer :meth:`row_tiles`, which bounds the widened copy.
        """
        if tv.type.is_quantized:
            return self.lib.dequantize(self.blocks(tv), tv.type.value).reshape(tv.shape)
        return self.widen(self.raw(tv), tv.type.value)

    def blocks(self, tv: TensorView):
        """A quantized tensor's rows as raw blocks: uint8, shape (ne3, ne2, ne1, row bytes)."""
        shape, strides = _block_layout(tv)
        return self.lib.view(tv.buffer, tv.offset, shape, strides, np.uint8)

    def rows_f32(self, tv: TensorView, i3: int, i2: int, start: int, stop: int):
        """Rows ``start:stop`` of matrix ``(i3, i2)`` of ``tv`` as float32, shape (rows, ne0)."""
        t = tv.type.value
        if tv.type.is_quantized:
            rows = self.lib.view(tv.buffer, tv.offset + i3 * tv.nb[3] + i2 * tv.nb[2] + start * tv.nb[1],
                                 (stop - start, tv.type.row_size(tv.ne[0])), (tv.nb[1], 1), np.uint8)
            return self.lib.dequantize(rows, t)
        return self.widen(self.raw(tv)[i3, i2, start:stop], t)

    def widen(self, raw, type_value: int):
        """Elements of a plain type ``type_value`` in their storage dtype, as float32."""
        return self.lib.widen(raw, type_value)

    def row_tiles(self, tv: TensorView, i3: int = 0, i2: int = 0):
        """Matrix ``(i3, i2)`` of ``tv`` as float32 tiles of rows: yields ``(start, stop, tile)``
        with ``tile`` of shape (stop - start, ne0), each within the device's scratch budget."""
        n_rows = tv.ne[1]
        step = self.state.rows_per_tile(4 * tv.ne[0], n_rows)
        for start in range(0, n_rows, step):
            stop = min(n_rows, start + step)
            with self.state.scratch(4 * tv.ne[0] * (stop - start)):
                yield start, stop, self.rows_f32(tv, i3, i2, start, stop)

    # -- writing ------------------------------------------------------------

    def store(self, values, tv: TensorView | None = None, index=None):
        """Write ``values`` into ``tv`` (default: the node), converting to its type.

        Without ``index`` the values broadcast to the whole tensor. With ``index`` (an
        index over the outer dims (ne3, ne2, ne1)), only those rows are written, in place.
        """
        tv = tv or self.dst
        if tv.buffer is None:
            return
        xp, t = self.xp, tv.type.value
        if tv.type.is_quantized:
            shape, strides = _block_layout(tv)
            rows_shape = _indexed_shape(xp, shape, index)
            values = xp.broadcast_to(values, rows_shape[:-1] + (tv.ne[0],))
            packed = self.lib.from_numpy(self.lib.quantize(values.reshape(-1, tv.ne[0]), t))
            packed = packed.reshape(rows_shape)
            if not self.lib.views_alias:
                self.lib.write(tv.buffer, tv.offset, shape, strides, np.uint8, packed, index)
                return
            rows = self.blocks(tv)
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


def _block_layout(tv: TensorView):
    """(shape, strides) of a quantized tensor seen as rows of raw blocks (last axis: bytes)."""
    return tv.shape[:3] + (tv.type.row_size(tv.ne[0]),), tv.strides[:3] + (1,)


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
        state = state_of(device)
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
            ctx = NodeContext(device, lib, node, state)
            if ctx.dst.buffer is not None and node.ref.nbytes:
                # however the op writes: no prepared forms from those bytes
                state.graph_wrote(ctx.dst.buffer, node.ref.offset, node.ref.offset + node.ref.nbytes)
            self.steps.append((impl, ctx))

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
