"""The cache management API, answered by the daemon itself (never proxied), admins only.

Glance 33's v2 Cache API (python-glanceclient ``glance cache-*``), also under ``/v2.N/``:

=============================  =======  ==================================================
``GET /v2/cache``              200      ``{"cached_images": [...], "queued_images": [...]}``
``DELETE /v2/cache``           204      header ``x-image-cache-clear-target``: cache|queue|
``PUT /v2/cache/{id}``         202      queue it and start fetching now
``DELETE /v2/cache/{id}``      204      drop it from the cache and the queue
``POST /v2/cache/clean``       200      the clean job
``POST /v2/cache/prune``       200      ``{"total_files_pruned": N, "total_bytes_pruned": N}``
``GET /v2/cache/nodes/{id}``   200      ``["http://this-node:9292", <peers holding it>]``
=============================  =======  ==================================================

In a fleet (cached/fleet/), ``GET /v2/cache/nodes/{id}`` lists the members holding a
verified copy (their ``fleet_members`` urls, this member's first), found by the signed
``HEAD`` each sibling answers from memory (not their ``GET /v2/cache``), within
``NODES_WITHIN`` seconds: members that did not answer in time are named in the
``x-cached-unreachable`` header (comma-separated urls) and left out of the list. Deletes
(``DELETE /v2/cache/{id}``, ``DELETE /v2/cache``, the legacy ones) stay node-local, as
``glance-cache-manage`` is node-local: they drop this member's copy only (an image deleted
from Glance through any member drops every copy: cached/fleet/notices.py);
``cached-manage --all-hosts`` deletes on every member. ``GET /v2/cache/fleet`` (cached's
extension, fleet only, else 404): this member's view of the fleet, the document of
cached/fleet/state.py (``cached-manage fleet-status`` reads it from every member with the
operator's token, never the fleet key).

The legacy ``glance-cache-manage`` API under ``/v1/``, ``/v2/`` (and ``/v2.N/``):
``GET|DELETE cached_images``, ``DELETE cached_images/{id}``, ``GET|DELETE queued_images``,
``PUT|DELETE queued_images/{id}``; 200 with Glance's JSON bodies (``null`` for single-image
actions, ``{"num_deleted": N}`` for the delete-all ones).

cached's extension, ``GET /v2/cache/progress`` (kept out of ``GET /v2/cache``: glanceclient
prints every top-level key of that document but ``cached_images`` as queued rows)::

    {"progress": {"<image id>": {
        "state": "fetching" | "waiting" | "queued" | "failed",
        "bytes_done": 123, "size": 456 | null,      # bytes in the cache / image size
        "rate": 1.5e7 | null,                       # bytes/s from the upstream, this fetch
        "failures": 0, "last_error": null,           # queued images only:
        "last_attempt": null, "next_attempt": null}}, # the prefetch record (epoch seconds)
     "directories": [{"name": "cache" | "store", "directory": "/var/lib/cached",
        "state": "ok" | "read_only" | "vanished" | "hung" | "failing", "reason": "...",
        "since": "2026-01-01T00:00:00.000000Z", ...}]}   # cached/cachedir/guard.py Guard.status()

Listed: every queued image, and every image being filled for a client (no ``failures``...).

cached's content-safety endpoints (issue 18; cached/safety/audit.py), JSON, beside the other
extensions under ``/v2/cache/`` (``GET /v2/cache`` itself stays Glance's document):

=============================================  ====  ========================================
``GET /v2/cache/safety``                       200   every complete entry's verdict, the
                                                     overrides, the violations (enforce), the
                                                     last audit
``GET /v2/cache/safety/{id}``                  200   one image's verdict (404: not cached, no
                                                     override, no violation recorded)
``POST /v2/cache/safety/{id}/recheck``         200   inspect it again from its file now
``POST /v2/cache/safety/audit``                202   start an audit pass (``?every=true``:
                                                     current verdicts too)
``PUT /v2/cache/safety/{id}/override``         200   ``{"os_hash_value": H, "reason": "..."}``
``DELETE /v2/cache/safety/{id}/override``      204   withdraw it (404: there was none)
=============================================  ====  ========================================

A verdict row::

    {"image_id": "...", "cached": true, "size": 123, "os_hash_value": "ab12..." | null,
     "verdict": "unsafe" | null, "current": true, "detected": "qcow2", "declared": "raw",
     "container": "bare", "checks": ["backing_file"], "ignored": [], "virtual_size": 1048576,
     "oslo_utils": "10.2.0", "policy": "1f0c9a2e",
     "override": {"os_hash_value": "...", "at": 1765080000.0, "reason": "..."} | null,
     "overridden": false,          # the override applies to the cached bytes' hash value
     "signature_violation": "bad-signature" | null}  # enforce: kept out for its signature

``verdict`` null: the entry has none (filled before inspection, or with ``off``);
``current`` false: made by another oslo.utils version or policy (inspected again on its next
hit or audit). Under enforce an image kept out of the cache (``cached`` false) is shown with
the verdict of its violation record and ``os_hash_value`` the record's; the list's
``violations`` holds those rows. With ``image_safety_mode: off`` every safety endpoint
answers 404.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from cached.cachedir.directories import Directories
from cached.cachedir.mounts import State
from cached.config import Config
from cached.edge import replies
from cached.errors import CachedError, StoreUnavailable, UpstreamError, UpstreamUnavailable
from cached.fill.registry import Filler
from cached.fleet.peers import COMPLETE, Fleet
from cached.identity.keystone import ServiceAuth
from cached.ids import is_image_id
from cached.jobs.prefetch import Prefetcher
from cached.jobs.schedule import Maintenance, audit_busy
from cached.manage.access import Access, AdminGuard
from cached.safety.audit import Safety
from cached.safety.inspect import VERSION as INSPECTOR_VERSION
from cached.safety.overrides import HASH
from cached.safety.verdict import Verdict
from cached.store import Entry, Store
from cached.upstream import Backend, Credentials, ImageRecord

log = logging.getLogger("cached.manage")
T = TypeVar("T")

_PEER_TIMEOUT = aiohttp.ClientTimeout(total=5)
# Seconds GET /v2/cache/nodes/{id} waits for the members' HEAD answers (answered from
# memory, in milliseconds): at least 0.5, at most 0.8, else fleet_lookup_timeout.
NODES_WITHIN = (0.5, 0.8)
UNREACHABLE = "x-cached-unreachable"


class ImageNotFound(CachedError):
    """The image is unknown (to the upstream, for this caller) and not held here."""


class ImageNotActive(CachedError):
    """Only active images can be cached."""


class BadRequest(CachedError):
    """A body on a GET, a bad header, an id that is no UUID."""


class SafetyOff(CachedError):
    """``image_safety_mode: off``: no verdicts to show (a 404)."""


@dataclass
class Manager:
    """What the management handlers work with."""

    config: Config
    store: Store
    filler: Filler
    backend: Backend
    guard: AdminGuard
    prefetcher: Prefetcher
    maintenance: Maintenance
    session: aiohttp.ClientSession
    service: ServiceAuth
    directories: Directories | None = None
    safety: Safety | None = None  # image_safety_mode audit (cached/safety/audit.py)
    fleet: Fleet | None = None  # with a fleet: its members answer nodes/{id}
    fleet_view: Callable[[], dict[str, Any]] | None = None  # GET /v2/cache/fleet

    async def record(self, image_id: str, creds: Credentials) -> ImageRecord:
        """The image record, asked with the caller's credentials (404 if unknown to them).

        A caller admitted by a static admin token may hold no upstream identity at all: its
        401 is retried with the daemon's own service credentials, when there are any.
        """
        try:
            try:
                return await self.backend.record(image_id, creds)
            except UpstreamError as exc:
                service = await self.service.credentials() if exc.status == 401 else None
                if service is None:
                    raise
                return await self.backend.record(image_id, service)
        except UpstreamError as exc:
            if exc.status in (403, 404):
                raise ImageNotFound(f"Image {image_id} not found.") from None
            raise

    async def io(self, fn: Callable[..., T], *args: Any, read: bool = False) -> T:
        """Run a blocking call in the cache directory: refused at once (503, naming the state)
        while the directory is vanished, hung or failing (a change also while it is read-only),
        and on the cache guard's threads
        so that a hung share never holds the default executor's. A ``read`` that takes
        longer than the guard's probe timeout is answered with a 503 too (a change is
        waited for: answering before it is done would misreport it)."""
        guard = self.directories.cache if self.directories is not None else None
        if guard is None:
            return await asyncio.to_thread(fn, *args)
        self.check_cache(change=not read)
        if not read:
            return await guard.run_io(fn, *args)
        try:
            return await asyncio.wait_for(guard.run_io(fn, *args), guard.probe_timeout)
        except TimeoutError:
            guard.report(TimeoutError(errno.ETIMEDOUT, "cache directory read timed out"))
            raise StoreUnavailable(
                f"The cache directory did not answer within {guard.probe_timeout:g}s"
            ) from None

    def check_cache(self, *, change: bool = False) -> None:
        """Raise StoreUnavailable (a 503 naming the state) while the cache directory is
        vanished, hung or failing: nothing there is read or changed meanwhile. A ``change``
        is refused while it is read-only too: a delete that cannot unlink would drop the
        entry from the index and leave its file behind, uncounted."""
        guard = self.directories.cache if self.directories is not None else None
        refused = {State.VANISHED, State.HUNG, State.FAILING}
        if change:
            refused.add(State.READ_ONLY)
        if guard is not None and guard.state in refused:
            raise StoreUnavailable(f"The cache directory is {guard.state.value}: {guard.reason}")

    async def queued(self) -> list[str]:
        return await self.io(self.store.queued, read=True)

    async def held(self, image_id: str) -> bool:
        """Whether the image is cached (even partly), queued or invalid here."""
        if self.store.get(image_id) is not None or image_id in self.store.invalid:
            return True
        return await self.io((self.store.queue_dir / image_id).exists, read=True)

    async def drop(self, image_id: str) -> bool:
        """Delete the image's entry (safely while it is read or filled) and invalid copy."""
        self.check_cache(change=True)
        removed = await self.filler.remove(image_id)
        if image_id in self.store.invalid:
            removed |= await self.store.remove_invalid(image_id)
        return removed

    async def drop_all(self) -> int:
        """Delete every entry, complete or partial; returns how many."""
        self.check_cache(change=True)
        count = 0
        for image_id in list(self.store.entries):
            count += await self.filler.remove(image_id)
        return count

    async def dequeue_all(self) -> int:
        count = 0
        for image_id in await self.queued():
            count += await self.io(self.store.dequeue, image_id)
        return count

    async def enqueue(self, image_id: str) -> bool:
        """Queue the image unless it is cached already (Glance's ``queue_image``).

        Returns whether it is queued now.
        """
        entry = self.store.get(image_id)
        if entry is not None and entry.complete:
            return False
        await self.io(self.store.enqueue, image_id)
        return True

    async def peers_holding(self, image_id: str, token: str | None) -> list[str]:
        """The configured peers whose cache holds the image (asked with the caller's token)."""
        headers = {"X-Auth-Token": token} if token else {}

        async def ask(peer: str) -> bool:
            try:
                async with self.session.get(
                    f"{peer}/v2/cache", headers=headers, timeout=_PEER_TIMEOUT
                ) as resp:
                    if resp.status != 200:
                        log.warning("peer %s answered %d to GET /v2/cache", peer, resp.status)
                        return False
                    doc = await resp.json(content_type=None)
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                log.warning("peer %s not reachable: %r", peer, exc)
                return False
            rows = doc.get("cached_images") if isinstance(doc, dict) else None
            return any(isinstance(r, dict) and r.get("image_id") == image_id for r in rows or [])

        found = await asyncio.gather(*(ask(p) for p in self.config.peers))
        return [p for p, yes in zip(self.config.peers, found, strict=True) if yes]

    async def members_holding(self, fleet: Fleet, image_id: str) -> tuple[list[str], list[str]]:
        """The urls of the siblings holding a verified copy of the image, and of those that
        did not answer the signed ``HEAD`` within the bound (NODES_WITHIN)."""
        low, high = NODES_WITHIN
        within = min(high, max(low, fleet.timeouts.lookup))
        tasks = {m: asyncio.create_task(fleet.holding(m, image_id)) for m in fleet.siblings}
        if tasks:
            await asyncio.wait(tasks.values(), timeout=within)
        holding, silent = [], []
        for member_id, task in tasks.items():
            url = fleet.siblings[member_id].url
            if not task.done():
                task.cancel()
                silent.append(url)
            elif (answer := task.result()) is None:
                silent.append(url)
            elif answer.state == COMPLETE:
                holding.append(url)
        return holding, silent


