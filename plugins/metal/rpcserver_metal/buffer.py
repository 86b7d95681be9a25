"""Buffers of MLX devices: a range of bytes held as a list of MLX arrays.

Why not one flat ``uint8`` array per buffer, written with ``mx.slice_update``?
MLX arrays are values: an update makes a new array, and MLX reuses the old
one's memory in place ("donation") only when nothing else references it. In a
lazily built graph every earlier read of the buffer still does when the update
runs, so each write would copy the WHOLE buffer (measured on MLX's CPU device:
a 1 MiB tensor written into a 256 MiB buffer after reading from it costs 0.2 s,
the donated update 0.7 ms). A llama.cpp compute buffer takes hundreds of such
writes per graph, and the KV cache buffer a few per layer.

So a buffer is a sorted list of *segments* covering ``[0, size)``. A segment is
a 1-D ``uint8`` MLX array (bytes some command or graph node wrote), or a hole
(``None``: bytes never written, or filled with 0), which reads as zeros and
takes no memory.

* Writing ``[lo, hi)`` replaces the segments there with the new bytes, which
  are the node's result itself (reinterpreted with ``mx.view``): no copy.
  Segments cut at ``lo``/``hi`` keep slices of their arrays (views, no copy).
* Reading a tensor whose bytes lie in one segment is a slice of it,
  reinterpreted (``mx.view``) and strided (``mx.as_strided``): a view, no copy.
  A read spanning several segments concatenates them and keeps the result as
  one segment in their place, so the next read of that range is a view again.
  (The KV cache, written a few rows per token and read whole, costs one copy
  of what attention reads, per graph.)
* A write into a non-contiguous view (``SET_ROWS`` into the KV cache, a copy
  into a transposed view) is cut into runs of adjacent rows (or elements), each
  written as above; when there are many, one scatter
  (``mx.put_along_axis``) over the bytes they span.

Nothing here evaluates anything: reads and writes build MLX's lazy graph, and
the device evaluates the touched buffers once per graph (see
:meth:`rpcserver_metal.device.MlxDevice.graph_compute`). Transfers from the
network (write/read/fill/copy_from) evaluate at once.

Every MLX call of the plugin runs on one thread (:data:`MLX_THREAD`): MLX's
streams belong to the thread that created them, so an array built lazily on one
thread cannot be evaluated on another ("There is no Stream(cpu, 1) in current
thread"), while rpcserver calls buffers from session threads and graphs from
device worker threads.
"""

from __future__ import annotations

import bisect
import threading
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np

from rpcserver.api import Buffer


class MlxThread:
    """Runs every MLX call of the plugin on one thread (see the module docstring)."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx")
        self._ident: int | None = None

    def _enter(self, fn, args, kwargs):
        self._ident = threading.get_ident()
        return fn(*args, **kwargs)

    def call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the MLX thread; its result, or its exception, here."""
        if threading.get_ident() == self._ident:
            return fn(*args, **kwargs)
        return self._pool.submit(self._enter, fn, args, kwargs).result()


MLX_THREAD = MlxThread()

#: a strided write of more runs than this becomes one scatter over the bytes it spans
MAX_RUNS = 64


