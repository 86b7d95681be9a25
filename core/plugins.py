"""Finding, loading and checking backend plugins (pluggy + entry points).

Every failure is contained and recorded on the plugin's :class:`PluginRecord`
(shown by ``rpcserver plugins`` and ``rpcserver list-devices``), and every
other plugin keeps working:

* the module fails to import, or registering it fails;
* it implements a hook rpcserver does not have (a misspelling such as
  ``rpcserver_backend``: pluggy's ``check_pending``, per plugin), or no
  ``rpcserver_backends`` hook at all;
* the hook raises, or returns something that is not a list of
  :class:`~rpcserver.device.Backend` objects;
* a backend's ``devices()`` raises or returns something that is not a list of
  :class:`~rpcserver.device.Device` objects, or a device has no usable name
  or reports memory that is not two non-negative integers (free <= total).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from importlib import metadata

import pluggy

from . import hookspecs
from .device import Backend, Device, DeviceOptions, PluginRecord

log = logging.getLogger("rpcserver.plugins")


@dataclass
class DeviceEntry:
    device: Device
    backend: Backend
    plugin: PluginRecord


@dataclass
class Registry:
    """Everything the plugins provided."""

    plugins: list[PluginRecord] = field(default_factory=list)
    devices: list[DeviceEntry] = field(default_factory=list)
    #: (backend name, reason) for backends that have no usable device
    unavailable: list[tuple[str, str]] = field(default_factory=list)

    def device_names(self) -> list[str]:
        return [e.device.name for e in self.devices]

    def find(self, name: str) -> DeviceEntry | None:
        for e in self.devices:
            if e.device.name.lower() == name.lower():
                return e
        return None


def _entry_points():
    return sorted(metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _fail(record: PluginRecord, why: str, consequence: str = "") -> None:
    """Record (and log) what is wrong with ``record``'s plugin; several problems accumulate.
    ``consequence`` ("skipped", ...) goes to the log line only."""
    record.error = why if not record.error else f"{record.error}; {why}"
    log.warning("plugin %r (%s %s): %s%s", record.name, record.distribution, record.version,
                why, f"; {consequence}" if consequence else "")


def _describe(value) -> str:
    text = repr(value)
    return f"{text[:60]}... ({type(value).__name__})" if len(text) > 60 else f"{text} ({type(value).__name__})"


def _backends_from(record: PluginRecord, returned) -> list[Backend]:
    """The Backend objects in what a plugin's ``rpcserver_backends()`` returned."""
    if returned is None:
        return []
    if not isinstance(returned, (list, tuple)):
        _fail(record, f"rpcserver_backends() must return a list of Backend objects, not "
                      f"{_describe(returned)}")
        return []
    backends = []
    for item in returned:
        if isinstance(item, Backend):
            backends.append(item)
        else:
            _fail(record, f"rpcserver_backends() returned {_describe(item)}, not an "
                          f"rpcserver.device.Backend", "skipped")
    return backends


def load_plugins(entry_points=None) -> tuple[pluggy.PluginManager, list[PluginRecord]]:
    """Import every plugin, register it with a fresh plugin manager and check its hooks."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    records = []
    for ep in entry_points if entry_points is not None else _entry_points():
        dist = ep.dist.name if getattr(ep, "dist", None) else "?"
        version = ep.dist.version if getattr(ep, "dist", None) else "?"
        record = PluginRecord(ep.name, dist, version)
        records.append(record)
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
        except Exception as exc:  # a broken plugin must never stop the server
            _fail(record, f"{type(exc).__name__}: {exc}", "failed to load and is skipped")
            continue
        try:
            pm.check_pending()  # hooks rpcserver does not define (misspelled names)
        except pluggy.PluginValidationError as exc:
            pm.unregister(name=ep.name)
            hooks = sorted(n for n in dir(hookspecs) if n.startswith("rpcserver_"))
            _fail(record, f"{exc}; rpcserver's hooks are: {', '.join(hooks)}", "skipped")
            continue
        impls = [i for i in pm.hook.rpcserver_backends.get_hookimpls() if i.plugin_name == ep.name]
        if not impls:
            _fail(record, "implements no rpcserver_backends() hook (mark it with "
                          "rpcserver.api.hookimpl), so it provides no devices")
        for impl in impls:
            try:
                returned = impl.function()
            except Exception as exc:
                _fail(record, f"rpcserver_backends() raised {type(exc).__name__}: {exc}", "skipped")
                continue
            record.backends.extend(_backends_from(record, returned))
    return pm, records


def _device_problem(device) -> str | None:
    """What makes ``device`` unusable, or None."""
    if not isinstance(device, Device):
        return f"{_describe(device)} is not an rpcserver.device.Device"
    name = getattr(device, "name", None)
    if not isinstance(name, str) or not name or name == "?" or not name.isprintable():
        return f"a device has no usable name ({name!r})"
    try:
        memory = device.memory()
    except Exception as exc:
        return f"device {name}: memory() raised {type(exc).__name__}: {exc}"
    if (not isinstance(memory, tuple) or len(memory) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in memory)
            or memory[0] > memory[1]):
        return (f"device {name}: memory() must return (free, total) as non-negative integers "
                f"with free <= total, not {memory!r}")
    return None


def _backend_failed(registry: Registry, record: PluginRecord, backend: str, reason: str,
                    consequence: str = "") -> None:
    """A backend's (or one of its devices') problem: the plugin's error, and a reason in the
    list of backends without devices."""
    _fail(record, f"backend {backend!r}: {reason}", consequence)
    registry.unavailable.append((backend, reason))


def discover(options: DeviceOptions | None = None, entry_points=None) -> Registry:
    """Load plugins and enumerate their devices, keeping only devices that pass the checks."""
    options = options or DeviceOptions()
    _, records = load_plugins(entry_points)
    registry = Registry(plugins=records)
    for record in records:
        for backend in record.backends:
            bname = str(backend.name)
            try:
                devices = backend.devices(options)
            except Exception as exc:
                _backend_failed(registry, record, bname,
                                f"device enumeration failed: {type(exc).__name__}: {exc}")
                continue
            if devices is None:
                devices = []
            if not isinstance(devices, (list, tuple)):
                _backend_failed(registry, record, bname, f"devices() must return a list of "
                                                         f"Device objects, not {_describe(devices)}")
                continue
            if not devices:
                try:
                    why = backend.unavailable_reason() or "no devices"
                except Exception as exc:  # noqa: BLE001 - a broken reason is still a reason
                    why = f"no devices (unavailable_reason() raised {type(exc).__name__})"
                registry.unavailable.append((bname, why))
            for device in devices:
                problem = _device_problem(device)
                if problem is not None:
                    _backend_failed(registry, record, bname, problem, "device skipped")
                elif registry.find(device.name):
                    log.warning("device name %s from backend %r is already taken; skipped",
                                device.name, bname)
                else:
                    registry.devices.append(DeviceEntry(device, backend, record))
    return registry
