"""Relaying a client's request to a Glance upstream: what cached does not answer itself.

Owns the rules of the pass-through: which headers go on (RFC 9110 §7.6.1 hop-by-hop fields
never do, nor ``Expect``), the forwarding headers added, streaming both ways at the pace of
the slower side, and the answers made up when the relay fails (a body that broke off on the
client's side is the client's 400; an unreachable upstream is a 502 from
``cached/edge/replies.py``, naming no internal address). Also the version document, made to
advertise the cache API that cached answers itself. The upstream is reached only through
:meth:`cached.upstream.glance.GlanceBackend.send`.

:class:`PassThrough` is what the proxy calls for anything it does not answer from the cache;
``cached/edge/fileapi.py`` is the other implementation, for a ``file://`` store.

Shielding the upstream from slow clients (issue 13 item 2: eight connections trickling a
100-byte body held every worker of a uWSGI Glance, and every other caller got 502):

- a body of at most ``client_body_buffer_size`` bytes (every JSON call) is read completely
  before the upstream is contacted, like nginx's ``proxy_request_buffering``: while it
  trickles in, it holds a connection of cached's and nothing upstream. A larger body (an
  image upload) is streamed; ``cached/edge/connguard.py`` holds it to a minimum rate;
- one client (``cached/edge/clients.py``: an address, an IPv6 /64, behind a trusted proxy the
  client it names) may have at most
  ``max_upstream_requests_per_client`` requests at the upstream at once; the next gets
  ``503`` with ``Retry-After`` and is not sent;
- the pass-through has its own bounded pool of upstream connections
  (``cached/upstream/glance.py``), apart from the authorisation probes.

State: the per-client counts of :class:`GlancePassThrough`, changed by request handlers on
the event loop only (taken before the upstream is contacted, given back when its answer
is released).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web
from multidict import CIMultiDict

from cached.edge import replies, versions
from cached.edge.clients import Holdings
from cached.errors import UpstreamUnavailable
from cached.upstream.glance import GlanceBackend

log = logging.getLogger("cached.passthrough")

# RFC 9110 §7.6.1: connection-specific fields are never forwarded. ``Expect`` too (§10.1.1):
# the server side of cached has answered ``100 Continue`` already; forwarded, it makes our
# client wait for a 100 that Glance under uWSGI never sends (the upload stalls until the
# read timeout and holds a Glance worker all that time).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "expect",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)

# Called with the response (status and headers set, not yet sent) before a forwarded answer
# reaches the client: it may add headers, and act on the status first.
ReplyHook = Callable[[web.StreamResponse], Awaitable[None]]


class PassThrough(Protocol):
    """Answers what the cache does not: the upstream's own answer, relayed or emulated."""

    async def answer(
        self, request: web.Request, before_reply: ReplyHook | None = None
    ) -> web.StreamResponse:
        """Answer ``request`` as the upstream does. ``before_reply(response)`` runs once the
        status and headers are known and before the client sees them (so a client never
        observes a change before the cache forgot it). Raises UpstreamUnavailable when
        there is no answer to relay and the client may still be told so."""

    async def versions(self, request: web.Request) -> web.StreamResponse:
        """``GET /`` and ``GET /versions``: the version document, advertising the cache API
        (v2.14-v2.18, which cached answers itself) with links to the proxy."""


