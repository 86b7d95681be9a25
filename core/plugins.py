"""Finding and loading backend plugins (pluggy + entry points).

Every failure is contained: a plugin that fails to import, whose hook
raises, or whose backend fails to enumerate devices is recorded with its
name and error and skipped. The server starts with whatever did load.
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


def load_plugins(entry_points=None) -> tuple[pluggy.PluginManager, list[PluginRecord]]:
    """Import every plugin and register it with a fresh plugin manager."""
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
            record.error = f"{type(exc).__name__}: {exc}"
            log.warning("plugin %r (%s %s) failed to load and is skipped: %s",
                        ep.name, dist, version, record.error)
            continue
        impls = [i for i in pm.hook.rpcserver_backends.get_hookimpls() if i.plugin_name == ep.name]
        for impl in impls:
            try:
                record.backends.extend(impl.function() or [])
            except Exception as exc:
                record.error = f"rpcserver_backends() raised {type(exc).__name__}: {exc}"
                log.warning("plugin %r: %s; skipped", ep.name, record.error)
    return pm, records


def discover(options: DeviceOptions | None = None, entry_points=None) -> Registry:
    """Load plugins and enumerate their devices."""
    options = options or DeviceOptions()
    _, records = load_plugins(entry_points)
    registry = Registry(plugins=records)
    for record in records:
        for backend in record.backends:
            try:
                devices = backend.devices(options)
            except Exception as exc:
                reason = f"device enumeration failed: {type(exc).__name__}: {exc}"
                log.warning("backend %r: %s", backend.name, reason)
                registry.unavailable.append((backend.name, reason))
                continue
            if not devices:
                registry.unavailable.append((backend.name, backend.unavailable_reason() or "no devices"))
            for device in devices:
                if registry.find(device.name):
                    log.warning("device name %s from backend %r is already taken; skipped",
                                device.name, backend.name)
                    continue
                registry.devices.append(DeviceEntry(device, backend, record))
    return registry
