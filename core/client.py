"""A Python client for the ggml RPC protocol 7.0.0.

It speaks to rpcserver and to llama.cpp's own ``rpc-server`` alike. Every
method maps to one command; layouts come from ``protocol.COMMANDS``.
"""

from __future__ import annotations

import socket

from .errors import ClientGone
from .protocol import (
    COMMANDS, CONN_CAPS_SIZE, FRAME_HEADER, SET_TENSOR_HEADER, SIZE, Command, RpcTensor,
    pack_graph,
)


class RpcError(Exception):
    """The server replied with something the protocol does not allow, or closed the connection."""


class RpcClient:
    def __init__(self, host: str = "127.0.0.1", port: int = 50052, *, timeout: float | None = 60,
                 hello: bool = True):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.version = None
        if hello:
            self.version = self.hello()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- raw framing (public so tests can send malformed traffic) --------

    def send_frame(self, cmd: int, payload: bytes = b"", declared_size: int | None = None):
        size = len(payload) if declared_size is None else declared_size
        self.sock.sendall(FRAME_HEADER.pack(cmd, size) + payload)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                raise ClientGone(f"server closed the connection ({got} of {n} bytes received)")
            got += k
        return bytes(buf)

    def recv_reply(self, expected: int | None = None) -> bytes:
        (size,) = SIZE.unpack(self.recv_exact(SIZE.size))
        if expected is not None and size != expected:
            raise RpcError(f"reply of {size} bytes, expected {expected}")
        return self.recv_exact(size)

    def call(self, cmd: Command, *values):
        spec = COMMANDS[cmd]
        self.send_frame(cmd, spec.request.pack(*values))
        if spec.reply is None:
            return None
        return spec.reply.unpack(self.recv_reply(spec.reply.size))

    # -- commands ---------------------------------------------------------

    def hello(self) -> tuple[int, int, int]:
        major, minor, patch, _caps = self.call(Command.HELLO, bytes(CONN_CAPS_SIZE))
        return major, minor, patch

    def device_count(self) -> int:
        return self.call(Command.DEVICE_COUNT)[0]

    def alloc_buffer(self, device: int, size: int) -> tuple[int, int]:
        return self.call(Command.ALLOC_BUFFER, device, size)

    def get_alignment(self, device: int) -> int:
        return self.call(Command.GET_ALIGNMENT, device)[0]

    def get_max_size(self, device: int) -> int:
        return self.call(Command.GET_MAX_SIZE, device)[0]

    def buffer_get_base(self, remote_ptr: int) -> int:
        return self.call(Command.BUFFER_GET_BASE, remote_ptr)[0]

    def free_buffer(self, remote_ptr: int) -> None:
        self.call(Command.FREE_BUFFER, remote_ptr)

    def buffer_clear(self, remote_ptr: int, value: int) -> None:
        self.call(Command.BUFFER_CLEAR, remote_ptr, value)

    def memset_tensor(self, tensor: RpcTensor, offset: int, size: int, value: int) -> None:
        self.call(Command.MEMSET_TENSOR, tensor.pack(), offset, size, value)

    def set_tensor(self, tensor: RpcTensor, offset: int, data, cache: bool = False) -> None:
        header = SET_TENSOR_HEADER.pack(tensor.pack(), int(cache), offset)
        data = memoryview(data).cast("B")
        self.sock.sendall(FRAME_HEADER.pack(Command.SET_TENSOR, len(header) + len(data)) + header)
        self.sock.sendall(data)

    def set_tensor_hash(self, tensor: RpcTensor, offset: int, digest: int) -> bool:
        return bool(self.call(Command.SET_TENSOR_HASH, tensor.pack(), offset, digest)[0])

    def get_tensor(self, tensor: RpcTensor, offset: int, size: int) -> bytes:
        self.send_frame(Command.GET_TENSOR, COMMANDS[Command.GET_TENSOR].request.pack(
            tensor.pack(), offset, size))
        return self.recv_reply(size)

    def copy_tensor(self, src: RpcTensor, dst: RpcTensor) -> bool:
        return bool(self.call(Command.COPY_TENSOR, src.pack(), dst.pack())[0])

    def graph_compute(self, device: int, nodes: list[int], tensors: list[RpcTensor]) -> None:
        self.send_frame(Command.GRAPH_COMPUTE, pack_graph(device, nodes, tensors))

    def graph_recompute(self, device: int) -> None:
        self.call(Command.GRAPH_RECOMPUTE, device)

    def get_device_memory(self, device: int) -> tuple[int, int]:
        return self.call(Command.GET_DEVICE_MEMORY, device)

    def init_tensor(self, tensor: RpcTensor) -> None:
        self.call(Command.INIT_TENSOR, tensor.pack())

    def get_alloc_size(self, device: int, tensor: RpcTensor, srcs=()) -> int:
        from .protocol import NULL_TENSOR

        packed = [s.pack() for s in srcs] + [NULL_TENSOR.pack()] * (10 - len(srcs))
        return self.call(Command.GET_ALLOC_SIZE, device, tensor.pack(), *packed)[0]

    def sync(self) -> None:
        """Wait until every command sent so far has been processed (a cheap round trip)."""
        self.device_count()


