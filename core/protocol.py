"""The ggml RPC wire format, protocol 7.0.0, as data.

Framing (all integers little-endian, all structs packed):

    request : | command (1 byte) | payload size (u64) | payload |
    reply   : | payload size (u64) | payload |            (only for commands that reply)

``COMMANDS`` lists, for every command, the payload layout of its request and
of its reply. A layout is a :class:`struct.Struct`, ``VARIABLE`` for payloads
whose size depends on the content, or ``None`` for "no reply at all": those
commands are fire-and-forget, and a failure closes the connection.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

import fnv_c
import numpy as np

from . import ggml

PROTOCOL_VERSION = (7, 0, 0)
CONN_CAPS_SIZE = 24  # HELLO carries transport capabilities; all zero means plain TCP


class Command(IntEnum):
    """enum rpc_cmd. The numbers are the first byte of every request."""

    ALLOC_BUFFER = 0
    GET_ALIGNMENT = 1
    GET_MAX_SIZE = 2
    BUFFER_GET_BASE = 3
    FREE_BUFFER = 4
    BUFFER_CLEAR = 5
    SET_TENSOR = 6
    SET_TENSOR_HASH = 7
    GET_TENSOR = 8
    COPY_TENSOR = 9
    GRAPH_COMPUTE = 10
    GET_DEVICE_MEMORY = 11
    INIT_TENSOR = 12
    GET_ALLOC_SIZE = 13
    HELLO = 14
    DEVICE_COUNT = 15
    GRAPH_RECOMPUTE = 16
    MEMSET_TENSOR = 17
    NONE = 18  # client-side bookkeeping only; never valid on the wire


COMMAND_COUNT = 19

#: struct rpc_tensor, 296 bytes, packed.
RPC_TENSOR = np.dtype([
    ("id", "<u8"),
    ("type", "<u4"),
    ("buffer", "<u8"),
    ("ne", "<u4", ggml.MAX_DIMS),
    ("nb", "<u4", ggml.MAX_DIMS),
    ("op", "<u4"),
    ("op_params", "<i4", ggml.MAX_OP_PARAMS // 4),
    ("flags", "<i4"),
    ("src", "<u8", ggml.MAX_SRC),
    ("view_src", "<u8"),
    ("view_offs", "<u8"),
    ("data", "<u8"),
    ("name", "S%d" % ggml.MAX_NAME),
    ("use_count", "<i4"),
])
RPC_TENSOR_SIZE = RPC_TENSOR.itemsize
assert RPC_TENSOR_SIZE == 296

FRAME_HEADER = struct.Struct("<BQ")  # command, payload size
SIZE = struct.Struct("<Q")  # reply size prefix

# The fixed header in front of SET_TENSOR's data: | rpc_tensor | cache_flag (u8) | offset (u64) |
SET_TENSOR_HEADER = struct.Struct(f"<{RPC_TENSOR_SIZE}sBQ")
# GRAPH_COMPUTE: | device (u32) | n_nodes (u32) | node ids (u64 * n_nodes) | n_tensors (u32) | rpc_tensor * n_tensors |
GRAPH_HEADER = struct.Struct("<II")
GRAPH_COUNT = struct.Struct("<I")


class _Variable:
    def __repr__(self) -> str:
        return "VARIABLE"


VARIABLE = _Variable()

_T = f"{RPC_TENSOR_SIZE}s"


@dataclass(frozen=True)
class CommandSpec:
    command: Command
    request: struct.Struct | _Variable
    reply: struct.Struct | _Variable | None  # None: the command sends no reply

    @property
    def replies(self) -> bool:
        return self.reply is not None


def _spec(cmd, request, reply):
    req = request if request is VARIABLE else struct.Struct("<" + request)
    rep = reply if reply is None or reply is VARIABLE else struct.Struct("<" + reply)
    return CommandSpec(cmd, req, rep)


#: Request and reply layouts of every wire command.
COMMANDS: dict[Command, CommandSpec] = {s.command: s for s in [
    _spec(Command.HELLO, f"{CONN_CAPS_SIZE}s", f"BBBx{CONN_CAPS_SIZE}s"),
    _spec(Command.DEVICE_COUNT, "", "I"),
    _spec(Command.ALLOC_BUFFER, "IQ", "QQ"),              # device, size -> remote_ptr, remote_size
    _spec(Command.GET_ALIGNMENT, "I", "Q"),
    _spec(Command.GET_MAX_SIZE, "I", "Q"),
    _spec(Command.BUFFER_GET_BASE, "Q", "Q"),             # remote_ptr -> base_ptr
    _spec(Command.FREE_BUFFER, "Q", None),
    _spec(Command.BUFFER_CLEAR, "QB", None),              # remote_ptr, value
    _spec(Command.SET_TENSOR, VARIABLE, None),
    _spec(Command.SET_TENSOR_HASH, _T + "QQ", "B"),       # tensor, offset, hash -> found
    _spec(Command.GET_TENSOR, _T + "QQ", VARIABLE),       # tensor, offset, size -> data
    _spec(Command.COPY_TENSOR, _T + _T, "B"),             # src, dst -> copied
    _spec(Command.GRAPH_COMPUTE, VARIABLE, None),
    _spec(Command.GET_DEVICE_MEMORY, "I", "QQ"),          # device -> free, total
    _spec(Command.INIT_TENSOR, _T, None),
    _spec(Command.GET_ALLOC_SIZE, "I" + _T * (1 + ggml.MAX_SRC), "Q"),  # device, tensor, srcs
    _spec(Command.GRAPH_RECOMPUTE, "I", None),            # device
    _spec(Command.MEMSET_TENSOR, _T + "QQB", None),       # tensor, offset, size, value
]}
assert len(COMMANDS) == 18


def _ints(values) -> tuple:
    return tuple(values.tolist() if hasattr(values, "tolist") else values)


@dataclass(frozen=True)
class RpcTensor:
    """A decoded rpc_tensor. ``id`` is the client's pointer, used only as a key."""

    id: int
    type: int
    buffer: int
    ne: tuple[int, int, int, int]
    nb: tuple[int, int, int, int]
    op: int
    op_params: tuple[int, ...]
    flags: int
    src: tuple[int, ...]
    view_src: int
    view_offs: int
    data: int
    name: str
    use_count: int

    @classmethod
    def from_record(cls, rec) -> "RpcTensor":
        """Build from one element of an ``RPC_TENSOR`` array converted with ``tolist()``."""
        (id_, type_, buffer, ne, nb, op, op_params, flags, src,
         view_src, view_offs, data, name, use_count) = rec
        # numpy keeps sub-array fields as arrays of numpy scalars; bounds arithmetic must
        # use Python integers (numpy uint32 would wrap around silently).
        return cls(id_, type_, buffer, _ints(ne), _ints(nb), op, _ints(op_params), flags,
                   _ints(src), view_src, view_offs, data,
                   name.split(b"\0", 1)[0].decode("utf-8", "replace"), use_count)

    @classmethod
    def unpack(cls, raw: bytes) -> "RpcTensor":
        return cls.from_record(np.frombuffer(raw, RPC_TENSOR, 1).tolist()[0])

    @classmethod
    def unpack_array(cls, raw, count: int, offset: int = 0) -> list["RpcTensor"]:
        return [cls.from_record(r) for r in np.frombuffer(raw, RPC_TENSOR, count, offset).tolist()]

    def pack(self) -> bytes:
        rec = np.zeros(1, RPC_TENSOR)
        rec[0] = (self.id, self.type, self.buffer, self.ne, self.nb, self.op, self.op_params,
                  self.flags, self.src, self.view_src, self.view_offs, self.data,
                  self.name.encode()[: ggml.MAX_NAME - 1], self.use_count)
        return rec.tobytes()

    @property
    def is_null(self) -> bool:
        return self.id == 0

    def describe(self) -> str:
        t = ggml.TYPES.get(self.type)
        tname = t.name if t else f"type {self.type}"
        name = f" {self.name!r}" if self.name else ""  # repr: a name cannot forge log lines
        return f"tensor{name} {tname} ne={list(self.ne)} nb={list(self.nb)}"


