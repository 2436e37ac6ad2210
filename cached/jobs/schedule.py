"""The periodic jobs Glance ran as separate processes: prune, clean (and prefetch, whose
state lives in :mod:`cached.jobs.prefetch`); cached's own scrub (:mod:`cached.cachedir.reverify`)
and content audit (:mod:`cached.safety.audit`) are scheduled here too.

``prune`` and ``clean`` are plain async functions with explicit arguments; the apscheduler
wiring (:func:`start_scheduler`) is a few lines at the end. They change the index only
through the store's loop-side methods (``Store.evict``), whose filesystem work runs on the
store's executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from cached import metrics
from cached.cachedir.reverify import Integrity
from cached.config import Config
from cached.errors import NotAdmitted
from cached.fill.registry import Filler
from cached.jobs.prefetch import Prefetcher
from cached.safety.audit import AuditResult, Safety
from cached.store import Entry, Store

log = logging.getLogger("cached.jobs")


@dataclass(frozen=True)
class PruneResult:
    files: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class CleanResult:
    stalled: int = 0
    invalid: int = 0


def _evictable(entry: Entry, store: Store, filler: Filler) -> bool:
    """Neither read nor filled (nor a fill being opened), and still the indexed entry of its
    image (what ``clean`` may remove)."""
    return entry.readers == 0 and _prunable(entry, store, filler)


def _prunable(entry: Entry, store: Store, filler: Filler) -> bool:
    """What prune may evict: any indexed entry no fill is working on (or being opened for),
    read or not, except a partial entry being read (its reader may need a fill of it next).

    A complete entry being read is evicted like any other (issue 14 item 3, as nginx and
    Squid do): it leaves the index, its readers keep their open file and finish from it, and
    its blocks are freed when the last one closes it. Refusing to evict entries in use made
    most bytes bypass a busy cache."""
    return (
        (entry.complete or entry.readers == 0)
        and filler.fill_of(entry) is None
        and not filler.opening(entry.image_id)
        and store.get(entry.image_id) is entry
        and not entry.removed
    )


async def prune(store: Store, filler: Filler, max_size: int, disk_short: int = 0) -> PruneResult:
    """Evict least recently used entries until the cache holds at most ``max_size`` and
    ``disk_short`` bytes more are free on its filesystem (0: the free space is fine).

    Complete and partial entries alike (a partial one by when it was last written or read);
    space reserved by running fills counts as used. Entries being filled are never evicted;
    entries being read are (see :func:`_prunable`), but their blocks are freed only once
    nobody reads them: they count towards ``max_size``, not towards ``disk_short``.
    """
    total = store.total_size()
    if total <= max_size and disk_short <= 0:
        log.debug("prune: %d bytes cached, limit %d: nothing to do", total, max_size)
        return PruneResult()
    files = pruned = skipped = 0

    def last_used(e: Entry) -> tuple[float, str]:
        # A partial entry is in use while it is written to, a complete one when read.
        used = e.last_accessed if e.complete else max(e.last_accessed, e.last_modified)
        return used, e.image_id

    for entry in sorted(store.entries.values(), key=last_used):
        if total <= max_size and disk_short <= 0:
            break
        read = entry.readers > 0
        if not _prunable(entry, store, filler) or (read and total <= max_size):
            skipped += 1  # (only the disk is short: evicting what is read frees nothing now)
            continue
        held, on_disk = entry.footprint(), entry.present_bytes()
        if await store.evict(entry):
            metrics.evicted("prune", held)
            files += 1
            pruned += held
            total -= held
            if not read:
                disk_short -= on_disk
            log.info(
                "pruned %s (%d bytes%s, last accessed %.0f)",
                entry.image_id,
                held,
                ", still read: freed when its readers finish" if read else "",
                entry.last_accessed,
            )
    log.info(
        "prune: removed %d entries, %d bytes; %d bytes cached (limit %d)%s, %d in use skipped",
        files,
        pruned,
        total,
        max_size,
        f", {disk_short} bytes short of the free-space floor" if disk_short > 0 else "",
        skipped,
    )
    return PruneResult(files, pruned)


def _reap_invalid(directory: Path) -> list[str]:
    """Remove every file of ``invalid/``; returns the names removed. Call from an executor."""
    removed = []
    for name in os.listdir(directory):
        path = directory / name
        try:
            if os.path.isfile(path):
                os.unlink(path)
                removed.append(name)
        except FileNotFoundError:
            removed.append(name)
        except OSError as exc:
            log.warning("cannot remove %s: %s", path, exc)
    return removed


async def clean(store: Store, filler: Filler, stall_time: float) -> CleanResult:
    """Remove partial entries untouched for ``stall_time`` seconds and not being filled or
    read, and every invalid entry (Glance's cleaner)."""
    cutoff = time.time() - stall_time
    stalled = 0
    for entry in store.partial_entries():
        if entry.last_modified < cutoff and _evictable(entry, store, filler):
            if await store.evict(entry):
                metrics.evicted("stalled", entry.present_bytes())
                stalled += 1
                log.info("removed stalled partial entry %s", entry.image_id)
    if store.undeleted:
        log.info("clean: removed %d files of deleted entries", await store.remove_undeleted())
    invalid = await store.run(_reap_invalid, store.invalid_dir)
    store.invalid.difference_update(invalid)
    metrics.evicted_invalid(len(invalid))
    log.info("clean: removed %d stalled and %d invalid entries", stalled, len(invalid))
    return CleanResult(stalled, len(invalid))


def audit_busy(store: Store, filler: Filler) -> Callable[[Entry], bool]:
    """What the content audit leaves alone now: entries being filled, no longer indexed, or
    suspect (re-verified by digest before anything reads them)."""

    def busy(entry: Entry) -> bool:
        return (
            entry.suspect
            or store.get(entry.image_id) is not entry
            or filler.fill_of(entry) is not None
        )

    return busy


def audit_job(safety: Safety, store: Store, filler: Filler) -> Callable[[], Awaitable[AuditResult]]:
    """The ``audit`` job: :meth:`Safety.audit` over the complete entries."""
    busy = audit_busy(store, filler)

    async def audit() -> AuditResult:
        return await safety.audit(store.complete_entries, busy)

    return audit


class Maintenance:
    """``prune`` and ``clean`` with this daemon's settings; one run of each at a time, whether
    the schedule or the API (``POST /v2/cache/prune``, ``/clean``) starts it. Also the
    admission of new fills (:meth:`admission`). Its state is changed on the event loop only."""

    def __init__(self, store: Store, filler: Filler, config: Config):
        self._store = store
        self._filler = filler
        self._prune_on_fill = config.prune_on_fill
        self.configure(config)
        self._prune_lock = asyncio.Lock()
        self._clean_lock = asyncio.Lock()
        self._making_room: asyncio.Task[PruneResult] | None = None
        self._again = False  # more space was reserved while a prune ran
        self._closed = False  # the daemon stops: fills ending now make no room
        self._admitting = asyncio.Lock()  # one admission decides at a time
        self._admitted = 0  # bytes admitted whose fills have not reserved them yet

    @property
    def store(self) -> Store:
        return self._store

    @property
    def filler(self) -> Filler:
        return self._filler

    def configure(self, config: Config) -> None:
        """Take ``image_cache_max_size``, ``min_free_space`` and ``image_cache_stall_time``
        (at start and on reload): the next admission, prune and clean use them."""
        self._max_size = config.image_cache_max_size
        self.min_free_space = config.min_free_space
        self._stall_time = config.image_cache_stall_time

    async def prune(self, target: int | None = None, *, to_write: int = 0) -> PruneResult:
        """Run :func:`prune` down to ``target`` (default: the max size) and back above the
        free-space floor (with ``to_write`` more bytes to come), after any run."""
        async with self._prune_lock:
            limit = self._max_size if target is None else target
            try:
                short = await self._disk_short(to_write)
            except OSError as exc:  # the guard hears of the directory's errors elsewhere
                log.warning("prune: cannot see the free space: %s", exc.strerror or exc)
                short = 0
            return await prune(self._store, self._filler, limit, max(0, short))

    async def _disk_short(self, to_write: int) -> int:
        """Bytes the filesystem lacks to keep ``min_free_space`` free once every running fill
        has written what it reserved and ``to_write`` more (negative: to spare)."""
        st = await self._store.run(os.statvfs, self._store.root)
        free = st.f_bavail * st.f_frsize
        floor = self.min_free_space.bytes_of(st.f_blocks * st.f_frsize)
        promised = sum(e.reserved for e in self._store.entries.values())
        return floor - (free - promised - to_write)

    @contextlib.asynccontextmanager
    async def admission(self, needed: int) -> AsyncIterator[NotAdmitted | None]:
        """Admit a fill that will write ``needed`` more bytes (a new fill, or a running one
        asked for more: widening a reservation is an admission too): yields None when there
        is room (after pruning for it if need be), else why not. The caller has the fill
        reserve its bytes (``Fill.ensure_full``/``demand``) inside the block, or at once
        after it without awaiting: until then the admitted bytes count for the admissions
        that follow. Before, two misses admitted at the same time each saw the other's bytes
        unreserved, and both ran past the max size.
        """
        async with self._admitting:
            refused = await self._admit(needed)
            if refused is None:
                self._admitted += needed
        try:
            yield refused
        finally:
            if refused is None:
                self._admitted -= needed

    async def _admit(self, needed: int) -> NotAdmitted | None:
        """Two limits: the cache's max size (what entries hold, running fills reserved and
        admitted fills will reserve), and the filesystem's free space, which must stay above
        ``min_free_space`` once all that and these are written (a watermark before ENOSPC,
        not after). Both are made by evicting (with ``prune_on_fill``; without it the max
        size is left to the scheduled prune), so a fill is refused only when what is being
        filled leaves no room: ``cache-full`` (the max size) or ``no-space`` (the disk).
        """
        needed_now = needed + self._admitted
        if self._prune_on_fill and self._store.total_size() + needed_now > self._max_size:
            await self.prune(max(0, self._max_size - needed_now), to_write=needed_now)
            if self._store.total_size() + needed_now > self._max_size:
                return NotAdmitted(
                    "cache-full",
                    f"{self._store.total_size()} bytes cached or being filled, {needed_now} "
                    f"to be admitted, limit {self._max_size}",
                )
        try:
            short = await self._disk_short(needed_now)
            if short > 0 and self._prune_on_fill:
                await self.prune(to_write=needed_now)
                short = await self._disk_short(needed_now)
        except OSError as exc:
            return NotAdmitted("no-space", f"cannot see the free space: {exc.strerror or exc}")
        if short > 0:
            return NotAdmitted(
                "no-space", f"{short} bytes short of the free-space floor after {needed_now}"
            )
        return None

    def make_room(self) -> None:
        """Reservations changed (a fill reserved space, or ended and released it): prune now
        if the cache is past its max size or the disk below its free-space floor, rather than
        let the disk fill up until the next scheduled run (a Glance complaint), or stay over
        the limit while idle once the entries in use are released (issue 14 item 1).

        Reservations count as used, so the prune stops at the max size and never evicts
        what an admitted image needs below it (admission keeps any one image smaller)."""
        if self._closed:
            return
        if self._making_room is not None and not self._making_room.done():
            self._again = True
            return
        self._again = False
        task = asyncio.get_running_loop().create_task(self.prune())
        task.add_done_callback(self._room_made)
        self._making_room = task

    async def close(self) -> None:
        """The daemon stops: no more room is made when fills end (the store's threads go
        next); a prune already running finishes first."""
        self._closed = True
        if self._making_room is not None:
            await asyncio.wait({self._making_room})

    def _room_made(self, task: asyncio.Task[PruneResult]) -> None:
        _log_failure(task)
        if self._again:
            self.make_room()

    async def clean(self) -> CleanResult:
        """Run :func:`clean` (after any run in progress)."""
        async with self._clean_lock:
            return await clean(self._store, self._filler, self._stall_time)


def _log_failure(task: asyncio.Task[PruneResult]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("prune to make room failed", exc_info=task.exception())


# ------------------------------------------------------------------------------- schedule
def start_scheduler(
    config: Config,
    prefetcher: Prefetcher,
    maintenance: Maintenance,
    integrity: Integrity,
    safety: Safety | None = None,
) -> AsyncIOScheduler:
    """Run prefetch, prune, clean, scrub (and, with a ``safety``, the content audit) on their
    intervals (never overlapping themselves)."""
    # UTC: interval jobs need no local zone, and looking it up reads files on the loop.
    scheduler = AsyncIOScheduler(event_loop=asyncio.get_running_loop(), timezone=dt.UTC)
    jobs = [
        ("prefetch", config.cache_prefetcher_interval, prefetcher.run),
        ("prune", config.cache_prune_interval, maintenance.prune),
        ("clean", config.cache_clean_interval, maintenance.clean),
        ("scrub", config.scrub_interval, integrity.scrub),  # cached/cachedir/reverify.py
    ]
    if safety is not None:  # cached/safety/audit.py: entries without a current verdict
        jobs.append(
            (
                "audit",
                config.image_safety_audit_interval,
                audit_job(safety, maintenance.store, maintenance.filler),
            )
        )
    for name, interval, func in jobs:
        scheduler.add_job(
            func,
            IntervalTrigger(seconds=interval, timezone=dt.UTC),
            id=name,
            name=name,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
        log.info("%s runs every %d s", name, interval)
    scheduler.start()
    return scheduler
