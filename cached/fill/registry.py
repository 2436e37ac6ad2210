"""The registry of fills: at most one running fill per image, and the fills of deleted
entries that still have readers.

Owned by the event loop: ``fills``, ``orphans`` and the pass-through switch are changed only
by coroutines and callbacks running there.

Deleting an entry while it fills (``remove``) takes the fill out of the registry at once (a
new request starts a new entry and fill) and *orphans* it: it goes on only while readers of
the deleted entry still follow it, and is cancelled when the last one leaves. ``close``
stops registered and orphaned fills alike.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from cached import metrics
from cached.errors import FillAborted, StoreUnavailable
from cached.fill.machine import DataCredentials, Fill, FillSettings, FillState
from cached.fill.sources import Sources
from cached.safety.audit import Safety
from cached.safety.signatures import Signatures
from cached.store import Entry, Store
from cached.store.entry import FORMAT_MAX
from cached.upstream import Backend, Credentials, ImageRecord

log = logging.getLogger("cached.filler")

STORE_RETRY_AFTER = 30  # seconds of pass-through after the cache disk failed
# Errors of the cache disk itself (not of one entry, not of the upstream): new fills are
# refused for a while and downloads pass through instead of failing over and over.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}


class CachedMeanwhile(FillAborted):
    """The image's entry is complete: there is nothing to fill (it was committed while the
    caller waited for the fill before to end). Serve it as a hit."""


class DiskGuard(Protocol):
    """What the filler needs of the cache directory's guard."""

    @property
    def ok(self) -> bool: ...

    def report(self, exc: BaseException) -> None: ...


