"""Glance's API version document (``GET /versions``), as Glance 33 builds it with a cache."""

from __future__ import annotations

import json
from typing import Any

from multidict import CIMultiDict

from cached.upstream.glance import GlanceBackend

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
