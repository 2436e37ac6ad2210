"""What a file found in the cache directory is allowed to claim, and re-verifying one.

The rules, applied when the index is built (:func:`load`) and by the re-verification of
:mod:`cached.cachedir.reverify`:

1. **Complete entries** (``<root>/<id>``) are served without being re-read only while their
   file is what its commit record (:mod:`cached.store.written`) says. No record, or a record
   that does not match (size, mtime, ctime, inode, device; any xattr write moves ctime, so a
   rewritten bitmap or state counts too) make the entry *suspect*: its digest is checked
   over the whole file, off the event loop, before it is served again. An entry without a
   digest to check (the upstream gave none) cannot be vouched for once suspect and goes to
   ``invalid/``.
2. **Partial entries** (``incomplete/<id>``): a chunk is trusted only if it is covered by the
   fill's discipline -- every byte of the chunk written, then ``fdatasync``, then its bit set.
   So a chunk whose byte range holds a hole of the sparse file was never written: at load
   such claims are dropped from the bitmap (it over-claimed: a crash cannot do that, only a
   tamper or a bug) and the chunk is fetched again. The bytes of claimed chunks are checked by
   the digest when the entry completes; until then they are served to ranges as the disk has
   them.
3. ``state=complete`` on a file in ``incomplete/`` (a crash between the state write and the
   rename, or a tamper) is promoted only as a suspect, i.e. verified by digest before it is
   served; if its bitmap (after rule 2) is not full it is a partial entry again.
4. Anything else -- metadata that does not parse within bounds (:func:`cached.store.entry.parse`),
   a partial state in the root, an invalid state outside ``invalid/`` -- moves the file to
   ``invalid/`` with one log line; the clean job removes it.

Every function blocks: call from an executor. Only the thread that builds or verifies an
entry touches it, except ``Entry.suspect``/``identity``, guarded by ``Entry.identity_lock``.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cached.digest import Digest
from cached.store import entry as entries
from cached.store import written, xattrs
from cached.store.entry import Entry, State

log = logging.getLogger(__name__)

_PIECE = 1 << 20


def load(path: Path, area: State) -> Entry:
    """Read the entry at ``path`` (found in the ``area`` of the cache) and apply the rules.

    Raises ValueError (rule 4) or OSError; the caller moves the file to ``invalid/``.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        attrs = xattrs.read_all(fd)
        st = os.fstat(fd)
        entry = entries.parse(path, attrs, st)
        entry.token = attrs.get(xattrs.TOKEN)
        if entry.state is State.INVALID:
            raise ValueError(f"{path}: marked invalid ({entry.error})")
        if area is State.COMPLETE:
            if entry.state is not State.COMPLETE:
                raise ValueError(f"{path}: state {entry.state.value} in the cache's root")
            record = written.recorded(attrs)
            if record is not None and record.recorded_for(st):
                entry.identity = written.Identity.of(st)
            else:
                _suspect(entry, "no commit record" if record is None else "changed since commit")
            return entry
        dropped = _drop_unwritten(fd, entry)
        if entry.state is State.COMPLETE:
            if entry.present.full():
                _suspect(entry, "marked complete, not committed")
                return entry
            entry.state = State.FILLING
            xattrs.write(path, xattrs.STATE, State.FILLING.value.encode())
            log.warning("%s: marked complete with chunks missing: partial again", path)
        if dropped:
            xattrs.write(path, xattrs.BITMAP, entry.present.to_bytes())
            log.warning("%s: bitmap claimed %d chunk(s) never written: dropped", path, dropped)
        return entry
    finally:
        os.close(fd)


def _suspect(entry: Entry, why: str) -> None:
    if entry.checksum is None and entry.os_hash_value is None:
        raise ValueError(f"{entry.path}: {why}, and no digest to verify it with")
    entry.suspect = True
    log.debug("%s: %s: verified before it is served", entry.path, why)


