"""Re-verification of complete entries: before a hit on a file that may have changed, and
the background scrub that finds silent corruption.

- :meth:`Integrity.open_hit` opens the file a hit is served from and compares the opened
  file with what was last recorded for it (:mod:`cached.store.written`; the ``fstat`` of
  that open, in a cache-I/O thread). A changed file, or an entry found suspect at start
  (:mod:`cached.store.integrity`), is verified by digest before the hit is served; a
  mismatch (or no digest to check) moves it to ``invalid/``.
- Suspect entries found at start are verified in the background at once (as fast as the disk
  goes, pausing while fills run). A hit on a suspect entry does not wait for that: it has the
  entry verified at once, at full speed, without pausing (a client is waiting); concurrent
  hits on one entry share that verification.
- :meth:`Integrity.scrub` (the ``scrub`` job, every ``scrub_interval`` s) re-reads every
  complete entry at most ``scrub_rate`` MiB/s, oldest-checked first, pausing while any fill
  runs. A corrupt entry goes to ``invalid/`` (readers following it are cut, as after a failed
  fill); entries without a digest are counted and logged as unverifiable.

Threads: reading and hashing run on this module's own two single-thread executors, one for
background work (start-up suspects, the scrub; throttled, pausing for fills) and one for
verifications a request waits for, so that a hit never queues behind an hour-long scrub of
another entry. The loop owns ``_running`` (the request-side verification of each entry) and
``_checked_at``, and asks the workers to stop through ``_stop`` (a threading.Event they poll
between 1 MiB pieces). ``Entry.identity``/``suspect`` are guarded by ``Entry.identity_lock``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

from cached.store import Entry, Store
from cached.store import integrity as checks
from cached.store.integrity import Check, Verdict

log = logging.getLogger("cached.scrub")


@dataclass(frozen=True)
class ScrubResult:
    checked: int = 0
    bytes: int = 0
    corrupt: int = 0
    unverifiable: int = 0
    seconds: float = 0.0


class Integrity:
    """Verification of complete entries for one daemon (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        *,
        filling: Callable[[], Collection[str]],
        invalidate: Callable[[Entry, str], Awaitable[None]],
        rate: float,
        interval: float,
    ):
        """
        Args:
            store: the cache; read on the loop only (which entries exist).
            filling: the ids of the images being filled now, a live view (the worker thread
                only asks whether it is empty: no iteration across threads).
            invalidate: moves an entry to ``invalid/`` and cuts its readers (the same call
                a failed fill makes).
            rate: bytes per second a scrub pass reads at most.
            interval: seconds between scrub passes (a longer pass is logged).
        """
        self._store = store
        self._filling = filling
        self._invalidate_entry = invalidate
        self._rate = rate  # bytes per second for the scrub
        self._interval = interval
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="scrub")
        self._urgent = ThreadPoolExecutor(1, thread_name_prefix="verify")
        self._stop = threading.Event()
        self._running: dict[int, asyncio.Future[bool]] = {}  # id(entry) -> its verification
        self._checked_at: dict[str, float] = {}  # image id -> monotonic time of its last check
        self._background: asyncio.Task[None] | None = None

    def configure(self, *, rate: float, interval: float) -> None:
        """New scrub settings (a reload): from the next entry a pass reads on."""
        self._rate, self._interval = rate, interval

    @property
    def settings(self) -> tuple[float, float]:
        """The scrub rate (bytes/s) and interval (s) in force."""
        return self._rate, self._interval

    def start(self) -> None:
        """Verify the entries found suspect when the index was built (in the background)."""
        suspects = [e for e in self._store.complete_entries() if e.suspect]
        if suspects:
            log.info("verifying %d suspect cache entries in the background", len(suspects))
            self._background = asyncio.get_running_loop().create_task(self._verify_all(suspects))
            self._background.add_done_callback(_log_failure)

    async def _verify_all(self, suspects: list[Entry]) -> None:
        for entry in suspects:
            if entry.suspect and self._store.get(entry.image_id) is entry:
                await self._verify(entry, rate=None, background=True)

    async def open_hit(
        self, entry: Entry, want: tuple[int, int] | None = None
    ) -> BinaryIO | bytes | None:
        """The file to serve a hit of the complete ``entry`` from, checked as opened (or,
        with ``want``, bytes ``[start, end)`` read from it: a small hit); None if it failed
        re-verification (it is then out of the index) or changed again at once. Waits for
        the digest when the file changed. Raises FileNotFoundError (evicted meanwhile)."""
        if entry.removed:
            raise FileNotFoundError(f"{entry.image_id} was evicted or deleted")
        file, changed = await self._store.run(checks.open_for_hit, entry, want)
        if entry.removed:
            # Evicted or deleted meanwhile: the file opened by its path may be the next
            # entry's of the image. Not this entry's to serve nor to judge (issue 14 soak:
            # judging it cut the readers of the evicted entry); the caller passes through.
            if not isinstance(file, bytes):
                await self._store.run(file.close)
            raise FileNotFoundError(f"{entry.image_id} was evicted or deleted meanwhile")
        if not changed:
            return file
        assert not isinstance(file, bytes)
        await self._store.run(file.close)
        if not await self.verify(entry):
            return None
        file, changed = await self._store.run(checks.open_for_hit, entry, want)
        if changed:  # written to again since it was verified: verified before the next hit
            assert not isinstance(file, bytes)
            await self._store.run(file.close)
            return None
        return file

    async def verify(self, entry: Entry) -> bool:
        """Verify ``entry`` now, for a request (shared by concurrent requests for the same
        entry); True if it is good."""
        key = id(entry)  # the entry stays referenced by its task while it is a key
        running = self._running.get(key)
        if running is None:
            running = asyncio.ensure_future(self._verify(entry, rate=None, background=False))
            self._running[key] = running
            running.add_done_callback(lambda _: self._running.pop(key, None))
        return await asyncio.shield(running)

    async def _verify(self, entry: Entry, *, rate: float | None, background: bool) -> bool:
        suspect = entry.suspect  # a good check clears it
        check = await self._check(entry, rate, background)
        if check.verdict is Verdict.CHANGED and entry.suspect:
            check = await self._check(entry, rate, background)  # once more: a write just ended
        self._checked_at[entry.image_id] = time.monotonic()
        if check.verdict is Verdict.GOOD:
            if suspect:  # at start (after an upgrade: every entry) a line each would flood
                level = logging.DEBUG if background else logging.WARNING
                log.log(level, "%s re-verified (%s): served again", entry.image_id, check.detail)
            return True
        if check.verdict is Verdict.UNVERIFIABLE and not entry.suspect:
            return True  # nothing changed that we know of, and nothing to check it against
        if check.verdict in (Verdict.GONE, Verdict.STOPPED):
            return False
        if check.verdict is Verdict.CHANGED:
            entry.suspect = True  # verified again before its next hit
            return False
        reason = (
            f"changed on disk and cannot be verified: {check.detail}"
            if check.verdict is Verdict.UNVERIFIABLE
            else f"re-verification failed: {check.detail}"
        )
        await self._invalidate(entry, reason)
        return False

    async def _check(self, entry: Entry, rate: float | None, background: bool) -> Check:
        job = functools.partial(
            checks.verify,
            entry,
            rate=rate,
            stop=self._stop.is_set,
            yield_to=self._fills_running if background else _never,
        )
        pool = self._pool if background else self._urgent
        return await asyncio.get_running_loop().run_in_executor(pool, job)

    def _fills_running(self) -> bool:  # polled by the worker thread
        return bool(self._filling())

    async def _invalidate(self, entry: Entry, reason: str) -> None:
        if self._store.get(entry.image_id) is not entry or entry.removed:
            return
        log.error("cache entry %s is corrupt: %s; moved to invalid/", entry.image_id, reason)
        await self._invalidate_entry(entry, reason)

    async def scrub(self) -> ScrubResult:
        """One pass over every complete entry at the scrub rate, oldest-checked first."""
        started = time.monotonic()
        todo = sorted(
            self._store.complete_entries(),
            key=lambda e: (self._checked_at.get(e.image_id, 0.0), e.image_id),
        )
        checked = nbytes = corrupt = unverifiable = 0
        for entry in todo:
            if self._stop.is_set():
                break
            if (
                self._store.get(entry.image_id) is not entry
                or entry.removed
                or entry.image_id in self._filling()
            ):
                continue
            if entry.checksum is None and entry.os_hash_value is None:
                unverifiable += 1
                continue
            if await self._verify(entry, rate=self._rate, background=True):
                checked += 1
                nbytes += entry.size
            elif entry.image_id not in self._store.entries:
                corrupt += 1
        took = time.monotonic() - started
        log.info(
            "scrub: %d entries (%d bytes) verified, %d corrupt, %d unverifiable (no digest) "
            "in %.1fs",
            checked,
            nbytes,
            corrupt,
            unverifiable,
            took,
        )
        if took > self._interval:
            log.warning(
                "scrub: a pass takes %.0fs, longer than scrub_interval (%.0fs): raise scrub_rate",
                took,
                self._interval,
            )
        return ScrubResult(checked, nbytes, corrupt, unverifiable, took)

    async def close(self) -> None:
        """Stop the workers (they end within one piece) and any verification in progress."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._background is not None:
            self._background.cancel()
        loop = asyncio.get_running_loop()
        for pool in (self._pool, self._urgent):
            await loop.run_in_executor(pool, _nothing)
            pool.shutdown(wait=False)


def _nothing() -> None:
    return None


def _never() -> bool:
    return False


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("verifying suspect entries failed", exc_info=task.exception())
