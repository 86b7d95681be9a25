"""Hostile and malformed input: every case closes the offending connection with a clear log line.

Each test runs a well-behaved ``bystander`` client connected to the same server
at the same time. After the hostile client is dealt with, the bystander's own
buffer must be intact, a full alloc/set/get/free round trip must work on it,
and the server must hold exactly the bystander's one buffer (nothing leaked).

A "clear log line" is one line about the offending peer that names the
command being handled and the offending value (see ``conftest.expect_closed``).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import socket
import struct
import time

import psutil
import pytest

from conftest import assert_closed_by_server, expect_closed, wait_until
from rpcserver import ggml
from rpcserver.ggml import GGMLType, Op
from rpcserver.protocol import (
    COMMANDS, FRAME_HEADER, NULL_TENSOR, SET_TENSOR_HEADER, Command, RpcTensor,
    make_tensor, pack_graph,
)

F32, Q4_0, I8 = GGMLType.F32, GGMLType.Q4_0, GGMLType.I8
U64_MAX = 2**64 - 1
U32_MAX = 2**32 - 1
MiB = 1 << 20

FIXED = {cmd: spec.request.size for cmd, spec in COMMANDS.items()
         if cmd != Command.HELLO and hasattr(spec.request, "size")}


def req(cmd: Command, *values) -> bytes:
    return COMMANDS[cmd].request.pack(*values)


def new_buffer(client, size: int) -> tuple[int, int]:
    handle, got = client.alloc_buffer(0, size)
    assert handle != 0 and got == size
    return handle, client.buffer_get_base(handle)


def alloc_size_req(device: int, tensor: RpcTensor) -> bytes:
    return req(Command.GET_ALLOC_SIZE, device, tensor.pack(), *[NULL_TENSOR.pack()] * ggml.MAX_SRC)


def rss() -> int:
    return psutil.Process().memory_info().rss


# ============================================================== handshake and framing


@pytest.mark.parametrize("cmd, payload", [
    (Command.DEVICE_COUNT, b""),
    (Command.ALLOC_BUFFER, struct.pack("<IQ", 0, 64)),
    (Command.GRAPH_COMPUTE, pack_graph(0, [], [])),
    (18, b""),
    (200, b"xyz"),
], ids=["DEVICE_COUNT", "ALLOC_BUFFER", "GRAPH_COMPUTE", "cmd18", "cmd200"])
def test_first_command_must_be_hello(server, connect, bystander, caplog, cmd, payload):
    c = connect(hello=False)
    c.send_frame(cmd, payload)
    expect_closed(c, caplog, "HELLO", "7.0.0", f"got {int(cmd)}")
    bystander.check()


@pytest.mark.parametrize("size", [0, 23, 25, 2**63])
def test_hello_with_wrong_size(server, connect, bystander, caplog, size):
    c = connect(hello=False)
    c.send_frame(Command.HELLO, bytes(min(size, 25)), declared_size=size)
    expect_closed(c, caplog, "HELLO", str(size), "7.0.0")
    bystander.check()


def test_second_hello_mid_session(server, connect, bystander, caplog):
    c = connect()
    new_buffer(c, 64)
    c.send_frame(Command.HELLO, bytes(24))
    expect_closed(c, caplog, "HELLO")
    bystander.check()


@pytest.mark.parametrize("cmd", [18, 19, 100, 200, 255])
def test_unknown_command(server, connect, bystander, caplog, cmd):
    c = connect()
    c.send_frame(cmd, b"\0" * 8)
    expect_closed(c, caplog, f"unknown command {cmd}")
    bystander.check()


WRONG_SIZES = [(cmd, declared) for cmd, size in FIXED.items()
               for declared in ([size - 1] if size else []) + [size + 1]]


@pytest.mark.parametrize("cmd, declared", WRONG_SIZES,
                         ids=[f"{c.name}-{d}" for c, d in WRONG_SIZES])
def test_fixed_command_with_wrong_declared_size(server, connect, bystander, caplog, cmd, declared):
    c = connect()
    new_buffer(c, 64)
    c.send_frame(cmd, bytes(declared))
    expect_closed(c, caplog, cmd.name, str(declared), str(FIXED[cmd]))
    bystander.check()


def test_header_cut_in_the_middle(server, connect, bystander, caplog):
    c = connect()
    new_buffer(c, 64)
    c.sock.sendall(FRAME_HEADER.pack(Command.ALLOC_BUFFER, 12)[:4])
    c.sock.shutdown(socket.SHUT_WR)
    # The client left in the middle of a frame header: the log should say so (the
    # server knows 4 of the 9 header bytes arrived), not report a clean disconnect.
    expect_closed(c, caplog, level=logging.INFO, any_of=("mid-message", "truncated", "partial", "of 9"))
    bystander.check()


@pytest.mark.parametrize("cmd, declared, sent", [
    (Command.HELLO, 24, 10),
    (Command.ALLOC_BUFFER, 12, 5),
    (Command.GET_TENSOR, 312, 311),
    (Command.SET_TENSOR, SET_TENSOR_HEADER.size + 100, 200),
    (Command.GRAPH_COMPUTE, 1000, 10),
], ids=["HELLO", "ALLOC_BUFFER", "GET_TENSOR", "SET_TENSOR", "GRAPH_COMPUTE"])
def test_payload_shorter_than_declared_then_client_closes(server, connect, bystander, caplog,
                                                          cmd, declared, sent):
    c = connect(hello=(cmd != Command.HELLO))
    if cmd != Command.HELLO:
        new_buffer(c, 64)
    c.send_frame(cmd, bytes(sent), declared_size=declared)
    c.sock.shutdown(socket.SHUT_WR)
    expect_closed(c, caplog, level=logging.INFO, any_of=("mid-message", "truncated", "partial"))
    bystander.check()


# ============================================================== huge declared sizes


def _huge_frames(handle: int, base: int, declared: int):
    t = make_tensor(id=1, type=F32, buffer=handle, ne=(1024,), data=base)
    return {
        "SET_TENSOR": (Command.SET_TENSOR, SET_TENSOR_HEADER.pack(t.pack(), 0, 0),
                       ("SET_TENSOR", str(declared - SET_TENSOR_HEADER.size))),
        "GRAPH_COMPUTE": (Command.GRAPH_COMPUTE, b"", ("GRAPH_COMPUTE", str(declared))),
        "ALLOC_BUFFER": (Command.ALLOC_BUFFER, b"", ("ALLOC_BUFFER", str(declared))),
        "GET_TENSOR": (Command.GET_TENSOR, b"", ("GET_TENSOR", str(declared))),
        "MEMSET_TENSOR": (Command.MEMSET_TENSOR, b"", ("MEMSET_TENSOR", str(declared))),
    }


@pytest.mark.parametrize("declared", [2**63, U64_MAX], ids=["2^63", "2^64-1"])
@pytest.mark.parametrize("which", ["SET_TENSOR", "GRAPH_COMPUTE", "ALLOC_BUFFER", "GET_TENSOR",
                                   "MEMSET_TENSOR"])
def test_huge_declared_size_is_rejected_without_allocating(server, connect, bystander, caplog,
                                                           which, declared):
    c = connect()
    handle, base = new_buffer(c, 4096)
    cmd, payload, needles = _huge_frames(handle, base, declared)[which]
    before = rss()
    t0 = time.monotonic()
    c.send_frame(cmd, payload, declared_size=declared)
    expect_closed(c, caplog, *needles, timeout=2.0)
    elapsed = time.monotonic() - t0
    grown = rss() - before
    assert elapsed < 2.0, f"took {elapsed:.2f}s to reject"
    assert grown < 64 * MiB, f"server process RSS grew by {grown / MiB:.0f} MiB"
    bystander.check()


def test_graph_compute_over_the_limit_is_rejected(server, connect, bystander, caplog):
    c = connect()
    declared = server.max_graph_bytes + 1
    c.send_frame(Command.GRAPH_COMPUTE, b"", declared_size=declared)
    expect_closed(c, caplog, "GRAPH_COMPUTE", str(declared), str(server.max_graph_bytes))
    bystander.check()


def test_graph_compute_large_claim_allocates_only_what_arrives(server, connect, bystander, caplog):
    c = connect()
    declared = 512 * MiB  # under the server's limit: accepted as a claim
    before = rss()
    c.send_frame(Command.GRAPH_COMPUTE, bytes(1024), declared_size=declared)
    c.sock.shutdown(socket.SHUT_WR)
    expect_closed(c, caplog, level=logging.INFO, any_of=("mid-message", "truncated", "partial"))
    grown = rss() - before
    assert grown < 64 * MiB, f"server process RSS grew by {grown / MiB:.0f} MiB"
    bystander.check()


# ============================================================== devices and buffer handles


def _device_frames(dev: int):
    t = make_tensor(id=1, type=F32, ne=(4,))
    return {
        Command.ALLOC_BUFFER: req(Command.ALLOC_BUFFER, dev, 64),
        Command.GET_ALIGNMENT: req(Command.GET_ALIGNMENT, dev),
        Command.GET_MAX_SIZE: req(Command.GET_MAX_SIZE, dev),
        Command.GET_DEVICE_MEMORY: req(Command.GET_DEVICE_MEMORY, dev),
        Command.GET_ALLOC_SIZE: alloc_size_req(dev, t),
        Command.GRAPH_COMPUTE: pack_graph(dev, [], []),
        Command.GRAPH_RECOMPUTE: req(Command.GRAPH_RECOMPUTE, dev),
    }


DEVICE_CMDS = [Command.ALLOC_BUFFER, Command.GET_ALIGNMENT, Command.GET_MAX_SIZE,
               Command.GET_DEVICE_MEMORY, Command.GET_ALLOC_SIZE, Command.GRAPH_COMPUTE,
               Command.GRAPH_RECOMPUTE]


@pytest.mark.parametrize("dev", [1, U32_MAX])
@pytest.mark.parametrize("cmd", DEVICE_CMDS, ids=[c.name for c in DEVICE_CMDS])
def test_out_of_range_device(server, connect, bystander, caplog, cmd, dev):
    c = connect()
    new_buffer(c, 64)
    if cmd == Command.GRAPH_RECOMPUTE:  # have a stored graph on device 0, ask for another one
        c.graph_compute(0, [], [])
    c.send_frame(cmd, _device_frames(dev)[cmd])
    expect_closed(c, caplog, cmd.name, f"device {dev}")
    bystander.check()


def _bad_handle(c, bystander, kind: str) -> int:
    if kind == "never-allocated":
        return 0xDEADBEEF
    if kind == "null":
        return 0
    if kind == "freed":
        handle, _ = new_buffer(c, 64)
        c.free_buffer(handle)
        return handle
    if kind == "other-session":
        return bystander.handle
    raise AssertionError(kind)


HANDLE_KINDS = ["never-allocated", "null", "freed", "other-session"]
HANDLE_CMDS = [Command.BUFFER_GET_BASE, Command.FREE_BUFFER, Command.BUFFER_CLEAR]


@pytest.mark.parametrize("kind", HANDLE_KINDS)
@pytest.mark.parametrize("cmd", HANDLE_CMDS, ids=[c.name for c in HANDLE_CMDS])
def test_unknown_buffer_handle(server, connect, bystander, caplog, cmd, kind):
    c = connect()
    new_buffer(c, 64)
    handle = _bad_handle(c, bystander, kind)
    payload = req(cmd, handle, 0x5A) if cmd == Command.BUFFER_CLEAR else req(cmd, handle)
    c.send_frame(cmd, payload)
    expect_closed(c, caplog, cmd.name, f"0x{handle:x}")
    bystander.check()  # in particular: the other session's buffer was neither freed nor cleared


# ============================================================== bad tensors, every command


class Ctx:
    """The hostile client's own 4096-byte buffer, plus what a bad tensor may refer to."""

    def __init__(self, c, bystander):
        self.c = c
        self.bystander = bystander
        self.handle, self.base = new_buffer(c, 4096)


