"""A programmable fake of the Glance v2 image API (Glance 33), used by tests as the upstream.

It speaks what `cached` depends on (/work/shared/glance/API.md): token auth (401), visibility (404),
deactivation and the `download_image` policy (403), image data with single ranges (206/416), 204
for missing data, and a few management calls. Upstream misbehaviour is programmed per image with
the knobs of :class:`FakeImage`. Usage: `glance = FakeGlance(); glance.add_token("t", "p1");
image = glance.add_image(b"x" * 1000, cut_after=100); await glance.start()` ... then
`await glance.close()` (or `async with FakeGlance() as glance:`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import ssl
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

CHUNK = 256 * 1024
"""Size of the pieces image bodies are written in (when not throttled)."""

VISIBILITIES = ("public", "private", "shared", "community")
# Glance 33 with the cache enabled: v2.18 CURRENT, the rest SUPPORTED (REFERENCE.md §1.2).
_VERSIONS = [f"v2.{minor}" for minor in range(18, -1, -1)]
# webob.byterange._rx_range, which Glance's Request.get_range_from_request relies on.
_RANGE_RE = re.compile(r"bytes *= *(\d*) *- *(\d*)", re.IGNORECASE)
_UNAUTHORIZED = (
    "401 Unauthorized\n\nThis server could not verify that you are authorized to access the "
    "document you requested. Either you supplied the wrong credentials (e.g., bad password), "
    "or your browser does not understand how to supply the credentials required.\n\n   "
)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Token:
    """What a token means: the caller's project and roles."""

    project: str | None
    roles: tuple[str, ...] = ("member", "reader")

    @property
    def is_admin(self) -> bool:
        """True if the token carries the `admin` role (admin sees and may do everything)."""
        return "admin" in self.roles


@dataclass(eq=False)
class FakeImage:
    """One image: its record, its data and the knobs that make its downloads misbehave.

    `checksum` and `os_hash_value` are computed from `data` when left None; set them (after
    construction) to override, e.g. `image.checksum = None` for an image without an md5.
    Use :meth:`set_data` to replace the data and recompute both. All knobs may be changed at
    any time; `rate` and `cut_after` are re-read between the pieces of a running download.
    :meth:`pause` holds every download of the image that has sent its first piece, before its
    next piece, until :meth:`resume` (so the 1-byte authorisation probes are still answered).
    """

    id: str
    data: bytes | None
    owner: str | None = "p1"
    visibility: str = "private"
    status: str = "active"
    members: set[str] = field(default_factory=set)
    name: str = ""
    checksum: str | None = None
    os_hash_algo: str | None = "sha512"
    os_hash_value: str | None = None
    disk_format: str | None = "raw"
    container_format: str | None = "bare"
    # Additional properties (img_signature, ...): shown in the record, changed by PATCH.
    properties: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=_now)
    updated_at: str = ""
    # knobs
    cut_after: int | None = None
    delay: float = 0.0
    rate: int | None = None
    corrupt_at: int | None = None
    no_content_length: bool = False
    ranges_supported: bool = True
    no_data_204: bool = False
    # pause() holds downloads once they sent this many bytes (None: after the first piece)
    hold_after: int | None = None
    # set: downloads flow; cleared by pause(): they send nothing more until resume()
    flowing: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.flowing.set()
        self.members = set(self.members)
        self.name = self.name or f"image-{self.id[:8]}"
        self.updated_at = self.updated_at or self.created_at
        if self.data is not None:
            self.checksum = self.checksum or hashlib.md5(self.data).hexdigest()
            if self.os_hash_algo and self.os_hash_value is None:
                self.os_hash_value = hashlib.new(self.os_hash_algo, self.data).hexdigest()

    def pause(self) -> None:
        """Hold the image's downloads (headers still go out): they send nothing more."""
        self.flowing.clear()

    def resume(self) -> None:
        """Let held downloads go on."""
        self.flowing.set()

    def set_data(self, data: bytes) -> None:
        """Store `data` as the image's data, recompute its checksums and make it active."""
        self.data = data
        self.checksum = hashlib.md5(data).hexdigest()
        self.os_hash_algo = self.os_hash_algo or "sha512"
        self.os_hash_value = hashlib.new(self.os_hash_algo, data).hexdigest()
        self.status = "active"
        self.updated_at = _now()

    @property
    def size(self) -> int | None:
        """Length of the data, None when no data was uploaded."""
        return None if self.data is None else len(self.data)

    def visible_to(self, caller: Token) -> bool:
        """Glance's visibility rule: public/community to all, shared to members, admin all."""
        return (
            caller.is_admin
            or self.visibility in ("public", "community")
            or (caller.project is not None and caller.project == self.owner)
            or (self.visibility == "shared" and caller.project in self.members)
        )

    def record(self) -> dict[str, Any]:
        """The image as `GET /v2/images/{id}` shows it."""
        return {
            "id": self.id,
            "name": self.name,
            "status": self.status,
            "visibility": self.visibility,
            "owner": self.owner,
            "size": self.size,
            "checksum": self.checksum,
            "os_hash_algo": self.os_hash_algo,
            "os_hash_value": self.os_hash_value,
            "disk_format": self.disk_format,
            "container_format": self.container_format,
            "protected": False,
            "tags": [],
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "self": f"/v2/images/{self.id}",
            "file": f"/v2/images/{self.id}/file",
            "schema": "/v2/schemas/image",
            **self.properties,
        }

    def body(self, start: int, stop: int) -> bytes:
        """The bytes served for `[start, stop)`, with `corrupt_at` flipped if it falls inside."""
        assert self.data is not None
        piece = self.data[start:stop]
        if self.corrupt_at is not None and start <= self.corrupt_at < stop:
            mutable = bytearray(piece)
            mutable[self.corrupt_at - start] ^= 0xFF
            piece = bytes(mutable)
        return piece


