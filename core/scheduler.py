"""Device work queues: one worker thread per device.

Graphs submitted for a device run one at a time, in submission order, on
that device's worker. Sessions wait only for their own work, so graphs on
other devices and other sessions' transfers proceed meanwhile.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Callable

from .device import Device


class DeviceQueue:
    def __init__(self, index: int, device: Device):
        self.index = index
        self.device = device
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"device-{device.name}", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args) -> Future:
        fut: Future = Future()
        self._queue.put((fut, fn, args))
        return fut

    def _run(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            fut, fn, args = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # handed to the waiting session
                fut.set_exception(exc)
            # Drop the finished job now, not when the next one arrives: its graph holds views
            # of the session's buffers, which would stay mapped after the client left.
            del item, fut, fn, args

    def stop(self):
        self._queue.put(None)
        self._thread.join(timeout=5)


class Scheduler:
    """Owns the served devices and their queues. Device index = position on the wire."""

    def __init__(self, devices: list[Device]):
        self.devices = list(devices)
        self.queues = [DeviceQueue(i, d) for i, d in enumerate(self.devices)]

    def __len__(self):
        return len(self.devices)

    def run(self, index: int, fn: Callable, *args):
        """Run ``fn(*args)`` on device ``index``'s worker and wait for its result."""
        return self.queues[index].submit(fn, *args).result()

    def stop(self):
        for q in self.queues:
            q.stop()
