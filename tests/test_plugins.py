"""Backend plugins: discovery, a third-party device served end to end, failure containment,
and the command line around them.

These tests need the example plugin in tests/thirdparty_plugin installed as a real
distribution (``pip install ./tests/thirdparty_plugin``); they fail, not skip, when it
is missing, because then the plugin system is not being tested at all.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from importlib import metadata
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np  # loads NumPy's BLAS, so threadpoolctl has pools to report
import psutil
import pytest
from rpcserver import cli, plugins
from rpcserver.client import RpcClient
from rpcserver.device import Backend, DeviceOptions, DeviceType
from rpcserver.device_state import state_of
from rpcserver.errors import ClientGone
from rpcserver.ggml import Op
from rpcserver.hookspecs import ENTRY_POINT_GROUP, hookimpl
from rpcserver.protocol import COMMANDS, Command, make_tensor
from rpcserver.server import Server

MIB = 1024 * 1024
EXAMPLE_DIST = "rpcserver-example-plugin"
CPU_DIST = "rpcserver-cpu"
F32 = 0


# ---------------------------------------------------------------- helpers

def require_example():
    """Fail (never skip) unless the example plugin is installed as a distribution."""
    problem = None
    if importlib.util.find_spec("rpcserver_example") is None:
        problem = "the module rpcserver_example is not importable"
    elif not any(ep.name == "example" for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)):
        problem = f"no 'example' entry point in the {ENTRY_POINT_GROUP!r} group"
    if problem:
        pytest.fail(f"{problem}: the test run must install the example plugin first, with "
                    f"`pip install ./tests/thirdparty_plugin` (the CI script does this)",
                    pytrace=False)


def real_entry_points():
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(**extra) -> dict:
    env = dict(os.environ)
    for var in ("FORCE_COLOR", "GGML_RPC_DEBUG", "LLAMA_CACHE"):
        env.pop(var, None)
    env.update(COLUMNS="200", PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    env.update(extra)
    return env


def run_cli(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rpcserver.cli", *args], capture_output=True,
                          text=True, encoding="utf-8", env=env or cli_env(), timeout=timeout)


def table_rows(text: str) -> dict[str, list[str]]:
    """Rows of a Rich table printed without a terminal, keyed by their first cell."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            rows[cells[0]] = cells
    return rows


class ServerProcess:
    """``rpcserver serve`` in a subprocess, with stdout and stderr collected as they arrive."""

    def __init__(self, *args, env=None):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rpcserver.cli", "serve", *args], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, encoding="utf-8", env=env or cli_env())
        self._text = {"stdout": "", "stderr": ""}
        self._cond = threading.Condition()
        self._readers = [threading.Thread(target=self._pump, args=(name, getattr(self.proc, name)),
                                          daemon=True) for name in self._text]
        for t in self._readers:
            t.start()

    def _pump(self, name, stream):
        for line in stream:
            with self._cond:
                self._text[name] += line
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def stdout(self) -> str:
        with self._cond:
            return self._text["stdout"]

    @property
    def stderr(self) -> str:
        with self._cond:
            return self._text["stderr"]

    def wait_for(self, stream: str, pattern: str, timeout: float = 30) -> re.Match:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = re.search(pattern, self._text[stream])
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not any(
                        t.is_alive() for t in self._readers)):
                    raise AssertionError(
                        f"{pattern!r} never appeared on {stream} (exit code {self.proc.poll()})\n"
                        f"--- stdout\n{self._text['stdout']}\n--- stderr\n{self._text['stderr']}")
                self._cond.wait(min(left, 0.2))

    def wait_banner(self) -> str:
        self.wait_for("stdout", r"Starting RPC server v7\.0\.0(?s:.*)╰")
        return self.stdout

    def wait_ready(self, port: int) -> None:
        """Block until the accept loop runs (a HELLO answered).

        cmd_serve prints the banner *before* installing its SIGINT/SIGTERM handlers and
        starting the accept loop; a HELLO round trip proves both have happened.
        """
        deadline = time.monotonic() + 30
        while True:
            try:
                with RpcClient("127.0.0.1", port, timeout=10) as c:
                    assert c.version == (7, 0, 0)
                    return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise

    def stop(self, sig=signal.SIGTERM, timeout: float = 10) -> int:
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=timeout)
        for t in self._readers:
            t.join(timeout=5)
        return rc

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def serve_process():
    started = []

    def start(*args, env=None):
        p = ServerProcess(*args, env=env)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()


