"""The op table's type support (rpcserver.ops.support): conformance and enforcement.

1. Conformance: every concrete combination the table lists (each rule expanded over
   its type sets) is built with ggml's own constructors, computed by ggml's CPU
   backend and by rpcserver, and compared (tests/support_builders.py). So nothing is
   in the table -- and in docs/ops.md -- that has not been checked against ggml. The
   op suites (test_ops_basic/attention/misc) go deeper per op; this sweep is about
   breadth over types.
2. Enforcement: a graph with a combination the table does not list fails before any
   node runs, with an error naming the op, the types and the shapes; over the wire the
   server closes that connection, logs the reason, and keeps serving other clients.
3. The named type sets are true for the installed gguf (rpcserver reads and writes
   quantized data with gguf.quants).
"""

from __future__ import annotations

import logging
import struct
import zlib

import numpy as np
import pytest

import ggml_harness as H
import support_builders as B
from conftest import expect_closed
from rpcserver import ggml
from rpcserver.errors import GraphError
from rpcserver.ggml import GGMLType as GT
from rpcserver.ggml import Op
from rpcserver.ops import support
from rpcserver.protocol import make_tensor

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# =========================================================================== 1. conformance


def _combos():
    for (op, sub), rules in sorted(support.SUPPORT.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        for dst, srcs in support.expand(rules):
            tid = B.describe(op, sub, dst, srcs).replace(", ", "-").replace(" ", "-")
            yield pytest.param(op, sub, dst, srcs, id=tid)


COMBOS = list(_combos())


@pytest.mark.parametrize("op,sub,dst,srcs", COMBOS)
def test_listed_combination_conforms_to_ggml(op, sub, dst, srcs, request):
    H.require_ggml()
    seed = zlib.crc32(request.node.nodeid.encode())
    B.check_combo(op, sub, dst, srcs, seed=seed)


def test_the_sweep_covers_every_entry():
    ops = {(p.values[0], p.values[1]) for p in COMBOS}
    assert ops == set(support.SUPPORT), "an entry of the table expands to no combination"


# =========================================================================== 2. enforcement


class _Node:
    """The bits of rpcserver.graph.GraphTensor that check_support reads."""

    def __init__(self, op, dst, srcs, ne=(64, 4, 1, 1), sub=None):
        params = (sub or 0,) + (0,) * 15
        self.rpc = make_tensor(id=1, type=int(dst), ne=ne, op=int(op), op_params=params)
        self.src = [None if s is None else _Node(Op.NONE, s, (), ne) for s in srcs]
        self.op = int(op)


@pytest.mark.parametrize("op,dst,srcs,sub,needles", [
    pytest.param(Op.MUL_MAT, GT.F32, (GT.F32, GT.I32), None,
                 ("MUL_MAT", "src1=I32", "src0=F32", "dst=F32"), id="mul_mat-i32-src1"),
    pytest.param(Op.ROPE, GT.Q8_0, (GT.Q8_0, GT.I32), None, ("ROPE", "dst=Q8_0", "src0=Q8_0"),
                 id="rope-quantized"),
    pytest.param(Op.GET_ROWS, GT.F32, (GT.F32, GT.I64), None, ("GET_ROWS", "src1=I64"),
                 id="get_rows-i64-ids"),
    pytest.param(Op.UNARY, GT.I32, (GT.I32,), int(ggml.UnaryOp.EXP), ("UNARY(EXP)", "dst=I32"),
                 id="exp-i32"),
    pytest.param(Op.SQR, GT.Q4_0, (GT.Q4_0,), None, ("SQR", "Q4_0"), id="sqr-quantized"),
    pytest.param(Op.SOFT_MAX, GT.F32, (GT.F32, GT.BF16), None, ("SOFT_MAX", "src1=BF16"),
                 id="soft_max-bf16-mask"),
    pytest.param(Op.CPY, GT.Q4_K, (GT.F32, GT.Q4_K), None, ("CPY", "dst=Q4_K"),
                 id="cpy-to-k-quant"),
    pytest.param(Op.CONCAT, GT.Q8_1, (GT.Q8_1, GT.Q8_1), None, ("CONCAT", "Q8_1"),
                 id="concat-q8_1"),
])
def test_unsupported_combination_is_refused_with_op_types_and_shapes(op, dst, srcs, sub, needles):
    node = _Node(op, dst, srcs, sub=sub)
    with pytest.raises(GraphError) as err:
        support.check_support(node)
    msg = str(err.value)
    for n in needles + ("[64, 4, 1, 1]", "supported:"):
        assert n in msg, f"{n!r} not in {msg!r}"


def test_unknown_sub_op_is_refused():
    node = _Node(Op.UNARY, GT.F32, (GT.F32,), sub=99)
    with pytest.raises(GraphError, match=r"UNARY\(<UnaryOp 99>\).*not supported"):
        support.check_support(node)


def test_listed_combinations_pass_the_check():
    for (op, sub), rules in support.SUPPORT.items():
        for dst, srcs in support.expand(rules):
            support.check_support(_Node(op, dst, srcs, sub=sub))


def test_rules_with_optional_and_same_type_slots():
    sm = support.SUPPORT[(int(Op.SOFT_MAX), None)]
    ok = lambda dst, *srcs: any(r.matches(int(dst), tuple(None if s is None else int(s) for s in srcs))
                                for r in sm)  # noqa: E731
    assert ok(GT.F32, GT.F32)
    assert ok(GT.F32, GT.F32, GT.F16)
    assert ok(GT.F32, GT.F32, None, GT.F32)  # sinks without a mask
    assert not ok(GT.F32, GT.F32, GT.F32, GT.F32, GT.F32)  # a source no rule mentions
    cpy = support.SUPPORT[(int(Op.CPY), None)]
    assert any(r.matches(int(GT.F16), (int(GT.F32), int(GT.F16))) for r in cpy)
    assert not any(r.matches(int(GT.F16), (int(GT.F32), int(GT.F32))) for r in cpy)  # src1 is dst


# -- over the wire --------------------------------------------------------------------------


def _f32_graph_tensors(h, base):
    """ADD of two F32 [8] tensors into a third, the tensors at base, base+32, base+64."""
    a = make_tensor(id=0x10, type=GT.F32, buffer=h, ne=(8,), data=base, name="a")
    b = make_tensor(id=0x11, type=GT.F32, buffer=h, ne=(8,), data=base + 32, name="b")
    s = make_tensor(id=0x12, type=GT.F32, buffer=h, ne=(8,), data=base + 64, op=Op.ADD,
                    src=(0x10, 0x11), name="sum")
    return a, b, s


def _run_add(client) -> None:
    h, size = client.alloc_buffer(0, 4096)
    base = client.buffer_get_base(h)
    a, b, s = _f32_graph_tensors(h, base)
    x = np.arange(8, dtype=np.float32)
    client.set_tensor(a, 0, x.tobytes())
    client.set_tensor(b, 0, (x * 10).tobytes())
    client.graph_compute(0, [s.id], [a, b, s])
    got = np.frombuffer(client.get_tensor(s, 0, 32), np.float32)
    np.testing.assert_array_equal(got, x * 11)
    client.free_buffer(h)


@pytest.mark.parametrize("case", ["mul_mat_i32_src1", "rope_quantized"])
def test_unsupported_graph_closes_the_connection_and_the_server_keeps_serving(
        server, connect, caplog, case):
    c = connect()
    h, _ = c.alloc_buffer(0, 1 << 16)
    base = c.buffer_get_base(h)
    if case == "mul_mat_i32_src1":
        w = make_tensor(id=0x20, type=GT.F32, buffer=h, ne=(64, 16), data=base, name="w")
        x = make_tensor(id=0x21, type=GT.I32, buffer=h, ne=(64, 4), data=base + 4096, name="x")
        out = make_tensor(id=0x22, type=GT.F32, buffer=h, ne=(16, 4), data=base + 8192,
                          op=Op.MUL_MAT, src=(0x20, 0x21), name="y")
        tensors, needles = [w, x, out], ("MUL_MAT", "dst=F32", "src0=F32", "src1=I32",
                                         "[64, 4, 1, 1]")
    else:
        q = make_tensor(id=0x20, type=GT.Q8_0, buffer=h, ne=(64, 2, 3), data=base, name="q")
        pos = make_tensor(id=0x21, type=GT.I32, buffer=h, ne=(3,), data=base + 4096, name="pos")
        params = [0] * 16
        params[1], params[2] = 64, 0  # n_dims, mode
        params[5] = struct.unpack("<i", struct.pack("<f", 10000.0))[0]
        out = make_tensor(id=0x22, type=GT.Q8_0, buffer=h, ne=(64, 2, 3), data=base + 8192,
                          op=Op.ROPE, op_params=params, src=(0x20, 0x21), name="rot")
        tensors, needles = [q, pos, out], ("ROPE", "dst=Q8_0", "src0=Q8_0", "src1=I32")
    # a supported node first: the graph must fail before anything runs
    a, b, s = _f32_graph_tensors(h, base + 16384)
    c.set_tensor(s, 0, b"\xab" * 32)
    c.graph_compute(0, [s.id, out.id], [a, b, s] + tensors)
    line = expect_closed(c, caplog, *needles, level=logging.ERROR)
    assert "supported:" in line
    assert server.stats.graphs == 0

    # the server keeps serving: a second client computes a graph
    other = connect()
    _run_add(other)
    assert server.stats.graphs == 1


def test_supported_node_before_an_unsupported_one_is_not_computed():
    """check_support runs while the plan is built, i.e. before the first node executes."""
    from rpcserver.buffers import AddressSpace, BufferTable, SessionBuffer
    from rpcserver.graph import parse_graph
    from rpcserver.protocol import pack_graph

    device = H.cpu_device()
    buf = device.alloc_buffer(1 << 16)
    try:
        handle, base = AddressSpace().reserve(1 << 16)
        table = BufferTable()
        table.add(SessionBuffer(handle, base, 1 << 16, 0, buf))
        a, b, s = _f32_graph_tensors(handle, base)
        buf.write(0, np.arange(16, dtype=np.float32).tobytes())
        buf.write(64, b"\xab" * 32)
        w = make_tensor(id=0x20, type=GT.F32, buffer=handle, ne=(8, 2), data=base + 128)
        x = make_tensor(id=0x21, type=GT.I32, buffer=handle, ne=(8, 2), data=base + 256)
        y = make_tensor(id=0x22, type=GT.F32, buffer=handle, ne=(2, 2), data=base + 512,
                        op=Op.MUL_MAT, src=(0x20, 0x21))
        graph = parse_graph(pack_graph(0, [s.id, y.id], [a, b, s, w, x, y]), table, 1,
                            lambda entry: entry.device_index)
        with pytest.raises(GraphError, match="MUL_MAT.*src1=I32"):
            device.graph_compute(graph)
        assert bytes(buf.read(64, 32)) == b"\xab" * 32, "the ADD before the bad node ran"
    finally:
        buf.free()


# =========================================================================== 3. the type sets


def test_quantized_sets_match_gguf():
    """QUANTIZED_READ: gguf.quants dequantizes each; QUANTIZED_WRITE: it also quantizes each."""
    import gguf
    import gguf.quants

    for t in support.QUANTIZED_READ:
        info = ggml.TYPES[t]
        raw = np.zeros((1, info.type_size), np.uint8)
        out = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(t))
        assert out.shape == (1, info.block_size), info.name
    for t in support.QUANTIZED_WRITE:
        assert t in support.QUANTIZED_READ
        info = ggml.TYPES[t]
        q = gguf.quants.quantize(np.ones((1, info.block_size), np.float32),
                                 gguf.GGMLQuantizationType(t))
        assert q.shape == (1, info.type_size), info.name


