"""The CUDA backend plugin (plugins/cuda, distribution ``rpcserver-cuda``).

Three groups of tests:

* **Everywhere** (no GPU needed): the plugin loads through its entry point and,
  with no GPU, reports no devices and says why (``rpcserver list-devices``,
  ``rpcserver serve -d CUDA0``); device enumeration against a faked CUDA runtime
  (two GPUs, no driver, old driver, no device...); the dispatch tables; the
  kernel source generator, whose per-element formulas are evaluated with NumPy
  and must reproduce ggml's own dequantization bit for bit; NVRTC compiling every
  generated module to machine code (NVRTC needs no GPU); ``pip install
  ./plugins/cuda`` and uninstall.
* **On a GPU** (skipped with "no CUDA device" elsewhere): buffers and transfers,
  every dequantization kernel against ggml, a representative set of ops through
  ``ggml_harness`` (ggml's CPU backend as the oracle) on ``CUDA0``, and end to end
  through ``rpcserver serve -d CUDA0`` (protocol client, then llama.cpp models).

The plugin does not have to be installed: when it is not, the tests import it
from plugins/cuda and give subprocesses a ``*.dist-info`` shim declaring its
entry point. CuPy (``cupy-cuda12x``) and NVRTC (``nvidia-cuda-nvrtc-cu12``) are
needed for some tests; those skip, naming the missing package, without them.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
import types
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from rpcserver import ggml, plugins
from rpcserver.device import DeviceOptions, DeviceType
from rpcserver.hookspecs import ENTRY_POINT_GROUP

REPO = Path(__file__).resolve().parent.parent
DIST = "rpcserver-cuda"
MIB = 1 << 20


# the plugin (installed, or from the source tree) and the CuPy stand-in that runs it on the host
from cuda_standin import (CUDA_EP, INSTALLED, PLUGIN_DIR, NumpyCupy, cuda,  # noqa: E402,F401
                          gpu, launches)

import rpcserver_cuda  # noqa: E402
from rpcserver_cuda import dispatch, kernels, ops, probe, qdsl  # noqa: E402


def _cupy_available() -> bool:
    return importlib.util.find_spec("cupy") is not None


def require_cupy():
    if not _cupy_available():
        pytest.skip("CuPy is not installed (pip install cupy-cuda12x)")


def nvrtc():
    """CuPy's NVRTC bindings, or skip saying why NVRTC is unusable."""
    require_cupy()
    try:
        from cupy_backends.cuda.libs import nvrtc as lib

        lib.getVersion()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"NVRTC cannot be loaded ({type(exc).__name__}: {exc}); "
                    f"pip install nvidia-cuda-nvrtc-cu12")
    return lib


_PROBE = None


def real_probe() -> probe.ProbeResult:
    global _PROBE
    if _PROBE is None:
        _PROBE = probe.probe()
    return _PROBE


def require_no_gpu():
    if real_probe().gpus:
        pytest.skip("a CUDA device is present: the no-GPU behaviour cannot be observed here")


# ------------------------------------------------------------------------------ subprocess helpers