def _f32(ctx, **kw):
    args = dict(id=0x51, type=F32, buffer=ctx.handle, ne=(4,), data=ctx.base)
    args.update(kw)
    return make_tensor(**args)


def _freed_buffer_tensor(ctx):
    handle, base = new_buffer(ctx.c, 64)
    ctx.c.free_buffer(handle)
    return _f32(ctx, buffer=handle, data=base), (f"0x{handle:x}",)


def _bad_type(t):
    def build(ctx):
        return _f32(ctx, type=t, nb=(4, 16, 16, 16)), (f"type {t}",)
    return build


# kind -> ctx -> (tensor, needles[, any_of])
BAD_TENSORS = {
    "data-before-base": lambda ctx: (_f32(ctx, data=ctx.base - 4), (f"0x{ctx.base - 4:x}",)),
    "data-past-end": lambda ctx: (_f32(ctx, data=ctx.base + 4096 - 8), (f"0x{ctx.base + 4088:x}",)),
    "data-far-past-end": lambda ctx: (_f32(ctx, data=ctx.base + 2**40), (f"0x{ctx.base + 2**40:x}",)),
    "data-plus-nbytes-overflows-2^64": lambda ctx: (_f32(ctx, data=U64_MAX - 7),
                                                   (f"0x{U64_MAX - 7:x}",)),
    "data-in-other-sessions-buffer": lambda ctx: (_f32(ctx, data=ctx.bystander.base),
                                                  (f"0x{ctx.bystander.base:x}",)),
    "huge-nb3": lambda ctx: (_f32(ctx, ne=(4, 1, 1, 2), nb=(4, 16, 16, U32_MAX)), (str(U32_MAX),)),
    "type-4": _bad_type(4),
    "type-31": _bad_type(31),
    "type-43": _bad_type(43),
    "type-255": _bad_type(255),
    "q4_0-ne0-33": lambda ctx: (_f32(ctx, type=Q4_0, ne=(33,), nb=(18, 18, 18, 18)), ("Q4_0", "33")),
    "buffer-never-allocated": lambda ctx: (_f32(ctx, buffer=0xDEADBEEF), ("0xdeadbeef",)),
    "buffer-freed": _freed_buffer_tensor,
    "buffer-of-other-session": lambda ctx: (
        _f32(ctx, buffer=ctx.bystander.handle, data=ctx.bystander.base),
        (f"0x{ctx.bystander.handle:x}",)),
    "data-without-buffer": lambda ctx: (_f32(ctx, buffer=0), ("buffer",),
                                        ("buffer=0", "without a buffer", "no buffer")),
    "no-buffer": lambda ctx: (_f32(ctx, buffer=0, data=0), ("buffer",),
                              ("buffer=0", "without a buffer", "no buffer")),
}

