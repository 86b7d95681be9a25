"""Every command of protocol 7.0.0, driven directly with correct inputs.

Replies are checked against values worked out by hand (sizes, ggml_nbytes)
or by a NumPy model of the buffer's bytes.
"""

from __future__ import annotations

import socket
import struct

import numpy as np
import psutil
import pytest

import ggml_harness

from conftest import expect_closed, wait_until
from rpcserver import ggml
from rpcserver.ggml import GGMLType, Op
from rpcserver.protocol import (
    COMMANDS, FRAME_HEADER, SIZE, Command, make_tensor, pack_graph,
)

F32, F16, Q4_0, Q8_0, I8 = (GGMLType.F32, GGMLType.F16, GGMLType.Q4_0, GGMLType.Q8_0,
                            GGMLType.I8)


def rand_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, np.uint8).tobytes()


def new_buffer(client, size: int) -> tuple[int, int]:
    handle, got = client.alloc_buffer(0, size)
    assert handle != 0 and got == size
    return handle, client.buffer_get_base(handle)


def byte_tensor(handle: int, base: int, size: int, offset: int = 0, id: int = 0x77):
    """An I8 tensor of ``size`` bytes at ``base + offset``: a window onto raw buffer bytes."""
    return make_tensor(id=id, type=I8, buffer=handle, ne=(size,), data=base + offset)


# ------------------------------------------------------------------- HELLO, DEVICE_COUNT


@pytest.mark.parametrize("caps", [bytes(24), bytes(range(1, 25))], ids=["zero-caps", "client-caps"])
def test_hello_reply_is_28_bytes_version_7_0_0_with_zero_caps(connect, caps):
    c = connect(hello=False)
    c.send_frame(Command.HELLO, caps)
    (size,) = SIZE.unpack(c.recv_exact(SIZE.size))
    assert size == 28
    body = c.recv_exact(28)
    assert body[:3] == bytes([7, 0, 0])
    assert body[3:] == bytes(25)  # padding + 24 bytes of capabilities: plain TCP only
    assert c.device_count() == 1  # the session goes on normally


def test_rpc_client_hello(connect):
    assert connect(hello=False).hello() == (7, 0, 0)


def test_device_count(server, connect):
    c = connect()
    c.send_frame(Command.DEVICE_COUNT, b"")
    assert c.recv_reply(4) == struct.pack("<I", 1)
    assert c.device_count() == len(server.devices) == 1


# ------------------------------------------------------------------- buffers


@pytest.mark.parametrize("size", [1, 32, 1000, 1 << 20])
def test_alloc_buffer(server, connect, size):
    c = connect()
    c.send_frame(Command.ALLOC_BUFFER, struct.pack("<IQ", 0, size))
    remote_ptr, remote_size = struct.unpack("<QQ", c.recv_reply(16))
    assert remote_ptr != 0
    assert remote_size == size
    assert server.stats.buffers_open == 1
    assert server.stats.bytes_allocated[0] == size


def test_alloc_zero_size_buffer_gives_a_valid_handle_with_base_0(server, connect):
    c = connect()
    handle, size = c.alloc_buffer(0, 0)
    assert handle != 0 and size == 0
    assert c.buffer_get_base(handle) == 0
    c.buffer_clear(handle, 7)  # nothing to clear, but a valid handle
    c.free_buffer(handle)
    c.sync()
    assert server.stats.buffers_open == 0


@pytest.mark.parametrize("size", [2**62, 2**64 - 1])
def test_alloc_impossible_size_answers_null_and_keeps_the_connection(server, connect, caplog, size):
    c = connect()
    assert c.alloc_buffer(0, size) == (0, 0)
    assert server.stats.buffers_open == 0
    # the connection stays open and usable
    handle, _ = new_buffer(c, 64)
    assert server.stats.buffers_open == 1
    assert any(str(size) in r.getMessage() and "ALLOC_BUFFER" in r.getMessage()
               for r in caplog.get_records("call")), "the refused allocation should be logged"