def cli_env(tmp_path: Path, **extra) -> dict:
    """Environment for ``python -m rpcserver.cli``; declares the plugin if it is not installed."""
    env = dict(os.environ)
    for var in ("FORCE_COLOR", "GGML_RPC_DEBUG", "LLAMA_CACHE"):
        env.pop(var, None)
    env.update(COLUMNS="400", PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    if not INSTALLED:
        shim = tmp_path / "cuda-shim"
        info = shim / "rpcserver_cuda-0.1.0.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: 0.1.0\n")
        (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\ncuda = rpcserver_cuda\n")
        paths = [str(shim), str(PLUGIN_DIR), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(extra)
    return env


from test_plugins import table_rows  # noqa: E402  (the Rich-table parser the CLI tests share)


def run_cli(tmp_path, *args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rpcserver.cli", *args], capture_output=True,
                          text=True, encoding="utf-8", env=env or cli_env(tmp_path),
                          timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ============================================================================ packaging


def test_pyproject_declares_the_plugin():
    import tomllib

    meta = tomllib.loads((PLUGIN_DIR / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["name"] == DIST
    assert project["entry-points"]["rpcserver.backends"] == {"cuda": "rpcserver_cuda"}
    deps = [re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0] for d in project["dependencies"]]
    assert "rpcserver" in deps and "cupy-cuda12x" in deps
    assert meta["tool"]["setuptools"]["packages"] == ["rpcserver_cuda"]


def test_importing_the_plugin_does_not_import_cupy():
    code = ("import sys; sys.path.insert(0, %r); import rpcserver_cuda, rpcserver_cuda.dispatch, "
            "rpcserver_cuda.kernels, rpcserver_cuda.ops; print('cupy' in sys.modules)") % str(PLUGIN_DIR)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


# ============================================================================ enumeration


def test_without_cupy_the_plugin_loads_and_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # "import cupy" raises ImportError
    registry = plugins.discover(entry_points=[CUDA_EP])
    [record] = registry.plugins
    assert record.error is None and [b.name for b in record.backends] == ["cuda"]
    assert registry.devices == []
    [(backend, reason)] = registry.unavailable
    assert backend == "cuda"
    assert "CuPy is not installed" in reason and "pip install cupy-cuda12x" in reason


def test_real_cupy_without_a_gpu_reports_why():
    require_cupy()
    require_no_gpu()
    result = real_probe()
    assert result.gpus == [] and result.reason
    backend = rpcserver_cuda.CudaBackend()
    assert backend.devices(DeviceOptions()) == []
    assert backend.unavailable_reason() == result.reason
    if result.driver_version == 0:  # this machine: CuPy installed, no NVIDIA driver at all
        assert result.reason.startswith("no CUDA driver: libcuda.so could not be loaded")


class FakeRuntimeError(RuntimeError):
    def __init__(self, status: int, text: str):
        super().__init__(text)
        self.status = status


def fake_cupy(*, gpus=(), count_error=None, driver=12040, runtime=12090):
    """A stand-in for the ``cupy`` module: enough of cupy.cuda.runtime for enumeration."""
    current = {"device": 0}

    class Device:
        def __init__(self, index):
            self.index = index

        def __enter__(self):
            self.prev, current["device"] = current["device"], self.index
            return self

        def __exit__(self, *exc):
            current["device"] = self.prev

    def get_count():
        if count_error is not None:
            raise FakeRuntimeError(*count_error)
        return len(gpus)

    rt = types.SimpleNamespace(
        runtimeGetVersion=lambda: runtime,
        driverGetVersion=lambda: driver,
        getDeviceCount=get_count,
        getDeviceProperties=lambda i: dict(gpus[i]["props"]),
        memGetInfo=lambda: gpus[current["device"]]["mem"],
        CUDARuntimeError=FakeRuntimeError,
    )
    pool = types.SimpleNamespace(free_bytes=lambda: gpus[current["device"]].get("pool_free", 0))
    return types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=rt, Device=Device),
                                 get_default_memory_pool=lambda: pool)


def _gpu(name: bytes, total: int, free: int, cc=(8, 9), pool_free=0):
    return {"props": {"name": name, "totalGlobalMem": total, "major": cc[0], "minor": cc[1],
                      "pciBusID": 1, "pciDeviceID": 0, "pciDomainID": 0},
            "mem": (free, total), "pool_free": pool_free}


def _use_fake(monkeypatch, cupy, *, nvrtc=None, cublas=None):
    monkeypatch.setattr(probe, "import_cupy", lambda: (cupy, None))
    monkeypatch.setattr(probe, "nvrtc_problem", lambda _cp: nvrtc)
    monkeypatch.setattr(probe, "cublas_problem", lambda _cp: cublas)


def test_two_fake_gpus_become_cuda0_and_cuda1(monkeypatch):
    gib = 1 << 30
    cupy = fake_cupy(gpus=[_gpu(b"NVIDIA GeForce RTX 4090", 24 * gib, 20 * gib, pool_free=gib),
                           _gpu(b"NVIDIA A100-SXM4-80GB\0junk", 80 * gib, 79 * gib, cc=(8, 0))])
    _use_fake(monkeypatch, cupy)
    registry = plugins.discover(entry_points=[CUDA_EP])
    assert registry.device_names() == ["CUDA0", "CUDA1"]
    assert registry.unavailable == []
    d0, d1 = (registry.find(n).device for n in ("CUDA0", "CUDA1"))
    assert registry.find("cuda1").device is d1  # names match case-insensitively, as -d does
    assert d0.description == "NVIDIA GeForce RTX 4090"
    assert d1.description == "NVIDIA A100-SXM4-80GB"
    assert d0.type == d1.type == DeviceType.GPU
    assert d0.alignment == 128
    # free memory: the runtime's figure plus what CuPy's pool holds unused; total from the runtime
    assert d0.memory() == (21 * gib, 24 * gib)
    assert d1.memory() == (79 * gib, 80 * gib)
    assert (d0.index, d1.index) == (0, 1)


def test_fake_gpus_are_listed_by_the_cli_table(monkeypatch):
    from rpcserver import console

    cupy = fake_cupy(gpus=[_gpu(b"Tesla T4", 16 * 1024 * MIB, 15 * 1024 * MIB, cc=(7, 5))])
    _use_fake(monkeypatch, cupy)
    registry = plugins.discover(entry_points=[CUDA_EP])
    from rich.console import Console

    out = Console(width=200, record=True, file=open(os.devnull, "w"))
    out.print(console.devices_table(registry))
    rows = table_rows(out.export_text())
    assert rows["CUDA0"][2:] == ["gpu", "Tesla T4", "16384", "15360"]


@pytest.mark.parametrize("status, driver, expect", [
    (35, 0, "no CUDA driver: libcuda.so could not be loaded"),
    (35, 11040, "the CUDA driver is too old: it supports CUDA 11.4, CuPy's runtime is CUDA 12.9"),
    (804, 12020, "the CUDA driver is too old"),
    (100, 12040, "no CUDA device found"),
    (46, 12040, "busy or unavailable"),
    (803, 12040, "different versions"),
    (999, 12040, "CUDA is unavailable: FakeRuntimeError: cudaErrorUnknown"),
], ids=["no-driver", "old-driver", "compat", "no-device", "busy", "mismatch", "other"])
def test_fake_runtime_failures_give_clear_reasons(monkeypatch, status, driver, expect):
    cupy = fake_cupy(count_error=(status, "cudaErrorUnknown: unknown error"), driver=driver)
    _use_fake(monkeypatch, cupy)
    registry = plugins.discover(entry_points=[CUDA_EP])
    assert registry.devices == []
    [(name, reason)] = registry.unavailable
    assert name == "cuda" and expect in reason, reason


def test_reason_mentions_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    _use_fake(monkeypatch, fake_cupy(count_error=(100, "cudaErrorNoDevice")))
    backend = rpcserver_cuda.CudaBackend()
    assert backend.devices(DeviceOptions()) == []
    assert backend.unavailable_reason() == "no CUDA device found (CUDA_VISIBLE_DEVICES='')"


def test_zero_devices_and_too_old_devices(monkeypatch):
    _use_fake(monkeypatch, fake_cupy(gpus=[]))
    backend = rpcserver_cuda.CudaBackend()
    assert backend.devices(DeviceOptions()) == []
    assert backend.unavailable_reason().startswith("no CUDA device found")

    _use_fake(monkeypatch, fake_cupy(gpus=[_gpu(b"GeForce GTX 780", 3 << 30, 2 << 30, cc=(3, 5)),
                                           _gpu(b"Tesla V100", 16 << 30, 15 << 30, cc=(7, 0))]))
    devices = backend.devices(DeviceOptions())
    # the runtime's numbering is kept: the usable GPU is still CUDA1, as ggml would name it
    assert [d.name for d in devices] == ["CUDA1"]

    _use_fake(monkeypatch, fake_cupy(gpus=[_gpu(b"GeForce GTX 780", 3 << 30, 2 << 30, cc=(3, 5))]))
    assert backend.devices(DeviceOptions()) == []
    assert "compute capability 3.5" in backend.unavailable_reason()


def test_gpus_without_nvrtc_or_cublas_are_reported(monkeypatch):
    cupy = fake_cupy(gpus=[_gpu(b"NVIDIA H100", 80 << 30, 79 << 30, cc=(9, 0))])
    _use_fake(monkeypatch, cupy, nvrtc="NVRTC (the CUDA runtime compiler) cannot be loaded: x")
    backend = rpcserver_cuda.CudaBackend()
    assert backend.devices(DeviceOptions()) == []
    assert backend.unavailable_reason() == ("found CUDA0 (NVIDIA H100), but NVRTC (the CUDA runtime "
                                            "compiler) cannot be loaded: x")
    _use_fake(monkeypatch, cupy, cublas="cuBLAS cannot be loaded: y")
    assert backend.devices(DeviceOptions()) == []
    assert "cuBLAS cannot be loaded" in backend.unavailable_reason()


# ============================================================================ the command line


def test_cli_plugins_lists_the_cuda_plugin(tmp_path):
    res = run_cli(tmp_path, "plugins")
    assert res.returncode == 0, res.stderr
    row = table_rows(res.stdout)["cuda"]
    assert row[1] == DIST and row[3] == "cuda" and row[4] == "loaded", res.stdout


def test_cli_list_devices_says_why_cuda_has_no_devices(tmp_path):
    require_cupy()
    require_no_gpu()
    res = run_cli(tmp_path, "list-devices")
    assert res.returncode == 0, res.stderr
    assert "backends without devices" in res.stdout
    rows = table_rows(res.stdout)
    assert "cuda" in rows, res.stdout
    assert rows["cuda"][1] == real_probe().reason, res.stdout
    assert "CPU" in rows  # the other plugins are untouched


def test_cli_list_devices_without_cupy_says_so(tmp_path):
    # a directory shadowing "cupy" with a module that fails like a missing package
    fake = tmp_path / "nocupy"
    (fake / "cupy").mkdir(parents=True)
    (fake / "cupy" / "__init__.py").write_text("raise ImportError('No module named cupy')\n")
    env = cli_env(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join([str(fake), env.get("PYTHONPATH", "")])
    res = run_cli(tmp_path, "list-devices", env=env)
    assert res.returncode == 0, res.stderr
    assert "CuPy is not installed" in table_rows(res.stdout)["cuda"][1], res.stdout


def test_serve_cuda0_without_a_gpu_fails_listing_the_available_devices(tmp_path):
    require_no_gpu()
    res = run_cli(tmp_path, "serve", "-d", "CUDA0", "-p", str(free_port()), timeout=120)
    assert res.returncode != 0
    assert "unknown device: CUDA0" in res.stderr, res.stderr
    available = re.search(r"available devices: (.*)", res.stderr).group(1)
    assert "CPU" in [n.strip() for n in available.split(",")]
    assert "Traceback" not in res.stderr


# ============================================================================ dispatch tables

#: the block types the issue requires GPU dequantization for
REQUIRED_KERNEL_TYPES = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                         "Q6_K", "IQ4_NL", "MXFP4"}


def test_every_quantized_type_has_a_dequantization_route():
    quantized = {v for v, t in ggml.TYPES.items() if t.is_quantized}
    assert set(dispatch.DEQUANTIZE) == quantized
    for value, route in dispatch.DEQUANTIZE.items():
        assert route.path in dispatch.PATHS and route.note
    kernel_types = {ggml.TYPES[v].name for v, r in dispatch.DEQUANTIZE.items()
                    if r.path == dispatch.KERNEL}
    assert kernel_types == set(kernels.QUANT_SPECS)
    assert REQUIRED_KERNEL_TYPES <= kernel_types


def test_host_fallback_types_are_ones_gguf_can_dequantize():
    import gguf
    import gguf.quants

    for value, route in dispatch.DEQUANTIZE.items():
        if route.path != dispatch.HOST:
            continue
        info = ggml.TYPES[value]
        zeros = np.zeros((2, info.type_size), dtype=np.uint8)
        out = gguf.quants.dequantize(zeros, gguf.GGMLQuantizationType(value))
        assert out.shape == (2, info.block_size), info.name


def test_spec_constants_match_ggml_types():
    for name, spec in kernels.QUANT_SPECS.items():
        info = ggml.TYPES_BY_NAME[name]
        assert (spec.value, spec.block_size, spec.type_size) == (
            info.value, info.block_size, info.type_size), name
        assert kernels.QUANT_SPECS_BY_VALUE[info.value] is spec


def test_op_routes_name_real_kernels_and_overrides():
    import importlib

    from rpcserver.executor import OP_TABLE

    importlib.import_module("rpcserver.ops")  # registers the shared implementations

    sources = kernels.all_sources()
    for op_name, route in dispatch.OPS.items():
        op = ggml.Op[op_name]
        assert int(op) in OP_TABLE, f"{op_name} has no shared implementation to fall back on"
        assert route.path in dispatch.PATHS
        if route.path == dispatch.KERNEL:
            # an op override, or (weight products) the shared op calling weight_product
            assert route.hook in (dispatch.OVERRIDE, dispatch.WEIGHT_PRODUCT), op_name
            assert (int(op) in ops.OVERRIDES) == (route.hook == dispatch.OVERRIDE), op_name
            assert route.fallback == dispatch.CUPY and route.family in dispatch.KERNEL_FAMILIES
            assert route.kernels
            for ref in route.kernels:
                module, fn = ref.split(":")
                assert f'extern "C" __global__ void {fn}(' in sources[module], ref
        else:
            assert int(op) not in ops.OVERRIDES, op_name
            assert route.hook is None, op_name
    for op in ops.OVERRIDES:
        route = dispatch.OPS[ggml.op_name(op)]
        assert route.path == dispatch.KERNEL and route.hook == dispatch.OVERRIDE
    # the weight-product routes are the ones the shared code sends through weight_product
    from rpcserver_cuda.arraylib import CudaArrayLib
    from rpcserver.executor import ArrayLib

    assert CudaArrayLib.weight_product is not ArrayLib.weight_product
    assert {n for n, r in dispatch.OPS.items() if r.hook == dispatch.WEIGHT_PRODUCT} == {
        "MUL_MAT", "MUL_MAT_ID"}
    assert int(ggml.Op.MUL_MAT) not in ops.OVERRIDES  # the shared MUL_MAT runs, and tiles
    for route in dispatch.DEQUANTIZE.values():
        for ref in route.kernels:
            module, fn = ref.split(":")
            assert f'extern "C" __global__ void {fn}(' in sources[module], ref
    assert "MUL_MAT" in dispatch.describe()
    # no route still promises float32 copies kept for later
    for route in list(dispatch.OPS.values()) + list(dispatch.DEQUANTIZE.values()):
        assert "cached" not in route.note, route.note


@pytest.mark.parametrize("value, family, on", [
    (None, "soft_max", True), ("all", "rms_norm", True), ("none", "dequantize", False),
    ("dequantize,rms_norm", "rms_norm", True), ("dequantize,rms_norm", "soft_max", False),
])
def test_kernel_switch(monkeypatch, value, family, on):
    if value is None:
        monkeypatch.delenv("RPCSERVER_CUDA_KERNELS", raising=False)
    else:
        monkeypatch.setenv("RPCSERVER_CUDA_KERNELS", value)
    assert dispatch.kernels_enabled(family) is on


# ============================================================================ graph specialisation


class _Ctx:
    def __init__(self, op):
        self.node = types.SimpleNamespace(op=int(op))


def test_graph_plan_tries_the_cuda_kernels_first_and_falls_back():
    """GraphPlan wraps every op in the lib's op_overrides: kernel first, shared code if it
    declines; other ops keep the shared implementation."""
    from rpcserver import executor

    calls = []
    shared_norm = lambda ctx: calls.append(("shared", "rms_norm"))  # noqa: E731
    decisions = iter([True, False])

    def fake_kernel(ctx):
        handled = next(decisions)
        calls.append(("kernel", handled))
        return handled

    impl = executor._with_fallback(fake_kernel, shared_norm)
    impl(None)
    impl(None)
    assert calls == [("kernel", True), ("kernel", False), ("shared", "rms_norm")]
    assert ops.OVERRIDES and all(int(op) in ops.OVERRIDES for op in ops.OVERRIDES)


def test_alibi_parameters_match_the_shared_slopes():
    from rpcserver.ops.attention import alibi_slopes

    for n_head, bias in [(8, 8.0), (12, 8.0), (5, 4.0)]:
        m0, m1, n_log2 = ops.alibi_params(n_head, bias)
        h = np.arange(n_head)
        ours = np.where(h < n_log2, m0 ** (h + 1.0), m1 ** (2.0 * (h - n_log2) + 1.0))
        np.testing.assert_allclose(ours, alibi_slopes(n_head, bias), rtol=1e-6)


# ============================================================================ kernel generator


def test_one_module_per_kernel_type_with_its_constants():
    names = kernels.module_names()
    assert names == ([f"quant_{s.ident}" for s in kernels.QUANT_SPECS.values()]
                     + ["rows", "rope", "flash_attn"])
    for module in names:  # each module's kernel list is exactly what its source defines
        entries = re.findall(r'extern "C" __global__ void (\w+)\(', kernels.module_source(module))
        assert entries == kernels.kernel_names(module), module
    for spec in kernels.QUANT_SPECS.values():
        src = kernels.module_source(f"quant_{spec.ident}")
        entries = re.findall(r'extern "C" __global__ void (\w+)\(', src)
        assert entries == [spec.dequantize_kernel, spec.mul_mat_vec_kernel]
        assert entries == kernels.kernel_names(f"quant_{spec.ident}")
        # the launch arithmetic uses this type's block size and byte size
        assert f"const long long blk = i / {spec.block_size};" in src
        assert f"src + blk * {spec.type_size}" in src
        assert f"wr + (long long)blk * {spec.type_size}" in src
        assert f"__device__ __forceinline__ float {spec.element_function}(" in src
        assert "__fmaf" not in src and "fmaf(" not in src.split(spec.element_function)[1].split("}")[0]
    rows = kernels.module_source("rows")
    assert re.findall(r'extern "C" __global__ void (\w+)\(', rows) == kernels.kernel_names("rows")


def test_generated_element_functions_are_straight_line_code():
    src = kernels.module_source("quant_q4_k")
    body = src.split("float rpc_deq_q4_k(", 1)[1].split("\n}\n", 1)[0]
    assert "for" not in body and "while" not in body and "if (" not in body
    assert "__fmul_rn" in body and "__fsub_rn" in body  # float ops never fuse into FMAs


def _ggml_quantize(value: int, x: np.ndarray, n_rows: int, n_per_row: int) -> np.ndarray:
    import ggml_harness as H

    out = np.zeros(n_rows * ggml.TYPES[value].row_size(n_per_row), np.uint8)
    H._f("ggml_quantize_chunk")(value, x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                out.ctypes.data, 0, n_rows, n_per_row, None)
    return out


@pytest.mark.parametrize("name", list(kernels.QUANT_SPECS))
def test_element_formulas_reproduce_ggml_exactly(name):
    """The kernels' formulas, evaluated with NumPy, give ggml's to_float bit for bit."""
    import ggml_harness as H

    H.require_ggml()
    spec = kernels.QUANT_SPECS[name]
    rng = np.random.default_rng(spec.value)
    n_blocks = 48
    x = (rng.standard_normal(n_blocks * spec.block_size) * rng.uniform(0.01, 30)).astype(np.float32)
    x[:spec.block_size] = 0.0  # an all-zero block
    blocks = _ggml_quantize(spec.value, x, 1, n_blocks * spec.block_size).reshape(n_blocks, -1)
    # and blocks of random bytes: every bit pattern of scales and quants (NaN/inf scales too)
    noise = rng.integers(0, 256, (n_blocks, spec.type_size), dtype=np.uint8)
    for data in (blocks, noise):
        ours = qdsl.evaluate(spec.element, data, spec.block_size).reshape(-1)
        ref = H._to_float(spec.value, data.reshape(-1), data.shape[0] * spec.block_size)
        same = (ours.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(ours) & np.isnan(ref))
        assert same.all(), (f"{name}: element {int(np.argmin(same))} differs: "
                            f"ours {ours[~same][:4]} ggml {ref[~same][:4]}")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # random bytes make NaN scales
@pytest.mark.parametrize("name", [n for n in kernels.QUANT_SPECS if n not in ("Q1_0", "Q2_0")])
def test_element_formulas_match_gguf(name):
    """Where gguf has a dequantizer, it agrees too (it is the host fallback)."""
    import gguf
    import gguf.quants

    spec = kernels.QUANT_SPECS[name]
    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, (32, spec.type_size), dtype=np.uint8)
    ours = qdsl.evaluate(spec.element, data, spec.block_size)
    ref = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(spec.value)).reshape(ours.shape)
    np.testing.assert_array_equal(ours, ref)


