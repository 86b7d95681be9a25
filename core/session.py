"""One client connection: the handshake, the command loop, and the buffers it owns.

Every command of protocol 7.0.0 is handled here with the reference server's
framing and reply-or-no-reply behaviour (see ``protocol.COMMANDS``). Anything
malformed raises a :class:`SessionError`; the session logs one line saying
what was wrong, closes the connection and frees everything the client
allocated. Other sessions are unaffected: they own their own buffers, and a
handle from one session means nothing in another.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING

from . import ggml
from .buffers import BufferTable, SessionBuffer, TensorRef
from .errors import BoundsError, ClientGone, GraphError, ProtocolError, SessionError
from .device_state import forget_buffer, state_of
from .graph import Graph, parse_graph
from .protocol import (
    COMMAND_COUNT, COMMANDS, CONN_CAPS_SIZE, FRAME_HEADER, PROTOCOL_VERSION, SET_TENSOR_HEADER,
    SIZE, Command, RpcTensor,
)

if TYPE_CHECKING:  # pragma: no cover
    from .server import Server

log = logging.getLogger("rpcserver.session")

#: Bytes moved per device transfer call for large SET_TENSOR/GET_TENSOR payloads:
#: bounds the staging memory of devices that cannot expose host views.
TRANSFER_CHUNK = 64 << 20
_RECV_CHUNK = 1 << 20
_VERSION = "%d.%d.%d" % PROTOCOL_VERSION


def _pieces(nbytes: int):
    """(offset, size) pieces of at most TRANSFER_CHUNK bytes covering ``nbytes``."""
    for pos in range(0, nbytes, TRANSFER_CHUNK):
        yield pos, min(TRANSFER_CHUNK, nbytes - pos)


class _NoHello(ClientGone):
    """A peer that connected and closed without sending anything (a port probe)."""


class Session:
    def __init__(self, server: "Server", sock: socket.socket, peer: str, number: int):
        self.server = server
        self.sock = sock
        self.peer = peer
        self.number = number
        self.buffers = BufferTable()
        self.graphs: dict[int, Graph] = {}  # last graph computed per device, for GRAPH_RECOMPUTE
        self.debug = server.debug
        self._handlers = {
            Command.HELLO: self._hello_again,
            Command.DEVICE_COUNT: self._device_count,
            Command.ALLOC_BUFFER: self._alloc_buffer,
            Command.GET_ALIGNMENT: self._get_alignment,
            Command.GET_MAX_SIZE: self._get_max_size,
            Command.BUFFER_GET_BASE: self._buffer_get_base,
            Command.FREE_BUFFER: self._free_buffer,
            Command.BUFFER_CLEAR: self._buffer_clear,
            Command.SET_TENSOR: self._set_tensor,
            Command.SET_TENSOR_HASH: self._set_tensor_hash,
            Command.GET_TENSOR: self._get_tensor,
            Command.COPY_TENSOR: self._copy_tensor,
            Command.GRAPH_COMPUTE: self._graph_compute,
            Command.GET_DEVICE_MEMORY: self._get_device_memory,
            Command.INIT_TENSOR: self._init_tensor,
            Command.GET_ALLOC_SIZE: self._get_alloc_size,
            Command.GRAPH_RECOMPUTE: self._graph_recompute,
            Command.MEMSET_TENSOR: self._memset_tensor,
        }

    # ------------------------------------------------------------------ I/O

    def _recv_into(self, view: memoryview) -> None:
        got, n = 0, len(view)
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                raise ClientGone(f"connection closed with {n - got} of {n} expected bytes unread")
            got += k
        self.server.stats.add(bytes_in=n)

    def _recv_exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return buf

    def _recv_growing(self, n: int) -> bytearray:
        """Receive ``n`` bytes, allocating only as they arrive (``n`` is only a claim)."""
        buf = bytearray()
        while len(buf) < n:
            buf += self._recv_exact(min(_RECV_CHUNK, n - len(buf)))
        return buf

    def _send(self, *parts) -> None:
        for p in parts:
            self.sock.sendall(p)
            self.server.stats.add(bytes_out=memoryview(p).nbytes)

    def _reply(self, cmd: Command, *values) -> None:
        payload = COMMANDS[cmd].reply.pack(*values)
        self._send(SIZE.pack(len(payload)) + payload)

    def _fixed_request(self, cmd: Command, size: int) -> tuple:
        layout = COMMANDS[cmd].request
        if size != layout.size:
            raise ProtocolError(f"{cmd.name} request must be {layout.size} bytes, the client "
                                f"declared {size}")
        return layout.unpack(self._recv_exact(size))

    # ------------------------------------------------------------ lifecycle

    def run(self) -> None:
        try:
            self._handshake()
            while True:
                first = self.sock.recv(1)
                if not first:
                    log.info("%s: client disconnected", self.peer)
                    return
                self.server.stats.add(bytes_in=1)
                cmd_byte = first[0]
                (size,) = SIZE.unpack(self._recv_exact(SIZE.size))
                if cmd_byte >= COMMAND_COUNT or cmd_byte == Command.NONE:
                    raise ProtocolError(f"unknown command {cmd_byte} (protocol {_VERSION} has "
                                        f"commands 0-{COMMAND_COUNT - 2})")
                cmd = Command(cmd_byte)
                self.server.stats.command(cmd)
                try:
                    self._handlers[cmd](cmd, size)
                except SessionError as exc:
                    if not str(exc).startswith(cmd.name):
                        raise type(exc)(f"{cmd.name}: {exc}") from None
                    raise
        except _NoHello:
            pass
        except ClientGone as exc:
            log.warning("%s: client went away mid-message: %s", self.peer, exc)
        except SessionError as exc:
            self.server.stats.add(errors=1)
            log.error("%s: %s; closing the connection", self.peer, exc)
        except (ConnectionError, TimeoutError, OSError) as exc:
            if not self.server.stopping:
                log.warning("%s: connection error: %s", self.peer, exc)
        except Exception:
            self.server.stats.add(errors=1)
            log.exception("%s: internal error while serving this client; closing its connection",
                          self.peer)
        finally:
            self.close()

    def close(self) -> None:
        self.graphs.clear()
        n = len(self.buffers)
        for entry in self.buffers:
            self._release(self.buffers.pop(entry.handle))
        if n:
            log.info("%s: freed %d buffer(s) left by the client", self.peer, n)
        try:
            self.sock.close()
        except OSError:
            pass

    def _handshake(self) -> None:
        try:
            head = self._recv_exact(FRAME_HEADER.size)
        except ClientGone:
            log.info("%s: connected and left without a HELLO", self.peer)
            raise _NoHello() from None
        cmd, size = FRAME_HEADER.unpack(head)
        if cmd != Command.HELLO:
            raise ProtocolError(
                f"the first command must be HELLO ({int(Command.HELLO)}), got {cmd}; this server "
                f"speaks ggml RPC protocol {_VERSION} -- use a llama.cpp client of that protocol")
        if size != CONN_CAPS_SIZE:
            raise ProtocolError(
                f"HELLO request of {size} bytes, protocol {_VERSION} expects {CONN_CAPS_SIZE}; "
                f"this server speaks ggml RPC protocol {_VERSION} -- the client needs an upgrade "
                f"to protocol v{PROTOCOL_VERSION[0]}.x")
        self._recv_exact(size)  # the client's transport capabilities: we offer plain TCP only
        self.server.stats.command(Command.HELLO)
        self._reply(Command.HELLO, *PROTOCOL_VERSION, bytes(CONN_CAPS_SIZE))
        log.debug("%s: HELLO -> %s", self.peer, _VERSION)

    # -------------------------------------------------------------- helpers

    def _device(self, cmd: Command, index: int):
        if index >= len(self.server.scheduler):
            raise ProtocolError(f"{cmd.name}: device {index} does not exist; this server has "
                                f"{len(self.server.scheduler)} device(s)")
        return self.server.scheduler.devices[index]

    def _tensor(self, raw: bytes, *, need_buffer: bool = True) -> TensorRef:
        return self.buffers.resolve(RpcTensor.unpack(raw), need_buffer=need_buffer)

    def _release(self, entry: SessionBuffer) -> None:
        if entry.buffer is not None:
            forget_buffer(entry.buffer)
            entry.buffer.free()
        self.server.stats.buffer_freed(entry)

    def _dbg(self, fmt, *args):
        if self.debug:
            log.debug("%s: " + fmt, self.peer, *args)

    # ------------------------------------------------------------- commands

    def _hello_again(self, cmd, size):
        raise ProtocolError("HELLO is only valid as the first command of a connection")

    def _device_count(self, cmd, size):
        self._fixed_request(cmd, size)
        n = len(self.server.scheduler)
        self._dbg("DEVICE_COUNT -> %d", n)
        self._reply(cmd, n)

    def _alloc_buffer(self, cmd, size):
        index, nbytes = self._fixed_request(cmd, size)
        device = self._device(cmd, index)
        buffer = None
        if 0 < nbytes <= device.max_buffer_size:
            try:
                buffer = device.alloc_buffer(nbytes)
            except MemoryError:
                buffer = None
            if buffer is None:
                log.warning("%s: ALLOC_BUFFER of %d bytes on %s failed (out of memory); "
                            "answered remote_ptr=0", self.peer, nbytes, device.name)
                self._reply(cmd, 0, 0)
                return
        elif nbytes > device.max_buffer_size:
            log.warning("%s: ALLOC_BUFFER of %d bytes exceeds %s's max buffer size %d; answered "
                        "remote_ptr=0", self.peer, nbytes, device.name, device.max_buffer_size)
            self._reply(cmd, 0, 0)
            return
        handle, base = self.server.address_space.reserve(nbytes)
        entry = SessionBuffer(handle, base, nbytes, index, buffer)
        self.buffers.add(entry)
        self.server.stats.buffer_allocated(entry)
        self._dbg("ALLOC_BUFFER device=%d size=%d -> remote_ptr=0x%x base=0x%x",
                  index, nbytes, handle, base)
        self._reply(cmd, handle, nbytes)

    def _get_alignment(self, cmd, size):
        (index,) = self._fixed_request(cmd, size)
        alignment = self._device(cmd, index).alignment
        self._dbg("GET_ALIGNMENT device=%d -> %d", index, alignment)
        self._reply(cmd, alignment)

    def _get_max_size(self, cmd, size):
        (index,) = self._fixed_request(cmd, size)
        max_size = min(self._device(cmd, index).max_buffer_size, 2**64 - 1)
        self._dbg("GET_MAX_SIZE device=%d -> %d", index, max_size)
        self._reply(cmd, max_size)

    def _buffer_get_base(self, cmd, size):
        (handle,) = self._fixed_request(cmd, size)
        entry = self.buffers.get(handle)
        self._dbg("BUFFER_GET_BASE remote_ptr=0x%x -> 0x%x", handle, entry.base)
        self._reply(cmd, entry.base)

    def _free_buffer(self, cmd, size):
        (handle,) = self._fixed_request(cmd, size)
        entry = self.buffers.pop(handle)
        # A stored graph that reads or writes this buffer can never run again.
        for dev, graph in list(self.graphs.items()):
            if handle in graph.buffer_handles:
                del self.graphs[dev]
        self._release(entry)
        self._dbg("FREE_BUFFER remote_ptr=0x%x", handle)

    def _buffer_clear(self, cmd, size):
        handle, value = self._fixed_request(cmd, size)
        entry = self.buffers.get(handle)
        if entry.buffer is not None:
            entry.buffer.fill(0, entry.size, value)
            entry.buffer.mark_written()
        self._dbg("BUFFER_CLEAR remote_ptr=0x%x value=%d", handle, value)

    def _memset_tensor(self, cmd, size):
        raw, offset, nbytes, value = self._fixed_request(cmd, size)
        ref = self._tensor(raw)
        entry, at = self.buffers.region(ref, offset, nbytes, cmd.name)
        if nbytes:
            entry.buffer.fill(at, nbytes, value)
            entry.buffer.mark_written()
        self._dbg("MEMSET_TENSOR %s offset=%d size=%d value=%d", ref.tensor.describe(),
                  offset, nbytes, value)

    def _set_tensor(self, cmd, size):
        if size < SET_TENSOR_HEADER.size:
            raise ProtocolError(f"SET_TENSOR request of {size} bytes is shorter than its "
                                f"{SET_TENSOR_HEADER.size}-byte header")
        raw, cache_flag, offset = SET_TENSOR_HEADER.unpack(self._recv_exact(SET_TENSOR_HEADER.size))
        nbytes = size - SET_TENSOR_HEADER.size
        ref = self._tensor(raw)
        # Checked before a single data byte is read: the declared size must fit the tensor.
        entry, at = self.buffers.region(ref, offset, nbytes, cmd.name)
        self._dbg("SET_TENSOR %s offset=%d size=%d cache=%d", ref.tensor.describe(),
                  offset, nbytes, cache_flag)
        for pos, n in _pieces(nbytes):
            with entry.buffer.writer(at + pos, n) as view:
                self._recv_into(view)
        if nbytes:
            entry.buffer.mark_written()
        if cache_flag and self.server.cache is not None and nbytes:
            self.server.cache.store(self._read_bytes(entry, at, nbytes))

    def _set_tensor_hash(self, cmd, size):
        raw, offset, digest = self._fixed_request(cmd, size)
        ref = self._tensor(raw)
        cache = self.server.cache
        found = 0
        if cache is not None and offset <= ref.nbytes:
            data = cache.load(digest, max_size=ref.nbytes - offset)
            if data is not None:
                entry, at = self.buffers.region(ref, offset, len(data), cmd.name)
                if data:
                    entry.buffer.write(at, data)
                    entry.buffer.mark_written()
                found = 1
        self._dbg("SET_TENSOR_HASH %s offset=%d hash=%016x -> %s", ref.tensor.describe(),
                  offset, digest, "hit" if found else "miss")
        self._reply(cmd, found)

    def _read_bytes(self, entry: SessionBuffer, at: int, nbytes: int) -> bytes:
        """One host copy of a buffer region, read in bounded pieces."""
        parts = []
        for pos, n in _pieces(nbytes):
            with entry.buffer.reader(at + pos, n) as view:
                parts.append(bytes(view))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _get_tensor(self, cmd, size):
        raw, offset, nbytes = self._fixed_request(cmd, size)
        ref = self._tensor(raw)
        entry, at = self.buffers.region(ref, offset, nbytes, cmd.name)
        self._dbg("GET_TENSOR %s offset=%d size=%d", ref.tensor.describe(), offset, nbytes)
        self._send(SIZE.pack(nbytes))
        for pos, n in _pieces(nbytes):
            with entry.buffer.reader(at + pos, n) as view:
                self._send(view)

    def _copy_tensor(self, cmd, size):
        raw_src, raw_dst = self._fixed_request(cmd, size)
        src, dst = self._tensor(raw_src), self._tensor(raw_dst)
        nbytes = src.nbytes
        if dst.offset + nbytes > dst.buffer.size:
            raise BoundsError(f"COPY_TENSOR: writing {nbytes} bytes (the source's size) at "
                              f"0x{dst.tensor.data:x} overruns {dst.buffer.describe()}")
        copied = 0
        if src.buffer.device_index == dst.buffer.device_index:
            if nbytes:
                dst.buffer.buffer.copy_from(src.buffer.buffer, src.offset, dst.offset, nbytes)
                dst.buffer.buffer.mark_written()
            copied = 1
        self._dbg("COPY_TENSOR %s -> %s (%d bytes) -> %d", src.tensor.describe(),
                  dst.tensor.describe(), nbytes, copied)
        self._reply(cmd, copied)

    def _graph_compute(self, cmd, size):
        limit = self.server.max_graph_bytes
        if size > limit:
            raise ProtocolError(f"GRAPH_COMPUTE payload of {size} bytes exceeds the server's "
                                f"limit of {limit} bytes")
        payload = self._recv_growing(size)
        graph = parse_graph(payload, self.buffers, len(self.server.scheduler),
                            lambda entry: entry.device_index)
        self._dbg("GRAPH_COMPUTE device=%d nodes=%d tensors=%d", graph.device, len(graph.nodes),
                  len(graph.tensors))
        self.graphs.pop(graph.device, None)
        self._run_graph(graph)
        self.graphs[graph.device] = graph

    def _graph_recompute(self, cmd, size):
        (index,) = self._fixed_request(cmd, size)
        self._device(cmd, index)
        graph = self.graphs.get(index)
        if graph is None:
            raise GraphError(f"GRAPH_RECOMPUTE on device {index}: there is no stored graph (none "
                             f"was computed on this connection, or a buffer it used was freed)")
        self._dbg("GRAPH_RECOMPUTE device=%d", index)
        self._run_graph(graph)

    def _run_graph(self, graph: Graph):
        device = self.server.scheduler.devices[graph.device]
        try:
            self.server.scheduler.run(graph.device, device.graph_compute, graph)
        except SessionError:
            self.graphs.pop(graph.device, None)
            raise
        except Exception as exc:
            self.graphs.pop(graph.device, None)
            raise GraphError(f"graph on {device.name} failed: {type(exc).__name__}: {exc}") from exc
        self.server.stats.add(graphs=1)

    def _get_device_memory(self, cmd, size):
        (index,) = self._fixed_request(cmd, size)
        device = self._device(cmd, index)
        free, total = device.memory()
        free = state_of(device).reported_free(free)
        self._dbg("GET_DEVICE_MEMORY device=%d -> free=%d total=%d", index, free, total)
        self._reply(cmd, free, total)

    def _init_tensor(self, cmd, size):
        (raw,) = self._fixed_request(cmd, size)
        ref = self._tensor(raw, need_buffer=False)
        if ref.buffer is None:
            log.warning("%s: INIT_TENSOR for %s without a buffer; ignored", self.peer,
                        ref.tensor.describe())
            return
        device = self.server.scheduler.devices[ref.buffer.device_index]
        if ref.buffer.buffer is not None:
            device.init_tensor(ref.buffer.buffer, ref.offset, ref.tensor)
        self._dbg("INIT_TENSOR %s", ref.tensor.describe())

    def _get_alloc_size(self, cmd, size):
        index, raw, *_srcs = self._fixed_request(cmd, size)
        device = self._device(cmd, index)
        tensor = RpcTensor.unpack(raw)
        if tensor.is_null:
            raise ProtocolError("GET_ALLOC_SIZE for a null tensor")
        try:
            ggml.check_shape(tensor.type, tensor.ne)
        except ValueError as exc:
            raise BoundsError(f"GET_ALLOC_SIZE: {exc}") from None
        alloc = device.alloc_size(tensor)
        self._dbg("GET_ALLOC_SIZE device=%d %s -> %d", index, tensor.describe(), alloc)
        self._reply(cmd, alloc)

