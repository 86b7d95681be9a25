"""Weights stay in their own type: products read them in place, within bounded scratch.

Values are checked against NumPy; the memory claims against the core's device record
(rpcserver.device_state) and GET_DEVICE_MEMORY.
"""

import gguf
import numpy as np
import pytest

from rpcserver.client import RpcClient
from rpcserver.device_state import state_of
from rpcserver.ggml import GGMLType, Op
from rpcserver.protocol import make_tensor


def _matmul_graph(c, ptr, base, w_type):
    # w: 8x4 weights at base, x: 8x2 activations at base+256, out: 4x2 at base+512
    w = make_tensor(id=1, type=w_type, buffer=ptr, ne=(8, 4), data=base)
    x = make_tensor(id=2, buffer=ptr, ne=(8, 2), data=base + 256)
    out = make_tensor(id=3, buffer=ptr, ne=(4, 2), data=base + 512, op=Op.MUL_MAT, src=(1, 2))
    return w, x, out


def _as_ggml_rounds(w_type: int, act_type: int, xs):
    """``xs`` as ggml's CPU backend rounds activations for weights of ``w_type`` (its own
    quantizer for the vec_dot type, read back with its own to_float)."""
    from ggml_harness import ggml_cpu_activations, ggml_to_float

    vec_dot_type, act = ggml_cpu_activations(int(w_type), xs)
    assert vec_dot_type == act_type, "the device and ggml disagree on the activations' type"
    return ggml_to_float(vec_dot_type, act)


def test_weights_rewritten_between_graphs_are_read_anew(server):
    """GRAPH_RECOMPUTE after SET_TENSOR on the weights sees the new weights (nothing stale)."""
    rng = np.random.default_rng(0)
    with RpcClient(port=server.port) as c:
        ptr, _ = c.alloc_buffer(0, 4096)
        base = c.buffer_get_base(ptr)
        w, x, out = _matmul_graph(c, ptr, base, GGMLType.F16)
        xs = rng.standard_normal((2, 8)).astype(np.float32)
        c.set_tensor(x, 0, xs.tobytes())
        for step in range(3):
            ws = rng.standard_normal((4, 8)).astype(np.float16)
            c.set_tensor(w, 0, ws.tobytes())
            if step == 0:
                c.graph_compute(0, [3], [w, x, out])
            else:
                c.graph_recompute(0)
            got = np.frombuffer(c.get_tensor(out, 0, 32), np.float32).reshape(2, 4)
            np.testing.assert_allclose(got, xs @ ws.astype(np.float32).T, rtol=1e-5, atol=1e-5)
        c.free_buffer(ptr)
        c.sync()


@pytest.mark.parametrize("n_cols", [1, 40], ids=["decode", "batch"])
@pytest.mark.parametrize("w_type", [GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.IQ2_XXS, GGMLType.F16],
                         ids=lambda t: GGMLType(t).name)
def test_large_weights_are_widened_a_tile_at_a_time(server, w_type, n_cols):
    """A weight far larger than the scratch budget: the product is right and the scratch the
    op held never exceeded the budget (no whole float32 copy, nothing kept afterwards)."""
    state = state_of(server.devices[0])
    k, m = 256, 96
    info_rows = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(w_type)]
    row_bytes = k // info_rows[0] * info_rows[1]
    rng = np.random.default_rng(1)
    if w_type in (GGMLType.IQ2_XXS, GGMLType.Q4_K):  # no quantizer in gguf: random codes
        n_blocks, block_bytes = m * k // 256, info_rows[1]
        blocks = rng.integers(0, 256, (n_blocks, block_bytes), dtype=np.uint8)
        scales = rng.uniform(0.002, 0.02, (n_blocks, 2)).astype(np.float16).view(np.uint8)
        n_scales = 4 if w_type == GGMLType.Q4_K else 2  # Q4_K leads with d and dmin, IQ2_XXS with d
        blocks[:, :n_scales] = scales[:, :n_scales]
        raw = blocks.reshape(m, row_bytes)
    elif w_type == GGMLType.F16:
        raw = rng.standard_normal((m, k)).astype(np.float16).view(np.uint8)
    else:
        raw = gguf.quants.quantize(rng.standard_normal((m, k)).astype(np.float32),
                                   gguf.GGMLQuantizationType(w_type))
    wf = (raw.view(np.float16).astype(np.float32) if w_type == GGMLType.F16
          else gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(w_type)))
    xs = rng.standard_normal((n_cols, k)).astype(np.float32)
    # a device that rounds the activations as ggml does (the CPU plugin's 8-bit products for
    # Q8_0) is held to the exact product of the activations ggml's CPU code makes
    lib = server.devices[0].array_lib
    rounded = lib.activation_type(int(w_type), n_cols) if lib is not None else None
    x_exact = xs if rounded is None else _as_ggml_rounds(w_type, rounded, xs)
    saved = state.scratch_budget, state.scratch_peak
    state.scratch_budget, state.scratch_peak = 8 * 4 * k, 0  # 8 widened rows per tile
    try:
        with RpcClient(port=server.port) as c:
            size = raw.nbytes + xs.nbytes + 4 * m * n_cols
            ptr, _ = c.alloc_buffer(0, size + 1024)
            base = c.buffer_get_base(ptr)
            w = make_tensor(id=1, type=w_type, buffer=ptr, ne=(k, m), data=base)
            x = make_tensor(id=2, buffer=ptr, ne=(k, n_cols), data=base + raw.nbytes)
            out = make_tensor(id=3, buffer=ptr, ne=(m, n_cols), data=base + raw.nbytes + xs.nbytes,
                              op=Op.MUL_MAT, src=(1, 2))
            c.set_tensor(w, 0, raw.tobytes())
            c.set_tensor(x, 0, xs.tobytes())
            c.graph_compute(0, [3], [w, x, out])
            got = np.frombuffer(c.get_tensor(out, 0, 4 * m * n_cols), np.float32).reshape(n_cols, m)
            want = x_exact.astype(np.float64) @ wf.astype(np.float64).T
            assert np.sum((got - want) ** 2) / np.sum(want ** 2) < 1e-10
            assert 0 < state.scratch_peak <= state.scratch_budget or state.scratch_peak == 0
            assert state.scratch_in_use == 0
            assert c.get_tensor(w, 0, raw.nbytes) == raw.tobytes()  # the bytes that were sent
            c.free_buffer(ptr)
            c.sync()
    finally:
        state.scratch_budget, state.scratch_peak = saved


