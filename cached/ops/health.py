"""The daemon's own operational endpoints: ``/metrics``, ``/healthz``, ``/readyz``.

Served by the daemon itself, never proxied: on the image API port, or only on the separate
``admin_listen`` address when one is configured (then ``/metrics`` is not on the API port).
``/metrics`` is open unless ``metrics_auth`` asks for the management API's admin rules.

Owns :class:`Ops`, the state these endpoints read. ``app.make_app`` fills it in when the
daemon's resources are up and a reload replaces ``config``; ``space_warning`` and the last
upstream verdict are set by its own checks (the tick, ``/readyz``, the start); all on the
event loop. ``/readyz`` gives details only to operators (the management listener, an admin
token); everyone gets the state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from cached.cachedir.mounts import State as MountState
from cached.config import Config
from cached.edge import replies
from cached.edge.listeners import is_management
from cached.metrics import CONTENT_TYPE, CacheGauges, Metrics
from cached.ops.lifecycle import ReloadStatus

if TYPE_CHECKING:
    from cached.cachedir.guard import Guard
    from cached.fill.registry import Filler
    from cached.manage.access import AdminGuard
    from cached.store import Store

log = logging.getLogger("cached.health")

UPSTREAM_CHECK_TTL = 10.0  # seconds a readiness look at the upstream is reused
_UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=3)


@dataclass
class Ops:
    """What the operational endpoints and the service manager are told about."""

    metrics: Metrics
    config: Config
    store: Store | None = None  # set once the index is loaded
    filler: Filler | None = None
    guard: AdminGuard | None = None
    store_guard: Guard | None = None  # a file upstream's directory guard: its verdict decides
    session: aiohttp.ClientSession | None = None
    draining: bool = False
    reloads: ReloadStatus = field(default_factory=ReloadStatus)  # the Reloader's (SIGHUP)
    # Why no image can ever be cached with the free space there is (min_free_space above
    # it), or None; set by check_space (the tick, /readyz, the start), read by STATUS=.
    space_warning: str | None = None
    _upstream: tuple[float, str | None] = (-float("inf"), None)
    _checking: asyncio.Task[str | None] | None = field(default=None, repr=False)

    @property
    def passing_through(self) -> bool:
        return self.metrics.passing_through or self.guard_problem() is not None

    def guard_problem(self) -> str | None:
        """Why the cache directory's guard says it is not usable (None: it is, or none)."""
        guard = self.filler.disk_guard if self.filler is not None else None
        if guard is None or guard.ok:
            return None
        state = getattr(guard, "state", None)
        name = getattr(state, "value", state) or "not ok"
        return f"cache directory {name}: {getattr(guard, 'reason', '')}".rstrip(": ")

    def mode(self) -> str:
        """``caching``, or ``pass-through (why)``."""
        problem = self.guard_problem()
        if problem is not None:
            return f"pass-through ({problem})"
        if self.metrics.passing_through:
            return f"pass-through ({self.metrics.refused_reason})"
        return "caching"

    async def check_space(self) -> str | None:
        """Whether the cache can ever fill: the free space on its filesystem, plus what its
        own entries hold (a prune frees that), must be above ``min_free_space``. Sets and
        returns :attr:`space_warning`. Skipped (keeps the last answer) while the cache
        directory is not usable; the ``statvfs`` runs on its threads, at most 2 s."""
        store = self.store
        if store is None or self.guard_problem() is not None:
            return self.space_warning
        try:
            st = await asyncio.wait_for(store.run(os.statvfs, store.root), 2)
        except (OSError, TimeoutError):
            return self.space_warning
        free = st.f_bavail * st.f_frsize
        floor = self.config.min_free_space.bytes_of(st.f_blocks * st.f_frsize)
        room = free + store.total_size() - floor
        warning = None
        if room <= 0:
            warning = (
                f"no image can be cached: min_free_space keeps {_size(floor)} free on "
                f"{store.root}, which has {_size(free)} free"
            )
        if warning != self.space_warning and warning is not None:
            log.warning("%s (every download passes through; lower min_free_space)", warning)
        self.space_warning = warning
        return warning

    @property
    def known_upstream_problem(self) -> str | None:
        """What the last look at the upstream found (None: fine, or not looked at yet),
        without looking again: for STATUS=, which must not wait on the network."""
        if self.store_guard is not None:
            guard = self.store_guard
            return None if guard.ok else f"store directory {guard.state.value}: {guard.reason}"
        return self._upstream[1]

    async def upstream_problem(self) -> str | None:
        """Why the upstream looks unreachable, or None (the answer is reused a few seconds).
        A ``file`` upstream's directory is judged by its guard (no call into a share that may
        hang; a share gone under a directory that still exists is not "reachable")."""
        if self.store_guard is not None:
            guard = self.store_guard
            return None if guard.ok else f"store directory {guard.state.value}: {guard.reason}"
        checked, problem = self._upstream
        if time.monotonic() - checked < UPSTREAM_CHECK_TTL:
            return problem
        if self._checking is None or self._checking.done():
            self._checking = asyncio.get_running_loop().create_task(self._check_upstream())
        problem = await asyncio.shield(self._checking)
        self._upstream = (time.monotonic(), problem)
        return problem

    async def _check_upstream(self) -> str | None:
        config = self.config
        if config.upstream_kind == "file":
            ok = await asyncio.to_thread(os.path.isdir, config.upstream_dir)
            return None if ok else f"{config.upstream_dir} is not a directory"
        if self.session is None:
            return "not started"
        path = urllib.parse.urlsplit(config.upstream).path + "/versions"
        try:
            async with self.session.get(
                config.upstream + "/versions", timeout=_UPSTREAM_TIMEOUT, allow_redirects=False
            ) as resp:
                if resp.status >= 500:
                    return f"GET {path} answered {resp.status}"
                body = await resp.content.read(1 << 16)
                status = resp.status
        except TimeoutError:
            return f"unreachable: no answer within {_UPSTREAM_TIMEOUT.total:g} s"
        except aiohttp.ClientError as exc:
            return f"unreachable: {exc or type(exc).__name__}"
        if not is_version_document(status, body):
            return (
                f"GET {path} answered {status} without the image API's version document: "
                "'upstream' must be the API's root URL (http://glance-api:9292, or a real "
                "prefix such as http://host/image)"
            )
        return None


