"""Prefetch: queued images fetched through the same single-flight fills as client misses.

The queue is Glance's ``queue/`` directory of empty markers (in mtime order). An image is
dequeued only once it is cached and verified. A failed fetch stays queued and is retried with
exponential backoff (``prefetch_retry_initial`` doubling up to ``prefetch_retry_max``); its
record is the xattr ``user.cached.prefetch`` on the marker, a JSON object
``{"failures": N, "last_error": "...", "last_attempt": epoch, "next_attempt": epoch}``. It
goes away with the marker, so nothing is left behind when the image is dequeued, and it
survives restarts like the queue itself.

Permanent answers are not retried: when the upstream answers 403 or 404 for a queued image
(deleted, or the credentials may never download it), the image leaves the queue with one log
line. So does an image whose content violates the enforced safety policy
(``image_safety_mode: enforce``, cached/safety/audit.py): it would never be cached. An image
deleted through the proxy leaves it too (:meth:`Prefetcher.forget`).
A fetch whose cache entry is deleted while it runs (``DELETE /v2/cached_images/{id}``, a
cache clear) is not a failure: the image stays queued, without backoff, for the next run.

Shared state (the task and progress maps, the fetch slots) is changed only by coroutines and
callbacks on the event loop; the queue markers and their xattrs are touched only on the
store's executor, the cache guard's bounded I/O threads (``Store.run``), never on the default
executor: a hung share then holds those threads, not the ones a reload, pass-through or
``/v2/cache/progress`` need (issue 14 item 7).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiofiles.ospath

from cached import metrics
from cached.config import Config
from cached.errors import CachedError, FillAborted, NotAdmitted, UpstreamError
from cached.fill.machine import Fill, FillState
from cached.fill.registry import CachedMeanwhile, Filler
from cached.identity.keystone import ServiceAuth
from cached.safety.audit import UnsafeImage
from cached.store import Store, codec, xattrs
from cached.upstream import Backend, Credentials, ImageRecord

log = logging.getLogger("cached.prefetch")

STATUS_XATTR = xattrs.PREFIX + "prefetch"
_DUE_SLACK = 1.0  # seconds: a retry due this close to a run is taken by that run


@dataclass
class QueueStatus:
    """The prefetch record of one queued image (kept on its marker)."""

    failures: int = 0
    last_error: str | None = None
    last_attempt: float | None = None
    next_attempt: float = 0.0


def parse_status(raw: bytes) -> QueueStatus:
    """Decode a marker's record; raises ValueError (only) if it is not one (bounded JSON,
    ``failures`` a whole number, times finite, the error a string)."""
    doc = codec.loads_object(raw, max_len=8192, max_depth=1)
    failures = codec.int_field(doc, "failures", low=0, high=1 << 31) if "failures" in doc else 0
    last_error = codec.str_field(doc, "last_error", max_len=4096)
    last_attempt = codec.float_field(doc, "last_attempt", default=None)
    next_attempt = codec.float_field(doc, "next_attempt", default=0.0) or 0.0
    return QueueStatus(failures, last_error, last_attempt, next_attempt)


def read_status(marker: Path) -> QueueStatus:
    """The record on a queue marker (empty if none or unusable). Call from an executor."""
    try:
        raw = xattrs.read_all(marker).get(STATUS_XATTR)
        return parse_status(raw) if raw else QueueStatus()
    except (OSError, ValueError):
        return QueueStatus()


def write_status(marker: Path, status: QueueStatus) -> None:
    """Record ``status`` on the marker; nothing if it was dequeued. Call from an executor."""
    try:
        doc = asdict(status)
        doc["last_error"] = (status.last_error or "")[:2000] or None  # parse_status reads it back
        xattrs.write(marker, STATUS_XATTR, codec.dumps(doc))
    except FileNotFoundError:
        pass


class Outcome(enum.Enum):
    """How one prefetch of one image ended."""

    CACHED = "cached"
    FAILED = "failed"
    DROPPED = "dropped"  # dequeued before its turn
    REFUSED = "refused"  # the upstream answered 403/404: dequeued, not retried
    DELETED = "deleted"  # its cache entry was deleted while it was fetched: stays queued


# Upstream answers that no retry will change (RFC 9110 §15.5.4, §15.5.5).
_PERMANENT = frozenset({403, 404})


class PrefetchFailed(CachedError):
    """A queued image could not be cached this time."""


class EntryDeleted(CachedError):
    """The entry being fetched was deleted from the cache (``DELETE /v2/cached_images/{id}``,
    a cache clear, the image deleted through the proxy): the fetch stopped, nothing failed."""


@dataclass(frozen=True)
class _Baseline:
    """A fill as it was when we began to watch it: progress is measured from here."""

    fill: Fill
    since: float  # monotonic
    upstream_bytes: int
    written_bytes: int

    @classmethod
    def of(cls, fill: Fill) -> _Baseline:
        return cls(fill, time.monotonic(), fill.upstream_bytes, _written_bytes(fill))


def _written_bytes(fill: Fill) -> int:
    entry = fill.entry
    return sum(entry.chunk_bounds(i)[1] - entry.chunk_bounds(i)[0] for i in fill.written)


class Slots:
    """At most ``limit`` fetches at a time, a limit that may change while fetches run and
    wait (a semaphore cannot be resized): a lower one lets running fetches finish, a higher
    one starts waiting fetches at once, first come first served. Event loop only."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def __aenter__(self) -> None:
        if self.held < self.limit and not self._waiters:
            self.held += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # resolved by _wake, which counted the slot as held for us
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release()  # given a slot, but cancelled before it could run
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        self._release()

    def resize(self, limit: int) -> None:
        self.limit = limit
        self._wake()

    def _release(self) -> None:
        self.held -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.held < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self.held += 1


