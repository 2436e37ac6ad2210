"""The cache directory and its index: which entries exist, what state they are in, and how
much space they hold or may still take.

Layout (Glance's words): ``<root>/<id>`` complete and verified; ``<root>/incomplete/<id>``
being filled (sparse, with a presence bitmap); ``<root>/invalid/<id>`` failed verification;
``<root>/queue/<id>`` empty markers of images queued for prefetch, in mtime order.

Ownership: the event loop owns the index. ``Store.entries``, ``Store.invalid``,
``Store.generation`` (bumped by every rebuild or detach of the index) and these
fields of an indexed :class:`Entry` are changed only by coroutines running on the loop:
``path``, ``state``, ``removed``, ``readers``, ``present``, ``reserved``, ``hits``,
``last_accessed``, ``last_modified``. Filesystem work runs on the store's executor
(``Store.io``) in the blocking functions of this module and of :mod:`cached.store.entry`,
which take values, return results and never touch the index; the loop applies the results.
Hits and access stamps reach the entries' xattrs in batches (:mod:`cached.store.access`).

A commit, an invalidation and a delete of the same entry are serialised by the entry's
``lock``: a delete that races a commit removes whichever file exists when it runs, and a
commit never resurrects a deleted entry. Across the entries of one image (an evicted one and
the next), creating, committing, invalidating and unlinking files are serialised per image
(``Store._path``), and an unlink removes only its entry's own file (its token, in
``user.cached.token``): an eviction whose unlink
ran late removed the next entry's freshly committed file (found by the issue 14 soak).
The queue methods (``enqueue``, ``dequeue``, ``queued``) touch only ``queue/`` and block:
call them from an executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from cached.errors import StoreUnavailable
from cached.ids import is_image_id
from cached.store import adopt, integrity
from cached.store import entry as entries
from cached.store.access import AccessLog
from cached.store.entry import Entry, State

log = logging.getLogger(__name__)

T = TypeVar("T")

IO_THREADS = 8  # cache-directory work at once; a hung disk holds these, not the loop's pool


@dataclass
class Scan:
    """What a scan of the cache directory found (built on a worker thread)."""

    entries: list[Entry] = field(default_factory=list)
    invalid: set[str] = field(default_factory=set)
    seconds: float = 0.0
    foreign: set[str] = field(default_factory=set)  # Glance's files (cached/store/adopt.py)


def scan(root: Path, still_there: Callable[[Path], None] | None = None) -> Scan:
    """Create the sub-directories and read every entry back from its file and xattrs.

    Blocking: call from an executor. ``still_there`` is called first, in the same thread,
    right before anything is created: it raises OSError when ``root`` is no longer the
    filesystem it was judged to be (a share that went away since), so nothing is ever
    created in a bare mount point. Finishes commits interrupted between the state write
    and the rename; moves files without usable metadata to ``invalid/``.
    """
    started = time.monotonic()
    found = Scan()
    if still_there is not None:
        still_there(root)
    for d in ("incomplete", "invalid", "queue"):
        (root / d).mkdir(exist_ok=True)
    for name in os.listdir(root):
        if is_image_id(name):
            if adopt.is_foreign(root / name):  # Glance's: adopted later, never quarantined
                found.foreign.add(name)
                continue
            entry = _load(root, root / name, State.COMPLETE)
            if entry is not None:
                found.entries.append(entry)
    adopt.warn_unknown(root)
    for name in os.listdir(root / "incomplete"):
        if is_image_id(name) and not adopt.is_foreign(root / "incomplete" / name):
            entry = _load(root, root / "incomplete" / name, State.FILLING)
            if entry is not None:
                found.entries.append(entry)
    found.invalid = {n for n in os.listdir(root / "invalid") if is_image_id(n)}
    found.seconds = time.monotonic() - started
    return found


def _load(root: Path, path: Path, expected: State) -> Entry | None:
    try:
        entry = integrity.load(path, expected)  # the rules: cached/store/integrity.py
    except (OSError, ValueError) as exc:
        integrity.quarantine(root / "invalid", path, exc)  # clean removes it
        return None
    if entry.state is State.COMPLETE and expected is State.FILLING:
        # A crash between the state write and the rename: promoted as a suspect (its
        # digest is checked before it is served, cached/store/integrity.py rule 3).
        final = root / entry.image_id
        os.rename(path, final)
        entry.path = final
        log.info("finished committing %s", entry.image_id)
    return entry


def _create(path: Path, image_id: str, size: int, digests: dict[str, str | None]) -> Entry:
    path.unlink(missing_ok=True)
    return entries.create(path, image_id, size, **digests)


def _commit(entry_path: Path, root: Path, image_id: str) -> Path:
    """Mark the file complete and move it to ``root``; returns its new path."""
    entries.write_state(entry_path, State.COMPLETE)
    final = root / image_id
    os.rename(entry_path, final)
    try:
        fsync_dir(root)
        fsync_dir(entry_path.parent)
    except OSError as exc:  # the data is flushed; only the rename may not survive a crash
        log.warning("cannot flush the directory of %s: %s", final, exc)
    return final


def _invalidate(entry_path: Path, target: Path, reason: str) -> None:
    entries.write_states(entry_path, State.INVALID, error=reason)
    os.rename(entry_path, target)


def _ours(path: Path, token: bytes | None) -> bool:
    """Whether the file at ``path`` is the entry's whose token is ``token`` (None: any file
    is, for entries from before tokens). Raises OSError (FileNotFoundError: none there)."""
    return token is None or entries.read_token(path) == token


def _unlink_entry(path: Path, token: bytes | None) -> bool:
    """Remove the entry's file at ``path``, if it still is its file (see :func:`_ours`).
    Another file there is the image's next entry: ours is gone already."""
    try:
        if not _ours(path, token):
            return True
    except FileNotFoundError:
        return True
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)
        return False
    return _unlink(path)


