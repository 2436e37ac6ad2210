"""The daemon's declared directories: their guards built from the configuration, and what
the cache directory's state means for a download.

Owns :class:`Directories` (the cache's guard, the ``file`` store's guard if any) and the
cache index's "opened" flag. Everything here runs on the event loop. The index is (re)built
(``Store.open``, on the cache guard's I/O executor) only at start or when the guard says the
directory is ok again, and forgotten (``Store.detach``) when it vanished. Right before each
(re)build it renews this daemon's claim on the directory (:mod:`cached.store.lock`; the
claim is taken on the I/O executor and kept here, changed only by :meth:`Directories._open`
and ``close``, under the reopening lock or at shutdown).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cached.cachedir import mounts
from cached.cachedir.guard import Guard, Transition
from cached.cachedir.mounts import ProbeSpec, State
from cached.config import Config, MountSpec
from cached.store import Entry, Store, lock
from cached.store.lock import CacheInUse

log = logging.getLogger("cached.directories")

# Threads for cache-file I/O: enough for the reads of many concurrent hits, few enough that a
# hung cache share pins a bounded number of them.
CACHE_IO_THREADS = 16
STORE_IO_THREADS = 8


def _guard(name: str, config: Config, spec: MountSpec, *, cache: bool, effect: str) -> Guard:
    directory = config.image_cache_dir if cache else config.upstream_dir
    return Guard(
        name,
        directory,
        ProbeSpec(spec.require_mount, spec.fstype, spec.writable, needs_xattrs=cache),
        probe_interval=spec.probe_interval,
        probe_timeout=spec.probe_timeout,
        io_threads=CACHE_IO_THREADS if cache else STORE_IO_THREADS,
        effect=effect,
        sendfile=spec.sendfile if cache else None,
    )


@dataclass
class Directories:
    """The guards of one daemon and the cache index they gate."""

    cache: Guard
    store: Guard | None = None
    index: Store | None = None
    opened: bool = False  # the index was built from the directory as it is now
    # Called (on the loop) whenever the index was (re)built from an ok directory.
    on_indexed: list[Callable[[], None]] = field(default_factory=list)
    # Called (on the loop) whenever the index was forgotten (the running fills stop).
    on_detached: list[Callable[[], None]] = field(default_factory=list)
    _reopening: asyncio.Lock = field(default_factory=asyncio.Lock)
    _started: bool = False  # start() is done: a cache in use no longer stops the daemon
    _claim: socket.socket | None = None  # this daemon's claim on the cache (store/lock.py)

    @classmethod
    def from_config(cls, config: Config) -> Directories:
        cache = _guard(
            "cache",
            config,
            config.image_cache_mount,
            cache=True,
            effect="downloads pass through to the upstream, nothing is written there",
        )
        store = None
        if config.upstream_kind == "file":
            store = _guard(
                "store",
                config,
                config.upstream_mount,
                cache=False,
                effect="image downloads, records and lists answer 503",
            )
        return cls(cache, store)

    def __iter__(self) -> Iterator[Guard]:
        yield self.cache
        if self.store is not None:
            yield self.store

    async def start(self, index: Store) -> None:
        """Probe every directory once, open the cache index if its directory is ok (nothing
        is created in one that is not), and keep watching."""
        self.index = index
        for guard in self:
            await guard.start()
        self.cache.subscribe(self._cache_changed)
        if self.cache.ok:
            await self._open()
        else:
            log.warning(
                "cache index not opened: %s is %s (%s); every download passes through until "
                "it is ok",
                self.cache.directory,
                self.cache.state.value,
                self.cache.reason,
            )
        self._started = True

    async def close(self) -> None:
        for guard in self:
            await guard.close()
        claim, self._claim = self._claim, None
        lock.release(claim)

    def _cache_changed(self, transition: Transition) -> Awaitable[None] | None:
        if transition.new is State.VANISHED:
            self._detach("vanished")
        if transition.new is State.OK and (transition.new_filesystem or not self.opened):
            self._detach("another filesystem")
            return self._open()
        return None

    def _detach(self, why: str) -> None:
        """Whatever comes back at that path is scanned afresh; nothing indexed before may
        be committed or touched there (fills in flight finish for their readers only)."""
        self.opened = False
        if self.index is not None:
            count = self.index.detach()  # a new generation even when it held nothing
            if count:
                log.warning("cache index: forgot %d entries (%s)", count, why)
        for callback in self.on_detached:
            callback()

    async def _open(self) -> None:
        """Create the layout if missing and rebuild the index from the directory; then let
        the daemon resume (prefetch)."""
        assert self.index is not None
        async with self._reopening:
            try:
                # Claimed before the scan: a second daemon's scan would undo the first's fills.
                self._claim = await self.cache.run_io(lock.take, self.cache.directory, self._claim)
                await self.index.open(_same_filesystem(self.cache.identity))
            except CacheInUse as exc:
                if not self._started:
                    raise  # at start: refuse to run (cached/cli.py says why)
                log.error("cache index not opened: %s; every download passes through", exc)
                return
            except OSError as exc:
                log.error("cannot open the cache index in %s: %s", self.cache.directory, exc)
                self.cache.report(exc)
                return
            try:
                volume = await self.cache.run_io(mounts.mark_volume, self.cache.directory)
                self.cache.adopt_volume(volume)
            except OSError as exc:  # full: the mount id and device number still tell
                log.warning("cannot mark %s as this cache's: %s", self.cache.directory, exc)
            self.opened = True
        for callback in self.on_indexed:
            callback()

    def while_usable(
        self, job: Callable[[], Awaitable[Any]], name: str
    ) -> Callable[[], Awaitable[Any]]:
        """``job`` (a scheduled job: prefetch, prune, clean, scrub), skipped while the cache
        directory is not ok and indexed: nothing is read, written or removed there then."""

        async def run() -> Any:
            why = self.cache_bypass(None)
            if why is not None:
                log.info("%s skipped: the cache directory is %s", name, why)
                return None
            return await job()

        return run

    def cache_bypass(self, entry: Entry | None) -> str | None:
        """Why a download must not touch the cache (the state, for ``Cache-Status``'s
        ``detail``), or None when it may use it.

        A complete entry is still served from a read-only cache; nothing else is.
        """
        state = self.cache.state
        if state is State.OK and self.opened:
            return None
        if state is State.READ_ONLY and self.opened and entry is not None and entry.complete:
            return None
        return state.value if state is not State.OK else "not-indexed"

    def status(self) -> list[dict[str, Any]]:
        """Every guard's state (see :meth:`.guard.Guard.status`); the cache's also says
        whether its index was built from the directory as it is now (``indexed``)."""
        rows = [g.status() for g in self]
        rows[0]["indexed"] = self.opened
        return rows


__all__ = ["Directories"]


def _same_filesystem(identity: mounts.Identity | None) -> Callable[[Path], None] | None:
    """A check, run in the scan's thread right before it creates anything, that the
    directory is still the filesystem its guard judged ok (the share may have gone since:
    then nothing is created in the bare mount point)."""
    if identity is None:
        return None

    def still_there(root: Path) -> None:
        st = os.stat(root)
        if st.st_dev != identity.st_dev or (identity.mounted and not os.path.ismount(root)):
            raise OSError(errno.ENODEV, f"{root} is no longer the filesystem that was checked")

    return still_there