def test_dsl_rejects_what_c_and_numpy_would_disagree_on():
    with pytest.raises(TypeError):
        qdsl.f16(0) >> 1  # shifts are integer-only
    with pytest.raises(ValueError):
        qdsl.fconst(0.1)  # not exactly a float32
    with pytest.raises(TypeError):
        bool(qdsl.J < 3)
    with pytest.raises(IndexError):
        qdsl.evaluate(qdsl.u8(qdsl.J), np.zeros((1, 4), np.uint8), 8)


# ============================================================================ NVRTC


ARCHES = ["sm_75", "sm_80", "sm_90"]  # T4, A100, H100


@pytest.mark.parametrize("module", kernels.module_names())
def test_nvrtc_compiles_every_module(module):
    """Every generated module compiles to machine code (NVRTC and ptxas run without a GPU)."""
    lib = nvrtc()
    src = kernels.module_source(module)
    for arch in ARCHES:
        prog = lib.createProgram(src, f"{module}.cu", [], [])
        try:
            try:
                lib.compileProgram(prog, [f"-arch={arch}", "-std=c++17"])
            except Exception:
                pytest.fail(f"{module} for {arch}:\n{lib.getProgramLog(prog)}")
            assert len(lib.getCUBIN(prog)) > 1000
            warnings = lib.getProgramLog(prog).strip()
            assert not warnings, warnings
        finally:
            lib.destroyProgram(prog)
    # and to PTX, where the kernel entry points are visible by name
    prog = lib.createProgram(src, f"{module}.cu", [], [])
    try:
        lib.compileProgram(prog, ["-arch=compute_80", "-std=c++17"])
        ptx = lib.getPTX(prog).decode()
    finally:
        lib.destroyProgram(prog)
    for name in kernels.kernel_names(module):
        assert re.search(rf"\.entry {name}\(", ptx), name


