"""The converted-weight cache never serves stale data (values checked against NumPy)."""

import numpy as np

from rpcserver import executor
from rpcserver.client import RpcClient
from rpcserver.ggml import GGMLType, Op
from rpcserver.protocol import make_tensor


def _matmul_graph(c, ptr, base, w_type):
    # w: 8x4 weights at base, x: 8x2 activations at base+256, out: 4x2 at base+512
    w = make_tensor(id=1, type=w_type, buffer=ptr, ne=(8, 4), data=base)
    x = make_tensor(id=2, buffer=ptr, ne=(8, 2), data=base + 256)
    out = make_tensor(id=3, buffer=ptr, ne=(4, 2), data=base + 512, op=Op.MUL_MAT, src=(1, 2))
    return w, x, out


def test_weights_rewritten_between_graphs_are_reconverted(server):
    rng = np.random.default_rng(0)
    cache = executor.weight_cache(server.devices[0])
    before = cache.used  # the device may be shared with earlier tests (their entries are theirs)
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
        assert cache.used > before  # the F16 weights were cached (and invalidated twice)
        c.free_buffer(ptr)
        c.sync()
        assert cache.used == before  # freeing the buffer dropped its entries


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