# ------------------------------------------- (a) discovery and the CLI listings

def test_example_plugin_is_installed():
    require_example()
    import rpcserver_example

    # the installed distribution, not a stray copy on sys.path
    assert metadata.version(EXAMPLE_DIST) == "0.1.0"
    ep = next(ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == "example")
    assert ep.value == "rpcserver_example"
    assert ep.load() is rpcserver_example


def test_discover_finds_cpu_and_example_devices():
    require_example()
    registry = plugins.discover()
    by_name = {p.name: p for p in registry.plugins}
    assert by_name["cpu"].distribution == CPU_DIST
    assert by_name["cpu"].version == metadata.version(CPU_DIST)
    assert by_name["example"].distribution == EXAMPLE_DIST
    assert by_name["example"].version == metadata.version(EXAMPLE_DIST) == "0.1.0"
    assert by_name["cpu"].error is None and by_name["example"].error is None
    assert [b.name for b in by_name["example"].backends] == ["example"]

    cpu, example = registry.find("CPU"), registry.find("EXAMPLE0")
    assert cpu is not None and example is not None, registry.device_names()
    assert cpu.plugin is by_name["cpu"] and cpu.backend.name == "cpu"
    assert example.plugin is by_name["example"] and example.backend.name == "example"
    assert registry.find("example0") is example  # device names match case-insensitively
    assert example.device.type == DeviceType.CPU
    free, total = example.device.memory()
    assert free == total == 256 * MIB


def test_cli_plugins_lists_cpu_and_example_with_versions():
    require_example()
    res = run_cli("plugins")
    assert res.returncode == 0, res.stderr
    rows = table_rows(res.stdout)
    assert rows["cpu"][1:5] == [CPU_DIST, metadata.version(CPU_DIST), "cpu", "loaded"], res.stdout
    assert rows["example"][1:5] == [EXAMPLE_DIST, "0.1.0", "example", "loaded"], res.stdout


def test_cli_list_devices_shows_cpu_memory_and_example():
    require_example()
    res = run_cli("list-devices")
    assert res.returncode == 0, res.stderr
    rows = table_rows(res.stdout)
    assert "CPU" in rows and "EXAMPLE0" in rows, res.stdout
    _, plugin, dtype, _desc, total, free = rows["CPU"]
    assert plugin == f"cpu {metadata.version(CPU_DIST)}"
    assert dtype == "cpu"
    assert int(total) == psutil.virtual_memory().total // MIB
    assert 0 < int(free) <= int(total)
    _, plugin, dtype, desc, total, free = rows["EXAMPLE0"]
    assert plugin == "example 0.1.0"
    assert dtype == "cpu" and "bytearray" in desc
    assert (int(total), int(free)) == (256, 256)
    assert "backends without devices" not in res.stdout


def test_the_plugin_api_is_one_documented_module():
    """rpcserver.api exports the plugin API: every name resolves, every class and function
    carries its own docstring, docs/plugins.md's table lists exactly these names, and the
    example plugin imports nothing else from rpcserver."""
    import re

    import rpcserver.api as api

    root = Path(__file__).resolve().parent.parent
    for name in api.__all__:
        obj = getattr(api, name)  # AttributeError: exported but missing
        if callable(obj):
            assert obj.__doc__ and obj.__doc__.strip(), f"rpcserver.api.{name} has no docstring"
    doc = (root / "docs" / "plugins.md").read_text(encoding="utf-8")
    table = doc.split("<!-- api-names", 1)[1].split("\n\n", 1)[0]
    listed = set()
    for line in table.splitlines()[3:]:
        listed.update(re.findall(r"`([A-Za-z_]+)`", line.split("|")[1]))
    assert listed == set(api.__all__), (f"documented but not exported: {listed - set(api.__all__)}; "
                                        f"exported but not documented: {set(api.__all__) - listed}")
    source = (root / "tests" / "thirdparty_plugin" / "rpcserver_example" / "__init__.py").read_text()
    imports = re.findall(r"^\s*(?:from|import) (rpcserver[\w.]*)", source, re.M)
    assert imports and set(imports) == {"rpcserver.api"}, imports