def make_tensor(*, id: int = 1, type: int = 0, buffer: int = 0, ne=(1, 1, 1, 1), nb=None,
                op: int = 0, op_params=(0,) * 16, flags: int = 0, src=(0,) * ggml.MAX_SRC,
                view_src: int = 0, view_offs: int = 0, data: int = 0, name: str = "",
                use_count: int = 0) -> RpcTensor:
    """Construct an RpcTensor with ggml's defaults (contiguous strides unless ``nb`` is given)."""
    ne = tuple(ne) + (1,) * (4 - len(ne))
    if nb is None:
        nb = ggml.contiguous_strides(ggml.type_info(type), ne)
    op_params = tuple(op_params) + (0,) * (16 - len(op_params))
    src = tuple(src) + (0,) * (ggml.MAX_SRC - len(src))
    return RpcTensor(id, type, buffer, ne, tuple(nb), op, op_params, flags, src,
                     view_src, view_offs, data, name, use_count)


NULL_TENSOR = RpcTensor(0, 0, 0, (0,) * 4, (0,) * 4, 0, (0,) * 16, 0, (0,) * ggml.MAX_SRC, 0, 0, 0, "", 0)


def pack_graph(device: int, nodes: list[int], tensors: list[RpcTensor]) -> bytes:
    """Serialize a graph the way ggml's RPC client does."""
    return b"".join([
        GRAPH_HEADER.pack(device, len(nodes)),
        struct.pack(f"<{len(nodes)}Q", *nodes),
        GRAPH_COUNT.pack(len(tensors)),
        *(t.pack() for t in tensors),
    ])


def fnv1a_64(data) -> int:
    """64-bit FNV-1a, the hash llama.cpp uses to name cached tensor data.

    FNV-1a is sequential by construction, so a Python loop would run at a few
    MB/s; fnv-c computes it in C (about 0.5 GB/s).
    """
    return fnv_c.fnv1a_64(data if isinstance(data, bytes) else bytes(data))
