"""Which route a request takes at the upstream, read the way Glance 33 routes it.

Glance's version negotiation (``glance/api/middleware/version_negotiation.py``) picks the
API version before its router sees the path, in one of two ways:

* **media type**: an ``Accept`` that starts with ``application/vnd.openstack.images-`` names
  the version (``-v2``, ``-v2.1``, ...) and the path is *not* stripped: ``POST
  /metadefs/namespaces`` with ``Accept: application/vnd.openstack.images-v2`` is ``POST
  /v2/metadefs/namespaces``, and ``/v2/images/ID/file`` with it is ``/v2/v2/...`` (404);
* **URL**: otherwise the first path segment is the version (``v2``, ``v2.N``).

A version Glance does not allow gets its version choices (300); ``/versions/...`` gets the
version document. Some versions are allowed only with some of Glance's options (the cache
API's ``v2.14/16/18``, multi-store's ``v2.8``, ``v2.10``-``v2.13``): which, the upstream's
own version document says (:class:`UpstreamVersions`). The router then matches the path as
the server passed it: percent-decoded, dot segments removed, empty segments merged; a
trailing ``/`` matches no route (404).

:func:`route` is the one function that reads a request so: every decision cached takes on a
path (which policy rule applies? is this a download the cache may serve? which image did a
change touch?) is taken on the :class:`Routed` it returns, for the request exactly as it is
relayed (path and every ``Accept`` value unchanged). A versioned media type that cached
cannot read exactly as webob would (parameters, lists, other cases) is refused (400) rather
than guessed. Image ids are lower-cased: Glance's database compares ids case-insensitively
(MySQL), so ``ABC...`` and ``abc...`` are the same image and must be the same cache entry.

State: :class:`UpstreamVersions` holds the optional versions the upstream allows, learnt
from its version document; only the event loop changes it (the request that reads the
document). Everything else here is pure functions.
"""

from __future__ import annotations

import asyncio
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import Enum

from aiohttp import web

from cached.errors import UpstreamUnavailable
from cached.ids import is_image_id
from cached.upstream import Backend, Credentials, Decision

_IMAGE = re.compile(r"/v2(?:\.[0-9]+)?/images/([^/]+)(/.*)?", re.ASCII)
_ROUTED_IMAGE = re.compile(r"/v2/images/([^/]+)(/.*)?", re.ASCII)

MEDIA_TYPE = "application/vnd.openstack.images-"
# The one spelling of a versioned media type read here: webob compares it case-sensitively
# and normalises parameters and lists, which cached does not try to reproduce.
_MEDIA_VERSION = re.compile(r"application/vnd\.openstack\.images-(v[0-9]+(?:\.[0-9]+)?)", re.ASCII)
# Glance 33's allowed versions (VersionNegotiationFilter._get_allowed_versions): always, and
# only with image_cache_dir (cache API) or enabled_backends (multi-store) set.
ALWAYS = frozenset(
    ["v2", "v2.0", "v2.1", "v2.2", "v2.3", "v2.4", "v2.5", "v2.6", "v2.7", "v2.9", "v2.15", "v2.17"]
)
OPTIONAL = frozenset(["v2.8", "v2.10", "v2.11", "v2.12", "v2.13", "v2.14", "v2.16", "v2.18"])


class Kind(Enum):
    """What Glance's version negotiation makes of a request."""

    API = "api"  # its v2 router gets Routed.path
    VERSIONS = "versions"  # the version document (200): the first segment is ``versions``
    CHOICES = "choices"  # an unknown version: 300 with the version choices
    UNREAD = "unread"  # a versioned media type cached does not read exactly: refused (400)


@dataclass(frozen=True)
class Routed:
    """A request as Glance routes it.

    ``path`` is what its v2 router matches (``/v2/...``, canonical) for ``Kind.API``.
    ``trailing``: the path ends in ``/``, which no route matches (Glance answers 404).
    ``certain`` is False when the version is one Glance allows only with some options and
    the upstream's version document has not been read: the request may be routed or not.
    """

    kind: Kind
    path: str = ""
    trailing: bool = False
    certain: bool = True
    by_media_type: bool = False

    @property
    def may_route(self) -> bool:
        """Glance's router may match it (policy rules apply)."""
        return self.kind is Kind.API and not self.trailing

    @property
    def image(self) -> ImageRoute | None:
        """The image the routed path names, whether or not a route matches it: a change
        answered 2xx on it changed that image."""
        if self.kind is not Kind.API:
            return None
        match = _ROUTED_IMAGE.fullmatch(self.path)
        if match is None or not is_image_id(match.group(1)):
            return None
        return ImageRoute(match.group(1).lower(), match.group(2) or "", match.group(1))

    @property
    def download(self) -> ImageRoute | None:
        """The image whose data Glance surely serves on this path, or None."""
        image = self.image
        if image is None or not image.is_data or self.trailing or not self.certain:
            return None
        return image


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


