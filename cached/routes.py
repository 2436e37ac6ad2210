"""Which image a request names, read the way the upstream will route it.

Glance routes ``/v2/...`` and every advertised ``/v2.N/...`` to the same handlers, and the
path reaches it percent-decoded, with dot segments removed (by our HTTP client, or by the
server) and possibly with empty segments. Every decision cached takes on an image path (is
this a download? which image did this request change?) is made on the one canonical form
computed here, so no spelling of a path escapes it. Image ids are lower-cased: Glance's
database compares ids case-insensitively (MySQL), so ``ABC...`` and ``abc...`` are the same
image and must be the same cache entry.

Pure functions, no shared state: called from request handlers on the event loop.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

from aiohttp import web

from cached.errors import UpstreamUnavailable
from cached.ids import is_image_id
from cached.upstream import Backend, Credentials, Decision

_IMAGE = re.compile(r"/v2(?:\.[0-9]+)?/images/([^/]+)(/.*)?", re.ASCII)


@dataclass(frozen=True)
class ImageRoute:
    """A path under one image: ``rest`` is ``""`` for the image itself, else e.g.
    ``/file``, ``/members/p2``, ``/actions/deactivate``."""

    image_id: str  # lower case
    rest: str
    spelled: str = ""  # the id as the request spelled it

    @property
    def is_data(self) -> bool:
        return self.rest == "/file"


def canonical(target: str) -> str:
    """The path of a request target as routed: query dropped, percent-decoded once, dot
    segments removed (RFC 3986 §5.2.4) and empty segments merged."""
    path = urllib.parse.unquote(target.partition("?")[0], errors="surrogateescape")
    return "/" + "/".join(segments(path))


def segments(path: str) -> list[str]:
    """The segments of a (decoded) path with dot segments removed and empty ones merged."""
    out: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    return out


def image_route(target: str) -> ImageRoute | None:
    """The image a request target names (any ``/v2.N`` prefix, any spelling), or None."""
    match = _IMAGE.fullmatch(canonical(target))
    if match is None:
        return None
    spelled = match.group(1)
    if not is_image_id(spelled):
        return None
    return ImageRoute(spelled.lower(), match.group(2) or "", spelled)


def request_route(request: web.Request) -> ImageRoute | None:
    """:func:`image_route` of the request as the client sent it (``raw_path``)."""
    return image_route(request.raw_path)


def image_id(request: web.Request) -> str:
    """The ``{image_id}`` of a matched download route, lower-cased (the cache key)."""
    return request.match_info["image_id"].lower()


def as_download(request: web.Request, route: ImageRoute) -> web.Request:
    """Give a download reached by another spelling the match a direct one has."""
    request.match_info["image_id"] = route.spelled
    return request


async def refused_spelling(backend: Backend, request: web.Request) -> web.Response | None:
    """The upstream's refusal of an id spelled in upper case, or None.

    Whether ``ABC...`` names image ``abc...`` is the upstream's call (MySQL compares ids
    case-insensitively, SQLite does not: Glance 33 on SQLite answers 404), so such a
    download is first authorised as spelled; only then is the lower-case entry used.
    """
    spelled = request.match_info["image_id"]
    if spelled == spelled.lower() or not is_image_id(spelled):
        return None
    try:
        answer = await backend.authorize(spelled, Credentials.from_headers(request.headers))
    except UpstreamUnavailable:
        return None  # the download's own authorisation reports it
    if answer.decision is not Decision.DENY:
        return None
    return web.Response(status=answer.status, body=answer.body, headers=dict(answer.headers))
