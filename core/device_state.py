"""What the core keeps per device while it computes: scratch accounting and prepared forms.

Weights stay in their ggml type in the buffers the client filled. An op that
needs them wider (float32 tiles for a matrix product, a library's own packed
layout) works in *scratch*: memory taken for the duration of one op and
bounded by :attr:`DeviceState.scratch_budget`, never kept for the life of a
buffer. The one thing kept across graphs is a *prepared form*, an
alternative encoding of a weight tensor that a device's kernels read faster
(MLX's affine scales and biases, for instance). Prepared forms are keyed by
the buffer's serial and write generation, so any write from the network
invalidates them, and are dropped when the buffer is freed. A buffer a graph
writes into (a compute buffer, a KV cache) gets none: the executor reports
every such write (:meth:`DeviceState.graph_wrote`).

``GET_DEVICE_MEMORY`` tells the client the truth: :meth:`DeviceState.reported_free`
subtracts the scratch an op may still take (the budget not yet in use, which
the device's own free figure cannot see yet). Prepared forms live in device
memory, so the device's own figure already counts them.

A few small derived values that every layer of a graph would otherwise
recompute (rope's cos/sin for the step's positions) are kept in a bounded
*memo* (:meth:`DeviceState.memo`), keyed by everything they depend on.

One record per device object, owned here rather than set on the plugin's
objects: :func:`state_of` finds (or makes) it.
"""

from __future__ import annotations

import bisect
import os
import threading
import weakref
from collections import OrderedDict
from contextlib import contextmanager

#: default bound on one device's scratch (float32 tiles of widened weights), bytes
DEFAULT_SCRATCH_BYTES = 64 << 20


#: a device's scratch budget is at most its total memory over this (a small device keeps most
#: of its memory for the client's buffers; its tiles are then fewer rows)
SCRATCH_SHARE = 8


def _total_memory(device) -> int:
    try:
        return int(device.memory()[1])
    except Exception:  # noqa: BLE001 - a record for an object that reports no memory
        return 1 << 62


def scratch_budget_from_env(declared: int | None = None) -> int:
    """``RPCSERVER_SCRATCH_MIB`` (MiB) if set, else what the device declares
    (``Device.scratch_bytes``), else :data:`DEFAULT_SCRATCH_BYTES`; :class:`DeviceState`
    then caps it at 1/:data:`SCRATCH_SHARE` of the device's total memory."""
    env = os.environ.get("RPCSERVER_SCRATCH_MIB")
    if env:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"RPCSERVER_SCRATCH_MIB={env!r} is not a whole number of MiB") from None
        if value < 1:
            raise ValueError(f"RPCSERVER_SCRATCH_MIB={value}: at least 1 MiB is needed")
        return value << 20
    return declared or DEFAULT_SCRATCH_BYTES


