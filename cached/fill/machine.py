"""Single flight: one fill per image entry, shared by every request and by prefetch.

A fill owns its entry's sparse file while chunks arrive. Its transfers stream from the
upstream into the file (through :class:`cached.fill.pipeline.Pipeline`); readers stream out of
the same file as it grows, woken by progress events (never by polling). A full fill (the
*driver*) walks the image from the first missing chunk to the end; a range request only
fetches the chunks it needs, and may take them ahead of the driver, which then skips them.
The fill belongs to the daemon, not to a client: when a client goes away, the transfer it
started carries on.

States, and who moves the fill between them (all on the event loop)::

    RUNNING ──all chunks written──▶ VERIFYING ──digest ok──▶ VERIFIED   (committed unless deleted)
       │                                  └────mismatch────▶ INVALID    (moved to invalid/)
       ├──driver transfer or disk failed────────────────────▶ FAILED     (flushed chunks kept)
       ├──cancel(): deleted and unread, or the daemon stops──▶ CANCELLED  (flushed chunks kept)
       └──no transfer left, image incomplete────────────────▶ IDLE       (a range fill at rest)

Transfers and their task callbacks move RUNNING → VERIFYING/FAILED/IDLE; ``_finish`` moves
VERIFYING on; ``cancel`` (the registry, on delete or shutdown) moves RUNNING → CANCELLED.
Every other state is final: the fill releases its reservation (in ``_move``, the one place
that enters a final state, so no ending can keep phantom bytes counted against the cache),
flushes, closes its file and leaves the registry (``closed`` is set; ``on_release`` tells
the prune that space may be free again); the next reader that needs bytes opens a new fill
on the same entry.

A range transfer that fails does not fail the fill: its chunks are released and marked lost,
and only readers that were waiting on them are cut (``check``); a later request fetches them
anew. Transfers use the daemon's service credentials when configured (a token that expires
mid-fill does not cut the followers); otherwise the credentials of the request that opened
the fill. The caller's own credentials still authorise every download (the proxy's probe).

Fields: everything here is owned by the event loop; the pipeline's threads only write,
hash and flush what they are handed and report back through loop callbacks.
Durability: written chunks are flushed in batches and only then recorded in the entry's
presence bitmap, so a crash loses at most unflushed chunks and never invents data.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from cached import metrics
from cached.digest import Digest
from cached.errors import (
    CachedError,
    FillAborted,
    StoreUnavailable,
    UpstreamError,
    UpstreamUnavailable,
)
from cached.fill.consumers import StreamConsumer
from cached.fill.pipeline import Flush, Pipeline
from cached.fill.sources import ByteSource, OneSource, Sources, UpstreamSource
from cached.safety.audit import FillAudit, UnsafeImage
from cached.safety.audit import reason as kept_out_because
from cached.safety.signatures import FillSignature
from cached.safety.verdict import Verdict
from cached.store import Bitmap, Entry, Store
from cached.upstream import Backend, Buffer, Credentials

log = logging.getLogger("cached.fill")

PIECE = 1 << 20  # bytes per upstream read and per write: large buffers keep Python cheap
MAX_PENDING = 8  # pieces in flight to the writer/feeder threads (bounds memory per fill)

# The daemon's own credentials for data transfers, when it has some (None otherwise).
DataCredentials = Callable[[], Awaitable[Credentials | None]]


class FillState(enum.Enum):
    RUNNING = "running"
    VERIFYING = "verifying"  # every chunk written: flushing and comparing the digest
    VERIFIED = "verified"  # complete, digest matched, committed (unless deleted meanwhile)
    INVALID = "invalid"  # complete but the digest did not match: never served
    FAILED = "failed"  # the driver broke off or the disk failed; flushed chunks stay
    CANCELLED = "cancelled"  # the entry was deleted with nobody reading, or the daemon stops
    IDLE = "idle"  # no transfer left, image incomplete: the next reader opens a new fill

    @property
    def active(self) -> bool:
        return self in (FillState.RUNNING, FillState.VERIFYING)


_MOVES = {
    FillState.RUNNING: {
        FillState.VERIFYING,
        FillState.FAILED,
        FillState.CANCELLED,
        FillState.IDLE,
    },
    FillState.VERIFYING: {FillState.VERIFIED, FillState.INVALID, FillState.FAILED},
}


@dataclass
class _Transfer:
    """One upstream request writing bytes ``[start, end)``; ``pos`` is written up to."""

    start: int
    pos: int
    end: int
    driver: bool
    chunks: set[int] = field(default_factory=set)
    inflight: int = 0  # pieces submitted and not yet written and fed
    sent: int = 0  # bytes up to here were handed to the pipeline (a next source resumes here)
    error: BaseException | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    async def settle(self, most: int) -> None:
        """Wait until at most ``most`` pieces are in flight; raise the first write error."""
        while self.inflight > most and self.error is None:
            self.wake.clear()
            await self.wake.wait()
        if self.error is not None:
            raise self.error


@dataclass(frozen=True)
class FillSettings:
    sync_bytes: int = 64 << 20
    sync_seconds: float = 1.0
    flush: Flush = os.fdatasync


class Fill:
    """The in-flight state of one entry (see the module docstring for its states)."""

    def __init__(
        self,
        entry: Entry,
        store: Store,
        backend: Backend,
        creds: Credentials,
        settings: FillSettings,
        on_close: Callable[[Fill], None],
        fd: int,
        data_credentials: DataCredentials | None = None,
        sources: Sources | None = None,
        renew_credentials: Callable[[], Awaitable[bool]] | None = None,
        safety: FillAudit | None = None,
        signing: FillSignature | None = None,
        refuse: bool = False,
    ):
        self.entry = entry
        self._store = store
        self._backend = backend
        self.creds = creds
        self._data_credentials = data_credentials
        # The upstream as a byte source, with this fill's credentials; and where each transfer
        # takes its bytes (cached/fill/sources.py): the upstream alone unless the registry's
        # ``sources`` (a fleet, cached/fleet/peers.py) replaces it before the first transfer.
        self._renew_credentials = renew_credentials
        self.upstream = UpstreamSource(backend, self._credentials, self._renew)
        self.sources: Sources = sources or OneSource(self.upstream)
        self._settings = settings
        self._on_close = on_close
        self.state = FillState.RUNNING
        self.error: BaseException | None = None
        self.written: Bitmap = entry.present.copy()
        if entry.size == 0:
            self.written.add(0)  # an empty image has nothing to fetch, only to verify
        self.orphaned = False  # deleted while it ran: goes on only for its readers
        self.on_reserve: Callable[[], None] | None = None  # told when space is reserved
        self._claimed: set[int] = set()
        self._transfers: list[_Transfer] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._driver: asyncio.Task[None] | None = None
        self._losses = 0  # failed range transfers so far
        self._lost: dict[int, tuple[int, BaseException]] = {}  # chunk -> (loss number, why)
        self._loop = asyncio.get_running_loop()
        self._progress: asyncio.Future[None] = self._loop.create_future()
        self.digest = Digest.for_record(entry.checksum, entry.os_hash_algo, entry.os_hash_value)
        self.consumers: list[StreamConsumer] = [self.digest] if self.digest else []
        # The format inspector (image_safety_mode audit or enforce), a consumer after the
        # digest; in enforce mode a violating verdict stops it (refuse) or keeps it from
        # committing (pass-through).
        self.safety = safety
        self._refuse = refuse  # image_safety_on_violation: refuse (enforce mode)
        if safety is not None:
            self.consumers.append(safety)
            safety.stop = self._violated
        # The signature check (image_signature_verify): reuses the digest when the hash
        # method is its algorithm, else adds a consumer hashing with the method.
        self.signing = signing
        if signing is not None and (extra := signing.attach(self.digest)) is not None:
            self.consumers.append(extra)
        self._pipe: Pipeline | None = Pipeline(
            fd, entry.image_id[:8], self.consumers, settings.flush
        )
        self._sync_lock = asyncio.Lock()
        self._unsynced_bytes = 0
        self._last_sync = time.monotonic()
        self._background: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()
        self.upstream_bytes = 0
        self.upstream_requests = 0
        metrics.fill_started(self)

    # ----------------------------------------------------------------- readers
    def available(self, pos: int) -> int:
        """End of the bytes readable from ``pos`` on (``pos`` itself if none are yet)."""
        entry = self.entry
        c = pos // entry.chunk_size
        if c in self.written:
            last = c
            while last + 1 < entry.chunk_count and last + 1 in self.written and last - c < 64:
                last += 1
            return entry.chunk_bounds(last)[1]
        for t in self._transfers:
            if t.start <= pos < t.pos:
                return t.pos
        return pos

    def demand(self, start: int, end: int, *, whole: bool) -> int:
        """Make sure bytes ``[start, end)`` (the whole image if ``whole``) are being fetched.

        Returns a mark for :meth:`check`: losses after it concern this reader.
        """
        mark = self._losses
        if whole:
            self.ensure_full()
        else:
            self.ensure_range(start, end)
        return mark

    def widening(self, start: int, end: int, *, whole: bool) -> int:
        """Bytes a :meth:`demand` of ``[start, end)`` (the whole image if ``whole``) would
        add to this fill's reservation now: what its admission must admit (issue 14 item 1:
        a download joining a running fill widened its reservation unchecked).

        Nothing for the fill of a deleted entry (orphaned, or its index forgotten): its
        reservation was zeroed and counts nowhere (prune and admission sum indexed entries
        only), and its bitmap is no longer updated, so ``size - present - reserved`` would
        be the whole missing part. A reader following it was sent through admission, an
        await in which the fill could verify and leave, and was then cut for want of a fill
        of its deleted entry (one byte short of a verified image)."""
        if self.state is not FillState.RUNNING or not (self._driver is None or self._driver.done()):
            return 0  # ended (a new fill will be admitted), or a driver reserved everything
        if self.entry.removed:
            return 0  # deleted: goes on only for its readers, reserving nothing counted
        entry = self.entry
        if whole:
            return max(0, entry.size - entry.present_bytes() - entry.reserved)
        return sum(
            entry.chunk_bounds(c)[1] - entry.chunk_bounds(c)[0]
            for c in entry.chunks_of(start, end)
            if c not in self.written and c not in self._claimed
        )

    def check(self, pos: int, mark: int) -> None:
        """Raise FillAborted if the fill ended badly, or if the chunk at ``pos`` was lost by
        a failed range transfer after ``mark`` (see :meth:`demand`)."""
        self.raise_if_failed()
        lost = self._lost.get(pos // self.entry.chunk_size)
        if lost is not None and lost[0] > mark:
            raise FillAborted(f"range of {self.entry.image_id} failed: {lost[1]}")

    async def wait(self) -> None:
        """Wait for the next progress event; raise FillAborted if the fill ended badly."""
        self.raise_if_failed()
        if self.state.active:
            await asyncio.shield(self._progress)
            self.raise_if_failed()

    def raise_if_failed(self) -> None:
        if self.state in (FillState.FAILED, FillState.INVALID, FillState.CANCELLED):
            why = f"fill of {self.entry.image_id} {self.state.value}: {self.error}"
            raise FillAborted(why) from self.error

    def _notify(self) -> None:
        fired, self._progress = self._progress, self._loop.create_future()
        fired.set_result(None)

    # ----------------------------------------------------------------- transfers
    def ensure_full(self) -> None:
        """Make sure the whole image is being fetched (start the driver if it is not)."""
        if self.state is FillState.RUNNING and (self._driver is None or self._driver.done()):
            self.entry.reserved = self.entry.size - self.entry.present_bytes()
            self._driver = self._spawn(self._drive())
            self._reserve_changed()

    def ensure_range(self, start: int, end: int) -> None:
        """Fetch the chunks covering ``[start, end)`` that nobody has or is fetching."""
        if self.state is not FillState.RUNNING:
            return
        run: list[int] = []
        for c in self.entry.chunks_of(start, end):
            if c in self.written or c in self._claimed:
                if run:
                    self._spawn_run(run)
                    run = []
            else:
                run.append(c)
        if run:
            self._spawn_run(run)
        if not self._tasks:
            # Everything asked for is here already: nothing will finish a task, so let go now.
            self._spawn(self._finish() if self.written.full() else self._park())

    def _spawn_run(self, chunks: list[int]) -> None:
        self._claimed.update(chunks)
        for c in chunks:
            self._lost.pop(c, None)
        start = self.entry.chunk_bounds(chunks[0])[0]
        end = self.entry.chunk_bounds(chunks[-1])[1]
        if self._driver is None or self._driver.done():  # a driver reserved everything
            self.entry.reserved += end - start
            self._reserve_changed()
        self._spawn(self._transfer(start, end, claimed=set(chunks)))

    def _reserve_changed(self) -> None:
        if self.on_reserve is not None:
            self.on_reserve()

    def _spawn(self, coro: object) -> asyncio.Task[None]:
        task: asyncio.Task[None] = self._loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self.state is FillState.RUNNING:
            if task is self._driver or not isinstance(exc, UpstreamError | UpstreamUnavailable):
                self._fail(exc)  # whole-image readers need the driver; a disk error is for all
                return
        if not self._tasks and self.state is FillState.RUNNING:
            if self.written.full():
                self._spawn(self._finish())
            else:
                # Nothing left to do for now (a range fill): flush and let go of the file.
                self._spawn(self._park())

    async def _drive(self) -> None:
        """Fetch every chunk nobody has or is fetching, then wait for the others.

        A broken driver fails the fill here, before its task ends: a reader that runs
        between the end and the task's done callback would otherwise find the fill RUNNING
        with no driver, start another and the failure would be forgotten.
        """
        try:
            await self._drive_chunks()
        except Exception as exc:
            if self.state is FillState.RUNNING:
                self._fail(exc)
            raise

    async def _drive_chunks(self) -> None:
        entry = self.entry
        while self.state is FillState.RUNNING:
            first = next(
                (
                    c
                    for c in range(entry.chunk_count)
                    if c not in self.written and c not in self._claimed
                ),
                None,
            )
            if first is None:
                return
            # Ask for the run of missing chunks; claim them lazily, as the stream reaches
            # them, so a range request can still take chunks ahead of us (we stop there).
            stop = next(
                (
                    c
                    for c in range(first, entry.chunk_count)
                    if c in self.written or c in self._claimed
                ),
                entry.chunk_count,
            )
            start = entry.chunk_bounds(first)[0]
            end = entry.chunk_bounds(stop - 1)[1]
            await self._transfer(start, end, claimed=None)

    async def _credentials(self) -> Credentials:
        if self._data_credentials is not None:
            try:
                service = await self._data_credentials()
            except CachedError as exc:  # Keystone down: the opener's credentials still work
                log.warning("no service credentials for %s: %s", self.entry.image_id, exc)
                service = None
            if service is not None:
                return service
        return self.creds

    async def _renew(self, used: Credentials) -> bool:
        """The upstream refused ``used``: True when they were the daemon's own and fresher
        ones are to be had (the opener's token is the caller's: never renewed)."""
        if used is self.creds or self._renew_credentials is None:
            return False
        try:
            return bool(await self._renew_credentials())
        except CachedError as exc:  # Keystone down: the transfer fails with the 401
            log.warning("cannot renew the service credentials: %s", exc)
            return False

    async def _transfer(self, start: int, end: int, claimed: set[int] | None) -> None:
        """Stream ``[start, end)`` from the sources (cached/fill/sources.py) into the file.

        With ``claimed=None`` (the driver) chunks are claimed one by one as the stream
        reaches them, and the transfer stops at the first chunk someone else has.
        """
        entry = self.entry
        t = _Transfer(start, start, end, claimed is None, set(claimed or ()), sent=start)
        self._transfers.append(t)
        whole = start == 0 and end == entry.size
        failed: list[ByteSource] = []
        pos = start
        try:
            while True:  # once per source: a source that hands over is replaced
                source = await self.sources.pick(pos, end, failed)
                if source is None:
                    raise UpstreamUnavailable(f"no source left for {entry.image_id}")
                try:
                    pos = await self._stream(t, source, pos, end, whole and pos == 0)
                    break
                except (UpstreamError, UpstreamUnavailable) as exc:
                    if not source.hands_over or self.state is not FillState.RUNNING:
                        raise
                    failed.append(source)
                    log.warning(
                        "%s failed at byte %d of %s: %s; the next source takes over",
                        source.name, t.sent, entry.image_id, exc,
                    )  # fmt: skip
                    pos = t.sent  # the first byte the failed source did not deliver
            await t.settle(0)
        except BaseException as exc:
            if not t.driver and isinstance(exc, UpstreamError | UpstreamUnavailable):
                self._losses += 1
                for c in t.chunks - set(self.written):
                    self._lost[c] = (self._losses, exc)
                log.warning(
                    "range transfer of %s [%d, %d) failed: %s", entry.image_id, start, end, exc
                )
            raise
        finally:
            self._transfers.remove(t)
            self._claimed.difference_update(t.chunks - set(self.written))
            self._notify()

    async def _stream(
        self, t: _Transfer, source: ByteSource, pos: int, end: int, to_the_end: bool
    ) -> int:
        """Stream ``[pos, end)`` from ``source`` into the file; returns where it stopped.

        ``t.sent`` follows each piece handed to the pipeline, so a failure leaves it at the
        first byte not delivered (``t.pos``, what readers may read, follows the writes). A
        driver (``t.driver``) claims chunks one by one as the stream reaches them, and stops
        at the first chunk someone else has.
        """
        entry = self.entry
        self.upstream_requests += 1
        log.debug("transfer %s [%d, %d) from %s", entry.image_id, pos, end, source.name)
        async with source.open(entry.image_id, pos, None if to_the_end else end) as stream:
            while pos < end and self.state is FillState.RUNNING:
                c = pos // entry.chunk_size
                chunk_start, chunk_end = entry.chunk_bounds(c)
                if pos == chunk_start and t.driver:
                    if c in self.written or (c in self._claimed and c not in t.chunks):
                        break  # taken by a range transfer: let the driver skip it
                    self._claimed.add(c)
                    self._lost.pop(c, None)
                    t.chunks.add(c)
                n = min(PIECE, chunk_end - pos)
                try:
                    blocks = await stream.read_blocks(n)
                except OSError as exc:  # the source's read (a file store), not ours
                    raise UpstreamUnavailable(f"cannot read the image: {exc}") from exc
                got = sum(len(memoryview(b)) for b in blocks)
                if got != n:
                    raise UpstreamUnavailable(
                        f"{source.name} sent {pos - t.start + got} of {end - t.start} bytes"
                    )
                self.upstream_bytes += n
                self._submit(t, pos, blocks, c if pos + n == chunk_end else -1)
                pos += n
                t.sent = pos
                await t.settle(MAX_PENDING - 1)
        return pos

    def _submit(self, t: _Transfer, pos: int, blocks: list[Buffer], finished_chunk: int) -> None:
        """Hand a piece to the pipeline. It stays in flight (and in memory) until written and
        hashed, so a digest that falls behind slows the transfer instead of queueing up."""
        assert self._pipe is not None
        size = sum(len(memoryview(b)) for b in blocks)
        t.inflight += 1

        def written(fut: asyncio.Future[int]) -> None:
            self._written(t, pos + size, finished_chunk, fut)

        def settled() -> None:
            t.inflight -= 1
            t.wake.set()

        self._pipe.submit(pos, blocks, written, settled)

    def _written(
        self, t: _Transfer, upto: int, finished_chunk: int, fut: asyncio.Future[int]
    ) -> None:
        if fut.cancelled() or fut.exception() is not None:
            t.error = t.error or fut.exception() or FillAborted("write cancelled")
            return
        if t.error is not None:
            return  # an earlier piece of this transfer failed: its chunk has a hole
        t.pos = upto
        self._unsynced_bytes += fut.result()
        if finished_chunk >= 0:
            self.written.add(finished_chunk)
            self._claimed.discard(finished_chunk)
            t.chunks.discard(finished_chunk)
            self._maybe_sync()
        self._notify()

    # ----------------------------------------------------------------- durability
    def _maybe_sync(self) -> None:
        due = (
            self._unsynced_bytes >= self._settings.sync_bytes
            or time.monotonic() - self._last_sync >= self._settings.sync_seconds
        )
        if due and not self._sync_lock.locked():
            self._keep(self._sync())

    def _keep(self, coro: object) -> None:
        task: asyncio.Task[None] = self._loop.create_task(coro)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _sync(self, force: bool = False) -> bool:
        """Flush, then record as present what was written before the flush began.

        The flush runs on the pipeline's syncer thread so writes go on meanwhile; one at a
        time. The entry's bitmap (index) is updated here, on the loop, after the thread.
        """
        async with self._sync_lock:
            entry = self.entry
            if self._pipe is None or entry.removed:
                return True
            chunks = set(self.written) - set(entry.present)
            self._unsynced_bytes = 0
            self._last_sync = time.monotonic()
            if not chunks:
                return True
            durable = entry.present.copy()
            durable.update(chunks)
            stamp = time.time()
            try:
                await self._pipe.make_durable(durable.to_bytes(), stamp)
            except (StoreUnavailable, RuntimeError) as exc:
                log.error("cannot flush %s: %s", entry.path, exc)
                if self.state is FillState.RUNNING and not force:
                    self._fail(exc)
                return False
            if not entry.removed:
                entry.present.update(chunks)
                entry.last_modified = stamp
                entry.reserved = max(
                    0,
                    entry.reserved
                    - sum(entry.chunk_bounds(c)[1] - entry.chunk_bounds(c)[0] for c in chunks),
                )
            return True

    # ----------------------------------------------------------------- endings
    async def _finish(self) -> None:
        """All chunks are written: flush, verify, commit (or invalidate)."""
        if self.state is not FillState.RUNNING:
            return
        self._move(FillState.VERIFYING, None)
        try:
            if not await self._sync():  # waits for one in flight, then flushes the rest
                raise StoreUnavailable("cannot flush the cache file")
            assert self._pipe is not None
            await self._pipe.catch_up(self.entry.size)  # every consumer, digest or not
            ok = self.digest is None or self.digest.matched
            if ok and self.safety is not None:  # judged and stored before the commit record
                await self._pipe.on_feeder(self.safety.finish, self.entry.size)
            if ok and self.signing is not None:  # verified and stored before the commit too
                await self._pipe.on_feeder(self.signing.finish, self.entry.size)
        except StoreUnavailable as exc:
            self._move(FillState.FAILED, exc)
            self._close_files()
            return
        entry = self.entry
        audit = self.safety
        if ok and audit is not None and audit.enforce and audit.verdict is not None:
            if not audit.verdict.allowed:
                audit.violated(audit.verdict)  # recorded; the entry is dropped
            elif self.signing is not None and not self.signing.allowed:
                # The signature covers the whole image: judged only now, before the commit.
                assert self.signing.check is not None
                audit.signature_violated(self.signing.check)  # recorded; the entry is dropped
        if ok and audit is not None and audit.refused:
            verdict = audit.verdict
            assert verdict is not None
            if self.signing is not None:
                self.signing.rejected()  # its result logged and counted, never committed
            if self._refuse:
                # The held-back last byte never goes: every reader is cut.
                refusal = UnsafeImage(entry.image_id, verdict, audit.signature)
                self._move(FillState.FAILED, refusal)
            else:
                # pass-through: the readers get every byte, the cache keeps none.
                why = kept_out_because(verdict, audit.signature)
                log.info("verified (not kept: %s) %s", why, entry.image_id)
                self._move(FillState.VERIFIED, None)
            self._close_files()
            return
        if ok:
            # Deleted meanwhile: still verified for the readers that follow us, never kept.
            committed = False
            try:
                committed = await self._store.commit(entry)
            except OSError as exc:
                log.error("cannot commit %s: %s", entry.image_id, exc)
            if committed and self.safety is not None:
                self.safety.committed(entry)
            if committed and self.signing is not None:
                self.signing.committed(entry)
            log.info(
                "%s %s: %d bytes, %s verified, %d transfers",
                "cached" if committed else "verified (not kept)",
                entry.image_id,
                entry.size,
                self.digest.algo if self.digest else "nothing",
                self.upstream_requests,
            )
            self._move(FillState.VERIFIED, None)
        else:
            assert self.digest is not None
            reason = (
                f"{self.digest.algo} mismatch: got {self.digest.hexdigest()}, "
                f"expected {self.digest.expected}"
            )
            log.error("image %s failed verification: %s", entry.image_id, reason)
            try:
                await self._store.invalidate(entry, reason)
            except OSError as exc:
                log.error("cannot move %s to invalid/: %s", entry.image_id, exc)
            self._move(FillState.INVALID, CachedError(reason))
        self._close_files()

    def _violated(self, verdict: Verdict) -> None:
        """The content violates the enforced policy (told on the loop by the FillAudit,
        once): with ``refuse`` stop now, cutting every reader; with pass-through go on."""
        if self._refuse and self.state is FillState.RUNNING:
            self._fail(UnsafeImage(self.entry.image_id, verdict))

    async def read_head(self, upto: int) -> None:
        """Feed the inspector bytes ``[0, upto)`` from the file (written already), on the
        feeder lane after the pieces queued there (or on the cache's threads once the fill
        let go of its lanes), and judge what it decided. A file it cannot open (deleted
        meanwhile) is no verdict."""
        audit = self.safety
        if audit is None:
            return
        path = self.entry.path

        def job(_fd: int, upto: int) -> None:
            try:
                fd = os.open(path, os.O_RDONLY)  # its own: the fill's may be closed by now
            except OSError as exc:
                log.debug("cannot read the head of %s: %s", path, exc)
                return
            try:
                audit.read_ahead(fd, upto)
            finally:
                os.close(fd)

        if self._pipe is not None:
            await self._pipe.on_feeder(job, upto)
        else:
            await self._store.run(job, -1, upto)
        audit.report()

    async def _park(self) -> None:
        """No transfer is left and the image is not complete (a range fill): let go."""
        await self._sync()
        if self.state is FillState.RUNNING and self._tasks <= {asyncio.current_task()}:
            self._move(FillState.IDLE, None)
            self.entry.reserved = 0
            self._close_files()

    def _fail(self, exc: BaseException) -> None:
        log.warning("fill of %s stopped: %s", self.entry.image_id, exc)
        self._move(FillState.FAILED, exc)
        self._stop_transfers()

    def cancel(self) -> None:
        """Stop every transfer (the entry was deleted and nobody reads it, or the daemon
        stops). What was written and flushed stays for a resume."""
        if self.state is FillState.RUNNING:
            self._move(FillState.CANCELLED, FillAborted("fill cancelled"))
            self._stop_transfers()

    def orphan(self) -> None:
        """The entry was deleted: go on only while someone reads it (see ``reader_left``)."""
        self.orphaned = True
        if self.entry.readers == 0:
            self.cancel()

    def reader_left(self) -> None:
        if self.orphaned and self.entry.readers == 0:
            self.cancel()

    def _stop_transfers(self) -> None:
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        self.entry.reserved = 0
        self._keep(self._flush_and_close())

    async def _flush_and_close(self) -> None:
        try:
            if self._pipe is not None:
                # Let the writes already handed to the writer thread land and be counted.
                await self._pipe.writes_done()
                await asyncio.sleep(0)
                await self._sync(force=True)
        finally:
            self._close_files()

    def _move(self, state: FillState, error: BaseException | None) -> None:
        if state not in _MOVES.get(self.state, set()):
            raise AssertionError(f"fill of {self.entry.image_id}: {self.state} -> {state}")
        self.state = state
        self.error = error
        if not state.active:
            # A fill that ends reserves nothing: every final state, one rule (issue 14
            # item 5: a failed final flush kept its reservation for good).
            self.entry.reserved = 0
        metrics.fill_ended(self, state.value)
        self._notify()

    def _close_files(self) -> None:
        """Let go of the file and leave the registry: the next reader opens a new fill."""
        if self._pipe is not None:
            pipe, self._pipe = self._pipe, None
            pipe.close()  # every caller awaited _sync() first; closes after queued writes
        self._on_close(self)
        self.closed.set()
