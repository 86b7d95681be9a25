"""Everything rpcserver shows a person, rendered with Rich."""

from __future__ import annotations

import ipaddress
import logging
import time

from rich.console import Console, Group
from rich.live import Live
from rich.logging import RichHandler
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from . import __version__
from .plugins import Registry
from .protocol import PROTOCOL_VERSION

MIB = 1024 * 1024
_PROTO = "%d.%d.%d" % PROTOCOL_VERSION

console = Console(stderr=False)
err_console = Console(stderr=True)


def setup_logging(debug: bool, to=None) -> None:
    """Log through Rich to ``to`` (default stderr). While live counters are shown, log to the
    same console that draws them, so log lines scroll above the counters instead of
    tearing them."""
    handler = RichHandler(console=to or err_console, show_path=False, rich_tracebacks=False,
                          log_time_format="[%X]")
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s",
                        handlers=[handler], force=True)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str) -> Panel:
    return Panel(
        Text.assemble(
            ("WARNING: ", "bold red"), (f"the server binds to {host}, not to loopback.\n", "bold"),
            "Anyone who can reach this address can allocate memory and run graphs on these devices.\n"
            "The ggml RPC protocol has no authentication and no encryption: never expose it to an\n"
            "open network. Use -H 127.0.0.1 (the default) or a private, trusted network only.",
        ),
        title="[bold red]!! exposed RPC server !!", border_style="red",
    )


def device_line(device) -> str:
    free, total = device.memory()
    return f"{device.name}: {device.description} ({total // MIB} MiB, {free // MIB} MiB free)"


def banner(endpoint: str, cache_dir, devices) -> Panel:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold cyan")
    grid.add_column()
    grid.add_row("server", f"rpcserver {__version__}")
    grid.add_row("protocol", f"ggml RPC {_PROTO}")
    grid.add_row("endpoint", endpoint)
    grid.add_row("transport", "TCP")
    grid.add_row("local cache", str(cache_dir) if cache_dir else "n/a")
    for i, d in enumerate(devices):
        grid.add_row(f"device {i}", device_line(d))
    return Panel(grid, title=f"[bold]Starting RPC server v{_PROTO}", border_style="green",
                 expand=False)


def devices_table(registry: Registry) -> Table:
    table = Table(title="rpcserver devices")
    for col, kw in [("device", {"style": "bold"}), ("plugin", {}), ("type", {}),
                    ("description", {}), ("total MiB", {"justify": "right"}),
                    ("free MiB", {"justify": "right"})]:
        table.add_column(col, **kw)
    for e in registry.devices:
        free, total = e.device.memory()
        table.add_row(e.device.name, f"{e.plugin.name} {e.plugin.version}",
                      e.device.type.label, e.device.description, str(total // MIB), str(free // MIB))
    return table


def unavailable_table(registry: Registry) -> Table | None:
    rows = [(b, r) for b, r in registry.unavailable]
    rows += [(p.name, f"plugin error: {p.error}") for p in registry.plugins if p.error]
    if not rows:
        return None
    table = Table(title="backends without devices", title_style="yellow")
    table.add_column("backend", style="bold")
    table.add_column("why")
    for b, r in rows:
        table.add_row(b, r)
    return table


def plugins_table(plugins) -> Table:
    table = Table(title="rpcserver plugins (entry-point group rpcserver.backends)")
    for col in ("plugin", "distribution", "version", "backends", "status"):
        table.add_column(col)
    for p in plugins:
        status = Text(f"failed: {p.error}", style="red") if p.error else Text("loaded", style="green")
        table.add_row(p.name, p.distribution, p.version, ", ".join(b.name for b in p.backends) or "-",
                      status)
    return table


def counters(server) -> Table:
    s = server.stats
    up = time.monotonic() - s.started
    table = Table(title=f"serving on {server.endpoint} -- up {int(up)} s", expand=False)
    for col in ("clients", "commands", "MiB in", "MiB out", "graphs", "buffers", "errors"):
        table.add_column(col, justify="right")
    table.add_row(f"{s.connections_open} ({s.connections_total} total)",
                  str(sum(s.commands.values())), f"{s.bytes_in / MIB:.1f}", f"{s.bytes_out / MIB:.1f}",
                  str(s.graphs), str(s.buffers_open), str(s.errors))
    per_dev = Table(expand=False, show_header=True)
    per_dev.add_column("device")
    per_dev.add_column("allocated MiB", justify="right")
    for i, d in enumerate(server.devices):
        per_dev.add_row(d.name, f"{s.bytes_allocated[i] / MIB:.1f}")
    return Group(table, per_dev)


def live_counters(server) -> Live:
    return Live(counters(server), console=console, refresh_per_second=2, transient=False,
                get_renderable=lambda: counters(server))