def test_device_memory_keeps_room_for_scratch(server):
    """GET_DEVICE_MEMORY's free figure leaves the scratch budget that ops may still take."""
    dev = server.devices[0]
    state = state_of(dev)
    with RpcClient(port=server.port) as c:
        free, total = c.get_device_memory(0)
    os_free, os_total = dev.memory()
    assert total == os_total
    # the OS figure moves a little between the two reads; the reserve is the whole budget
    assert state.scratch_budget == min(dev.scratch_bytes or 64 << 20, os_total // 8)
    assert abs((os_free - state.scratch_budget) - free) < 64 << 20
    assert free <= os_free - state.scratch_budget + (64 << 20)


def test_memset_and_clear_invalidate_too(server):
    with RpcClient(port=server.port) as c:
        ptr, _ = c.alloc_buffer(0, 4096)
        base = c.buffer_get_base(ptr)
        w, x, out = _matmul_graph(c, ptr, base, GGMLType.F16)
        c.set_tensor(w, 0, np.ones((4, 8), np.float16).tobytes())
        c.set_tensor(x, 0, np.ones((2, 8), np.float32).tobytes())
        c.graph_compute(0, [3], [w, x, out])
        assert np.frombuffer(c.get_tensor(out, 0, 32), np.float32).tolist() == [8.0] * 8
        c.memset_tensor(w, 0, 16, 0)  # first row of weights -> +0.0
        c.graph_recompute(0)
        assert np.frombuffer(c.get_tensor(out, 0, 32), np.float32).tolist() == [0, 8, 8, 8] * 2
        c.buffer_clear(ptr, 0)
        c.set_tensor(x, 0, np.ones((2, 8), np.float32).tobytes())
        c.graph_recompute(0)
        assert np.frombuffer(c.get_tensor(out, 0, 32), np.float32).tolist() == [0.0] * 8


class _FakeBuffer:
    def __init__(self, serial):
        self.serial, self.generation = serial, 0


def test_prepared_forms_follow_writes():
    """Forms are made once per (buffer, span, key), remade after a network write, never made
    from bytes a graph writes (ranges merged as plans report them), dropped on free."""
    from rpcserver.device_state import DeviceState

    state = DeviceState(object(), scratch_budget=1 << 20)
    buf = _FakeBuffer(1)
    made = []

    def make(tag):
        def fn():
            made.append(tag)
            return tag, 100
        return fn

    assert state.prepared(buf, (0, 64), ("q",), make("a")) == "a"
    assert state.prepared(buf, (0, 64), ("q",), make("b")) == "a" and made == ["a"]
    buf.generation += 1  # a SET_TENSOR into the buffer
    assert state.prepared(buf, (0, 64), ("q",), make("c")) == "c"
    assert state.prepared_count() == 1  # the stale form went
    state.graph_wrote(buf, 200, 300)
    state.graph_wrote(buf, 300, 310)  # touching: merged into [200, 310)
    state.graph_wrote(buf, 100, 120)
    assert state.prepared(buf, (0, 64), ("q",), make("d")) == "c"  # disjoint: kept
    for span in [(110, 130), (0, 101), (305, 400), (250, 260), (119, 201)]:
        assert state.prepared(buf, span, ("q",), make("x")) is None, span
    assert state.prepared(buf, (120, 200), ("q",), make("e")) == "e"  # the gap between
    state.graph_wrote(buf, 50, 60)  # a graph now writes into the first form's bytes
    assert state.prepared(buf, (0, 64), ("q",), make("f")) is None
    assert state.prepared_count() == 1
    state.drop_buffer(buf.serial)
    assert state.prepared_count() == 0
    assert state.prepared(buf, (0, 64), ("q",), make("g")) == "g"  # a new buffer, same serial
