"""Limits on client connections: header-read, keep-alive and body-inactivity timeouts and a
cap on connections per client address.

aiohttp's server closes an idle connection only after its keep-alive timeout (an hour by
default) and has no timeout at all for a request's headers or body: a client sending a
header line every 20 s, or nothing, holds a connection and a file descriptor for ever.
Here every connection gets a :class:`GuardedHandler` (aiohttp's protocol plus timers):

- **header**: from a connection's opening, or from the first byte of its next request, to
  the end of that request's headers. On expiry: ``408`` and close.
- **keep-alive**: an idle connection between requests is closed (aiohttp's own timer, set
  from the same options).
- **body**: while a handler waits for a request body, the client must send something at
  least this often. Time during which cached itself stopped reading (backpressure from a
  slow upstream) does not count. On expiry the connection is cut.
- **body rate** (``client_body_min_rate``; issue 13 item 2: a byte every few seconds kept
  the inactivity timer from ever running out): a body must arrive at that average rate.
  Its deadline starts ``client_body_timeout`` after its first byte could be sent and moves
  one second later per ``client_body_min_rate`` bytes received (and by the time cached
  paused reading), like Apache's ``mod_reqtimeout`` ``MinRate``. Past it, the cut.
- **per address**: at most this many open connections from one client (an IPv6 client
  counted by its /64, a trusted proxy not at all: ``cached/edge/clients.py``); the next gets
  ``503`` and is closed.
- **in all** (``max_connections``; issue 13 item 6: 200 connections from ten loopback
  addresses were all held under a per-address cap of 20): at most this many open
  connections, whoever opened them; the next gets ``503`` and is closed.

None of them applies to a response being sent: a slow but progressing multi-GiB download is
never cut here (the client's TCP window paces it).

All state (the counts, each connection's timers) lives on the event loop and is changed only
by the loop's protocol callbacks and the request handler tasks.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader

from cached.config import Config
from cached.edge.clients import Clients, Holdings

log = logging.getLogger("cached.connguard")


def _too_many_page(why: str) -> bytes:
    body = f"503 Service Unavailable\n\n{why}\n\n".encode()
    return (
        b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\n"
        b"Content-Type: text/plain; charset=UTF-8\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


@dataclass(frozen=True)
class Limits:
    """The connection limits (seconds; 0 turns a timeout or the cap off)."""

    header_timeout: float = 30.0
    keepalive_timeout: float = 75.0
    body_timeout: float = 60.0
    max_per_address: int = 128
    body_min_rate: int = 32 << 10  # bytes per second
    max_connections: int = 4096
    clients: Clients = Clients()

    @classmethod
    def of(cls, config: Config) -> Limits:
        return cls(
            config.client_header_timeout,
            config.client_keepalive_timeout,
            config.client_body_timeout,
            config.max_connections_per_address,
            config.client_body_min_rate,
            config.max_connections,
            Clients.of(config),
        )

    @property
    def body_check_interval(self) -> float:
        """Seconds between two looks at a body's progress (0: never look)."""
        intervals = [self.body_timeout / 2] if self.body_timeout > 0 else []
        if self.body_min_rate > 0:
            intervals.append(1.0)
        return min(intervals, default=0.0)


class _State(enum.Enum):
    HEADERS = "headers"  # waiting for (the rest of) a request's headers
    ACTIVE = "active"  # a handler runs
    IDLE = "idle"  # between requests (aiohttp's keep-alive timer runs)


class Refusal(enum.Enum):
    """Why a new connection was refused (the log's words)."""

    IN_ALL = "too many open in all (max_connections)"
    FROM_THERE = "too many open from there (max_connections_per_address)"

    @property
    def page(self) -> bytes:
        """The ``503`` the refused client is sent."""
        return _PAGES[self]


_PAGES = {
    Refusal.IN_ALL: _too_many_page("Too many connections."),
    Refusal.FROM_THERE: _too_many_page("Too many connections from you."),
}


