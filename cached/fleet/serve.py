"""What a member answers its siblings: the ``/cached-peer/v1/`` routes.

- ``HEAD images/{id}``: whether this member holds the image, in ``X-Cached-Peer-State``:
  ``complete`` (a verified copy; ``X-Cached-Peer-Size`` gives its size), ``filling;
  source=upstream|copy|pending`` (a fill is running, fed by the upstream or a sibling's
  copy, or still choosing: a sibling after this member in the image's order is answered
  once it chose, within half the lookup timeout) or ``absent``.
- ``GET images/{id}``: the bytes of a complete copy (``Range`` honoured: ``206``), sent by
  the reader (cached/download/reader.py ``send_entry``) from the checked file, or of a
  running fill fed by the upstream (followed as a client's reader follows it; the last byte
  of the image only once its digest matched). A fill of ranges only, asked for the whole
  image, is widened for the sibling as ``fetch`` would (with service credentials).
- ``GET images/{id}/fetch``: the same, and when this member neither holds nor fills the image
  (the caller found no copy and this member heads the image's order), a member with service
  credentials opens a fill from the upstream for it (or a complete copy), admitted like a
  prefetch, never asking another member to fetch, and serves that. With a ``Range`` other
  than the whole image (a sibling's range miss) it fetches only the chunks covering it: a
  range transfer added to its own fill (opened if none runs), which takes a complete copy
  or the upstream, and serves the range as it arrives.
- Otherwise ``404``; ``503`` at once when the cache directory is not ok
  (``read_only`` still serves complete copies), new fills are refused, or
  ``fleet_max_peer_streams`` streams are running (then with ``Retry-After``).
- ``POST images/{id}/suspect``: a sibling's fill with bytes from here failed the upstream's
  digest: the copy is re-verified in the background (``202``).
- ``DELETE images/{id}``: the image was deleted through a sibling (the upstream accepted
  it): this member drops its copy, queue entry and remembered allowances, as it does for a
  delete relayed through itself (``204``; cached/fleet/notices.py sends these).
- ``POST images/{id}/forget``: the image changed through a sibling (``PATCH``,
  deactivation, members): this member forgets the authorisation answers it remembers for
  it, so the next download re-checks with the upstream; the copy stays (``204``).
- ``GET health``: this member's id, list digest and cache state.
- ``GET state``: this member's view of the fleet (cached/fleet/state.py): id, list
  digest, cache directory, the siblings' health as it sees them, counts.

Every request must be signed for this member (cached/fleet/trust.py): unsigned, badly
signed, stale or misdirected requests get a bare ``401`` before anything is looked up, so
they learn nothing. The routes are registered before the catch-all (never relayed to the
upstream) and are exempt from the ``policy`` file's routes (cached/app.py).

Threads: the event loop only. ``PeerService._streams`` (the running streams) is changed by
the GET handler alone; the entries it reads are the store's (``readers`` counted like any
reader's, so prune and delete skip them).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import BinaryIO

from aiohttp import web

from cached import metrics
from cached.cachedir.directories import Directories
from cached.cachedir.reverify import Integrity
from cached.download.reader import Progress, send_entry
from cached.edge import ranges
from cached.errors import CachedError, FillAborted
from cached.fill.machine import Fill
from cached.fill.registry import Filler
from cached.fleet import ring
from cached.fleet import trust as signing
from cached.ids import is_image_id
from cached.store import Entry, State, Store

log = logging.getLogger("cached.fleet")

PREFIX = "/cached-peer/v1"
STATE = "X-Cached-Peer-State"
SIZE = "X-Cached-Peer-Size"
# With "filling; source=copy": the sibling whose bytes the fill takes. A member whose own
# transfer from that sibling just failed asks again: the fill is failing over too.
FEEDER = "X-Cached-Peer-From"
RETRY_AFTER = "1"  # seconds a sibling waits after a 503 (it takes another source meanwhile)
ROUTE_PREFIX = "peer-"  # the names of these routes (cached/app.py exempts them from policy)


class PeerService:
    """The handlers of the peer routes, bound to this member's store and fills."""

    def __init__(
        self,
        trust: signing.Trust,
        store: Store,
        filler: Filler,
        directories: Directories,
        integrity: Integrity,
        max_streams: int,
        fill_source: Callable[[Fill], str],
        open_for_sibling: Callable[[str, tuple[int, int] | None], Awaitable[Fill | None]]
        | None = None,
        settled_source: Callable[[Fill], Awaitable[str]] | None = None,
        deleted: Callable[[str], Awaitable[None]] | None = None,
        changed: Callable[[str], None] | None = None,
        head_wait: float = 0.0,
        fill_feeder: Callable[[Fill], str | None] = lambda _fill: None,
    ):
        self.trust = trust
        self._store = store
        self._filler = filler
        self._directories = directories
        self._integrity = integrity
        self._max_streams = max_streams
        self._fill_source = fill_source  # "upstream" or "copy": where a fill takes its bytes
        self._fill_feeder = fill_feeder  # the sibling a fill fed by a copy takes them from
        # Opens a fill of an image this member neither holds nor fills, for a sibling that
        # asks it as the image's first healthy member (cached/app.py: the upstream's record
        # and bytes with the service credentials, admitted like a prefetch); None: never.
        self._open_for_sibling = open_for_sibling
        # The source of a fill still choosing it, once chosen (bounded wait); for a sibling
        # asking this member to fetch while its own fill of the image is choosing.
        self._settled_source = settled_source
        # What a sibling's notice does here (cached/app.py: the proxy's own drop and forget,
        # never told on to the siblings again).
        self._deleted = deleted
        self._changed = changed
        # This member's view of the fleet (GET state; cached/fleet/state.py); set by app.
        self.view: Callable[[], dict[str, object]] = lambda: {"id": trust.self_id}
        self.bytes_to: dict[str, int] = {}  # image bytes sent to each sibling
        # How long HEAD waits for a fill choosing its source to choose (for a sibling after
        # this member in the image's order): well within the sibling's lookup timeout, so
        # that a slow choice still answers "pending" in time (the sibling then asks to fetch).
        self._head_wait = head_wait
        self._streams = 0
        self._disagreeing: set[str] = set()  # senders whose member list differs (logged once)
        self._checks: set[asyncio.Task[None]] = set()  # re-verifications siblings asked for
        # Fills opened for siblings: followed whatever their source (they never follow a
        # fill fed by a copy themselves: see FleetSources.fetching).
        self._fetching: weakref.WeakSet[Fill] = weakref.WeakSet()

    # ------------------------------------------------------------------ trust
    def _refused(self, request: web.Request) -> web.Response | None:
        """401 for a request not signed for this member by a sibling; None if it is."""
        try:
            sender = self.trust.verify(request.method, request.rel_url.raw_path, request.headers)
        except signing.Refused as exc:
            log.info("peer request %s %s refused: %s", request.method, request.path, exc)
            metrics.fleet_request("refused")
            return web.Response(status=401)
        theirs = request.headers.get(signing.LIST, "")
        if theirs != self.trust.digest:
            metrics.fleet_list_mismatch()
        if theirs != self.trust.digest and sender not in self._disagreeing:
            self._disagreeing.add(sender)
            log.warning(
                "member %s has another fleet_members list (digest %s, ours %s): ownership "
                "differs until the lists agree",
                sender,
                theirs[:16] or "none",
                self.trust.digest,
            )
        return None

    def _image_of(self, request: web.Request) -> str | web.Response:
        """The image id of a request signed for this member by a sibling, else its answer:
        401 (not signed for this member, before anything is looked up), 400 (a bad id)."""
        if (refused := self._refused(request)) is not None:
            return refused
        image_id = request.match_info["image_id"]
        return image_id if is_image_id(image_id) else _answer("bad", 400)

    # ------------------------------------------------------------------ routes
    async def health(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._refused(request)) is not None:
            return refused
        metrics.fleet_request("state")
        return web.json_response(
            {
                "id": self.trust.self_id,
                "list": self.trust.digest,
                "cache": self._directories.cache.state.value,
            }
        )

    async def state(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._refused(request)) is not None:
            return refused
        metrics.fleet_request("state")
        return web.json_response(self.view())

    @property
    def streams(self) -> int:
        """Peer streams running now."""
        return self._streams

    async def delete_image(self, request: web.Request) -> web.StreamResponse:
        """The image was deleted through a sibling: drop everything held of it here."""
        image_id = self._image_of(request)
        if isinstance(image_id, web.Response):
            return image_id  # 401 or 400
        if self._deleted is None:
            return _answer("bad", 404)
        log.info(
            "image %s deleted through sibling %s: dropping it here",
            image_id,
            request.headers.get(signing.SENDER),
        )
        await self._deleted(image_id)
        return _answer("deleted", 204)

    async def forget(self, request: web.Request) -> web.StreamResponse:
        """The image changed through a sibling: forget the allowances remembered for it."""
        image_id = self._image_of(request)
        if isinstance(image_id, web.Response):
            return image_id  # 401 or 400
        if self._changed is None:
            return _answer("bad", 404)
        log.info(
            "image %s changed through sibling %s: its allowances are forgotten here",
            image_id,
            request.headers.get(signing.SENDER),
        )
        self._changed(image_id)
        return _answer("forgotten", 204)

    async def head_image(self, request: web.Request) -> web.StreamResponse:
        image_id = self._image_of(request)
        if isinstance(image_id, web.Response):
            return image_id  # 401 or 400
        entry = self._store.get(image_id)
        if self._directories.cache_bypass(entry) is not None:
            return _answer("unavailable", 503, {"Retry-After": RETRY_AFTER})
        metrics.fleet_request("state")
        headers = {STATE: "absent"}
        if _complete(entry):
            assert entry is not None
            headers = {STATE: "complete", SIZE: str(entry.size)}
        elif (fill := self._filler.active(image_id)) is not None:
            # (A verifying fill too: answered "absent", a sibling following its bytes took
            # the upstream for a second copy in the moments the digest was compared.)
            source = self._fill_source(fill)
            if source == "pending" and self._settled_source is not None and self._head_wait:
                if self._ahead_of(request.headers.get(signing.SENDER, ""), image_id):
                    try:
                        async with asyncio.timeout(self._head_wait):
                            source = await self._settled_source(fill)
                    except TimeoutError:
                        pass  # still choosing: "pending"
            headers = {STATE: f"filling; source={source}", SIZE: str(fill.entry.size)}
            if source == "copy" and (feeder := self._fill_feeder(fill)) is not None:
                headers[FEEDER] = feeder
        return web.Response(status=200, headers=headers)

    def _ahead_of(self, sender: str, image_id: str) -> bool:
        """Whether this member comes before ``sender`` in ``image_id``'s order.

        A fill still choosing its source answers a sibling after it in the order once it
        chose (within ``head_wait``), and one before it at once: two members whose fills
        choose at the same moment (the owner they both followed was killed) then do not
        both take the upstream; the later follows the earlier's upstream-fed fill. No wait
        cycle forms: a member waits only on members before it, and they answer it at once.
        """
        order = ring.order([m.id for m in self.trust.members], image_id)
        return sender in order and order.index(self.trust.self_id) < order.index(sender)

    async def suspect(self, request: web.Request) -> web.StreamResponse:
        """A sibling's fill with this member's bytes failed the upstream's digest: re-verify
        the copy (cached/cachedir/reverify.py; a bad one leaves the index). 202 at once."""
        image_id = self._image_of(request)
        if isinstance(image_id, web.Response):
            return image_id  # 401 or 400
        entry = self._store.get(image_id)
        if _complete(entry):
            assert entry is not None
            integrity = self._integrity
            log.warning("a sibling found %s corrupt after a copy from here: re-verifying", image_id)

            async def check() -> None:
                good = await integrity.verify(entry)
                log.warning("re-verified %s: %s", image_id, "good" if good else "corrupt, dropped")

            task = asyncio.get_running_loop().create_task(check())
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)
        return _answer("suspect", 202)

    async def other(self, request: web.Request) -> web.StreamResponse:
        """A path or method under the prefix that this version does not answer."""
        if (refused := self._refused(request)) is not None:
            return refused
        return _answer("bad", 404)

    async def close(self) -> None:
        for task in list(self._checks):
            task.cancel()
        await asyncio.gather(*self._checks, return_exceptions=True)

    async def get_image(self, request: web.Request) -> web.StreamResponse:
        image_id = self._image_of(request)
        if isinstance(image_id, web.Response):
            return image_id  # 401 or 400
        entry = self._store.get(image_id)
        if self._streams >= self._max_streams:
            return _answer("busy", 503, {"Retry-After": RETRY_AFTER})
        if self._directories.cache_bypass(entry) is not None or self._filler.passing_through():
            return _answer("unavailable", 503, {"Retry-After": RETRY_AFTER})
        fill = None
        if entry is None or not _complete(entry):
            # A running fill fed by the upstream, whose driver fetches every byte, is
            # followed (a sibling's fill runs at the upstream's pace); nothing else is: a
            # fill fed by a copy is never followed, so no chain of fills loops.
            fill = self._filler.active(image_id)  # (verifying: every byte is there)
            fetch = request.match_info.get("fetch") == "/fetch"
            span = _span(request.headers.get("Range")) if fetch else None
            known = fill.entry.size if fill is not None else entry.size if entry else None
            if span is not None and (
                (known is not None and span == (0, max(span[1], known)))
                or self._open_for_sibling is None
            ):
                span = None  # the whole image (what a driver asks for), or nobody fetches
            if span is not None and self._open_for_sibling is not None:
                # A sibling's range miss: the covering chunks only, added to this member's
                # fill (a range transfer: a complete copy or the upstream, never forwarded).
                fill = await self._open_for(image_id, span)
                if fill is None:
                    return _answer("absent", 404)
            elif self._open_for_sibling is not None and (
                (fill is None and fetch)
                or (fill is not None and fill.widening(0, fill.entry.size, whole=True) != 0)
            ):
                # Nothing fetches the whole image here (no fill, or a fill of ranges only,
                # which HEAD shows as filling): this member fetches it for the sibling.
                fill = await self._open_for(image_id, None)
            source = self._fill_source(fill) if fill is not None else "none"
            ours = fill is not None and fill in self._fetching  # opened or widened for siblings
            if fill is not None and source == "pending" and fetch and self._settled_source:
                if not ours:  # (one opened for siblings is theirs whatever it chooses)
                    source = await self._settled_source(fill)
            if fill is None or (source != "upstream" and not ours):
                return _answer("absent", 404)
            if span is not None and span == (0, max(span[1], fill.entry.size)):
                span = None  # (its size learnt from the record: opened for the whole image)
            if span is None and fill.widening(0, fill.entry.size, whole=True) != 0:
                return _answer("absent", 404)  # a range fill: not every byte will come
            entry = fill.entry
        try:
            wanted = ranges.parse(request.headers.get("Range"), entry.size)
        except (ranges.MalformedRange, ranges.MultipleRanges):
            return _answer("bad", 400)
        except ranges.RangeNotSatisfiable:
            return _answer("bad", 416, {"Content-Range": f"bytes */{entry.size}"})
        self._streams += 1
        entry.readers += 1  # before any await: prune and delete skip entries in use
        try:
            return await self._send(request, entry, wanted, fill)
        finally:
            entry.readers -= 1
            self._filler.reader_left(entry)
            self._streams -= 1

    async def _open_for(self, image_id: str, span: tuple[int, int] | None) -> Fill | None:
        """This member's fill of ``image_id`` (opened if none runs) fetching bytes ``span``
        (None: all) for a sibling; None when it cannot (no credentials, no room, refused)."""
        assert self._open_for_sibling is not None
        try:
            fill = await self._open_for_sibling(image_id, span)
        except CachedError as exc:
            log.warning("cannot fetch %s for a sibling: %s", image_id, exc)
            return None
        if fill is not None:
            self._fetching.add(fill)
        return fill

    async def _send(
        self,
        request: web.Request,
        entry: Entry,
        wanted: ranges.ByteRange | None,
        fill: Fill | None,
    ) -> web.StreamResponse:
        try:
            if fill is None:  # a hit's file, checked as it is opened (reverify.py)
                opened = await self._integrity.open_hit(entry)
            else:  # the file a fill writes (as the proxy's readers of a fill open it)
                opened = await self._store.run(open, entry.path, "rb", 0)
        except OSError:  # evicted meanwhile, or the directory failed: nothing sent yet
            return _answer("absent", 404)
        if opened is None or isinstance(opened, bytes):  # failed re-verification
            return _answer("absent", 404)
        metrics.fleet_request("served")
        file: BinaryIO = opened
        try:
            start, end = (wanted.start, wanted.end) if wanted else (0, entry.size)
            response = web.StreamResponse(status=206 if wanted else 200)
            response.content_type = "application/octet-stream"
            response.content_length = end - start
            if wanted is not None:
                response.headers["Content-Range"] = wanted.content_range()
            await response.prepare(request)

            def fill_of_entry() -> Fill | None:
                return self._filler.fill_of(entry)

            async def no_new_fill(pos: int, stop: int) -> tuple[Fill | None, int]:
                # A sibling never makes this member fetch: the fill it follows, or nothing.
                # (Mark 0: any range lost by that fill cuts this stream; the sibling then
                # takes its next source.)
                current = fill_of_entry()
                if current is None and not entry.complete:
                    raise FillAborted(f"the fill of {entry.image_id} ended")
                return current, 0

            following = (fill, 0) if fill is not None else None
            progress = Progress(start)
            try:
                await send_entry(
                    request,
                    response,
                    entry,
                    file,
                    start,
                    end,
                    fill_of_entry,
                    no_new_fill,
                    progress,
                    following,
                )
            except (CachedError, ConnectionError, OSError) as exc:
                # Content-Length is out: cutting the connection tells the sibling it is short.
                log.info("peer stream of %s to %s cut: %s", entry.image_id, request.remote, exc)
                if request.transport is not None:
                    request.transport.abort()
                return response
            finally:
                metrics.fleet_bytes("sent", progress.pos - start)
                sender = request.headers.get(signing.SENDER, "")
                self.bytes_to[sender] = self.bytes_to.get(sender, 0) + progress.pos - start
            await response.write_eof()
            return response
        finally:
            await self._store.run(file.close)


