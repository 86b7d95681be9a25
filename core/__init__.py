"""rpcserver: a llama.cpp-compatible ggml RPC server with pluggable devices."""

import os

# Before NumPy loads its OpenBLAS: BLAS worker threads spin for 2^n cycles after each call
# (n = 28 by default, ~0.1 s) before they sleep. A server interleaves small BLAS products
# (attention) with its own multi-threaded kernels (numba's TBB pool), so spinning BLAS
# threads take the cores those kernels need: on a 2-core machine a 1.7B Q8_0 prompt ran at
# 18-20 tok/s with the default and 30-35 with n = 4, generation 7.2 -> 9.2-9.9 tok/s.
# setdefault: a value the user chose wins.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from importlib import metadata  # noqa: E402

try:
    __version__ = metadata.version("rpcserver")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

from .protocol import PROTOCOL_VERSION  # noqa: E402

__all__ = ["__version__", "PROTOCOL_VERSION"]