TYPE_KINDS = {"type-4", "type-31", "type-43", "type-255", "q4_0-ne0-33"}


def _tensor_frame(ctx, cmd_id: str, t: RpcTensor) -> tuple[Command, bytes]:
    ok = _f32(ctx, id=0x52, data=ctx.base + 1024)  # a valid 16-byte tensor
    if cmd_id == "GET_TENSOR":
        return Command.GET_TENSOR, req(Command.GET_TENSOR, t.pack(), 0, 4)
    if cmd_id == "SET_TENSOR":
        return Command.SET_TENSOR, SET_TENSOR_HEADER.pack(t.pack(), 0, 0) + b"\x01\x02\x03\x04"
    if cmd_id == "MEMSET_TENSOR":
        return Command.MEMSET_TENSOR, req(Command.MEMSET_TENSOR, t.pack(), 0, 4, 0x77)
    if cmd_id == "SET_TENSOR_HASH":
        return Command.SET_TENSOR_HASH, req(Command.SET_TENSOR_HASH, t.pack(), 0, 0x1234)
    if cmd_id == "COPY_TENSOR-src":
        return Command.COPY_TENSOR, req(Command.COPY_TENSOR, t.pack(), ok.pack())
    if cmd_id == "COPY_TENSOR-dst":
        small = _f32(ctx, id=0x53, ne=(1,), data=ctx.base + 2048)
        return Command.COPY_TENSOR, req(Command.COPY_TENSOR, small.pack(), t.pack())
    if cmd_id == "INIT_TENSOR":
        return Command.INIT_TENSOR, req(Command.INIT_TENSOR, t.pack())
    if cmd_id == "GRAPH_COMPUTE":
        return Command.GRAPH_COMPUTE, pack_graph(0, [t.id], [t])
    if cmd_id == "GET_ALLOC_SIZE":
        return Command.GET_ALLOC_SIZE, alloc_size_req(0, t)
    raise AssertionError(cmd_id)


