"""The Metal plugin's quantized weights (plugins/metal/rpcserver_metal/quants.py): MUL_MAT on the
weights' affine form with ``mx.quantized_matmul``, and MLX dequantizers for the rest.

The op conformance suites (test_ops_basic.py, test_ops_misc.py) already check the values on
``MLX-CPU`` against ggml for every type. This file checks what they cannot see:

* the layout assumptions: MLX's bit packing, and that the affine form of every type that has
  one is exactly the weights ggml's ``to_float`` gives;
* that the quantized path is taken for a weight (one ``quantized_matmul``, one prepared form
  of about the blocks' size, made once and kept by the core) and that nothing float32 the
  size of the weights is kept;
* that writing the weights from the network (SET_TENSOR) or from a graph invalidates the
  form, and freeing the buffer drops it;
* that the types without one are widened a bounded tile at a time (MLX evaluates lazily:
  without care every tile would exist at once).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest

import ggml_harness as H
import mlx.core as mx  # required, as in test_metal_plugin.py: without MLX these tests fail
from rpcserver.client import RpcClient
from rpcserver.device_state import state_of
from rpcserver.ggml import TYPES, GGMLType, Op
from rpcserver.protocol import make_tensor
from rpcserver.server import Server
from rpcserver_metal import quants

AFFINE = [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0, GGMLType.Q5_0, GGMLType.Q5_1,
          GGMLType.Q4_K, GGMLType.Q5_K]
NATIVE = sorted(GGMLType(t) for t in quants.NATIVE_DEQUANT)
_HALF_AT = {GGMLType.Q2_K: (80, 82), GGMLType.Q3_K: (108,), GGMLType.Q6_K: (208,),
            GGMLType.Q4_K: (0, 2), GGMLType.Q5_K: (0, 2), GGMLType.Q4_1: (0, 2),
            GGMLType.Q5_1: (0, 2)}


def _name(t) -> str:
    return GGMLType(t).name


def _blocks(t, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """(rows, row bytes) of type ``t``: gguf's quantizer where it has one, else random blocks
    with sane float16 scales (every bit pattern of the rest is a valid code)."""
    rng = np.random.default_rng(seed)
    gt = gguf.GGMLQuantizationType(int(t))
    try:
        return gguf.quants.quantize(rng.standard_normal((rows, k)).astype(np.float32), gt)
    except NotImplementedError:
        pass
    info = TYPES[int(t)]
    blocks = rng.integers(0, 256, (rows * k // info.block_size, info.type_size), dtype=np.uint8)
    for at in _HALF_AT.get(GGMLType(t), (0,)):
        halves = rng.uniform(0.002, 0.02, len(blocks)).astype(np.float16)
        blocks[:, at:at + 2] = halves.view(np.uint8).reshape(-1, 2)
    if t == GGMLType.MXFP4:
        blocks[:, 0] = rng.integers(115, 125, len(blocks))  # e8m0 exponents near 1
    return blocks.reshape(rows, -1)


def _widened(t, raw: np.ndarray) -> np.ndarray:
    return gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(int(t)))


# ------------------------------------------------------------------ layouts


@pytest.mark.parametrize("bits", sorted(set(quants.AFFINE_BITS.values())))
def test_pack_is_mlx_packing(bits):
    """quants.pack writes what mx.dequantize reads: element i of a row at bits [b*i, b*(i+1))."""
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 1 << bits, (3, 96), dtype=np.uint8)
    ones = mx.ones((3, 3), dtype=mx.float32)
    zeros = mx.zeros((3, 3), dtype=mx.float32)
    got = mx.dequantize(mx.array(quants.pack(q, bits)), ones, zeros, group_size=32, bits=bits)
    np.testing.assert_array_equal(np.array(got), q.astype(np.float32))


@pytest.mark.parametrize("t", NATIVE, ids=_name)
def test_mlx_dequantizers_are_gguf_bit_for_bit(t):
    raw = _blocks(t, 6, 512, seed=int(t))
    want = _widened(t, raw)
    got = np.array(quants.dequantize(mx.array(raw), TYPES[int(t)]))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    # leading dims are kept (GET_ROWS and f32() pass (ne3, ne2, ne1, row bytes))
    got3 = quants.dequantize(mx.array(raw.reshape(2, 3, -1)), TYPES[int(t)])
    assert got3.shape == (2, 3, 512)
    np.testing.assert_array_equal(np.array(got3).reshape(6, 512), got)


@pytest.mark.parametrize("t", AFFINE, ids=_name)
def test_affine_form_is_the_ggml_weights_exactly(t):
    """scale * q + bias, in float32, is ggml's to_float of every element (zeros may differ in
    sign: -0.0 * x adds nothing), and quantized_matmul on it is the exact product to float32
    accumulation."""
    if int(t) not in quants.AFFINE_BITS:
        pytest.skip(f"this MLX has no {quants._BITS[t]}-bit quantization")
    info = TYPES[int(t)]
    rows, k = 24, 1024
    raw = _blocks(t, rows, k, seed=int(t))
    (wq, scales, biases), nbytes = quants.affine_form(lambda a, b: raw[a:b], rows, k, int(t),
                                                      info.type_size, info.block_size)
    bits = quants.AFFINE_BITS[int(t)]
    assert wq.dtype == mx.uint32 and wq.shape == (rows, k * bits // 32)
    assert scales.dtype == biases.dtype == mx.float32 and scales.shape == (rows, k // 32)
    assert nbytes == wq.nbytes + scales.nbytes + biases.nbytes < 1.4 * raw.nbytes
    want = _widened(t, raw)
    np.testing.assert_array_equal(np.array(mx.dequantize(wq, scales, biases, group_size=32,
                                                         bits=bits)), want)
    x = np.random.default_rng(1).standard_normal((7, k)).astype(np.float32)
    got = np.array(mx.quantized_matmul(mx.array(x), wq, scales, biases, transpose=True,
                                       group_size=32, bits=bits))
    exact = x.astype(np.float64) @ want.astype(np.float64).T
    assert np.sum((got - exact) ** 2) / np.sum(exact ** 2) < 1e-12


def test_affine_form_of_extreme_scales():
    """d as large as a half goes (-8 d and -128 d overflow float16; float32 keeps them)."""
    for t in (GGMLType.Q4_0, GGMLType.Q8_0):
        info = TYPES[int(t)]
        raw = _blocks(t, 4, 64)
        blocks = raw.reshape(-1, info.type_size)
        blocks[:, 0:2] = np.array([65504.0, -60000.0, 6e-8, 1e-3], np.float16)[
            np.arange(len(blocks)) % 4].view(np.uint8).reshape(-1, 2)
        (wq, s, b), _ = quants.affine_form(lambda a, c: raw[a:c], 4, 64, int(t),
                                           info.type_size, info.block_size)
        got = np.array(mx.dequantize(wq, s, b, group_size=32, bits=quants.AFFINE_BITS[int(t)]))
        np.testing.assert_array_equal(got, _widened(t, raw))


# ------------------------------------------------------------------ through the server


@pytest.fixture(scope="module")
def mlx_server():
    dev = H.device_named("MLX-CPU")
    srv = Server([dev], host="127.0.0.1", port=0).start()
    yield srv, dev
    srv.stop()


class _Recorder:
    """Counts ``mx.quantized_matmul`` calls and the prepared forms the MLX ArrayLib asks for."""

    def __init__(self, monkeypatch, state):
        self.qmm = 0
        self.asked: list[tuple] = []  # (span start, *key)
        self.made: list[int] = []     # byte counts of the forms made
        real_qmm, real_prepared = mx.quantized_matmul, state.prepared

        def qmm(*a, **k):
            self.qmm += 1
            return real_qmm(*a, **k)

        def prepared(buffer, span, key, make, **kw):
            self.asked.append((span[0],) + tuple(key))

            def counted():
                value, n = make()
                self.made.append(n)
                return value, n
            return real_prepared(buffer, span, key, counted, **kw)

        monkeypatch.setattr(mx, "quantized_matmul", qmm)
        monkeypatch.setattr(state, "prepared", prepared)


def _product(c, w_type, raw, xs, *, shared: bool):
    """A MUL_MAT of ``raw`` (m x k blocks) and ``xs`` (n x k); weights in their own buffer, or
    (``shared``) in the buffer the graph writes its result into. Returns (w, x, out, ptrs)."""
    m, n, k = raw.shape[0], xs.shape[0], xs.shape[1]
    if shared:
        ptr, _ = c.alloc_buffer(0, raw.nbytes + xs.nbytes + 4 * m * n + 64)
        base = c.buffer_get_base(ptr)
        wptr, wbase, xptr, xbase = ptr, base, ptr, base + raw.nbytes
        ptrs = [ptr]
    else:
        wptr, _ = c.alloc_buffer(0, raw.nbytes)
        wbase = c.buffer_get_base(wptr)
        xptr, _ = c.alloc_buffer(0, xs.nbytes + 4 * m * n + 64)
        xbase = c.buffer_get_base(xptr)
        ptrs = [wptr, xptr]
    w = make_tensor(id=1, type=int(w_type), buffer=wptr, ne=(k, m), data=wbase)
    x = make_tensor(id=2, buffer=xptr, ne=(k, n), data=xbase)
    out = make_tensor(id=3, buffer=xptr, ne=(m, n), data=xbase + xs.nbytes, op=Op.MUL_MAT,
                      src=(1, 2))
    c.set_tensor(w, 0, raw.tobytes())
    c.set_tensor(x, 0, xs.tobytes())
    return w, x, out, ptrs


def _result(c, out, m, n):
    return np.frombuffer(c.get_tensor(out, 0, 4 * m * n), np.float32).reshape(n, m)


def _nmse_vs_exact(got, xs, t, raw):
    exact = xs.astype(np.float64) @ _widened(t, raw).astype(np.float64).T
    return float(np.sum((got - exact) ** 2) / np.sum(exact ** 2))


@pytest.mark.parametrize("n", [1, 9], ids=["decode", "batch"])
@pytest.mark.parametrize("t", AFFINE, ids=_name)
def test_mul_mat_uses_the_affine_form_and_set_tensor_invalidates_it(mlx_server, monkeypatch, t, n):
    if int(t) not in quants.AFFINE_BITS:
        pytest.skip(f"this MLX has no {quants._BITS[t]}-bit quantization")
    srv, dev = mlx_server
    state = state_of(dev)
    rec = _Recorder(monkeypatch, state)
    k, m = 512, 96
    raw = _blocks(t, m, k, seed=1)
    xs = np.random.default_rng(2).standard_normal((n, k)).astype(np.float32)
    forms_before = state.prepared_count()
    with RpcClient(port=srv.port) as c:
        w, x, out, ptrs = _product(c, t, raw, xs, shared=False)
        active = mx.get_active_memory()
        c.graph_compute(0, [3], [w, x, out])
        got = _result(c, out, m, n)
        assert _nmse_vs_exact(got, xs, t, raw) < 1e-10
        # the quantized path: one quantized_matmul, one form of about the blocks' size
        assert rec.qmm == 1
        assert [key[-1] for key in rec.asked] == ["mlx-affine"]
        assert len(rec.made) == 1 and raw.nbytes <= rec.made[0] < 1.4 * raw.nbytes
        assert state.prepared_count() == forms_before + 1
        # nothing float32 the size of the weights stayed behind (the form and the result did)
        assert mx.get_active_memory() - active < rec.made[0] + 4 * m * k // 2

        c.graph_recompute(0)  # the form is reused
        np.testing.assert_array_equal(_result(c, out, m, n), got)
        assert rec.qmm == 2 and len(rec.made) == 1

        raw2 = _blocks(t, m, k, seed=3)  # new weights from the network: a new form
        c.set_tensor(w, 0, raw2.tobytes())
        c.graph_recompute(0)
        got2 = _result(c, out, m, n)
        assert _nmse_vs_exact(got2, xs, t, raw2) < 1e-10
        assert not np.allclose(got2, got)
        assert rec.qmm == 3 and len(rec.made) == 2
        assert state.prepared_count() == forms_before + 1  # the stale one was dropped

        for ptr in ptrs:
            c.free_buffer(ptr)
        c.sync()
    assert state.prepared_count() == forms_before  # freeing the buffer dropped the form


def test_bytes_a_graph_writes_get_no_lasting_form(mlx_server, monkeypatch):
    """The core sees writes from the network; a graph's writes it learns from the plan (every
    node's byte range). A weight beside the result in one buffer still gets its form; once a
    graph writes into the weight's own bytes, the form is dropped and none is made again."""
    srv, dev = mlx_server
    state = state_of(dev)
    rec = _Recorder(monkeypatch, state)
    t, k, m, n = GGMLType.Q4_0, 256, 40, 3
    raw = _blocks(t, m, k, seed=4)
    raw2 = _blocks(t, m, k, seed=6)
    xs = np.random.default_rng(5).standard_normal((n, k)).astype(np.float32)
    forms_before = state.prepared_count()
    with RpcClient(port=srv.port) as c:
        w, x, out, ptrs = _product(c, t, raw, xs, shared=True)
        c.graph_compute(0, [3], [w, x, out])
        assert _nmse_vs_exact(_result(c, out, m, n), xs, t, raw) < 1e-10
        assert rec.qmm == 1 and len(rec.made) == 1  # the result sits beside the weight
        assert state.prepared_count() == forms_before + 1
        # a graph copies new blocks over the weight (CPY of I8 bytes into an I8 view of it)
        src_ptr, _ = c.alloc_buffer(0, raw2.nbytes)
        src_base = c.buffer_get_base(src_ptr)
        src = make_tensor(id=10, type=int(GGMLType.I8), buffer=src_ptr, ne=(raw2.nbytes,),
                          data=src_base)
        over = make_tensor(id=11, type=int(GGMLType.I8), buffer=w.buffer, ne=(raw2.nbytes,),
                           data=w.data, op=Op.CPY, src=(10, 11))
        c.set_tensor(src, 0, raw2.tobytes())
        c.graph_compute(0, [11], [src, over])
        c.sync()
        assert state.prepared_count() == forms_before  # the graph's plan dropped the form
        c.graph_compute(0, [3], [w, x, out])
        assert _nmse_vs_exact(_result(c, out, m, n), xs, t, raw2) < 1e-10  # follows the bytes
        assert rec.qmm == 1 and len(rec.made) == 1  # widened in tiles: no new form
        assert state.prepared_count() == forms_before
        for ptr in ptrs + [src_ptr]:
            c.free_buffer(ptr)
        c.sync()


