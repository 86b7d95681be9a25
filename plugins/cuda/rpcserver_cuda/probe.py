"""Finding CUDA GPUs through CuPy's runtime bindings, and saying why there are none.

Nothing here imports CuPy at module import time: :func:`import_cupy` does, when
devices are enumerated, so a machine without CuPy (or with a CuPy that cannot
load) still loads the plugin and reports the reason.

Which GPUs, and in which order, is the CUDA runtime's business, exactly as for
ggml's CUDA backend: ``CUDA_VISIBLE_DEVICES`` (``0,2``, ``GPU-<uuid>``, or empty
for none) selects and reorders what the runtime shows, ``CUDA_DEVICE_ORDER``
(``FASTEST_FIRST`` by default, or ``PCI_BUS_ID``) orders it, and device ``i`` of
the runtime is named ``CUDA<i>``. With the same environment, rpcserver and
llama.cpp's ``rpc-server`` give every GPU the same name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

# cudaError_t values the reasons distinguish
CUDA_ERROR_INITIALIZATION = 3
CUDA_ERROR_INSUFFICIENT_DRIVER = 35
CUDA_ERROR_DEVICES_UNAVAILABLE = 46
CUDA_ERROR_NO_DEVICE = 100
CUDA_ERROR_SYSTEM_DRIVER_MISMATCH = 803
CUDA_ERROR_COMPAT_NOT_SUPPORTED = 804

#: oldest compute capability the kernels target (they use warp shuffles with masks)
MIN_COMPUTE_CAPABILITY = (5, 0)


@dataclass
class GpuInfo:
    index: int                 # the runtime's device number
    name: str                  # cudaDeviceProp.name, ggml's description
    total_memory: int          # cudaDeviceProp.totalGlobalMem
    compute_capability: tuple[int, int]
    pci_bus_id: str = ""


@dataclass
class ProbeResult:
    gpus: list[GpuInfo] = field(default_factory=list)
    #: why there are no usable GPUs (None when there are)
    reason: str | None = None
    #: GPUs found but skipped, with why (too old...)
    skipped: list[str] = field(default_factory=list)
    cupy: object = None
    driver_version: int = 0    # e.g. 12040 for CUDA 12.4; 0: no driver
    runtime_version: int = 0


def version_text(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}" if v else "none"


def import_cupy():
    """(cupy module, None) or (None, reason). Tests replace this to fake a runtime."""
    try:
        import cupy
    except ImportError as exc:
        return None, (f"CuPy is not installed ({exc}); install the plugin's dependencies: "
                      f"pip install cupy-cuda12x")
    except Exception as exc:  # a CuPy that fails to initialise must not break the server
        return None, f"CuPy failed to import: {type(exc).__name__}: {exc}"
    return cupy, None


def _visible_devices_note() -> str:
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return ""
    return f" (CUDA_VISIBLE_DEVICES={value!r})"


def _decode(name) -> str:
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode("utf-8", "replace")
    return str(name).strip()


def _error_status(exc) -> int | None:
    status = getattr(exc, "status", None)
    return int(status) if isinstance(status, int) else None


def probe() -> ProbeResult:
    """Enumerate the CUDA devices the runtime shows, or explain their absence."""
    cupy, why = import_cupy()
    if cupy is None:
        return ProbeResult(reason=why)
    result = ProbeResult(cupy=cupy)
    rt = cupy.cuda.runtime
    try:
        result.runtime_version = int(rt.runtimeGetVersion())
    except Exception:  # noqa: BLE001 - informational only
        result.runtime_version = 0
    try:
        result.driver_version = int(rt.driverGetVersion())
    except Exception:  # noqa: BLE001
        result.driver_version = 0
    runtime = version_text(result.runtime_version)

    try:
        count = int(rt.getDeviceCount())
    except Exception as exc:  # CUDARuntimeError, or anything a broken install raises
        status = _error_status(exc)
        if status == CUDA_ERROR_NO_DEVICE:
            result.reason = f"no CUDA device found{_visible_devices_note()}"
        elif status == CUDA_ERROR_INSUFFICIENT_DRIVER and result.driver_version == 0:
            result.reason = ("no CUDA driver: libcuda.so could not be loaded (no NVIDIA driver "
                             "installed, or not visible in this container)")
        elif status in (CUDA_ERROR_INSUFFICIENT_DRIVER, CUDA_ERROR_COMPAT_NOT_SUPPORTED):
            result.reason = (f"the CUDA driver is too old: it supports CUDA "
                             f"{version_text(result.driver_version)}, CuPy's runtime is CUDA "
                             f"{runtime}; update the NVIDIA driver")
        elif status == CUDA_ERROR_SYSTEM_DRIVER_MISMATCH:
            result.reason = ("the NVIDIA kernel module and the user-space driver (libcuda.so) "
                             "have different versions; reboot or reinstall the driver")
        elif status == CUDA_ERROR_DEVICES_UNAVAILABLE:
            result.reason = ("every CUDA device is busy or unavailable (exclusive-process "
                             "compute mode held by another process?)")
        elif status == CUDA_ERROR_INITIALIZATION:
            result.reason = f"the CUDA driver failed to initialise: {exc}"
        else:
            result.reason = f"CUDA is unavailable: {type(exc).__name__}: {exc}"
        return result
    if count <= 0:
        result.reason = f"no CUDA device found{_visible_devices_note()}"
        return result

    for i in range(count):
        try:
            props = rt.getDeviceProperties(i)
        except Exception as exc:  # noqa: BLE001
            result.skipped.append(f"CUDA{i}: cannot read its properties: {exc}")
            continue
        cc = (int(props.get("major", 0)), int(props.get("minor", 0)))
        info = GpuInfo(i, _decode(props.get("name", f"CUDA device {i}")),
                       int(props.get("totalGlobalMem", 0)), cc,
                       _pci_bus_id(props))
        if cc < MIN_COMPUTE_CAPABILITY:
            result.skipped.append(f"CUDA{i} ({info.name}) has compute capability "
                                  f"{cc[0]}.{cc[1]}, below the {MIN_COMPUTE_CAPABILITY[0]}."
                                  f"{MIN_COMPUTE_CAPABILITY[1]} the kernels need")
            continue
        result.gpus.append(info)
    if not result.gpus:
        result.reason = "; ".join(result.skipped) or "no usable CUDA device"
    return result


def _pci_bus_id(props) -> str:
    try:
        return "{:04x}:{:02x}:{:02x}.0".format(int(props.get("pciDomainID", 0)),
                                                int(props.get("pciBusID", 0)),
                                                int(props.get("pciDeviceID", 0)))
    except (TypeError, ValueError):
        return ""


def nvrtc_problem(cupy) -> str | None:
    """Why CuPy cannot compile kernels (NVRTC missing), or None.

    CuPy compiles every kernel it runs (its own element-wise ones included)
    with NVRTC, so without it no graph can run.
    """
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # noqa: BLE001
        return (f"NVRTC (the CUDA runtime compiler) cannot be loaded: {type(exc).__name__}: "
                f"{_one_line(exc)}; pip install nvidia-cuda-nvrtc-cu12, or install the CUDA toolkit")
    return None


def cublas_problem(cupy) -> str | None:
    """Why cuBLAS (used for every float matrix product) cannot be loaded, or None."""
    try:
        from cupy_backends.cuda.libs import cublas

        cublas.getVersion  # noqa: B018 - the import loads the library
    except Exception as exc:  # noqa: BLE001
        return (f"cuBLAS cannot be loaded: {type(exc).__name__}: {_one_line(exc)}; pip install "
                f"nvidia-cublas-cu12, or install the CUDA toolkit")
    return None


def _one_line(exc) -> str:
    return " ".join(str(exc).split())