TENSOR_CMDS = ["GET_TENSOR", "SET_TENSOR", "MEMSET_TENSOR", "SET_TENSOR_HASH", "COPY_TENSOR-src",
               "COPY_TENSOR-dst", "INIT_TENSOR", "GRAPH_COMPUTE", "GET_ALLOC_SIZE"]
BAD_TENSOR_CASES = [
    (cmd_id, kind) for cmd_id in TENSOR_CMDS for kind in BAD_TENSORS
    # GET_ALLOC_SIZE only sizes a tensor: only its type and shape can be wrong.
    if (cmd_id != "GET_ALLOC_SIZE" or kind in TYPE_KINDS)
    # INIT_TENSOR of a tensor without any buffer is ignored, as in the reference.
    and not (cmd_id == "INIT_TENSOR" and kind == "no-buffer")
]


@pytest.mark.parametrize("cmd_id, kind", BAD_TENSOR_CASES,
                         ids=[f"{c}-{k}" for c, k in BAD_TENSOR_CASES])
def test_bad_tensor(server, connect, bystander, caplog, cmd_id, kind):
    c = connect()
    ctx = Ctx(c, bystander)
    built = BAD_TENSORS[kind](ctx)
    t, needles = built[0], built[1]
    any_of = built[2] if len(built) > 2 else ()
    cmd, payload = _tensor_frame(ctx, cmd_id, t)
    c.send_frame(cmd, payload)
    expect_closed(c, caplog, cmd.name, *needles, any_of=any_of)
    bystander.check()


def test_tensor_names_cannot_forge_log_lines(server, connect, bystander, caplog):
    """A tensor name is client data: control characters in it must not reach the log raw
    (a newline would let a client append a forged line to the server's log)."""
    c = connect()
    handle, base = new_buffer(c, 4096)
    forged = "x\nERROR rpcserver.session: 10.0.0.1:1: forged line\x1b[2J\r"
    t = make_tensor(id=1, type=F32, buffer=handle, ne=(4,), data=base + 8192, name=forged)
    c.send_frame(Command.GET_TENSOR, req(Command.GET_TENSOR, t.pack(), 0, 4))
    expect_closed(c, caplog, f"0x{base + 8192:x}")
    for r in caplog.get_records("call"):
        msg = r.getMessage()
        if c.peer in msg:
            bad = sorted({ch for ch in msg if ord(ch) < 32 or ord(ch) == 127})
            assert not bad, f"raw control characters {bad!r} in log line {msg!r}"
    bystander.check()