def is_version_document(status: int, body: bytes) -> bool:
    """Whether ``status``/``body`` is an image API's answer to ``GET /versions`` (Glance:
    200 or 300, ``{"versions": [{"id": "v2.N", ...}, ...]}``)."""
    if status not in (200, 300):
        return False
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    found = doc.get("versions") if isinstance(doc, dict) else None
    return isinstance(found, list) and any(
        isinstance(v, dict) and str(v.get("id", "")).startswith("v2") for v in found
    )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


OPS = web.AppKey("ops", Ops)


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.json_response(body, status=status, headers={"Cache-Control": "no-store"})


async def healthz(request: web.Request) -> web.StreamResponse:
    """Alive: the event loop answers (a stuck loop answers nothing). ``reload``: how many
    reloads started and finished and the last one's result (``cached reload`` waits on it);
    on the management listener also why (cached/ops/lifecycle.py ``ReloadStatus``)."""
    ops = request.app[OPS]
    lag = ops.metrics.last_lag
    body = {"status": "alive", "event_loop_lag_seconds": round(lag, 6)}
    return _json(200, {**body, "reload": ops.reloads.as_json(is_management(request))})


async def _operator(request: web.Request, ops: Ops) -> bool:
    """Whether ``request`` may see details (upstream addresses, errors, directories): it came
    in on the management listener, or carries an admin token (cached/manage/access.py)."""
    if is_management(request):
        return True
    if ops.guard is None or not request.headers.get("X-Auth-Token"):
        return False
    from cached.manage.access import Access

    return await ops.guard.check(request) is Access.ADMIN


async def readyz(request: web.Request) -> web.StreamResponse:
    """Ready: index loaded, upstream reachable, cache writable or knowingly passed through.
    Everyone gets the state (200 or 503, ``{"status": ...}``); operators (the management
    listener, an admin token) also the checks and the reasons."""
    ops = request.app[OPS]
    checks: dict[str, Any] = {}
    reasons: list[str] = []
    if ops.store is None:
        reasons.append("cache index not loaded")
        checks["index"] = "loading"
    else:
        checks["index"] = f"{len(ops.store.entries)} entries"
    if ops.draining:
        reasons.append("stopping")
    problem = await ops.upstream_problem()
    checks["upstream"] = problem or "reachable"
    if problem:
        reasons.append(f"upstream {problem}")
    cache_dir: Path = ops.config.image_cache_dir
    # With a guard, its verdict says it (os.access on a hung share would hang a thread).
    guarded = ops.filler is not None and ops.filler.disk_guard is not None
    writable = guarded or await asyncio.to_thread(os.access, cache_dir, os.W_OK)
    checks["cache"] = ops.mode()
    if not writable and not ops.passing_through:
        reasons.append(f"cache directory {cache_dir} is not writable")
        checks["cache"] = "not writable"
    space = await ops.check_space()
    checks["space"] = space or "ok"
    body: dict[str, Any] = {"status": "not ready" if reasons else "ready"}
    if await _operator(request, ops):
        body["checks"] = checks
        if reasons:
            body["reasons"] = reasons
        if space:  # still ready: downloads are answered (passed through)
            body["warnings"] = [space]
    return _json(503 if reasons else 200, body)