MANAGER = web.AppKey("manager", Manager)
Handler = Callable[[Manager, web.Request], Awaitable[web.StreamResponse]]


# ----------------------------------------------------------------------- responses
def _request_id() -> dict[str, str]:
    return {"x-openstack-request-id": f"req-{uuid.uuid4()}"}


def _empty(status: int) -> web.Response:
    # Glance's serializer leaves empty answers as text/html.
    return web.Response(
        status=status, content_type="text/html", charset="UTF-8", headers=_request_id()
    )


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, headers=_request_id())


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """A webob-style plain text error page, like Glance's."""
    response = replies.glance_error(status, message, _request_id()["x-openstack-request-id"])
    response.headers.update(headers or {})
    return response


def _error_for(request: web.Request, exc: CachedError | OSError) -> web.Response:
    """The one place where domain errors become HTTP answers."""
    if isinstance(exc, StoreUnavailable):
        return _error(503, str(exc))
    if isinstance(exc, OSError):
        log.error("cache directory error: %s", exc)
        return _error(503, f"The cache directory is unavailable: {exc.strerror or exc}")
    if isinstance(exc, ImageNotFound | SafetyOff):
        return _error(404, str(exc))
    if isinstance(exc, ImageNotActive | BadRequest):
        return _error(400, str(exc))
    if isinstance(exc, UpstreamError):
        return web.Response(status=exc.status, body=exc.body, headers=exc.headers)
    if isinstance(exc, UpstreamUnavailable):
        return replies.unreachable(request, exc)
    return replies.internal(request, exc)