def test_named_sets():
    assert support.FLOAT == {int(GT.F32), int(GT.F16), int(GT.BF16)}
    assert support.INDEX == {int(GT.I32), int(GT.I64)}
    assert support.COPYABLE == set(ggml.TYPES) - {int(GT.Q8_1)}
    assert all(ggml.TYPES[t].is_quantized for t in support.QUANTIZED_READ)
    assert support.QUANTIZED_WRITE <= support.QUANTIZED_READ
    assert support.DOT_Q8_0 <= support.QUANTIZED_READ


def test_the_type_table_is_ggmls():
    """rpcserver.ggml's type table is data: every entry has ggml's own name, block size and
    bytes per block (ggml_type_name, ggml_blck_size, ggml_type_size of the library)."""
    H.require_ggml()
    type_size = H.fn("ggml_type_size", H.c_size_t, H.c_int)
    blck_size = H.fn("ggml_blck_size", H.c_int64, H.c_int)
    for t, info in ggml.TYPES.items():
        assert H.type_name(t).upper() == info.name, info
        assert (info.block_size, info.type_size) == (blck_size(t), type_size(t)), info.name


def test_copyable_types_are_sized_like_ggml():
    """Byte copies are only right for types whose block size and bytes per block agree with
    ggml's."""
    H.require_ggml()
    type_size = H.fn("ggml_type_size", H.c_size_t, H.c_int)
    blck_size = H.fn("ggml_blck_size", H.c_int64, H.c_int)
    for t in sorted(support.COPYABLE):
        info = ggml.TYPES[t]
        assert (info.block_size, info.type_size) == (blck_size(t), type_size(t)), info.name