@dataclass
class _Tracked:
    """One of our fetches: waiting for a slot, or watching its fill."""

    active: bool = False  # holds a fetch slot
    baseline: _Baseline | None = None


class Prefetcher:
    """Fetches queued images through the same single-flight fills as client misses."""

    def __init__(
        self,
        store: Store,
        filler: Filler,
        backend: Backend,
        service: ServiceAuth,
        config: Config,
    ):
        self._store = store
        self._filler = filler
        self._backend = backend
        self._service = service
        self._slots = Slots(config.prefetch_concurrency)
        # Asked before a new fill with the bytes it will write: None, or why there is no room.
        self.admission: Callable[[int], AbstractAsyncContextManager[NotAdmitted | None]] | None = (
            None
        )
        self._retry = (config.prefetch_retry_initial, config.prefetch_retry_max)
        self._tasks: dict[str, asyncio.Task[Outcome]] = {}
        self._tracked: dict[str, _Tracked] = {}  # our fetches
        self._seen: dict[str, _Baseline] = {}  # fills we did not start: from our first look
        self._forgotten: set[str] = set()  # cancelled by forget(): they end DROPPED

    def configure(self, concurrency: int, retry_initial: float, retry_max: float) -> None:
        """New ``prefetch_concurrency`` and ``prefetch_retry_*`` (reload). Fetches holding a
        slot finish; waiting fetches start as soon as fewer than the new limit run (at once
        when it was raised). The backoff applies from the next failure."""
        self._slots.resize(concurrency)
        self._retry = (retry_initial, retry_max)

    def start(
        self, image_id: str, creds: Credentials | None = None, record: ImageRecord | None = None
    ) -> asyncio.Task[Outcome]:
        """Fetch one queued image now (unless it is being fetched); the task is kept.

        ``creds`` are used when no service credentials are configured.
        """
        task = self._tasks.get(image_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(image_id, creds, record))
            self._tasks[image_id] = task
            task.add_done_callback(lambda t: self._done(image_id, t))
        return task

    def _done(self, image_id: str, task: asyncio.Task[Outcome]) -> None:
        if self._tasks.get(image_id) is task:
            del self._tasks[image_id]
            self._forgotten.discard(image_id)  # also when cancelled before it ran
        if not task.cancelled() and task.exception() is not None:
            log.error("prefetch of %s crashed", image_id, exc_info=task.exception())

    async def run(self) -> dict[Outcome, int]:
        """One prefetch run: start every queued image that is due, wait for them."""
        queue = await self._store.run(self._queue_with_status)
        now = time.time()
        started, deferred = [], 0
        for image_id, status in queue:
            if image_id in self._tasks:
                continue  # already being fetched (PUT /v2/cache)
            if status.next_attempt - now > _DUE_SLACK:
                deferred += 1
                continue
            started.append(self.start(image_id))
        counts = dict.fromkeys(Outcome, 0)
        if not queue:
            log.debug("prefetch: nothing queued")
            metrics.prefetch_run(0)
            return counts
        log.info(
            "prefetch: %d queued, fetching %d, %d waiting to retry",
            len(queue),
            len(started),
            deferred,
        )
        if started:
            await asyncio.wait(started)
        for task in started:
            if not task.cancelled() and task.exception() is None:
                counts[task.result()] += 1
        metrics.prefetch_run(counts[Outcome.FAILED])
        log.info(
            "prefetch: %d cached, %d failed (stay queued), %d dequeued meanwhile, %d refused, "
            "%d deleted from the cache meanwhile (stay queued)",
            counts[Outcome.CACHED],
            counts[Outcome.FAILED],
            counts[Outcome.DROPPED],
            counts[Outcome.REFUSED],
            counts[Outcome.DELETED],
        )
        return counts

    def _queue_with_status(self) -> list[tuple[str, QueueStatus]]:
        return [(i, read_status(self._store.queue_dir / i)) for i in self._store.queued()]

    async def _is_queued(self, image_id: str) -> bool:
        """Whether the image's marker is still in ``queue/``: aiofiles' stat, on the cache
        directory's own threads (never the default executor, which a hung share would pin)."""
        marker = self._store.queue_dir / image_id
        return bool(await aiofiles.ospath.exists(marker, executor=self._store.io))

    async def _fetch(
        self, image_id: str, fallback: Credentials | None, record: ImageRecord | None
    ) -> Outcome:
        self._tracked[image_id] = _Tracked()
        try:
            async with self._slots:
                if not await self._is_queued(image_id):
                    return Outcome.DROPPED
                attempt = time.time()
                self._tracked[image_id].active = True
                try:
                    await self._cache(image_id, fallback, record)
                except asyncio.CancelledError:
                    raise
                except UnsafeImage as exc:
                    # Its content violates the enforced policy: it is never cached, so
                    # dequeued like an image the upstream refuses (not retried).
                    await self._store.run(self._store.dequeue, image_id)
                    log.warning("prefetch of %s: dequeued, not retried: %s", image_id, exc)
                    return Outcome.REFUSED
                except EntryDeleted as exc:
                    # Not a failure, no backoff: still queued, it is due at the next run (as
                    # Glance keeps a queued image whose cached copy is deleted).
                    log.info("prefetch of %s stopped: %s", image_id, exc)
                    return Outcome.DELETED
                except Exception as exc:  # every failure is recorded and retried later
                    if not await self._is_queued(image_id):
                        log.info("prefetch of %s stopped: dequeued meanwhile (%s)", image_id, exc)
                        return Outcome.DROPPED
                    if isinstance(exc, UpstreamError) and exc.status in _PERMANENT:
                        await self._store.run(self._store.dequeue, image_id)
                        log.warning(
                            "prefetch of %s: the upstream answered %d: dequeued, not retried",
                            image_id,
                            exc.status,
                        )
                        return Outcome.REFUSED
                    await self._failed(image_id, attempt, exc)
                    return Outcome.FAILED
                await self._store.run(self._store.dequeue, image_id)
                return Outcome.CACHED
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if image_id in self._forgotten and task is not None and task.uncancel() == 0:
                return Outcome.DROPPED  # forget(), not a shutdown
            raise
        finally:
            del self._tracked[image_id]
            self._forgotten.discard(image_id)

    async def _cache(
        self, image_id: str, fallback: Credentials | None, record: ImageRecord | None
    ) -> None:
        entry = self._store.get(image_id)
        if entry is not None and entry.complete:
            log.info("prefetch: %s is already cached", image_id)
            return
        creds = await self._service.credentials() or fallback or Credentials()
        if record is None:
            record = await self._backend.record(image_id, creds)
        if record.status != "active" or record.size is None:
            raise PrefetchFailed(f"image is {record.status}, not active")
        safety = self._filler.safety
        known = safety.known(image_id, record.os_hash_value, record) if safety else None
        if known is not None:
            raise UnsafeImage(image_id, known.verdict, known.signature)
        entry = self._store.get(image_id)
        admission: AbstractAsyncContextManager[NotAdmitted | None] = contextlib.nullcontext(None)
        running = self._filler.get(image_id)
        if self.admission is not None:
            if running is None:
                present = entry.present_bytes() if entry is not None else 0
                admission = self.admission(record.size - present)
            elif more := running.widening(0, record.size, whole=True):
                admission = self.admission(more)  # a range fill asked for all: an admission
        async with admission as refused:
            if refused is not None:  # tried again on the next runs, with backoff
                raise PrefetchFailed(f"no room in the cache: {refused}")
            try:
                fill, _ = await self._filler.open(record, creds)
            except CachedMeanwhile:
                log.info("prefetch: %s is already cached", image_id)
                return
            fill.ensure_full()  # reserves what it admitted
        self._tracked[image_id].baseline = _Baseline.of(fill)
        log.info("prefetch: fetching %s (%d bytes)", image_id, record.size)
        while fill.state.active:
            with contextlib.suppress(FillAborted):  # how it ended is checked below
                await fill.wait()
        audit = fill.safety
        if audit is not None and audit.violation is not None:
            raise UnsafeImage(image_id, audit.violation)  # refused or never kept
        if audit is not None and audit.signature is not None and audit.verdict is not None:
            raise UnsafeImage(image_id, audit.verdict, audit.signature)  # (its signature)
        entry = self._store.get(image_id)
        if fill.state is FillState.VERIFIED and entry is not None and entry.complete:
            log.info("prefetch: cached %s", image_id)
            return
        error = fill.error
        if isinstance(error, UpstreamError) and error.status in _PERMANENT:
            raise error  # the upstream's own answer, whatever else happened
        if fill.orphaned or fill.state is FillState.VERIFIED:  # verified, then deleted
            raise EntryDeleted(f"its cache entry was deleted ({fill.state.value})")
        if isinstance(error, UpstreamError):
            raise error
        raise PrefetchFailed(f"fill ended {fill.state.value}: {error}")

    async def _failed(self, image_id: str, attempt: float, exc: Exception) -> None:
        marker = self._store.queue_dir / image_id
        status = await self._store.run(read_status, marker)
        status.failures += 1
        status.last_error = str(exc) or type(exc).__name__
        status.last_attempt = attempt
        initial, most = self._retry
        status.next_attempt = attempt + min(most, initial * 2 ** (status.failures - 1))
        await self._store.run(write_status, marker, status)
        log.warning(
            "prefetch of %s failed (%d in a row, retry after %.0fs): %s",
            image_id,
            status.failures,
            status.next_attempt - attempt,
            status.last_error,
            exc_info=None if isinstance(exc, CachedError | OSError) else exc,
        )

    async def progress(self) -> dict[str, dict[str, Any]]:
        """Per image, queued or being filled: how far its fetch is (format: manage.py)."""
        queue = await self._store.run(self._queue_with_status)
        for image_id in [i for i, b in self._seen.items() if self._filler.get(i) is not b.fill]:
            del self._seen[image_id]
        out: dict[str, dict[str, Any]] = {}
        for image_id, status in queue:
            out[image_id] = self._progress_of(image_id, status)
        for image_id, fill in list(self._filler.fills.items()):
            if image_id not in out and fill.state is FillState.RUNNING:
                out[image_id] = self._progress_of(image_id, None)
        return out

    def _progress_of(self, image_id: str, status: QueueStatus | None) -> dict[str, Any]:
        fill = self._filler.get(image_id)
        entry = fill.entry if fill is not None else self._store.get(image_id)
        tracked = self._tracked.get(image_id)
        rate = None
        if entry is None:
            done = 0
        elif entry.complete:
            done = entry.size
        elif fill is not None:
            done, rate = self._measure(image_id, fill)
        else:
            done = entry.present_bytes()
        if fill is not None:
            state = "fetching"
        elif tracked is not None:
            state = "fetching" if tracked.active else "waiting"
        elif status is not None and status.failures:
            state = "failed"
        else:
            state = "queued"
        progress: dict[str, Any] = {
            "state": state,
            "bytes_done": done,
            "size": entry.size if entry is not None else None,
            "rate": rate,
        }
        if status is not None:
            progress |= {
                "failures": status.failures,
                "last_error": status.last_error,
                "last_attempt": status.last_attempt,
                "next_attempt": status.next_attempt or None,
            }
        return progress

    def _measure(self, image_id: str, fill: Fill) -> tuple[int, float | None]:
        """Bytes in the file (chunks being written count as far as they arrived) and bytes per
        second from the upstream since the prefetch (or our first look) began."""
        tracked = self._tracked.get(image_id)
        base = tracked.baseline if tracked is not None else None
        if base is None or base.fill is not fill:
            base = self._seen.get(image_id)
            if base is None or base.fill is not fill:
                base = self._seen[image_id] = _Baseline.of(fill)
        arrived = fill.upstream_bytes - base.upstream_bytes
        done = min(fill.entry.size, max(_written_bytes(fill), base.written_bytes + arrived))
        elapsed = time.monotonic() - base.since
        return done, (arrived / elapsed if elapsed > 0 and arrived else None)

    async def forget(self, image_id: str) -> bool:
        """Stop fetching the image and dequeue it: it was deleted (through the proxy), or
        dropped from the cache (``DELETE /v2/cache/{id}``).

        Returns whether it was queued. The entry itself is the caller's to drop.
        """
        task = self._tasks.get(image_id)
        if task is not None:
            self._forgotten.add(image_id)
            task.cancel()
        queued = await self._store.run(self._store.dequeue, image_id)  # the cache's threads
        if queued:
            log.info("prefetch: %s dequeued (deleted)", image_id)
        return queued

    async def close(self) -> None:
        """Stop every fetch (the daemon stops; queued images stay queued)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