class RateCap:
    """A token bucket shared by every data response of a :class:`FakeGlance` (its
    ``shared_rate``): together they send at most ``rate`` bytes/s, like one backend link.

    ``burst`` bytes may go at once (the most a piece may be); callers take tokens in turn
    (FIFO, an :class:`asyncio.Lock`), so concurrent downloads share the rate fairly.
    """

    def __init__(self, rate: int, burst: int | None = None):
        self.rate = rate
        self.burst = burst or max(1, min(CHUNK, rate // 20))
        self._tokens = float(self.burst)
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        """Wait until ``n`` (at most ``burst``) bytes may go out, and count them as gone."""
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= n:
                    self._tokens -= n
                    return
                await asyncio.sleep((n - self._tokens) / self.rate)


@dataclass
class Request:
    """One request as the fake saw it; `status` is the status it answered with, `at` when
    it arrived (`time.monotonic()`)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    range: str | None
    status: int = 0
    at: float = field(default_factory=time.monotonic)


def _byte_range(header: str, size: int) -> tuple[int, int]:
    """Turn a `Range` header into `(start, stop)` the way Glance 33 does.

    Glance (glance/common/wsgi.py get_range_from_request + v2/image_data.py download): several
    ranges -> 400; unparsable or `start >= size` -> 416; the end is clamped to the size; a suffix
    longer than the image means the whole image. The 416 carries `Content-Range: bytes */size`
    (RFC 9110 §15.5.17).
    """
    if "," in header:
        raise web.HTTPBadRequest(text="Requests with multiple ranges are not supported in Glance.")
    unsatisfiable = web.HTTPRequestRangeNotSatisfiable(
        headers={"Content-Range": f"bytes */{size}"}, text="Requested range not satisfiable"
    )
    match = _RANGE_RE.match(header)
    if match is None or match.group(1) == match.group(2) == "":
        raise unsatisfiable
    first, last = match.groups()
    if first == "":  # suffix: bytes=-n
        start, stop = max(size - int(last), 0), size
    else:
        start = int(first)
        stop = size if last == "" else min(int(last) + 1, size)
        if last != "" and int(last) < start:
            raise unsatisfiable
    if start >= size:
        raise unsatisfiable
    return start, stop


class FakeGlance:
    """A fake Glance API server: program `images` and `tokens`, inspect `requests`.

    Attributes:
        images: image id -> :class:`FakeImage`.
        tokens: token string -> :class:`Token`.
        requests: every request seen, in arrival order.
        bytes_sent: image id -> total number of data-body bytes written for it.
        url: base URL, set by :meth:`start`.
        shared_rate: bytes/s that every data response together may send (a
            :class:`RateCap` over all connections, like one backend link), or None (no cap);
            the per-image ``rate`` knob still paces each response on top of it. Set it
            any time (also while downloads run: they take the new cap's tokens from their
            next piece on).
    """

    def __init__(self) -> None:
        self.images: dict[str, FakeImage] = {}
        self.tokens: dict[str, Token] = {}
        self.requests: list[Request] = []
        # Hang up on a Range GET of an image without data, as Glance 33 under uWSGI does (its
        # Range handling raises, uWSGI closes the connection without a reply:
        # tests/test_real_glance.py::test_image_without_data_answers_like_glance); counted in
        # range_crashes.
        self.range_crash = False
        self.range_crashes = 0
        self.bytes_sent: dict[str, int] = {}
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._in_flight: dict[int, Request] = {}  # id(web.Request) -> its record
        self._downloads: set[asyncio.Task[Any]] = set()
        # False: never answer "Expect: 100-continue" with an interim 100 (Glance under uWSGI)
        self.send_100_continue = True
        # True: an upper-case id finds the image (Glance on MySQL); False: 404 (on SQLite)
        self.ids_ignore_case = False
        # A status (500, 502, 503, ...) every image download (authorisation probes included)
        # is answered with, before any check, as by a failing Glance or its load balancer
        self.fail_downloads: int | None = None
        self._cap: RateCap | None = None

    @property
    def shared_rate(self) -> int | None:
        return None if self._cap is None else self._cap.rate

    @shared_rate.setter
    def shared_rate(self, rate: int | None) -> None:
        self._cap = None if not rate else RateCap(rate)

    # -- programming ------------------------------------------------------------------------

    def add_token(
        self, token: str, project: str | None, roles: tuple[str, ...] = ("member", "reader")
    ) -> Token:
        """Make `token` valid for `project` with `roles`; returns the :class:`Token`."""
        self.tokens[token] = Token(project, tuple(roles))
        return self.tokens[token]

    def add_image(
        self,
        data: bytes | None,
        *,
        image_id: str | None = None,
        owner: str | None = "p1",
        visibility: str = "private",
        status: str | None = None,
        members: tuple[str, ...] | set[str] = (),
        name: str | None = None,
        **knobs: Any,
    ) -> FakeImage:
        """Add an image and return it; `knobs` are :class:`FakeImage` fields (`cut_after`, ...).

        `status` defaults to "active", or "queued" when `data` is None.
        """
        image = FakeImage(
            id=image_id or str(uuid.uuid4()),
            data=data,
            owner=owner,
            visibility=visibility,
            status=status or ("queued" if data is None else "active"),
            members=set(members),
            name=name or "",
            **knobs,
        )
        self.images[image.id] = image
        return image

    def data_requests(self, image_id: str) -> list[Request]:
        """The `GET /v2/images/{image_id}/file` requests seen so far."""
        path = f"/v2/images/{image_id}/file"
        return [r for r in self.requests if r.method == "GET" and r.path == path]

    # -- running ----------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        """The aiohttp application serving this fake's state."""
        app = web.Application(middlewares=[self._record_and_authenticate])
        app.on_response_prepare.append(self._on_prepare)
        # Glance routes every advertised v2.N like v2 (its version negotiation middleware).
        v2 = "/{api:v2(?:[.][0-9]+)?}"
        image, file = v2 + "/images/{image_id}", v2 + "/images/{image_id}/file"
        app.router.add_get("/", self._versions)
        app.router.add_get("/versions", self._versions)
        app.router.add_get(v2 + "/images", self._list)
        app.router.add_post(v2 + "/images", self._create, expect_handler=self._expect)
        app.router.add_route("GET", image, self._show)
        app.router.add_patch(image, self._update)
        app.router.add_delete(image, self._delete)
        app.router.add_route("GET", file, self._download)
        app.router.add_route("HEAD", file, self._head_file)
        app.router.add_put(file, self._upload, expect_handler=self._expect)
        app.router.add_post(image + "/actions/{action:deactivate|reactivate}", self._action)
        app.router.add_post(image + "/members", self._add_member)
        app.router.add_delete(image + "/members/{member}", self._remove_member)
        # glanceclient caches these before any command (without them it falls back to v1).
        app.router.add_get("/v2/schemas/{name:.+}", self._schema)
        return app

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        sock: socket.socket | None = None,
    ) -> str:
        """Serve on `host:port` (0 = any free port), or on the listening `sock` (one made in
        another network namespace); returns and sets `url`."""
        self._runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        if sock is not None:
            await web.SockSite(self._runner, sock, ssl_context=ssl_context).start()
        else:
            await web.TCPSite(self._runner, host, port, ssl_context=ssl_context).start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        bound_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        scheme = "https" if ssl_context else "http"
        self.url = f"{scheme}://{bound_host}:{bound_port}"
        return self.url

    async def close(self) -> None:
        """Stop serving; running downloads are cut at once."""
        for task in self._downloads:
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeGlance:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- helpers ----------------------------------------------------------------------------

    @web.middleware
    async def _record_and_authenticate(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        record = Request(
            request.method,
            request.path,
            request.query_string,
            {k.lower(): v for k, v in request.headers.items()},
            request.headers.get("Range"),
        )
        self.requests.append(record)
        self._in_flight[id(request)] = record
        try:
            # Glance's auth middleware runs before routing; only the version documents are open.
            if request.path not in ("/", "/versions"):
                self._caller(request)
            response = await handler(request)
        except web.HTTPException as exc:
            record.status = exc.status
            raise
        finally:
            del self._in_flight[id(request)]
        record.status = response.status
        return response

    async def _on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers.setdefault("x-openstack-request-id", f"req-{uuid.uuid4()}")
        if record := self._in_flight.get(id(request)):  # streams cut by close() keep a status
            record.status = response.status

    def _caller(self, request: web.Request) -> Token:
        token = self.tokens.get(request.headers.get("X-Auth-Token", ""))
        if token is None:
            raise web.HTTPUnauthorized(text=_UNAUTHORIZED)
        return token

    def _image(self, request: web.Request) -> tuple[FakeImage, Token]:
        """The image named in the path and the caller; 404 unless it is visible to the caller."""
        caller = self._caller(request)
        image_id = request.match_info["image_id"]
        image = self.images.get(image_id.lower() if self.ids_ignore_case else image_id)
        if image is None or not image.visible_to(caller):
            raise web.HTTPNotFound(text=f"No image found with ID {image_id}")
        return image, caller

    @staticmethod
    def _require_owner(image: FakeImage, caller: Token) -> None:
        """Glance's default write policies: admin, or a member of the owning project."""
        if caller.is_admin or ("member" in caller.roles and caller.project == image.owner):
            return
        raise web.HTTPForbidden(text="You are not permitted to modify this image.")

    @staticmethod
    async def _json(request: web.Request, kind: type[dict[str, Any]] | type[list[Any]]) -> Any:
        """The request's JSON body, which must be a `kind`; 400 otherwise."""
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else kind()
        except ValueError:
            body = None
        items = body if isinstance(body, list) else []
        if not isinstance(body, kind) or not all(isinstance(item, dict) for item in items):
            raise web.HTTPBadRequest(text="Malformed JSON in request body.")
        return body

    # -- handlers ---------------------------------------------------------------------------

    async def _expect(self, request: web.Request) -> None:
        if self.send_100_continue and request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    async def _schema(self, request: web.Request) -> web.Response:
        name = request.match_info["name"].rpartition("/")[2]
        return web.json_response({"name": name, "properties": {}, "links": []})

    async def _versions(self, request: web.Request) -> web.Response:
        href = f"http://{request.host}/v2/"
        versions = [
            {
                "id": v,
                "status": "CURRENT" if v == _VERSIONS[0] else "SUPPORTED",
                "links": [{"rel": "self", "href": href}],
            }
            for v in _VERSIONS
        ]
        # glance/api/versions.py: 200 when asked explicitly, 300 Multiple Choices at the root.
        status = 200 if request.path == "/versions" else 300
        return web.json_response({"versions": versions}, status=status)

    async def _list(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        wanted = request.query.get("visibility")
        images = [
            image.record()
            for image in self.images.values()
            if image.visible_to(caller)
            # Glance lists community images only when asked for them by visibility.
            and (image.visibility == wanted if wanted else image.visibility != "community")
        ]
        return web.json_response(
            {"images": images, "first": "/v2/images", "schema": "/v2/schemas/images"}
        )

    async def _show(self, request: web.Request) -> web.Response:
        image, _ = self._image(request)
        return web.json_response(image.record())

    async def _create(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        if not (caller.is_admin or "member" in caller.roles):
            raise web.HTTPForbidden(text="You are not authorized to complete add_image action.")
        body = await self._json(request, dict)
        image_id = body.get("id") or str(uuid.uuid4())
        if image_id in self.images:
            raise web.HTTPConflict(text=f"Image with identifier {image_id} already exists!")
        image = self.add_image(
            None,
            image_id=image_id,
            owner=caller.project,
            visibility=body.get("visibility", "shared"),
            name=body.get("name"),
        )
        location = f"http://{request.host}/v2/images/{image.id}"
        return web.json_response(image.record(), status=201, headers={"Location": location})

    async def _update(self, request: web.Request) -> web.Response:
        image, caller = self._image(request)
        self._require_owner(image, caller)
        for change in await self._json(request, list):
            name = str(change.get("path", "")).removeprefix("/")
            if change.get("op") == "remove" and name in image.properties:
                del image.properties[name]
            if change.get("op") not in ("add", "replace"):
                continue
            if name.startswith(("img_", "hw_", "os_", "x_")) and name not in (
                "os_hash_algo",
                "os_hash_value",
            ):
                image.properties[name] = change["value"]
            elif change.get("path") == "/name":
                image.name = change["value"]
            elif change.get("path") == "/visibility":
                if change["value"] not in VISIBILITIES:
                    raise web.HTTPBadRequest(text=f"Invalid visibility value: {change['value']}")
                image.visibility = change["value"]
        image.updated_at = _now()
        return web.json_response(image.record())

    async def _delete(self, request: web.Request) -> web.Response:
        image, caller = self._image(request)
        self._require_owner(image, caller)
        del self.images[image.id]
        return web.Response(status=204)

    async def _action(self, request: web.Request) -> web.Response:
        image, caller = self._image(request)
        if not caller.is_admin:
            raise web.HTTPForbidden(text="You are not authorized to complete this action.")
        deactivate = request.match_info["action"] == "deactivate"
        image.status = "deactivated" if deactivate else "active"
        return web.Response(status=204)

    async def _add_member(self, request: web.Request) -> web.Response:
        image, caller = self._image(request)
        self._require_owner(image, caller)
        member = (await self._json(request, dict)).get("member")
        if not member:
            raise web.HTTPBadRequest(text="Member to be added not specified")
        if member in image.members:
            raise web.HTTPConflict(text=f"Member {member} already exists.")
        image.members.add(member)  # accepted at once: the member sees the image right away
        answer = {"image_id": image.id, "member_id": member, "status": "accepted"}
        return web.json_response({**answer, "schema": "/v2/schemas/member"})

    async def _remove_member(self, request: web.Request) -> web.Response:
        image, caller = self._image(request)
        self._require_owner(image, caller)
        member = request.match_info["member"]
        if member not in image.members:
            raise web.HTTPNotFound(text=f"{member} is not a member of image {image.id}")
        image.members.discard(member)
        return web.Response(status=204)

    async def _head_file(self, request: web.Request) -> web.Response:
        return web.Response(status=405, headers={"Allow": "GET, PUT"})

    async def _upload(self, request: web.Request) -> web.Response:
        image, caller = self._image(request)
        self._require_owner(image, caller)
        if image.status != "queued":
            raise web.HTTPConflict(text=f"Image status transition from {image.status} to saving")
        data = bytearray()
        async for piece in request.content.iter_any():
            data += piece
        image.set_data(bytes(data))
        return web.Response(status=204)

    async def _download(self, request: web.Request) -> web.StreamResponse:
        """`GET /v2/images/{id}/file` with Glance 33's checks, in Glance's order (API.md §1)."""
        if self.fail_downloads is not None:
            return web.Response(status=self.fail_downloads, text="failing (fail_downloads)")
        image, caller = self._image(request)
        if image.status == "deactivated" and not caller.is_admin:
            raise web.HTTPForbidden(
                text="The requested image has been deactivated. Image data download is forbidden."
            )
        if not (caller.is_admin or "member" in caller.roles):
            raise web.HTTPForbidden(
                text="You are not authorized to complete download_image action."
            )
        if image.data is None or image.status == "queued":
            if self.range_crash and "Range" in request.headers:
                # Glance 33's Range handling on an image without data: a traceback, and
                # uWSGI hangs up without a reply.
                self.range_crashes += 1
                if request.transport is not None:
                    request.transport.close()
                return web.Response(status=500)  # never reaches the closed connection
            raise web.HTTPNoContent()
        size = len(image.data)
        range_header = request.headers.get("Range")
        start, stop = (0, size) if range_header is None else _byte_range(range_header, size)
        if range_header is not None and not image.ranges_supported:
            # glance_store.StoreRandomGetNotSupported -> 400 (image_data.py download)
            raise web.HTTPBadRequest(text="Random access is not supported by this store.")
        if image.no_data_204:  # glance_store.NotFound -> 204 (a missing backend file)
            raise web.HTTPNoContent()
        body = image.body(start, stop)
        response = web.StreamResponse(status=200 if range_header is None else 206)
        response.content_type = "application/octet-stream"
        if image.checksum:
            response.headers["Content-MD5"] = image.checksum  # hex md5 of the whole image
        if range_header is not None:
            response.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        if range_header is None and image.no_content_length:
            response.enable_chunked_encoding()  # a miss through Glance's cache middleware
        else:
            response.content_length = len(body)
        await self._stream(request, response, image, body)
        return response

    async def _stream(
        self, request: web.Request, response: web.StreamResponse, image: FakeImage, body: bytes
    ) -> None:
        """Send headers after `delay`, then `body` in pieces, honouring `rate` and `cut_after`."""
        view, sent = memoryview(body), 0
        task = asyncio.current_task()
        assert task is not None
        self._downloads.add(task)  # for close() to cancel
        try:
            if image.delay:
                await asyncio.sleep(image.delay)
            await response.prepare(request)
            while True:
                limit = len(body) if image.cut_after is None else min(image.cut_after, len(body))
                if sent >= limit:
                    break
                if sent and (image.hold_after is None or sent >= image.hold_after):
                    # (the first piece always goes: authorisation probes are answered)
                    await image.flowing.wait()
                rate = image.rate
                step = CHUNK if not rate else max(1, min(CHUNK, rate // 10))
                cap = self._cap
                if cap is not None:
                    step = min(step, cap.burst)
                piece = view[sent : min(sent + step, limit)]
                if cap is not None:
                    await cap.take(len(piece))  # the link all downloads share
                await response.write(piece)
                sent += len(piece)
                self.bytes_sent[image.id] = self.bytes_sent.get(image.id, 0) + len(piece)
                if rate:
                    await asyncio.sleep(len(piece) / rate)
            if sent < len(body) and request.transport is not None:
                # close() flushes what was written, then ends the connection mid-body.
                request.transport.close()
        except ConnectionError:
            pass  # the client went away
        finally:
            self._downloads.discard(task)
