"""rpcserver: a llama.cpp-compatible ggml RPC server with pluggable devices."""

from importlib import metadata

try:
    __version__ = metadata.version("rpcserver")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

from .protocol import PROTOCOL_VERSION  # noqa: E402

__all__ = ["__version__", "PROTOCOL_VERSION"]
