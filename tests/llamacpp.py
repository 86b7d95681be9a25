"""A small ctypes harness over the ggml libraries shipped inside llama-cpp-python.

It drives llama.cpp's *own* RPC client (``libggml-rpc``) against a server, and
can start llama.cpp's own RPC server, so the tests can compare our server with
the reference one through the very same client code.

Two things to keep in mind when using it:

* llama.cpp's RPC client keeps one connection per endpoint in a process-wide
  dispatcher table and registers servers globally, and ggml aborts the whole
  process when a server misbehaves. Every client scenario therefore runs in a
  fresh subprocess (see ``llamacpp_client_scenario.py``).
* The reference server serves one client at a time, in a sequential accept
  loop; that is enough for one client subprocess at a time.

Nothing here loads the libraries at import time: :func:`lib` does, lazily, so
the test module can import this file and skip cleanly where llama-cpp-python
is missing or was built without the RPC backend.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import sys
import textwrap
import time
from ctypes import POINTER, c_bool, c_char_p, c_int, c_int64, c_size_t, c_uint8, c_void_p
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# enum ggml_type
GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_Q8_0 = 8
# enum ggml_backend_dev_type
GGML_BACKEND_DEVICE_TYPE_CPU = 0
# enum ggml_backend_buffer_usage
GGML_BACKEND_BUFFER_USAGE_ANY = 0
GGML_BACKEND_BUFFER_USAGE_WEIGHTS = 1
GGML_BACKEND_BUFFER_USAGE_COMPUTE = 2
#: The client sends SET_TENSOR_HASH for writes larger than this into a WEIGHTS buffer.
HASH_THRESHOLD = 10 * 1024 * 1024


class LlamaCppUnavailable(RuntimeError):
    """llama-cpp-python is not installed, or was built without the RPC backend."""


class ggml_init_params(ctypes.Structure):
    _fields_ = [("mem_size", c_size_t), ("mem_buffer", c_void_p), ("no_alloc", c_bool)]


# name: (restype, argtypes) for every function the harness calls.
_SIGNATURES = {
    # registry
    "ggml_backend_reg_count": (c_size_t, []),
    "ggml_backend_reg_get": (c_void_p, [c_size_t]),
    "ggml_backend_reg_by_name": (c_void_p, [c_char_p]),
    "ggml_backend_reg_name": (c_char_p, [c_void_p]),
    "ggml_backend_reg_dev_count": (c_size_t, [c_void_p]),
    "ggml_backend_reg_dev_get": (c_void_p, [c_void_p, c_size_t]),
    "ggml_backend_reg_get_proc_address": (c_void_p, [c_void_p, c_char_p]),
    "ggml_backend_load_all": (None, []),
    # devices
    "ggml_backend_dev_by_name": (c_void_p, [c_char_p]),
    "ggml_backend_dev_by_type": (c_void_p, [c_int]),
    "ggml_backend_dev_name": (c_char_p, [c_void_p]),
    "ggml_backend_dev_description": (c_char_p, [c_void_p]),
    "ggml_backend_dev_memory": (None, [c_void_p, POINTER(c_size_t), POINTER(c_size_t)]),
    "ggml_backend_dev_buffer_type": (c_void_p, [c_void_p]),
    # buffer types and buffers
    "ggml_backend_buft_name": (c_char_p, [c_void_p]),
    "ggml_backend_buft_get_alignment": (c_size_t, [c_void_p]),
    "ggml_backend_buft_get_max_size": (c_size_t, [c_void_p]),
    "ggml_backend_buft_alloc_buffer": (c_void_p, [c_void_p, c_size_t]),
    "ggml_backend_buffer_get_base": (c_void_p, [c_void_p]),
    "ggml_backend_buffer_get_size": (c_size_t, [c_void_p]),
    "ggml_backend_buffer_set_usage": (None, [c_void_p, c_int]),
    "ggml_backend_buffer_clear": (None, [c_void_p, c_uint8]),
    "ggml_backend_buffer_free": (None, [c_void_p]),
    # tensors
    "ggml_backend_tensor_alloc": (c_int, [c_void_p, c_void_p, c_void_p]),
    "ggml_backend_tensor_set": (None, [c_void_p, c_void_p, c_size_t, c_size_t]),
    "ggml_backend_tensor_get": (None, [c_void_p, c_void_p, c_size_t, c_size_t]),
    "ggml_backend_tensor_memset": (None, [c_void_p, c_uint8, c_size_t, c_size_t]),
    "ggml_backend_tensor_copy": (None, [c_void_p, c_void_p]),
    # ggml core
    "ggml_tensor_overhead": (c_size_t, []),
    "ggml_init": (c_void_p, [ggml_init_params]),  # the struct goes BY VALUE
    "ggml_free": (None, [c_void_p]),
    "ggml_new_tensor_1d": (c_void_p, [c_void_p, c_int, c_int64]),
    "ggml_new_tensor_2d": (c_void_p, [c_void_p, c_int, c_int64, c_int64]),
    "ggml_set_name": (c_void_p, [c_void_p, c_char_p]),
    "ggml_nbytes": (c_size_t, [c_void_p]),
}

# ggml_backend_reg_t ggml_backend_rpc_add_server(const char * endpoint)
ADD_SERVER_FN = ctypes.CFUNCTYPE(c_void_p, c_char_p)
# void ggml_backend_rpc_start_server(const char * endpoint, const char * cache_dir,
#                                    size_t n_threads, size_t n_devices, ggml_backend_dev_t * devices)
START_SERVER_FN = ctypes.CFUNCTYPE(None, c_char_p, c_char_p, c_size_t, c_size_t, POINTER(c_void_p))


def lib_dir() -> Path:
    """The directory holding llama-cpp-python's shared libraries.

    Located through the package's ``__file__`` without executing the package
    (importing it would load libllama and need its Python dependencies).
    """
    import importlib.util

    try:
        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError) as exc:
        raise LlamaCppUnavailable(f"llama_cpp is not importable: {exc}")
    if spec is None or not spec.origin:
        raise LlamaCppUnavailable("llama_cpp (llama-cpp-python) is not installed")
    d = Path(spec.origin).resolve().parent / "lib"
    if not d.is_dir():
        raise LlamaCppUnavailable(f"llama_cpp has no lib/ directory at {d}")
    return d


def _find(d: Path, stem: str) -> Path | None:
    for suffix in (".so", ".dylib", ".dll"):
        for name in (f"lib{stem}{suffix}", f"{stem}{suffix}"):
            if (d / name).exists():
                return d / name
    return None


class _Lib:
    """The loaded libraries, with every used function declared."""

    def __init__(self):
        d = lib_dir()
        self.dir = d
        self.handles = []
        mode = getattr(ctypes, "RTLD_GLOBAL", 0)
        for stem in ("ggml-base", "ggml-cpu", "ggml-rpc", "ggml"):
            path = _find(d, stem)
            if path is None:
                if stem == "ggml-rpc":
                    # RPC may be linked into libggml itself; checked through the registry below.
                    continue
                raise LlamaCppUnavailable(f"{d} lacks lib{stem}")
            self.handles.append(ctypes.CDLL(str(path), mode=mode))
        self.ggml = self.handles[-1]  # libggml: the registry; it re-exports nothing else
        self._bind()

    def _lookup(self, name):
        for h in reversed(self.handles):
            try:
                return getattr(h, name)
            except AttributeError:
                continue
        raise LlamaCppUnavailable(f"symbol {name} not found in {self.dir}")

    def _bind(self):
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = self._lookup(name)
            fn.restype = restype
            fn.argtypes = argtypes
            setattr(self, name, fn)


_LIB: _Lib | None = None


def lib() -> _Lib:
    global _LIB
    if _LIB is None:
        _LIB = _Lib()
    return _LIB


# ---------------------------------------------------------------------------- registry

def rpc_reg() -> int:
    """The RPC backend's registry entry (ggml_backend_reg_by_name("RPC"))."""
    L = lib()
    reg = L.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        L.ggml_backend_load_all()  # a GGML_BACKEND_DL build: backends are plugins
        reg = L.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        names = [L.ggml_backend_reg_name(L.ggml_backend_reg_get(i)).decode()
                 for i in range(L.ggml_backend_reg_count())]
        raise LlamaCppUnavailable(f"llama_cpp was built without the RPC backend "
                                  f"(backends: {', '.join(names) or 'none'}); "
                                  f"rebuild with CMAKE_ARGS=-DGGML_RPC=ON")
    return reg