def test_init_tensor_without_buffer_is_ignored(server, connect, bystander):
    c = connect()
    c.init_tensor(make_tensor(id=1, type=F32, ne=(4,)))
    assert c.device_count() == 1
    c.close()
    bystander.check()


# ============================================================== regions, copies


REGION_CASES = [
    # (id, command, offset, size) against a 64-byte tensor at buffer offset 64 of a 4096-byte buffer
    ("GET-offset-max-size-2", Command.GET_TENSOR, U64_MAX, 2),
    ("GET-offset-1-size-max", Command.GET_TENSOR, 1, U64_MAX),
    ("GET-one-past-the-tensor", Command.GET_TENSOR, 0, 65),
    ("GET-at-the-end", Command.GET_TENSOR, 64, 1),
    ("GET-far-offset", Command.GET_TENSOR, 1 << 40, 4),
    ("MEMSET-offset-max-size-2", Command.MEMSET_TENSOR, U64_MAX, 2),
    ("MEMSET-one-past-the-tensor", Command.MEMSET_TENSOR, 60, 5),
    ("MEMSET-size-max", Command.MEMSET_TENSOR, 0, U64_MAX),
    ("SET-offset-max-size-2", Command.SET_TENSOR, U64_MAX, 2),
    ("SET-payload-larger-than-tensor", Command.SET_TENSOR, 0, 65),
    ("SET-offset-1-full-payload", Command.SET_TENSOR, 1, 64),
    ("SET-payload-far-larger", Command.SET_TENSOR, 0, 4096),
]


@pytest.mark.parametrize("cmd, offset, size", [c[1:] for c in REGION_CASES],
                         ids=[c[0] for c in REGION_CASES])
def test_region_outside_the_tensor(server, connect, bystander, caplog, cmd, offset, size):
    c = connect()
    handle, base = new_buffer(c, 4096)
    t = make_tensor(id=7, type=F32, buffer=handle, ne=(16,), data=base + 64)
    if cmd == Command.GET_TENSOR:
        c.send_frame(cmd, req(cmd, t.pack(), offset, size))
    elif cmd == Command.MEMSET_TENSOR:
        c.send_frame(cmd, req(cmd, t.pack(), offset, size, 0xEE))
    else:
        c.send_frame(cmd, SET_TENSOR_HEADER.pack(t.pack(), 0, offset) + bytes(size))
    data = assert_closed_by_server(c)
    if cmd == Command.GET_TENSOR:
        assert data == b"", "GET_TENSOR beyond the tensor must not answer any data"
    expect_closed(c, caplog, cmd.name, str(offset), str(size))
    bystander.check()


@pytest.mark.parametrize("where", ["other-buffer", "same-buffer"])
def test_copy_tensor_destination_overrun(server, connect, bystander, caplog, where):
    c = connect()
    h1, b1 = new_buffer(c, 4096)
    src = make_tensor(id=1, type=F32, buffer=h1, ne=(256,), data=b1)  # 1024 bytes
    if where == "other-buffer":
        h2, b2 = new_buffer(c, 1024)
        dst = make_tensor(id=2, type=F32, buffer=h2, ne=(4,), data=b2 + 1024 - 16)
    else:
        dst = make_tensor(id=2, type=F32, buffer=h1, ne=(4,), data=b1 + 4096 - 16)
    c.send_frame(Command.COPY_TENSOR, req(Command.COPY_TENSOR, src.pack(), dst.pack()))
    expect_closed(c, caplog, "COPY_TENSOR", f"0x{dst.data:x}")
    bystander.check()


# ============================================================== GRAPH_COMPUTE


