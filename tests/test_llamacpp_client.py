"""llama.cpp's own RPC client against our server -- and against llama.cpp's own server.

Every scenario runs llama.cpp's client code (libggml-rpc from llama-cpp-python
built with -DGGML_RPC=ON) in a fresh subprocess, through the ctypes harness
in ``llamacpp.py``. Each scenario is run against ``rpcserver serve`` and
against llama.cpp's ``ggml_backend_rpc_start_server`` with the same
assertions: the reference run shows the test itself is right.

A small proxy (``llamacpp.CommandCounter``) sits between client and server
and counts the commands the client sends, so the tests can tell, for
instance, a SET_TENSOR_HASH hit (no SET_TENSOR follows) from a miss.

Skipped, with the reason, where llama-cpp-python is missing or lacks RPC.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import llamacpp as h  # noqa: E402

pytestmark = [pytest.mark.llamacpp, pytest.mark.timeout(300)]

MIB = 1 << 20
CACHE_SEED = 20240607
CACHE_SIZE = 11 * MIB + 12345  # over the client's 10 MiB SET_TENSOR_HASH threshold


# ----------------------------------------------------------------------------- plumbing

@pytest.fixture(scope="module", autouse=True)
def llamacpp_rpc():
    h.skip_unless_available(libllama=False)


class Server:
    """A running server (ours or the reference) behind a command-counting proxy."""

    def __init__(self, kind: str, proc: subprocess.Popen, port: int, log: Path):
        self.kind, self.proc, self.port, self.log = kind, proc, port, log
        self.proxy = h.CommandCounter(port)

    @property
    def endpoint(self) -> str:
        return self.proxy.endpoint

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        self.proxy.close()
        h.stop(self.proc)

    def describe(self) -> str:
        status = self.proc.poll()
        state = "running" if status is None else f"exited with status {status}"
        return f"--- {self.kind} server ({state}) log, last 6000 chars ---\n{self.log_text()[-6000:]}"


def start_server(kind: str, tmp_path: Path, *, cache_dir: Path | None = None,
                 llama_cache: Path | None = None, debug: bool = False) -> Server:
    """Start ``kind`` ("rpcserver" or "reference") on a free port, behind a proxy.

    The reference server gets ``cache_dir`` as is (it is the rpc-server's
    ``$LLAMA_CACHE/rpc``); ours gets ``-c`` with ``LLAMA_CACHE=llama_cache``.
    """
    port = h.free_port()
    log = tmp_path / f"{kind}-{port}.log"
    if kind == "rpcserver":
        args, env = [], {}
        if llama_cache is not None:
            args.append("-c")
            env["LLAMA_CACHE"] = str(llama_cache)
        if debug:
            env["GGML_RPC_DEBUG"] = "1"
        proc = h.start_rpcserver(port, args, log_path=log, env=env)
    elif kind == "reference":
        proc = h.start_reference_server(port, threads=2, cache_dir=cache_dir, log_path=log)
    else:
        raise ValueError(kind)
    try:
        return Server(kind, proc, port, log)
    except BaseException:
        h.stop(proc)
        raise


def run_client(server: Server, *args) -> dict:
    """Run one client scenario against ``server``; returns its result, with the traffic."""
    before = server.proxy.snapshot()
    try:
        r = h.run_scenario(server.endpoint, *args, timeout=180)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the llama.cpp client timed out against {server.kind}\n"
                    f"{exc.stdout or ''}\n{exc.stderr or ''}\n{server.describe()}")
    server.proxy.wait_idle()
    found = [line for line in r.stdout.splitlines() if line.startswith("SCENARIO_RESULT ")]
    context = (f"client exit status {r.returncode} against {server.kind}\n"
               f"--- client stdout ---\n{r.stdout[-4000:]}\n--- client stderr ---\n"
               f"{r.stderr[-4000:]}\n{server.describe()}")
    if not found:
        pytest.fail(f"the llama.cpp client produced no result (a ggml abort?)\n{context}")
    result = json.loads(found[-1][len("SCENARIO_RESULT "):])
    result["traffic"] = server.proxy.delta(before)
    result["context"] = context
    failed = [k for k, ok in result["checks"].items() if not ok]
    assert result["ok"] and r.returncode == 0, (
        f"failed checks: {failed}; errors: {result['errors']}\n{context}")
    return result


# ----------------------------------------------------------------------------- basic scenario

_BASIC: dict[str, dict] = {}


def basic_result(kind: str, tmp_path_factory) -> dict:
    """The basic scenario's result against ``kind`` (run once per test session)."""
    if kind not in _BASIC:
        tmp = tmp_path_factory.mktemp(f"basic-{kind}")
        server = start_server(kind, tmp, debug=True)
        try:
            result = run_client(server)
            result["server_log"] = server.log_text()
        finally:
            server.stop()
        _BASIC[kind] = result
    return _BASIC[kind]


