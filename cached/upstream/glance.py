"""The ``glance`` backend: an HTTP upstream speaking the Glance v2 API.

Everything not answered by the cache passes through here unchanged, streamed both ways.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from cached import replies
from cached.errors import UpstreamError, UpstreamUnavailable
from cached.upstream import (
    Authorization,
    Buffer,
    Credentials,
    Decision,
    ImageRecord,
    ReplyHook,
)

log = logging.getLogger(__name__)

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
_RELAY_ERROR_HEADERS = ("content-type", "www-authenticate", "x-openstack-request-id")
_MAX_ERROR_BODY = 64 << 10
_PIECE = 1 << 20
_RELAY_BUFFER = 64 << 10


def end_to_end(headers: Any) -> CIMultiDict[str]:
    """Copy ``headers`` without hop-by-hop fields (and those named in ``Connection``)."""
    listed = {t.strip().lower() for v in headers.getall("Connection", []) for t in v.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if low not in HOP_BY_HOP and low not in listed:
            out.add(name, value)
    return out


class GlanceStream:
    """Image bytes from an upstream response, positioned at ``start``."""

    def __init__(self, response: aiohttp.ClientResponse, start: int):
        self._response = response
        self._left = memoryview(b"")  # received but not yet handed out
        self.start = start

    async def read(self, n: int) -> bytes:
        return b"".join(await self.read_blocks(n))

    async def read_blocks(self, n: int) -> list[Buffer]:
        # Hand out aiohttp's own buffers (readchunk does not join them): 1 GiB of joins
        # cost ~0.4 CPU s in profiles.
        blocks: list[Buffer] = []
        try:
            while n > 0:
                if not self._left:
                    data, _ = await self._response.content.readchunk()
                    if not data:
                        if self._response.content.at_eof():
                            break
                        continue  # an HTTP chunk boundary
                    self._left = memoryview(data)
                block, self._left = self._left[:n], self._left[n:]
                blocks.append(block)
                n -= len(block)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamUnavailable(f"image transfer broke off: {exc!r}") from exc
        return blocks


class GlanceBackend:
    """Talks to a Glance API at ``base_url`` with one shared ``ClientSession``."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        ssl_context: ssl.SSLContext | bool = True,
    ):
        self.base_url = base_url.rstrip("/")
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=connect_timeout, sock_read=read_timeout or None
            ),
            connector=aiohttp.TCPConnector(limit=0, force_close=False, ssl=ssl_context),
            # Image bodies are read 1 MiB at a time: a small read buffer would pause and resume
            # the socket a dozen times per read.
            read_bufsize=4 << 20,
            skip_auto_headers=("User-Agent",),
        )
        # Pass-through answers go to one client each, at that client's pace: a small read
        # buffer (aiohttp's default, 64 KiB; reading pauses at twice that) makes a client
        # that does not read stop the upstream read after ~128 KiB instead of 8 MiB.
        self._relay = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=connect_timeout, sock_read=read_timeout or None
            ),
            connector=aiohttp.TCPConnector(limit=0, force_close=False, ssl=ssl_context),
            read_bufsize=_RELAY_BUFFER,
            skip_auto_headers=("User-Agent",),
        )

    def set_timeouts(self, connect_timeout: float, read_timeout: float) -> None:
        """New timeouts for the requests made from now on (a reload)."""
        # aiohttp has no setter; the session reads this attribute for every request.
        self._session._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout or None
        )

    async def close(self) -> None:
        await self._session.close()
        await self._relay.close()

    def _url(self, path: str) -> str:
        return self.base_url + path

    async def _error(self, response: aiohttp.ClientResponse) -> UpstreamError:
        body = await response.content.read(_MAX_ERROR_BODY)
        headers = {h: response.headers[h] for h in _RELAY_ERROR_HEADERS if h in response.headers}
        return UpstreamError(response.status, body, headers)

    async def authorize(self, image_id: str, creds: Credentials) -> Authorization:
        """Probe the download itself: Glance runs every check it runs for a real download
        (token, visibility, deactivation, the ``download_image`` policy) before the first byte.
        """
        url = self._url(f"/v2/images/{image_id}/file")
        headers = dict(creds.headers)
        try:
            try:
                ranged = {**headers, "Range": "bytes=0-0"}
                async with self._session.get(url, headers=ranged) as resp:
                    if resp.status != 400 and resp.status < 500:
                        return await self._decision(resp)
            except aiohttp.ServerDisconnectedError:
                pass  # Glance 33 crashes on a Range GET of an image without data
            # Stores without random access refuse ranges (400): ask for the whole body and
            # hang up after the headers.
            async with self._session.get(url, headers=headers) as resp:
                return await self._decision(resp)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamUnavailable(f"authorisation probe failed: {exc!r}") from exc

    async def _decision(self, resp: aiohttp.ClientResponse) -> Authorization:
        request_id = resp.headers.get("x-openstack-request-id")
        if resp.status == 206 and (resp.content_length or 0) <= 1:
            await resp.read()  # the one byte: the connection stays reusable
            return Authorization(Decision.ALLOW, resp.status, request_id=request_id)
        if resp.status == 416:
            # An empty image: Glance checks access before it looks at the range.
            await resp.read()
            return Authorization(Decision.ALLOW, resp.status, request_id=request_id)
        if resp.status in (200, 206):
            resp.close()  # the whole image is coming: hang up rather than drain it
            return Authorization(Decision.ALLOW, resp.status, request_id=request_id)
        if resp.status == 204:
            return Authorization(Decision.NO_DATA, 204, request_id=request_id)
        err = await self._error(resp)
        return Authorization(Decision.DENY, err.status, err.body, err.headers, request_id)

    async def record(self, image_id: str, creds: Credentials) -> ImageRecord:
        try:
            async with self._session.get(
                self._url(f"/v2/images/{image_id}"), headers=dict(creds.headers)
            ) as resp:
                if resp.status != 200:
                    raise await self._error(resp)
                return ImageRecord.from_json(await resp.json(content_type=None))
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise UpstreamUnavailable(f"image record: {exc!r}") from exc

    @asynccontextmanager
    async def open_data(
        self, image_id: str, creds: Credentials, start: int, end: int | None
    ) -> AsyncIterator[GlanceStream]:
        url = self._url(f"/v2/images/{image_id}/file")
        headers = dict(creds.headers)
        ranged = start > 0 or end is not None
        if ranged:
            headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            resp = await self._session.get(url, headers=headers)
            if resp.status == 400 and ranged:
                resp.release()
                del headers["Range"]
                resp = await self._session.get(url, headers=headers)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamUnavailable(f"image download failed: {exc!r}") from exc
        try:
            stream = GlanceStream(resp, start)
            if resp.status == 206:
                first = _content_range_start(resp.headers.get("Content-Range", ""))
                if first != start:
                    raise UpstreamUnavailable(f"asked for byte {start}, got {first}")
            elif resp.status == 200:
                await _skip(stream, start)  # the upstream ignored the range
            else:
                raise await self._error(resp)
            yield stream
        finally:
            resp.close()

    async def forward(
        self, request: web.Request, before_reply: ReplyHook | None = None
    ) -> web.StreamResponse:
        """Relay ``request`` to the upstream and stream the answer back, both ways bounded.

        ``before_reply(response)`` runs once the upstream's status and headers are known and
        before the client sees them (so a client never observes a change before the cache
        forgot it).
        """
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
        body = _ClientBody(request) if request.body_exists else None
        try:
            upstream = await self._relay.request(
                request.method,
                self._url(request.path_qs),
                headers=headers,
                data=body.pieces() if body is not None else None,
                allow_redirects=False,
                skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            if body is not None and body.error is not None:
                # The client's side broke (it left, or was cut for sending nothing): not
                # the upstream's failure, and no traceback.
                rid = replies.request_id()
                log.info(
                    "%s: %s %s: the request body broke off: %r",
                    rid,
                    request.method,
                    request.path[:200],
                    body.error,
                )
                return replies.glance_error(400, "The request body did not arrive completely.", rid)
            log.warning("upstream unreachable for %s %s: %r", request.method, request.path, exc)
            raise UpstreamUnavailable(str(exc)) from exc
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
                while piece := await upstream.content.readany():
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
        except (TimeoutError, aiohttp.ClientError) as exc:
            # Mid-stream: the headers are gone; cut the client off so it sees a short body.
            log.warning("upstream broke off %s %s: %r", request.method, request.path, exc)
            if request.transport is not None:
                request.transport.abort()
            if response.prepared:
                return response  # nothing more can be said to this client
            raise UpstreamUnavailable(str(exc)) from exc
        finally:
            upstream.release()


class _ClientBody:
    """A request body streamed to the upstream; remembers a failure on the client's side."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.error: BaseException | None = None

    async def pieces(self) -> AsyncIterator[bytes]:
        try:
            while piece := await self.request.content.readany():
                yield piece
        except Exception as exc:
            self.error = exc
            raise


async def _skip(stream: GlanceStream, count: int) -> None:
    while count > 0:
        got = await stream.read(min(count, _PIECE))
        if not got:
            raise UpstreamUnavailable("image ended before the requested offset")
        count -= len(got)


def _content_range_start(value: str) -> int:
    # "bytes a-b/size" (RFC 9110 §14.4)
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return -1
