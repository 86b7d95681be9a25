"""The Metal plugin (plugins/metal, ``rpcserver-metal``): MLX devices, MLX buffers, packaging.

Its devices are conformance-tested by the op suites (test_ops_*.py run every case on
``MLX-CPU`` too) and end to end with llama.cpp (test_e2e_llamacpp.py). This file covers
what those do not: the device list and memory figures, the segment buffers against a
NumPy model of the same bytes, the one-``mx.eval``-per-graph contract, a backend without
MLX, and that ``pip install ./plugins/metal`` works on its own on top of rpcserver and
uninstalling it removes its devices and nothing else.

MLX is required (``pip install "mlx[cpu]"``; scripts/test.sh installs it): without it these
tests fail, they are not skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from rpcserver import cli
from rpcserver.device import DeviceType
from rpcserver.plugins import discover

REPO = Path(__file__).resolve().parent.parent
PLUGIN_DIR = REPO / "plugins" / "metal"
DIST = "rpcserver-metal"
MIB = 1 << 20


def _require_mlx():
    try:
        import mlx.core  # noqa: F401
        import rpcserver_metal  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"{exc}: the test run must install the Metal plugin and MLX, with "
                    f"`pip install ./plugins/metal \"mlx[cpu]\"` (scripts/test.sh does)",
                    pytrace=False)


@pytest.fixture(scope="module")
def mlx_device():
    _require_mlx()
    entry = discover().find("MLX-CPU")
    assert entry is not None, "the metal plugin lists no MLX-CPU device"
    return entry.device


def _cli(*args, python=sys.executable, env=None, timeout=120):
    env = dict(os.environ if env is None else env, COLUMNS="200", PYTHONIOENCODING="utf-8")
    return subprocess.run([python, "-m", "rpcserver.cli", *args], capture_output=True, text=True,
                          encoding="utf-8", env=env, timeout=timeout)


def _rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            if cells[0]:
                rows[cells[0]] = cells
    return rows


# ------------------------------------------------------------------ devices


def test_list_devices_shows_mlx_cpu_with_the_hosts_memory():
    _require_mlx()
    res = _cli("list-devices")
    assert res.returncode == 0, res.stderr
    rows = _rows(res.stdout)
    assert "MLX-CPU" in rows, res.stdout
    _, plugin, type_, _desc, total, free = rows["MLX-CPU"]
    assert plugin.startswith("metal ") and type_ == "cpu", rows["MLX-CPU"]
    vm = psutil.virtual_memory()
    assert abs(int(total) - vm.total // MIB) <= 1, (total, vm.total)
    assert 0 < int(free) <= int(total)
    assert "CPU" in rows  # the CPU plugin's device is still there
    res = _cli("plugins")
    assert _rows(res.stdout)["metal"][1:5] == [DIST, "0.1.0", "metal", "loaded"], res.stdout


def test_mlx_cpu_is_served_only_when_named(mlx_device):
    registry = discover()
    if not any(e.device.type in (DeviceType.GPU, DeviceType.IGPU) for e in registry.devices):
        assert [d.name for d in cli.select_devices(registry, None)] == ["CPU"]
    assert [d.name for d in cli.select_devices(registry, "MLX-CPU")] == ["MLX-CPU"]
    assert [d.name for d in cli.select_devices(registry, "cpu,mlx-cpu")] == ["CPU", "MLX-CPU"]
    assert mlx_device.type == DeviceType.CPU and mlx_device.alignment == 32


def test_metal_device_exists_exactly_when_metal_is_available(mlx_device):
    import mlx.core as mx

    names = discover().device_names()
    assert ("MTL0" in names) == bool(mx.metal.is_available()), names


def test_backend_without_mlx_lists_no_devices_and_says_why():
    code = ("import sys, json\nsys.modules['mlx'] = None; sys.modules['mlx.core'] = None\n"
            "from rpcserver.plugins import discover\nr = discover()\n"
            "print(json.dumps({'devices': r.device_names(), 'unavailable': dict(r.unavailable)}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert not any(n in out["devices"] for n in ("MLX-CPU", "MTL0")), out
    assert "mlx is not importable" in out["unavailable"]["metal"], out
    assert "CPU" in out["devices"]


# ------------------------------------------------------------------ buffers


class Model:
    """The same bytes in a NumPy array: what every MlxBuffer operation must match."""

    def __init__(self, size):
        self.b = np.zeros(size, np.uint8)

    def view(self, offset, shape, strides, dtype):
        return np.ndarray(shape, dtype=dtype, buffer=self.b, offset=offset, strides=strides)


def _check(buf, model):
    got = np.frombuffer(bytes(buf.read(0, buf.size)), np.uint8)
    assert np.array_equal(got, model.b), f"first difference at byte {np.argmax(got != model.b)}"


def test_buffer_transfers_and_segments(mlx_device):
    rng = np.random.default_rng(1)
    size = 4096
    buf = mlx_device.alloc_buffer(size)
    model = Model(size)
    _check(buf, model)  # a new buffer reads as zeros (a hole)
    for step in range(300):
        kind = rng.integers(4)
        off = int(rng.integers(0, size))
        n = int(rng.integers(1, size - off + 1)) if rng.random() < 0.2 else int(
            rng.integers(1, min(64, size - off) + 1))
        if kind == 0:
            data = rng.integers(0, 256, n, dtype=np.uint8)
            buf.write(off, data.tobytes())
            model.b[off:off + n] = data
        elif kind == 1:
            value = int(rng.choice([0, 7, 255]))
            buf.fill(off, n, value)
            model.b[off:off + n] = value
        elif kind == 2:
            src = int(rng.integers(0, size - n + 1))
            buf.copy_from(buf, src, off, n)  # overlapping copies within one buffer
            model.b[off:off + n] = model.b[src:src + n].copy()
        else:
            assert bytes(buf.read(off, n)) == model.b[off:off + n].tobytes(), step
    _check(buf, model)
    buf.free()


DTYPES = [np.float32, np.float16, np.int32, np.int8, np.uint16]


def _random_view(rng, size, dtype):
    """A random valid strided view (outermost-first shape, byte strides) inside ``size`` bytes."""
    isz = np.dtype(dtype).itemsize
    shape = tuple(int(x) for x in rng.integers(1, 5, 4))
    order = rng.permutation(4)
    strides = [0] * 4
    step = isz * int(rng.integers(1, 3))  # element gaps now and then
    for axis in order[::-1]:
        strides[axis] = step
        step *= shape[axis] + int(rng.integers(0, 2))  # row gaps now and then
    extent = sum((n - 1) * s for n, s in zip(shape, strides)) + isz
    offset = int(rng.integers(0, (size - extent) // isz + 1)) * isz
    return offset, shape, tuple(strides)


def test_buffer_strided_views_and_stores_match_numpy(mlx_device):
    """view()/store() (what the executor calls) against NumPy views of the same bytes,
    with and without index (SET_ROWS), including duplicate rows (the last one wins) and
    writes of more runs than MAX_RUNS (one scatter)."""
    import mlx.core as mx

    from rpcserver_metal.buffer import MAX_RUNS, MLX_THREAD

    rng = np.random.default_rng(2)
    size = 1 << 14
    buf = mlx_device.alloc_buffer(size)
    model = Model(size)
    init = rng.integers(0, 256, size, dtype=np.uint8)
    buf.write(0, init.tobytes())
    model.b[:] = init
    to_mx = mlx_device.array_lib.xp.dtype

    def run():
        for _ in range(200):
            dtype = DTYPES[rng.integers(len(DTYPES))]
            offset, shape, strides = _random_view(rng, size, dtype)
            ref = model.view(offset, shape, strides, dtype)
            got = np.ascontiguousarray(np.array(buf.view(offset, shape, strides, to_mx(dtype))))
            assert got.shape == ref.shape and np.array_equal(
                got.view(np.uint8), np.ascontiguousarray(ref).view(np.uint8)), (offset, shape, strides)
            values = rng.integers(-50, 50, shape).astype(dtype)
            if rng.random() < 0.5:
                buf.store(offset, shape, strides, to_mx(dtype), mx.array(values))
                ref[...] = values
            else:  # index over the outer dims, as SET_ROWS writes rows; duplicates included
                i3, i2 = int(rng.integers(shape[0])), int(rng.integers(shape[1]))
                rows = rng.integers(0, shape[2], int(rng.integers(1, 6)))
                part = values[i3, i2, :len(rows)] if len(rows) <= shape[2] else None
                if part is None:
                    continue
                buf.store(offset, shape, strides, to_mx(dtype), mx.array(part),
                          (i3, i2, mx.array(rows)))
                for k, r in enumerate(rows):  # NumPy's fancy assignment: the last one wins
                    ref[i3, i2, r] = part[k]
            buf.device.evaluate()
        # many separate runs: one scatter
        rows = np.arange(0, 2 * (MAX_RUNS + 10), 2)
        shape, strides = (1, 1, int(rows.max()) + 1, 3), (0, 0, 16, 4)
        vals = rng.standard_normal((rows.size, 3)).astype(np.float32)
        buf.store(64, shape, strides, mx.float32, mx.array(vals), (0, 0, mx.array(rows)))
        model.view(64, shape, strides, np.float32)[0, 0, rows] = vals
        buf.device.evaluate()

    MLX_THREAD.call(run)
    _check(buf, model)
    assert buf.segments < 2000
    buf.free()


def test_one_mx_eval_per_graph(mlx_device, monkeypatch):
    """A graph is built lazily and evaluated once (ops that need host values, such as
    GET_ROWS' index check, evaluate only what they read)."""
    import ggml_harness as H
    import mlx.core as mx

    H.require_ggml()
    calls = []
    real_eval = mx.eval
    monkeypatch.setattr(mx, "eval", lambda *a, **k: (calls.append(1), real_eval(*a, **k))[1])
    f = H.fn
    add = f("ggml_add", H.c_void_p, H.c_void_p, H.c_void_p, H.c_void_p)
    mul_mat = f("ggml_mul_mat", H.c_void_p, H.c_void_p, H.c_void_p, H.c_void_p)
    soft_max = f("ggml_soft_max", H.c_void_p, H.c_void_p, H.c_void_p)
    with H.GgmlCase(seed=3) as case:
        a = case.new_tensor(H.F32, (64, 8))
        w = case.new_tensor(H.F16, (64, 32))
        x = soft_max(case.ctx, mul_mat(case.ctx, w, add(case.ctx, a, a)))
        out = case.mark_output(x)
        ref = case.run([out])
        calls.clear()
        original = mlx_device.graph_compute

        def counted(graph):
            calls.clear()
            original(graph)
            counted.evals = len(calls)

        monkeypatch.setattr(mlx_device, "graph_compute", counted)
        ours = case.run_ours(mlx_device)
        assert counted.evals == 1
        H.assert_close(ref.arrays[0], ours.arrays[0], 1e-6)


# ------------------------------------------------------------------ packaging


def _filtered_site(dest: Path) -> Path:
    """This venv's site-packages as symlinks, minus rpcserver-metal: "rpcserver without the plugin"."""
    site = Path(sysconfig.get_paths()["purelib"])
    dest.mkdir()
    for entry in site.iterdir():
        if entry.name.lower().replace("-", "_").startswith("rpcserver_metal"):
            continue
        (dest / entry.name).symlink_to(entry)
    return dest


def test_pip_install_on_its_own_and_uninstall_removes_only_its_devices(tmp_path):
    """In a throwaway venv that has rpcserver, its CPU and example plugins and MLX (this
    venv's packages, linked) but not rpcserver-metal: ``pip install ./plugins/metal`` adds the
    MLX devices, its requirements already satisfied (pip fetches only the build backend for its
    isolated build); ``pip uninstall`` removes them and nothing else."""
    _require_mlx()
    t0 = time.monotonic()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    shared = _filtered_site(tmp_path / "shared-site")
    # addsitedir (not a bare path line) so that the shared dir's own .pth files run too
    Path(purelib, "zz_shared_site.pth").write_text(f"import site; site.addsitedir({str(shared)!r})\n")
    source = tmp_path / "metal-src"  # build from a copy: setuptools writes build/ and egg-info
    shutil.copytree(PLUGIN_DIR, source, ignore=shutil.ignore_patterns("build", "*.egg-info",
                                                                       "__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"

    probe = """if True:
        import json
        from importlib import metadata
        from rpcserver.plugins import discover
        r = discover()
        print(json.dumps({"dists": sorted((d.metadata["Name"] or "?").lower()
                                          for d in metadata.distributions()),
                          "devices": r.device_names(),
                          "plugins": sorted(p.name for p in r.plugins)}))"""

    def state():
        res = subprocess.run([python, "-c", probe], capture_output=True, text=True, env=env,
                             timeout=120)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    def pip(*args):
        res = subprocess.run([python, "-m", "pip", *args], capture_output=True, text=True, env=env,
                             timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        return res

    before = state()
    assert DIST not in before["dists"] and "rpcserver" in before["dists"], before
    assert "metal" not in before["plugins"] and "MLX-CPU" not in before["devices"], before
    assert "CPU" in before["devices"]

    res = pip("install", str(source))
    assert "Successfully installed rpcserver-metal-0.1.0" in res.stdout, res.stdout
    with_plugin = state()
    assert set(with_plugin["dists"]) - set(before["dists"]) == {DIST}, with_plugin
    assert "metal" in with_plugin["plugins"]
    assert set(with_plugin["devices"]) - set(before["devices"]) >= {"MLX-CPU"}, with_plugin
    res = _cli("list-devices", python=python, env=env)
    assert res.returncode == 0, res.stderr
    total = int(_rows(res.stdout)["MLX-CPU"][4])
    assert abs(total - psutil.virtual_memory().total // MIB) <= 1, res.stdout

    pip("uninstall", "-y", DIST)
    after = state()
    assert after == before, (before, after)
    assert not any(Path(purelib).glob("rpcserver_metal*")), list(Path(purelib).iterdir())
    took = time.monotonic() - t0
    print(f"throwaway venv, pip install + uninstall: {took:.1f}s")