_DENIED = {
    Access.UNAUTHENTICATED: "This server could not verify that you are authorized to access "
    "the document you requested.",
    Access.FORBIDDEN: "You are not authorized to manage the image cache.",
    Access.UNAVAILABLE: "The identity service could not be reached to check your token.",
}


# ------------------------------------------------------------------------ handlers
def _image_id(request: web.Request, *, legacy: bool = False) -> str:
    image_id = request.match_info["image_id"].lower()  # one cache key per image (routes.py)
    if not is_image_id(image_id):
        if legacy:  # glance-cache-manage checks UUIDs itself; Glance would queue anything
            raise BadRequest(f"Image ID {image_id[:64]!r} is not a valid UUID.")
        raise ImageNotFound(f"Image {image_id[:64]} not found.")
    return image_id


def _rows(store: Store) -> list[dict[str, Any]]:
    entries = sorted(store.complete_entries(), key=lambda e: (e.last_modified, e.image_id))
    return [
        {
            "id": n,
            "image_id": e.image_id,
            "hits": e.hits,
            "last_accessed": e.last_accessed,
            "last_modified": e.last_modified,
            "size": e.size,
            "checksum": None,
        }
        for n, e in enumerate(entries, 1)
    ]


async def cache_state(m: Manager, request: web.Request) -> web.StreamResponse:
    return _json({"cached_images": _rows(m.store), "queued_images": await m.queued()})


