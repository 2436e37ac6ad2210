"""The only module that touches extended attributes (``user.*`` namespace).

Call from an executor: every function here is a blocking system call.
"""

from __future__ import annotations

import errno
import os

import xattr

# Glance's xattr driver keeps its hit counter and error under these two names; we reuse them.
HITS = "user.hits"
ERROR = "user.error"
PREFIX = "user.cached."
META = PREFIX + "meta"
STATE = PREFIX + "state"
BITMAP = PREFIX + "bitmap"
LAST_ACCESSED = PREFIX + "last_accessed"
LAST_MODIFIED = PREFIX + "last_modified"
# A random token naming one entry's file (not its image): an unlink checks it first, so it
# never removes the next entry of the image at the same path (cached/store/store.py).
TOKEN = PREFIX + "token"


def read_all(target: int | str | os.PathLike[str]) -> dict[str, bytes]:
    """All ``user.*`` attributes of a file (by fd or path) as a dict."""
    f = os.fspath(target) if not isinstance(target, int) else target
    names = xattr.listxattr(f)
    return {n: xattr.getxattr(f, n) for n in names if n.startswith("user.")}


def write(target: int | str | os.PathLike[str], name: str, value: bytes) -> None:
    """Set one attribute (by fd or path)."""
    f = os.fspath(target) if not isinstance(target, int) else target
    xattr.setxattr(f, name, value)


def write_many(target: int | str | os.PathLike[str], values: dict[str, bytes]) -> None:
    for name, value in values.items():
        write(target, name, value)


def read(target: int | str | os.PathLike[str], name: str) -> bytes | None:
    """One attribute (by fd or path); None if the file has none of that name."""
    f = os.fspath(target) if not isinstance(target, int) else target
    try:
        value: bytes = xattr.getxattr(f, name)
        return value
    except OSError as exc:
        if exc.errno == errno.ENODATA:
            return None
        raise


def supported(directory: str | os.PathLike[str]) -> bool:
    """Whether files in ``directory`` accept ``user.*`` attributes.

    Raises OSError when the probe file cannot even be written (read-only, full, no access).
    """
    probe = os.path.join(directory, f".xattr-probe-{os.getpid()}")
    fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        xattr.setxattr(fd, PREFIX + "probe", b"1")
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise
    finally:
        os.close(fd)
        os.unlink(probe)