# ============================================================================ pip install / uninstall


def _pip(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=timeout)


def _discover_in_subprocess() -> dict:
    code = ("import json; from rpcserver.plugins import discover; r = discover(); "
            "print(json.dumps({'plugins': {p.name: [p.distribution, p.error] for p in r.plugins}, "
            "'devices': r.device_names(), 'unavailable': dict(r.unavailable)}))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(REPO / "tests"))  # not the repo root: no stray source imports
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def _packages() -> dict[str, dict]:
    """name -> ``pip list`` entry, read in a fresh process (this one's metadata may be stale)."""
    res = _pip("list", "--format=json")
    assert res.returncode == 0, res.stderr
    return {p["name"].lower(): p for p in json.loads(res.stdout)}


def _missing_requirements() -> list[str]:
    import tomllib

    deps = tomllib.loads((PLUGIN_DIR / "pyproject.toml").read_text())["project"]["dependencies"]
    missing = []
    for d in deps:
        name = re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0]
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def test_pip_install_and_uninstall(tmp_path):
    """``pip install ./plugins/cuda`` on top of rpcserver adds the plugin (no devices here, with
    the reason); uninstalling removes it and nothing else. The venv is restored afterwards."""
    if os.environ.get("RPCSERVER_TEST_NO_PIP") == "1":
        pytest.skip("RPCSERVER_TEST_NO_PIP=1")
    leftovers = [PLUGIN_DIR / "build", PLUGIN_DIR / "rpcserver_cuda.egg-info"]
    existed = {p for p in leftovers if p.exists()}
    before = _packages().get(DIST)
    was_editable = bool(before and before.get("editable_project_location"))
    if before is not None:
        res = _pip("uninstall", "-y", DIST)
        assert res.returncode == 0, res.stderr
    # The heavy CUDA library wheels (cuBLAS: ~600 MB) are not needed to load the plugin; when
    # they are absent, install without dependencies and check the rest resolves.
    missing = _missing_requirements()
    t0 = time.monotonic()
    flags = ["--no-deps"] if missing else []
    try:
        res = _pip("install", *flags, str(PLUGIN_DIR))
        assert res.returncode == 0, res.stdout + res.stderr
        took = time.monotonic() - t0
        packages_with = set(_packages())
        info = _discover_in_subprocess()
        assert info["plugins"]["cuda"] == [DIST, None]
        assert "CPU" in info["devices"]
        if not real_probe().gpus:
            assert "cuda" in info["unavailable"] and info["unavailable"]["cuda"]
        else:
            assert "CUDA0" in info["devices"]

        res = _pip("uninstall", "-y", DIST)
        assert res.returncode == 0, res.stderr
        packages_without = set(_packages())
        assert packages_with - packages_without == {DIST}
        info = _discover_in_subprocess()
        assert "cuda" not in info["plugins"] and "cuda" not in info["unavailable"]
        assert not any(n.startswith("CUDA") for n in info["devices"])
        assert "CPU" in info["devices"] and info["plugins"]["cpu"][1] is None
        print(f"pip install ./plugins/cuda took {took:.1f}s (missing deps: {missing or 'none'})")
    finally:
        # leave the venv as it was found
        now = _packages().get(DIST)
        if before is not None and now is None:
            extra = ["-e"] if was_editable else []
            _pip("install", "--no-deps", *extra, str(PLUGIN_DIR))
        elif before is None and now is not None:
            _pip("uninstall", "-y", DIST)
        import shutil

        for path in leftovers:  # what setuptools leaves in the source tree
            if path not in existed:
                shutil.rmtree(path, ignore_errors=True)


