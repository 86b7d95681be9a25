"""Op conformance in the spirit of llama.cpp's ``test-backend-ops``, without any network.

ggml's own CPU backend (the libraries shipped inside llama-cpp-python) is the
oracle; rpcserver's executor is the code under test. A test builds a ggml graph
with ggml's real op constructors, through ctypes:

1. :meth:`GgmlCase.run` allocates every tensor of the case in ONE ggml CPU
   buffer, fills the leaves (random data, or what the test supplies), takes a
   snapshot of the whole buffer, computes the graph on ggml's CPU backend and
   reads the outputs back.
2. :func:`run_ours` gives rpcserver the very same bytes: it copies the snapshot
   into a buffer of an rpcserver device, serializes the graph exactly like
   ggml's RPC client does (``serialize_graph``/``add_tensor``), parses it with
   :func:`rpcserver.graph.parse_graph` and runs ``device.graph_compute``. No
   socket is involved, so a failing op raises a Python exception instead of
   aborting anything.
3. :func:`nmse` / :func:`assert_close` compare the two, with test-backend-ops'
   metric (normalized mean squared error).

Usage::

    from ggml_harness import GgmlCase, F32, fn, c_void_p, cpu_device

    ggml_add = fn("ggml_add", c_void_p, c_void_p, c_void_p, c_void_p)

    def test_add():
        with GgmlCase() as case:
            a = case.new_tensor(F32, (64, 3, 2))
            b = case.permuted(F32, (64, 3, 2), (2, 0, 1, 3))   # non-contiguous input
            out = case.mark_output(ggml_add(case.ctx, a, b))
            case.check(cpu_device(), [out], max_nmse=1e-7)

Resources belong to the :class:`GgmlCase`: keep using tensors and the graph
only inside the ``with`` block.

Everything is loaded lazily, so importing this module never fails; tests call
:func:`require_ggml` (or use :func:`lib`) and skip where llama-cpp-python is
missing.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import struct
import sys
import tempfile
import time
from ctypes import (CFUNCTYPE, POINTER, Structure, c_bool, c_char, c_char_p, c_float, c_int,
                    c_int32, c_int64, c_size_t, c_void_p)
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "GgmlUnavailable", "GgmlAborted", "lib", "require_ggml", "fn", "GgmlTensor", "ggml_init_params", "T",
    "GgmlCase", "RefRun", "OursRun", "run_ours", "serialize_graph", "graph_nodes",
    "tensor_array", "nmse", "assert_close", "cpu_device", "f32_param", "op_name",
    "DEVICE_NAMES", "device_named", "device_under_test", "set_device_under_test",
    "c_void_p", "c_int", "c_int32", "c_int64", "c_float", "c_bool", "c_size_t", "c_char_p",
    "F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
    "Q6_K", "Q8_K", "IQ4_NL", "I8", "I16", "I32", "I64", "F64", "BF16",
]

# enum ggml_type (the ones tests use most; any value works where a type is expected)
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1 = 0, 1, 2, 3, 6, 7, 8, 9
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K = 10, 11, 12, 13, 14, 15
IQ4_NL = 20
I8, I16, I32, I64, F64 = 24, 25, 26, 27, 28
BF16 = 30

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_OBJECT_SIZE = 32  # sizeof(struct ggml_object): offs, size, next, type, padding[4]
GGML_TENSOR_SIZE = 336  # sizeof(struct ggml_tensor) on 64-bit platforms

_INT_DTYPES = {I8: np.int8, I16: np.int16, I32: np.int32, I64: np.int64}
_FLOAT_DTYPES = {F32: np.float32, F16: np.float16, F64: np.float64}


class GgmlUnavailable(RuntimeError):
    """llama-cpp-python (and so ggml's shared libraries) is not installed."""


class GgmlAborted(RuntimeError):
    """ggml's reference computation hit a GGML_ASSERT/GGML_ABORT (in an isolated child process)."""


# --------------------------------------------------------------------------
# C structures
# --------------------------------------------------------------------------

class GgmlTensor(Structure):
    """``struct ggml_tensor``, field for field (ggml.h)."""

    _fields_ = [
        ("type", c_int32),                                # enum ggml_type
        ("buffer", c_void_p),                             # struct ggml_backend_buffer *
        ("ne", c_int64 * GGML_MAX_DIMS),
        ("nb", c_size_t * GGML_MAX_DIMS),
        ("op", c_int32),                                  # enum ggml_op
        ("op_params", c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", c_int32),
        ("src", c_void_p * GGML_MAX_SRC),
        ("view_src", c_void_p),
        ("view_offs", c_size_t),
        ("data", c_void_p),
        ("name", c_char * GGML_MAX_NAME),
        ("extra", c_void_p),
        ("padding", c_char * 8),
    ]


assert ctypes.sizeof(GgmlTensor) == GGML_TENSOR_SIZE, ctypes.sizeof(GgmlTensor)
assert GgmlTensor.op_params.offset == 84 and GgmlTensor.data.offset == 248
assert GgmlTensor.name.offset == 256


def T(ptr: int) -> GgmlTensor:
    """The ``struct ggml_tensor`` at ``ptr`` (a live view: reads see ggml's current values)."""
    if not ptr:
        raise ValueError("NULL ggml_tensor pointer")
    return GgmlTensor.from_address(ptr)


class ggml_init_params(Structure):
    """``struct ggml_init_params``; ``ggml_init`` takes it BY VALUE."""

    _fields_ = [("mem_size", c_size_t), ("mem_buffer", c_void_p), ("no_alloc", c_bool)]


class ggml_type_traits(Structure):
    _fields_ = [
        ("type_name", c_char_p),
        ("blck_size", c_int64),
        ("blck_size_interleave", c_int64),
        ("type_size", c_size_t),
        ("is_quantized", c_bool),
        ("to_float", c_void_p),        # void (*)(const void *, float *, int64_t)
        ("from_float_ref", c_void_p),  # void (*)(const float *, void *, int64_t)
    ]


class ggml_type_traits_cpu(Structure):
    """``struct ggml_type_traits_cpu`` (ggml-cpu.h): what the CPU backend's products use."""

    _fields_ = [
        ("from_float", c_void_p),    # void (*)(const float *, void *, int64_t): this CPU's code
        ("vec_dot", c_void_p),       # ggml_vec_dot_t
        ("vec_dot_type", c_int),     # the type activations are converted to for vec_dot
        ("nrows", c_int64),
    ]


_TO_FLOAT = CFUNCTYPE(None, c_void_p, c_void_p, c_int64)
_FROM_FLOAT = CFUNCTYPE(None, c_void_p, c_void_p, c_int64)
_VEC_DOT = CFUNCTYPE(None, c_int, POINTER(c_float), c_size_t, c_void_p, c_size_t, c_void_p,
                     c_size_t, c_int)


# --------------------------------------------------------------------------
# Loading the libraries and binding functions
# --------------------------------------------------------------------------

def lib_dir() -> Path:
    """llama-cpp-python's ``lib/`` directory, found without importing the package."""
    import llamacpp  # the llama.cpp RPC harness beside this file knows where it lives

    try:
        return llamacpp.lib_dir()
    except llamacpp.LlamaCppUnavailable as exc:
        raise GgmlUnavailable(str(exc)) from None


_LIBS: list | None = None
_FNS: dict[str, object] = {}


def lib() -> list:
    """The loaded libraries [ggml-base, ggml, ggml-cpu], loaded once with RTLD_GLOBAL."""
    global _LIBS
    if _LIBS is None:
        d = lib_dir()
        libs = []
        for stem in ("ggml-base", "ggml", "ggml-cpu"):
            path = next((d / n for n in (f"lib{stem}.so", f"lib{stem}.dylib", f"{stem}.dll")
                         if (d / n).exists()), None)
            if path is None:
                raise GgmlUnavailable(f"lib{stem} not found in {d}")
            try:
                libs.append(ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL))
            except OSError as exc:
                raise GgmlUnavailable(f"cannot load {path}: {exc}") from None
        _LIBS = libs
        overhead = fn("ggml_tensor_overhead", c_size_t)()
        if overhead != GGML_OBJECT_SIZE + GGML_TENSOR_SIZE:
            _LIBS = None
            raise GgmlUnavailable(
                f"ggml_tensor_overhead() is {overhead}, expected {GGML_OBJECT_SIZE} + "
                f"{GGML_TENSOR_SIZE}: struct ggml_tensor changed, update GgmlTensor")
        fn("ggml_cpu_init", None)()  # fp16 tables and CPU feature detection
    return _LIBS


_PARENT_RAN_OPENMP = False  # set once ggml computed in this process (GgmlCase(isolate=False))
_OMP_LIMITED = False


def _limit_parent_openmp():
    """Keep this process from ever starting an OpenMP thread pool, so fork()ed children work.

    libgomp is not fork-safe: once a process has run a parallel region with
    worker threads, a forked child that starts another one hangs. ggml's
    CPU compute names its thread count explicitly (unaffected by this), but
    ggml-base's IQ2/IQ3 grid initialisation (run by ggml_quantize_chunk)
    uses the default team size: make that 1 in the parent.
    """
    global _OMP_LIMITED
    if _OMP_LIMITED:
        return
    _OMP_LIMITED = True
    for library in lib():
        try:
            f = library.omp_set_num_threads  # dlsym on a handle also searches its dependencies
        except AttributeError:
            continue
        f.restype, f.argtypes = None, [c_int]
        f(1)
        return


def require_ggml():
    """Skip the calling test (pytest.skip) when ggml's libraries cannot be loaded."""
    import pytest

    try:
        lib()
    except GgmlUnavailable as exc:
        pytest.skip(str(exc))


def fn(name: str, restype, *argtypes):
    """Declare (once) and return the ggml C function ``name``.

    ``restype``/``argtypes`` are ctypes types; pass tensors, contexts and
    graphs as ``c_void_p``, ``bool`` parameters as ``c_bool``, ``float`` ones
    as ``c_float`` (never leave them undeclared: ctypes would pass a double).
    A second call with the same name returns the cached function (its
    declaration must agree).
    """
    f = _FNS.get(name)
    if f is not None:
        if f.restype != restype or tuple(f.argtypes or ()) != tuple(argtypes):
            raise TypeError(f"{name} was already declared as {f.restype} {f.argtypes}")
        return f
    for library in lib():
        try:
            f = getattr(library, name)
        except AttributeError:
            continue
        f.restype = restype
        f.argtypes = list(argtypes)
        _FNS[name] = f
        return f
    raise AttributeError(f"no ggml library exports {name}")


# Functions the harness itself uses. Declared lazily, through fn().
def _f(name):
    sigs = {
        "ggml_init": (c_void_p, ggml_init_params),
        "ggml_free": (None, c_void_p),
        "ggml_new_tensor": (c_void_p, c_void_p, c_int, c_int, POINTER(c_int64)),
        "ggml_set_name": (c_void_p, c_void_p, c_char_p),
        "ggml_set_output": (None, c_void_p),
        "ggml_set_input": (None, c_void_p),
        "ggml_nbytes": (c_size_t, c_void_p),
        "ggml_nelements": (c_int64, c_void_p),
        "ggml_is_contiguous": (c_bool, c_void_p),
        "ggml_blck_size": (c_int64, c_int),
        "ggml_type_size": (c_size_t, c_int),
        "ggml_row_size": (c_size_t, c_int, c_int64),
        "ggml_is_quantized": (c_bool, c_int),
        "ggml_type_name": (c_char_p, c_int),
        "ggml_op_name": (c_char_p, c_int),
        "ggml_get_type_traits": (POINTER(ggml_type_traits), c_int),
        "ggml_get_type_traits_cpu": (POINTER(ggml_type_traits_cpu), c_int),
        "ggml_quantize_chunk": (c_size_t, c_int, POINTER(c_float), c_void_p, c_int64, c_int64,
                                c_int64, POINTER(c_float)),
        "ggml_quantize_requires_imatrix": (c_bool, c_int),
        "ggml_get_first_tensor": (c_void_p, c_void_p),
        "ggml_get_next_tensor": (c_void_p, c_void_p, c_void_p),
        "ggml_tensor_overhead": (c_size_t,),
        "ggml_graph_overhead_custom": (c_size_t, c_size_t, c_bool),
        "ggml_new_graph_custom": (c_void_p, c_void_p, c_size_t, c_bool),
        "ggml_build_forward_expand": (None, c_void_p, c_void_p),
        "ggml_graph_n_nodes": (c_int, c_void_p),
        "ggml_graph_node": (c_void_p, c_void_p, c_int),
        "ggml_permute": (c_void_p, c_void_p, c_void_p, c_int, c_int, c_int, c_int),
        "ggml_transpose": (c_void_p, c_void_p, c_void_p),
        "ggml_reshape_4d": (c_void_p, c_void_p, c_void_p, c_int64, c_int64, c_int64, c_int64),
        "ggml_view_4d": (c_void_p, c_void_p, c_void_p, c_int64, c_int64, c_int64, c_int64,
                         c_size_t, c_size_t, c_size_t, c_size_t),
        "ggml_cont": (c_void_p, c_void_p, c_void_p),
        "ggml_backend_cpu_init": (c_void_p,),
        "ggml_backend_cpu_set_n_threads": (None, c_void_p, c_int),
        "ggml_backend_free": (None, c_void_p),
        "ggml_backend_alloc_ctx_tensors": (c_void_p, c_void_p, c_void_p),
        "ggml_backend_buffer_get_base": (c_void_p, c_void_p),
        "ggml_backend_buffer_get_size": (c_size_t, c_void_p),
        "ggml_backend_buffer_free": (None, c_void_p),
        "ggml_backend_tensor_set": (None, c_void_p, c_void_p, c_size_t, c_size_t),
        "ggml_backend_graph_compute": (c_int, c_void_p, c_void_p),
    }
    restype, *argtypes = sigs[name]
    return fn(name, restype, *argtypes)


def f32_param(t: int, i: int) -> float:
    """op_params[i] of tensor ``t`` read as the float ggml stored there (bit cast)."""
    return struct.unpack("<f", struct.pack("<i", T(t).op_params[i]))[0]


def op_name(t: int) -> str:
    """ggml's name of the op computing ``t`` (UNARY and GLU with their sub-op)."""
    g = T(t)
    name = _f("ggml_op_name")(g.op).decode()
    try:
        from rpcserver import ggml as rg

        name = rg.op_name(g.op)
        if g.op == rg.Op.UNARY and 0 <= g.op_params[0] < len(rg.UNARY_OPS):
            name += f"({rg.UNARY_OPS[g.op_params[0]]})"
        elif g.op == rg.Op.GLU and 0 <= g.op_params[0] < len(rg.GLU_OPS):
            name += f"({rg.GLU_OPS[g.op_params[0]]})"
    except ImportError:
        pass
    return name


def _graph_summary(graph: int, outputs) -> str:
    nodes = graph_nodes(graph)
    ops = ", ".join(f"{op_name(n)}{list(T(n).ne)}" for n in nodes[:8])
    more = f" (+{len(nodes) - 8} more)" if len(nodes) > 8 else ""
    return f"nodes [{ops}{more}]"


def type_name(type_: int) -> str:
    return _f("ggml_type_name")(type_).decode()


def _describe(t: int) -> str:
    g = T(t)
    return (f"{type_name(g.type)}{list(g.ne)} nb={list(g.nb)} "
            f"'{g.name.decode(errors='replace')}'")


# --------------------------------------------------------------------------
# Reading tensors out of a byte image of a buffer
# --------------------------------------------------------------------------

def _to_float(type_: int, raw: np.ndarray, n: int) -> np.ndarray:
    """ggml's own dequantization of ``n`` elements in the contiguous bytes ``raw``."""
    traits = _f("ggml_get_type_traits")(type_).contents
    if not traits.to_float:
        raise NotImplementedError(f"ggml has no to_float for {type_name(type_)}")
    src = np.ascontiguousarray(raw, dtype=np.uint8)
    out = np.empty(n, dtype=np.float32)
    _TO_FLOAT(traits.to_float)(src.ctypes.data, out.ctypes.data, n)
    return out


def ggml_quantize(type_: int, values: np.ndarray) -> np.ndarray:
    """Rows of float32 ``values`` (shape (rows, n)) in ggml type ``type_``, by ggml's own
    quantizer (ggml_quantize_chunk; a unit importance matrix where the type needs one):
    uint8, shape (rows, row bytes)."""
    from rpcserver import ggml as rg

    require_ggml()
    src = np.ascontiguousarray(values, dtype=np.float32)
    rows, n = src.shape
    info = rg.TYPES[type_]
    row_bytes = info.row_size(n)
    imatrix = None
    if _f("ggml_quantize_requires_imatrix")(type_):
        im = np.ones(n, np.float32)
        imatrix = im.ctypes.data_as(POINTER(c_float))
    dst = np.zeros((rows, row_bytes), np.uint8)
    _f("ggml_quantize_chunk")(type_, src.ctypes.data_as(POINTER(c_float)), dst.ctypes.data,
                              0, rows, n, imatrix)
    return dst


def ggml_cpu_activations(type_: int, values: np.ndarray) -> tuple[int, np.ndarray]:
    """How ggml's CPU backend converts float32 activation rows (``values``, (rows, n)) before
    multiplying them by a weight of type ``type_``: (vec_dot_type, the rows in that type as
    uint8 (rows, row bytes)), made by this CPU's own ``from_float`` (the SIMD code the
    backend runs, not the reference quantizer)."""
    from rpcserver import ggml as rg

    require_ggml()
    vec_dot_type = _f("ggml_get_type_traits_cpu")(type_).contents.vec_dot_type
    src = np.ascontiguousarray(values, dtype=np.float32)
    rows, n = src.shape
    dst = np.zeros((rows, rg.TYPES[vec_dot_type].row_size(n)), np.uint8)
    convert = _FROM_FLOAT(_f("ggml_get_type_traits_cpu")(vec_dot_type).contents.from_float)
    for r in range(rows):
        convert(src[r].ctypes.data, dst[r].ctypes.data, n)
    return vec_dot_type, dst


def ggml_cpu_product(type_: int, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values @ W^T`` as ggml's CPU backend computes it, for weight ``rows`` of type ``type_``
    (uint8 (M, row bytes)) and float32 activations ``values`` (N, K): the activations through
    :func:`ggml_cpu_activations`, then the type's ``vec_dot`` per row. (N, M) float32."""
    require_ggml()
    traits = _f("ggml_get_type_traits_cpu")(type_).contents
    _, act = ggml_cpu_activations(type_, values)
    w = np.ascontiguousarray(rows, dtype=np.uint8)
    n_k = values.shape[1]
    dot = _VEC_DOT(traits.vec_dot)
    out = np.zeros((values.shape[0], w.shape[0]), np.float32)
    s = c_float()
    for n in range(act.shape[0]):
        for m in range(w.shape[0]):
            dot(n_k, ctypes.byref(s), 0, w[m].ctypes.data, 0, act[n].ctypes.data, 0, 1)
            out[n, m] = s.value
    return out


def ggml_to_float(type_: int, rows: np.ndarray) -> np.ndarray:
    """ggml's own to_float of uint8 ``rows`` (shape (rows, row bytes)) in type ``type_``."""
    from rpcserver import ggml as rg

    require_ggml()
    info = rg.TYPES[type_]
    n = rows.shape[1] // info.type_size * info.block_size
    return _to_float(type_, np.ascontiguousarray(rows), rows.shape[0] * n).reshape(rows.shape[0], n)


def tensor_array(image, offset: int, type_: int, ne, nb, *, native: bool = False) -> np.ndarray:
    """The elements of a tensor stored at ``offset`` of ``image`` (bytes of a whole buffer).

    Shape ``(ne3, ne2, ne1, ne0)`` (outermost first), honouring the byte
    strides ``nb``. float32 for F32/F16/BF16/F64 and quantized types; integer
    types keep their dtype. ``native=True`` gives the storage dtype instead
    (F16 as float16, BF16 as raw uint16 bits): for bit-exact comparisons.
    """
    ne = [int(x) for x in ne]
    nb = [int(x) for x in nb]
    shape = (ne[3], ne[2], ne[1], ne[0])
    buf = image if isinstance(image, (bytes, bytearray, memoryview)) else bytes(image)
    if any(n == 0 for n in ne):
        return np.zeros(shape, np.float32)
    if type_ in _FLOAT_DTYPES or type_ in _INT_DTYPES or type_ == BF16:
        dtype = _FLOAT_DTYPES.get(type_) or _INT_DTYPES.get(type_) or np.uint16
        a = np.ndarray(shape, dtype=dtype, buffer=buf, offset=offset,
                       strides=(nb[3], nb[2], nb[1], nb[0])).copy()
        if native or type_ in _INT_DTYPES:
            return a
        if type_ == BF16:
            return (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float32)
    row = _f("ggml_row_size")(type_, ne[0])
    rows = np.ndarray(shape[:3] + (row,), dtype=np.uint8, buffer=buf, offset=offset,
                      strides=(nb[3], nb[2], nb[1], 1)).copy()
    if native:
        return rows
    return _to_float(type_, rows, int(np.prod(shape))).reshape(shape)


# --------------------------------------------------------------------------
# Graph walking and RPC serialization
# --------------------------------------------------------------------------

def graph_nodes(graph: int) -> list[int]:
    """cgraph->nodes[0 .. n_nodes)."""
    n = _f("ggml_graph_n_nodes")(graph)
    node = _f("ggml_graph_node")
    return [node(graph, i) for i in range(n)]


def _use_counts(nodes: list[int]) -> dict[int, int]:
    """cgraph->use_counts as ggml_visit_parents computes them.

    Every tensor reached from the nodes through ``src`` is visited once; each
    visit adds one use to each of its (non-null) sources. Tensors reached
    only through ``view_src`` are not in the graph's hash set (count 0).
    """
    counts: dict[int, int] = {}
    stack = list(nodes)
    seen = set()
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        counts.setdefault(t, 0)
        for s in T(t).src:
            if s:
                counts[s] = counts.get(s, 0) + 1
                stack.append(s)
    return counts


def serialize_graph(graph: int, *, remote_buffer: int, remote_base: int):
    """(node ids, RpcTensor list) exactly as ggml-rpc's ``serialize_graph`` would send them.

    Every tensor must live in one ggml buffer; its ``data`` is translated to
    ``remote_base + (data - ggml buffer base)`` and its buffer to ``remote_buffer``.
    Tensors with no buffer are sent with buffer 0 and data 0, like the client does.
    """
    from rpcserver.protocol import RpcTensor

    nodes = graph_nodes(graph)
    counts = _use_counts(nodes)
    tensors: list = []
    visited: set[int] = set()
    ggml_base: dict[int, int] = {}
    first_buffer = None

    def serialize(t: int):
        nonlocal first_buffer
        g = T(t)
        if g.buffer:
            if first_buffer is None:
                first_buffer = g.buffer
            elif g.buffer != first_buffer:
                raise ValueError(f"tensor {_describe(t)} lives in a second ggml buffer; the harness "
                                 f"maps exactly one buffer")
            base = ggml_base.setdefault(g.buffer, _f("ggml_backend_buffer_get_base")(g.buffer))
            buffer, data = remote_buffer, remote_base + (g.data - base)
        else:
            buffer, data = 0, 0
        return RpcTensor(
            id=t, type=g.type, buffer=buffer,
            ne=tuple(int(x) & 0xFFFFFFFF for x in g.ne),
            nb=tuple(int(x) & 0xFFFFFFFF for x in g.nb),
            op=g.op, op_params=tuple(g.op_params), flags=g.flags,
            src=tuple(s or 0 for s in g.src), view_src=g.view_src or 0, view_offs=g.view_offs,
            data=data, name=g.name.decode("utf-8", "replace"), use_count=counts.get(t, 0))

    def add_tensor(t):  # ggml-rpc.cpp add_tensor: sources first, then view_src, then the tensor
        if not t or t in visited:
            return
        visited.add(t)
        g = T(t)
        for s in g.src:
            add_tensor(s)
        add_tensor(g.view_src)
        tensors.append(serialize(t))

    for n in nodes:
        add_tensor(n)
    return nodes, tensors


#: the devices every conformance test runs on (the ``device`` fixture in conftest.py):
#: the CPU plugin's NumPy device and the Metal plugin's MLX device on the CPU
DEVICE_NAMES = ("CPU", "MLX-CPU", "CUDA-host")
#: what provides each of them, for the message when one is missing
DEVICE_PROVIDERS = {
    "CPU": "rpcserver-cpu (`pip install ./plugins/cpu`)",
    "MLX-CPU": "rpcserver-metal with MLX (`pip install ./plugins/metal \"mlx[cpu]\"`)",
}
#: not a plugin's device: the CUDA plugin's CudaDevice on a CuPy stand-in that runs its
#: kernels compiled for the host (tests/cuda_standin.py), so that the CUDA code paths pass the
#: same suites without a GPU
HOST_CUDA = "CUDA-host"
#: the memory CUDA-host reports (its buffers are host memory, allocated when asked for)
HOST_CUDA_CAPACITY = 64 << 30
_DEVICES: dict = {}
_REGISTRY = None
_ACTIVE = None


def device_named(name: str):
    """The installed rpcserver device called ``name`` (plugins discovered once per process).

    Fails the calling test (never skips) when no plugin provides it: the conformance suite
    must run on every device, so the test run has to install them (scripts/test.sh does).
    """
    global _REGISTRY
    dev = _DEVICES.get(name)
    if dev is None and name == HOST_CUDA:
        import cuda_standin

        dev = _DEVICES[name] = cuda_standin.fake_device(capacity=HOST_CUDA_CAPACITY)
    if dev is None:
        if _REGISTRY is None:
            from rpcserver.plugins import discover

            _REGISTRY = discover()
        entry = _REGISTRY.find(name)
        if entry is None:
            import pytest

            why = dict(_REGISTRY.unavailable)
            pytest.fail(f"no rpcserver device named {name} (installed: {_REGISTRY.device_names()}; "
                        f"backends without devices: {why or 'none'}): the test run must install "
                        f"{DEVICE_PROVIDERS.get(name, 'its plugin')}; scripts/test.sh does",
                        pytrace=False)
        dev = _DEVICES[name] = entry.device
    return dev


def set_device_under_test(device) -> None:
    """Make ``device`` the default of :func:`run_ours` (None: back to the CPU)."""
    global _ACTIVE
    _ACTIVE = device


def device_under_test():
    """The device the current test runs rpcserver on: the ``device`` fixture's, else the CPU."""
    return _ACTIVE if _ACTIVE is not None else cpu_device()


def cpu_device():
    """rpcserver's CPU plugin device (discovered once per process)."""
    return device_named("CPU")


@dataclass
class OursRun:
    """What rpcserver computed."""

    image: bytes  # the whole buffer after graph_compute
    arrays: list  # one array per output (see tensor_array)
    tensors: dict  # tensor id -> RpcTensor, as sent
    base: int  # our made-up base address of the buffer

    def array(self, t: int, *, native: bool = False) -> np.ndarray:
        r = self.tensors[t]
        return tensor_array(self.image, r.data - self.base, r.type, r.ne, r.nb, native=native)


def run_ours(device, graph_ptr: int, snapshot: bytes, outputs, *, native: bool = False) -> OursRun:
    """Execute ggml graph ``graph_ptr`` with rpcserver, starting from ``snapshot``.

    ``snapshot`` is the byte image of the ggml buffer holding every tensor
    (``RefRun.snapshot``). Raises whatever rpcserver raises (``GraphError``
    for an unimplemented op, a validation failure or an executor error).
    """
    from rpcserver.buffers import AddressSpace, BufferTable, SessionBuffer
    from rpcserver.device_state import forget_buffer
    from rpcserver.graph import parse_graph
    from rpcserver.protocol import pack_graph

    size = len(snapshot)
    buffer = device.alloc_buffer(size)
    if buffer is None:
        raise MemoryError(f"{device.name} could not allocate {size} bytes")
    try:
        buffer.write(0, snapshot)
        if hasattr(buffer, "mark_written"):
            buffer.mark_written()
        handle, base = AddressSpace().reserve(size)
        table = BufferTable()
        table.add(SessionBuffer(handle, base, size, 0, buffer))
        nodes, tensors = serialize_graph(graph_ptr, remote_buffer=handle, remote_base=base)
        payload = pack_graph(0, nodes, tensors)
        graph = parse_graph(payload, table, 1, lambda entry: entry.device_index)
        device.graph_compute(graph)
        image = bytes(buffer.read(0, size))
    finally:
        forget_buffer(buffer)  # what a session does before freeing: drop its prepared forms
        buffer.free()
    by_id = {r.id: r for r in tensors}
    run = OursRun(image, [], by_id, base)
    for t in outputs:
        if t not in by_id:
            raise ValueError(f"output {_describe(t)} is not part of the graph")
        run.arrays.append(run.array(t, native=native))
    return run


# --------------------------------------------------------------------------
# The reference side
# --------------------------------------------------------------------------

@dataclass
class RefRun:
    """What ggml's CPU backend computed, plus everything needed to replay it."""

    graph: int  # struct ggml_cgraph *
    snapshot: bytes  # the whole buffer after the inputs were filled, before computing
    image: bytes  # the whole buffer after computing
    base: int  # ggml buffer base address
    outputs: list
    arrays: list = field(default_factory=list)

    def _offset(self, t: int) -> int:
        return T(t).data - self.base

    def array(self, t: int, *, native: bool = False) -> np.ndarray:
        """Tensor ``t`` after the computation."""
        g = T(t)
        return tensor_array(self.image, self._offset(t), g.type, g.ne, g.nb, native=native)

    def input(self, t: int, *, native: bool = False) -> np.ndarray:
        """Tensor ``t`` as it was before the computation (what the inputs were filled with)."""
        g = T(t)
        return tensor_array(self.snapshot, self._offset(t), g.type, g.ne, g.nb, native=native)


class GgmlCase:
    """One test graph: a no_alloc ggml context, its tensors, and both runs.

    ``fill_range``: the uniform distribution leaves are filled from
    (test-backend-ops uses [-1, 1]). Integer leaves are filled with zeros
    unless the test supplies data (an index tensor with garbage would make
    ggml abort the process).

    ``isolate`` (default: wherever ``os.fork`` exists): ggml's graph compute
    runs in a forked child, so a GGML_ASSERT in ggml's CPU kernels (an op
    or layout the CPU backend does not support) raises :class:`GgmlAborted`
    with ggml's message instead of killing the test process. Building the
    graph (ggml_add & co., which assert on bad shapes) always runs in-process.
    ``compute_timeout``: seconds the isolated child may take.
    """

    def __init__(self, *, n_threads: int | None = None, seed: int = 0, max_tensors: int = 1024,
                 graph_size: int = 2048, fill_range=(-1.0, 1.0), isolate: bool | None = None,
                 compute_timeout: float = 120.0):
        lib()
        self.isolate = hasattr(os, "fork") if isolate is None else isolate
        if self.isolate and _PARENT_RAN_OPENMP:
            # forking after an in-process OpenMP compute would hang the child
            import warnings

            warnings.warn("GgmlCase: ggml already computed in this process (isolate=False), "
                          "so the reference compute cannot be isolated any more", stacklevel=2)
            self.isolate = False
        if self.isolate:
            _limit_parent_openmp()
        self.compute_timeout = compute_timeout
        self.n_threads = n_threads or max(1, min(4, os.cpu_count() or 1))
        self.rng = np.random.default_rng(seed)
        self.graph_size = graph_size
        self.fill_range = fill_range
        mem = (_f("ggml_tensor_overhead")() * max_tensors
               + _f("ggml_graph_overhead_custom")(graph_size, False) + 4096)
        self.ctx = _f("ggml_init")(ggml_init_params(mem, None, True))
        if not self.ctx:
            raise MemoryError("ggml_init failed")
        self.backend = None
        self.buffer = None
        self.fills: dict[int, object] = {}
        self.ref: RefRun | None = None

    # -- lifetime -------------------------------------------------------------

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.buffer:
            _f("ggml_backend_buffer_free")(self.buffer)
            self.buffer = None
        if self.backend:
            _f("ggml_backend_free")(self.backend)
            self.backend = None
        if self.ctx:
            _f("ggml_free")(self.ctx)
            self.ctx = None

    # -- building ---------------------------------------------------------------

    def new_tensor(self, type_: int, ne, name: str | None = None, fill=None) -> int:
        """ggml_new_tensor(ctx, type, len(ne), ne); ``fill`` as in :meth:`run`'s inputs_fill."""
        ne = [int(x) for x in ne]
        if not 1 <= len(ne) <= GGML_MAX_DIMS:
            raise ValueError(f"ne must have 1 to 4 dimensions, got {ne}")
        t = _f("ggml_new_tensor")(self.ctx, type_, len(ne), (c_int64 * len(ne))(*ne))
        if not t:
            raise MemoryError("ggml_new_tensor failed: raise GgmlCase(max_tensors=...)")
        if name:
            self.set_name(t, name)
        if fill is not None:
            self.fills[t] = fill
        return t

    def set_name(self, t: int, name: str) -> int:
        return _f("ggml_set_name")(t, name.encode()[: GGML_MAX_NAME - 1])

    def mark_output(self, t: int) -> int:
        """ggml_set_output(t); returns t."""
        _f("ggml_set_output")(t)
        return t

    def mark_input(self, t: int) -> int:
        _f("ggml_set_input")(t)
        return t

    # non-contiguous views ---------------------------------------------------

    def permute(self, t: int, a0: int, a1: int, a2: int, a3: int) -> int:
        return _f("ggml_permute")(self.ctx, t, a0, a1, a2, a3)

    def transpose(self, t: int) -> int:
        return _f("ggml_transpose")(self.ctx, t)

    def reshape(self, t: int, ne) -> int:
        ne = list(ne) + [1] * (4 - len(ne))
        return _f("ggml_reshape_4d")(self.ctx, t, *ne)

    def view_4d(self, t: int, ne, nb1: int, nb2: int, nb3: int, offset: int = 0) -> int:
        ne = list(ne) + [1] * (4 - len(ne))
        return _f("ggml_view_4d")(self.ctx, t, *ne, nb1, nb2, nb3, offset)

    def cont(self, t: int) -> int:
        return _f("ggml_cont")(self.ctx, t)

    def permuted(self, type_: int, ne, perm, name: str | None = None, fill=None) -> int:
        """A non-contiguous tensor of shape ``ne``: ``ggml_permute(base, *perm)`` of a new leaf.

        The leaf gets ``base.ne[i] = ne[perm[i]]``, so the permuted view has
        exactly the shape ``ne`` (test-backend-ops' way to make permuted inputs).
        ``fill`` (if given) fills the underlying leaf, in the leaf's own layout.
        """
        ne = list(ne) + [1] * (4 - len(ne))
        perm = list(perm)
        if sorted(perm) != [0, 1, 2, 3]:
            raise ValueError(f"perm must be a permutation of 0..3, got {perm}")
        base = self.new_tensor(type_, [ne[perm[i]] for i in range(4)], name=name, fill=fill)
        return self.permute(base, *perm)

    def strided(self, type_: int, ne, pad=(0, 1, 1, 1), offset_elems: int = 0,
                name: str | None = None, fill=None) -> int:
        """A non-contiguous tensor of shape ``ne``: a ggml_view_4d into a larger leaf.

        The leaf has ``ne[i] + pad[i]`` elements per dimension, so rows and
        planes of the view have gaps. For quantized types ``pad[0]`` and
        ``offset_elems`` must be multiples of the block size.
        """
        ne = list(ne) + [1] * (4 - len(ne))
        pad = list(pad) + [0] * (4 - len(pad))
        base = self.new_tensor(type_, [n + p for n, p in zip(ne, pad)], name=name, fill=fill)
        g = T(base)
        offset = _f("ggml_row_size")(type_, offset_elems) if offset_elems else 0
        return self.view_4d(base, ne, g.nb[1], g.nb[2], g.nb[3], offset)

    # -- running ----------------------------------------------------------------

    def tensors(self) -> list[int]:
        """Every tensor of the context, in creation order."""
        first, nxt = _f("ggml_get_first_tensor"), _f("ggml_get_next_tensor")
        out, t = [], first(self.ctx)
        while t:
            out.append(t)
            t = nxt(self.ctx, t)
        return out

    def leaves(self) -> list[int]:
        """Tensors with op NONE and no view_src: the ones run() fills."""
        return [t for t in self.tensors() if T(t).op == 0 and not T(t).view_src]

    def _fill_values(self, t: int, spec) -> bytes:
        g = T(t)
        type_, n = g.type, _f("ggml_nelements")(t)
        nbytes = _f("ggml_nbytes")(t)
        if callable(spec):
            spec = spec(self.rng, tuple(g.ne))
        if spec is None:
            if type_ in _INT_DTYPES:
                return bytes(nbytes)
            lo, hi = self.fill_range
            spec = self.rng.uniform(lo, hi, n)
        if isinstance(spec, (bytes, bytearray, memoryview)):
            raw = bytes(spec)
            if len(raw) != nbytes:
                raise ValueError(f"{_describe(t)} needs {nbytes} bytes, got {len(raw)}")
            return raw
        values = np.asarray(spec)
        if values.size == 1 and n != 1:
            values = np.full(n, values.reshape(()))
        if values.size != n:
            raise ValueError(f"{_describe(t)} has {n} elements, fill has {values.size}")
        if type_ in _INT_DTYPES:
            return np.ascontiguousarray(values, dtype=_INT_DTYPES[type_]).tobytes()
        if type_ in (F32, F64):
            return np.ascontiguousarray(values, dtype=_FLOAT_DTYPES[type_]).tobytes()
        # F16, BF16 and quantized types: ggml's own conversion / quantization
        src = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
        n_per_row = int(g.ne[0])
        nrows = n // n_per_row
        imatrix = None
        if _f("ggml_quantize_requires_imatrix")(type_):
            im = np.ones(n_per_row, np.float32)
            imatrix = im.ctypes.data_as(POINTER(c_float))
        dst = np.zeros(max(nbytes, 1), np.uint8)
        _f("ggml_quantize_chunk")(type_, src.ctypes.data_as(POINTER(c_float)), dst.ctypes.data,
                                  0, nrows, n_per_row, imatrix)
        return dst[:nbytes].tobytes()

    def run(self, outputs, inputs_fill=None) -> RefRun:
        """Build, allocate, fill, snapshot and compute on ggml's CPU backend.

        ``outputs``: tensors to expand the graph from (ggml_build_forward_expand
        in this order) and to read back. ``inputs_fill``: {tensor: spec} for
        leaves, overriding the ``fill`` given to :meth:`new_tensor`. A spec
        is raw ``bytes`` (exactly ggml_nbytes), an array-like of values
        (element count of the tensor, ggml order = C order of shape
        (ne3, ne2, ne1, ne0); a scalar broadcasts; converted/quantized with
        ggml for F16/BF16/quantized leaves) or ``callable(rng, ne) -> spec``.
        """
        if self.ref is not None:
            raise RuntimeError("a GgmlCase runs once; create another case")
        outputs = list(outputs)
        graph = _f("ggml_new_graph_custom")(self.ctx, self.graph_size, False)
        for t in outputs:
            _f("ggml_build_forward_expand")(graph, t)

        self.backend = _f("ggml_backend_cpu_init")()
        _f("ggml_backend_cpu_set_n_threads")(self.backend, self.n_threads)
        self.buffer = _f("ggml_backend_alloc_ctx_tensors")(self.ctx, self.backend)
        if not self.buffer:
            raise MemoryError("ggml_backend_alloc_ctx_tensors failed (or nothing to allocate)")

        fills = dict(self.fills)
        fills.update(inputs_fill or {})
        leaves = self.leaves()
        for t in fills:
            if t not in leaves:
                raise ValueError(f"{_describe(t)} is not a leaf of this case (op NONE, no view_src)")
        for t in leaves:
            raw = self._fill_values(t, fills.get(t))
            if raw:
                _f("ggml_backend_tensor_set")(t, raw, 0, len(raw))

        base = _f("ggml_backend_buffer_get_base")(self.buffer)
        size = _f("ggml_backend_buffer_get_size")(self.buffer)
        snapshot = ctypes.string_at(base, size)
        if self.isolate:
            image = self._compute_in_child(graph, base, size, outputs)
        else:
            global _PARENT_RAN_OPENMP
            _PARENT_RAN_OPENMP = True
            status = _f("ggml_backend_graph_compute")(self.backend, graph)
            if status != 0:
                raise RuntimeError(f"ggml_backend_graph_compute returned status {status}")
            image = ctypes.string_at(base, size)
        self.ref = RefRun(graph, snapshot, image, base, outputs)
        self.ref.arrays = [self.ref.array(t) for t in outputs]
        return self.ref

    def _compute_in_child(self, graph: int, base: int, size: int, outputs) -> bytes:
        """ggml_backend_graph_compute in a forked child; the buffer image comes back via shared memory."""
        compute = _f("ggml_backend_graph_compute")
        shared = mmap.mmap(-1, max(size, 1))  # anonymous MAP_SHARED: survives the fork both ways
        with tempfile.TemporaryFile() as err:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:  # child: never return into the caller's code
                code = 4
                try:
                    os.environ["GGML_NO_BACKTRACE"] = "1"  # no gdb attach on abort
                    import faulthandler

                    faulthandler.disable()  # pytest's would dump this child's stack on abort
                    os.dup2(err.fileno(), 2)
                    status = compute(self.backend, graph)
                    if status == 0:
                        shared.seek(0)
                        shared.write(ctypes.string_at(base, size))
                        code = 0
                    else:
                        os.write(2, f"ggml_backend_graph_compute returned status {status}".encode())
                        code = 3
                finally:
                    os._exit(code)
            deadline = time.monotonic() + self.compute_timeout
            delay = 0.0002
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    status = None
                    break
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
            err.seek(0)
            message = err.read().decode("utf-8", "replace").strip()
        try:
            if status is None:
                raise GgmlAborted(
                    f"ggml's reference compute took over {self.compute_timeout}s and was killed "
                    f"(a hang right after fork usually means this process already ran OpenMP work: "
                    f"use GgmlCase(isolate=False) everywhere in this process); graph: "
                    f"{_graph_summary(graph, outputs)}")
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                how = f"signal {-code}" if code < 0 else f"exit code {code}"
                raise GgmlAborted(f"ggml's reference compute died ({how}) on "
                                  f"{_graph_summary(graph, outputs)}: {message[-2000:]}")
            return shared[:size]
        finally:
            shared.close()

    def run_ours(self, device=None, outputs=None, *, native: bool = False) -> OursRun:
        """:func:`run_ours` for this case's graph (after :meth:`run`); default device: the
        device under test (:func:`device_under_test`: the ``device`` fixture's, else the CPU)."""
        if self.ref is None:
            raise RuntimeError("call run() first")
        return run_ours(device or device_under_test(), self.ref.graph, self.ref.snapshot,
                        self.ref.outputs if outputs is None else outputs, native=native)

    def check(self, device=None, outputs=None, max_nmse: float = 1e-7, inputs_fill=None):
        """run() (if not run yet), run_ours(), and assert_close() every output. Returns (ref, ours)."""
        if self.ref is None:
            if outputs is None:
                raise ValueError("check() needs the outputs")
            self.run(outputs, inputs_fill)
        ours = self.run_ours(device)
        for t, r, o in zip(self.ref.outputs, self.ref.arrays, ours.arrays):
            assert_close(r, o, max_nmse, what=f"{op_name(t)} -> {_describe(t)}",
                         srcs=[_describe(s) for s in T(t).src if s])
        return self.ref, ours


# --------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------

def nmse(ref, ours) -> float:
    """test-backend-ops' error: sum((ref - ours)^2) / sum(ref^2), in float64.

    0.0 when both are identical (including both all-zero), inf when ``ref``
    is all zero and ``ours`` is not.
    """
    a = np.asarray(ref, dtype=np.float64).reshape(-1)
    b = np.asarray(ours, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs {b.shape}")
    err = float(np.sum((a - b) ** 2))
    norm = float(np.sum(a ** 2))
    if err == 0.0:
        return 0.0
    return err / norm if norm > 0 else float("inf")


def assert_close(ref, ours, max_nmse: float, what: str = "", srcs=(), allow_nan: bool = False):
    """Fail unless ``nmse(ref, ours) <= max_nmse``; infinities must coincide.

    NaNs fail (as in test-backend-ops) unless ``allow_nan``, in which case
    they must coincide too. The message names the op, shapes, the nmse and
    the worst element.
    """
    ref = np.asarray(ref)
    ours = np.asarray(ours)
    head = f"{what or 'tensor'}"
    if srcs:
        head += " from [" + ", ".join(srcs) + "]"
    if ref.shape != ours.shape:
        raise AssertionError(f"{head}: shape {ours.shape} != reference {ref.shape}")
    a = ref.astype(np.float64)
    b = ours.astype(np.float64)
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if allow_nan:
        if not np.array_equal(nan_a, nan_b):
            i = np.unravel_index(np.argmax(nan_a != nan_b), a.shape)
            raise AssertionError(f"{head}: NaN pattern differs, first at {i}: ref {a[i]} ours {b[i]}")
    elif nan_a.any() or nan_b.any():
        which = "reference" if nan_a.any() else "ours"
        i = np.unravel_index(np.argmax(nan_a | nan_b), a.shape)
        raise AssertionError(f"{head}: NaN in {which} at {i} (ref {a[i]}, ours {b[i]})")
    inf_a, inf_b = np.isinf(a), np.isinf(b)
    if inf_a.any() or inf_b.any():
        bad = (inf_a | inf_b) & (a != b)
        if bad.any():
            i = np.unravel_index(np.argmax(bad), a.shape)
            raise AssertionError(f"{head}: infinity mismatch at {i}: ref {a[i]} ours {b[i]}")
    keep = ~(inf_a | nan_a)
    err = nmse(np.where(keep, a, 0.0), np.where(keep, b, 0.0))
    if not err <= max_nmse:
        diff = np.where(keep, np.abs(a - b), 0.0)
        i = np.unravel_index(np.argmax(diff), a.shape) if diff.size else ()
        raise AssertionError(
            f"{head}: NMSE = {err:.3e} > {max_nmse:.1e}; shape (ne3,ne2,ne1,ne0)={ref.shape}; "
            f"max |diff| = {diff[i] if diff.size else 0:.4g} at {i} (ref {a[i]:.6g}, ours {b[i]:.6g}); "
            f"ref[:4]={a.reshape(-1)[:4]}, ours[:4]={b.reshape(-1)[:4]}")
    return err
