"""rpc_tensor decoding and ggml_nbytes: values worked out by hand."""

import numpy as np

from rpcserver import ggml
from rpcserver.client import RpcClient
from rpcserver.protocol import RPC_TENSOR_SIZE, RpcTensor, make_tensor

F32 = ggml.TYPES[ggml.GGMLType.F32]
Q4_0 = ggml.TYPES[ggml.GGMLType.Q4_0]


def test_rpc_tensor_round_trip_gives_python_ints():
    t = make_tensor(id=7, type=1, buffer=3, ne=(1048576, 2048), nb=(2, 2097152, 2**31, 2**31),
                    op=29, op_params=(-1, 5), src=(9, 10), data=2**40, name="w")
    raw = t.pack()
    assert len(raw) == RPC_TENSOR_SIZE == 296
    for decoded in (RpcTensor.unpack(raw), RpcTensor.unpack_array(raw * 2, 2)[1]):
        assert decoded == t
        for field in (decoded.ne, decoded.nb, decoded.op_params, decoded.src):
            assert all(type(v) is int for v in field)


def test_nbytes_does_not_wrap_at_32_bits():
    # 1M x 2048 F32 = 8 GiB: (ne0-1)*4 + (ne1-1)*nb1 + 4 = 2048 * 4 MiB
    t = RpcTensor.unpack(make_tensor(ne=(1048576, 2048), nb=(4, 4194304, 0, 0)).pack())
    assert ggml.nbytes(F32, t.ne, t.nb) == 8 << 30
    # blocked type: ne0 * nb0 / block + (ne1-1) * nb1 = 64 * 18 / 32 + 2 * 36
    assert ggml.nbytes(Q4_0, (64, 3, 1, 1), (18, 36, 108, 108)) == 36 + 72
    assert ggml.nbytes(F32, (0, 3, 1, 1), (4, 0, 0, 0)) == 0


def test_tensor_whose_extent_exceeds_32_bits_is_refused(server, caplog):
    # A 4 MiB buffer and a tensor claiming 1M x 4097 floats (16 GiB of extent) at its base.
    with RpcClient(port=server.port) as c:
        ptr, _ = c.alloc_buffer(0, 4 << 20)
        base = c.buffer_get_base(ptr)
        t = make_tensor(buffer=ptr, ne=(1048576, 4097), nb=(4, 4 << 20, 0, 0), data=base)
        c.set_tensor(t, 0, np.zeros(4, np.float32).tobytes())
        try:
            c.device_count()
            closed = False
        except (ConnectionError, OSError, Exception):
            closed = True
    assert closed
    assert "lies outside" in caplog.text