def test_gpu_buffers_transfers_fill_copy_and_memory(cuda):
    free0, total = cuda.memory()
    assert 0 < free0 <= total
    size = 96 * MIB
    buf = cuda.alloc_buffer(size)
    assert buf is not None and buf.host_view(0, 16) is None
    try:
        assert cuda.memory()[0] <= free0 - size + 8 * MIB
        data = np.random.default_rng(0).integers(0, 256, 64 * MIB, dtype=np.uint8)
        with buf.writer(4096, data.size) as view:  # what SET_TENSOR does (<= 64 MiB per call)
            view[:] = data.tobytes()
        with buf.reader(4096, data.size) as view:
            assert bytes(view[:1024]) == data[:1024].tobytes()
            assert np.array_equal(np.frombuffer(view, np.uint8), data)
        # an aborted writer commits nothing
        with pytest.raises(RuntimeError):
            with buf.writer(0, 16) as view:
                view[:] = b"x" * 16
                raise RuntimeError("client went away")
        buf.write(0, b"\x01\x02\x03\x04")
        assert bytes(buf.read(0, 4)) == b"\x01\x02\x03\x04"
        buf.fill(8, 100, 0xAB)
        assert bytes(buf.read(8, 100)) == b"\xab" * 100
        # COPY_TENSOR stays on the device, overlapping ranges of one buffer included
        buf.copy_from(buf, 4096, 4096 + 1000, 5000)
        expect = np.concatenate([data[:1000], data[:5000]])
        assert bytes(buf.read(4096, 6000)) == expect.tobytes()
        other = cuda.alloc_buffer(1 * MIB)
        try:
            other.copy_from(buf, 0, 10, 4)
            assert bytes(other.read(10, 4)) == b"\x01\x02\x03\x04"
        finally:
            other.free()
    finally:
        buf.free()
    assert cuda.alloc_buffer(total * 4) is None  # out of memory is an answer, not an error