#: what ggml's buffer types report: the CPU's TENSOR_ALIGNMENT, the CUDA buffer type's 128
ALIGNMENT = {"CPU": 32, "CUDA-host": 128}


def test_get_alignment(server, connect):
    c = connect()
    c.send_frame(Command.GET_ALIGNMENT, struct.pack("<I", 0))
    assert c.recv_reply(8) == struct.pack("<Q", ALIGNMENT[server.device_name])


def test_get_max_size(server, connect):
    c = connect()
    # ggml's CPU buffer type has no limit: SIZE_MAX
    assert c.get_max_size(0) == server.devices[0].max_buffer_size == 2**64 - 1


def test_buffer_get_base_is_aligned_and_buffers_are_disjoint(connect):
    c = connect()
    sizes = [1, 31, 32, 33, 4096, 1 << 20, 12345]
    ranges = []
    for size in sizes:
        handle, base = new_buffer(c, size)
        assert base != 0
        assert base % 32 == 0
        assert base == c.buffer_get_base(handle)  # stable
        ranges.append((base, base + size))
    # a second session's buffers do not overlap either
    c2 = connect()
    for size in sizes[:3]:
        _, base = new_buffer(c2, size)
        ranges.append((base, base + size))
    ranges.sort()
    for (_, end), (start, _) in zip(ranges, ranges[1:]):
        assert end <= start, f"overlapping buffer ranges: {ranges}"


def test_free_buffer_makes_the_handle_unknown(server, connect, caplog):
    c = connect()
    handle, _ = new_buffer(c, 256)
    keep, _ = new_buffer(c, 256)
    assert server.stats.buffers_open == 2
    c.free_buffer(handle)
    c.sync()
    assert server.stats.buffers_open == 1
    assert c.buffer_get_base(keep) != 0
    c.send_frame(Command.BUFFER_GET_BASE, struct.pack("<Q", handle))
    expect_closed(c, caplog, f"0x{handle:x}")
    assert wait_until(lambda: server.stats.buffers_open == 0)


def test_buffer_clear(connect):
    c = connect()
    handle, base = new_buffer(c, 1000)
    whole = byte_tensor(handle, base, 1000)
    c.set_tensor(whole, 0, rand_bytes(1000))
    c.send_frame(Command.BUFFER_CLEAR, struct.pack("<QB", handle, 0xAB))
    assert c.get_tensor(whole, 0, 1000) == b"\xab" * 1000
    c.buffer_clear(handle, 0)
    assert c.get_tensor(whole, 0, 1000) == bytes(1000)


# ------------------------------------------------------------------- tensor data


def test_memset_tensor(connect):
    c = connect()
    handle, base = new_buffer(c, 1024)
    whole = byte_tensor(handle, base, 1024, id=1)
    model = np.frombuffer(rand_bytes(1024, 1), np.uint8).copy()
    c.set_tensor(whole, 0, model.tobytes())
    # an F32 tensor of 64 floats (256 bytes) at buffer offset 64
    t = make_tensor(id=2, type=F32, buffer=handle, ne=(16, 4), data=base + 64)
    c.memset_tensor(t, 10, 20, 7)
    model[64 + 10:64 + 30] = 7
    c.memset_tensor(t, 0, 0, 9)  # size 0: nothing happens
    c.memset_tensor(t, 250, 6, 0xFF)  # ends exactly at the tensor's end
    model[64 + 250:64 + 256] = 0xFF
    assert c.get_tensor(whole, 0, 1024) == model.tobytes()