def end_to_end(headers: Any) -> CIMultiDict[str]:
    """Copy ``headers`` without hop-by-hop fields (and those named in ``Connection``)."""
    listed = {t.strip().lower() for v in headers.getall("Connection", []) for t in v.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if low not in HOP_BY_HOP and low not in listed:
            out.add(name, value)
    return out


class GlancePassThrough:
    """The pass-through to a Glance API reached through ``backend``.

    Args:
        buffer_size: bodies up to this size are read whole first (0: every body streamed).
        per_client: upstream requests one client may hold at once (0: no limit).
        client_key: the key a request's client is counted under.
    """

    def __init__(
        self,
        backend: GlanceBackend,
        *,
        buffer_size: int = 256 << 10,
        per_client: int = 16,
        client_key: Callable[[web.BaseRequest], str | None] = lambda r: r.remote,
    ):
        self._backend = backend
        self._buffer_size = buffer_size
        self._per_client = per_client
        self._client_key = client_key
        self.held = Holdings()  # client key -> its requests at the upstream now
        self.last_versions = versions.LastGood()  # for /versions in an outage (loop-owned)

    async def answer(
        self, request: web.Request, before_reply: ReplyHook | None = None
    ) -> web.StreamResponse:
        """Relay ``request`` to the upstream and stream the answer back, both ways bounded."""
        try:
            body = await self._body(request)
        except Exception as exc:  # the client's side broke off while it was being read
            return _body_broke_off(request, exc)
        client = self._client_key(request)
        if client is not None and self._per_client > 0:
            if not self.held.take(client, self._per_client):
                return self._too_many(request, client)
            try:
                return await self._relay(request, body, before_reply)
            finally:
                self.held.give(client)
        return await self._relay(request, body, before_reply)

    def _too_many(self, request: web.Request, client: str) -> web.Response:
        """``503``: ``client`` has ``max_upstream_requests_per_client`` at the upstream."""
        rid = replies.request_id()
        log.warning(
            "%s: %s %s refused: %s has %d requests at the upstream already "
            "(max_upstream_requests_per_client)",
            rid,
            request.method,
            request.path[:200],
            client,
            self._per_client,
        )
        refused = replies.error(
            request, 503, "Too many requests of yours are at the image service; retry later.", rid
        )
        refused.headers["Retry-After"] = "1"
        return refused

    async def _body(self, request: web.Request) -> bytes | _ClientBody | None:
        """The request's body: read whole when it is at most ``buffer_size`` bytes, else a
        stream (what was read already goes first). None without a body."""
        if not request.body_exists:
            return None
        length = request.content_length
        if self._buffer_size <= 0 or (length is not None and length > self._buffer_size):
            return _ClientBody(request)
        pieces: list[bytes] = []
        size = 0
        while piece := await request.content.readany():
            pieces.append(piece)
            size += len(piece)
            if size > self._buffer_size:  # a chunked body, larger than the buffer
                return _ClientBody(request, pieces)
        return b"".join(pieces)

    async def _relay(
        self,
        request: web.Request,
        body: bytes | _ClientBody | None,
        before_reply: ReplyHook | None,
    ) -> web.StreamResponse:
        headers = end_to_end(request.headers)
        # The body's length as our parser framed it, never the client's header as sent: a
        # length that differs from the bytes relayed would desync the pooled connection.
        headers.popall("Content-Length", None)
        if request.body_exists and request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)
        # Keep the client's Host: Glance builds Location and version links from it, so they
        # keep pointing at the proxy.
        peer = request.remote or ""
        prior = request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
        headers.setdefault("X-Forwarded-Proto", request.scheme)
        headers.add("Via", f"{request.version.major}.{request.version.minor} cached")
        try:
            upstream = await self._backend.send(
                request.method,
                request.path_qs,
                headers,
                body.pieces() if isinstance(body, _ClientBody) else body,
            )
        except UpstreamUnavailable as exc:
            if isinstance(body, _ClientBody) and body.error is not None:
                # The client's side broke (it left, or was cut for sending nothing): not
                # the upstream's failure, and no traceback.
                return _body_broke_off(request, body.error)
            log.warning(
                "upstream unreachable for %s %s: %r", request.method, request.path, exc.__cause__
            )
            raise
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        try:
            for name, value in end_to_end(upstream.headers).items():
                if name.lower() != "content-length":
                    response.headers.add(name, value)
            version = upstream.version or request.version
            response.headers.add("Via", f"{version.major}.{version.minor} cached")
            if upstream.content_length is not None and request.method != "HEAD":
                response.content_length = upstream.content_length
            elif "Content-Length" in upstream.headers:
                response.headers["Content-Length"] = upstream.headers["Content-Length"]
            if before_reply is not None:
                await before_reply(response)
            await response.prepare(request)
            if request.method != "HEAD" and upstream.status not in (204, 304):
                while piece := await upstream.readany():
                    await response.write(piece)
            await response.write_eof()
            return response
        except ConnectionError as exc:
            # Writing to the client failed: it left (or was cut off). Nothing is wrong
            # upstream and there is nobody to answer (aiohttp's own ClientConnectionResetError
            # for a closing transport is one of these, not an upstream error).
            log.info("%s %s: the client left: %r", request.method, request.path[:200], exc)
            if request.transport is not None:
                request.transport.abort()
            return response
        except UpstreamUnavailable as exc:
            # Mid-stream: the headers are gone; cut the client off so it sees a short body.
            log.warning("upstream broke off %s %s: %r", request.method, request.path, exc.__cause__)
            if request.transport is not None:
                request.transport.abort()
            if response.prepared:
                return response  # nothing more can be said to this client
            raise
        finally:
            upstream.release()

    async def versions(self, request: web.Request) -> web.StreamResponse:
        """The upstream's version document with the cache API added (python-glanceclient
        looks for v2.14, v2.18 for clean/prune, before every cache call)."""
        headers = end_to_end(request.headers)  # the client's Host: Glance links to it
        headers.popall("Accept-Encoding", None)
        headers.popall("Content-Length", None)  # no body goes upstream: it would desync
        headers["X-Forwarded-Proto"] = headers.get("X-Forwarded-Proto", request.scheme)
        try:
            upstream = await self._backend.send("GET", request.path_qs, headers)
            try:
                body = await upstream.read()
            finally:
                upstream.release()
        except UpstreamUnavailable as exc:  # the last good document (cached/edge/versions.py)
            return self.last_versions.answer(
                request, exc.__cause__ or exc, _relink, self._backend.base_url
            )
        status = upstream.status
        if status >= 500:
            return self.last_versions.answer(request, f"{status}", _relink, self._backend.base_url)
        relay = {
            h: upstream.headers[h]
            for h in ("Content-Type", "x-openstack-request-id")
            if h in upstream.headers
        }
        try:
            doc = json.loads(body) if status in (200, 300) else None
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            return web.Response(status=status, body=body, headers=relay)
        self.last_versions.remember(doc)
        base = f"{request.scheme}://{request.host}"
        doc = versions.with_cache_api(_relink(doc, self._backend.base_url, base), base)
        relay.pop("Content-Type", None)
        return web.json_response(doc, status=status, headers=relay)