def _proc(name: bytes, proto):
    addr = lib().ggml_backend_reg_get_proc_address(rpc_reg(), name)
    if not addr:
        raise LlamaCppUnavailable(f"the RPC backend does not export {name.decode()}")
    return proto(addr)


def add_server_fn():
    return _proc(b"ggml_backend_rpc_add_server", ADD_SERVER_FN)


def start_server_fn():
    return _proc(b"ggml_backend_rpc_start_server", START_SERVER_FN)


def add_server(endpoint: str) -> int:
    """Register a server (connects, sends HELLO and DEVICE_COUNT); returns its reg."""
    reg = add_server_fn()(endpoint.encode())
    if not reg:
        raise RuntimeError(f"ggml_backend_rpc_add_server({endpoint}) returned NULL (no devices)")
    return reg


def check_available() -> None:
    """Raise LlamaCppUnavailable unless the RPC client and server entry points are present."""
    add_server_fn()
    start_server_fn()


# ---------------------------------------------------------------------------- devices

def reg_dev_count(reg) -> int:
    return lib().ggml_backend_reg_dev_count(reg)


def reg_dev(reg, index: int = 0) -> int:
    return lib().ggml_backend_reg_dev_get(reg, index)


def dev_name(dev) -> str:
    return lib().ggml_backend_dev_name(dev).decode()


