"""The local tensor cache, file-compatible with llama.cpp's ``rpc-server -c``.

Layout: one file per tensor payload in ``<cache dir>/rpc``, named by the
16 lowercase hex digits of the 64-bit FNV-1a hash of its bytes. The cache
directory is ``$LLAMA_CACHE`` if set, else the platform cache directory +
``llama.cpp`` (``$XDG_CACHE_HOME`` or ``~/.cache`` on Linux,
``~/Library/Caches`` on macOS, ``%LOCALAPPDATA%`` on Windows) -- the same
rules llama.cpp follows, so a user switching over keeps their cache.

Two things the reference does not do: files are written to a temporary name
and renamed into place (a crash never leaves a truncated entry), and a file
whose content no longer hashes to its name is treated as a miss and removed.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

from .protocol import fnv1a_64

log = logging.getLogger("rpcserver.cache")


def default_cache_dir() -> Path:
    """llama.cpp's cache directory + ``rpc``."""
    env = os.environ.get("LLAMA_CACHE")
    if env:
        return Path(env) / "rpc"
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA")
        if not base:
            raise RuntimeError("cannot locate the cache: %LOCALAPPDATA% is not set; set LLAMA_CACHE")
        root = Path(base)
    elif sys.platform == "darwin":
        root = Path.home() / "Library" / "Caches"
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "llama.cpp" / "rpc"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cache_file_name(digest: int) -> str:
    return f"{digest:016x}"


class LocalCache:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path_for(self, digest: int) -> Path:
        return self.directory / cache_file_name(digest)

    def store(self, data) -> Path:
        """Save ``data`` under its hash, atomically. Returns the file's path."""
        data = data if isinstance(data, bytes) else bytes(data)
        path = self.path_for(fnv1a_64(data))
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.directory)
        try:
            os.chmod(tmp, 0o666 & ~_umask())  # what a plain open() would give, as llama.cpp's files
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        log.info("cache: saved %d bytes to %s", len(data), path)
        return path

    def load(self, digest: int, max_size: int) -> bytes | None:
        """The cached bytes for ``digest``, or None on a miss.

        A file larger than ``max_size`` (the room the caller has for it) is a
        miss without being read; a file whose content does not hash to
        ``digest`` is reported, deleted and a miss.
        """
        path = self.path_for(digest)
        try:
            size = path.stat().st_size
        except OSError:
            return None
        if size > max_size:
            log.warning("cache: %s holds %d bytes, more than the %d bytes the tensor has room for; "
                        "treated as a miss", path, size, max_size)
            return None
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.warning("cache: cannot read %s (%s); treated as a miss", path, exc)
            return None
        actual = fnv1a_64(data)
        if actual != digest:
            log.error("cache: %s is corrupt (its content hashes to %016x); removed, the client "
                      "will send the data again", path, actual)
            try:
                path.unlink()
            except OSError:
                pass
            return None
        return data