@pytest.mark.parametrize("name", list(kernels.QUANT_SPECS))
def test_gpu_dequantize_kernels_match_ggml_bit_for_bit(cuda, name):
    import ggml_harness as H

    H.require_ggml()
    spec = kernels.QUANT_SPECS[name]
    rng = np.random.default_rng(spec.value)
    n_rows, n_per_row = 6, spec.block_size * 5
    x = (rng.standard_normal(n_rows * n_per_row) * 3).astype(np.float32)
    raw = _ggml_quantize(spec.value, x, n_rows, n_per_row)
    ref = H._to_float(spec.value, raw, n_rows * n_per_row)
    lib = cuda.array_lib
    buf = cuda.alloc_buffer(raw.size + 64)
    try:
        buf.write(64, raw.tobytes())
        row_bytes = raw.size // n_rows
        with cuda.activate():
            rows = lib.view(buf, 64, (1, 1, n_rows, row_bytes), (0, 0, row_bytes, 1), np.uint8)
            got = lib.to_numpy(lib.dequantize(rows, spec.value)).reshape(-1)
        np.testing.assert_array_equal(got.view(np.uint32), ref.view(np.uint32))
    finally:
        buf.free()


def _G(name):
    import ggml_harness as H
    from ggml_harness import c_float, c_void_p

    sigs = {
        "ggml_add": (c_void_p, c_void_p, c_void_p, c_void_p),
        "ggml_mul": (c_void_p, c_void_p, c_void_p, c_void_p),
        "ggml_mul_mat": (c_void_p, c_void_p, c_void_p, c_void_p),
        "ggml_get_rows": (c_void_p, c_void_p, c_void_p, c_void_p),
        "ggml_cpy": (c_void_p, c_void_p, c_void_p, c_void_p),
        "ggml_rms_norm": (c_void_p, c_void_p, c_void_p, c_float),
        "ggml_soft_max_ext": (c_void_p, c_void_p, c_void_p, c_void_p, c_float, c_float),
        "ggml_mul_mat_id": (c_void_p, c_void_p, c_void_p, c_void_p, c_void_p),
        "ggml_flash_attn_ext": (c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p,
                                c_float, c_float, c_float),
        "ggml_rope_ext": (c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, H.c_int, H.c_int,
                          H.c_int, c_float, c_float, c_float, c_float, c_float, c_float),
    }
    return H.fn(name, *sigs[name])