def test_set_get_round_trip_with_offsets(connect):
    c = connect()
    handle, base = new_buffer(c, 8192)
    whole = byte_tensor(handle, base, 8192, id=1)
    c.buffer_clear(handle, 0)
    model = np.zeros(8192, np.uint8)
    # F32 tensor ne=[64, 4] (1024 bytes) at buffer offset 128
    t = make_tensor(id=2, type=F32, buffer=handle, ne=(64, 4), data=base + 128)
    values = np.linspace(-3, 3, 256, dtype=np.float32)
    c.set_tensor(t, 0, values.tobytes())
    model[128:128 + 1024] = np.frombuffer(values.tobytes(), np.uint8)
    assert np.array_equal(np.frombuffer(c.get_tensor(t, 0, 1024), np.float32), values)
    # partial write at an offset, then partial reads at several offsets
    patch = rand_bytes(100, 2)
    c.set_tensor(t, 100, patch)
    model[128 + 100:128 + 200] = np.frombuffer(patch, np.uint8)
    for off, size in [(0, 1024), (100, 100), (99, 3), (1023, 1), (1024, 0), (0, 0), (512, 512)]:
        assert c.get_tensor(t, off, size) == model[128 + off:128 + off + size].tobytes(), (off, size)
    # and nothing outside the tensor was touched
    assert c.get_tensor(whole, 0, 8192) == model.tobytes()
    # a Q4_0 tensor (ne=[64, 2]: 4 blocks of 18 bytes) at offset 4096
    q = make_tensor(id=3, type=Q4_0, buffer=handle, ne=(64, 2), data=base + 4096)
    qdata = rand_bytes(72, 3)
    c.set_tensor(q, 0, qdata)
    assert c.get_tensor(q, 0, 72) == qdata
    assert c.get_tensor(whole, 4096, 72) == qdata


