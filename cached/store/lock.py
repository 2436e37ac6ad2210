"""One daemon per cache directory.

Two daemons on one cache directory would undo each other's work (the second one's start-up
scan moves the first one's half-written entries to ``invalid/``). Each daemon binds an
abstract Unix socket named after the directory's device and inode while it has the directory
indexed: the kernel refuses the same name to a second daemon on the host, and frees it when
the process ends, ``kill -9`` included. Nothing is written for it, and no descriptor is held
open in the directory (an operator can still unmount a share under a running daemon).

The :class:`~cached.cachedir.directories.Directories` of a daemon owns the socket: it hands
its current claim to :func:`take`, which runs on the cache's I/O threads (it stats the
directory) and returns the claim to keep; the loop stores it.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from cached.errors import ConfigError


class CacheInUse(ConfigError):
    """Another cached on this host has the cache directory."""


def take(root: Path, held: socket.socket | None = None) -> socket.socket:
    """Claim ``root`` for this process and return the socket that holds the claim; ``held``
    (this process's earlier claim) is returned as it is when it names the same directory, and
    released when it does not (a new filesystem at that path). Raises CacheInUse."""
    st = os.stat(root)
    name = f"\0cached-cache-dir:{st.st_dev}:{st.st_ino}"
    if held is not None:
        if held.getsockname() == name.encode():
            return held
        release(held)
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        claim.bind(name)
    except OSError as exc:
        claim.close()
        if exc.errno != errno.EADDRINUSE:
            raise
        raise CacheInUse(
            f"the cache directory {root} is in use by another cached on this host (its "
            f"socket: ss -xlp | grep '{name[1:]}'); each daemon needs its own image_cache_dir"
        ) from None
    return claim


def release(held: socket.socket | None) -> None:
    if held is not None:
        held.close()