def _graph_case(ctx, name: str):
    """(payload, needles) for a malformed graph; every tensor is otherwise valid."""
    h, b = ctx.handle, ctx.base
    a = make_tensor(id=0x10, type=F32, buffer=h, ne=(4, 4), data=b)  # 64 bytes
    valid = pack_graph(0, [0x10], [a])
    if name == "empty-payload":
        return b"", ("0 bytes",)
    if name == "shorter-than-header":
        return bytes(7), ("7 bytes",)
    if name == "n_nodes-more-than-present":
        return struct.pack("<IIQI", 0, 1000, 0x10, 0), ("1000",)
    if name == "n_nodes-2^32-1":
        return struct.pack("<II", 0, U32_MAX) + bytes(16), (str(U32_MAX),)
    if name == "n_tensors-more-than-present":
        return valid[:16] + struct.pack("<I", 5) + valid[20:], ("5 tensors",)
    if name == "trailing-bytes":
        return valid + b"\0", (str(len(valid) + 1),)
    if name == "node-not-in-list":
        return pack_graph(0, [0x10, 0x999], [a]), ("0x999",)
    if name == "src-not-in-list":
        n = make_tensor(id=0x11, type=F32, buffer=h, ne=(4, 4), data=b + 64, op=Op.NONE,
                        src=(0x10, 0x998))
        return pack_graph(0, [0x11], [a, n]), ("0x998",)
    if name == "view_src-not-in-list":
        n = make_tensor(id=0x11, type=F32, buffer=h, ne=(4, 4), data=b, op=Op.VIEW,
                        src=(0x10,), view_src=0x997)
        return pack_graph(0, [0x11], [a, n]), ("0x997",)
    if name == "duplicate-tensor-ids":
        a2 = make_tensor(id=0x10, type=F32, buffer=h, ne=(4,), data=b + 128)
        return pack_graph(0, [0x10], [a, a2]), ("0x10",)
    if name == "tensor-id-0":
        z = make_tensor(id=0, type=F32, buffer=h, ne=(4,), data=b + 128)
        return pack_graph(0, [0x10], [a, z]), ("id 0",)
    if name.startswith("op-"):
        op = int(name[3:]) if name[3:].isdigit() else Op[name[3:]]
        n = make_tensor(id=0x11, type=F32, buffer=h, ne=(4, 4), data=b + 64, op=op, src=(0x10,))
        return pack_graph(0, [0x11], [a, n]), ((Op(op).name,) if op < ggml.OP_COUNT else (str(op),))
    if name == "view-data-mismatch":
        v = make_tensor(id=0x11, type=F32, buffer=h, ne=(4,), data=b + 8, op=Op.VIEW,
                        src=(0x10,), view_src=0x10, view_offs=4)
        return pack_graph(0, [0x11], [a, v]), (f"0x{b + 8:x}",)
    if name == "view-in-another-buffer":
        h2, b2 = new_buffer(ctx.c, 64)
        v = make_tensor(id=0x11, type=F32, buffer=h2, ne=(4,), data=b2, op=Op.VIEW,
                        src=(0x10,), view_src=0x10, view_offs=b2 - b)
        return pack_graph(0, [0x11], [a, v]), ("view_src",)
    if name == "tensor-in-other-sessions-buffer":
        by = ctx.bystander
        f = make_tensor(id=0x12, type=F32, buffer=by.handle, ne=(4,), data=by.base)
        n = make_tensor(id=0x11, type=F32, buffer=h, ne=(4,), data=b + 64, op=Op.NONE,
                        src=(0x10, 0x12))
        return pack_graph(0, [0x11], [a, f, n]), (f"0x{by.handle:x}",)
    if name == "data-but-buffer-0":
        d = make_tensor(id=0x12, type=F32, buffer=0, ne=(4,), data=b + 64)
        return pack_graph(0, [0x12], [a, d]), (f"0x{b + 64:x}",)
    raise AssertionError(name)


FUNCTION_POINTER_OPS = ["MAP_CUSTOM1", "MAP_CUSTOM2", "MAP_CUSTOM3", "CUSTOM"]
GRAPH_CASES = [
    "empty-payload", "shorter-than-header", "n_nodes-more-than-present", "n_nodes-2^32-1",
    "n_tensors-more-than-present", "trailing-bytes", "node-not-in-list", "src-not-in-list",
    "view_src-not-in-list", "duplicate-tensor-ids", "tensor-id-0", "op-101", "op-255",
    f"op-{U32_MAX}", *[f"op-{name}" for name in FUNCTION_POINTER_OPS], "view-data-mismatch",
    "view-in-another-buffer", "tensor-in-other-sessions-buffer", "data-but-buffer-0",
]


def test_function_pointer_ops_are_92_to_95():
    # ggml.h (ggml 0.25.3): ..., GGML_OP_UNARY (91), MAP_CUSTOM1..3 (92-94), CUSTOM (95), ...
    assert [int(Op[n]) for n in FUNCTION_POINTER_OPS] == [92, 93, 94, 95]
    assert ggml.FUNCTION_POINTER_OPS == {Op[n] for n in FUNCTION_POINTER_OPS}


@pytest.mark.parametrize("case", GRAPH_CASES)
def test_malformed_graph(server, connect, bystander, caplog, case):
    c = connect()
    ctx = Ctx(c, bystander)
    payload, needles = _graph_case(ctx, case)
    c.send_frame(Command.GRAPH_COMPUTE, payload)
    expect_closed(c, caplog, "GRAPH_COMPUTE", *needles)
    assert server.stats.graphs == 0
    bystander.check()


def test_graph_node_error_names_the_node_not_a_phantom_tensor(server, connect, bystander, caplog):
    """The line for an unknown node id must not describe a made-up all-zero tensor."""
    c = connect()
    ctx = Ctx(c, bystander)
    payload, _ = _graph_case(ctx, "node-not-in-list")
    c.send_frame(Command.GRAPH_COMPUTE, payload)
    line = expect_closed(c, caplog, "0x999")
    assert "ne=[0, 0, 0, 0]" not in line, f"confusing log line: {line!r}"
    bystander.check()


