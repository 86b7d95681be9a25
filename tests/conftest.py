"""Shared fixtures and helpers for the protocol-level tests.

* ``server``: an in-process :class:`rpcserver.server.Server` on 127.0.0.1, port 0,
  serving one device, parametrized over ``SERVER_DEVICES`` (the CPU plugin's ``CPU``, and
  ``CUDA-host``: the CUDA plugin on the host stand-in); stopped at teardown. Its
  teardown fails the test if the server logged an internal error (an
  unexpected exception in a handler) during the test.
* ``connect``: a factory of :class:`rpcserver.client.RpcClient` connected to
  ``server``; every client it made is closed at teardown. Each client gets a
  ``peer`` attribute, the "host:port" string the server uses in its log lines.
* ``bystander``: a second, well-behaved client holding one buffer with known
  contents, for the hostile tests: ``bystander.check()`` proves it still works.
* ``device``: parametrized over ``ggml_harness.DEVICE_NAMES`` (``CPU``, ``MLX-CPU``): the op
  conformance suites use it so that every case runs on every device.

Plain helpers (import them with ``from conftest import ...``):
``wait_until``, ``assert_closed_by_server``, ``expect_closed``, ``send_quietly``,
``peer_log``.
"""

from __future__ import annotations

import logging
import os
import socket
import time

import numpy as np
import pytest

import ggml_harness

from rpcserver.client import RpcClient
from rpcserver.errors import ClientGone
from rpcserver.ggml import GGMLType
from rpcserver.protocol import make_tensor
from rpcserver.server import Server

CLIENT_TIMEOUT = 10.0

# The CPU plugin computes a case with the shared code while its kernel is still compiling in
# the background; the suites check the kernels, so here requests wait for them.
os.environ.setdefault("RPCSERVER_CPU_WAIT_FOR_KERNELS", "1")


# --------------------------------------------------------------------------- helpers