def _trailing(path: str) -> bool:
    """Whether a decoded path ends in ``/`` once dot segments are removed."""
    last = path.rpartition("/")[2]
    return path != "/" and last in ("", ".", "..") and bool(segments(path))


def allowed(version: str | None, optional: frozenset[str] | None) -> bool | None:
    """Whether Glance routes ``version`` (a ``v2.N`` token); None: it depends on options of
    the upstream's that are not known yet (``optional`` None)."""
    if version in ALWAYS:
        return True
    if version in OPTIONAL:
        return None if optional is None else version in optional
    return False


def route(target: str, accept: Iterable[str], optional: frozenset[str] | None) -> Routed:
    """How Glance 33 routes a request to ``target`` with these ``Accept`` values.

    ``optional``: the optional versions the upstream allows, None if not known yet.
    """
    path = urllib.parse.unquote(target.partition("?")[0], errors="surrogateescape")
    parts = segments(path)
    if parts[:1] == ["versions"]:
        return Routed(Kind.VERSIONS)
    trailing = _trailing(path)
    accepts = list(accept)
    if any("vnd.openstack.images" in a.lower() for a in accepts):
        # A WSGI server joins repeated headers with ", ": only one plain value is read.
        match = _MEDIA_VERSION.fullmatch(accepts[0]) if len(accepts) == 1 else None
        if match is None:
            return Routed(Kind.UNREAD)
        ok = allowed(match.group(1), optional)
        if ok is False:
            return Routed(Kind.CHOICES, by_media_type=True)
        routed = "/" + "/".join(["v2", *parts])
        return Routed(Kind.API, routed, trailing, ok is True, by_media_type=True)
    ok = allowed(parts[0] if parts else None, optional)
    if ok is False:
        return Routed(Kind.CHOICES)
    return Routed(Kind.API, "/" + "/".join(["v2", *parts[1:]]), trailing, ok is True)


class UpstreamVersions:
    """The optional versions the upstream allows, read from its version document.

    ``known`` is None until a document was read. :meth:`learn` reads it at most once at a
    time (callers share the reading) and again only after ``retry`` seconds when it failed.
    Changed on the event loop only.
    """

    def __init__(
        self,
        fetch: Callable[[], Awaitable[Iterable[str] | None]] | None = None,
        known: frozenset[str] | None = None,
    ) -> None:
        self.fetch = fetch
        self.known = known
        self._reading: asyncio.Future[None] | None = None
        self._failed_at = -1e9

    def read(self, ids: Iterable[str]) -> None:
        """Take the version ids of an upstream document (``v2.18``, ...)."""
        self.known = frozenset(ids) & OPTIONAL

    async def learn(self, retry: float = 10.0) -> None:
        """Read the upstream's document if it is not known (bounded by the fetch's own
        timeouts); on failure the versions stay unknown and requests are judged both ways."""
        if self.known is not None or self.fetch is None:
            return
        loop = asyncio.get_running_loop()
        if self._reading is None:
            if loop.time() - self._failed_at < retry:
                return
            self._reading = loop.create_future()
            try:
                ids = await self.fetch()
                if ids is not None:
                    self.read(ids)
                else:
                    self._failed_at = loop.time()
            except Exception:  # an unreachable upstream: judged later, both ways meanwhile
                self._failed_at = loop.time()
            finally:
                reading, self._reading = self._reading, None
                reading.set_result(None)
            return
        await asyncio.shield(self._reading)


ROUTED = web.RequestKey("routed", Routed)


def routed(request: web.Request) -> Routed:
    """The :class:`Routed` the routing middleware stored (cached/app.py), or one read now
    with the optional versions unknown."""
    found = request.get(ROUTED)
    if found is None:
        found = route(request.raw_path, request.headers.getall("Accept", []), None)
    return found


def image_route(target: str) -> ImageRoute | None:
    """The image a request target names (any ``/v2.N`` prefix, any spelling), or None."""
    match = _IMAGE.fullmatch(canonical(target))
    if match is None:
        return None
    spelled = match.group(1)
    if not is_image_id(spelled):
        return None
    return ImageRoute(spelled.lower(), match.group(2) or "", spelled)


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
        answer = await backend.authorize(
            spelled, Credentials.from_headers(request.headers), request.headers.get("Accept")
        )
    except UpstreamUnavailable:
        return None  # the download's own authorisation reports it
    if answer.decision is not Decision.DENY:
        return None
    return web.Response(status=answer.status, body=answer.body, headers=dict(answer.headers))