async def clear_cache(m: Manager, request: web.Request) -> web.StreamResponse:
    target = request.headers.get("x-image-cache-clear-target", "").lower()
    if target not in ("", "cache", "queue"):
        raise BadRequest(
            "If provided 'x-image-cache-clear-target' must be 'cache', 'queue' or empty string."
        )
    cached = await m.drop_all() if target in ("", "cache") else 0
    queued = await m.dequeue_all() if target in ("", "queue") else 0
    log.info("cache cleared (%s): %d entries, %d queued", target or "both", cached, queued)
    return _empty(204)


async def queue_image(m: Manager, request: web.Request) -> web.StreamResponse:
    image_id = _image_id(request)
    creds = Credentials.from_headers(request.headers)
    record = await m.record(image_id, creds)
    if record.status != "active" or record.size is None:
        raise ImageNotActive("Only images with status active can be targeted for queueing")
    if await m.enqueue(image_id):
        m.prefetcher.start(image_id, creds, record)  # Glance 33: fetched at once
    return _empty(202)


async def delete_image(m: Manager, request: web.Request) -> web.StreamResponse:
    image_id = _image_id(request)
    m.check_cache(change=True)  # before the queue entry goes: all of it or nothing
    if not await m.held(image_id):
        try:  # Glance: 404 only for an image unknown everywhere
            await m.record(image_id, Credentials.from_headers(request.headers))
        except UpstreamError as exc:
            # A tokenless caller (the management listener's) that cached cannot ask about
            # on its behalf (no service credentials): nothing here to delete, and Glance
            # answers 204 for an image it does not cache (issue 14 item 4; it was 401).
            if exc.status != 401 or "X-Auth-Token" in request.headers:
                raise
            log.info("DELETE of %s: not held here, and no credentials to look it up", image_id)
            return _empty(204)
    await m.prefetcher.forget(image_id)  # first: a running prefetch must not refill it
    await m.drop(image_id)
    log.info("deleted %s from the cache and the queue", image_id)
    return _empty(204)