def test_plugins_doc_includes_the_example_plugin_verbatim():
    """docs/plugins.md shows the example plugin; it must be the code that is tested here."""
    root = Path(__file__).resolve().parent.parent
    doc = (root / "docs" / "plugins.md").read_text(encoding="utf-8")
    for rel, lang in [("pyproject.toml", "toml"), ("rpcserver_example/__init__.py", "python")]:
        source = (root / "tests" / "thirdparty_plugin" / rel).read_text(encoding="utf-8")
        assert f"```{lang}\n{source}```" in doc, (
            f"docs/plugins.md does not contain tests/thirdparty_plugin/{rel} verbatim")


# ------------------------------------- (b) a third-party device served end to end

def test_example_device_round_trip():
    require_example()
    import rpcserver_example

    registry = plugins.discover()
    devices = cli.select_devices(registry, "EXAMPLE0")  # what `serve -d EXAMPLE0` serves
    assert [d.name for d in devices] == ["EXAMPLE0"]
    server = Server(devices, port=0).start()
    try:
        _round_trip(server, rpcserver_example)
    finally:
        server.stop()


def _round_trip(server, rpcserver_example):
    device = server.devices[0]
    n = 1024
    size = 4 * n
    data = np.arange(n, dtype=np.float32)
    with RpcClient("127.0.0.1", server.port) as c:
        assert c.version == (7, 0, 0)
        assert c.device_count() == 1
        assert c.get_alignment(0) == 32
        assert c.get_max_size(0) == 256 * MIB
        # the core keeps the scratch budget out of the free figure: 1/8 of this small device
        reserve = state_of(device).scratch_budget
        assert reserve == 256 * MIB // 8
        free0, total = c.get_device_memory(0)
        assert (free0, total) == (256 * MIB - reserve, 256 * MIB)

        handle, rsize = c.alloc_buffer(0, 2 * size)
        assert handle != 0 and rsize == 2 * size
        assert c.get_device_memory(0) == (free0 - 2 * size, total)
        base = c.buffer_get_base(handle)
        assert base != 0 and base % 32 == 0
        a = make_tensor(id=0x1000, type=F32, buffer=handle, ne=(n,), data=base, name="a")
        b = make_tensor(id=0x2000, type=F32, buffer=handle, ne=(n,), data=base + size, name="b")
        c.init_tensor(a)
        c.init_tensor(b)
        assert c.get_alloc_size(0, a) == size

        # SET / GET
        c.set_tensor(a, 0, data)
        assert c.get_tensor(a, 0, size) == data.tobytes()
        assert c.get_tensor(a, 400, 100) == data.tobytes()[400:500]
        # the bytes live in the plugin's bytearray, not in some NumPy array of the core
        (session,) = server.sessions()
        buf = session.buffers.get(handle).buffer
        assert isinstance(buf, rpcserver_example.ByteArrayBuffer)
        assert isinstance(buf.data, bytearray) and bytes(buf.data[:size]) == data.tobytes()

        # a partial SET at an offset
        c.set_tensor(a, 8, b"\x01\x02\x03\x04")
        expect_a = bytearray(data.tobytes())
        expect_a[8:12] = b"\x01\x02\x03\x04"
        assert c.get_tensor(a, 0, size) == bytes(expect_a)

        # COPY within the device
        assert c.copy_tensor(a, b) is True
        assert c.get_tensor(b, 0, size) == bytes(expect_a)

        # MEMSET part of a tensor
        c.memset_tensor(b, 16, 32, 0xAB)
        expect_b = bytearray(expect_a)
        expect_b[16:48] = b"\xab" * 32
        assert c.get_tensor(b, 0, size) == bytes(expect_b)
        assert c.get_tensor(a, 0, size) == bytes(expect_a)  # the source is untouched

        # BUFFER_CLEAR the whole buffer
        c.buffer_clear(handle, 0x5A)
        assert c.get_tensor(a, 0, size) == b"\x5a" * size
        assert c.get_tensor(b, 0, size) == b"\x5a" * size

        c.free_buffer(handle)
        c.sync()
        assert c.get_device_memory(0) == (free0, total)
        assert buf.data is None  # free() reached the plugin
    assert device.allocated == 0


