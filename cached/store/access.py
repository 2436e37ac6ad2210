"""Access history (hit counts, last-access stamps): in the index at once, on disk in batches.

The index is the authority: prune orders entries by ``Entry.last_accessed``, and
``/v2/cache``, ``/v2/cached_images`` and ``cached-manage`` list ``Entry.hits`` and
``Entry.last_accessed``, all read from memory. The entry's xattrs (``user.hits``,
``user.cached.last_accessed``) are the durable copy, read back only when the index is built
(at start, or when the cache directory came back). Writing that copy after every hit cost
three xattr writes and three stats on the cache-I/O threads per hit (the commit record is
written anew after our own writes, which move ctime: :mod:`cached.store.written`), and small
hits lost a third of their throughput to it.

:class:`AccessLog` remembers which entries were accessed since their copy was last written
and writes them all in one executor call at most every ``interval`` seconds (the
``access_record_interval`` option), and once more on a clean shutdown (:meth:`close`). So a
crash (``kill -9``, a power cut) loses at most the last ``interval`` seconds of access
history: a restart counts fewer hits and older stamps for the entries hit in that time, which
only makes prune a little less exact. Nothing else depends on it: the commit record is still
written at each commit and after each of our own writes, and the check that a file did not
change behind our back is made on every hit (:func:`cached.store.integrity.open_for_hit`).
``interval`` 0 writes every access at once (the behaviour before batching).

Threads: the event loop owns ``_dirty`` and the flusher task (:meth:`note` and the flush's
selection run there; entries detached or deleted meanwhile are skipped). The writes run on
the store's executor, one call per flush, so a cache share that hangs holds one thread;
:func:`cached.store.integrity.write_access` takes each entry's ``identity_lock``.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cached.store import integrity, xattrs
from cached.store.entry import Entry

log = logging.getLogger(__name__)

# A final flush at shutdown waits at most this long (a hung share must not hold the exit;
# shutdown_grace 30 s + this stays under the unit's TimeoutStopSec=45).
CLOSE_TIMEOUT = 5.0

Runner = Callable[..., Awaitable[Any]]


def record_of(entry: Entry) -> dict[str, bytes]:
    """The xattrs that hold ``entry``'s access history as the index has it now (loop)."""
    return {
        xattrs.LAST_ACCESSED: repr(entry.last_accessed).encode(),
        xattrs.HITS: str(entry.hits).encode(),
    }


def write_batch(batch: list[tuple[Entry, Path, dict[str, bytes]]]) -> None:
    """Write each entry's access xattrs (and its commit record after them). Blocking."""
    for entry, path, values in batch:
        integrity.write_access(entry, path, values)


class AccessLog:
    """Entries whose access history on disk lags behind the index (see the module docstring).

    Args:
        run: runs a blocking function on the store's executor (``Store.run``).
        interval: seconds between flushes; 0 writes every access at once.
        indexed: whether an entry is still the indexed entry of its image (not deleted,
            evicted, invalidated or detached since it was noted).
    """

    def __init__(self, run: Runner, interval: float, indexed: Callable[[Entry], bool]):
        self.interval = interval
        self._run = run
        self._indexed = indexed
        self._dirty: dict[int, Entry] = {}  # id(entry) -> entry, in the order first noted
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """How many entries have access history not yet on disk."""
        return len(self._dirty)

    async def record(self, entry: Entry, *, now: bool = False) -> None:
        """``entry`` was accessed (its index fields are already updated): write its copy at
        once when ``now`` or the interval is 0, else with the next flush."""
        if now or self.interval <= 0 or self._closed:
            self._dirty.pop(id(entry), None)
            await self._run(integrity.write_access, entry, entry.path, record_of(entry))
            return
        self._dirty.setdefault(id(entry), entry)
        if self._task is None:  # started by the first access, outside that request's context
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._flusher(), context=contextvars.Context())

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except Exception:  # logged; the entries stay pending for the next flush
                log.exception("writing access records failed")

    async def flush(self) -> int:
        """Write the copy of every pending entry now; returns how many were written."""
        if not self._dirty:
            return 0
        pending, self._dirty = self._dirty, {}
        batch = [
            (e, e.path, record_of(e))
            for e in pending.values()
            if not e.removed and e.complete and self._indexed(e)
        ]
        if not batch:
            return 0
        try:
            await self._run(write_batch, batch)
        except BaseException:
            for e, _, _ in batch:  # not written: pending again (unless noted since)
                self._dirty.setdefault(id(e), e)
            raise
        return len(batch)

    async def close(self) -> None:
        """Stop the flusher and write what is pending (a clean shutdown loses nothing)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        try:
            written = await asyncio.wait_for(self.flush(), CLOSE_TIMEOUT)
        except (TimeoutError, OSError, RuntimeError) as exc:
            log.warning("access records of %d entries not written: %s", len(self._dirty), exc)
            return
        if written:
            log.debug("wrote the access records of %d entries", written)
