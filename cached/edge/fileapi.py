"""The Glance-compatible image API a ``file://`` store answers: what the clients call around
a download (versions, image list, image record, schemas) and a download passed through.

Owns the emulation: routing of the few paths, Glance's status codes and error pages (404 for
anything else, 405 for any change, 400 for several ranges, 416), and streaming a passed-through
download at the client's pace. What it answers with comes from
:class:`cached.upstream.filestore.FileBackend`, which only reads the store (and classifies its
errors). Stateless after construction: called from request handlers on the event loop.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from cached.edge import ranges, replies, versions
from cached.edge.passthrough import ReplyHook
from cached.errors import UpstreamError, UpstreamUnavailable
from cached.upstream import Credentials
from cached.upstream.filestore import FileBackend, PageError, glance_error, shaped

# A passed-through download is read and written this much at a time (per client).
_PIECE = 256 << 10


class FileApi:
    """Answers the image API from the store ``backend`` reads (a ``PassThrough``)."""

    def __init__(self, backend: FileBackend):
        self._backend = backend

    async def answer(
        self, request: web.Request, before_reply: ReplyHook | None = None
    ) -> web.StreamResponse:
        """Emulate the parts of the image API the clients call around a download."""
        response = await self._answer(request, before_reply)
        if before_reply is not None and not response.prepared:
            await before_reply(response)
        return response

    async def versions(self, request: web.Request) -> web.StreamResponse:
        """Glance 33's version document, with the cache API, linking to the proxy."""
        return await self.answer(request)

    async def _answer(
        self, request: web.Request, before_reply: ReplyHook | None
    ) -> web.StreamResponse:
        backend = self._backend
        creds = Credentials.from_headers(request.headers)
        path = request.path.rstrip("/") or "/"
        base = f"{request.scheme}://{request.host}"
        try:
            if path in ("/", "/versions") and request.method == "GET":
                return web.json_response(
                    versions.document(base), status=200 if path == "/versions" else 300
                )
            backend.check_token(creds)
            if request.method != "GET":
                raise glance_error(
                    405, "Method Not Allowed", "The file store behind cached is read-only."
                )
            if path == "/v2/images":
                images = await backend.records(creds)
                return web.json_response(
                    {"images": images, "first": "/v2/images", "schema": "/v2/schemas/images"}
                )
            if path.startswith("/v2/images/") and path.endswith("/file") and path.count("/") == 4:
                # Pass-through of a download (the cache is unavailable, or several ranges).
                return await self._download(request, path.split("/")[3], creds, before_reply)
            if path.startswith("/v2/images/") and path.count("/") == 3:
                image_id = path.rsplit("/", 1)[1]
                return web.json_response((await backend.record(image_id, creds)).raw)
            if path in ("/v2/schemas/image", "/v2/schemas/images"):
                return web.json_response(_schema(path.endswith("images")))
            raise glance_error(404, "Not Found", "The resource could not be found.")
        except UpstreamError as err:
            body, headers = shaped(err, request.headers.get("Accept"))
            return web.Response(status=err.status, body=body, headers=headers)
        except UpstreamUnavailable as exc:
            # The cause (paths, errno) goes to the log under the request id, not to callers.
            return replies.unreachable(request, exc)

    async def _download(
        self,
        request: web.Request,
        image_id: str,
        creds: Credentials,
        before_reply: ReplyHook | None,
    ) -> web.StreamResponse:
        """A download passed through (several ranges, or the cache unavailable), answered
        as Glance does; the file is read a piece at a time, each written out (and drained)
        before the next is read, so a client that does not read holds one piece."""
        async with self._backend.open_image(image_id, creds) as image:
            size = image.size
            try:
                wanted = ranges.parse(request.headers.get("Range"), size)
            except ranges.MultipleRanges:
                raise glance_error(
                    400, "Bad Request", "Requests with multiple ranges are not supported."
                ) from None
            except (ranges.MalformedRange, ranges.RangeNotSatisfiable) as exc:
                detail = getattr(exc, "detail", "Invalid Range header.")
                err = PageError(416, replies.RANGE_NOT_AVAILABLE, detail)
                err.headers["Content-Range"] = f"bytes */{size}"
                raise err from None
            response = web.StreamResponse(status=200 if wanted is None else 206)
            response.content_type = "application/octet-stream"
            start, end = (0, size) if wanted is None else (wanted.start, wanted.end)
            if wanted is not None:
                response.headers["Content-Range"] = wanted.content_range()
            response.content_length = end - start
            if before_reply is not None:
                await before_reply(response)
            await response.prepare(request)
            stream = image.stream(start, end)
            while piece := await stream.read(_PIECE):
                await response.write(piece)
            await response.write_eof()
            return response


def _schema(plural: bool) -> dict[str, Any]:
    # Like Glance's, server-maintained properties are readOnly: glanceclient builds CLI
    # options from the writable ones, and its own --size etc. would clash otherwise.
    ro = {"readOnly": True}
    image = {
        "name": "image",
        "additionalProperties": {"type": "string"},
        "properties": {
            "id": {"type": "string", **ro},
            "name": {"type": ["null", "string"]},
            "status": {"type": "string", **ro},
            "visibility": {"type": "string"},
            "size": {"type": ["null", "integer"], **ro},
            "virtual_size": {"type": ["null", "integer"], **ro},
            "checksum": {"type": ["null", "string"], **ro},
            "os_hash_algo": {"type": ["null", "string"], **ro},
            "os_hash_value": {"type": ["null", "string"], **ro},
            "owner": {"type": ["null", "string"], **ro},
            "created_at": {"type": "string", **ro},
            "updated_at": {"type": "string", **ro},
            "self": {"type": "string", **ro},
            "file": {"type": "string", **ro},
            "schema": {"type": "string", **ro},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "links": [
            {"rel": "self", "href": "{self}"},
            {"rel": "enclosure", "href": "{file}"},
            {"rel": "describedby", "href": "{schema}"},
        ],
    }
    if not plural:
        return image
    return {
        "name": "images",
        "properties": {"images": {"type": "array", "items": image}},
        "links": [{"rel": "first", "href": "{first}"}],
    }
