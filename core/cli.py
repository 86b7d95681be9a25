"""The ``rpcserver`` command line.

``rpcserver serve`` takes the reference rpc-server's flags (-H -p -d -t -c)
and behaves like it: loopback by default with a loud warning otherwise,
every accelerator by default else the CPU, llama.cpp's cache directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading

from . import __version__, console
from .device import DeviceOptions, DeviceType, default_threads
from .plugins import Registry, discover, load_plugins
from .server import DEFAULT_HOST, DEFAULT_MAX_GRAPH_BYTES, DEFAULT_PORT, Server

log = logging.getLogger("rpcserver")


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rpcserver", description=(
        "A llama.cpp-compatible ggml RPC server: exposes this machine's devices to a llama.cpp "
        "main host (llama-cli/llama-server/llama-bench --rpc HOST:PORT)."))
    parser.add_argument("--version", action="version", version=f"rpcserver {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve devices over the ggml RPC protocol")
    serve.add_argument("-H", "--host", default=DEFAULT_HOST,
                       help=f"address to bind to (default: {DEFAULT_HOST})")
    serve.add_argument("-p", "--port", type=_port, default=DEFAULT_PORT,
                       help=f"port to bind to (default: {DEFAULT_PORT})")
    serve.add_argument("-d", "--device", default=None,
                       help="comma-separated devices to serve, e.g. CUDA0,CPU (default: every "
                            "accelerator, else the CPU)")
    serve.add_argument("-t", "--threads", type=_positive_int, default=default_threads(),
                       help=f"threads for CPU math (default: {default_threads()})")
    serve.add_argument("-c", "--cache", action="store_true",
                       help="enable the local tensor cache (llama.cpp's $LLAMA_CACHE/rpc)")
    serve.add_argument("-v", "--verbose", action="store_true",
                       help="log every command with its arguments (same as GGML_RPC_DEBUG=1)")
    serve.add_argument("--max-graph-mib", type=_positive_int,
                       default=DEFAULT_MAX_GRAPH_BYTES >> 20,
                       help="largest GRAPH_COMPUTE payload accepted, in MiB (default: %(default)s)")
    serve.add_argument("--no-live", action="store_true", help="do not show live counters")

    devs = sub.add_parser("list-devices", help="show every device the installed plugins provide")
    devs.add_argument("-t", "--threads", type=_positive_int, default=default_threads())
    sub.add_parser("plugins", help="list the installed backend plugins and their versions")
    return parser


def select_devices(registry: Registry, spec: str | None):
    """The devices to serve: those named in ``spec``, else every accelerator, else the CPU."""
    if spec:
        chosen = []
        for name in [n for n in re.split(r"[,/]+", spec) if n]:
            entry = registry.find(name)
            if entry is None:
                available = ", ".join(registry.device_names()) or "none"
                raise SystemExit(f"error: unknown device: {name}\navailable devices: {available}\n"
                                 f"(run `rpcserver list-devices` for details)")
            if entry.device in chosen:
                log.warning("device %s is listed twice in --device; serving it once", entry.device.name)
                continue
            chosen.append(entry.device)
        return chosen
    accelerators = [e.device for e in registry.devices
                    if e.device.type in (DeviceType.GPU, DeviceType.IGPU)]
    if accelerators:
        return accelerators
    cpu = registry.find("CPU") or next(
        (e for e in registry.devices if e.device.type == DeviceType.CPU), None)
    return [cpu.device] if cpu else []


def cmd_serve(args) -> int:
    debug = args.verbose or bool(os.environ.get("GGML_RPC_DEBUG"))
    console.setup_logging(debug)
    if not console.is_loopback(args.host):
        console.err_console.print(console.exposure_warning(args.host))
    registry = discover(DeviceOptions(threads=args.threads))
    devices = select_devices(registry, args.device)
    if not devices:
        console.err_console.print("[red]error: no devices found.[/] Install a backend plugin, "
                                  "e.g. `pip install rpcserver[cpu]`; `rpcserver plugins` shows "
                                  "what is installed.")
        return 1
    cache = None
    if args.cache:
        from .cache import LocalCache, default_cache_dir

        try:
            cache = LocalCache(default_cache_dir())
        except (OSError, RuntimeError) as exc:
            console.err_console.print(f"[red]error: cannot create the cache directory: {exc}")
            return 1
    server = Server(devices, args.host, args.port, cache=cache, debug=debug,
                    max_graph_bytes=args.max_graph_mib << 20)
    try:
        server.bind()
    except OSError as exc:
        console.err_console.print(f"[red]error: cannot listen on {server.endpoint}: {exc}")
        return 1
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    # Installed before anything is printed: a supervisor may signal as soon as it sees the banner.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    console.console.print(console.banner(server.endpoint, cache.directory if cache else None,
                                         devices))
    server.start()
    try:
        if not args.no_live and console.console.is_terminal:
            console.setup_logging(debug, to=console.console)
            with console.live_counters(server):
                while not stop.wait(0.5):
                    pass
        else:
            while not stop.wait(0.5):
                pass
    finally:
        server.stop()
        log.info("server stopped")
    return 0


def cmd_list_devices(args) -> int:
    console.setup_logging(False)
    registry = discover(DeviceOptions(threads=args.threads))
    console.console.print(console.devices_table(registry))
    extra = console.unavailable_table(registry)
    if extra is not None:
        console.console.print(extra)
    return 0


def cmd_plugins(args) -> int:
    console.setup_logging(False)
    _, records = load_plugins()  # no device enumeration: listing plugins must not touch hardware
    console.console.print(console.plugins_table(records))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"serve": cmd_serve, "list-devices": cmd_list_devices, "plugins": cmd_plugins}
    return handler[args.command](args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