def test_graph_recompute_without_a_stored_graph(server, connect, bystander, caplog):
    c = connect()
    new_buffer(c, 64)
    c.send_frame(Command.GRAPH_RECOMPUTE, req(Command.GRAPH_RECOMPUTE, 0))
    expect_closed(c, caplog, "GRAPH_RECOMPUTE", "device 0")
    bystander.check()


def test_graph_recompute_after_freeing_a_buffer_the_graph_used(server, connect, bystander, caplog):
    c = connect()
    h, b = new_buffer(c, 64)
    a = make_tensor(id=0x10, type=F32, buffer=h, ne=(16,), data=b)
    v = make_tensor(id=0x11, type=F32, buffer=h, ne=(4, 4), data=b, op=Op.RESHAPE,
                    src=(0x10,), view_src=0x10)
    c.graph_compute(0, [0x11], [a, v])
    c.graph_recompute(0)
    c.sync()
    assert server.stats.graphs == 2
    c.free_buffer(h)
    c.send_frame(Command.GRAPH_RECOMPUTE, req(Command.GRAPH_RECOMPUTE, 0))
    expect_closed(c, caplog, "GRAPH_RECOMPUTE", "device 0")
    assert server.stats.graphs == 2
    bystander.check()


# ============================================================== disconnects


