"""Exceptions that end a client's session. Each message says what was wrong and with which values."""


class SessionError(Exception):
    """The client sent something the server will not act on; its connection is closed."""


class ProtocolError(SessionError):
    """Malformed framing: wrong sizes, unknown commands, truncated payloads."""


class BoundsError(SessionError):
    """A tensor, offset or size that points outside the memory it names."""


class GraphError(SessionError):
    """A graph that fails validation or cannot be executed."""


class ClientGone(Exception):
    """The peer closed the connection (possibly mid-message)."""