def dev_description(dev) -> str:
    return lib().ggml_backend_dev_description(dev).decode()


def dev_memory(dev) -> tuple[int, int]:
    free, total = c_size_t(0), c_size_t(0)
    lib().ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
    return free.value, total.value


def dev_buffer_type(dev) -> int:
    return lib().ggml_backend_dev_buffer_type(dev)


def buft_name(buft) -> str:
    return lib().ggml_backend_buft_name(buft).decode()


def buft_alignment(buft) -> int:
    return lib().ggml_backend_buft_get_alignment(buft)


def buft_max_size(buft) -> int:
    return lib().ggml_backend_buft_get_max_size(buft)


# ---------------------------------------------------------------------------- buffers

def alloc_buffer(buft, size: int) -> int:
    buf = lib().ggml_backend_buft_alloc_buffer(buft, size)
    if not buf:
        raise RuntimeError(f"ggml_backend_buft_alloc_buffer({size}) returned NULL")
    return buf


def buffer_base(buf) -> int:
    return lib().ggml_backend_buffer_get_base(buf) or 0


def buffer_size(buf) -> int:
    return lib().ggml_backend_buffer_get_size(buf)


def buffer_set_usage(buf, usage: int) -> None:
    lib().ggml_backend_buffer_set_usage(buf, usage)


def buffer_clear(buf, value: int) -> None:
    lib().ggml_backend_buffer_clear(buf, value)


def buffer_free(buf) -> None:
    lib().ggml_backend_buffer_free(buf)


# ---------------------------------------------------------------------------- tensors

def new_context(n_tensors: int) -> int:
    """A no_alloc ggml context with room for ``n_tensors`` tensor headers."""
    L = lib()
    params = ggml_init_params(mem_size=L.ggml_tensor_overhead() * n_tensors + 1024,
                              mem_buffer=None, no_alloc=True)
    ctx = L.ggml_init(params)
    if not ctx:
        raise RuntimeError("ggml_init failed")
    return ctx


