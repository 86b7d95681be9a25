"""Calling the kernels: compiled once, ahead of the requests that need them.

The weight type is a compile-time literal of every kernel (one machine-code
specialisation per type). Numba's dispatcher resolves literal arguments by
re-typing on every call, which costs milliseconds; :func:`launch` keeps each
specialisation's compiled entry point and calls it directly (microseconds).

Compiling a specialisation takes seconds; loading it from numba's on-disk
cache, milliseconds. So a kernel is made ready when it is first needed, for
the types a model actually has: ``launch(..., wait=False)`` loads it from the
disk cache at once if it is there and no compilation is running (that holds
numba's lock for seconds), and otherwise queues it on :class:`Warmer` (a
background thread, which compiles or loads it) and returns False, and the op takes the
shared (slower, equally correct) path until it is ready. No request waits for
the compiler, and a server holds the machine code of the kernels it uses only
(each loaded specialisation costs ~0.7 MiB of resident memory). The first one a process
loads costs ~0.3 s and ~45 MiB for numba's runtime: :func:`prepare_runtime` pays that in
the background when a client first allocates, and once nothing is loading the warmer
hands LLVM's code pages back (:func:`release_compiler_pages`). :func:`warm_up` compiles
every type's kernels ahead of time.

Running: one kernel at a time (numba's workqueue layer, the fallback without TBB, see
:mod:`.jit`, is not thread-safe); compiling needs no such lock.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import sys
import threading
import time

import numba
import numpy as np
from numba import types
from numba.core import sigutils
from numba.core.compiler_lock import global_compiler_lock

log = logging.getLogger("rpcserver.cpu")

_entries: dict[tuple, tuple] = {}
_run_lock = threading.Lock()
_compile_lock = threading.Lock()


def _layout(a) -> str:
    if a.flags.c_contiguous:
        return "C"
    return "F" if a.flags.f_contiguous else "A"


def _key(kernel, kind, arrays) -> tuple:
    return (kernel, kind) + tuple((a.dtype.num, a.ndim, _layout(a)) for a in arrays)


def _signature(kind, arrays) -> tuple:
    sig = tuple(numba.typeof(a) for a in arrays)
    return sig if kind is None else (types.literal(kind),) + sig


def _prepare(key, kernel, kind, sig, compile: bool):
    """The entry point for ``key``: compiled (or loaded from numba's disk cache) if need be
    when ``compile``; else only loaded from the disk cache, and only if no compilation is
    running (which holds the lock, and numba's, for seconds): None then, or if it is not in
    the cache."""
    if not _compile_lock.acquire(blocking=compile):
        return None
    try:
        entry = _entries.get(key)
        if entry is None:
            if compile:
                kernel.compile(sig)
            elif not _load_cached(kernel, sig):
                return None
            entry = _entries[key] = (kernel.overloads[sig].entry_point,
                                     () if kind is None else (kind,))
            WARMER.release_when_idle()
        return entry
    finally:
        _compile_lock.release()


def _compile(key, kernel, kind, sig) -> tuple:
    """The entry point for ``key``, compiled (or loaded from numba's disk cache) if need be."""
    return _prepare(key, kernel, kind, sig, compile=True)


def _load_cached(kernel, sig) -> bool:
    """Load specialisation ``sig`` of ``kernel`` from numba's disk cache if it is there (what
    ``Dispatcher.compile`` does before it compiles); never compiles. True if it is loaded."""
    with global_compiler_lock:
        args, _ = sigutils.normalize_signature(sig)
        if tuple(args) in kernel.overloads:
            return True
        cache = getattr(kernel, "_cache", None)
        try:
            cres = cache.load_overload(sig, kernel.targetctx) if cache is not None else None
        except Exception:  # noqa: BLE001 - a stale or foreign cache entry: compile instead
            log.debug("numba cache entry of %s unusable", kernel.__name__, exc_info=True)
            return False
        if cres is None:
            return False
        kernel.targetctx.insert_user_function(cres.entry_point, cres.fndesc, [cres.library])
        kernel.add_overload(cres)
        return True


def is_ready(kernel, kind, *arrays) -> bool:
    return _key(kernel, None if kind is None else int(kind), arrays) in _entries


def launch(kernel, kind: int | None, *arrays, threads: int | None = None, wait: bool = True) -> bool:
    """Run ``kernel(kind, *arrays)`` (``kernel(*arrays)`` when ``kind`` is None) on ``threads``.

    With ``wait=False`` a kernel that is neither compiled nor in the disk cache is not run:
    its compilation is queued on the :data:`WARMER` and False is returned. True once it ran.
    """
    kind = None if kind is None else int(kind)  # a plain int: numba makes it a literal
    key = _key(kernel, kind, arrays)
    entry = _entries.get(key)
    if entry is None:
        sig = _signature(kind, arrays)
        if not wait:
            entry = _prepare(key, kernel, kind, sig, compile=False)
            if entry is None:
                WARMER.request(key, kernel, kind, sig)
                return False
        else:
            entry = _compile(key, kernel, kind, sig)
    fn, lead = entry
    with _run_lock:
        if threads is not None:
            _use_threads(threads)
        fn(*lead, *arrays)
    return True


_threads_in_use = [0]


def _use_threads(threads: int) -> None:
    """numba.set_num_threads, called only when the count changes (it costs ~1 us a call;
    a decode step launches hundreds of kernels). Called under ``_run_lock``."""
    n = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
    if n != _threads_in_use[0]:
        numba.set_num_threads(n)
        _threads_in_use[0] = n


class Warmer:
    """A background thread that compiles queued kernel specialisations, one at a time, and
    hands LLVM's code pages back once nothing is loading (:func:`release_compiler_pages`)."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: set = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._release = False

    def _start(self) -> None:
        """Start the thread if it is not running (called under the lock)."""
        self._idle.clear()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cpu-kernel-warmer",
                                            daemon=True)
            self._thread.start()

    def request(self, key, kernel, kind, sig) -> None:
        with self._lock:
            if key in _entries or key in self._pending:
                return
            self._pending.add(key)
            self._start()
        self._queue.put((key, kernel, kind, sig))

    def request_for(self, kernel, kind, *arrays) -> None:
        """Queue the specialisation of ``kernel`` (of type ``kind``, or None) that ``arrays``
        (examples of the arguments: dtypes, dimensions and layouts count) call."""
        self.request(_key(kernel, kind, arrays), kernel, kind, _signature(kind, arrays))

    def release_when_idle(self) -> None:
        """Call :func:`release_compiler_pages` once no kernel has been queued for a while."""
        with self._lock:
            self._release = True
            self._start()

    def _run(self) -> None:
        started, done = time.monotonic(), 0
        while True:
            try:
                key, kernel, kind, sig = self._queue.get(timeout=0.5)
            except queue.Empty:
                with self._lock:
                    release, self._release = self._release, False
                if release:
                    release_compiler_pages()
                with self._lock:
                    if not self._pending and not self._release:
                        if done:
                            log.info("CPU kernels ready: %d specialisations in %.1f s", done,
                                     time.monotonic() - started)
                        self._idle.set()
                        self._thread = None
                        return
                continue
            try:
                _compile(key, kernel, kind, sig)
                done += 1
            except Exception:  # noqa: BLE001 - the op keeps its shared path; say why once
                log.exception("CPU kernel %s for type %s failed to compile; the shared code "
                              "computes that case instead", kernel.__name__, kind)
            finally:
                with self._lock:
                    self._pending.discard(key)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every queued compilation is done; False on timeout."""
        return self._idle.wait(timeout)


WARMER = Warmer()

#: madvise(2)'s "reclaim these pages" (Linux 5.4 and later; EINVAL elsewhere, then ignored)
_MADV_PAGEOUT = 21


def release_compiler_pages() -> int:
    """Hand the resident pages of LLVM's machine code back to the operating system; the
    bytes of mappings advised (0 off Linux).

    LLVM runs only while a kernel is compiled or loaded, but its code stays resident
    afterwards: measured 50 MiB of libllvmlite's 80 MiB of text once the first kernel is
    loaded, more than a small model's weights. The system reads the pages back from the file
    on the next compilation or load (~3 MiB per kernel loaded; the advice takes ~16 ms).
    Pages that another process maps too (a second server) stay, as they cost nothing more."""
    try:
        from llvmlite.binding import ffi

        library = ffi.lib._name
    except (AttributeError, ImportError):
        return 0
    return release_text_pages(library)


def release_text_pages(path: str) -> int:
    """MADV_PAGEOUT on every read-only executable mapping of the file ``path`` in this
    process; the bytes of mappings advised. Such mappings are unmodified copies of the file,
    so dropping their pages loses nothing: they are read back when next used."""
    if not sys.platform.startswith("linux"):
        return 0
    path = os.path.realpath(path)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            lines = maps.readlines()
    except (AttributeError, OSError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[1] != "r-xp" or fields[5].rstrip("\n") != path:
            continue
        start, end = (int(v, 16) for v in fields[0].split("-"))
        if madvise(start, end - start, _MADV_PAGEOUT) == 0:
            advised += end - start
    return advised


def prepare_runtime() -> None:
    """Load the smallest kernel in the background: the first kernel a process loads pays
    for numba's runtime (~0.3 s, and ~45 MiB while LLVM compiles the runtime's functions).
    The CPU device asks for it when a client first allocates memory, before any weights
    arrive, so that neither the first graph waits for it nor does it add to the memory the
    weights take; LLVM's pages are handed back right after (:func:`release_compiler_pages`)."""
    from .blocks import sums_of_16

    WARMER.request_for(sums_of_16, None, np.zeros((1, 32), np.float32),
                       np.zeros((1, 2), np.float32))


def warm_up() -> None:
    """Queue every registered type's kernels, for packed weight rows (what llama.cpp's
    tensors are), so that they are compiled into the disk cache ahead of any request
    (``python -c "from rpcserver_cpu.kernels.launch import warm_up, WARMER; warm_up();
    WARMER.wait()"``). The server itself makes kernels ready on first use (see above)."""
    from .blocks import BLOCK_KERNELS, dequantize_rows, mul_mat_vec
    from .q8 import YD_FIELDS, mul_mat_q8, quantize_q8

    x = np.zeros((1, 32), np.float32)
    xs = np.zeros((1, 2), np.float32)
    qy = np.zeros((1, 32), np.int8)
    yd = np.zeros((1, 1, YD_FIELDS), np.float32)
    prepare_runtime()  # sums_of_16
    WARMER.request_for(quantize_q8, None, x, qy, yd)
    for kind, k in sorted(BLOCK_KERNELS.items()):
        w = np.zeros((2, k.nbytes), np.uint8)
        out = np.zeros((1, 2), np.float32)
        tile = np.zeros((2, k.block), np.float32)
        uses = [(mul_mat_vec, (w, x, xs, out)), (dequantize_rows, (w, tile))]
        if k.q8 is not None:
            uses.append((mul_mat_q8, (w, qy, yd, out)))
        for kernel, arrays in uses:
            WARMER.request_for(kernel, kind, *arrays)
    _warm_up_row_ops()


def _warm_up_row_ops() -> None:
    """Queue the small ops' kernels (:mod:`.rowops`) for contiguous and strided rows."""
    from rpcserver.api import GGMLType

    from . import rowops

    def rows(dtype=np.float32):
        return np.zeros((1, 1, 2, 4), dtype)

    for f32 in (rows(), rows()[:, :, :, ::2]):  # the C and the "A" (any strides) layout
        small = np.zeros(2, np.float32)
        WARMER.request_for(rowops.rms_norm_rows, None, f32, f32, small)
        WARMER.request_for(rowops.soft_max_rows, None, f32, rows(), f32, small)
        WARMER.request_for(rowops.rope_rows, None, f32, np.zeros((1, 2), np.float32),
                           np.zeros((1, 2), np.float32), f32, np.zeros(4, np.int64))
        WARMER.request_for(rowops.swiglu_rows, None, f32, f32, f32)
        for kind in (rowops.BINARY_ADD, rowops.BINARY_SUB, rowops.BINARY_MUL, rowops.BINARY_DIV):
            WARMER.request_for(rowops.binary_rows, kind, f32, f32, f32)
        for idx_dtype in (np.int32, np.int64):
            idx = np.zeros((1, 1, 2), idx_dtype)
            for kind, dst in ((GGMLType.F32, f32), (GGMLType.F16, rows(np.uint16))):
                WARMER.request_for(rowops.set_rows_f32, int(kind), f32, idx, dst,
                                   np.zeros(1, np.int64))