@pytest.mark.parametrize("t", [GGMLType.Q6_K, GGMLType.Q3_K, GGMLType.IQ4_XS, GGMLType.F16],
                         ids=_name)
def test_other_types_are_widened_a_bounded_tile_at_a_time(mlx_server, monkeypatch, t):
    """No form; MLX's peak memory while the graph runs stays far below the float32 weights
    (each tile waits for the previous tile's product), and so does the scratch accounted."""
    srv, dev = mlx_server
    state = state_of(dev)
    rec = _Recorder(monkeypatch, state)
    k, m, n = 2048, 1024, 2
    if t == GGMLType.F16:
        raw = np.random.default_rng(7).standard_normal((m, k)).astype(np.float16).view(np.uint8)
        wf = raw.view(np.float16).astype(np.float64)
    else:
        raw = _blocks(t, m, k, seed=7)
        wf = _widened(t, raw).astype(np.float64)
    xs = np.random.default_rng(8).standard_normal((n, k)).astype(np.float32)
    f32_bytes = 4 * m * k  # 8 MiB
    monkeypatch.setattr(state, "scratch_budget", 1 << 20)
    monkeypatch.setattr(state, "scratch_peak", 0)
    with RpcClient(port=srv.port) as c:
        w, x, out, ptrs = _product(c, t, raw, xs, shared=False)
        c.sync()
        mx.reset_peak_memory()
        active = mx.get_active_memory()
        c.graph_compute(0, [3], [w, x, out])
        got = _result(c, out, m, n)
        peak = mx.get_peak_memory() - active
        exact = xs.astype(np.float64) @ wf.T
        assert np.sum((got - exact) ** 2) / np.sum(exact ** 2) < 1e-10
        assert rec.qmm == 0 and rec.made == []
        assert 0 < state.scratch_peak <= state.scratch_budget
        assert peak < f32_bytes // 2, f"peak {peak} bytes while widening {f32_bytes} bytes"
        for ptr in ptrs:
            c.free_buffer(ptr)
        c.sync()


