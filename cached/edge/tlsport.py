"""A TLS listener's first byte: a TLS handshake goes on to TLS; plain HTTP is answered
``400`` as nginx answers it ("The plain HTTP request was sent to HTTPS port"), where the
TLS layer alone would close the connection without a word (issue 19 item 20).

How: the listener is served without asyncio's own TLS (``create_server(ssl=None)``); each
new connection starts with a :class:`_FirstByte` protocol that keeps its transport from
reading and peeks (``MSG_PEEK``, on a duplicate of the socket's descriptor, since asyncio
lets no second reader watch a transport's own) at the first byte without taking it. A
handshake record (``0x16``, RFC 8446 §5.1) goes to ``loop.start_tls`` with the untouched
bytes still in the socket, and the application's protocol (aiohttp's, or connguard's)
then sees the TLS transport, as with ``create_server(ssl=...)``. Anything else gets the
``400``; what the client sent is read and dropped until it closes (so that closing does
not reset the connection before the answer is read) or :data:`_LINGER` s pass.

The handshake, from accept to its end, has asyncio's default budget (60 s).

State: each :class:`_FirstByte` is owned by the event loop; the set of live ones belongs
to its :class:`TLSPort` (added and removed on the loop; aborted when the site stops).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Callable

log = logging.getLogger("cached.tls")

_HANDSHAKE = 0x16  # TLS record type "handshake": every TLS connection starts with one
_HANDSHAKE_TIMEOUT = 60.0  # asyncio's default ssl_handshake_timeout
_LINGER = 5.0  # seconds a refused connection is drained for at most

_BODY = b"400 Bad Request\n\nThe plain HTTP request was sent to HTTPS port\n\n   "
PLAIN_HTTP_REFUSAL = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Type: text/plain; charset=UTF-8\r\n"
    b"Content-Length: " + str(len(_BODY)).encode() + b"\r\n"
    b"Connection: close\r\n\r\n" + _BODY
)

ProtocolFactory = Callable[[], asyncio.BaseProtocol]


class TLSPort:
    """The protocol factory of one TLS listener (``context``) serving ``factory``'s
    protocols over TLS, answering plain HTTP with a ``400``."""

    def __init__(self, factory: ProtocolFactory, context: ssl.SSLContext) -> None:
        self.factory = factory
        self.context = context
        self.pending: set[_FirstByte] = set()  # connections before their TLS began

    def __call__(self) -> asyncio.BaseProtocol:
        return _FirstByte(self)

    def close(self) -> None:
        """Abort the connections still before TLS (the site stops)."""
        for conn in list(self.pending):
            conn.abort()


class _FirstByte(asyncio.Protocol):
    """One connection until its first byte is known (then TLS, or the 400)."""

    def __init__(self, port: TLSPort) -> None:
        self._port = port
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._peek: socket.socket | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._port.pending.add(self)
        transport.pause_reading()  # the bytes stay in the socket for the TLS layer
        self._timer = self._loop.call_later(_HANDSHAKE_TIMEOUT, self.abort)
        try:
            fd = transport.get_extra_info("socket").fileno()
            self._peek = socket.socket(fileno=os.dup(fd))
            self._peek.setblocking(False)
            self._loop.add_reader(self._peek.fileno(), self._readable)
        except OSError as exc:
            log.warning("cannot watch a new TLS connection: %s", exc)
            self.abort()

    def _readable(self) -> None:
        assert self._peek is not None and self._transport is not None
        try:
            first = self._peek.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            first = b""
        self._stop_peeking()
        if not first:
            self.abort()  # gone before a byte
        elif first[0] == _HANDSHAKE:
            self._task = self._loop.create_task(self._start_tls())
        else:
            self._refuse()

    async def _start_tls(self) -> None:
        assert self._transport is not None
        transport, self._transport = self._transport, None
        protocol = self._port.factory()
        deadline = self._timer.when() if self._timer else self._loop.time() + _HANDSHAKE_TIMEOUT
        if self._timer is not None:
            self._timer.cancel()
        try:
            tls = await self._loop.start_tls(
                transport,
                protocol,
                self._port.context,
                server_side=True,
                ssl_handshake_timeout=max(deadline - self._loop.time(), 0.1),
            )
        except (OSError, TimeoutError, ConnectionError) as exc:
            log.debug("TLS handshake failed: %r", exc)
            transport.abort()
            return
        finally:
            self._port.pending.discard(self)
        if tls is None:  # cannot happen for a server-side socket transport
            transport.abort()
            return
        protocol.connection_made(tls)

    def _refuse(self) -> None:
        assert self._transport is not None
        peer = self._transport.get_extra_info("peername")
        log.info("plain HTTP on a TLS listener from %s: answered 400", peer)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(_LINGER, self.abort)
        self._transport.write(PLAIN_HTTP_REFUSAL)
        if self._transport.can_write_eof():
            self._transport.write_eof()  # the answer is all; the client's bytes are drained
        self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        pass  # a refused client's request: dropped

    def eof_received(self) -> bool:
        return False  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_peeking()
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None:  # not handed to TLS
            self._port.pending.discard(self)
            self._transport = None

    def _stop_peeking(self) -> None:
        if self._peek is not None:
            self._loop.remove_reader(self._peek.fileno())
            self._peek.close()
            self._peek = None

    def abort(self) -> None:
        """Close the connection at once (timed out, gone, or the site stops)."""
        self._stop_peeking()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._transport is not None:
            self._transport.abort()


__all__ = ["PLAIN_HTTP_REFUSAL", "TLSPort"]