def test_example_device_runs_graphs():
    """GRAPH_COMPUTE and GRAPH_RECOMPUTE on EXAMPLE0: the shared executor reaches the
    bytearrays through the plugin's ArrayLib."""
    require_example()
    registry = plugins.discover()
    server = Server(cli.select_devices(registry, "EXAMPLE0"), port=0).start()
    n, size = 16, 64
    try:
        with RpcClient("127.0.0.1", server.port) as c:
            handle, _ = c.alloc_buffer(0, 3 * size)
            base = c.buffer_get_base(handle)
            a = make_tensor(id=1, type=F32, buffer=handle, ne=(n,), data=base, name="a")
            b = make_tensor(id=2, type=F32, buffer=handle, ne=(n,), data=base + size, name="b")
            s = make_tensor(id=3, type=F32, buffer=handle, ne=(n,), data=base + 2 * size,
                            op=int(Op.ADD), src=(1, 2), name="a+b")
            x = np.arange(n, dtype=np.float32)
            c.set_tensor(a, 0, x)
            c.set_tensor(b, 0, np.full(n, 0.5, dtype=np.float32))
            c.graph_compute(0, [s.id], [a, b, s])
            got = np.frombuffer(c.get_tensor(s, 0, size), np.float32)
            np.testing.assert_array_equal(got, x + 0.5)
            c.set_tensor(b, 0, np.full(n, 2.0, dtype=np.float32))
            c.graph_recompute(0)
            got = np.frombuffer(c.get_tensor(s, 0, size), np.float32)
            np.testing.assert_array_equal(got, x + 2.0)
        assert server.stats.errors == 0
    finally:
        server.stop()


def test_example_device_out_of_memory_and_cleanup_on_disconnect():
    require_example()
    import rpcserver_example

    device = rpcserver_example.ExampleDevice(capacity=1 * MIB)
    server = Server([device], port=0).start()
    try:
        with RpcClient("127.0.0.1", server.port) as c:
            assert c.alloc_buffer(0, 2 * MIB) == (0, 0)  # over max_buffer_size
            handle, _ = c.alloc_buffer(0, MIB - 4096)
            assert handle != 0
            assert c.alloc_buffer(0, 8192) == (0, 0)  # alloc_buffer returned None
            reserve = state_of(device).scratch_budget  # 1/8 of the device, kept for scratch
            assert reserve == MIB // 8
            assert c.get_device_memory(0) == (0, MIB)  # 4096 bytes free, less the reserve
            # a GET past the end of the buffer: refused, the connection is closed ...
            base = c.buffer_get_base(handle)
            t = make_tensor(id=1, type=F32, buffer=handle, ne=(16,), data=base + MIB - 4096 - 32)
            c.send_frame(Command.GET_TENSOR, COMMANDS[Command.GET_TENSOR].request.pack(t.pack(), 0, 64))
            with pytest.raises((ClientGone, ConnectionError)):
                c.recv_reply()
        # ... and the session's buffers go back to the plugin
        deadline = time.monotonic() + 10
        while (server.sessions() or device.allocated) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert device.allocated == 0
        with RpcClient("127.0.0.1", server.port) as c:
            assert c.get_device_memory(0) == (MIB - reserve, MIB)
    finally:
        server.stop()


# --------------------------------------------------- (c) failures are contained

