"""Calling the kernels without numba's per-call type dispatch.

The weight type is a compile-time literal of every kernel (one machine-code
specialisation per type). Numba's dispatcher resolves literal arguments by
re-typing on every call, which costs milliseconds; :func:`launch` asks it
once per (kernel, type, argument types) and then calls the compiled entry
point directly (a few microseconds).
"""

from __future__ import annotations

import threading

import numba
from numba import types

_entries: dict[tuple, object] = {}
_lock = threading.Lock()


def _layout(a) -> str:
    if a.flags.c_contiguous:
        return "C"
    return "F" if a.flags.f_contiguous else "A"


def launch(kernel, kind: int | None, *arrays, threads: int | None = None) -> None:
    """``kernel(kind, *arrays)`` (``kernel(*arrays)`` when ``kind`` is None) through the cached
    entry point of its specialisation, on ``threads`` threads."""
    kind = None if kind is None else int(kind)  # a plain int: numba makes it a literal
    key = (kernel, kind) + tuple((a.dtype.num, a.ndim, _layout(a)) for a in arrays)
    with _lock:  # one kernel at a time: numba's workqueue layer is not thread-safe (see .jit)
        if threads is not None:
            numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        entry = _entries.get(key)
        if entry is None:
            lead = () if kind is None else (kind,)
            kernel(*lead, *arrays)  # compiles, or loads the on-disk cache, then runs once
            sig = tuple(numba.typeof(a) for a in arrays)
            if kind is not None:
                sig = (types.literal(kind),) + sig
            _entries[key] = (kernel.overloads[sig].entry_point, lead)
            return
        fn, lead = entry
        fn(*lead, *arrays)
