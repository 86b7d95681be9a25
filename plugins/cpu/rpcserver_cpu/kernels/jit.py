"""Numba building blocks shared by every CPU kernel: options, bit casts, half floats.

Numba has no float16 scalars on the CPU; the intrinsics below reach LLVM's
``half`` type directly, so a conversion is one ``vcvtph2ps`` where the CPU has
F16C. Kernels are compiled with :data:`KERNEL_OPTIONS`: cached on disk
(``cache=True``: a later process loads the machine code instead of compiling),
``nogil`` (other sessions keep serving while a kernel runs) and ``fastmath``
(re-associated float sums, so reductions vectorise; the results still differ
from exact arithmetic only by float32 rounding).

The disk cache is keyed by all of this package's sources (but ``launch.py``,
which compiles nothing), not only the file of the kernel: the kernels in
``blocks.py`` inline the type functions of the other modules, and numba's own
key (the kernel file's modification time) would keep serving machine code
built from an older ``legacy.py``.

Threads: numba's ``tbb`` layer, unless ``NUMBA_THREADING_LAYER`` says
otherwise. A decode step launches a few hundred kernels, so what a launch
costs matters (measured on this 2-core machine): workqueue ~120 us, GNU
OpenMP ~3 us, TBB ~6 us. OpenMP is out: GNU OpenMP hangs a process that
forks after a parallel region (the test suite forks llama.cpp's reference
computations, which use the same libgomp). TBB is thread- and fork-safe,
but the ``tbb`` wheel puts ``libtbb.so.12`` in ``<prefix>/lib``, which the
loader does not search: :func:`_load_tbb` opens it first. Without it,
workqueue (fork-safe, not thread-safe: :func:`rpcserver_cpu.kernels.launch.launch`
runs one kernel at a time either way).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numba
from llvmlite import ir
from numba import njit, types
from numba.core import caching
from numba.extending import intrinsic

_KERNELS_DIR = Path(__file__).resolve().parent


#: modules of this package that hold no compiled code (editing them keeps the cache)
_NOT_COMPILED = {"launch.py"}


def _sources_stamp() -> str:
    digest = hashlib.sha256()
    for path in sorted(_KERNELS_DIR.glob("*.py")):
        if path.name not in _NOT_COMPILED:
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


_SOURCES_STAMP = _sources_stamp()


class _KernelSources:
    """Mixin for numba cache locators: this package's functions, stamped by all its sources."""

    @classmethod
    def from_function(cls, py_func, py_file):
        if Path(py_file).resolve().parent != _KERNELS_DIR:
            return None
        return super().from_function(py_func, py_file)

    def get_source_stamp(self):
        return _SOURCES_STAMP


class _UserProvidedLocator(_KernelSources, caching.UserProvidedCacheLocator):
    pass


class _InTreeLocator(_KernelSources, caching.InTreeCacheLocator):
    pass


class _UserWideLocator(_KernelSources, caching.UserWideCacheLocator):
    pass


# NUMBA_CACHE_DIR first, as numba's own order has it; then beside the sources; then ~/.cache
caching.CacheImpl._locator_classes[:0] = [_UserProvidedLocator, _InTreeLocator, _UserWideLocator]

def _load_tbb() -> bool:
    """Open the tbb wheel's libtbb (global symbols) so numba's tbb layer can load; True if so."""
    import ctypes
    import sys

    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        for name in ("libtbb.so.12", "libtbb.12.dylib", "tbb12.dll"):
            for folder in ("lib", "Library/bin", "bin"):
                path = Path(prefix, folder, name)
                if path.exists():
                    try:
                        ctypes.CDLL(str(path), mode=getattr(ctypes, "RTLD_GLOBAL", 0))
                        return True
                    except OSError:
                        continue
    try:
        ctypes.CDLL("libtbb.so.12", mode=getattr(ctypes, "RTLD_GLOBAL", 0))
        return True
    except OSError:
        return False


if not os.environ.get("NUMBA_THREADING_LAYER"):
    numba.config.THREADING_LAYER = "tbb" if _load_tbb() else "workqueue"

#: options of the parallel kernels (entry points)
KERNEL_OPTIONS = dict(cache=os.environ.get("RPCSERVER_NO_JIT_CACHE") is None, nogil=True, fastmath=True, parallel=True, error_model="numpy")
#: options of small serial kernels: waking the parallel workers costs more than their work
#: (measured 1.3-1.8 ms a launch on a busy 2-core machine, for 2048 additions)
SERIAL_OPTIONS = dict(cache=KERNEL_OPTIONS["cache"], nogil=True, fastmath=True,
                      error_model="numpy")
#: options of the small ops' kernels (:mod:`.rowops`): serial, and without fastmath, so each
#: float operation rounds where ggml's C rounds it (no reassociation, no contracted FMAs)
EXACT_OPTIONS = dict(cache=KERNEL_OPTIONS["cache"], nogil=True, error_model="numpy")
#: options of the per-block helpers, inlined into the kernels
INLINE_OPTIONS = dict(inline="always", fastmath=True, error_model="numpy")


@intrinsic
def half_to_f32(typingctx, bits):
    """The IEEE half with bit pattern ``bits`` (uint16) as float32, exactly."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def f32_to_half(typingctx, value):
    """The bit pattern (uint16) of the IEEE half nearest ``value`` (float32), ties to even:
    what F16C's ``vcvtps2ph`` and ggml's ``GGML_FP32_TO_FP16`` give."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen


@intrinsic
def f32_bits_to_f32(typingctx, bits):
    """The float32 with bit pattern ``bits`` (uint32)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@njit(**INLINE_OPTIONS)
def le_u16(row, o):
    """The little-endian uint16 at byte ``o`` of the uint8 array ``row``."""
    return types.uint16(row[o]) | (types.uint16(row[o + 1]) << types.uint16(8))


@njit(**INLINE_OPTIONS)
def le_u32(row, o):
    """The little-endian uint32 at byte ``o`` of the uint8 array ``row``."""
    u32 = types.uint32
    return u32(u32(row[o]) | (u32(row[o + 1]) << u32(8)) | (u32(row[o + 2]) << u32(16))
               | (u32(row[o + 3]) << u32(24)))


@njit(**INLINE_OPTIONS)
def half_at(row, o):
    """The little-endian IEEE half at byte ``o`` of ``row``, as float32 (ggml_half fields)."""
    return half_to_f32(le_u16(row, o))


@njit(**INLINE_OPTIONS)
def bf16_to_f32(bits):
    """bfloat16 bits (uint16) as float32: the upper half of the float32's bits."""
    return f32_bits_to_f32(types.uint32(bits) << types.uint32(16))