class DeviceState:
    """Scratch in use and prepared forms of one device (see the module docstring)."""

    def __init__(self, device, scratch_budget: int | None = None):
        if scratch_budget is None:
            scratch_budget = scratch_budget_from_env(getattr(device, "scratch_bytes", None))
            scratch_budget = min(scratch_budget, max(_total_memory(device) // SCRATCH_SHARE, 1 << 16))
        self.scratch_budget = scratch_budget
        self.scratch_in_use = 0
        #: the most scratch ever held at once (for tests and the live view)
        self.scratch_peak = 0
        self._prepared: dict[tuple, object] = {}
        #: buffer serial -> sorted, disjoint byte ranges graph nodes write (compute buffers,
        #: KV caches): those bytes change without a write from the network, so no prepared
        #: form is made from them
        self._graph_written: dict[int, list[tuple[int, int]]] = {}
        self._memo: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    # -- memo -----------------------------------------------------------------------

    #: entries the memo keeps (least recently used dropped first)
    MEMO_ENTRIES = 32

    def memo(self, key: tuple, make):
        """``make()``, kept for the next call with the same ``key`` (which must hold every
        input of ``make``: the values are shared, never written)."""
        with self._lock:
            value = self._memo.get(key)
            if value is not None:
                self._memo.move_to_end(key)
                return value
        value = make()
        with self._lock:
            self._memo[key] = value
            while len(self._memo) > self.MEMO_ENTRIES:
                self._memo.popitem(last=False)
        return value

    # -- scratch ------------------------------------------------------------------

    def rows_per_tile(self, row_bytes: int, n_rows: int) -> int:
        """How many rows of ``row_bytes`` (widened) one tile may hold: at least 1, at most all."""
        if row_bytes <= 0:
            return max(1, n_rows)
        return max(1, min(n_rows, self.scratch_budget // row_bytes))

    @contextmanager
    def scratch(self, nbytes: int):
        """Account ``nbytes`` of scratch for the ``with`` block (the caller allocates it)."""
        with self._lock:
            self.scratch_in_use += nbytes
            self.scratch_peak = max(self.scratch_peak, self.scratch_in_use)
        try:
            yield
        finally:
            with self._lock:
                self.scratch_in_use -= nbytes

    # -- prepared forms --------------------------------------------------------------

    def prepared(self, buffer, span: tuple[int, int], key: tuple, make):
        """The prepared form of ``buffer``'s bytes ``span`` = [start, stop) stored under ``key``
        (say, a type and shape), made by ``make() -> (value, nbytes)`` on first use; None when
        a graph writes into those bytes (see :meth:`graph_wrote`): the caller computes without.

        Forms made before the buffer's latest write from the network are stale: they are
        dropped, and the form is made again.
        """
        full = (buffer.serial, buffer.generation, tuple(span)) + tuple(key)
        with self._lock:
            if _overlaps(self._graph_written.get(buffer.serial, ()), span):
                return None
            hit = self._prepared.get(full)
        if hit is not None:
            return hit
        value, _ = make()
        with self._lock:
            self._drop_locked(lambda k: k[0] == buffer.serial and k[1] != buffer.generation)
            return self._prepared.setdefault(full, value)

    def graph_wrote(self, buffer, start: int, stop: int) -> None:
        """A graph node writes ``buffer``'s bytes [start, stop): forms made from them are
        dropped, and none is made from them from now on."""
        with self._lock:
            ranges = self._graph_written.setdefault(buffer.serial, [])
            if _covered(ranges, start, stop):
                return
            _insert(ranges, start, stop)
            self._drop_locked(lambda k: k[0] == buffer.serial and _overlaps([(start, stop)], k[2]))

    def drop_buffer(self, serial: int) -> None:
        """Forget the buffer with this serial (it is being freed) and its prepared forms."""
        with self._lock:
            self._graph_written.pop(serial, None)
            self._drop_locked(lambda k: k[0] == serial)

    def _drop_locked(self, which) -> None:
        for key in [k for k in self._prepared if which(k)]:
            del self._prepared[key]

    def prepared_count(self) -> int:
        with self._lock:
            return len(self._prepared)

    # -- what the client is told -------------------------------------------------------

    def reported_free(self, free: int) -> int:
        """The device's ``free`` bytes less the scratch ops may still take."""
        with self._lock:
            reserve = max(0, self.scratch_budget - self.scratch_in_use)
        return max(0, free - reserve)


def _overlaps(ranges, span) -> bool:
    """Whether [span) meets any of the sorted disjoint ``ranges``."""
    start, stop = span
    i = bisect.bisect_right(ranges, (start, float("inf"))) - 1
    if i >= 0 and ranges[i][1] > start:
        return True
    return i + 1 < len(ranges) and ranges[i + 1][0] < stop


def _covered(ranges, start: int, stop: int) -> bool:
    i = bisect.bisect_right(ranges, (start, float("inf"))) - 1
    return i >= 0 and ranges[i][0] <= start and ranges[i][1] >= stop


def _insert(ranges, start: int, stop: int) -> None:
    """Add [start, stop) to the sorted disjoint ``ranges``, merging what it touches."""
    lo = bisect.bisect_left(ranges, (start, start))
    if lo > 0 and ranges[lo - 1][1] >= start:
        lo -= 1
    hi = lo
    while hi < len(ranges) and ranges[hi][0] <= stop:
        start, stop = min(start, ranges[hi][0]), max(stop, ranges[hi][1])
        hi += 1
    ranges[lo:hi] = [(start, stop)]


_states: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_states_lock = threading.Lock()


def state_of(device) -> DeviceState:
    """The core's record for ``device``, created on first use."""
    with _states_lock:
        state = _states.get(device)
        if state is None:
            state = _states[device] = DeviceState(device)
        return state


def forget_buffer(buffer) -> None:
    """Drop what the core prepared from a buffer that is being freed."""
    with _states_lock:
        state = _states.get(buffer.device)
    if state is not None:
        state.drop_buffer(buffer.serial)
