"""Calling the kernels: compiled once, ahead of the requests that need them.

The weight type is a compile-time literal of every kernel (one machine-code
specialisation per type). Numba's dispatcher resolves literal arguments by
re-typing on every call, which costs milliseconds; :func:`launch` keeps each
specialisation's compiled entry point and calls it directly (microseconds).

Compiling a specialisation takes seconds (loading it from numba's on-disk
cache, tens of milliseconds). :class:`Warmer` does both in a background
thread when the server starts, for every registered type, so that no request
waits for the compiler: an op that finds its kernel not ready yet calls
``launch(..., wait=False)``, which queues the compilation and returns False,
and the op takes the shared (slower, equally correct) path meanwhile.

Running: one kernel at a time (numba's workqueue layer, the fallback without TBB, see
:mod:`.jit`, is not thread-safe); compiling needs no such lock.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import numba
import numpy as np
from numba import types

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


def _compile(key, kernel, kind, sig) -> tuple:
    """The entry point for ``key``, compiled (or loaded from numba's disk cache) if need be."""
    with _compile_lock:
        entry = _entries.get(key)
        if entry is None:
            kernel.compile(sig)
            entry = _entries[key] = (kernel.overloads[sig].entry_point,
                                     () if kind is None else (kind,))
        return entry


def is_ready(kernel, kind, *arrays) -> bool:
    return _key(kernel, None if kind is None else int(kind), arrays) in _entries


def launch(kernel, kind: int | None, *arrays, threads: int | None = None, wait: bool = True) -> bool:
    """Run ``kernel(kind, *arrays)`` (``kernel(*arrays)`` when ``kind`` is None) on ``threads``.

    With ``wait=False`` a kernel that is not compiled yet is not run: its compilation is
    queued on the :data:`WARMER` and False is returned. True once it ran.
    """
    kind = None if kind is None else int(kind)  # a plain int: numba makes it a literal
    key = _key(kernel, kind, arrays)
    entry = _entries.get(key)
    if entry is None:
        if not wait:
            WARMER.request(key, kernel, kind, _signature(kind, arrays))
            return False
        entry = _compile(key, kernel, kind, _signature(kind, arrays))
    fn, lead = entry
    with _run_lock:
        if threads is not None:
            numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        fn(*lead, *arrays)
    return True


class Warmer:
    """A background thread that compiles queued kernel specialisations, one at a time."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: set = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()

    def request(self, key, kernel, kind, sig) -> None:
        with self._lock:
            if key in _entries or key in self._pending:
                return
            self._pending.add(key)
            self._idle.clear()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="cpu-kernel-warmer",
                                                daemon=True)
                self._thread.start()
        self._queue.put((key, kernel, kind, sig))

    def _run(self) -> None:
        started, done = time.monotonic(), 0
        while True:
            try:
                key, kernel, kind, sig = self._queue.get(timeout=0.5)
            except queue.Empty:
                with self._lock:
                    if not self._pending:
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


def warm_up() -> None:
    """Queue every registered type's kernels, for packed weight rows (what llama.cpp's
    tensors are). Rows with gaps between them (a view of a wider tensor) compile on first
    use, in the background like these."""
    from .blocks import BLOCK_KERNELS, dequantize_rows, mul_mat_vec, sums_of_16
    from .q8 import YD_FIELDS, mul_mat_q8, quantize_q8

    x = np.zeros((1, 32), np.float32)
    xs = np.zeros((1, 2), np.float32)
    qy = np.zeros((1, 32), np.int8)
    yd = np.zeros((1, 1, YD_FIELDS), np.float32)
    for kernel, arrays in ((sums_of_16, (x, xs)), (quantize_q8, (x, qy, yd))):
        WARMER.request(_key(kernel, None, arrays), kernel, None, _signature(None, arrays))
    for kind, k in sorted(BLOCK_KERNELS.items()):
        w = np.zeros((2, k.nbytes), np.uint8)
        out = np.zeros((1, 2), np.float32)
        tile = np.zeros((2, k.block), np.float32)
        uses = [(mul_mat_vec, (w, x, xs, out)), (dequantize_rows, (w, tile))]
        if k.q8 is not None:
            uses.append((mul_mat_q8, (w, qy, yd, out)))
        for kernel, arrays in uses:
            WARMER.request(_key(kernel, kind, arrays), kernel, kind, _signature(kind, arrays))