def _drop_unwritten(fd: int, entry: Entry) -> int:
    """Clear the bits of claimed chunks whose byte range holds a hole (rule 2)."""
    dropped = 0
    for c in list(entry.present):
        start, end = entry.chunk_bounds(c)
        if end > start and _has_hole(fd, start, end):
            entry.present.discard(c)
            dropped += 1
    return dropped


def _has_hole(fd: int, start: int, end: int) -> bool:
    try:
        return os.lseek(fd, start, os.SEEK_HOLE) < end
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            return False  # no hole information: the file counts as all data
        raise


def quarantine(invalid_dir: Path, path: Path, reason: object) -> bool:
    """Move an unusable file to ``invalid/`` (the clean job removes it); one log line."""
    target = invalid_dir / path.name
    try:
        os.rename(path, target)
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.error("cannot move unusable %s to invalid/ (%s): %s", path, exc, reason)
        return False
    try:
        xattrs.write_many(
            target,
            {xattrs.STATE: State.INVALID.value.encode(), xattrs.ERROR: str(reason).encode()[:1024]},
        )
    except OSError:
        pass  # the place says it all
    log.warning("moved %s to invalid/: %s", path, reason)
    return True


# ------------------------------------------------------------------------ re-verification
class Verdict(enum.Enum):
    GOOD = "good"  # the digest matched
    CORRUPT = "corrupt"  # the digest did not match
    UNVERIFIABLE = "unverifiable"  # no digest to check (the upstream gave none)
    CHANGED = "changed"  # the file was written while we read it: try again later
    GONE = "gone"  # deleted or moved meanwhile
    STOPPED = "stopped"  # the caller asked us to stop


@dataclass(frozen=True)
class Check:
    verdict: Verdict
    detail: str = ""
    bytes_read: int = 0


def verify(
    entry: Entry,
    *,
    rate: float | None = None,
    stop: Callable[[], bool] = lambda: False,
    yield_to: Callable[[], bool] = lambda: False,
) -> Check:
    """Hash ``entry``'s file and compare with its digest.

    Args:
        rate: at most this many bytes per second (None: as fast as the disk goes).
        stop: polled between pieces; True ends the check with ``STOPPED``.
        yield_to: polled between pieces; while True the check waits (fills run first).

    On ``GOOD`` for a suspect entry, its commit record is written anew and it is no longer
    suspect (the entry's lock is held from the first stat to that write).
    """
    digest = Digest.for_record(entry.checksum, entry.os_hash_algo, entry.os_hash_value)
    if digest is None:
        return Check(Verdict.UNVERIFIABLE, "no checksum or os_hash_value")
    try:
        fd = os.open(entry.path, os.O_RDONLY)
    except FileNotFoundError:
        return Check(Verdict.GONE)
    try:
        before = written.current(fd)
        began = time.monotonic()
        pos = 0
        while pos < entry.size:
            if stop():
                return Check(Verdict.STOPPED, bytes_read=pos)
            while yield_to() and not stop():
                time.sleep(0.05)
                began = time.monotonic() - (pos / rate if rate else 0.0)
            data = os.pread(fd, min(_PIECE, entry.size - pos), pos)
            if not data:
                return Check(Verdict.CORRUPT, f"file ends at {pos} of {entry.size} bytes", pos)
            digest.feed(pos, data)
            pos += len(data)
            if rate:
                ahead = pos / rate - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)
        if os.pread(fd, 1, entry.size):
            return Check(Verdict.CORRUPT, f"file is longer than {entry.size} bytes", pos)
        with entry.identity_lock:
            after = written.current(fd)
            if (after.size, after.mtime_ns, after.ino) != (
                before.size,
                before.mtime_ns,
                before.ino,
            ):
                return Check(Verdict.CHANGED, "written while being verified", pos)
            if digest.hexdigest() != digest.expected:
                return Check(
                    Verdict.CORRUPT,
                    f"{digest.algo} mismatch: got {digest.hexdigest()}, expected {digest.expected}",
                    pos,
                )
            if entry.suspect and not entry.removed:
                try:
                    entry.identity = written.record(fd)
                except OSError as exc:  # read-only: verified now, checked again next start
                    log.debug("cannot record %s: %s", entry.path, exc)
                    entry.identity = written.current(fd)
                entry.suspect = False
            return Check(Verdict.GOOD, digest.algo, pos)
    finally:
        os.close(fd)