def free_context(ctx) -> None:
    lib().ggml_free(ctx)


def new_tensor(ctx, type_: int, ne0: int, ne1: int | None = None, name: str = "") -> int:
    L = lib()
    t = (L.ggml_new_tensor_1d(ctx, type_, ne0) if ne1 is None
         else L.ggml_new_tensor_2d(ctx, type_, ne0, ne1))
    if not t:
        raise RuntimeError("ggml_new_tensor failed")
    if name:
        L.ggml_set_name(t, name.encode())
    return t


def nbytes(tensor) -> int:
    return lib().ggml_nbytes(tensor)


def tensor_alloc(buf, tensor, offset: int) -> None:
    """Place ``tensor`` at ``offset`` bytes into ``buf`` (the client then sends INIT_TENSOR if needed)."""
    status = lib().ggml_backend_tensor_alloc(buf, tensor, c_void_p(buffer_base(buf) + offset))
    if status != 0:
        raise RuntimeError(f"ggml_backend_tensor_alloc returned status {status}")


def tensor_set(tensor, data: bytes, offset: int = 0) -> None:
    lib().ggml_backend_tensor_set(tensor, data, offset, len(data))


def tensor_get(tensor, offset: int = 0, size: int | None = None) -> bytes:
    if size is None:
        size = nbytes(tensor) - offset
    out = ctypes.create_string_buffer(size)
    lib().ggml_backend_tensor_get(tensor, out, offset, size)
    return out.raw


def tensor_memset(tensor, value: int, offset: int, size: int) -> None:
    lib().ggml_backend_tensor_memset(tensor, value, offset, size)


def tensor_copy(src, dst) -> None:
    lib().ggml_backend_tensor_copy(src, dst)


# ---------------------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 60.0,
                  host: str = "127.0.0.1") -> None:
    """Wait until ``host:port`` accepts a TCP connection.

    The probe connection is closed at once without a byte sent; both servers
    take that as a client that left without a HELLO.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before "
                               f"listening on port {port}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def subprocess_env(extra: dict | None = None) -> dict:
    """The environment for child processes: unbuffered, wide (no wrapped log lines)."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "2000"  # Rich wraps log lines at the terminal width otherwise
    env.pop("GGML_RPC_DEBUG", None)
    if extra:
        env.update({k: v for k, v in extra.items() if v is not None})
    return env


def _start(cmd, port, log_path, env, timeout):
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=str(REPO))
    finally:
        if log_path:
            out.close()
    try:
        wait_for_port(port, proc, timeout)
    except BaseException:
        stop(proc)
        raise
    return proc


# The reference server runs in its own interpreter: ggml_backend_rpc_start_server never
# returns, and GGML aborts the process on errors.
_REFERENCE_SERVER = textwrap.dedent("""\
    import ctypes, sys
    sys.path.insert(0, {here!r})
    import llamacpp as h
    endpoint, cache_dir, threads = sys.argv[1], sys.argv[2] or None, int(sys.argv[3])
    L = h.lib()
    dev = L.ggml_backend_dev_by_name(b"CPU") or L.ggml_backend_dev_by_type(h.GGML_BACKEND_DEVICE_TYPE_CPU)
    if not dev:
        sys.exit("no CPU device in llama.cpp's registry")
    devices = (ctypes.c_void_p * 1)(dev)
    h.start_server_fn()(endpoint.encode(), cache_dir.encode() if cache_dir else None,
                        threads, 1, devices)
    sys.exit("ggml_backend_rpc_start_server returned")
""")