async def clean(m: Manager, request: web.Request) -> web.StreamResponse:
    await m.maintenance.clean()
    return _empty(200)


async def prune(m: Manager, request: web.Request) -> web.StreamResponse:
    result = await m.maintenance.prune()
    return _json({"total_files_pruned": result.files, "total_bytes_pruned": result.bytes})


async def nodes(m: Manager, request: web.Request) -> web.StreamResponse:
    image_id = _image_id(request)
    if not await m.held(image_id):
        await m.record(image_id, Credentials.from_headers(request.headers))
    entry = m.store.get(image_id)
    here = m.config.worker_self_reference_url or f"{request.scheme}://{request.host}"
    holding = [here] if entry is not None and entry.complete else []
    if m.fleet is None:
        holding += await m.peers_holding(image_id, request.headers.get("X-Auth-Token"))
        return _json(holding)
    others, silent = await m.members_holding(m.fleet, image_id)
    response = _json(holding + others)
    if silent:
        response.headers[UNREACHABLE] = ", ".join(silent)
    return response


async def fleet_state(m: Manager, request: web.Request) -> web.StreamResponse:
    if m.fleet_view is None:
        return _error(404, "This daemon is not a member of a fleet (fleet_members).")
    return _json(m.fleet_view())


async def progress(m: Manager, request: web.Request) -> web.StreamResponse:
    if m.directories is None:
        return _json({"progress": await m.prefetcher.progress()})
    # Never wait on a hung share here, nor fail for want of the queue: this is where
    # operators look to find out what is wrong with the directories.
    progress: dict[str, Any] = {}
    guard = m.directories.cache
    if m.directories.cache_bypass(None) in (None, "read_only"):
        try:
            progress = await asyncio.wait_for(m.prefetcher.progress(), guard.probe_timeout)
        except TimeoutError:  # hung: the guard says so within its own probe timeout
            pass
        except OSError as exc:
            guard.report(exc)
    document = {"progress": progress, "directories": m.directories.status()}
    return _json(document)


