"""Glance's API version document (``GET /versions``), as Glance 33 builds it with a cache."""

from __future__ import annotations

from typing import Any

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