class ConnectionGuard:
    """The limits and the connection counts of one server: in all, and per client key
    (``cached/edge/clients.py``)."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.open = 0  # connections admitted and not yet lost
        self.per_address = Holdings()

    def admit(self, address: str) -> tuple[str | None, Refusal | None]:
        """Count a new connection from ``address``: the key it was counted under per
        client (give it back to :meth:`release`; None: counted in all only), or why it is
        one too many."""
        if 0 < self.limits.max_connections <= self.open:
            return None, Refusal.IN_ALL
        key = None
        if self.limits.max_per_address > 0 and not self.limits.clients.is_trusted(address):
            key = self.limits.clients.key(address)
            if key is not None and not self.per_address.take(key, self.limits.max_per_address):
                return None, Refusal.FROM_THERE
        self.open += 1
        return key, None

    def release(self, key: str | None) -> None:
        """A connection admitted under ``key`` (what :meth:`admit` gave) was lost."""
        self.open -= 1
        if key is not None:
            self.per_address.give(key)


class GuardedHandler(web.RequestHandler):
    """aiohttp's connection protocol with the guard's timers."""

    def __init__(self, manager: web.Server, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.guard = guard
        self._address: str | None = None
        self._admitted = False
        self._key: str | None = None  # what the guard counted this connection under
        self._state = _State.HEADERS
        self._timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None
        self._last_data = 0.0
        self._last_check = 0.0
        self._body_deadline = 0.0  # the body's rate deadline (loop time)

    # -- asyncio protocol callbacks -------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        address = peer[0] if isinstance(peer, tuple) and peer else None
        if address is not None:  # Unix-socket callers are counted in neither
            key, refused = self.guard.admit(address)
            if refused is not None:
                log.warning("refused a connection from %s: %s", address, refused.value)
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(refused.page)
                self.force_close()
                return
            self._admitted, self._key = True, key
        self._address = address
        self._start_headers()

    def data_received(self, data: bytes) -> None:
        if data:
            if self._state is _State.IDLE:
                self._start_headers()  # the first byte of the next request
            elif self._body is not None and self.guard.limits.body_min_rate > 0:
                self._body_deadline += len(data) / self.guard.limits.body_min_rate
            self._last_data = self._loop.time()
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel()
        if self._admitted:
            self.guard.release(self._key)
            self._admitted = False
        self._address = None
        super().connection_lost(exc)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """A request the HTTP parser refused (400, 413, 431...) or a client that left is
        the client's doing: one line at INFO, not a traceback at ERROR each time (an easy
        way to flood the log otherwise)."""
        exc = kw.get("exc_info")
        if isinstance(exc, ConnectionError):  # e.g. the interim 100 to a client that left
            log.info("a client from %s left: %r", self._address, exc)
            return
        if isinstance(exc, HttpProcessingError):
            first = str(exc.message).strip().splitlines()[:1] or [""]
            log.info(
                "refused a malformed request from %s: %d %s",
                self._address,
                exc.code,
                first[0][:200],
            )
            return
        super().log_exception(*args, **kw)

    # -- request lifecycle (called by the wrapped server callbacks) -----------------------
    def request_started(self, payload: StreamReader) -> None:
        self._cancel()
        self._state = _State.ACTIVE
        self._body = payload
        interval = self.guard.limits.body_check_interval
        if interval > 0 and not payload.is_eof():
            now = self._loop.time()
            self._last_data = self._last_check = now
            # What came with the headers counts too (it is in the payload already).
            received = payload.total_bytes
            rate = self.guard.limits.body_min_rate
            self._body_deadline = now + self.guard.limits.body_timeout
            if rate > 0:
                self._body_deadline += received / rate
            self._schedule(interval, self._check_body)

    def request_handled(self) -> None:
        self._cancel()
        self._body = None
        self._state = _State.IDLE

    # -- timers -----------------------------------------------------------------------------
    def _schedule(self, delay: float, callback: Callable[[], None]) -> None:
        self._cancel()
        self._timer = self._loop.call_later(delay, callback)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _start_headers(self) -> None:
        self._state = _State.HEADERS
        if self.guard.limits.header_timeout > 0:
            self._schedule(self.guard.limits.header_timeout, self._headers_expired)
        else:
            self._cancel()

    def _headers_expired(self) -> None:
        self._timer = None
        transport = self.transport
        if self._state is not _State.HEADERS or transport is None:
            return
        log.info(
            "closed a connection from %s: no complete request headers within %gs",
            self._address,
            self.guard.limits.header_timeout,
        )
        if transport.get_write_buffer_size() == 0:
            transport.write(_timeout_page())
        self.force_close()

    def _check_body(self) -> None:
        self._timer = None
        transport, body = self.transport, self._body
        if self._state is not _State.ACTIVE or transport is None or body is None:
            return
        if body.is_eof():
            return  # the whole body arrived
        now = self._loop.time()
        limits = self.guard.limits
        if not transport.is_reading():
            # cached paused the reading itself: not the client's fault
            self._last_data = now
            self._body_deadline += now - self._last_check
        elif limits.body_timeout > 0 and now - self._last_data >= limits.body_timeout:
            log.info(
                "cut a connection from %s: no request body for %gs",
                self._address,
                limits.body_timeout,
            )
            transport.abort()
            return
        elif limits.body_min_rate > 0 and now > self._body_deadline:
            log.info(
                "cut a connection from %s: its request body came slower than %d bytes/s "
                "(client_body_min_rate) after %gs",
                self._address,
                limits.body_min_rate,
                limits.body_timeout,
            )
            transport.abort()
            return
        self._last_check = now
        self._schedule(limits.body_check_interval, self._check_body)


def _timeout_page() -> bytes:
    body = b"408 Request Timeout\n\nThe request headers did not arrive in time.\n\n   "
    return (
        b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
        b"Content-Type: text/plain; charset=UTF-8\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


class _GuardedServer(web.Server):
    guard: ConnectionGuard

    def __call__(self) -> web.RequestHandler:
        return GuardedHandler(self, self.guard, loop=self._loop, **self._kwargs)


def _watch(server: web.Server, guard: ConnectionGuard) -> None:
    """Make ``server`` build guarded connections and tell them when requests start/end."""
    server.__class__ = _GuardedServer  # web.Server has no __slots__: the layout is the same
    assert isinstance(server, _GuardedServer)
    server.guard = guard
    make_request = server.request_factory
    handle = server.request_handler

    def request_factory(
        message: Any, payload: StreamReader, protocol: Any, writer: Any, task: Any
    ) -> web.BaseRequest:
        if isinstance(protocol, GuardedHandler):
            protocol.request_started(payload)
        return make_request(message, payload, protocol, writer, task)

    async def request_handler(request: web.BaseRequest) -> web.StreamResponse:
        try:
            return await handle(request)
        finally:
            if isinstance(request.protocol, GuardedHandler):
                request.protocol.request_handled()

    server.request_factory = request_factory
    server.request_handler = request_handler


class GuardedRunner(web.AppRunner):
    """An :class:`aiohttp.web.AppRunner` whose every site applies ``limits``."""

    def __init__(self, app: web.Application, limits: Limits, **kwargs: Any) -> None:
        if limits.keepalive_timeout > 0:
            kwargs.setdefault("keepalive_timeout", limits.keepalive_timeout)
        super().__init__(app, **kwargs)
        self.guard = ConnectionGuard(limits)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        _watch(server, self.guard)
        return server


__all__ = ["ConnectionGuard", "GuardedRunner", "Limits"]
