"""Glance's API version document (``GET /versions``), as Glance 33 builds it with a cache,
and the last good one an upstream gave, for answering while it is unreachable.

State: :class:`LastGood` belongs to the pass-through that relays ``/versions``; it is read
and replaced on the event loop only.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from cached.upstream.glance import GlanceBackend

log = logging.getLogger("cached.versions")

# Glance 33 with image_cache_dir set: 2.14-2.18 are the cache API microversions that
# python-glanceclient probes for before any ``glance cache-*`` command.
_VERSIONS = [("2.18", "CURRENT")] + [
    (v, "SUPPORTED")
    for v in (
        "2.17",
        "2.16",
        "2.15",
        "2.14",
        "2.9",
        "2.7",
        "2.6",
        "2.5",
        "2.4",
        "2.3",
        "2.2",
        "2.1",
        "2.0",
    )
]
CACHE_API_VERSIONS = ("2.14", "2.15", "2.16", "2.17", "2.18")


def document(base_url: str) -> dict[str, Any]:
    """The version document with links under ``base_url`` (``http://host:port``)."""
    href = base_url.rstrip("/") + "/v2/"
    return {
        "versions": [
            {"id": f"v{v}", "status": status, "links": [{"rel": "self", "href": href}]}
            for v, status in _VERSIONS
        ]
    }


def with_cache_api(doc: dict[str, Any], base_url: str) -> dict[str, Any]:
    """Make an upstream's version document advertise the cache API that cached serves."""
    versions = doc.get("versions")
    if not isinstance(versions, list):
        return doc
    have = {v.get("id") for v in versions if isinstance(v, dict)}
    if all(f"v{v}" in have for v in CACHE_API_VERSIONS):
        return doc
    href = base_url.rstrip("/") + "/v2/"
    for v in versions:
        if isinstance(v, dict) and v.get("status") == "CURRENT":
            v["status"] = "SUPPORTED"
    added = [
        {
            "id": f"v{v}",
            "status": "CURRENT" if v == "2.18" else "SUPPORTED",
            "links": [{"rel": "self", "href": href}],
        }
        for v in reversed(CACHE_API_VERSIONS)
        if f"v{v}" not in have
    ]
    doc["versions"] = added + versions
    return doc


# The versions cached's own document (the file store's API) routes: what it advertises.
OWN_IDS = frozenset(f"v{v}" for v, _ in _VERSIONS)


async def upstream_ids(backend: GlanceBackend) -> list[str] | None:
    """The version ids of the upstream's own document (``GET /versions``), or None when it
    answered something else. Raises UpstreamUnavailable when it cannot be reached."""
    upstream = await backend.send("GET", "/versions", CIMultiDict({"Accept": "application/json"}))
    try:
        body = await upstream.read()
    finally:
        upstream.release()
    if upstream.status != 200:
        return None
    try:
        doc = json.loads(body)
        return [str(v["id"]) for v in doc["versions"] if isinstance(v, dict) and "id" in v]
    except (ValueError, TypeError, KeyError):
        return None


@dataclass
class LastGood:
    """The last version document the upstream answered (as it sent it: its own links), to
    answer ``GET /versions`` while the upstream is unreachable or failing (5xx):
    python-glanceclient asks for it before every ``glance cache-*`` call, and cached's own
    cache API is up during a Glance outage. Never seen one: cached's own document."""

    doc: dict[str, Any] | None = None
    warned_at: float = -float("inf")
    cache_name: str = "cached"  # in Cache-Status (RFC 9211): cached-<id> in a fleet

    def remember(self, doc: dict[str, Any]) -> None:
        self.doc = copy.deepcopy(doc)

    def answer(
        self, request: web.Request, why: object, relink: Any, upstream_base: str
    ) -> web.Response:
        """The remembered document (relinked to the caller's base URL by ``relink``, the
        cache API added), or cached's own; logged at most once a minute."""
        base = f"{request.scheme}://{request.host}"
        if self.doc is not None:
            doc = with_cache_api(relink(copy.deepcopy(self.doc), upstream_base, base), base)
        else:
            doc = document(base)
        # Glance's rule (glance/api/versions.py): 200 when asked by name, 300 at the root.
        status = 200 if request.path.rstrip("/").endswith("/versions") else 300
        now = time.monotonic()
        if now - self.warned_at > 60:
            self.warned_at = now
            log.warning(
                "GET %s: the upstream is unavailable (%s): answered with %s version document",
                request.path,
                why,
                "its last" if self.doc is not None else "cached's own",
            )
        return web.Response(
            status=status,
            body=json.dumps(doc),
            content_type="application/json",
            headers={
                "x-openstack-request-id": f"req-{uuid.uuid4()}",
                # RFC 9211: not from the origin now; a stored answer, the origin failing.
                "Cache-Status": f"{self.cache_name}; hit; detail=upstream-unavailable",
            },
        )