def test_client_disconnects_mid_set_tensor(server, connect, bystander, caplog):
    c = connect()
    h, b = new_buffer(c, 1 * MiB)
    new_buffer(c, 4096)
    assert server.stats.buffers_open == 3
    t = make_tensor(id=1, type=I8, buffer=h, ne=(MiB,), data=b)
    header = SET_TENSOR_HEADER.pack(t.pack(), 0, 0)
    c.sock.sendall(FRAME_HEADER.pack(Command.SET_TENSOR, len(header) + MiB) + header)
    c.sock.sendall(bytes(MiB // 2))
    peer = c.peer
    c.close()
    assert wait_until(lambda: server.stats.buffers_open == 1), server.stats.buffers_open
    found = wait_until(lambda: any(peer in r.getMessage() and "mid-message" in r.getMessage()
                                   for r in caplog.get_records("call")))
    assert found, "the server should log that the client went away in the middle of SET_TENSOR"
    bystander.check()
    fresh = connect()
    assert fresh.device_count() == 1
    new_buffer(fresh, 64)


# ============================================================== bounded fuzz


def _fuzz_tensor(rng: random.Random, handle: int, base: int) -> RpcTensor:
    """A valid tensor in the session's 4096-byte buffer (when it has one), then 0-2 hostile
    mutations: so that frames get past the first checks and reach the deeper ones."""
    type_ = rng.choice([F32, F32, GGMLType.F16, I8, Q4_0])
    if type_ == Q4_0:
        ne = (32 * rng.choice([1, 2]), rng.choice([1, 2]), 1, 1)
    else:
        ne = (rng.choice([1, 2, 4, 8, 16]), rng.choice([1, 2, 4]), rng.choice([1, 2]), 1)
    ids = [1, 2, 3]
    t = make_tensor(
        id=rng.choice(ids), type=type_, buffer=handle, ne=ne,
        data=base + 32 * rng.randrange(64) if handle else 0,
        op=rng.choice([*map(int, ggml.VIEW_OPS), rng.randrange(ggml.OP_COUNT)]),
        op_params=[rng.choice([0, 1, 2, 3, rng.getrandbits(31)]) for _ in range(16)],
        src=[rng.choice([0, 0, *ids]) for _ in range(rng.randrange(4))],
        name=rng.choice(["fuzz", "w\nx"]))
    mutations = {
        "type": lambda: dict(type=rng.choice([3, 4, 31, 43, 255, rng.getrandbits(32)])),
        "ne": lambda: dict(ne=tuple(rng.choice([n, 0, 33, U32_MAX, rng.getrandbits(32)])
                                    for n in t.ne)),
        "nb": lambda: dict(nb=tuple(rng.choice([n, 0, 1, U32_MAX, rng.getrandbits(32)])
                                    for n in t.nb)),
        "data": lambda: dict(data=rng.choice([0, max(base - 1, 0), base + 4096, base + 4095,
                                              U64_MAX, rng.getrandbits(64)])),
        "buffer": lambda: dict(buffer=rng.choice([0, handle + 1, U64_MAX, rng.getrandbits(64)])),
        "op": lambda: dict(op=rng.choice([ggml.OP_COUNT, 255, U32_MAX, *map(int, ggml.FUNCTION_POINTER_OPS)])),
        "src": lambda: dict(src=tuple(rng.choice([0, 1, 2, 3, 4, rng.getrandbits(64)])
                                      for _ in range(ggml.MAX_SRC))),
        "view": lambda: dict(view_src=rng.choice(ids + [9]), view_offs=rng.choice([0, 4, 64, U64_MAX])),
        "id": lambda: dict(id=rng.choice([0, 4, rng.getrandbits(64)])),
    }
    for _ in range(rng.choice([0, 1, 1, 2])):
        t = dataclasses.replace(t, **mutations[rng.choice(sorted(mutations))]())
    return t


def _fuzz_frame(rng: random.Random, handle: int, base: int) -> bytes:
    cmd = rng.randrange(21)
    style = rng.random()
    if style < 0.4:  # random payload of a random length, honestly declared
        payload = rng.randbytes(rng.randrange(4097))
        declared = len(payload)
    elif style < 0.55:  # random payload, dishonest size
        payload = rng.randbytes(rng.randrange(4097))
        declared = rng.choice([0, max(0, len(payload) - 1), len(payload) + 1,
                               rng.randrange(4097), rng.getrandbits(64)])
    else:  # structurally plausible payloads with hostile field values
        t = lambda: _fuzz_tensor(rng, handle, base).pack()  # noqa: E731
        dev = rng.choice([0, 0, 0, 1, U32_MAX])
        u64 = lambda: rng.choice([0, 1, 4, 63, 64, 4095, 4096, U64_MAX, rng.getrandbits(64)])  # noqa
        if cmd == Command.GRAPH_COMPUTE:
            tensors = [_fuzz_tensor(rng, handle, base) for _ in range(rng.randrange(4))]
            nodes = [rng.choice([0, 1, 2, 3, rng.getrandbits(64)]) for _ in range(rng.randrange(4))]
            payload = pack_graph(dev, nodes, tensors)
        elif cmd == Command.SET_TENSOR:
            payload = SET_TENSOR_HEADER.pack(t(), rng.randrange(2), u64()) + rng.randbytes(
                rng.randrange(256))
        elif cmd in COMMANDS and hasattr(COMMANDS[cmd].request, "size"):
            fields = {
                Command.HELLO: lambda: (bytes(24),),
                Command.DEVICE_COUNT: lambda: (),
                Command.ALLOC_BUFFER: lambda: (dev, rng.choice([0, 1, 4096, MiB, 2**62, U64_MAX])),
                Command.GET_ALIGNMENT: lambda: (dev,),
                Command.GET_MAX_SIZE: lambda: (dev,),
                Command.BUFFER_GET_BASE: lambda: (rng.choice([handle, 0, handle + 1, U64_MAX]),),
                Command.FREE_BUFFER: lambda: (rng.choice([handle, 0, handle + 1, U64_MAX]),),
                Command.BUFFER_CLEAR: lambda: (rng.choice([handle, 0, handle + 1]), rng.randrange(256)),
                Command.SET_TENSOR_HASH: lambda: (t(), u64(), u64()),
                Command.GET_TENSOR: lambda: (t(), u64(), rng.choice([0, 1, 4, 64, 4096, U64_MAX])),
                Command.COPY_TENSOR: lambda: (t(), t()),
                Command.GET_DEVICE_MEMORY: lambda: (dev,),
                Command.INIT_TENSOR: lambda: (t(),),
                Command.GET_ALLOC_SIZE: lambda: (dev, t(), *[t() if rng.random() < 0.2 else
                                                            NULL_TENSOR.pack() for _ in range(10)]),
                Command.GRAPH_RECOMPUTE: lambda: (dev,),
                Command.MEMSET_TENSOR: lambda: (t(), u64(), u64(), rng.randrange(256)),
            }[Command(cmd)]
            payload = COMMANDS[Command(cmd)].request.pack(*fields())
            if rng.random() < 0.3:  # flip a few bytes
                raw = bytearray(payload)
                for _ in range(rng.randrange(1, 4)):
                    if raw:
                        raw[rng.randrange(len(raw))] = rng.randrange(256)
                payload = bytes(raw)
        else:
            payload = rng.randbytes(rng.randrange(64))
        declared = len(payload)
    return FRAME_HEADER.pack(cmd, declared) + payload


def test_bounded_fuzz(server, connect, bystander, caplog):
    rng = random.Random(20250607)
    before = rss()
    for i in range(300):
        c = connect(timeout=5)
        handle = base = 0
        if rng.random() < 0.6:  # give the frame a real buffer of this session to aim at
            handle, base = new_buffer(c, 4096)
        frame = _fuzz_frame(rng, handle, base)
        try:
            c.sock.sendall(frame)
            c.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may already have closed on an early part of the frame
        assert_closed_by_server(c, timeout=5)  # answered or rejected, then closed at EOF
        c.close()
        assert server._accept_thread.is_alive(), f"accept loop died at frame {i}"
    assert wait_until(lambda: server.stats.connections_open == 1, 10), server.stats.connections_open
    grown = rss() - before
    assert grown < 256 * MiB, f"RSS grew by {grown / MiB:.0f} MiB over the fuzz run"
    bystander.check()
    fresh = connect()
    assert fresh.device_count() == 1
    assert server.stats.errors > 0
