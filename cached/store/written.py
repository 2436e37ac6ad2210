"""The commit record: what identifies a complete entry's file as it was written and verified.

``user.cached.written`` holds ``{"size", "mtime_ns", "ctime_ns", "ino", "dev"}`` of the file,
taken when the entry was committed (and again after each of our own metadata writes: the
batched access records of :mod:`cached.store.access` move the file's ctime). A file that no
longer matches its record was changed by something other than ``cached`` (an editor, a
restore, a disk that rewrote a block, an attacker resetting mtime with ``touch -d``: that
moves ctime, which nobody can set back) and must be re-verified before it is served again.

How ctime is compared: writing the record is itself a metadata change, so the ctime stored
is the one just *before* that write, and a file matches when its ctime is at most
:data:`CTIME_SLACK_NS` later. In memory (``Entry.identity``) the daemon keeps the exact
identity seen *after* its own last write, and compares exactly.

Every function blocks (stat, xattrs): call from an executor. The caller holds the entry's
``identity_lock`` around a check and the writes it guards (see :mod:`cached.store.entry`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cached.store import codec, xattrs

WRITTEN = xattrs.PREFIX + "written"
# The record write happens microseconds after the stat it stores (the kernel's ctime clock
# ticks every few ms); 100 ms covers a thread descheduled in between, and a slower write only
# costs a re-verification. A tamper within this window after our own last write, that also
# sets mtime back, passes the check at start (not the scrub, nor the exact check in memory).
CTIME_SLACK_NS = 100_000_000
_I64 = (1 << 63) - 1


@dataclass(frozen=True)
class Identity:
    """Size, times and inode of a file (what changes when its bytes or its place change)."""

    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    dev: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)

    def encode(self) -> bytes:
        return codec.dumps(
            {
                "size": self.size,
                "mtime_ns": self.mtime_ns,
                "ctime_ns": self.ctime_ns,
                "ino": self.ino,
                "dev": self.dev,
            }
        )

    @classmethod
    def decode(cls, raw: bytes) -> Identity:
        """Parse a record; raises ValueError (and nothing else) if it is not one."""
        doc = codec.loads_object(raw, max_len=512, max_depth=1)
        return cls(
            codec.int_field(doc, "size", low=0, high=_I64),
            codec.int_field(doc, "mtime_ns", low=-_I64, high=_I64),
            codec.int_field(doc, "ctime_ns", low=-_I64, high=_I64),
            codec.int_field(doc, "ino", low=0, high=(1 << 64) - 1),
            codec.int_field(doc, "dev", low=0, high=(1 << 64) - 1),
        )

    def recorded_for(self, st: os.stat_result) -> bool:
        """Whether this *stored* record describes the file whose stat is ``st``."""
        return (self.size, self.mtime_ns, self.ino, self.dev) == (
            st.st_size,
            st.st_mtime_ns,
            st.st_ino,
            st.st_dev,
        ) and self.ctime_ns <= st.st_ctime_ns <= self.ctime_ns + CTIME_SLACK_NS


def current(target: int | str | os.PathLike[str]) -> Identity:
    """The identity of the file now (by fd or path)."""
    return Identity.of(os.fstat(target) if isinstance(target, int) else os.stat(target))


def record(target: int | str | os.PathLike[str]) -> Identity:
    """Write the commit record of the file as it is now; return its identity *after* the write
    (what an unchanged file will stat as from now on)."""
    xattrs.write(target, WRITTEN, current(target).encode())
    return current(target)


def recorded(attrs: dict[str, bytes]) -> Identity | None:
    """The record among a file's xattrs; None if there is none or it does not parse."""
    raw = attrs.get(WRITTEN)
    if raw is None:
        return None
    try:
        return Identity.decode(raw)
    except ValueError:
        return None
