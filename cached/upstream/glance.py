"""The ``glance`` backend: an HTTP upstream speaking the Glance v2 API.

It fetches what the cache needs (authorisation probes, records, image bytes) and offers one
raw primitive, :meth:`GlanceBackend.send`, for the pass-through (``cached/edge/passthrough.py``),
which owns every rule about relaying a client's request. aiohttp's client errors become
:class:`UpstreamUnavailable` here, where they arise. The sessions are created with the
backend and closed by :meth:`close`; only the event loop's tasks use them.

Three connection pools, each bounded (issue 13 item 2: they were unbounded, and a client's
upload could take the connection a probe needed): authorisation probes and records (short,
on the path of every hit), image transfers (fills), and the pass-through. A request waits
for a free connection of its own pool for at most the connect timeout; probes never wait
behind uploads or image transfers.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict

from cached.errors import UpstreamError, UpstreamUnavailable
from cached.upstream import (
    Authorization,
    Buffer,
    Credentials,
    Decision,
    ImageRecord,
)

log = logging.getLogger(__name__)

_RELAY_ERROR_HEADERS = ("content-type", "www-authenticate", "x-openstack-request-id")
_MAX_ERROR_BODY = 64 << 10
_PIECE = 1 << 20
_RELAY_BUFFER = 64 << 10
# A probe sends the caller's Accept, or none: never aiohttp's "*/*" (Glance: an HTML page).
_NO_ACCEPT = ("Accept",)
# How long an image that answered 204 (no data yet) is probed without Range, and how many
# such images are remembered (issue 19 item 19: Glance 33 crashes on a Range GET of one).
_NO_DATA_MEMORY = 300.0
_NO_DATA_MAX = 10_000


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


class Relayed:
    """The upstream's answer to a request sent with :meth:`GlanceBackend.send`: its status
    line and headers as received, and its body read as it comes. A broken read raises
    :class:`UpstreamUnavailable`. The caller must :meth:`release` it."""

    def __init__(self, response: aiohttp.ClientResponse):
        self._response = response
        self.status = response.status
        self.reason = response.reason
        self.headers = response.headers
        self.version = response.version
        self.content_length = response.content_length

    async def readany(self) -> bytes:
        """The next bytes of the body as they arrived (``b""`` at its end)."""
        try:
            return await self._response.content.readany()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamUnavailable(f"the upstream broke off: {exc!r}") from exc

    async def read(self) -> bytes:
        """The whole body (for small documents only)."""
        try:
            return await self._response.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamUnavailable(f"the upstream broke off: {exc!r}") from exc

    def release(self) -> None:
        self._response.release()


@dataclass(frozen=True)
class Pools:
    """Connections to the upstream at most, per use (0: no bound)."""

    relay: int = 32  # pass-through (cached/edge/passthrough.py)
    fetch: int = 64  # image transfers
    probe: int = 32  # authorisation probes and image records


class GlanceBackend:
    """Talks to a Glance API at ``base_url``: one ``ClientSession`` for image transfers, one
    for probes and records, one for the requests sent as given (:meth:`send`)."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        ssl_context: ssl.SSLContext | bool = True,
        pools: Pools = Pools(),
    ):
        self.base_url = base_url.rstrip("/")
        self.pools = pools
        timeout = _timeout(connect_timeout, read_timeout)
        self._probe = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=timeout,
            connector=aiohttp.TCPConnector(limit=pools.probe, force_close=False, ssl=ssl_context),
            skip_auto_headers=("User-Agent",),
        )
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=timeout,
            connector=aiohttp.TCPConnector(limit=pools.fetch, force_close=False, ssl=ssl_context),
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
            timeout=timeout,
            connector=aiohttp.TCPConnector(limit=pools.relay, force_close=False, ssl=ssl_context),
            read_bufsize=_RELAY_BUFFER,
            skip_auto_headers=("User-Agent",),
        )

        # Images whose download answered 204 (no data yet) -> when (monotonic); loop-owned.
        self._no_data: dict[str, float] = {}

    def set_timeouts(self, connect_timeout: float, read_timeout: float) -> None:
        """New timeouts for the requests made from now on (a reload), fetches and
        pass-through alike."""
        timeout = _timeout(connect_timeout, read_timeout)
        # aiohttp has no setter; a session reads this attribute for every request.
        self._session._timeout = timeout
        self._relay._timeout = timeout
        self._probe._timeout = timeout

    async def close(self) -> None:
        await self._session.close()
        await self._relay.close()
        await self._probe.close()

    def _url(self, path: str) -> str:
        return self.base_url + path

    async def send(
        self,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: AsyncIterable[bytes] | bytes | None = None,
    ) -> Relayed:
        """Send one request to the upstream exactly as given (``target``: path and query;
        no redirect followed, no header added) and return the answer once its headers are in.

        It goes on the relay session, whose small read buffer lets the caller's pace of
        reading pace the upstream. ``body``: all of it (a buffered request body), or its
        pieces as they come. A failure to connect or to send (also one of ``body``)
        raises :class:`UpstreamUnavailable` with the cause chained.
        """
        try:
            response = await self._relay.request(
                method,
                self._url(target),
                headers=headers,
                data=body,
                allow_redirects=False,
                skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamUnavailable(str(exc)) from exc
        return Relayed(response)

    async def _error(self, response: aiohttp.ClientResponse) -> UpstreamError:
        body = await response.content.read(_MAX_ERROR_BODY)
        headers = {h: response.headers[h] for h in _RELAY_ERROR_HEADERS if h in response.headers}
        return UpstreamError(response.status, body, headers)

    async def authorize(
        self, image_id: str, creds: Credentials, accept: str | None = None
    ) -> Authorization:
        """Probe the download itself: Glance runs every check it runs for a real download
        (token, visibility, deactivation, the ``download_image`` policy) before the first byte.

        The probe carries the caller's ``Accept`` (none if it sent none, where aiohttp
        would add ``*/*``, for which Glance answers HTML): the refusal relayed is the one
        Glance gives that caller directly (webob's plain text, JSON or HTML).
        """
        url = self._url(f"/v2/images/{image_id}/file")
        headers = dict(creds.headers)
        if accept is not None:
            headers["Accept"] = accept
        try:
            if self._without_data(image_id):
                # Seen without data a moment ago (queued, uploading, importing): a plain GET
                # answers 204 as Glance does, where a Range GET makes Glance 33 crash (a
                # traceback each time). If the data arrived meanwhile, this hangs up after
                # the headers, as the fallback below does.
                async with self._session.get(
                    url, headers=headers, skip_auto_headers=_NO_ACCEPT
                ) as resp:
                    decision = await self._decision(resp)
                    self._no_data_seen(image_id, decision.decision is Decision.NO_DATA)
                    return decision
            try:
                ranged = {**headers, "Range": "bytes=0-0"}
                async with self._probe.get(
                    url, headers=ranged, skip_auto_headers=_NO_ACCEPT
                ) as resp:
                    if resp.status != 400:
                        # A 5xx is the upstream's answer to this download: relayed (or a
                        # stale allowance), never asked again without the Range, which made
                        # every failed download two upstream requests (issue 14 item 4).
                        return await self._decision(resp)
            except aiohttp.ServerDisconnectedError:
                pass  # Glance 33 (uWSGI) crashes on a Range GET of an image without data
            # Stores without random access refuse ranges (400): ask for the whole body and
            # hang up after the headers.
            async with self._probe.get(url, headers=headers, skip_auto_headers=_NO_ACCEPT) as resp:
                decision = await self._decision(resp)
                self._no_data_seen(image_id, decision.decision is Decision.NO_DATA)
                return decision
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamUnavailable(f"authorisation probe failed: {exc!r}") from exc

    def _without_data(self, image_id: str) -> bool:
        seen = self._no_data.get(image_id)
        return seen is not None and time.monotonic() - seen < _NO_DATA_MEMORY

    def _no_data_seen(self, image_id: str, no_data: bool) -> None:
        """Remember (for ``_NO_DATA_MEMORY`` s; at most ``_NO_DATA_MAX`` images) which images
        answered 204; loop-owned."""
        if not no_data:
            self._no_data.pop(image_id, None)
            return
        if len(self._no_data) >= _NO_DATA_MAX:
            self._no_data.clear()
        self._no_data[image_id] = time.monotonic()

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
            async with self._probe.get(
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


def _timeout(connect_timeout: float, read_timeout: float) -> aiohttp.ClientTimeout:
    # No total: an image takes as long as it takes. A read timeout of 0 means none. The
    # wait for a free connection of a (bounded) pool and the connect together take at most
    # the connect timeout.
    return aiohttp.ClientTimeout(
        total=None,
        connect=connect_timeout or None,
        sock_connect=connect_timeout,
        sock_read=read_timeout or None,
    )


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
