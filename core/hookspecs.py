"""The hooks a backend plugin implements.

A plugin is any module registered in the ``rpcserver.backends`` entry-point
group. rpcserver loads it with pluggy and calls the hooks below; implement
them with the ``hookimpl`` marker::

    from rpcserver.api import hookimpl

    @hookimpl
    def rpcserver_backends():
        return [MyBackend()]

See docs/plugins.md for a complete third-party plugin.
"""

from __future__ import annotations

import pluggy

PROJECT = "rpcserver"
ENTRY_POINT_GROUP = "rpcserver.backends"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def rpcserver_backends():
    """Return a list of :class:`rpcserver.device.Backend` objects this plugin provides.

    Called once at start-up. Keep it cheap: do not touch hardware here, do
    that in ``Backend.devices()``, which the server calls with the command
    line's options and whose failure is reported without stopping the server.
    """