def _body_broke_off(request: web.Request, error: BaseException) -> web.Response:
    """``400``: the client's body did not arrive (it left, or was cut for its pace)."""
    rid = replies.request_id()
    log.info(
        "%s: %s %s: the request body broke off: %r",
        rid,
        request.method,
        request.path[:200],
        error,
    )
    return replies.error(request, 400, "The request body did not arrive completely.", rid)


class _ClientBody:
    """A request body streamed to the upstream (``first``: its start, read already);
    remembers a failure on the client's side."""

    def __init__(self, request: web.Request, first: list[bytes] | None = None) -> None:
        self.request = request
        self.first = first or []
        self.error: BaseException | None = None

    async def pieces(self) -> AsyncIterator[bytes]:
        for piece in self.first:
            yield piece
        try:
            while piece := await self.request.content.readany():
                yield piece
        except Exception as exc:
            self.error = exc
            raise


def _relink(doc: dict[str, Any], upstream: str, base: str) -> dict[str, Any]:
    """Point version links that name the upstream itself at the proxy instead."""
    for version in doc.get("versions") or []:
        links = version.get("links") if isinstance(version, dict) else None
        for link in links if isinstance(links, list) else []:
            href = link.get("href") if isinstance(link, dict) else None
            if isinstance(href, str) and href.startswith(upstream + "/"):
                link["href"] = base + href[len(upstream) :]
    return doc