def test_large_set_get_round_trip_100_mib(connect):
    size = 100 << 20
    c = connect(timeout=60)
    handle, base = new_buffer(c, size)
    t = byte_tensor(handle, base, size)
    data = np.random.default_rng(7).integers(0, 2**63, size // 8, np.uint64).view(np.uint8)
    c.set_tensor(t, 0, data)
    got = c.get_tensor(t, 0, size)
    assert len(got) == size
    assert np.array_equal(np.frombuffer(got, np.uint8), data)
    # a window in the middle, at an odd offset
    assert c.get_tensor(t, 12345677, 4097) == data[12345677:12345677 + 4097].tobytes()
    c.free_buffer(handle)


def test_set_tensor_hash_without_cache_is_a_miss(connect):
    c = connect()
    handle, base = new_buffer(c, 256)
    t = byte_tensor(handle, base, 256)
    c.set_tensor(t, 0, bytes(range(256)))
    c.send_frame(Command.SET_TENSOR_HASH,
                 COMMANDS[Command.SET_TENSOR_HASH].request.pack(t.pack(), 0, 0x0123456789ABCDEF))
    assert c.recv_reply(1) == b"\x00"
    assert c.set_tensor_hash(t, 0, 0xCBF29CE484222325) is False
    assert c.get_tensor(t, 0, 256) == bytes(range(256))


def test_copy_tensor(connect):
    c = connect()
    ha, base_a = new_buffer(c, 1024)
    hb, base_b = new_buffer(c, 1024)
    src = make_tensor(id=1, type=F32, buffer=ha, ne=(8, 8), data=base_a + 256)  # 256 bytes
    dst = make_tensor(id=2, type=F32, buffer=hb, ne=(8, 8), data=base_b + 512)
    values = np.arange(64, dtype=np.float32) * 1.5
    c.set_tensor(src, 0, values.tobytes())
    c.buffer_clear(hb, 0x11)
    c.send_frame(Command.COPY_TENSOR, src.pack() + dst.pack())
    assert c.recv_reply(1) == b"\x01"
    model = np.full(1024, 0x11, np.uint8)
    model[512:768] = np.frombuffer(values.tobytes(), np.uint8)
    assert c.get_tensor(byte_tensor(hb, base_b, 1024), 0, 1024) == model.tobytes()
    # within one buffer too, and into the very end of the destination buffer
    dst2 = make_tensor(id=3, type=F32, buffer=ha, ne=(8, 8), data=base_a + 768)
    assert c.copy_tensor(src, dst2) is True
    assert c.get_tensor(dst2, 0, 256) == values.tobytes()


def test_get_device_memory(server, connect):
    c = connect()
    c.send_frame(Command.GET_DEVICE_MEMORY, struct.pack("<I", 0))
    free, total = struct.unpack("<QQ", c.recv_reply(16))
    assert total >= free > 0
    if server.device_name == "CPU":
        assert total == psutil.virtual_memory().total
    else:  # the stand-in's cudaMemGetInfo: its capacity, less what is allocated
        assert total == ggml_harness.HOST_CUDA_CAPACITY
        handle, _ = c.alloc_buffer(0, 1 << 20)
        assert c.get_device_memory(0) == (free - (1 << 20), total)
        c.free_buffer(handle)


def test_init_tensor_sends_no_reply(server, connect):
    c = connect()
    handle, base = new_buffer(c, 256)
    t = make_tensor(id=5, type=F32, buffer=handle, ne=(64,), data=base)
    c.send_frame(Command.INIT_TENSOR, t.pack())
    c.sock.settimeout(0.2)
    with pytest.raises((socket.timeout, TimeoutError)):
        c.sock.recv(1)  # nothing comes back
    c.sock.settimeout(10)
    assert c.device_count() == 1  # and the connection is in sync
    c.init_tensor(make_tensor(id=6, type=F32, ne=(64,)))  # no buffer: ignored, like the reference
    c.init_tensor(t)
    assert c.get_alignment(0) == ALIGNMENT[server.device_name]
    assert server.stats.commands["INIT_TENSOR"] == 3


def _permuted(ne, nb, axes):
    """ggml_permute: result dim axes[i] takes source dim i."""
    rne, rnb = [0] * 4, [0] * 4
    for i, a in enumerate(axes):
        rne[a], rnb[a] = ne[i], nb[i]
    return tuple(rne), tuple(rnb)


ALLOC_SIZE_CASES = [
    # (id, type, ne, nb or None, expected ggml_nbytes worked out by hand)
    ("f32-4x3x2", F32, (4, 3, 2, 1), None, 4 * 4 * 3 * 2),
    ("f32-scalar", F32, (1, 1, 1, 1), None, 4),
    ("f16-10x3", F16, (10, 3, 1, 1), None, 2 * 30),
    ("q4_0-64x2", Q4_0, (64, 2, 1, 1), None, 2 * (64 // 32) * 18),
    ("q4_0-256", Q4_0, (256, 1, 1, 1), None, 8 * 18),
    ("q8_0-32x3", Q8_0, (32, 3, 1, 1), None, 3 * 34),
    # permute(1,0,2,3) of f32 [4,3,2]: ne=[3,4,2] nb=[16,4,48,96] -> 4 + 2*16 + 3*4 + 1*48
    ("f32-permuted", F32, *_permuted((4, 3, 2, 1), (4, 16, 48, 96), (1, 0, 2, 3)), 96),
    # transpose of a 2-D f32 [5,7]: ne=[7,5] nb=[20,4,140,140] -> 4 + 6*20 + 4*4
    ("f32-transposed", F32, (7, 5, 1, 1), (20, 4, 140, 140), 4 + 6 * 20 + 4 * 4),
    # a strided view: 2 rows of 2 floats, rows 64 bytes apart -> 4 + 1*4 + 1*64
    ("f32-strided-view", F32, (2, 2, 1, 1), (4, 64, 128, 128), 72),
    # a Q4_0 view with padded rows: 64*18/32 + 2*100
    ("q4_0-padded-rows", Q4_0, (64, 3, 1, 1), (18, 100, 300, 300), 36 + 2 * 100),
    ("f32-empty", F32, (0, 3, 1, 1), None, 0),
]


@pytest.mark.parametrize("type_, ne, nb, expected", [c[1:] for c in ALLOC_SIZE_CASES],
                         ids=[c[0] for c in ALLOC_SIZE_CASES])
def test_get_alloc_size_is_ggml_nbytes(connect, type_, ne, nb, expected):
    c = connect()
    t = make_tensor(id=0x42, type=type_, ne=ne, nb=nb)
    assert c.get_alloc_size(0, t) == expected
    # the same with a source tensor attached and with the tensor placed in a buffer
    src = make_tensor(id=0x43, type=F32, ne=(4,))
    assert c.get_alloc_size(0, t, [src]) == expected
    handle, base = new_buffer(c, 4096)
    placed = make_tensor(id=0x42, type=type_, ne=ne, nb=nb, buffer=handle, data=base)
    assert c.get_alloc_size(0, placed) == expected


# ------------------------------------------------------------------- graphs


def view_graph(handle: int, base: int):
    """A graph made only of view ops over a 4x3 F32 tensor at ``base``."""
    a = make_tensor(id=0xA0, type=F32, buffer=handle, ne=(4, 3), data=base, name="a")
    common = dict(type=F32, buffer=handle, src=(0xA0,), view_src=0xA0)
    reshape = make_tensor(id=0xA1, op=Op.RESHAPE, ne=(12,), data=base, name="a (reshaped)", **common)
    view = make_tensor(id=0xA2, op=Op.VIEW, ne=(2, 3), nb=(4, 16, 48, 48), view_offs=8,
                       data=base + 8, op_params=(8,), name="a (view)", **common)
    permute = make_tensor(id=0xA3, op=Op.PERMUTE, ne=(3, 4), nb=(16, 4, 48, 48),
                          op_params=(1, 0, 2, 3), data=base, name="a (permuted)", **common)
    transpose = make_tensor(id=0xA4, op=Op.TRANSPOSE, ne=(3, 4), nb=(16, 4, 48, 48),
                            data=base, name="a (transposed)", **common)
    # a view of a view: RESHAPE of the VIEW's bytes, view_src chain through 0xA2
    nested = make_tensor(id=0xA5, op=Op.NONE, type=F32, buffer=handle, ne=(2, 3),
                         nb=(4, 16, 48, 48), src=(0xA2,), view_src=0xA2, view_offs=0,
                         data=base + 8, name="view of view")
    tensors = [a, reshape, view, permute, transpose, nested]
    nodes = [0xA1, 0xA2, 0xA3, 0xA4, 0xA5]
    return nodes, tensors


def test_graph_of_view_ops_computes_nothing_and_can_be_recomputed(server, connect):
    c = connect()
    handle, base = new_buffer(c, 48)
    a = make_tensor(id=0xA0, type=F32, buffer=handle, ne=(4, 3), data=base)
    values = np.arange(12, dtype=np.float32).tobytes()
    c.set_tensor(a, 0, values)
    nodes, tensors = view_graph(handle, base)
    assert server.stats.graphs == 0
    c.send_frame(Command.GRAPH_COMPUTE, pack_graph(0, nodes, tensors))  # no reply
    assert c.device_count() == 1  # still open and in sync
    assert server.stats.graphs == 1
    assert c.get_tensor(a, 0, 48) == values  # nothing computed, nothing written
    c.send_frame(Command.GRAPH_RECOMPUTE, struct.pack("<I", 0))  # no reply either
    assert c.device_count() == 1
    assert server.stats.graphs == 2
    c.graph_recompute(0)
    c.sync()
    assert server.stats.graphs == 3
    # a new graph replaces the stored one; an empty graph is fine too
    c.graph_compute(0, [], [])
    c.graph_recompute(0)
    c.sync()
    assert server.stats.graphs == 5
    assert c.get_tensor(a, 0, 48) == values
    assert server.stats.commands["GRAPH_COMPUTE"] == 2
    assert server.stats.commands["GRAPH_RECOMPUTE"] == 3


def _unimplemented_op():
    try:
        import rpcserver.ops  # noqa: F401  (fills OP_TABLE once it exists)
    except ImportError:
        pass
    from rpcserver.executor import OP_TABLE

    for name in ["OPT_STEP_SGD", "CROSS_ENTROPY_LOSS_BACK", "WIN_UNPART", "GET_REL_POS",
                 "POOL_2D_BACK", "IM2COL_BACK", "FLASH_ATTN_BACK", "RWKV_WKV7", "ADD"]:
        if Op[name] not in OP_TABLE:
            return Op[name]
    return None


def test_graph_with_unimplemented_op_closes_with_the_op_named(server, connect, caplog):
    op = _unimplemented_op()
    if op is None:
        pytest.skip("every candidate op is implemented")
    c = connect()
    handle, base = new_buffer(c, 256)
    x = make_tensor(id=1, type=F32, buffer=handle, ne=(16,), data=base)
    y = make_tensor(id=2, type=F32, buffer=handle, ne=(16,), data=base + 64)
    out = make_tensor(id=3, type=F32, buffer=handle, ne=(16,), data=base + 128, op=op, src=(1, 2))
    c.graph_compute(0, [3], [x, y, out])
    expect_closed(c, caplog, op.name, "not implemented")
    assert server.stats.graphs == 0
    assert wait_until(lambda: server.stats.buffers_open == 0)


# ------------------------------------------------------------------- sessions


def test_buffers_are_per_session(server, connect, caplog):
    a, b = connect(), connect()
    handle, base = new_buffer(a, 128)
    t = byte_tensor(handle, base, 128)
    a.set_tensor(t, 0, bytes(range(128)))
    b.send_frame(Command.BUFFER_GET_BASE, struct.pack("<Q", handle))
    expect_closed(b, caplog, f"0x{handle:x}")
    # A is unaffected: its buffer is still there with its data
    assert a.buffer_get_base(handle) == base
    assert a.get_tensor(t, 0, 128) == bytes(range(128))
    assert server.stats.buffers_open == 1


def test_handles_are_never_reused(connect):
    a, b = connect(), connect()
    seen = set()
    for i in range(20):
        for c in (a, b):
            handle, _ = c.alloc_buffer(0, 64 * (i + 1) if i % 3 else 0)
            assert handle not in seen
            seen.add(handle)
            if i % 2:
                c.free_buffer(handle)
    assert len(seen) == 40


def test_disconnect_frees_the_sessions_buffers(server, connect, caplog):
    c = connect()
    for size in (0, 100, 1 << 20):
        new_buffer(c, size)
    other = connect()
    new_buffer(other, 64)
    assert server.stats.buffers_open == 4
    c.close()
    assert wait_until(lambda: server.stats.buffers_open == 1), server.stats.buffers_open
    other.close()
    assert wait_until(lambda: server.stats.buffers_open == 0 and server.stats.connections_open == 0)
    assert server.stats.bytes_allocated[0] == 0
    assert any("freed 3 buffer(s)" in r.getMessage() for r in caplog.get_records("call"))


def test_every_command_is_covered():
    """Guard: the 18 wire commands of protocol 7.0.0 with their request sizes."""
    fixed = {cmd: spec.request.size for cmd, spec in COMMANDS.items()
             if hasattr(spec.request, "size")}
    assert len(COMMANDS) == 18
    assert fixed == {
        Command.HELLO: 24, Command.DEVICE_COUNT: 0, Command.ALLOC_BUFFER: 12,
        Command.GET_ALIGNMENT: 4, Command.GET_MAX_SIZE: 4, Command.BUFFER_GET_BASE: 8,
        Command.FREE_BUFFER: 8, Command.BUFFER_CLEAR: 9, Command.SET_TENSOR_HASH: 312,
        Command.GET_TENSOR: 312, Command.COPY_TENSOR: 592, Command.GET_DEVICE_MEMORY: 4,
        Command.INIT_TENSOR: 296, Command.GET_ALLOC_SIZE: 4 + 296 * 11,
        Command.GRAPH_RECOMPUTE: 4, Command.MEMSET_TENSOR: 313,
    }
    assert FRAME_HEADER.size == 9
    assert [Op.MAP_CUSTOM1, Op.MAP_CUSTOM2, Op.MAP_CUSTOM3, Op.CUSTOM] == [92, 93, 94, 95]
    assert ggml.OP_COUNT == 101