@pytest.mark.parametrize("kind", ["rpcserver", "reference"])
def test_basic_scenario(kind, tmp_path_factory):
    """Buffers, tensor set/get (full, partial, offset), copy, memset and clear, bit-exact."""
    result = basic_result(kind, tmp_path_factory)
    info, traffic = result["info"], result["traffic"]
    assert info["device_count"] >= 1
    assert info["alignment"] == 32
    assert info["max_size"] >= MIB
    assert info["buffer_size"] == MIB
    # The client's traffic is the same whichever server answers; in particular the two
    # copies went through COPY_TENSOR (a refused copy would show as extra GET/SET_TENSOR).
    assert traffic.get("COPY_TENSOR") == 2, traffic
    assert traffic.get("MEMSET_TENSOR") == 2, traffic
    assert traffic.get("BUFFER_CLEAR") == 2, traffic
    assert traffic.get("INIT_TENSOR") == 2, traffic  # the two Q8_0 tensors with ne0 % 512 != 0
    assert traffic.get("GET_ALLOC_SIZE") == 1, traffic  # the client caches it per shape
    assert traffic.get("SET_TENSOR[cache=0]") == 9 and "SET_TENSOR_HASH" not in traffic, traffic
    assert traffic.get("FREE_BUFFER") == 1 and traffic.get("ALLOC_BUFFER") == 1, traffic
    if kind == "rpcserver":
        log = result["server_log"]
        bad = [line for line in log.splitlines()
               if re.search(r"\b(ERROR|CRITICAL)\b|closing the connection|internal error|Traceback",
                            line)]
        assert not bad, "our server logged errors:\n" + "\n".join(bad) + "\n" + result["context"]
        # It answered both copies itself (copied=1), on the device.
        assert len(re.findall(r"COPY_TENSOR .* -> 1\b", log)) == 2, result["context"]


def test_servers_agree(tmp_path_factory):
    ours = basic_result("rpcserver", tmp_path_factory)
    ref = basic_result("reference", tmp_path_factory)
    o, r = ours["info"], ref["info"]
    assert o["device_count"] == r["device_count"]
    assert o["alignment"] == r["alignment"] == 32
    assert o["tensor_bytes"] == r["tensor_bytes"]
    # Memory: ours reports available memory, below the total; llama.cpp's CPU backend
    # reports free == total by design ("free system memory is ill-defined").
    assert o["memory_total"] > o["memory_free"] > 0, o
    assert r["memory_total"] >= r["memory_free"] > 0, r
    # Same machine, same physical memory (within 5%: ours may honour a cgroup limit).
    assert abs(o["memory_total"] - r["memory_total"]) <= 0.05 * r["memory_total"], (o, r)
    # The client sent the same commands to both.
    assert ours["traffic"] == ref["traffic"], (ours["traffic"], ref["traffic"])


# ----------------------------------------------------------------------------- tensor cache

def cache_payload() -> bytes:
    # The same bytes the scenario uploads (llamacpp_client_scenario.payload).
    import numpy as np

    return np.random.default_rng(CACHE_SEED).bytes(CACHE_SIZE)


def cache_name(data: bytes) -> str:
    from rpcserver.protocol import fnv1a_64

    return "%016x" % fnv1a_64(data)


def upload(server: Server) -> dict:
    result = run_client(server, "cache", CACHE_SEED, CACHE_SIZE)
    assert result["info"]["payload_size"] == CACHE_SIZE
    return result


def assert_miss(result: dict) -> None:
    """The client asked by hash, was told no, and sent the data asking the server to cache it."""
    t = result["traffic"]
    assert t.get("SET_TENSOR_HASH") == 1 and t.get("SET_TENSOR[cache=1]") == 1, (
        f"expected a cache miss, traffic {t}\n{result['context']}")
    assert t.get("SET_TENSOR") == 1, t