def test_mul_mat_id_uses_one_form_per_used_expert(monkeypatch):
    """MUL_MAT_ID multiplies each used expert's 2-D slice through the same hook: one form per
    expert a token chose, none for the others."""
    H.require_ggml()
    dev = H.device_named("MLX-CPU")
    state = state_of(dev)
    rec = _Recorder(monkeypatch, state)
    c_void_p = H.c_void_p
    mul_mat_id = H.fn("ggml_mul_mat_id", c_void_p, c_void_p, c_void_p, c_void_p, c_void_p)
    n_expert, k, m, n_used, n_tokens = 6, 256, 32, 2, 3
    ids = np.array([[0, 4], [4, 1], [0, 1]], np.int32)  # experts 0, 1, 4 are used
    with H.GgmlCase(seed=9) as case:
        experts = case.new_tensor(H.Q4_0, (k, m, n_expert))
        b = case.new_tensor(H.F32, (k, 1, n_tokens))
        idx = case.new_tensor(H.I32, (n_used, n_tokens), fill=ids)
        out = case.mark_output(mul_mat_id(case.ctx, experts, b, idx))
        case.check(dev, [out], max_nmse=5e-4)
    assert rec.qmm == 3
    offsets = sorted({key[0] for key in rec.asked})
    assert len(offsets) == 3 and len(rec.made) == 3
    step = offsets[1] - offsets[0]
    assert step == TYPES[int(GGMLType.Q4_0)].row_size(k) * m  # experts 0 and 1
    assert offsets[2] - offsets[0] == 4 * step                # and 4