def _answer(outcome: str, status: int, headers: dict[str, str] | None = None) -> web.Response:
    """A bodiless answer, counted by ``outcome`` (cached/metrics.py FLEET_OUTCOMES)."""
    metrics.fleet_request(outcome)
    return web.Response(status=status, headers=headers)


def _span(header: str | None) -> tuple[int, int] | None:
    """Bytes ``[start, end)`` of a sibling's ``Range: bytes=first-last`` (the only form
    siblings send, cached/fleet/peers.py ``PeerSource``); None without one or another form
    (then checked against the image's size as any Range is)."""
    if header is None:
        return None
    try:
        wanted = ranges.parse(header, 1 << 62)
    except (ranges.MalformedRange, ranges.MultipleRanges, ranges.RangeNotSatisfiable):
        return None
    if wanted is None or wanted.end >= 1 << 62:
        return None
    return wanted.start, wanted.end


def _complete(entry: Entry | None) -> bool:
    return entry is not None and entry.complete and entry.state is not State.INVALID


def add_routes(app: web.Application, service: Callable[[], PeerService]) -> None:
    """Register the peer routes (before the catch-all); ``service`` gives the handlers'
    :class:`PeerService` once the application's resources are built."""

    async def health(request: web.Request) -> web.StreamResponse:
        return await service().health(request)

    async def head_image(request: web.Request) -> web.StreamResponse:
        return await service().head_image(request)

    async def get_image(request: web.Request) -> web.StreamResponse:
        return await service().get_image(request)

    async def suspect(request: web.Request) -> web.StreamResponse:
        return await service().suspect(request)

    async def other(request: web.Request) -> web.StreamResponse:
        return await service().other(request)

    async def state(request: web.Request) -> web.StreamResponse:
        return await service().state(request)

    async def delete_image(request: web.Request) -> web.StreamResponse:
        return await service().delete_image(request)

    async def forget(request: web.Request) -> web.StreamResponse:
        return await service().forget(request)

    images = PREFIX + "/images/{image_id}"
    app.router.add_route("HEAD", images, head_image, name=ROUTE_PREFIX + "head")
    app.router.add_get(
        images + "{fetch:(/fetch)?}", get_image, allow_head=False, name=ROUTE_PREFIX + "get"
    )
    app.router.add_post(images + "/suspect", suspect, name=ROUTE_PREFIX + "suspect")
    app.router.add_delete(images, delete_image, name=ROUTE_PREFIX + "delete")
    app.router.add_post(images + "/forget", forget, name=ROUTE_PREFIX + "forget")
    app.router.add_get(PREFIX + "/state", state, allow_head=False, name=ROUTE_PREFIX + "state")
    app.router.add_get(PREFIX + "/health", health, allow_head=False, name=ROUTE_PREFIX + "health")
    # Anything else under the prefix is answered here too (never relayed to the upstream).
    app.router.add_route("*", PREFIX + "/{tail:.*}", other, name=ROUTE_PREFIX + "other")
