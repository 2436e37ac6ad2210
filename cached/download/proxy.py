"""The image API as compute nodes see it: authorised hits, misses through a fill, the rest
passed through to the upstream.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from aiohttp import web

from cached.cachedir.adoption import Adopter
from cached.cachedir.directories import Directories
from cached.cachedir.reverify import Integrity
from cached.download.reader import Progress, send_entry
from cached.edge import ranges, replies, routes
from cached.edge.passthrough import PassThrough, ReplyHook
from cached.errors import (
    CachedError,
    FillAborted,
    NotAdmitted,
    StoreUnavailable,
    UpstreamError,
    UpstreamUnavailable,
)
from cached.fill.machine import Fill, FillState
from cached.fill.registry import CachedMeanwhile, Filler
from cached.identity.authorizer import Authorizer
from cached.ids import is_image_id
from cached.safety.audit import HEADER as SAFETY_HEADER
from cached.safety.audit import Safety, header_value, reason
from cached.safety.signature import Check
from cached.safety.signatures import HEADER as SIGNATURE_HEADER
from cached.safety.signatures import Signatures
from cached.safety.verdict import Verdict
from cached.store import Entry, State, Store, chunk_size_for
from cached.store.integrity import SMALL_HIT
from cached.upstream import Backend, Credentials, Decision, ImageRecord

log = logging.getLogger("cached.proxy")

_RELAY_PIECE = 1 << 20  # bytes per read when the rest of a download comes from the upstream
_UNAVAILABLE = "The image service is unavailable; try again later."


class Outcome(enum.Enum):
    """How a download was answered: the parameters of this cache's RFC 9211 Cache-Status
    member (``cached; hit``: :meth:`status`)."""

    HIT = "hit"
    STALE_HIT = "hit; detail=stale-auth"  # the upstream failed: auth_stale_if_error
    MISS = "fwd=uri-miss; stored"
    COLLAPSED = "fwd=uri-miss; collapsed"
    PARTIAL = "fwd=partial; stored"
    BYPASS = "fwd=bypass"

    def status(self, name: str = "cached") -> str:
        """This cache's Cache-Status member, named ``name`` (``cached``, or ``cached-<id>``
        in a fleet)."""
        return f"{name}; {self.value}"


@dataclass(frozen=True)
class _Download:
    """One download being answered from the cache."""

    request: web.Request
    entry: Entry
    wanted: ranges.ByteRange | None  # None: the whole image
    outcome: Outcome
    request_id: str
    creds: Credentials
    record: ImageRecord | None

    @property
    def whole(self) -> bool:
        return self.wanted is None

    @property
    def start(self) -> int:
        return 0 if self.wanted is None else self.wanted.start

    @property
    def end(self) -> int:
        return self.entry.size if self.wanted is None else self.wanted.end


@dataclass
class Proxy:
    store: Store
    filler: Filler
    backend: Backend
    authorizer: Authorizer
    # Answers everything the cache does not (cached/edge/passthrough.py, cached/edge/fileapi.py).
    passthrough: PassThrough
    # Admission: images larger than this are never cached (streamed with detail=too-large).
    max_entry_size: int | None = None
    # Entered around opening a new fill, or widening a running one, with the bytes it will
    # write: gives None, or why there is no room (cached/jobs/schedule.py Maintenance.admission).
    admission: Callable[[int], AbstractAsyncContextManager[NotAdmitted | None]] | None = None
    # Told of every image deleted through the proxy (e.g. the prefetch queue forgets it).
    on_deleted: list[Callable[[str], Awaitable[object]]] = field(default_factory=list)
    # Told of every change the upstream accepted through this proxy, ``deleted`` or not,
    # after it is applied here (cached/fleet/notices.py tells the siblings).
    on_changed: list[Callable[[str, bool], None]] = field(default_factory=list)
    integrity: Integrity | None = None  # re-verifies a changed file before a hit (scrub.py)
    adopter: Adopter | None = None  # Glance's cached files, adopted (cached/cachedir/adoption.py)
    directories: Directories | None = None  # None: the cache directory is not guarded
    # The content verdicts shown on hits, and enforced (image_safety_mode audit or enforce;
    # cached/safety/audit.py).
    safety: Safety | None = None
    # This cache's name in Cache-Status (RFC 9211 §2): "cached", "cached-<id>" in a fleet.
    cache_name: str = "cached"
    # The Cache-Status member of the cache a fill takes its bytes from, nearer the origin
    # than this one (a fleet's sibling: cached/fleet/peers.py upstream_side), once the
    # fill chose its source; None: the origin itself.
    upstream_side: Callable[[Fill], Awaitable[str | None]] | None = None
    # The signature results shown on hits (image_signature_verify; cached/safety/signatures.py).
    signatures: Signatures | None = None
    # Drops of deleted images still running (on a hung share); changed on the loop only.
    _dropping: set[asyncio.Task[None]] = field(default_factory=set)

    async def image_data(self, request: web.Request) -> web.StreamResponse:
        """``GET /v2/images/{id}/file``: authorise, then serve from the cache or fill it."""
        image_id = routes.image_id(request)
        if not is_image_id(image_id):
            # Never asked upstream; Glance's answer for an id it cannot find.
            return replies.error(request, 404, f"No image found with ID {image_id[:64]}")
        if (refused := await routes.refused_spelling(self.backend, request)) is not None:
            return refused
        creds = Credentials.from_headers(request.headers)
        entry = self.store.get(image_id)
        # Authorisation first and alone, cached or not: a refused caller takes the same path
        # (and time) whether or not this node holds the image, so it learns nothing of it.
        try:
            # The probe carries the client's Accept: a refusal is relayed in the shape
            # Glance gives this client (plain text, JSON or HTML).
            auth = await self.authorizer.check(
                image_id,
                creds,
                stale_ok=entry is not None and entry.complete,
                accept=request.headers.get("Accept"),
            )
        except UpstreamUnavailable as exc:
            return replies.unreachable(request, exc)
        if auth.decision is Decision.DENY:
            return web.Response(status=auth.status, body=auth.body, headers=dict(auth.headers))
        request_id = auth.request_id or f"req-{uuid.uuid4()}"
        if auth.decision is Decision.NO_DATA:
            return web.Response(status=204, headers={"x-openstack-request-id": request_id})
        entry = self.store.get(image_id)
        record: ImageRecord | None = None
        if not auth.stale and (
            entry is None or (not entry.complete and image_id not in self.filler.fills)
        ):
            try:
                record = await self._record(image_id, creds)
            except UpstreamUnavailable as exc:
                return replies.unreachable(request, exc)
            entry = self.store.get(image_id)
            if entry is None and record is not None and self.adopter is not None:
                entry = await self.adopter.adopt(record)  # Glance's file of it, verified
        bypass = self.directories.cache_bypass(entry) if self.directories else None
        if self.safety is not None and self.safety.enforce:
            # Known verdicts first (after authorisation, before the guard and admission): an
            # image whose content violates the policy is never served from the cache. A
            # complete entry without a current verdict is inspected again now, before it is
            # used (its record looked up with the caller's token if it kept no declaration;
            # not on a stale hit), unless the cache directory is not to be touched.
            lookup = None if auth.stale else self._lookup_with(creds)
            violation = await self.safety.violation(
                image_id, entry if bypass is None else None, record, lookup
            )
            if violation is not None:
                if self.safety.refuse:
                    return _refused(
                        request, image_id, violation.verdict, request_id, violation.signature
                    )
                detail = "unsafe-format" if violation.signature is None else "bad-signature"
                return await self._bypass(request, detail)
        if bypass is not None:  # the cache directory is not usable (cached/cachedir/directories.py)
            return await self._bypass(request, bypass)
        if auth.stale and (entry is None or not entry.complete):  # never a fill on it
            return replies.error(request, 503, _UNAVAILABLE)
        if entry is None or not entry.complete:
            if isinstance(record, ImageRecord) and (
                record.status != "active" or record.size is None
            ):
                return await self._bypass(request)
            if entry is None and not isinstance(record, ImageRecord):
                return await self._bypass(request)
        size = entry.size if entry is not None else record.size  # type: ignore[union-attr]
        assert size is not None
        if (entry is None or not entry.complete) and self._too_large(size):
            return await self._bypass(request, "too-large")
        try:
            wanted = ranges.parse(request.headers.get("Range"), size)
            if wanted is not None and "If-Range" in request.headers:
                # RFC 9110 §13.1.5: we send no validators, so no If-Range can match.
                wanted = None
        except ranges.MultipleRanges:
            return await self._bypass(request)
        except ranges.MalformedRange:
            return replies.unsatisfiable(request, size, "Invalid Range header.", request_id)
        except ranges.RangeNotSatisfiable as exc:
            return replies.unsatisfiable(request, size, exc.detail, request_id)
        try:
            fill, outcome = await self._attach(image_id, entry, record, creds, wanted)
            if auth.stale:
                outcome = Outcome.STALE_HIT
        except (StoreUnavailable, FillAborted) as exc:
            self._cache_failed(image_id, exc, exc.__cause__ or exc)
            return await self._bypass(request)
        except NotAdmitted as exc:
            return await self._bypass(request, exc.detail)
        if fill is not None and wanted is not None and self._refusing:
            # refuse: a range is sent only once the image's header has been judged (its
            # first chunk is fetched too), so no byte of a refused image goes out.
            verdict = await self._head_verdict(fill, wanted)
            if verdict is not None:
                return _refused(request, image_id, verdict, request_id)
        if fill is None and (entry is None or not entry.complete):
            entry = self.store.get(image_id)  # committed while this request waited
            if entry is None or not entry.complete:  # and evicted at once: not this time
                return await self._bypass(request)
        entry = fill.entry if fill is not None else entry
        assert entry is not None
        return await self._send(
            _Download(request, entry, wanted, outcome, request_id, creds, record), fill
        )

    @property
    def _refusing(self) -> bool:
        return self.safety is not None and self.safety.refuse

    async def _head_verdict(self, fill: Fill, wanted: ranges.ByteRange) -> Verdict | None:
        """refuse: make ``fill`` fetch the image's first chunk (>= 4 MiB), beside the range
        (nothing of which goes out before the verdict), and wait until its inspector has
        judged the header; the violating verdict, else None (safe so far, undecided within
        the chunk, or the fill ended otherwise: the download goes on as usual). An image of
        one chunk waits for its final verdict."""
        audit = fill.safety
        if audit is None or not audit.enforce:  # (an override lets the image be served)
            return None
        entry = fill.entry
        head_end = entry.chunk_bounds(0)[1]
        if audit.header is None and audit.violation is None:
            fill.demand(0, head_end, whole=False)
            fill.demand(wanted.start, wanted.end, whole=False)  # meanwhile (a refusal stops it)
        while audit.header is None and audit.violation is None:
            if entry.chunk_count > 1 and 0 in fill.written:  # (also once the fill parked)
                await fill.read_head(head_end)  # fed and judged from the file
                break
            if not fill.state.active:
                break
            try:
                await fill.wait()
            except FillAborted:
                break
        return audit.violation

    def _lookup_with(self, creds: Credentials) -> Callable[[str], Awaitable[ImageRecord | None]]:
        """An image's record with ``creds`` (re-inspection of an entry that kept no
        declaration)."""

        async def lookup(image_id: str) -> ImageRecord | None:
            return await self._record(image_id, creds)

        return lookup

    async def _fill_record(self, entry: Entry, creds: Credentials) -> ImageRecord:
        """The record to open a new fill of ``entry`` with when this download looked none up
        (it joined a fill that ended since): the one the entry keeps, or, with signatures
        verified, the upstream's (a rebuilt record has no signature properties, so its fill
        could not be judged on them; enforce would let its first download complete). The
        entry's if the upstream does not give one for the same image now."""
        if self.signatures is not None:
            try:
                found = await self._record(entry.image_id, creds)
            except UpstreamUnavailable:
                found = None
            if (
                found is not None
                and found.status == "active"
                and (found.size, found.os_hash_value) == (entry.size, entry.os_hash_value)
            ):
                return found
        return _record_of(entry)

    def _too_large(self, size: int) -> bool:
        return self.max_entry_size is not None and size > self.max_entry_size

    async def _record(self, image_id: str, creds: Credentials) -> ImageRecord | None:
        try:
            return await self.backend.record(image_id, creds)
        except UpstreamError:
            return None  # the authorisation probe carries the answer the caller gets

    async def _attach(
        self,
        image_id: str,
        entry: Entry | None,
        record: ImageRecord | None,
        creds: Credentials,
        wanted: ranges.ByteRange | None,
    ) -> tuple[Fill | None, Outcome]:
        if entry is not None and entry.complete:
            return None, Outcome.HIT
        fill = self.filler.get(image_id)
        if fill is not None:
            if await self._widened(fill, wanted):
                return fill, Outcome.COLLAPSED
            if (fill := self.filler.get(image_id)) is not None:  # it ended; another began
                return fill, Outcome.COLLAPSED  # (its bytes unadmitted only in this race)
        if record is None:
            assert entry is not None
            record = await self._fill_record(entry, creds)
        try:
            if self.admission is None:
                fill, created = await self.filler.open(record, creds)
            else:
                # A new fill: make room for what it will write, or let it pass through. Its
                # reservation is made by _send's demand, with no await between the two.
                needed = _bytes_to_fetch(entry, record, wanted, head=self._refusing)
                async with self.admission(needed) as refused:
                    if refused is not None:
                        raise refused
                    fill, created = await self.filler.open(record, creds)
        except CachedMeanwhile:
            return None, Outcome.HIT  # (image_data takes the complete entry from the index)
        if not created:
            return fill, Outcome.COLLAPSED
        return fill, Outcome.PARTIAL if len(fill.entry.present) else Outcome.MISS

    async def _widened(self, fill: Fill, wanted: ranges.ByteRange | None) -> bool:
        """Admit what joining ``fill`` for ``wanted`` adds to its reservation (issue 14
        item 1: a collapsed download widened it unadmitted and the cache ran past its
        limits). Raises NotAdmitted; False if the fill ended meanwhile. The caller's demand
        follows without an await, as for a new fill."""
        start, end = (0, fill.entry.size) if wanted is None else (wanted.start, wanted.end)
        more = fill.widening(start, end, whole=wanted is None)
        if wanted is not None and self._refusing and wanted.start >= fill.entry.chunk_size:
            # refuse also fetches the first chunk (_head_verdict)
            more += fill.widening(0, fill.entry.chunk_size, whole=False)
        if not more or self.admission is None:
            return True
        async with self.admission(more) as refused:
            if refused is not None:
                raise refused
        return fill.state is FillState.RUNNING

    async def _send(self, dl: _Download, fill: Fill | None) -> web.StreamResponse:
        following = None
        if fill is not None:
            following = (fill, fill.demand(dl.start, dl.end, whole=dl.whole))
        entry = dl.entry
        # Count the reader before anything awaits: prune keeps a partial entry being read (a
        # complete one it may evict: this reader then finishes from its open file).
        entry.readers += 1
        # Used now, for prune's order (least recently *requested* first, as an LRU cache
        # orders): stamped again, and written to the file, when a hit has been sent.
        entry.last_accessed = max(entry.last_accessed, time.time())
        try:
            try:
                file = await self._open(dl, fill)
            except FileNotFoundError:  # evicted between lookup and now
                return await self._bypass(dl.request)
            except OSError as exc:  # the cache directory's (EIO, ESTALE...): nothing sent yet
                self._cache_failed(entry.image_id, exc, exc)
                return await self._without_cache(dl)
            if file is None:  # a hit whose file failed re-verification: now out of the index
                return await self._without_cache(dl)
            try:
                return await self._stream(dl, file, following)
            finally:
                if not isinstance(file, bytes):
                    await self._close(file)
        finally:
            entry.readers -= 1
            self.filler.reader_left(entry)

    async def _reopen(self, dl: _Download, entry: Entry, pos: int, stop: int) -> Fill | None:
        """A new fill of ``entry`` for a reader midway (the last one ended), admitted like
        any other; refused, the rest of the download comes from the upstream. None: the
        entry is complete now (nothing to fill)."""
        record = dl.record or await self._fill_record(entry, dl.creds)
        wanted = None if dl.whole else ranges.ByteRange(pos, stop, entry.size)
        needed = _bytes_to_fetch(entry, record, wanted)
        try:
            if self.admission is None:
                fill, _ = await self.filler.open(record, dl.creds)
            else:
                async with self.admission(needed) as refused:
                    if refused is not None:
                        raise FillAborted(f"no room to go on caching: {refused}") from (
                            StoreUnavailable(str(refused))
                        )
                    fill, _ = await self.filler.open(record, dl.creds)
        except CachedMeanwhile:
            if entry.complete:
                return None
            raise FillAborted("entry deleted") from None  # and cached anew since: not ours
        if fill.entry is not entry:
            raise FillAborted("entry deleted")  # and re-created since: not ours
        return fill

    async def _widened_midway(self, fill: Fill, dl: _Download, pos: int, stop: int) -> bool:
        """:meth:`_widened` for a reader midway: refused, the rest comes from the upstream."""
        try:
            return await self._widened(
                fill, None if dl.whole else ranges.ByteRange(pos, stop, dl.entry.size)
            )
        except NotAdmitted as exc:
            raise FillAborted(f"no room to go on caching: {exc}") from StoreUnavailable(str(exc))

    def _cache_failed(self, image_id: str, exc: BaseException, cause: BaseException) -> None:
        """A cache-directory error before anything was sent: log it, tell the guard now."""
        log.warning("cache unavailable for %s, passing through: %s", image_id, exc)
        if self.directories is not None:
            self.directories.cache.report(cause)

    async def _without_cache(self, dl: _Download) -> web.StreamResponse:
        """A hit the cache cannot serve after all: from the upstream, unless the caller was
        authorised only by a stale allowance (never a transfer on that)."""
        if dl.outcome is Outcome.STALE_HIT:
            return replies.error(dl.request, 503, _UNAVAILABLE)
        return await self._bypass(dl.request)

    async def _open(self, dl: _Download, fill: Fill | None) -> BinaryIO | bytes | None:
        """The file to send from (a small hit: its bytes). A hit's file is checked against
        its commit record as it is opened, and re-verified first if it changed
        (cached/cachedir/reverify.py); None if it failed."""
        if fill is None and self.integrity is not None:
            small = dl.end - dl.start <= SMALL_HIT
            return await self.integrity.open_hit(dl.entry, (dl.start, dl.end) if small else None)
        # On the cache's own threads: a hung share holds those, not the default executor.
        return await self.store.run(_open_unbuffered, dl.entry.path)

    async def _close(self, file: BinaryIO) -> None:
        """Close on a cache-I/O thread, without waiting for it: nothing depends on it, and a
        hit saves the loop a wake-up."""
        try:
            self.store.io.submit(_close, file)
        except RuntimeError:  # the executor is shut down (the daemon is stopping)
            await asyncio.to_thread(_close, file)

    async def _stream(
        self, dl: _Download, file: BinaryIO | bytes, following: tuple[Fill, int] | None
    ) -> web.StreamResponse:
        entry, request = dl.entry, dl.request
        response = web.StreamResponse(status=200 if dl.whole else 206)
        response.content_type = "application/octet-stream"
        response.content_length = dl.end - dl.start
        if entry.checksum:
            response.headers["Content-MD5"] = entry.checksum  # hex, as Glance sends it
        if dl.wanted is not None:
            response.headers["Content-Range"] = dl.wanted.content_range()
        response.headers["x-openstack-request-id"] = dl.request_id
        response.headers["Cache-Status"] = await self._cache_status(dl.outcome, following)
        if self.safety is not None and dl.outcome in (Outcome.HIT, Outcome.STALE_HIT):
            # An entry without a current verdict is inspected again here, from its file (on
            # the store's threads); one that kept no declaration has its record looked up with
            # the caller's credentials (not on a stale hit: the upstream is down).
            lookup = self._lookup_with(dl.creds) if dl.outcome is Outcome.HIT else None
            verdict = await self.safety.header_for(entry, lookup)
            if verdict is not None:
                response.headers[SAFETY_HEADER] = verdict
        if self.signatures is not None and dl.outcome in (Outcome.HIT, Outcome.STALE_HIT):
            signature = await self.signatures.header_for(
                entry, dl.record, lambda: self._current_record(dl)
            )
            if signature is not None:
                response.headers[SIGNATURE_HEADER] = signature
        try:
            await response.prepare(request)
        except ConnectionError:  # the client left before the headers went out
            return response

        async def ensure_fill(pos: int, stop: int) -> tuple[Fill | None, int]:
            if entry.complete:
                return None, 0
            current = self.filler.fill_of(entry)
            if current is None:
                if entry.removed:
                    raise FillAborted("entry deleted")
                current = await self._reopen(dl, entry, pos, stop)
                if current is None:
                    return None, 0
            else:
                # If it ended while this reader was admitted, it is still the one to follow:
                # send_entry reads how it ended (verified: the held-back last byte goes,
                # failed: the response ends, idle: the next call opens a new fill). Looking
                # for the next fill instead found none of an entry deleted meanwhile, and
                # cut a reader of a verified image.
                await self._widened_midway(current, dl, pos, stop)
            return current, current.demand(pos, stop, whole=dl.whole)

        progress = Progress(dl.start)
        try:
            try:
                if isinstance(file, bytes):  # a small hit, read from the file as checked
                    await _write_small(response, entry, file, dl.end - dl.start)
                else:
                    await send_entry(
                        request,
                        response,
                        entry,
                        file,
                        dl.start,
                        dl.end,
                        lambda: self.filler.fill_of(entry),
                        ensure_fill,
                        progress,
                        following,
                    )
            except FillAborted as exc:
                if not isinstance(exc.__cause__, StoreUnavailable):
                    raise
                # The cache disk failed (full, read-only, I/O error), not the image: a cache
                # problem never costs the client its download.
                log.warning(
                    "cache write failed while %s was sent (%s): the rest comes from the upstream",
                    entry.image_id,
                    exc.__cause__,
                )
                await self._relay(dl, response, progress.pos)
        except (CachedError, ConnectionError, OSError) as exc:
            # Content-Length is out: cutting the connection tells the client it is short.
            log.info("download of %s cut short: %s", entry.image_id, exc)
            if request.transport is not None:
                request.transport.abort()
            return response
        await response.write_eof()
        if dl.outcome in (Outcome.HIT, Outcome.STALE_HIT):
            await self.store.touch(entry, hit=True)
        return response

    async def _cache_status(self, outcome: Outcome, following: tuple[Fill, int] | None) -> str:
        """RFC 9211 §2: a list, the cache nearest the origin first. A download that follows
        a fill fed by a sibling's cache names that cache first."""
        own = outcome.status(self.cache_name)
        if following is None or self.upstream_side is None or outcome is Outcome.HIT:
            return own
        side = await self.upstream_side(following[0])
        return own if side is None else f"{side}, {own}"

    async def _current_record(self, dl: _Download) -> ImageRecord | None:
        """The image's record, for a hit whose signature result must be checked again (with
        the caller's credentials; None if the upstream does not give it now)."""
        if dl.outcome is Outcome.STALE_HIT:
            return None  # the upstream is failing: no more requests for this hit
        try:
            return await self._record(dl.entry.image_id, dl.creds)
        except UpstreamUnavailable:
            return None

    async def _relay(self, dl: _Download, response: web.StreamResponse, pos: int) -> None:
        """Send bytes ``[pos, end)`` of the download straight from the upstream."""
        end = dl.end
        async with self.backend.open_data(dl.entry.image_id, dl.creds, pos, end) as stream:
            while pos < end:
                blocks = await stream.read_blocks(min(_RELAY_PIECE, end - pos))
                if not blocks:
                    raise UpstreamUnavailable(f"upstream ended at {pos} of {end} bytes")
                for block in blocks:
                    await response.write(block)
                    pos += len(memoryview(block))

    async def _bypass(self, request: web.Request, detail: str | None = None) -> web.StreamResponse:
        """A download the cache does not take part in (store unavailable, several ranges,
        an image the admission rule keeps out)."""
        status = Outcome.BYPASS.status(self.cache_name) + (f"; detail={detail}" if detail else "")

        async def mark(response: web.StreamResponse) -> None:
            response.headers["Cache-Status"] = status

        return await self._pass_through(request, mark)

    async def forward(self, request: web.Request) -> web.StreamResponse:
        """Everything else: pass through; a successful change forgets what it invalidates."""
        hook = None
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            # As the upstream routes it, trailing '/' or an unsure version included: only a
            # 2xx answer counts, and a path no route matches never gets one.
            route = routes.routed(request).image
            if route is not None:
                image_id = route.image_id
                deleted = request.method == "DELETE" and not route.rest

                async def hook(response: web.StreamResponse) -> None:
                    if 200 <= response.status < 300:
                        await self.image_changed(image_id, deleted=deleted)

        return await self._pass_through(request, hook)

    async def _pass_through(
        self, request: web.Request, hook: ReplyHook | None
    ) -> web.StreamResponse:
        """Relay ``request`` (``hook`` sees the answer before it goes out); an upstream that
        cannot be reached is cached's 502, unless the client already went away."""
        try:
            return await self.passthrough.answer(request, hook)
        except UpstreamUnavailable as exc:
            if request.transport is None or request.transport.is_closing():
                raise
            return replies.unreachable(request, exc)

    async def versions(self, request: web.Request) -> web.StreamResponse:
        """``GET /`` and ``GET /versions``: the upstream's version document, advertising the
        cache API (v2.14-v2.18, which cached answers itself) with links to the proxy.

        python-glanceclient looks for v2.14 (v2.18 for clean/prune) before every cache call.
        """
        return await self.passthrough.versions(request)

    async def image_changed(self, image_id: str, *, deleted: bool) -> None:
        """The upstream accepted a change of ``image_id`` through this proxy: tell
        ``on_changed`` (the fleet's siblings, in the background), and apply it here
        (:meth:`apply_change`)."""
        for hook in self.on_changed:
            hook(image_id, deleted)
        await self.apply_change(image_id, deleted=deleted)

    async def apply_change(self, image_id: str, *, deleted: bool) -> None:
        """Forget the allowances remembered for ``image_id`` and, when it was ``deleted``,
        drop its copy (also on a sibling's notice, cached/fleet/serve.py)."""
        self.authorizer.forget(image_id)
        if self.signatures is not None:  # signature properties may have changed (PATCH)
            self.signatures.changed(image_id, deleted=deleted)
        if deleted:
            # The upstream has answered: a cache share that hangs must not hold that answer.
            # The drop goes on in the background (the entry is out of the index at once)
            # and ends when the share answers again.
            drop = asyncio.get_running_loop().create_task(self._drop(image_id))
            self._dropping.add(drop)
            drop.add_done_callback(self._dropped)
            guard = self.directories.cache if self.directories is not None else None
            await asyncio.wait({drop}, timeout=guard.probe_timeout if guard else None)

    async def _drop(self, image_id: str) -> None:
        await self.filler.remove(image_id)
        for hook in self.on_deleted:
            await hook(image_id)
        log.info("image %s deleted upstream: dropped its cache entry", image_id)

    def _dropped(self, task: asyncio.Task[None]) -> None:
        self._dropping.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("dropping a deleted image's copy failed", exc_info=task.exception())