def _contiguous(shape, strides, itemsize: int) -> bool:
    """Whether a view of ``shape``/``strides`` (bytes) covers its bytes densely, in C order."""
    expected = itemsize
    for n, s in zip(reversed(shape), reversed(strides)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def _byte_offsets(shape, strides, base: int) -> np.ndarray:
    """``base + sum(i_k * strides[k])`` for every index of ``shape``: an int64 array of ``shape``."""
    offs = np.asarray(base, dtype=np.int64)
    for n, s in zip(shape, strides):
        offs = offs[..., None] + np.arange(n, dtype=np.int64) * s
    return offs


def _host_index(index):
    """``index`` (ints, slices, arrays) with MLX arrays brought to the host."""
    if not isinstance(index, tuple):
        index = (index,)
    return tuple(np.array(i) if isinstance(i, mx.array) else i for i in index)


def _as_bytes(a):
    """A contiguous MLX array's bytes, as uint8 along its last axis."""
    return a if a.dtype == mx.uint8 else a.view(mx.uint8)


class MlxBuffer(Buffer):
    """``size`` bytes on an MLX device, as segments (see the module docstring)."""

    def __init__(self, device, size: int):
        super().__init__(device, size)
        self._starts: list[int] = [0]  # segment i covers [_starts[i], _starts[i+1] or size)
        self._arrays: list = [None]    # its bytes (1-D uint8 mx.array), or None: zeros

    # ------------------------------------------------------------------ segments

    @property
    def segments(self) -> int:
        return len(self._starts)

    def arrays(self) -> list:
        """The MLX arrays holding the buffer's bytes (what evaluating the buffer evaluates)."""
        return [a for a in self._arrays if a is not None]

    def _end(self, i: int) -> int:
        return self._starts[i + 1] if i + 1 < len(self._starts) else self.size

    def _cut(self, pos: int) -> int:
        """Make ``pos`` a segment boundary; the index of the segment starting there."""
        if pos >= self.size:
            return len(self._starts)
        i = bisect.bisect_right(self._starts, pos) - 1
        start = self._starts[i]
        if start == pos:
            return i
        arr = self._arrays[i]
        right = None
        if arr is not None:
            self._arrays[i] = arr[:pos - start]
            right = arr[pos - start:]
        self._starts.insert(i + 1, pos)
        self._arrays.insert(i + 1, right)
        return i + 1

    def _put(self, lo: int, hi: int, data) -> None:
        """Replace the bytes ``[lo, hi)`` with ``data`` (``hi - lo`` uint8), or zeros (None)."""
        if hi <= lo:
            return
        i = self._cut(lo)
        j = self._cut(hi)
        self._starts[i:j] = [lo]
        self._arrays[i:j] = [data]
        self.device.touched(self)

    def span(self, lo: int, hi: int):
        """The bytes ``[lo, hi)`` as one 1-D uint8 array (a view when one segment holds them)."""
        if hi <= lo:
            return mx.zeros((0,), dtype=mx.uint8)
        i = bisect.bisect_right(self._starts, lo) - 1
        start, arr = self._starts[i], self._arrays[i]
        if hi <= self._end(i):
            return mx.zeros((hi - lo,), dtype=mx.uint8) if arr is None else arr[lo - start:hi - start]
        pieces = []
        while i < len(self._starts) and self._starts[i] < hi:
            start, end, arr = self._starts[i], self._end(i), self._arrays[i]
            a, b = max(lo, start), min(hi, end)
            pieces.append(mx.zeros((b - a,), dtype=mx.uint8) if arr is None
                          else arr[a - start:b - start])
            i += 1
        joined = mx.concatenate(pieces)
        self._put(lo, hi, joined)  # one segment from now on: later reads are views
        return joined

    # ------------------------------------------------------------------ strided access (graphs)

    def view(self, offset: int, shape, strides, dtype):
        """The elements of a strided view (byte ``strides``) as an MLX array of ``shape``."""
        shape = tuple(int(n) for n in shape)
        strides = tuple(int(s) for s in strides)
        isz = dtype.size
        if 0 in shape:
            return mx.zeros(shape, dtype=dtype)
        extent = sum((n - 1) * s for n, s in zip(shape, strides)) + isz
        raw = self.span(offset, offset + extent)
        if all(n == 1 or s % isz == 0 for n, s in zip(shape, strides)):
            typed = raw if dtype == mx.uint8 else raw.view(dtype)
            if _contiguous(shape, strides, isz):
                return typed.reshape(shape)
            return mx.as_strided(typed, shape, [s // isz if n > 1 else 0
                                                for n, s in zip(shape, strides)], 0)
        # strides that are not whole elements (ggml allows them; nothing seen uses them)
        pos = _byte_offsets(shape, strides, 0)[..., None] + np.arange(isz, dtype=np.int64)
        return mx.take(raw, mx.array(pos.reshape(-1))).view(dtype).reshape(shape)

    def store(self, offset: int, shape, strides, dtype, values, index=None) -> None:
        """``view[...] = values`` (``view[index] = values``, ``index`` over the outer three dims)."""
        shape = tuple(int(n) for n in shape)
        strides = tuple(int(s) for s in strides)
        isz = dtype.size
        if not isinstance(values, mx.array):
            values = mx.array(np.asarray(values))  # converted to ``dtype`` right below
        if values.dtype != dtype:
            values = values.astype(dtype)
        if 0 in shape:
            return
        if index is None and _contiguous(shape, strides, isz):
            data = mx.contiguous(mx.broadcast_to(values, shape)).reshape(-1)
            self._put(offset, offset + len(data) * isz, _as_bytes(data))
            return
        # units: whole rows when elements are adjacent along ne0, else single elements
        rows = shape[-1] == 1 or strides[-1] == isz
        outer = shape[:-1] if rows else shape
        offs = _byte_offsets(outer, strides[:len(outer)], offset)
        if index is not None:
            offs = offs[_host_index(index)]
        if offs.size == 0:
            return
        per_unit = shape[-1] if rows else 1
        target = offs.shape + ((shape[-1],) if rows else ())
        units = mx.contiguous(mx.broadcast_to(values, target)).reshape(offs.size, per_unit)
        self._write_units(offs.reshape(-1), per_unit * isz, units, dtype)

    def _write_units(self, offs: np.ndarray, unit: int, values, dtype) -> None:
        """Write row ``k`` of ``values`` (``unit`` bytes) at byte ``offs[k]``; later rows win."""
        order = np.argsort(offs, kind="stable")
        so = offs[order]
        if so.size > 1 and (so[1:] == so[:-1]).any():  # the same place twice: keep the last
            last = np.r_[so[1:] != so[:-1], True]
            order, so = order[last], so[last]
        if so.size > 1 and (np.diff(so) < unit).any():  # partly overlapping units (unseen): in order
            for k in range(offs.size):
                self._put(int(offs[k]), int(offs[k]) + unit, _as_bytes(values[k]))
            return
        if not np.array_equal(order, np.arange(offs.size)):
            values = values[mx.array(order)]
        raw = _as_bytes(values)  # (units, unit bytes), in address order
        starts = np.r_[0, np.flatnonzero(np.diff(so) != unit) + 1]
        if len(starts) <= MAX_RUNS:
            ends = np.r_[starts[1:], so.size]
            for a, b in zip(starts.tolist(), ends.tolist()):
                lo = int(so[a])
                self._put(lo, lo + (b - a) * unit, raw[a:b].reshape(-1))
            return
        lo, hi = int(so[0]), int(so[-1]) + unit
        isz = dtype.size
        if isz == 1 or (unit % isz == 0 and not ((so - lo) % isz).any()):
            # element granularity: scatter the typed values
            span = self.span(lo, hi)
            typed = span if dtype == mx.uint8 else span.view(dtype)
            per = unit // isz
            idx = ((so - lo) // isz)[:, None] + np.arange(per, dtype=np.int64)
            updated = mx.put_along_axis(typed, mx.array(idx.reshape(-1)), values.reshape(-1),
                                        axis=0)
            self._put(lo, hi, _as_bytes(updated))
            return
        idx = (so - lo)[:, None] + np.arange(unit, dtype=np.int64)
        updated = mx.put_along_axis(self.span(lo, hi), mx.array(idx.reshape(-1)), raw.reshape(-1),
                                    axis=0)
        self._put(lo, hi, updated)

    # ------------------------------------------------------------------ transfers (sessions)

    # Each runs on the MLX thread and evaluates what it built before returning.

    def write(self, offset, data):
        MLX_THREAD.call(self._write, offset, np.frombuffer(data, dtype=np.uint8))

    def _write(self, offset, src):
        self._put(offset, offset + src.size, mx.array(src))  # a copy: the caller reuses its memory
        self._settle()

    def read(self, offset, size):
        return MLX_THREAD.call(lambda: np.array(self.span(offset, offset + size), copy=True))

    def fill(self, offset, size, value):
        MLX_THREAD.call(self._fill, offset, size, value)

    def _fill(self, offset, size, value):
        self._put(offset, offset + size, None if value == 0 else mx.full((size,), value, mx.uint8))
        self._settle()

    def copy_from(self, src, src_offset, dst_offset, size):
        MLX_THREAD.call(self._copy_from, src, src_offset, dst_offset, size)

    def _copy_from(self, src, src_offset, dst_offset, size):
        self._put(dst_offset, dst_offset + size, src.span(src_offset, src_offset + size))
        self._settle()
        src._settle()

    def _settle(self):
        mx.eval(self.arrays())

    def free(self):
        MLX_THREAD.call(self._free)

    def _free(self):
        self.device.forget(self)
        self._starts, self._arrays = [0], [None]