GPU_MUL_MAT_TYPES = ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
                     "Q5_K", "Q6_K", "IQ4_NL", "MXFP4", "IQ2_XXS"]


@pytest.mark.parametrize("n", [1, 5, 64], ids=["vec", "few", "gemm"])
@pytest.mark.parametrize("wtype", GPU_MUL_MAT_TYPES)
def test_gpu_mul_mat(cuda, wtype, n):
    """At most 8 columns (n = 1: 2 columns): the fused quantized mat-vec kernel on the blocks in
    place, via CudaArrayLib.weight_product; more (n = 5: 10, n = 64: 128): the weights widened a
    tile of rows at a time by the dequantize kernel, and cuBLAS."""
    import ggml_harness as H

    H.require_ggml()
    t = ggml.TYPES_BY_NAME[wtype].value
    with H.GgmlCase(seed=n) as case:
        a = case.new_tensor(t, (512, 48))
        b = case.new_tensor(H.F32, (512, n, 2))
        out = case.mark_output(_G("ggml_mul_mat")(case.ctx, a, b))
        case.check(cuda, [out], max_nmse=5e-4)  # test-backend-ops' MUL_MAT bound
    spec = kernels.QUANT_SPECS.get(wtype)
    if spec is not None and isinstance(cuda.cupy, NumpyCupy):  # the route the dispatch table names
        fused = 2 * n <= kernels.MMV_MAX_COLS
        used, unused = ((spec.mul_mat_vec_kernel, spec.dequantize_kernel) if fused
                        else (spec.dequantize_kernel, spec.mul_mat_vec_kernel))
        assert launches(cuda, used) >= 1, f"{used} was not launched"
        assert launches(cuda, unused) == -1, f"{unused} ran too"


def test_gpu_elementwise_norm_softmax_rope_getrows_cpy(cuda):
    import ggml_harness as H

    H.require_ggml()
    F32, F16 = H.F32, H.F16
    with H.GgmlCase(seed=1) as case:
        x = case.new_tensor(F32, (256, 7, 3))
        y = case.new_tensor(F32, (256, 1, 3))
        s = _G("ggml_add")(case.ctx, x, y)
        m = _G("ggml_mul")(case.ctx, s, case.permuted(F32, (256, 7, 3), (0, 2, 1, 3)))
        outs = [case.mark_output(m),
                case.mark_output(_G("ggml_rms_norm")(case.ctx, x, 1e-6)),
                case.mark_output(_G("ggml_rms_norm")(case.ctx, case.permuted(F32, (64, 5, 4),
                                                                             (0, 2, 1, 3)), 1e-5))]
        case.check(cuda, outs, max_nmse=1e-7)
    if isinstance(cuda.cupy, NumpyCupy):
        assert launches(cuda, kernels.RMS_NORM_KERNEL) == 2
    for mask_type, max_bias in [(None, 0.0), (F16, 0.0), (F32, 8.0)]:
        with H.GgmlCase(seed=2, fill_range=(-5.0, 5.0)) as case:
            a = case.new_tensor(F32, (96, 13, 8, 2))
            mask = case.new_tensor(mask_type, (96, 16, 1, 1)) if mask_type is not None else None
            out = case.mark_output(_G("ggml_soft_max_ext")(case.ctx, a, mask, 0.125, max_bias))
            case.check(cuda, [out], max_nmse=1e-9)
    if isinstance(cuda.cupy, NumpyCupy):
        assert all(launches(cuda, k) == 1 for k in kernels.SOFT_MAX_KERNELS.values())
    for mode in (0, 2):  # normal, NeoX
        with H.GgmlCase(seed=3) as case:
            a = case.new_tensor(F32, (128, 8, 9))
            pos = case.new_tensor(H.I32, (9,), fill=lambda rng, ne: rng.integers(0, 4096, 9))
            out = case.mark_output(_G("ggml_rope_ext")(case.ctx, a, pos, None, 128, mode, 4096,
                                                       10000.0, 1.0, 0.0, 1.0, 32.0, 1.0))
            # test-backend-ops' default bound: on CuPy the shared code's float32 cumprod of the
            # theta series is a parallel scan, rounded unlike ggml's sequential loop
            case.check(cuda, [out], max_nmse=1e-7)
    for t in ("F16", "Q8_0", "Q4_K", "IQ4_NL"):
        with H.GgmlCase(seed=4) as case:
            table = case.new_tensor(ggml.TYPES_BY_NAME[t].value, (256, 20))
            idx = case.new_tensor(H.I32, (7,), fill=lambda rng, ne: rng.integers(0, 20, 7))
            out = case.mark_output(_G("ggml_get_rows")(case.ctx, table, idx))
            case.check(cuda, [out], max_nmse=0.0)
    with H.GgmlCase(seed=5) as case:
        a = case.new_tensor(F32, (64, 6))
        dst = case.new_tensor(F16, (64, 6))
        out = case.mark_output(_G("ggml_cpy")(case.ctx, a, dst))
        case.check(cuda, [out], max_nmse=0.0)