def fake_plugin(monkeypatch, name: str, hook) -> EntryPoint:
    """An entry point for an in-memory module implementing ``rpcserver_backends``."""
    module_name = f"rpcserver_test_fake_{name}"
    module = types.ModuleType(module_name)
    module.rpcserver_backends = hookimpl(hook)
    monkeypatch.setitem(sys.modules, module_name, module)
    return EntryPoint(name=name, value=module_name, group=ENTRY_POINT_GROUP)


def test_plugin_that_fails_to_import_is_reported_and_skipped(caplog):
    require_example()
    broken = EntryPoint(name="broken", value="no_such_module_xyz", group=ENTRY_POINT_GROUP)
    entry_points = [broken, *real_entry_points()]

    pm, records = plugins.load_plugins(entry_points)
    rec = {r.name: r for r in records}
    assert set(rec) >= {"broken", "cpu", "example"}
    assert "ModuleNotFoundError" in rec["broken"].error
    assert "no_such_module_xyz" in rec["broken"].error
    assert rec["broken"].backends == []
    assert pm.get_plugin("broken") is None
    assert pm.get_plugin("cpu") is not None and pm.get_plugin("example") is not None

    caplog.clear()
    registry = plugins.discover(entry_points=entry_points)
    assert {"CPU", "EXAMPLE0"} <= set(registry.device_names())
    failed = [p for p in registry.plugins if p.error]
    assert [p.name for p in failed] == ["broken"]
    logged = [r.getMessage() for r in caplog.records if r.name == "rpcserver.plugins"]
    assert any("'broken'" in m and "no_such_module_xyz" in m and "skipped" in m for m in logged), logged


def test_plugin_whose_hook_raises_is_contained(monkeypatch, caplog):
    require_example()

    def rpcserver_backends():
        raise RuntimeError("boom from the hook")

    bad = fake_plugin(monkeypatch, "hookraises", rpcserver_backends)
    registry = plugins.discover(entry_points=[bad, *real_entry_points()])
    rec = {p.name: p for p in registry.plugins}
    assert rec["hookraises"].error == "rpcserver_backends() raised RuntimeError: boom from the hook"
    assert rec["hookraises"].backends == []
    assert rec["cpu"].error is None and rec["example"].error is None
    assert {"CPU", "EXAMPLE0"} <= set(registry.device_names())
    assert any("hookraises" in r.getMessage() and "boom from the hook" in r.getMessage()
               for r in caplog.records)


def test_backend_whose_devices_raises_is_contained(monkeypatch, caplog):
    require_example()

    class ExplodingBackend(Backend):
        name = "exploding"

        def devices(self, options):
            raise OSError("no such hardware")

    class EmptyBackend(Backend):
        name = "empty"

        def devices(self, options):
            return []

        def unavailable_reason(self):
            return "no widget driver"

    bad = fake_plugin(monkeypatch, "badbackends", lambda: [ExplodingBackend(), EmptyBackend()])
    registry = plugins.discover(entry_points=[bad, *real_entry_points()])
    rec = {p.name: p for p in registry.plugins}
    # the plugin loaded; its raising backend is its recorded error, the empty one is not
    assert rec["badbackends"].error == ("backend 'exploding': device enumeration failed: "
                                        "OSError: no such hardware")
    assert [b.name for b in rec["badbackends"].backends] == ["exploding", "empty"]
    unavailable = dict(registry.unavailable)
    assert unavailable["exploding"] == "device enumeration failed: OSError: no such hardware"
    assert unavailable["empty"] == "no widget driver"
    assert {"CPU", "EXAMPLE0"} <= set(registry.device_names())
    assert any("exploding" in r.getMessage() and "no such hardware" in r.getMessage()
               for r in caplog.records)