def assert_hit(result: dict) -> None:
    """The client asked by hash and sent no data: the server had it."""
    t = result["traffic"]
    assert t.get("SET_TENSOR_HASH") == 1 and "SET_TENSOR" not in t, (
        f"expected a cache hit, traffic {t}\n{result['context']}")


def file_id(path: Path):
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def test_cache_rpcserver(tmp_path):
    """``-c``: store on a miss, serve a hit, and survive a corrupt or truncated entry."""
    data = cache_payload()
    name = cache_name(data)
    llama_cache = tmp_path / "llama-cache"
    rpc_dir = llama_cache / "rpc"
    entry = rpc_dir / name
    server = start_server("rpcserver", tmp_path, llama_cache=llama_cache, debug=True)
    try:
        # 1. First client: a miss; the server stores the data under its FNV-1a name.
        r1 = upload(server)
        assert r1["info"].get("hash") == name
        assert_miss(r1)
        assert entry.is_file(), (sorted(p.name for p in rpc_dir.iterdir()), server.describe())
        assert [p.name for p in rpc_dir.iterdir() if not p.name.startswith(".")] == [name]
        assert entry.read_bytes() == data
        assert re.search(rf"SET_TENSOR_HASH .*hash={name} -> miss", server.log_text()), \
            server.describe()
        stored = file_id(entry)

        # 2. Second client (a new process, a new connection): a hit; nothing rewritten.
        r2 = upload(server)
        assert_hit(r2)
        assert re.search(rf"SET_TENSOR_HASH .*hash={name} -> hit", server.log_text()), \
            server.describe()
        assert file_id(entry) == stored

        # 3. A flipped byte: the server must notice, answer miss, and store the resent data.
        raw = bytearray(data)
        raw[len(raw) // 2] ^= 0xFF
        entry.write_bytes(raw)
        r3 = upload(server)  # reads back the right data: checked by the scenario
        assert_miss(r3)
        assert "corrupt" in server.log_text(), server.describe()
        assert entry.read_bytes() == data

        # 4. A truncated entry: likewise a miss, then replaced.
        entry.write_bytes(data[: len(data) // 3])
        r4 = upload(server)
        assert_miss(r4)
        assert entry.read_bytes() == data

        # 5. And a hit again.
        assert_hit(upload(server))
        log = server.log_text()
        assert len(re.findall(rf"SET_TENSOR_HASH .*hash={name} -> hit", log)) == 2, \
            server.describe()
        assert len(re.findall(rf"SET_TENSOR_HASH .*hash={name} -> miss", log)) == 3, \
            server.describe()
        assert not re.search(r"Traceback|internal error", log), server.describe()
    finally:
        server.stop()


def test_cache_reference_and_compatibility(tmp_path):
    """llama.cpp's server names the file as we do, and each server hits on the other's file."""
    data = cache_payload()
    name = cache_name(data)
    # Our server uses $LLAMA_CACHE/rpc; llama.cpp's rpc-server passes exactly that directory.
    llama_cache = tmp_path / "llama-cache"
    rpc_dir = llama_cache / "rpc"
    rpc_dir.mkdir(parents=True)
    entry = rpc_dir / name

    ref = start_server("reference", tmp_path, cache_dir=rpc_dir)
    try:
        r1 = upload(ref)
        assert_miss(r1)
        assert sorted(p.name for p in rpc_dir.iterdir()) == [name], ref.describe()
        assert entry.read_bytes() == data
        stored = file_id(entry)
        r2 = upload(ref)
        assert_hit(r2)
        assert file_id(entry) == stored
    finally:
        ref.stop()

    # Our server finds llama.cpp's file: a hit on the very first upload.
    ours = start_server("rpcserver", tmp_path, llama_cache=llama_cache, debug=True)
    try:
        assert_hit(upload(ours))
        assert file_id(entry) == stored
    finally:
        ours.stop()

    # And llama.cpp's server finds ours: written by our server after a miss.
    entry.unlink()
    ours = start_server("rpcserver", tmp_path, llama_cache=llama_cache, debug=True)
    try:
        assert_miss(upload(ours))
    finally:
        ours.stop()
    assert entry.read_bytes() == data
    ref = start_server("reference", tmp_path, cache_dir=rpc_dir)
    try:
        assert_hit(upload(ref))
    finally:
        ref.stop()