def test_gpu_flash_attention_and_moe(cuda):
    import ggml_harness as H

    H.require_ggml()
    F32, F16 = H.F32, H.F16
    with H.GgmlCase(seed=6) as case:
        q = case.new_tensor(F32, (64, 7, 4, 1))
        k = case.new_tensor(F16, (64, 96, 2, 1))
        v = case.new_tensor(F16, (64, 96, 2, 1))
        mask = case.new_tensor(F16, (96, 7, 1, 1))
        out = case.mark_output(_G("ggml_flash_attn_ext")(case.ctx, q, k, v, mask, 0.125, 0.0, 0.0))
        case.check(cuda, [out], max_nmse=5e-4)
    with H.GgmlCase(seed=7) as case:
        experts = case.new_tensor(ggml.TYPES_BY_NAME["Q4_0"].value, (256, 32, 6))
        b = case.new_tensor(F32, (256, 1, 5))
        ids = case.new_tensor(H.I32, (2, 5), fill=lambda rng, ne: np.stack(
            [rng.choice(6, 2, replace=False) for _ in range(5)]).reshape(-1))
        out = case.mark_output(_G("ggml_mul_mat_id")(case.ctx, experts, b, ids))
        case.check(cuda, [out], max_nmse=5e-4)


def test_gpu_kernels_off_gives_the_same_results(cuda, monkeypatch):
    """RPCSERVER_CUDA_KERNELS=none: every kernel falls back (host dequantization, shared ops)."""
    import ggml_harness as H

    H.require_ggml()
    monkeypatch.setenv("RPCSERVER_CUDA_KERNELS", "none")
    with H.GgmlCase(seed=8) as case:
        a = case.new_tensor(ggml.TYPES_BY_NAME["Q4_K"].value, (512, 16))
        b = case.new_tensor(H.F32, (512, 1))
        mm = _G("ggml_mul_mat")(case.ctx, a, b)
        out = case.mark_output(_G("ggml_rms_norm")(case.ctx, mm, 1e-6))
        case.check(cuda, [out], max_nmse=5e-4)
    if isinstance(cuda.cupy, NumpyCupy):
        assert not cuda.cupy.kernels, "a kernel ran although RPCSERVER_CUDA_KERNELS=none"


def _serve_cuda0(tmp_path):
    import llamacpp as h

    port = h.free_port()
    env = cli_env(tmp_path)
    proc = h.start_rpcserver(port, extra_args=("-d", "CUDA0"), log_path=tmp_path / "serve.log",
                             env={"PYTHONPATH": env.get("PYTHONPATH")})
    return proc, port


def test_gpu_serve_cuda0_end_to_end_protocol(gpu, tmp_path):
    import llamacpp as h
    from rpcserver.client import RpcClient
    from rpcserver.protocol import make_tensor

    proc, port = _serve_cuda0(tmp_path)
    try:
        with RpcClient("127.0.0.1", port) as c:
            assert c.device_count() == 1
            assert c.get_alignment(0) == 128
            free, total = c.get_device_memory(0)
            assert 0 < free <= total
            n = 1 << 22  # 16 MiB of floats per tensor
            handle, size = c.alloc_buffer(0, 3 * 4 * n)
            assert handle and size == 3 * 4 * n
            base = c.buffer_get_base(handle)
            a = make_tensor(id=1, type=0, buffer=handle, ne=(n,), data=base, name="a")
            b = make_tensor(id=2, type=0, buffer=handle, ne=(n,), data=base + 4 * n, name="b")
            s = make_tensor(id=3, type=0, buffer=handle, ne=(n,), data=base + 8 * n,
                            op=int(ggml.Op.ADD), src=(1, 2), name="a+b")
            x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
            c.set_tensor(a, 0, x)
            c.set_tensor(b, 0, np.full(n, 0.5, dtype=np.float32))
            c.graph_compute(0, [s.id], [a, b, s])
            got = np.frombuffer(c.get_tensor(s, 0, 4 * n), np.float32)
            np.testing.assert_array_equal(got, x + np.float32(0.5))
            assert c.copy_tensor(s, a)
            np.testing.assert_array_equal(np.frombuffer(c.get_tensor(a, 0, 4 * n), np.float32), got)
            c.memset_tensor(b, 0, 4 * n, 0)
            c.graph_recompute(0)
            np.testing.assert_array_equal(np.frombuffer(c.get_tensor(s, 0, 4 * n), np.float32), got)
            c.free_buffer(handle)
    finally:
        h.stop(proc)
    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert "CUDA0" in log and "Traceback" not in log, log[-3000:]


E2E_CASES = [("llama", "Q4_K_M", False), ("qwen3", "Q4_0", True), ("llama", "F16", True),
             ("qwen3moe", "Q8_0", False)]


@pytest.mark.parametrize("arch, ftype, fa", E2E_CASES, ids=lambda v: str(v))
def test_gpu_llamacpp_models_on_cuda0_match_the_cpu(gpu, tmp_path, arch, ftype, fa):
    """llama.cpp offloads every layer to ``rpcserver serve -d CUDA0``; logits match the CPU's
    (the checks and tolerances of tests/test_e2e_llamacpp.py)."""
    import llamacpp as h
    import test_e2e_llamacpp as E
    from models import ModelCache

    h.skip_unless_available(libllama=True)
    models = ModelCache(tmp_path / "models")
    model = models.get(arch, ftype)
    twin = models.get_dequantized(arch, ftype) if ftype != "F32" else None
    proc, port = _serve_cuda0(tmp_path)
    try:
        res, tail = E.run_client(model, [f"127.0.0.1:{port}"], tmp_path / "result.json",
                                 flash_attn=fa, twin=twin)
    finally:
        h.stop(proc)
    log = (tmp_path / "serve.log").read_text(errors="replace")
    assert res is not None, f"{tail}\n--- server log tail:\n{log[-3000:]}"
    print(f"CUDA0 {arch}-{ftype}-{'fa' if fa else 'nofa'}: {E.summary(res)}")
    bad = E.check_result(res, f"{arch}-{ftype}")
    assert not bad, "\n".join(bad) + f"\n--- server log tail:\n{log[-3000:]}"