def test_cli_reports_a_broken_installed_plugin_and_still_lists_devices(tmp_path):
    """A broken distribution really installed on sys.path: the CLI shows it and carries on."""
    require_example()
    dist_info = tmp_path / "rpcserver_broken_plugin-9.9.9.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: rpcserver-broken-plugin\nVersion: 9.9.9\n")
    (dist_info / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nbroken = no_such_module_xyz\n")
    env = cli_env(PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path),
                                                           os.environ.get("PYTHONPATH")])))

    res = run_cli("plugins", env=env)
    assert res.returncode == 0, res.stderr
    rows = table_rows(res.stdout)
    assert rows["broken"][1:4] == ["rpcserver-broken-plugin", "9.9.9", "-"], res.stdout
    assert rows["broken"][4].startswith("failed: ModuleNotFoundError"), res.stdout
    assert rows["cpu"][4] == "loaded" and rows["example"][4] == "loaded"

    res = run_cli("list-devices", env=env)
    assert res.returncode == 0, res.stderr
    assert "CPU" in table_rows(res.stdout) and "EXAMPLE0" in table_rows(res.stdout)
    assert "backends without devices" in res.stdout
    assert "plugin error: ModuleNotFoundError" in res.stdout


#: one broken plugin per kind of failure the loader checks: entry-point name -> (module
#: source, what its recorded error must contain)
BROKEN_PLUGINS = {
    "returns-str": ("""
from rpcserver.hookspecs import hookimpl

@hookimpl
def rpcserver_backends():
    return ["x"]
""", "rpcserver_backends() returned 'x' (str), not an rpcserver.device.Backend"),
    "misspelled": ("""
from rpcserver.hookspecs import hookimpl

@hookimpl
def rpcserver_backend():
    return []
""", "unknown hook 'rpcserver_backend'"),
    "returns-backend": ("""
from rpcserver.device import Backend
from rpcserver.hookspecs import hookimpl

class B(Backend):
    name = "lonely"
    def devices(self, options):
        return []

@hookimpl
def rpcserver_backends():
    return B()  # not in a list
""", "rpcserver_backends() must return a list of Backend objects, not"),
    "no-hook": ("""
def rpcserver_backends():  # not marked with hookimpl
    return []
""", "implements no rpcserver_backends() hook"),
    "not-a-list": ("""
from rpcserver.device import Backend
from rpcserver.hookspecs import hookimpl

class B(Backend):
    name = "not-a-list"
    def devices(self, options):
        return 42

@hookimpl
def rpcserver_backends():
    return [B()]
""", "devices() must return a list of Device objects, not 42 (int)"),
    "duck-device": ("""
from rpcserver.device import Backend
from rpcserver.hookspecs import hookimpl

class Duck:  # has a name but is no Device: lacks alloc_buffer and the rest
    name = "DUCK0"
    def memory(self):
        return (1, 2)

class B(Backend):
    name = "duck"
    def devices(self, options):
        return [Duck()]

@hookimpl
def rpcserver_backends():
    return [B()]
""", "is not an rpcserver.device.Device"),
    "bad-memory": ("""
from rpcserver.device import Backend, Device
from rpcserver.hookspecs import hookimpl

class D(Device):
    name = "BADMEM0"
    def memory(self):
        return (-5, 10)
    def alloc_buffer(self, size):
        return None

class B(Backend):
    name = "badmem"
    def devices(self, options):
        return [D()]

@hookimpl
def rpcserver_backends():
    return [B()]
""", "device BADMEM0: memory() must return (free, total) as non-negative integers"),
}


#: the failures found without enumerating devices (the module and its hook)
HOOK_LEVEL_FAILURES = {"returns-str", "returns-backend", "misspelled", "no-hook"}