def wait_until(pred, timeout: float = 5.0, interval: float = 0.005):
    """Poll ``pred()`` until it returns something truthy (returned) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def assert_closed_by_server(client: RpcClient, timeout: float = 5.0) -> bytes:
    """Assert the server closes ``client``'s connection within ``timeout`` seconds.

    Whatever the server still sent before closing is drained and returned. EOF,
    ClientGone and a connection reset all count as "closed"; a timeout fails the test.
    """
    sock = client.sock
    deadline = time.monotonic() + timeout
    drained = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"the server did not close the connection of {getattr(client, 'peer', '?')} "
                        f"within {timeout}s ({len(drained)} bytes received meanwhile)")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(1 << 16)
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, ClientGone):
            return bytes(drained)
        except (socket.timeout, TimeoutError):
            continue  # loop once more to report the failure with the byte count
        if not chunk:
            return bytes(drained)
        drained += chunk


def send_quietly(client: RpcClient, data: bytes) -> None:
    """sendall, ignoring the errors a socket gives once the server has closed it."""
    try:
        client.sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
        pass


def peer_log(caplog, peer: str, level: int = logging.DEBUG) -> list[logging.LogRecord]:
    """The records of the current test that mention ``peer`` at ``level`` or above."""
    return [r for r in caplog.get_records("call")
            if r.levelno >= level and peer in r.getMessage()]


def _format_records(records) -> str:
    return "\n".join(f"  {r.levelname} {r.name}: {r.getMessage()}" for r in records) or "  (none)"


def find_log_line(caplog, peer: str, needles, *, level: int = logging.WARNING,
                  timeout: float = 5.0, any_of=()) -> str | None:
    """A log line about ``peer`` at ``level``+ containing every needle (and one of ``any_of``)."""

    def match():
        for r in peer_log(caplog, peer, level):
            msg = r.getMessage()
            if all(n in msg for n in needles) and (not any_of or any(a in msg for a in any_of)):
                return msg
        return None

    return wait_until(match, timeout) or None


def expect_closed(client: RpcClient, caplog, *needles, level: int = logging.WARNING,
                  any_of=(), timeout: float = 5.0) -> str:
    """The server closes ``client`` and logs ONE line (about this peer, at ``level`` or above)
    that contains every string in ``needles`` (and at least one of ``any_of``). Returns the line."""
    assert_closed_by_server(client, timeout)
    # The session logs its reason before it closes the socket: a short grace period is plenty.
    line = find_log_line(caplog, client.peer, needles, level=level, any_of=any_of, timeout=0.2)
    if line is None:
        want = " and ".join(repr(n) for n in needles)
        if any_of:
            want += " and one of " + ", ".join(repr(a) for a in any_of)
        pytest.fail(f"connection closed, but no log line at {logging.getLevelName(level)}+ about "
                    f"{client.peer} contains {want}; the lines about it were:\n"
                    + _format_records(peer_log(caplog, client.peer)))
    return line


def internal_errors(caplog, when: str = "call") -> list[logging.LogRecord]:
    return [r for r in caplog.get_records(when)
            if r.name.startswith("rpcserver") and (r.exc_info or "internal error" in r.getMessage())]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(params=ggml_harness.DEVICE_NAMES)
def device(request):
    """Each device the op conformance suites run on (ggml_harness.DEVICE_NAMES): the test runs
    once per device, and ``GgmlCase.run_ours()`` defaults to it. A device whose plugin is not
    installed fails the test (the test run must install it), it is never skipped."""
    dev = ggml_harness.device_named(request.param)
    ggml_harness.set_device_under_test(dev)
    yield dev
    ggml_harness.set_device_under_test(None)


#: the devices the protocol-level tests (``server``) run against: the CPU plugin's, and the
#: CUDA plugin's buffers and transfers on the host stand-in (ggml_harness.HOST_CUDA)
SERVER_DEVICES = ("CPU", ggml_harness.HOST_CUDA)


@pytest.fixture(params=SERVER_DEVICES)
def server(request, caplog):
    caplog.set_level(logging.INFO, logger="rpcserver")
    dev = ggml_harness.device_named(request.param)
    srv = Server([dev], host="127.0.0.1", port=0).start()
    srv.device_name = request.param
    yield srv
    srv.stop()
    bad = internal_errors(caplog, "call")
    if bad:
        pytest.fail("the server hit an internal error (an unexpected exception, not a clean "
                    "rejection) during this test:\n" + _format_records(bad))


@pytest.fixture
def connect(server):
    clients: list[RpcClient] = []

    def make(*, hello: bool = True, timeout: float = CLIENT_TIMEOUT) -> RpcClient:
        client = RpcClient(port=server.port, timeout=timeout, hello=hello)
        host, port = client.sock.getsockname()[:2]
        client.peer = f"{host}:{port}"
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.close()


class Bystander:
    """A well-behaved client connected alongside a hostile one."""

    SIZE = 4096

    def __init__(self, server: Server, client: RpcClient):
        self.server = server
        self.client = client
        self.handle, size = client.alloc_buffer(0, self.SIZE)
        assert self.handle != 0 and size == self.SIZE
        self.base = client.buffer_get_base(self.handle)
        self.tensor = make_tensor(id=0xB0B, type=GGMLType.I8, buffer=self.handle,
                                  ne=(self.SIZE,), data=self.base, name="bystander")
        self.data = np.random.default_rng(1234).integers(0, 256, self.SIZE, np.uint8).tobytes()
        client.set_tensor(self.tensor, 0, self.data)
        assert client.get_tensor(self.tensor, 0, self.SIZE) == self.data

    @property
    def buffers(self) -> int:
        return 1

    def check(self) -> None:
        """Own data intact, a full alloc/set/get/free round trip, and nothing leaked server-wide."""
        c = self.client
        assert c.get_tensor(self.tensor, 0, self.SIZE) == self.data, "bystander's buffer was altered"
        handle, size = c.alloc_buffer(0, 1 << 16)
        assert handle != 0 and size == 1 << 16
        base = c.buffer_get_base(handle)
        t = make_tensor(id=0xB0C, type=GGMLType.F32, buffer=handle, ne=(1 << 14,), data=base)
        payload = np.arange(1 << 14, dtype=np.float32).tobytes()
        c.set_tensor(t, 0, payload)
        assert c.get_tensor(t, 0, len(payload)) == payload
        c.free_buffer(handle)
        c.sync()
        stats = self.server.stats
        assert wait_until(lambda: stats.connections_open == 1 and stats.buffers_open == self.buffers), (
            f"after the hostile client left: connections_open={stats.connections_open} "
            f"buffers_open={stats.buffers_open}, expected 1 connection and {self.buffers} buffer")
        assert stats.bytes_allocated[0] == self.SIZE


@pytest.fixture
def bystander(server, connect) -> Bystander:
    return Bystander(server, connect())