async def legacy_cached(m: Manager, request: web.Request) -> web.StreamResponse:
    keys = ("image_id", "last_accessed", "last_modified", "size", "hits")
    return _json({"cached_images": [{k: row[k] for k in keys} for row in _rows(m.store)]})


async def legacy_delete_cached(m: Manager, request: web.Request) -> web.StreamResponse:
    return _json({"num_deleted": await m.drop_all()})


async def legacy_delete_one_cached(m: Manager, request: web.Request) -> web.StreamResponse:
    await m.drop(_image_id(request, legacy=True))
    return _json(None)


async def legacy_queued(m: Manager, request: web.Request) -> web.StreamResponse:
    return _json({"queued_images": await m.queued()})


async def legacy_delete_queued(m: Manager, request: web.Request) -> web.StreamResponse:
    return _json({"num_deleted": await m.dequeue_all()})


async def legacy_queue_image(m: Manager, request: web.Request) -> web.StreamResponse:
    image_id = _image_id(request, legacy=True)
    # Like Glance: no look-up here; the prefetch records any failure on the queue entry.
    if await m.enqueue(image_id) and m.config.legacy_queue_immediate:
        m.prefetcher.start(image_id, Credentials.from_headers(request.headers))
    return _json(None)


async def legacy_delete_queued_image(m: Manager, request: web.Request) -> web.StreamResponse:
    await m.io(m.store.dequeue, _image_id(request, legacy=True))
    return _json(None)


# ------------------------------------------------------------------ content safety
def _safety(m: Manager) -> Safety:
    if m.safety is None:
        raise SafetyOff("Image content safety is off here (image_safety_mode: off).")
    return m.safety


def _verdict_row(
    safety: Safety, image_id: str, entry: Entry | None, verdict: Verdict | None
) -> dict[str, Any]:
    """One image's verdict as the safety endpoints show it (see the module docstring)."""
    override = safety.override_of(image_id)
    violation = safety.violations.get(image_id) if entry is None else None
    hash_value = (
        entry.os_hash_value
        if entry is not None
        else violation.os_hash_value
        if violation is not None
        else None
    )
    row: dict[str, Any] = {
        "image_id": image_id,
        "cached": entry is not None,
        "size": entry.size if entry is not None else None,
        "os_hash_value": hash_value,
        "verdict": verdict.outcome.value if verdict is not None else None,
        "current": safety.current(verdict),
        "detected": None,
        "declared": None,
        "container": None,
        "checks": [],
        "ignored": [],
        "virtual_size": None,
        "oslo_utils": None,
        "policy": None,
    }
    if verdict is not None:
        row |= {
            "detected": verdict.detected,
            "declared": verdict.declared,
            "container": verdict.container,
            "checks": list(verdict.checks),
            "ignored": list(verdict.ignored),
            "virtual_size": verdict.virtual_size,
            "oslo_utils": verdict.version,
            "policy": verdict.policy,
        }
    found = override.to_json() if override is not None else None
    if found is not None:
        del found["image_id"]
    row["override"] = found
    row["overridden"] = safety.overridden(image_id, hash_value)
    # enforce: kept out for its signature (its verdict above is then allowed): the result
    # (also for an entry about to be dropped: a recheck's own answer)
    recorded = safety.violations.get(image_id)
    signature = (
        recorded.signature if recorded is not None and recorded.applies_to(hash_value) else None
    )
    row["signature_violation"] = signature.result.value if signature is not None else None
    return row