class Filler:
    """The registry of fills: at most one per image."""

    def __init__(
        self,
        store: Store,
        backend: Backend,
        settings: FillSettings,
        data_credentials: DataCredentials | None = None,
        renew_credentials: Callable[[], Awaitable[bool]] | None = None,
    ):
        self._store = store
        self._renew_credentials = renew_credentials
        self._backend = backend
        self._settings = settings
        self._data_credentials = data_credentials
        self.fills: dict[str, Fill] = {}
        self.orphans: set[Fill] = set()
        self._store_failed_at = -float(STORE_RETRY_AFTER)
        # The cache directory's guard (cached/cachedir/guard.py), when there is one: it decides when
        # fills may run instead of the fixed pass-through above (kept only for a full disk);
        # disk errors wake it.
        self.disk_guard: DiskGuard | None = None
        # Told whenever reservations change or entries are let go (a fill reserved space,
        # a fill ended and released its reservation, the last reader of a partial entry
        # left): the prune makes room, also after the entries in use are released.
        self.on_reserve: Callable[[], None] | None = None
        self._opening: dict[str, asyncio.Future[Fill]] = {}
        # Content inspection (cached/safety/audit.py), when image_safety_mode is not off.
        self.safety: Safety | None = None
        # Signature checks (cached/safety/signatures.py), when image_signature_verify is on.
        self.signatures: Signatures | None = None
        # Chooses each new fill's byte sources (cached/fill/sources.py), given the fill; None:
        # the upstream alone. Set once by the composition root (a fleet: cached/fleet/peers.py).
        self.sources: Callable[[Fill], Sources] | None = None

    def get(self, image_id: str) -> Fill | None:
        """The running fill of ``image_id``, if any."""
        fill = self.fills.get(image_id)
        return fill if fill is not None and fill.state is FillState.RUNNING else None

    def active(self, image_id: str) -> Fill | None:
        """The fill of ``image_id`` still at work: running, or verifying (every byte
        written; flushing, digest, verdicts), if any. What a sibling may follow: a verifying
        fill is no fill for :meth:`get` (nothing new joins it), but its file holds every
        byte and its readers get the last one once it is verified."""
        fill = self.fills.get(image_id)
        return fill if fill is not None and fill.state.active else None

    def fill_of(self, entry: Entry) -> Fill | None:
        """The active fill working on ``entry`` itself (registered or orphaned), if any."""
        fill = self.fills.get(entry.image_id)
        if fill is not None and fill.entry is entry and fill.state.active:
            return fill
        for orphan in self.orphans:
            if orphan.entry is entry and orphan.state.active:
                return orphan
        return None

    def passing_through(self) -> bool:
        """Whether new fills are refused because the cache disk failed a moment ago."""
        if self.disk_guard is not None and not self.disk_guard.ok:
            return True
        return time.monotonic() - self._store_failed_at < STORE_RETRY_AFTER

    async def open(self, record: ImageRecord, creds: Credentials) -> tuple[Fill, bool]:
        """The fill of ``record``'s image, creating its entry and fill if there are none.

        Returns the fill and whether this call created it. Raises StoreUnavailable when the
        cache disk cannot take it, FillAborted when the entry was deleted meanwhile
        (CachedMeanwhile, a FillAborted: the image's entry is complete, nothing to fill).
        """
        image_id = record.id
        while True:
            fill = self.fills.get(image_id)
            if fill is None:
                break
            if fill.state is FillState.RUNNING:
                return fill, False
            await fill.closed.wait()  # a fill that just ended is still flushing
        opening = self._opening.get(image_id)
        if opening is not None:
            return await asyncio.shield(opening), False
        if self.passing_through():
            raise StoreUnavailable("the cache disk failed a moment ago")
        future: asyncio.Future[Fill] = asyncio.get_running_loop().create_future()
        self._opening[image_id] = future
        try:
            fill = await self._open(record, creds)
            future.set_result(fill)
            return fill, True
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                # The opener's own cancellation (its client left, a timeout) is not the
                # waiters' (issue 14 item 8): they get FillAborted and retry or pass through.
                future.set_exception(FillAborted(f"opening the fill of {image_id} was cancelled"))
            else:
                future.set_exception(exc)
            future.exception()  # mark retrieved: waiters get it from their own await
            raise
        finally:
            del self._opening[image_id]

    def opening(self, image_id: str) -> bool:
        """Whether a fill of ``image_id`` is being opened (its entry is in use)."""
        return image_id in self._opening

    async def _open(self, record: ImageRecord, creds: Credentials) -> Fill:
        image_id = record.id
        entry = self._store.get(image_id)
        if entry is not None and entry.complete and entry.size == record.size:
            # Committed while we waited for its fill to end (a miss that came during the
            # verification). A second fill of a complete entry committed it again (its state
            # written, its file renamed onto itself): the file changed under its commit
            # record and, without a digest, went to invalid/ (found by the issue 14 soak).
            raise CachedMeanwhile(f"{image_id} was cached meanwhile")
        try:
            if entry is None or entry.size != record.size:
                assert record.size is not None
                entry = await self._store.create(
                    image_id,
                    record.size,
                    checksum=record.checksum,
                    os_hash_algo=record.os_hash_algo,
                    os_hash_value=record.os_hash_value,
                    disk_format=_format(record.raw.get("disk_format")),
                    container_format=_format(record.raw.get("container_format")),
                )
            fd = await self._store.run(os.open, entry.path, os.O_RDWR)
        except FileNotFoundError as exc:  # deleted (or evicted) meanwhile: not a disk failure
            raise FillAborted(f"entry of {image_id} deleted while opening it") from exc
        except OSError as exc:
            self._store_failed(StoreUnavailable(str(exc), exc.errno))
            raise StoreUnavailable(f"cannot create a cache entry: {exc}", exc.errno) from exc
        if entry.removed:
            await self._store.run(os.close, fd)
            raise FillAborted(f"entry of {image_id} deleted while opening it")
        fill = Fill(
            entry,
            self._store,
            self._backend,
            creds,
            self._settings,
            self._closed,
            fd,
            self._data_credentials,
            safety=self.safety.for_record(record) if self.safety is not None else None,
            signing=self.signatures.for_record(record) if self.signatures is not None else None,
            refuse=self.safety is not None and self.safety.refuse,
            renew_credentials=self._renew_credentials,
        )
        fill.on_reserve = self.reserved
        if self.sources is not None:
            fill.sources = self.sources(fill)
        self.fills[image_id] = fill
        return fill

    def reserved(self) -> None:
        """A fill reserved space: let the prune make room."""
        if self.on_reserve is not None:
            self.on_reserve()

    def _closed(self, fill: Fill) -> None:  # called by the fill when it lets go
        if self.fills.get(fill.entry.image_id) is fill:
            del self.fills[fill.entry.image_id]
        self.orphans.discard(fill)
        if isinstance(fill.error, StoreUnavailable):
            self._store_failed(fill.error)
        self.reserved()  # its reservation is released and its entry evictable again

    def _store_failed(self, exc: StoreUnavailable) -> None:
        if self.disk_guard is not None:
            self.disk_guard.report(exc)  # it decides about read-only, vanished, failing
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                return  # (a full disk is not the mount's fault: the pause below stays)
        if exc.errno in DISK_ERRNOS:
            log.error(
                "the cache directory failed (%s): passing through for %ds",
                exc,
                STORE_RETRY_AFTER,
            )
            self._store_failed_at = time.monotonic()
            metrics.store_refused(exc)

    def reader_left(self, entry: Entry) -> None:
        """A reader of ``entry`` finished: an orphaned fill nobody reads any more stops."""
        for orphan in list(self.orphans):
            if orphan.entry is entry:
                orphan.reader_left()
        if entry.readers == 0 and not entry.complete and not entry.removed:
            self.reserved()  # a partial entry nobody reads may be evicted now

    async def remove(self, image_id: str) -> bool:
        """Delete an image's entry, safely while it is being read or filled.

        Readers that have the file open finish from it; a running fill goes on for them (and
        only while they read) but never commits; the space is freed when the last of them
        closes the file.
        """
        fill = self.fills.pop(image_id, None)
        if fill is not None and fill.state.active:
            self.orphans.add(fill)
            fill.orphan()
        try:
            removed = await self._store.remove(image_id)
        except StoreUnavailable as exc:  # the disk's error: the guard hears of it now
            if self.disk_guard is not None:
                self.disk_guard.report(exc.__cause__ or exc)
            raise
        return removed is not None or fill is not None

    def detach(self) -> None:
        """The index was forgotten (the cache directory vanished, or is another filesystem
        now): every running fill is orphaned like a deleted entry's. It goes on only while
        its readers follow it, never commits, and one nobody reads stops at once (issue 14
        item 9: they went on fetching into a file no index would ever hold)."""
        for image_id, fill in list(self.fills.items()):
            del self.fills[image_id]
            if fill.state.active:
                self.orphans.add(fill)
                fill.orphan()

    async def close(self) -> None:
        """Stop every fill, keeping what was written and flushed for a resume."""
        fills = [*self.fills.values(), *self.orphans]
        for fill in fills:
            fill.cancel()
        await asyncio.gather(*(f.closed.wait() for f in fills))


def _format(value: object) -> str | None:
    """A declared disk or container format as the entry keeps it (bounded; else none)."""
    return value if isinstance(value, str) and 0 < len(value) <= FORMAT_MAX else None