def _unlink(path: Path) -> bool:
    """Remove ``path`` (already gone counts as removed)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return True
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)
        return False
    return True


class Store:
    """All entries under one cache directory, indexed in memory by image id."""

    def __init__(self, root: Path, io: Executor | None = None, access_interval: float = 0.0):
        """``access_interval``: seconds between writes of the access history to the
        entries' xattrs (:mod:`cached.store.access`); 0 writes every access at once."""
        self.root = Path(root)
        self.incomplete_dir = self.root / "incomplete"
        self.invalid_dir = self.root / "invalid"
        self.queue_dir = self.root / "queue"
        self.entries: dict[str, Entry] = {}
        self.invalid: set[str] = set()
        # Per image: the lock of its paths and how many hold or wait for it (``_path``).
        self._paths: dict[str, tuple[asyncio.Lock, int]] = {}
        # Files of removed entries whose unlink failed, and their bytes (remove, clean).
        self.undeleted: dict[Path, tuple[bytes | None, int]] = {}
        # Which index this is: bumped whenever the index is rebuilt or forgotten (open,
        # detach), so an entry created under an older one is never inserted into a newer.
        self.generation = 0
        # Glance's complete files not yet adopted (cached/cachedir/adoption.py takes them out).
        self.foreign: set[str] = set()
        self._own_io = io is None
        self.io: Executor = io or ThreadPoolExecutor(IO_THREADS, thread_name_prefix="cache-io")
        self.access = AccessLog(self.run, access_interval, self._indexed)

    @contextlib.asynccontextmanager
    async def _path(self, image_id: str) -> AsyncIterator[None]:
        """Hold the image's paths: creating, committing, invalidating and unlinking its
        entries' files happen one at a time per image, so an unlink that checked the file
        is this entry's removes that file (not the next entry's renamed there meanwhile)."""
        lock, users = self._paths.get(image_id, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._paths[image_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._paths[image_id]
            if users == 1:
                del self._paths[image_id]
            else:
                self._paths[image_id] = (lock, users - 1)

    async def run(self, func: Callable[..., T], *args: object) -> T:
        """Run blocking cache-directory work on the store's executor."""
        return await asyncio.get_running_loop().run_in_executor(self.io, func, *args)

    async def open(self, still_there: Callable[[Path], None] | None = None) -> None:
        """Rebuild the index from the files and their xattrs (replacing what it held);
        ``still_there``: see :func:`scan`."""
        found = await self.run(scan, self.root, still_there)
        self._forget()  # entries of the index replaced are never committed or touched
        self.entries = {e.image_id: e for e in found.entries}
        self.invalid = found.invalid
        self.foreign = found.foreign
        log.info(
            "cache index: %d complete, %d partial, %d invalid in %.3fs (%s)",
            sum(e.complete for e in found.entries),
            sum(not e.complete for e in found.entries),
            len(found.invalid),
            found.seconds,
            self.root,
        )

    def detach(self) -> int:
        """Forget every entry without touching the disk: the directory vanished (or is
        another filesystem now), so no commit, invalidation or access record of an entry
        indexed before may reach whatever its path names later. Returns how many."""
        count = len(self.entries)
        self._forget()
        return count

    def _forget(self) -> None:
        """Start a new index generation: every entry indexed so far is removed."""
        self.generation += 1
        for entry in self.entries.values():
            entry.removed = True
            entry.reserved = 0
        self.entries = {}
        self.invalid = set()
        self.undeleted = {}
        self.foreign = set()

    async def aclose(self) -> None:
        """Write the pending access history (a clean shutdown loses none), then :meth:`close`."""
        await self.access.close()
        self.close()

    def close(self) -> None:
        if self._own_io:
            self.io.shutdown(wait=False)

    def _indexed(self, entry: Entry) -> bool:
        return self.entries.get(entry.image_id) is entry

    def get(self, image_id: str) -> Entry | None:
        return self.entries.get(image_id)

    async def create(
        self,
        image_id: str,
        size: int,
        *,
        checksum: str | None,
        os_hash_algo: str | None,
        os_hash_value: str | None,
        disk_format: str | None = None,
        container_format: str | None = None,
    ) -> Entry:
        """Create a new partial entry in ``incomplete/`` (a sparse file of ``size`` bytes)
        and index it, replacing any entry the image had.

        If the index was rebuilt or forgotten while the file was created (the directory
        vanished, or came back as another filesystem), the entry is returned ``removed`` and
        not indexed: the rebuilt index is what the directory holds now (issue 14 item 6)."""
        self._check_id(image_id)
        digests = {
            "checksum": checksum,
            "os_hash_algo": os_hash_algo,
            "os_hash_value": os_hash_value,
            "disk_format": disk_format,
            "container_format": container_format,
        }
        old = self.entries.get(image_id)
        if old is not None:
            await self.remove(image_id)
        generation = self.generation
        async with self._path(image_id):
            entry = await self.run(_create, self.incomplete_dir / image_id, image_id, size, digests)
        if self.generation != generation:
            log.warning("cache index rebuilt while %s was created: not indexed", image_id)
            entry.removed = True
            return entry
        replaced = self.entries.get(image_id)
        if replaced is not None:  # created by someone else meanwhile: theirs is indexed
            replaced.removed = True
        self.entries[image_id] = entry
        return entry

    async def commit(self, entry: Entry) -> bool:
        """Make a verified entry servable: mark it complete and move it out of incomplete/.

        Returns False when the entry was deleted before or while this ran (it is then gone,
        not re-created), or is not the indexed entry of its image (one of an index rebuilt
        since: its path may name another file now).
        """
        async with entry.lock:
            if entry.removed or self.entries.get(entry.image_id) is not entry:
                return False
            async with self._path(entry.image_id):
                entry.path = await self.run(_commit, entry.path, self.root, entry.image_id)
            entry.state = State.COMPLETE
            entry.reserved = 0
        if entry.removed:
            return False
        # The download that filled it was an access too; written at once with the commit
        # record (cached/store/written.py).
        await self.touch(entry, hit=False, now=True)
        return True

    async def invalidate(self, entry: Entry, reason: str) -> None:
        """Move an entry that failed verification to invalid/; it is never served."""
        if self.entries.get(entry.image_id) is entry:
            del self.entries[entry.image_id]
        async with entry.lock:
            entry.state = State.INVALID
            entry.error = reason
            entry.reserved = 0
            if entry.removed:
                return
            entry.removed = True
            target = self.invalid_dir / entry.image_id
            # Listed before the rename: a clean that removes the file meanwhile also drops
            # the id; one that runs before the rename finds no file and leaves both.
            self.invalid.add(entry.image_id)
            try:
                async with self._path(entry.image_id):
                    await self.run(_invalidate, entry.path, target, reason)
            except BaseException:
                self.invalid.discard(entry.image_id)
                raise
            entry.path = target

    async def remove(self, image_id: str) -> Entry | None:
        """Delete an entry (complete or partial). Open readers keep their file until they close.

        The entry leaves the index at once (it is never served again). If its file cannot be
        unlinked (``EIO``, a read-only disk) it is not forgotten: it is kept in
        ``undeleted`` (counted in :meth:`total_size`, removed by the next ``clean``) and
        StoreUnavailable is raised (issue 14 item 9: the file stayed, uncounted, and came
        back as a cached image at the next start)."""
        entry = self.entries.pop(image_id, None)
        if entry is None:
            return None
        entry.removed = True
        entry.reserved = 0
        async with entry.lock, self._path(image_id):  # after a commit in progress: where
            try:  # the file is now, and only if it is this entry's
                await self.run(_unlink_or_raise, entry.path, entry.token)
            except OSError as exc:
                self.undeleted[entry.path] = (entry.token, entry.present_bytes())
                raise StoreUnavailable(
                    f"cannot remove {entry.path}: {exc.strerror or exc}", exc.errno
                ) from exc
        return entry

    async def remove_undeleted(self) -> int:
        """Try again to unlink the files of entries whose removal failed; returns how many
        are gone now (clean)."""
        gone = 0
        for path, (token, _) in list(self.undeleted.items()):
            async with self._path(path.name):
                if await self.run(_unlink_entry, path, token):
                    self.undeleted.pop(path, None)
                    gone += 1
        return gone

    async def evict(self, entry: Entry) -> bool:
        """Drop ``entry`` if it is indexed (prune, clean): out of the index at once (new
        requests miss), then unlink; put back if the unlink failed. A complete entry may be
        being read: its readers keep their open file and finish from it (the blocks are
        freed when the last closes it); a partial one being read is kept (its reader may
        need a fill of this very entry next). The caller checks that no fill uses it.

        The unlink is atomic and the index is rebuilt from the files at start, so a crash at
        any point leaves either the whole entry or none of it.
        """
        if self.entries.get(entry.image_id) is not entry or entry.removed:
            return False
        if entry.readers and not entry.complete:
            return False
        del self.entries[entry.image_id]
        entry.removed = True
        async with entry.lock, self._path(entry.image_id):
            if await self.run(_unlink_entry, entry.path, entry.token):
                return True
        entry.removed = False
        self.entries.setdefault(entry.image_id, entry)
        return False

    async def remove_invalid(self, image_id: str) -> bool:
        self.invalid.discard(image_id)
        return await self.run(_unlink_existing, self.invalid_dir / image_id)

    async def touch(self, entry: Entry, *, hit: bool, now: bool = False) -> None:
        """Record an access (and a hit): in the index now, on the file's xattrs with the
        next batch of access records (``now``: at once, with the commit record)."""
        if entry.removed:
            return
        entries.access_values(entry, hit=hit, now=time.time())
        await self.access.record(entry, now=now)

    def complete_entries(self) -> list[Entry]:
        return [e for e in self.entries.values() if e.complete]

    def partial_entries(self) -> list[Entry]:
        return [e for e in self.entries.values() if not e.complete]

    def total_size(self) -> int:
        """Bytes the cache holds or has promised: complete entries, the filled part of
        partial ones, and what running fills reserved beyond that."""
        held = sum(e.footprint() for e in self.entries.values())
        return held + sum(b for _, b in self.undeleted.values())

    # The prefetch queue: zero-byte marker files, ordered by mtime (Glance's queue/).
    def enqueue(self, image_id: str) -> bool:
        self._check_id(image_id)
        marker = self.queue_dir / image_id
        if marker.exists():
            return False
        marker.touch()
        return True

    def dequeue(self, image_id: str) -> bool:
        self._check_id(image_id)
        try:
            (self.queue_dir / image_id).unlink()
            return True
        except FileNotFoundError:
            return False

    def queued(self) -> list[str]:
        markers = []
        for name in os.listdir(self.queue_dir):
            if is_image_id(name):
                try:
                    markers.append((os.stat(self.queue_dir / name).st_mtime, name))
                except FileNotFoundError:
                    continue
        return [name for _, name in sorted(markers)]

    @staticmethod
    def _check_id(image_id: str) -> None:
        if not is_image_id(image_id):
            raise ValueError(f"not an image id: {image_id!r}")


def _unlink_or_raise(path: Path, token: bytes | None) -> None:
    """Remove the entry's file at ``path`` if it still is its file (see :func:`_ours`);
    already gone counts as removed; any other error is raised."""
    try:
        if not _ours(path, token):
            return
        os.unlink(path)
    except FileNotFoundError:
        pass


def _unlink_existing(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


def fsync_dir(path: Path) -> None:
    """Make the names in directory ``path`` durable (after a create, rename or unlink)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