def start_reference_server(port: int, threads: int = 2, cache_dir: str | os.PathLike | None = None,
                           log_path: str | os.PathLike | None = None, timeout: float = 60.0,
                           env: dict | None = None) -> subprocess.Popen:
    """Start llama.cpp's own RPC server on 127.0.0.1:``port`` serving the CPU device.

    ``cache_dir`` is handed to the server as is (llama.cpp's rpc-server would
    pass ``$LLAMA_CACHE/rpc``); it must exist. Returns the Popen once the port
    accepts connections; the caller stops it (see :func:`stop`).
    """
    code = _REFERENCE_SERVER.format(here=str(HERE))
    cmd = [sys.executable, "-c", code, f"127.0.0.1:{port}",
           str(cache_dir) if cache_dir else "", str(threads)]
    return _start(cmd, port, log_path, subprocess_env(env), timeout)


def _source_tree_pythonpath() -> str:
    """A directory where ``rpcserver`` is this checkout's core/ (a symlink), for PYTHONPATH."""
    import tempfile

    shim = Path(tempfile.gettempdir()) / f"rpcserver-src-shim-{os.getuid()}"
    shim.mkdir(exist_ok=True)
    link = shim / "rpcserver"
    if not (link.is_symlink() and link.resolve() == (REPO / "core").resolve()):
        tmp = shim / f".rpcserver-{os.getpid()}"
        tmp.symlink_to(REPO / "core", target_is_directory=True)
        os.replace(tmp, link)
    return str(shim)


def start_rpcserver(port: int, extra_args=(), log_path: str | os.PathLike | None = None,
                    timeout: float = 60.0, env: dict | None = None) -> subprocess.Popen:
    """Start our server (``rpcserver serve``) on 127.0.0.1:``port``; returns the Popen.

    It runs the installed ``rpcserver`` package, unless ``RPCSERVER_TEST_FROM_SOURCE=1``
    is set: then this checkout's core/ is put first on the server's PYTHONPATH (the
    installed plugins still load, against that code).
    """
    cmd = [sys.executable, "-m", "rpcserver.cli", "serve", "-p", str(port), "--no-live",
           *extra_args]
    full_env = subprocess_env(env)
    if os.environ.get("RPCSERVER_TEST_FROM_SOURCE") == "1":
        paths = [_source_tree_pythonpath(), full_env.get("PYTHONPATH", "")]
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return _start(cmd, port, log_path, full_env, timeout)