def _audit_state(safety: Safety) -> dict[str, Any]:
    last = safety.last_audit
    return {"running": safety.auditing, "last": last.to_json() if last is not None else None}


async def safety_list(m: Manager, request: web.Request) -> web.StreamResponse:
    safety = _safety(m)
    m.check_cache()
    entries = sorted(m.store.complete_entries(), key=lambda e: e.image_id)
    rows = [_verdict_row(safety, e.image_id, e, v) for e, v in await safety.verdicts(entries)]
    kept_out = [
        _verdict_row(safety, image_id, None, violation.verdict)
        for image_id, violation in sorted(safety.violations.items())
    ]
    return _json(
        {
            "verdicts": rows,
            "overrides": [o.to_json() for o in safety.overrides()],
            "violations": kept_out,
            "oslo_utils": INSPECTOR_VERSION,
            "policy": safety.fingerprint,
            "audit": _audit_state(safety),
        }
    )


def _cached(m: Manager, image_id: str) -> Entry | None:
    entry = m.store.get(image_id)
    return entry if entry is not None and entry.complete else None


async def safety_show(m: Manager, request: web.Request) -> web.StreamResponse:
    safety, image_id = _safety(m), _image_id(request)
    entry = _cached(m, image_id)
    if entry is None:
        violation = safety.violations.get(image_id)
        if safety.override_of(image_id) is None and violation is None:
            raise ImageNotFound(f"Image {image_id} is not cached here.")
        verdict = violation.verdict if violation is not None else None
        return _json(_verdict_row(safety, image_id, None, verdict))
    m.check_cache()
    return _json(_verdict_row(safety, image_id, entry, await safety.stored(entry)))


async def safety_recheck(m: Manager, request: web.Request) -> web.StreamResponse:
    safety, image_id = _safety(m), _image_id(request)
    entry = _cached(m, image_id)
    if entry is None:
        raise ImageNotFound(f"Image {image_id} is not cached here.")
    m.check_cache(change=True)
    image: ImageRecord | None = None
    try:  # its declaration as the upstream states it now; else the one its verdict kept
        image = await m.record(image_id, Credentials.from_headers(request.headers))
    except CachedError as exc:
        log.info("recheck of %s without its record (%s): the kept declaration", image_id, exc)
    verdict = await safety.recheck(entry, image)
    log.info("safety recheck of %s by an admin: %s", image_id, verdict and verdict.outcome.value)
    return _json(_verdict_row(safety, image_id, entry, verdict))


async def safety_audit(m: Manager, request: web.Request) -> web.StreamResponse:
    safety = _safety(m)
    m.check_cache(change=True)
    every = request.query.get("every", "").lower() in ("1", "true", "yes")
    started = safety.start_audit(
        m.store.complete_entries, audit_busy(m.store, m.filler), every=every
    )
    log.info("safety audit %s by an admin", "started" if started else "already running")
    return _json({"started": started, "audit": _audit_state(safety)}, status=202)


async def safety_override(m: Manager, request: web.Request) -> web.StreamResponse:
    safety, image_id = _safety(m), _image_id(request)
    if request.method == "DELETE":
        m.check_cache(change=True)
        if not await safety.remove_override(image_id):
            raise ImageNotFound(f"Image {image_id} has no safety override.")
        return _empty(204)
    try:
        body = await request.json() if request.body_exists else None
    except ValueError:
        raise BadRequest("The body is not JSON.") from None
    hash_value = body.get("os_hash_value") if isinstance(body, dict) else None
    if not isinstance(hash_value, str) or not HASH.fullmatch(hash_value.lower()):
        raise BadRequest(
            'Give {"os_hash_value": "<the image\'s os_hash_value, hex>"}: an override applies '
            "to those bytes only."
        )
    m.check_cache(change=True)
    reason = body.get("reason", "") if isinstance(body, dict) else ""
    await safety.override(image_id, hash_value.lower(), reason if isinstance(reason, str) else "")
    entry = _cached(m, image_id)
    verdict = await safety.stored(entry) if entry is not None else None
    return _json(_verdict_row(safety, image_id, entry, verdict))