# A scrape lists the prefetch queue for at most this long (a share may hang).
QUEUE_LIST_TIMEOUT = 2.0


async def cache_gauges(store: Store, filler: Filler | None) -> CacheGauges:
    """The cache directory's gauges for a scrape. The queue is listed on the cache
    directory's threads, only while its guard says it is ok (a hung share would hold the
    scrape and a thread for as long as it hangs: the queue length keeps its last value)."""
    complete = partial = present = total = 0
    for entry in list(store.entries.values()):
        if entry.complete:
            complete += 1
            total += entry.size
        else:
            partial += 1
            got = entry.present_bytes()
            present += got
            total += got
    queue_length = None
    guard = filler.disk_guard if filler is not None else None
    if guard is None or guard.ok:
        with contextlib.suppress(OSError, TimeoutError):
            queued = await asyncio.wait_for(store.run(store.queued), QUEUE_LIST_TIMEOUT)
            queue_length = len(queued)
    return CacheGauges(
        complete=complete,
        partial=partial,
        invalid=len(store.invalid),
        present_bytes=present,
        total_bytes=total,
        passing_through=filler is not None and filler.passing_through(),
        queue_length=queue_length,
    )


async def metrics(request: web.Request) -> web.StreamResponse:
    ops = request.app[OPS]
    if ops.config.metrics_auth and ops.guard is not None:
        from cached.manage.access import Access
        from cached.manage.api import _DENIED, _error

        access = await ops.guard.check(request)
        if access is not Access.ADMIN:
            return _error(access.value, _DENIED[access])
    if ops.store is not None:
        gauges = await cache_gauges(ops.store, ops.filler)
        ops.metrics.set_cache(gauges, ops.config.image_cache_max_size)
        safety = ops.filler.safety if ops.filler is not None else None
        if safety is not None:  # (from memory: no xattr is read for a scrape)
            ops.metrics.set_verdicts(safety.counts(ops.store.complete_entries()))
    reloads = ops.reloads
    if reloads.finished:
        in_force = reloads.result == "applied" and not reloads.restart_needed
        ops.metrics.reloaded(in_force, reloads.in_force_at)
    states = tuple(s.value for s in MountState)
    guards: list[object] = [ops.filler.disk_guard if ops.filler is not None else None]
    guards.append(ops.store_guard)
    for guard in guards:  # cached/cachedir/guard.py Guard (the filler knows it as a DiskGuard)
        directory, state = getattr(guard, "directory", None), getattr(guard, "state", None)
        if directory is not None and isinstance(state, MountState):
            ops.metrics.directory(str(directory), state.value, states)
    # In a thread: the process collector reads /proc/self (a file read, off the loop).
    body = await asyncio.to_thread(ops.metrics.exposition)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _not_here(request: web.Request) -> web.StreamResponse:
    return replies.error(request, 404, "Metrics are served on the admin_listen address.")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_routes(
    app: web.Application,
    *,
    with_metrics: bool,
    only_on: Callable[[web.Request], bool] | None = None,
) -> None:
    """Register the endpoints on ``app`` (before any catch-all route); ``only_on``: serve
    /metrics only to requests it accepts (those on the management listener)."""
    handler: Handler = metrics if with_metrics else _not_here
    if with_metrics and only_on is not None:
        accepts = only_on

        async def handler(request: web.Request) -> web.StreamResponse:
            return await (metrics if accepts(request) else _not_here)(request)

    app.router.add_get("/metrics", handler, allow_head=False)
    app.router.add_get("/healthz", healthz, allow_head=False)
    app.router.add_get("/readyz", readyz, allow_head=False)
