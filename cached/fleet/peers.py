"""The client side of the fleet: siblings as byte sources of a fill.

:class:`Fleet` (one per daemon) knows the siblings, signs requests to them and keeps their
health. For each fill the registry asks it for a :class:`FleetSources` (cached/fill/sources.py
``Sources``), which, per transfer, asks the healthy siblings in parallel (signed ``HEAD``)
whether they hold a complete copy, within ``fleet_lookup_timeout``, and takes the first in
the image's rendezvous order (cached/fleet/ring.py: the owner first) that does; else the
first whose running fill is fed by the upstream (``filling; source=upstream``: followed at
the upstream's pace); otherwise the upstream. A fill fed by a copy, or still choosing its
source, says ``source=copy`` and is never followed: a chain of fills ends at the upstream
within two hops and cannot loop (groupcache's A→B→A).
When a transfer from a sibling fails, a member after others in the order may find one of
them still saying ``source=copy`` from that same sibling (its own transfer has not failed
yet): it asks that member again within the lookup timeout, so it follows the upstream-fed
fill that member, first in the order, opens, instead of fetching the rest a second time.

With service credentials (``forwarding``), a first transfer that finds no copy asks the
first member of the image's order to fetch instead (``GET .../fetch``): the whole image for
a driver from the first byte, the covering chunks only for any other transfer (a range
miss), which that member takes from a complete copy or the upstream and never forwards.

A sibling is used only when the fill has the upstream's digest to check its bytes against
(``Fill._finish`` compares it before anything becomes a hit): an image whose record has no
digest is always taken from the upstream.

A sibling's transfer is a :class:`PeerSource`, which hands over (``hands_over``): when it
fails (cannot connect in ``fleet_connect_timeout``, no headers in ``fleet_headers_timeout``,
no byte for ``fleet_stall_timeout``, a complete copy slower than ``fleet_min_copy_rate``
over RATE_WINDOW seconds, 401, 404, 5xx, a 200 to a Range, a wrong range or length, a short
body) the fill asks again without it and resumes at the first byte it did
not deliver, from another sibling or the upstream. The failed sibling is *down*: skipped for
1 s, doubling per failure up to 30 s; the first request after that is the probe that, when
it passes, makes it healthy again. A member asked to fetch the image that answers 404 declines
(no service credentials at the moment, no room, not active upstream: nobody fills for a
sibling then): the fill takes its next source, but that member is not down.

Threads: the event loop only. ``PeerHealth._down`` is changed by lookups and transfers, both
on the loop; ``FleetSources.current`` by its own ``pick``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from ssl import SSLContext

import aiohttp

from cached import metrics
from cached.config import FleetMember
from cached.errors import UpstreamError, UpstreamUnavailable
from cached.fill.machine import Fill, FillState
from cached.fill.sources import ByteSource
from cached.fleet import ring
from cached.fleet.serve import FEEDER, PREFIX, SIZE, STATE
from cached.fleet.trust import Trust
from cached.upstream import Buffer, DataStream
from cached.upstream.glance import GlanceStream

log = logging.getLogger("cached.fleet")

DOWN_INITIAL = 1.0  # seconds a failed sibling is skipped, doubling per failure ...
DOWN_MAX = 30.0  # ... up to this
COMPLETE = "complete"  # what a sibling's HEAD says (cached/fleet/serve.py)
FILLING_FROM_UPSTREAM = "filling; source=upstream"
ABSENT = "absent"
PENDING = "pending"  # a fill choosing its source: "filling; source=pending"
COPY = "copy"  # a fill fed by a sibling's bytes: "filling; source=copy"
AGAIN_AFTER = 0.02  # s before a sibling failing over with this fill is asked again


class PeerHealth:
    """Which siblings are down, and until when (monotonic seconds); the last failure of each
    (for the member's state, cached/fleet/serve.py ``GET state``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._down: dict[str, tuple[float, float]] = {}  # id -> (down until, last back-off)
        self.last_error: dict[str, tuple[float, str]] = {}  # id -> (wall-clock time, why)

    def usable(self, member_id: str) -> bool:
        until, _ = self._down.get(member_id, (0.0, 0.0))
        return self._clock() >= until

    def failed(self, member_id: str, why: object) -> None:
        _, backoff = self._down.get(member_id, (0.0, 0.0))
        backoff = min(DOWN_MAX, backoff * 2 if backoff else DOWN_INITIAL)
        self._down[member_id] = (self._clock() + backoff, backoff)
        metrics.fleet_sibling_failed()
        self.last_error[member_id] = (time.time(), str(why)[:300])
        log.warning("sibling %s is down for %.0fs: %s", member_id, backoff, why)

    def passed(self, member_id: str) -> None:
        if self._down.pop(member_id, None) is not None:
            log.info("sibling %s answers again", member_id)

    def down(self) -> list[str]:
        return sorted(m for m in self._down if not self.usable(m))

    def view(self, member_id: str) -> dict[str, object]:
        """What this member knows of ``member_id``'s health."""
        until, backoff = self._down.get(member_id, (0.0, 0.0))
        at, why = self.last_error.get(member_id, (None, None))
        return {
            "up": self.usable(member_id),
            "down_for": round(max(0.0, until - self._clock()), 3),
            "backoff": backoff,
            "last_error": why,
            "last_error_at": at,
        }


RATE_WINDOW = 5.0  # seconds over which a complete copy's rate is judged
SUSPECTS_MAX = 1024  # (sibling, image) pairs remembered as suspect ...
SUSPECT_FOR = 600.0  # ... for at most this many seconds


@dataclass(frozen=True)
class Timeouts:
    connect: float = 1.0
    headers: float = 5.0
    stall: float = 10.0
    lookup: float = 0.2
    min_copy_rate: float = 50 * (1 << 20)  # bytes/s; 0: a slow copy is not left


@dataclass(frozen=True)
class Holding:
    """A sibling's answer to ``HEAD images/{id}``."""

    state: str  # complete, filling; source=..., absent
    size: int | None
    feeder: str | None = None  # with "filling; source=copy": the sibling it takes bytes from


class Fleet:
    """The siblings of this member: lookups, transfers and their health."""

    def __init__(
        self,
        trust: Trust,
        session: aiohttp.ClientSession,
        timeouts: Timeouts,
        health: PeerHealth | None = None,
        forwarding: bool = False,
    ):
        self.trust = trust
        # Whether a fill that finds no copy asks the image's first member to fetch it: only
        # with service credentials (configured alike on every member), with which a member
        # fetches for a sibling; without, a cold image is fetched with the caller's token.
        self.forwarding = forwarding
        self._session = session
        self.timeouts = timeouts
        self.health = health or PeerHealth()
        self.siblings = {m.id: m for m in trust.members if m.id != trust.self_id}
        # (member, image) -> when (monotonic): that member's bytes of that image failed the
        # digest; the next fill of the image skips it (taken by sources_for). Bounded: at most
        # SUSPECTS_MAX, each for SUSPECT_FOR seconds (the sibling re-verifies meanwhile).
        self._suspects: dict[tuple[str, str], float] = {}
        # Image bytes exchanged with each sibling: received by fills, sent to it.
        self.bytes_from: dict[str, int] = dict.fromkeys(self.siblings, 0)
        self.bytes_to: dict[str, int] = dict.fromkeys(self.siblings, 0)
        self._tasks: set[asyncio.Task[None]] = set()  # fill watchers, suspect notices

    @staticmethod
    def session_for(timeouts: Timeouts, ssl: SSLContext | bool) -> aiohttp.ClientSession:
        """The session siblings are called with: no total time (an image takes what it
        takes), the connect and stall timeouts (headers: per request, ``asyncio.timeout``)."""
        return aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=timeouts.connect, sock_read=timeouts.stall
            ),
            connector=aiohttp.TCPConnector(ssl=ssl),  # verified like the upstream
            auto_decompress=False,
        )

    def sources_for(self, fill: Fill) -> FleetSources:
        """The byte sources of a new fill (the registry's hook, cached/fill/registry.py)."""
        sources = FleetSources(
            self, fill.entry.image_id, fill.entry.size, fill.upstream, fill.digest is not None
        )
        sources.forward = self.forwarding
        self._expire_suspects()
        sources.skip = {m for m, i in self._suspects if i == fill.entry.image_id}
        for m in sources.skip:
            del self._suspects[(m, fill.entry.image_id)]
        sources.watch(fill)
        return sources

    def suspect(self, member_id: str, image_id: str) -> None:
        """``member_id``'s bytes of ``image_id`` failed the digest: the next fill of the image
        skips it, and it is told to re-verify its copy (``POST .../suspect``)."""
        self._expire_suspects()
        self._suspects.pop((member_id, image_id), None)
        while len(self._suspects) >= SUSPECTS_MAX:
            del self._suspects[next(iter(self._suspects))]  # the oldest
        self._suspects[(member_id, image_id)] = time.monotonic()
        task = asyncio.get_running_loop().create_task(self._tell_suspect(member_id, image_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _expire_suspects(self) -> None:
        now = time.monotonic()
        for key in [k for k, at in self._suspects.items() if now - at > SUSPECT_FOR]:
            del self._suspects[key]

    def suspects(self) -> int:
        self._expire_suspects()
        return len(self._suspects)

    async def signed(self, method: str, member_id: str, path: str) -> int:
        """Send a bodiless signed request to ``member_id``; its status (within the headers
        timeout). Raises TimeoutError or aiohttp.ClientError when it does not answer."""
        member = self.siblings[member_id]
        headers = self.trust.sign(method, path, member_id)
        async with asyncio.timeout(self.timeouts.headers):
            async with self._session.request(
                method, member.url + path, headers=headers, allow_redirects=False
            ) as resp:
                await resp.read()
                return resp.status

    async def _tell_suspect(self, member_id: str, image_id: str) -> None:
        member = self.siblings[member_id]
        path = f"{PREFIX}/images/{image_id}/suspect"
        headers = self.trust.sign("POST", path, member_id)
        try:
            async with asyncio.timeout(self.timeouts.headers):
                async with self._session.post(member.url + path, headers=headers) as resp:
                    if resp.status != 202:
                        log.warning("sibling %s answered %d to suspect", member_id, resp.status)
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("cannot tell sibling %s its copy is suspect: %r", member_id, exc)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def holding(self, member_id: str, image_id: str) -> Holding | None:
        """What ``member_id`` says it holds of ``image_id``; None when it did not answer
        properly (it is then down)."""
        member = self.siblings[member_id]
        path = f"{PREFIX}/images/{image_id}"
        headers = self.trust.sign("HEAD", path, member_id)
        try:
            async with asyncio.timeout(self.timeouts.headers):
                async with self._session.head(
                    member.url + path, headers=headers, allow_redirects=False
                ) as resp:
                    if resp.status != 200:
                        raise UpstreamUnavailable(f"HEAD answered {resp.status}")
                    size = resp.headers.get(SIZE)
                    answer = Holding(
                        resp.headers.get(STATE, "absent"),
                        int(size) if size and size.isdigit() else None,
                        resp.headers.get(FEEDER),
                    )
        except (TimeoutError, aiohttp.ClientError, UpstreamUnavailable) as exc:
            self.health.failed(member_id, f"HEAD {image_id}: {exc!r}")
            return None
        self.health.passed(member_id)
        return answer

    async def lookup(
        self,
        image_id: str,
        size: int,
        skip: set[str],
        forward: bool = False,
        follow: bool = True,
    ) -> PeerSource | None:
        """The first sibling in ``image_id``'s order (the owner first) that holds a complete
        copy of ``size`` bytes, else the first whose fill is fed by the upstream, asked in
        parallel within the lookup timeout; None if none. Stops early once every sibling
        before a complete one has answered, or once the first usable member of the order,
        if it comes before this one, answered what decides (see ``lead``)."""
        ranked = ring.order([*self.siblings, self.trust.self_id], image_id)
        candidates = [
            m for m in ranked if m in self.siblings and m not in skip and self.health.usable(m)
        ]
        if not candidates:
            return None
        tasks = {m: asyncio.create_task(self.holding(m, image_id)) for m in candidates}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeouts.lookup
        ahead = set(ranked[: ranked.index(self.trust.self_id)])

        def failing_over(m: str) -> bool:
            """``m``, before this member in the order, still takes its bytes from a sibling
            this fill just left (or finds down): its fill fails over too, and, being before
            this member, takes the upstream, which this fill then follows. Asked again."""
            task = tasks[m]
            if m not in ahead or not task.done() or task.cancelled():
                return False
            held = task.result()
            feeder = None if held is None else held.feeder
            return (
                held is not None
                and held.state == f"filling; source={COPY}"
                and feeder is not None
                and (feeder in skip or not self.health.usable(feeder))
            )

        def answered(m: str) -> bool:
            task = tasks.get(m)
            if task is None or not task.done() or task.cancelled():
                return False
            return task.result() is not None

        def answer(m: str, state: str) -> bool:
            task = tasks[m]
            if not task.done() or task.cancelled():
                return False
            held = task.result()
            if held is None or held.state != state:
                return False
            return state == ABSENT or held.size == size

        # The first usable member of the order, when it comes before this one (the owner or
        # its stand-in): its answer decides; later siblings are not waited for (each waits
        # for the choice of those before it, so waiting for all makes a burst of cold
        # misses a chain, one lookup per member). What it says that decides: a copy or a
        # fill of its own from the upstream; with ``forward``, that it has neither (it is
        # asked to fetch). One following another sibling's copy decides nothing.
        lead = candidates[0] if ranked.index(candidates[0]) < len(ahead) else None
        decisive: tuple[str, ...] = (COMPLETE, FILLING_FROM_UPSTREAM)
        if forward:
            decisive += (ABSENT, f"filling; source={PENDING}")
        try:
            while True:
                for m in candidates:
                    if failing_over(m) and deadline - loop.time() > AGAIN_AFTER:
                        tasks[m] = asyncio.create_task(self._holding_again(m, image_id))
                if lead is not None and any(answer(lead, state) for state in decisive):
                    break
                for m in candidates:
                    if answer(m, COMPLETE):
                        return self.source(m, size)
                    if not tasks[m].done():
                        break  # one before the rest may still say complete
                else:
                    break  # every sibling answered
                pending = [t for t in tasks.values() if not t.done()]
                left = deadline - loop.time()
                if left <= 0:
                    break
                await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            # The best of those that answered: a complete copy, else a fill fed by the
            # upstream (never one fed by a copy: chains end at the upstream, no loop forms).
            for state in (COMPLETE, FILLING_FROM_UPSTREAM) if follow else (COMPLETE,):
                for m in candidates:
                    if answer(m, state):
                        return self.source(m, size, following=state != COMPLETE)
            if not forward:
                return None
            # Nobody holds or fills it: the first member of the order that answered is asked
            # to fetch it, unless that is this member (or it fills from a copy). One still
            # choosing (pending) is asked too: it answers once it chose (the first member
            # of its own order, it takes the upstream). A range (``follow`` False) is asked
            # of it whatever its fill: it adds a range transfer for the covering chunks,
            # which takes a complete copy or the upstream, never a sibling's fill or fetch.
            first = next(m for m in ranked if m == self.trust.self_id or answered(m))
            if first == self.trust.self_id:
                return None
            wanted = (ABSENT, f"filling; source={PENDING}")
            if follow and not any(answer(first, state) for state in wanted):
                return None
            return self.source(first, size, following=True, fetch=True)
        finally:
            for task in tasks.values():
                task.cancel()

    async def _holding_again(self, member_id: str, image_id: str) -> Holding | None:
        await asyncio.sleep(AGAIN_AFTER)
        return await self.holding(member_id, image_id)

    def source(
        self, member_id: str, size: int, following: bool = False, fetch: bool = False
    ) -> PeerSource:
        return PeerSource(self, self.siblings[member_id], size, following, fetch)


class PeerSource:
    """A sibling's complete copy as a byte source (cached/fill/sources.py ``ByteSource``)."""

    hands_over = True

    def __init__(
        self,
        fleet: Fleet,
        member: FleetMember,
        size: int,
        following: bool = False,
        fetch: bool = False,
    ):
        self._fleet = fleet
        self.member = member
        self._size = size
        self.following = following  # a running fill of the sibling's, not a complete copy
        self.fetch = fetch  # the sibling is asked to fetch the image from the upstream
        self.name = f"sibling {member.id}"

    @asynccontextmanager
    async def open(self, image_id: str, start: int, end: int | None) -> AsyncIterator[DataStream]:
        fleet, member = self._fleet, self.member
        stop = self._size if end is None else end
        path = f"{PREFIX}/images/{image_id}" + ("/fetch" if self.fetch else "")
        range_ = f"bytes={start}-{stop - 1}"
        headers = {"Range": range_, **fleet.trust.sign("GET", path, member.id, range_)}
        try:
            try:
                async with asyncio.timeout(fleet.timeouts.headers):
                    resp = await fleet._session.get(
                        member.url + path, headers=headers, allow_redirects=False
                    )
            except (TimeoutError, aiohttp.ClientError) as exc:
                raise UpstreamUnavailable(f"{self.name}: {exc!r}") from exc
            try:
                expected = f"bytes {start}-{stop - 1}/{self._size}"
                if resp.status == 404 and self.fetch:
                    raise _Declined(f"{self.name} does not fetch it (404)")
                if resp.status != 206:
                    raise UpstreamUnavailable(f"{self.name} answered {resp.status} to a Range")
                if resp.headers.get("Content-Range") != expected:
                    raise UpstreamUnavailable(
                        f"{self.name} sent {resp.headers.get('Content-Range')!r}, not {expected!r}"
                    )
                floor = 0.0 if self.following else fleet.timeouts.min_copy_rate
                counted = _Counted(GlanceStream(resp, start), self.name, floor)
                try:
                    yield counted
                finally:
                    fleet.bytes_from[member.id] = fleet.bytes_from.get(member.id, 0) + counted.total
            finally:
                resp.close()
        except _Declined:
            raise  # it answered as it should: not down
        except (UpstreamError, UpstreamUnavailable) as exc:
            fleet.health.failed(member.id, exc)
            raise
        fleet.health.passed(member.id)


class _Declined(UpstreamUnavailable):
    """A member asked to fetch an image answered that it does not (404)."""


class _Counted:
    """A sibling's stream, its bytes counted as peer bytes (never as upstream bytes); one
    slower than ``floor`` bytes/s over RATE_WINDOW seconds fails (a complete copy should
    come at disk and network speed; 0: never judged)."""

    def __init__(self, stream: GlanceStream, name: str, floor: float):
        self._stream = stream
        self.start = stream.start
        self._name = name
        self._floor = floor
        self._since = time.monotonic()
        self._got = 0  # bytes since _since
        self.total = 0  # bytes read

    async def read(self, n: int) -> bytes:
        return b"".join(await self.read_blocks(n))

    async def read_blocks(self, n: int) -> list[Buffer]:
        blocks = await self._stream.read_blocks(n)
        got = sum(len(memoryview(b)) for b in blocks)
        metrics.fleet_bytes("received", got)
        self.total += got
        if self._floor:
            self._got += got
            elapsed = time.monotonic() - self._since
            if elapsed >= RATE_WINDOW:
                rate = self._got / elapsed
                if rate < self._floor:
                    raise UpstreamUnavailable(
                        f"{self._name} sends {rate / (1 << 20):.1f} MiB/s, below "
                        f"fleet_min_copy_rate ({self._floor / (1 << 20):.0f} MiB/s)"
                    )
                self._since, self._got = time.monotonic(), 0
        return blocks


class FleetSources:
    """One fill's sources: a sibling's complete copy when one answers, else the upstream."""

    def __init__(
        self, fleet: Fleet, image_id: str, size: int, upstream: ByteSource, checkable: bool
    ):
        self._fleet = fleet
        self._image_id = image_id
        self._size = size
        self._upstream = upstream
        # Only with the upstream's digest to check them are a sibling's bytes ever taken.
        self._checkable = checkable
        # What HEAD tells siblings: "upstream" once a transfer takes the upstream; "copy"
        # while one takes a sibling's bytes; "pending" while the source is being chosen
        # (never followed by a lookup, so two fills looking at once never follow each
        # other; a sibling asking this member to fetch waits for the choice: ``settled``).
        self.current = PENDING
        self._decided = asyncio.Event()
        self.skip: set[str] = set()  # siblings this fill never takes (suspect copies)
        # Whether a first transfer that finds no copy asks the image's first member to
        # fetch it; False for a fill opened for a sibling (it never forwards).
        self.forward = True
        self.used: set[str] = set()  # siblings it took bytes from
        self.feeder: str | None = None  # the sibling the source chosen last is (None: upstream)
        # The sibling's RFC 9211 Cache-Status member for the source chosen last (None: the
        # upstream): what a client's Cache-Status names before this member's own.
        self.via: str | None = None

    def watch(self, fill: Fill) -> None:
        """When ``fill`` ends invalid (the digest did not match), the siblings it took bytes
        from are suspect (:meth:`Fleet.suspect`)."""

        async def watcher() -> None:
            await fill.closed.wait()
            if fill.state is FillState.INVALID:
                for member_id in sorted(self.used):
                    log.warning(
                        "%s failed its digest with bytes from sibling %s: suspect",
                        self._image_id,
                        member_id,
                    )
                    self._fleet.suspect(member_id, self._image_id)

        task = asyncio.get_running_loop().create_task(watcher())
        self._fleet._tasks.add(task)
        task.add_done_callback(self._fleet._tasks.discard)

    async def settled(self, within: float) -> str:
        """:attr:`current` once the source is chosen (waiting at most ``within`` s)."""
        if self.current == PENDING:
            try:
                async with asyncio.timeout(within):
                    await self._decided.wait()
            except TimeoutError:
                pass
        return self.current

    def _decide(self, current: str) -> None:
        self.current = current
        self._decided.set()

    async def pick(self, start: int, end: int, failed: Sequence[ByteSource]) -> ByteSource | None:
        if self._checkable and self._size > 0:
            self.current = PENDING
            self._decided.clear()
            skip = self.skip | {s.member.id for s in failed if isinstance(s, PeerSource)}
            # A running fill is followed, and a member asked to fetch, only by a transfer that
            # runs to the image's end (a driver): a range far ahead of a sibling's driver
            # would wait for it; ranges take complete copies or the upstream.
            to_the_end = end == self._size
            # With no copy to take, the first transfer of a whole image asks the image's
            # first member to fetch it all; any other asks it for the chunks it covers only
            # (fetched alone from the upstream when that member neither holds nor fills it).
            forward = self.forward and not failed
            sibling = await self._fleet.lookup(
                self._image_id, self._size, skip, forward, follow=to_the_end
            )
            if sibling is not None:
                log.info("%s [%d, %d) from %s", self._image_id, start, end, sibling.name)
                metrics.fleet_transfer("fill" if sibling.following else "copy")
                if sibling.fetch:
                    log.info("%s: %s fetches it (first of its order)", self._image_id, sibling.name)
                if not sibling.following:
                    how = "hit"  # its complete copy
                elif sibling.fetch:
                    how = "fwd=uri-miss; stored"  # it fills for this member
                else:
                    how = "fwd=uri-miss; collapsed"  # its fill, fed by the upstream
                self.via = f"{cache_name(sibling.member.id)}; {how}"
                self.feeder = sibling.member.id
                self._decide(COPY)
                self.used.add(sibling.member.id)
                return sibling
        if self._upstream in failed:
            self.feeder = None
            self._decide(COPY)  # (the fill fails: nobody is to follow it)
            return None
        metrics.fleet_transfer("upstream")
        self.via = self.feeder = None
        self._decide("upstream")
        return self._upstream


def cache_name(member_id: str) -> str:
    """A member's name in Cache-Status (RFC 9211 §2): ``cached-<id>``."""
    return f"cached-{member_id}"


async def upstream_side(fill: Fill, within: float) -> str | None:
    """The Cache-Status member of the sibling ``fill`` takes its bytes from (once it chose
    its source, waiting at most ``within`` s), e.g. ``cached-ctl-1; hit``; None: the
    upstream (or still choosing)."""
    sources = fill.sources
    if not isinstance(sources, FleetSources):
        return None
    if await sources.settled(within) != COPY:
        return None
    return sources.via


async def settled_source(fill: Fill, within: float) -> str:
    """:func:`fill_source` once ``fill`` chose its source (waiting at most ``within`` s)."""
    sources = fill.sources
    if isinstance(sources, FleetSources):
        return await sources.settled(within)
    return "upstream"


def fill_feeder(fill: Fill) -> str | None:
    """The sibling ``fill`` takes its bytes from now (None: the upstream, or choosing)."""
    sources = fill.sources
    if isinstance(sources, FleetSources) and sources.current == COPY:
        return sources.feeder
    return None


def fill_source(fill: Fill) -> str:
    """Where ``fill`` takes its bytes now, as ``HEAD`` tells siblings: upstream, copy or
    pending (choosing)."""
    sources = fill.sources
    return sources.current if isinstance(sources, FleetSources) else "upstream"