def write_access(entry: Entry, path: Path, values: dict[str, bytes]) -> None:
    """Write our access xattrs (``values``) to the entry's file at ``path``.

    On a complete entry this is a metadata change of a verified file (it moves ctime), so
    the commit record is written again after it -- unless the file no longer is what we last
    recorded, which marks the entry suspect instead (re-verified before its next hit) and
    writes nothing: the file at ``path`` may not be this entry's any more (evicted, and the
    image cached anew at the same path: writing there moved the new file's ctime and its
    next hit took it for changed; found by the issue 14 soak). The file is checked and
    written through one descriptor, so what is checked is what is written.
    A write that fails (read-only, full, deleted meanwhile) is logged: a hit is still a hit.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        log.debug("cannot record access to %s: %s", path, exc)
        return
    try:
        with entry.identity_lock:
            vouched = entry.complete and not entry.suspect
            if vouched and entry.identity is not None:
                st = os.fstat(fd)
                now = written.Identity.of(st)
                if now != entry.identity:
                    if (now.ino, now.dev) == (entry.identity.ino, entry.identity.dev) and (
                        st.st_nlink > 0
                    ):  # our file, changed behind our back
                        entry.suspect = True
                        log.warning("%s changed since it was verified: re-verifying", path)
                    return  # (else: another file at that path now, or ours unlinked)
            xattrs.write_many(fd, values)
            if vouched:
                entry.identity = written.record(fd)
    except OSError as exc:
        log.debug("cannot record access to %s: %s", path, exc)
    finally:
        os.close(fd)


# A hit of at most this many bytes is read by the thread that opens and checks its file, which
# closes it again: the loop writes the bytes, with no sendfile set-up and no second hand-off
# to a thread to close the file (about a sixth of a 64 KiB hit's cost). Larger hits sendfile.
SMALL_HIT = 256 << 10


def open_for_hit(
    entry: Entry, want: tuple[int, int] | None = None
) -> tuple[BinaryIO | bytes, bool]:
    """Open a complete entry's file to serve a hit, and tell whether it changed since it was
    verified: the opened file itself is compared with what we last recorded (one ``open``
    and one ``fstat``, so nothing can be swapped in between the check and the open).

    ``want``: bytes ``[start, end)`` to read now from the file as checked (a small hit);
    they are returned instead of the file, which is closed again. A file that changed is
    always returned open (the caller closes it and has the entry verified).

    Marks the entry suspect if it changed; an entry already suspect counts as changed.
    Raises FileNotFoundError when the file is gone (evicted meanwhile).
    """
    file = open(entry.path, "rb", buffering=0)  # the caller closes it
    try:
        with entry.identity_lock:  # the fstat too: our own writes take the lock around theirs
            if entry.suspect:
                return file, True
            if entry.identity is not None:  # None: being committed, recorded with the commit
                st = os.fstat(file.fileno())
                now = written.Identity.of(st)
                if st.st_nlink == 0 and now.ctime_ns != entry.identity.ctime_ns:
                    # Unlinked since we opened it (evicted or deleted while this hit began;
                    # its readers finish from the open file): the unlink itself moves ctime.
                    now = dataclasses.replace(now, ctime_ns=entry.identity.ctime_ns)
                if now != entry.identity:
                    entry.suspect = True
                    log.warning(
                        "%s changed since it was verified (%s -> %s): re-verifying",
                        entry.path,
                        entry.identity,
                        now,
                    )
                    return file, True
        if want is None:
            return file, False
        start, end = want
        data = os.pread(file.fileno(), end - start, start)
    except BaseException:
        file.close()
        raise
    file.close()
    return data, False