# -------------------------------------------------------------------------- routing
@dataclass(frozen=True)
class _Resource:
    path: str
    methods: dict[str, Handler]
    allow: str  # Glance's Allow header for other methods
    body_reject: bool = False  # Glance's ``body_reject=True``: a body on GET is a 400


_CACHE_API = (
    _Resource("/cache", {"GET": cache_state, "DELETE": clear_cache}, "GET, DELETE", True),
    _Resource("/cache/clean", {"POST": clean}, "POST"),
    _Resource("/cache/prune", {"POST": prune}, "POST"),
    _Resource("/cache/progress", {"GET": progress}, "GET", True),
    _Resource("/cache/nodes/{image_id}", {"GET": nodes}, "GET", True),
    _Resource("/cache/safety", {"GET": safety_list}, "GET", True),
    _Resource("/cache/safety/audit", {"POST": safety_audit}, "POST"),
    _Resource("/cache/safety/{image_id}", {"GET": safety_show}, "GET", True),
    _Resource("/cache/safety/{image_id}/recheck", {"POST": safety_recheck}, "POST"),
    _Resource(
        "/cache/safety/{image_id}/override",
        {"PUT": safety_override, "DELETE": safety_override},
        "DELETE, PUT",
    ),
    _Resource("/cache/fleet", {"GET": fleet_state}, "GET", True),
    _Resource("/cache/{image_id}", {"PUT": queue_image, "DELETE": delete_image}, "DELETE, PUT"),
    _Resource("/cache/{tail:.*}", {}, ""),  # anything else under /cache: ours, never proxied
)
_LEGACY_API = (
    _Resource(
        "/cached_images", {"GET": legacy_cached, "DELETE": legacy_delete_cached}, "GET, DELETE"
    ),
    _Resource("/cached_images/{image_id}", {"DELETE": legacy_delete_one_cached}, "DELETE"),
    _Resource(
        "/queued_images", {"GET": legacy_queued, "DELETE": legacy_delete_queued}, "GET, DELETE"
    ),
    _Resource(
        "/queued_images/{image_id}",
        {"PUT": legacy_queue_image, "DELETE": legacy_delete_queued_image},
        "DELETE, PUT",
    ),
    _Resource("/cached_images/{tail:.*}", {}, ""),
    _Resource("/queued_images/{tail:.*}", {}, ""),
)
_MINOR = r"/{api_version:v2\.\d+}"  # Glance's URL versioning: /v2.14/cache works too


def _endpoint(resource: _Resource) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        m = request.app[MANAGER]
        access = await m.guard.check(request)
        if access is not Access.ADMIN:
            log.info("management %s %s refused (%s)", request.method, request.path, access.name)
            return _error(access.value, _DENIED[access])
        if not resource.methods:
            return _error(404, "The resource could not be found.")
        handler = resource.methods.get(request.method)
        if handler is None:
            return _error(
                405, "The method is not allowed for this resource.", {"Allow": resource.allow}
            )
        try:
            if resource.body_reject and request.body_exists:
                raise BadRequest("A body is not expected with this request.")
            return await handler(m, request)
        except (CachedError, OSError) as exc:
            return _error_for(request, exc)

    return handle


def add_routes(app: web.Application) -> None:
    """Register the management API; call before any catch-all route (they must win)."""
    for prefix in ("/v2", _MINOR):
        for resource in _CACHE_API:
            app.router.add_route("*", prefix + resource.path, _endpoint(resource))
    for prefix in ("/v1", "/v2", _MINOR):
        for resource in _LEGACY_API:
            app.router.add_route("*", prefix + resource.path, _endpoint(resource))