def _bytes_to_fetch(
    entry: Entry | None,
    record: ImageRecord,
    wanted: ranges.ByteRange | None,
    *,
    head: bool = False,
) -> int:
    """What a new fill for this download will write: the missing part of the image, or of
    the chunks a range covers (a range reserves its chunks, never the whole image), and the
    first chunk too with ``head`` (refuse mode judges the header before a range goes)."""
    size = record.size or 0
    chunk = entry.chunk_size if entry is not None else chunk_size_for(size)
    if wanted is None:
        return size - (entry.present_bytes() if entry is not None else 0)
    first, last = wanted.start // chunk, (max(wanted.end, wanted.start + 1) - 1) // chunk
    chunks = set(range(first, last + 1)) | ({0} if head else set())
    needed = 0
    for c in sorted(chunks):
        if entry is None or c not in entry.present:
            needed += min(size, (c + 1) * chunk) - c * chunk
    return needed


async def _write_small(response: web.StreamResponse, entry: Entry, data: bytes, count: int) -> None:
    """Send a small hit's bytes (read as its file was opened and checked)."""
    if entry.state is State.INVALID:  # found corrupt since (the scrub)
        raise FillAborted(f"entry {entry.image_id} failed verification")
    if len(data) != count:
        raise FillAborted(f"file shorter than its entry: {len(data)} of {count} bytes")
    await response.write(data)


