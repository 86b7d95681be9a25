"""The TCP server: accepts connections and runs one :class:`Session` per client, concurrently.

llama.cpp's main host may hold several connections to one server during a
run, and several hosts may share a server; each connection is a session on
its own thread. Device work goes through the :class:`Scheduler`.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from .buffers import AddressSpace, SessionBuffer
from .cache import LocalCache
from .device import Device
from .protocol import Command
from .scheduler import Scheduler
from .session import Session

log = logging.getLogger("rpcserver.server")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50052
DEFAULT_MAX_GRAPH_BYTES = 1 << 30


@dataclass
class Stats:
    """Server-wide counters (shown live by the console, read by tests)."""

    started: float = field(default_factory=time.monotonic)
    connections_total: int = 0
    connections_open: int = 0
    commands: Counter = field(default_factory=Counter)
    bytes_in: int = 0
    bytes_out: int = 0
    graphs: int = 0
    errors: int = 0
    buffers_open: int = 0
    bytes_allocated: Counter = field(default_factory=Counter)  # device index -> bytes
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def command(self, cmd: Command) -> None:
        with self._lock:
            self.commands[cmd.name] += 1

    def add(self, **counts: int) -> None:
        """Add to counters by name (bytes_in=..., graphs=...), atomically across sessions."""
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def buffer_allocated(self, entry: SessionBuffer) -> None:
        with self._lock:
            self.buffers_open += 1
            self.bytes_allocated[entry.device_index] += entry.size

    def buffer_freed(self, entry: SessionBuffer) -> None:
        with self._lock:
            self.buffers_open -= 1
            self.bytes_allocated[entry.device_index] -= entry.size


class Server:
    def __init__(self, devices: list[Device], host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 cache: LocalCache | None = None, debug: bool = False,
                 max_graph_bytes: int = DEFAULT_MAX_GRAPH_BYTES):
        if not devices:
            raise ValueError("a server needs at least one device")
        self.scheduler = Scheduler(devices)
        self.host, self.port = host, port
        self.cache = cache
        self.debug = debug
        self.max_graph_bytes = max_graph_bytes
        self.address_space = AddressSpace()
        self.stats = Stats()
        self.stopping = False
        self._sessions: set[Session] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._numbers = 0

    @property
    def devices(self) -> list[Device]:
        return self.scheduler.devices

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def bind(self) -> None:
        """Open the listening socket (port 0 picks a free port, stored in ``self.port``)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(16)
        sock.settimeout(0.25)  # lets the accept loop notice stop()
        self.port = sock.getsockname()[1]
        self._listener = sock

    def start(self) -> "Server":
        """Bind if needed and accept clients on a background thread."""
        if self._listener is None:
            self.bind()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="accept", daemon=True)
        self._accept_thread.start()
        return self

    def serve_forever(self) -> None:
        if self._listener is None:
            self.bind()
        self._accept_loop()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self.stopping:
            try:
                conn, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self.stopping:
                    return
                raise
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = f"{addr[0]}:{addr[1]}"
            with self._lock:
                self._numbers += 1
                session = Session(self, conn, peer, self._numbers)
                self._sessions.add(session)
                self.stats.connections_total += 1
                self.stats.connections_open += 1
            log.info("%s: accepted client connection", peer)
            threading.Thread(target=self._serve, args=(session,), name=f"session-{peer}",
                             daemon=True).start()

    def _serve(self, session: Session) -> None:
        try:
            session.run()
        finally:
            with self._lock:
                self._sessions.discard(session)
                self.stats.connections_open -= 1
            log.info("%s: client connection closed", session.peer)

    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._sessions)

    def stop(self) -> None:
        """Stop accepting, disconnect every client (freeing their buffers), stop device workers."""
        self.stopping = True
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass
        for s in self.sessions():
            try:
                s.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        while self.sessions() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.scheduler.stop()
        for d in self.devices:
            try:
                d.close()
            except Exception:  # closing must not mask shutdown
                log.exception("closing device %s", d.name)
