"""Compile the CUDA plugin's generated kernel source for the host and launch it like CuPy does.

``HostModule(source)`` is what ``cupy.RawModule(code=source)`` is on a GPU: the same
text, compiled by g++ with :file:`cuda_host.h` (fibers for CUDA threads, barriers for
``__syncthreads`` and warp shuffles, see that file), and ``get_function(name)`` returns a
kernel called as CuPy calls one: ``kernel(grid, block, args)``. Each argument is checked
against the C signature in the source (device arrays for pointers, ``np.int64`` for
``long long``, ``np.int32`` for ``int``, ``np.float32`` for ``float``, ``np.uint64`` for
a raw pointer), which is the argument-list check a GPU would not do for us either.

Built libraries are cached by a hash of source and header under the temporary directory.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

HEADER = Path(__file__).resolve().parent / "cuda_host.h"
_CACHE = Path(tempfile.gettempdir()) / f"rpcserver-cuda-host-{os.getuid()}"
_SIGNATURE = re.compile(r'extern "C" __global__ void (\w+)\(([^)]*)\)')
_CTYPES = {"ptr": ctypes.c_void_p, "long long": ctypes.c_longlong, "int": ctypes.c_int,
           "float": ctypes.c_float}
#: what CuPy accepts for each C parameter type (and what the plugin must pass)
ABI = {"ptr": (np.ndarray, np.uint64), "long long": (np.int64,), "int": (np.int32,),
       "float": (np.float32,)}
_lock = threading.Lock()


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def kernel_signatures(source: str) -> dict[str, list[tuple[str, str]]]:
    """kernel name -> [(kind, parameter name)] with kind "ptr", "long long", "int" or "float"."""
    out = {}
    for name, params in _SIGNATURE.findall(source):
        parsed = []
        for p in params.split(","):
            words = p.replace("__restrict__", " ").replace("*", " * ").split()
            words = [w for w in words if w != "const"]
            pname = words[-1]
            kind = "ptr" if "*" in words else " ".join(words[:-1])
            if kind not in _CTYPES:
                raise ValueError(f"kernel {name}: parameter {p.strip()!r} has a type the tests "
                                 f"cannot pass ({kind!r}); use a pointer, long long, int or float")
            parsed.append((kind, pname))
        out[name] = parsed
    return out


def _launchers(signatures) -> str:
    parts = ['\nextern "C" const char *rpc_emu_error(void) { return rpc_emu::g_error; }\n']
    for name, params in signatures.items():
        decl = ", ".join(("void *" if kind == "ptr" else kind) + f" a{i}"
                         for i, (kind, _) in enumerate(params))
        call_args = ", ".join(f"rpc_emu_arg<{i}>(&{name}, a{i})" for i in range(len(params)))
        parts.append(f"""
extern "C" int rpc_emu_launch_{name}(unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                     unsigned by, unsigned bz{', ' + decl if decl else ''}) {{
    auto call = [&]() {{ {name}({call_args}); }};
    return rpc_emu::launch(dim3{{gx, gy, gz}}, dim3{{bx, by, bz}},
                           [](void *p) {{ (*static_cast<decltype(call) *>(p))(); }}, &call);
}}
""")
    return "".join(parts)


_ARG_CAST = """
#include <tuple>
#include <type_traits>
// the i-th parameter type of a kernel, to cast the launcher's plain argument to it
template <class F> struct rpc_emu_params;
template <class... A> struct rpc_emu_params<void (*)(A...)> { using type = std::tuple<A...>; };
template <int I, class F, class V> inline auto rpc_emu_arg(F, V v) {
    using P = std::tuple_element_t<I, typename rpc_emu_params<F>::type>;
    return (P)v;
}
"""


class HostKernel:
    def __init__(self, module: "HostModule", name: str, params):
        self.name, self.params = name, params
        self._fn = getattr(module.lib, f"rpc_emu_launch_{name}")
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [ctypes.c_uint] * 6 + [_CTYPES[k] for k, _ in params]
        self._error = module.lib.rpc_emu_error
        self._error.restype = ctypes.c_char_p
        self.launches = 0

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        if len(args) != len(self.params):
            raise TypeError(f"{self.name} takes {len(self.params)} arguments, got {len(args)}")
        values = []
        for i, (arg, (kind, pname)) in enumerate(zip(args, self.params)):
            if not isinstance(arg, ABI[kind]):
                raise TypeError(f"{self.name} argument {i} ({pname}): {type(arg).__name__} "
                                f"passed for a {kind} parameter")
            if kind == "ptr":
                values.append(arg.ctypes.data if isinstance(arg, np.ndarray) else int(arg))
            else:
                values.append(arg.item())
        grid, block = tuple(grid) + (1,) * (3 - len(grid)), tuple(block) + (1,) * (3 - len(block))
        if not all(isinstance(g, (int, np.integer)) and g >= 1 for g in grid + block):
            raise ValueError(f"{self.name}: bad launch geometry grid {grid} block {block}")
        if block[0] % 32:
            raise ValueError(f"{self.name}: blockDim.x {block[0]} is not a multiple of 32")
        self.launches += 1
        rc = self._fn(*(int(g) for g in grid), *(int(b) for b in block), *values)
        if rc:
            raise RuntimeError(f"{self.name}: {self._error().decode()}")


class HostModule:
    """A kernel module compiled for the host (``cupy.RawModule``'s counterpart)."""

    def __init__(self, source: str):
        self.signatures = kernel_signatures(source)
        full = source + _ARG_CAST + _launchers(self.signatures)
        flags = " ".join(_sanitize_flags()).encode()
        key = hashlib.sha256(HEADER.read_bytes() + flags + full.encode()).hexdigest()[:24]
        lib_path = _CACHE / f"{key}.so"
        with _lock:
            if not lib_path.exists():
                _build(full, lib_path)
        self.lib = ctypes.CDLL(str(lib_path))
        self._kernels: dict[str, HostKernel] = {}

    def get_function(self, name: str) -> HostKernel:
        if name not in self._kernels:
            if name not in self.signatures:
                raise KeyError(f"no kernel {name!r} in the module (has {sorted(self.signatures)})")
            self._kernels[name] = HostKernel(self, name, self.signatures[name])
        return self._kernels[name]


def asan_active() -> bool:
    """Whether this process runs under AddressSanitizer (libasan preloaded, see test_cuda_host)."""
    return "libasan" in os.environ.get("LD_PRELOAD", "")


def _sanitize_flags() -> list[str]:
    return ["-fsanitize=address", "-fno-omit-frame-pointer"] if asan_active() else []


def _build(source: str, lib_path: Path) -> None:
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) to build the CUDA kernels for the host")
    _CACHE.mkdir(parents=True, exist_ok=True)
    src = lib_path.with_suffix(".cpp")
    src.write_text(source)
    tmp = lib_path.with_suffix(f".{os.getpid()}.tmp")
    cmd = [cxx, "-std=c++17", "-O2", "-fPIC", "-shared", "-U_FORTIFY_SOURCE",
           "-D_FORTIFY_SOURCE=0", "-fno-strict-aliasing", "-w", *_sanitize_flags(),
           "-include", str(HEADER), "-x", "c++", str(src), "-o", str(tmp)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode:
        raise RuntimeError(f"g++ could not build the kernels for the host:\n{res.stderr[-6000:]}")
    os.replace(tmp, lib_path)