def _install_broken_plugins(root) -> dict:
    """Each of BROKEN_PLUGINS as a real distribution (module + dist-info) under ``root``."""
    for i, (name, (source, _)) in enumerate(BROKEN_PLUGINS.items()):
        module = f"rpcserver_broken_{i}"
        (root / f"{module}.py").write_text(source)
        dist_info = root / f"rpcserver_broken_{i}-1.0.{i}.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: rpcserver-broken-{i}\nVersion: 1.0.{i}\n")
        (dist_info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{name} = {module}\n")
    return cli_env(PYTHONPATH=os.pathsep.join(filter(None, [str(root),
                                                            os.environ.get("PYTHONPATH")])))


def test_every_kind_of_broken_plugin_is_recorded_and_the_others_keep_working(tmp_path):
    """Seven broken distributions installed beside the CPU plugin: ``list-devices`` names what
    is wrong with each, ``rpcserver plugins`` (which never enumerates devices: no hardware is
    touched) those whose module or hook is wrong, and the CPU and example devices stay."""
    require_example()
    env = _install_broken_plugins(tmp_path)

    res = run_cli("plugins", env=env)
    assert res.returncode == 0, res.stderr
    rows = table_rows(res.stdout)
    for name in BROKEN_PLUGINS:
        assert name in rows, res.stdout
        failed = rows[name][4].startswith("failed:")
        assert failed == (name in HOOK_LEVEL_FAILURES), (name, rows[name])
    assert rows["cpu"][4] == "loaded" and rows["example"][4] == "loaded"

    res = run_cli("list-devices", env=env)
    assert res.returncode == 0, res.stderr
    devices = table_rows(res.stdout)
    assert "CPU" in devices and "EXAMPLE0" in devices
    assert "DUCK0" not in devices and "BADMEM0" not in devices
    flat = " ".join(res.stdout.split())
    for name, (_, why) in BROKEN_PLUGINS.items():
        assert " ".join(why.split()) in flat, (name, why, res.stdout)


def test_broken_plugins_do_not_stop_discovery_in_process(tmp_path, monkeypatch):
    """The same plugins through discover(): each record carries its error, nothing raises,
    and only devices that pass the checks are registered."""
    require_example()
    _install_broken_plugins(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # the distributions are now installed here too
    registry = plugins.discover()
    rec = {p.name: p for p in registry.plugins}
    for name, (_, why) in BROKEN_PLUGINS.items():
        assert rec[name].error and why in rec[name].error, (name, rec[name].error)
    assert rec["cpu"].error is None and rec["example"].error is None
    assert {"CPU", "EXAMPLE0"} <= set(registry.device_names())
    assert not {"DUCK0", "BADMEM0"} & set(registry.device_names())


# ------------------------------------------------------------------- (d) serve

def test_serve_unknown_device_lists_the_available_ones():
    require_example()
    res = run_cli("serve", "-d", "NOPE", "-p", str(free_port()), timeout=60)
    assert res.returncode != 0
    assert "unknown device: NOPE" in res.stderr, res.stderr
    m = re.search(r"available devices: (.*)", res.stderr)
    assert m, res.stderr
    available = [n.strip() for n in m.group(1).split(",")]
    assert "CPU" in available and "EXAMPLE0" in available


def _check_cpu_banner_line(banner: str):
    m = re.search(r"device 0\s+CPU: .+ \((\d+) MiB, (\d+) MiB free\)", banner)
    assert m, banner
    total, free = int(m.group(1)), int(m.group(2))
    assert total == psutil.virtual_memory().total // MIB
    assert 0 < free <= total


def test_serve_non_loopback_warns_shows_banner_and_stops_on_sigterm(serve_process):
    port = free_port()
    server = serve_process("-H", "0.0.0.0", "-p", str(port))
    warning = server.wait_for("stderr", r"WARNING: the server binds to 0\.0\.0\.0, not to loopback")
    assert warning
    assert "no authentication and no encryption" in server.stderr
    banner = server.wait_banner()
    assert f"rpcserver {metadata.version('rpcserver')}" in banner
    assert "rpcserver 0.1.0" in banner
    assert "7.0.0" in banner
    assert f"0.0.0.0:{port}" in banner
    assert re.search(r"local cache\s+n/a", banner), banner
    _check_cpu_banner_line(banner)
    assert "EXAMPLE0" not in banner  # served only when asked for

    server.wait_ready(port)
    t0 = time.monotonic()
    assert server.stop(signal.SIGTERM) == 0, server.stderr
    assert time.monotonic() - t0 < 5
    assert "received SIGTERM" in server.stderr
    assert "Traceback" not in server.stderr


def test_serve_sigterm_right_after_the_banner_exits_cleanly():
    for _ in range(10):
        proc = subprocess.Popen([sys.executable, "-m", "rpcserver.cli", "serve", "-p", "0"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                encoding="utf-8", env=cli_env())
        try:
            for line in proc.stdout:
                if "╰" in line:  # the banner's last line
                    break
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        assert rc == 0, f"SIGTERM right after the banner: exit code {rc}"


def test_serve_banner_shows_the_cache_directory(serve_process, tmp_path):
    port = free_port()
    cache_root = tmp_path / "llama-cache"
    server = serve_process("-p", str(port), "-c", env=cli_env(LLAMA_CACHE=str(cache_root)))
    banner = server.wait_banner()
    assert re.search(r"local cache\s+" + re.escape(str(cache_root / "rpc")), banner), banner
    assert (cache_root / "rpc").is_dir()
    assert f"127.0.0.1:{port}" in banner
    _check_cpu_banner_line(banner)
    server.wait_ready(port)
    assert "not to loopback" not in server.stderr  # loopback: no warning
    assert server.stop(signal.SIGTERM) == 0, server.stderr


def test_serve_debug_logs_commands_and_stops_on_sigint(serve_process):
    require_example()
    port = free_port()
    server = serve_process("-p", str(port), "-d", "EXAMPLE0", env=cli_env(GGML_RPC_DEBUG="1"))
    banner = server.wait_banner()
    assert re.search(r"device 0\s+EXAMPLE0: .+ \(256 MiB, 256 MiB free\)", banner), banner
    server.wait_ready(port)
    with RpcClient("127.0.0.1", port) as c:
        assert c.device_count() == 1
        server.wait_for("stderr", r"DEVICE_COUNT -> 1")
        handle, _ = c.alloc_buffer(0, 4096)
        server.wait_for("stderr", r"ALLOC_BUFFER device=0 size=4096 -> remote_ptr=0x%x" % handle)
    t0 = time.monotonic()
    assert server.stop(signal.SIGINT) == 0, server.stderr
    assert time.monotonic() - t0 < 5
    assert "received SIGINT" in server.stderr
    assert "Traceback" not in server.stderr and "KeyboardInterrupt" not in server.stderr


# --------------------------------------------------------- (e) -t / --threads

def _blas_pools():
    from threadpoolctl import threadpool_info

    pools = threadpool_info()
    assert pools, "threadpoolctl sees no thread pool although NumPy is imported"
    return pools


def test_cpu_device_limits_blas_threads():
    from rpcserver_cpu import CpuBackend
    from threadpoolctl import threadpool_limits

    baseline = threadpool_limits(limits=2)  # so that the device has something to lower
    try:
        (device,) = CpuBackend().devices(DeviceOptions(threads=1))
        try:
            pools = _blas_pools()
            assert all(p["num_threads"] == 1 for p in pools), pools
        finally:
            device._limits.restore_original_limits()
    finally:
        baseline.restore_original_limits()


def test_serve_threads_option_reaches_the_cpu_plugin(monkeypatch):
    """`rpcserver serve -t 1` hands threads=1 to the plugins, and the CPU device applies it."""
    from threadpoolctl import threadpool_limits

    seen = []
    real_discover = cli.discover

    def spy(options=None, entry_points=None):
        registry = real_discover(options, entry_points)
        seen.append((options, registry))
        return registry

    monkeypatch.setattr(cli, "discover", spy)
    monkeypatch.setattr(cli.console, "setup_logging", lambda debug: None)
    baseline = threadpool_limits(limits=2)
    try:
        # -d NOPE ends cmd_serve right after discovery, before anything binds
        with pytest.raises(SystemExit, match="unknown device: NOPE"):
            cli.main(["serve", "-t", "1", "-d", "NOPE"])
        ((options, registry),) = seen
        assert options.threads == 1
        cpu = registry.find("CPU")
        assert cpu is not None
        try:
            pools = _blas_pools()
            assert all(p["num_threads"] == 1 for p in pools), pools
        finally:
            cpu.device._limits.restore_original_limits()
    finally:
        baseline.restore_original_limits()