def _open_unbuffered(path: Path) -> BinaryIO:
    return open(path, "rb", buffering=0)


def _close(file: BinaryIO) -> None:
    try:
        file.close()
    except OSError as exc:  # read-only: nothing was lost
        log.debug("closing %s: %s", getattr(file, "name", file), exc)


def _record_of(entry: Entry) -> ImageRecord:
    """The image record as the entry keeps it (a fill of an entry opened without asking the
    upstream: a resume, a reader midway). Its declared formats are the entry's (entries
    from before they were kept declare none: judged on their content alone); its signature
    properties are not known (``rebuilt``: the first hit verifies the signature)."""
    raw = {
        key: value
        for key, value in (
            ("disk_format", entry.disk_format),
            ("container_format", entry.container_format),
        )
        if value is not None
    }
    return ImageRecord(
        entry.image_id,
        "active",
        entry.size,
        entry.checksum,
        entry.os_hash_algo,
        entry.os_hash_value,
        raw,
        rebuilt=True,
    )


def _refused(
    request: web.Request,
    image_id: str,
    verdict: Verdict,
    request_id: str,
    signature: Check | None = None,
) -> web.Response:
    """refuse: Glance's 403 (webob's page, as ``Accept`` asks) naming the verdict and the
    failed checks, or the signature's result (``signature``: the image is kept out for its
    signature); the verdict in ``Cached-Image-Verdict`` too, the signature's result in
    ``Cached-Image-Signature``. No upstream data."""
    message = f"Image {image_id} is refused by the image cache: {reason(verdict, signature)}."
    response = replies.glance_error(403, message, request_id, request.headers.get("Accept"))
    response.headers[SAFETY_HEADER] = header_value(verdict)
    if signature is not None:
        response.headers[SIGNATURE_HEADER] = signature.result.value
    return response