def stop(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """Terminate a server started here (SIGTERM, then SIGKILL)."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


SCENARIO = HERE / "llamacpp_client_scenario.py"


def run_scenario(endpoint: str, *args, timeout: float = 180.0, env: dict | None = None):
    """Run one client scenario in a fresh process; returns the CompletedProcess."""
    cmd = [sys.executable, str(SCENARIO), endpoint, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(env), cwd=str(REPO))


# ---------------------------------------------------------------------------- traffic

#: enum rpc_cmd, by number.
COMMAND_NAMES = ["ALLOC_BUFFER", "GET_ALIGNMENT", "GET_MAX_SIZE", "BUFFER_GET_BASE", "FREE_BUFFER",
                 "BUFFER_CLEAR", "SET_TENSOR", "SET_TENSOR_HASH", "GET_TENSOR", "COPY_TENSOR",
                 "GRAPH_COMPUTE", "GET_DEVICE_MEMORY", "INIT_TENSOR", "GET_ALLOC_SIZE", "HELLO",
                 "DEVICE_COUNT", "GRAPH_RECOMPUTE", "MEMSET_TENSOR", "NONE"]
_RPC_TENSOR_SIZE = 296


class CommandCounter:
    """A TCP proxy in front of a server that counts the commands clients send through it.

    SET_TENSOR requests are also counted by their cache flag
    (``SET_TENSOR[cache=0|1]``): the flag is the byte after the rpc_tensor.
    Replies are passed through untouched. Use :meth:`wait_idle` after a client
    exits so that its last fire-and-forget commands are counted.
    """

    def __init__(self, upstream_port: int, host: str = "127.0.0.1"):
        import threading
        from collections import Counter

        self.upstream = (host, upstream_port)
        self.counts: Counter = Counter()
        self._lock = threading.Lock()
        self._active = 0
        self._threads = threading
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"{host}:{self.port}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self.counts)

    def delta(self, before: dict) -> dict:
        now = self.snapshot()
        return {k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0)}

    def wait_idle(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._active == 0:
                    return
            time.sleep(0.02)

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.close()
        except OSError:
            pass

    # -- internals

    def _accept(self):
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._active += 1
            pair = [client, server, 2]  # the sockets, and how many pumps still use them
            self._threads.Thread(target=self._requests, args=(client, server, pair),
                                 daemon=True).start()
            self._threads.Thread(target=self._replies, args=(server, client, pair),
                                 daemon=True).start()

    def _release(self, pair):
        with self._lock:
            pair[2] -= 1
            last = pair[2] == 0
        if last:
            for s in pair[:2]:
                try:
                    s.close()
                except OSError:
                    pass

    @staticmethod
    def _recv_exact(s, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = s.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise EOFError
            buf += chunk
        return bytes(buf)

    def _requests(self, src, dst, pair):
        import struct

        try:
            while True:
                head = self._recv_exact(src, 9)
                cmd, size = struct.unpack("<BQ", head)
                name = COMMAND_NAMES[cmd] if cmd < len(COMMAND_NAMES) else f"UNKNOWN_{cmd}"
                dst.sendall(head)
                left = size
                if name == "SET_TENSOR" and size > _RPC_TENSOR_SIZE:
                    first = self._recv_exact(src, _RPC_TENSOR_SIZE + 1)
                    dst.sendall(first)
                    left -= len(first)
                    name = f"SET_TENSOR[cache={first[-1]}]"
                while left:
                    chunk = src.recv(min(left, 1 << 20))
                    if not chunk:
                        raise EOFError
                    dst.sendall(chunk)
                    left -= len(chunk)
                with self._lock:
                    self.counts[name] += 1
                    if name.startswith("SET_TENSOR["):
                        self.counts["SET_TENSOR"] += 1
        except (EOFError, OSError):
            pass
        finally:
            for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
                try:
                    s.shutdown(how)
                except OSError:
                    pass
            with self._lock:
                self._active -= 1
            self._release(pair)

    def _replies(self, src, dst, pair):
        try:
            while True:
                chunk = src.recv(1 << 20)
                if not chunk:
                    break
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._release(pair)


def availability_reason(*, libllama: bool = False) -> str | None:
    """None when llama.cpp's RPC client and server can be used, else why not.

    Checked in a subprocess, so that loading the native libraries cannot take
    pytest down with it. ``libllama``: also require llama_cpp itself to import
    and report RPC support (needed to load models).
    """
    code = ("import sys\n"
            + ("import llama_cpp\n" if libllama else "")
            + "sys.path.insert(0, %r)\nimport llamacpp as h\n"
            "try:\n    h.check_available()\n"
            "except h.LlamaCppUnavailable as e:\n    print(e); sys.exit(3)\n"
            + ("if not llama_cpp.llama_supports_rpc():\n"
               "    print('llama_supports_rpc() is false'); sys.exit(3)\n" if libllama else "")
            ) % str(Path(__file__).resolve().parent)
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120)
    except subprocess.TimeoutExpired:
        return "loading llama.cpp's libraries timed out"
    if r.returncode == 3:
        return r.stdout.strip()
    if r.returncode != 0:
        return f"loading llama.cpp's libraries failed (status {r.returncode}): {r.stderr[-500:]}"
    return None


def skip_unless_available(*, libllama: bool = False) -> None:
    """pytest.skip with the reason when llama.cpp's RPC pieces cannot be used here."""
    import pytest

    why = availability_reason(libllama=libllama)
    if why:
        pytest.skip(f"llama-cpp-python with the RPC backend is needed ({why}); install it with "
                    f"CMAKE_ARGS=-DGGML_RPC=ON pip install llama-cpp-python")
