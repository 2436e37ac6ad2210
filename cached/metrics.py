"""Prometheus metrics: the daemon's own ``CollectorRegistry`` and the calls that move it.

Owns every metric of the daemon. One :class:`Metrics` is made per application
(``app.make_app``) and *installed* as the process's active one while the application runs,
so the download path (the fill, the reader, the authorizer, the jobs, the safety audit,
the upstream's decorator ``cached/upstream/metered.py``) records with one-line module calls
such as ``metrics.fill_started(key)``; with none installed those calls do nothing. A leaf: it
knows no fill, entry or store; what a scrape reports of the cache directory is counted by its owner
(``cached/ops/health.py``) and handed to :meth:`Metrics.set_cache`. Everything here is
changed on the event loop only (the hooks are called from coroutines and loop callbacks).

Labels are small closed sets (outcome, kind, result, reason, directory): never an image id,
a token or a client address.
"""

from __future__ import annotations

import contextvars
import os
import time
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from cached import __version__

# The classic text format, which every Prometheus (and promtool) parses.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

OUTCOMES = ("hit", "miss", "collapsed", "partial", "bypass")
UPSTREAM_KINDS = ("data", "range", "probe", "record", "forward")
FLEET_SOURCES = ("copy", "fill", "upstream")
FLEET_OUTCOMES = (
    "served", "state", "suspect", "refused", "busy", "unavailable", "absent", "bad",
    "deleted", "forgotten",
)  # fmt: skip
FLEET_NOTICES = ("delete", "forget")  # what a member tells every sibling (fleet/notices.py)
FLEET_NOTICE_RESULTS = ("done", "retried", "given-up", "dropped")
FILL_RESULTS = ("verified", "invalid", "failed", "cancelled", "idle")
VERDICTS = ("safe", "mismatch", "unsafe", "not-inspectable", "error")  # cached/safety/verdict.py
# cached/safety/signature.py Result
SIGNATURE_RESULTS = (
    "verified",
    "unsigned",
    "bad-signature",
    "unknown-certificate",
    "expired-certificate",
    "unknown-key-type",
    "error",
)
# Whole multi-GiB images take minutes; a hit of a small one takes milliseconds.
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200,
    1800, 3600, 7200,
)  # fmt: skip
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# The parameters of cached's own Cache-Status member of a download (RFC 9211,
# download/proxy.py Outcome) -> its outcome label. The member is named "cached", or
# "cached-<id>" in a fleet, and is the last of the list (the cache nearest the client).
CACHE_STATUS = {
    "hit": "hit",
    "fwd=uri-miss; stored": "miss",
    "fwd=uri-miss; collapsed": "collapsed",
    "fwd=partial; stored": "partial",
    "fwd=bypass": "bypass",
}


def own_status(cache_status: str) -> str | None:
    """The parameters of cached's own member of a Cache-Status list (the last one, named
    ``cached`` or ``cached-<id>``), e.g. ``fwd=uri-miss; stored``; None if it is not ours."""
    last = cache_status.rsplit(",", 1)[-1].strip()
    name, _, params = last.partition(";")
    name = name.strip()
    if name != "cached" and not (name.startswith("cached-") and len(name) > len("cached-")):
        return None
    return params.strip()


@dataclass(frozen=True)
class CacheGauges:
    """The cache directory's state at a scrape, as counted by its owner."""

    complete: int = 0
    partial: int = 0
    invalid: int = 0
    present_bytes: int = 0  # of partial entries
    total_bytes: int = 0
    passing_through: bool = False  # the cache directory's guard says downloads pass through
    queue_length: int | None = None


def outcome_of(cache_status: str | None) -> str | None:
    """The outcome label of a download's Cache-Status (None: not a download)."""
    if not cache_status:
        return None
    params = own_status(cache_status)
    if params is None:
        return None
    outcome = CACHE_STATUS.get(params)
    if outcome is None and params.startswith("fwd=bypass"):
        return "bypass"  # with a detail (e.g. too large to be admitted)
    return outcome


# Why a download bypassed the cache (Cache-Status "fwd=bypass; detail=..."): the admission
# rule, the free space, the cache directory's state (cached/cachedir/directories.py), an image
# whose content violates the enforced safety policy (cached/safety/audit.py), or whose
# signature enforce does not allow ("bad-signature": any result but verified, and unsigned
# when required); anything else (several ranges, a store failure, an image that is not
# active) is "other".
BYPASS_REASONS = (
    "too-large", "no-space", "read_only", "vanished", "hung", "failing", "unsafe-format",
    "bad-signature", "other",
)  # fmt: skip


def bypass_reason(cache_status: str | None) -> str | None:
    """The reason label of a bypassed download (None: not a bypass); a bounded set."""
    if outcome_of(cache_status) != "bypass":
        return None
    assert cache_status is not None
    _, _, detail = (own_status(cache_status) or "").partition("detail=")
    detail = detail.split(";")[0].strip()
    return detail if detail in BYPASS_REASONS else "other"


def log_outcome(cache_status: str | None) -> str:
    """The access log's ``cache=`` value: the outcome, ``bypass:<reason>`` for a bypass."""
    reason = bypass_reason(cache_status)
    if reason is not None:
        return f"bypass:{reason}"
    return outcome_of(cache_status) or "-"


# Seconds a scrape waits for the prefetch queue's listing (then the last value stays).

# How long the store counts as refusing writes after a failure (fill.STORE_RETRY_AFTER).
PASS_THROUGH_SECONDS = 30.0


@dataclass
class RequestStats:
    """What one client request caused: bytes sent by sendfile (the response writer does not
    count them) and bytes the transfers it started fetched from the upstream."""

    sent: int = 0
    upstream: int = 0
    # Body bytes given to the response writer, before any chunked framing (None: the
    # writer cannot tell, aiohttp < 3.13; cached/ops/logs.py counts them for the access log).
    payload: int | None = None


# The stats of the request being handled; fill tasks started by it inherit it.
_REQUEST: contextvars.ContextVar[RequestStats | None] = contextvars.ContextVar(
    "cached_request", default=None
)


class _ProcessSeries:
    """prometheus_client's process collector (``process_*``, read from ``/proc/self``),
    registered without the registry reading ``/proc`` at once to learn its names (that read
    would run on the event loop; a scrape collects in a thread, cached/ops/health.py)."""

    def __init__(self) -> None:
        self._inner = ProcessCollector(registry=None)

    def describe(self) -> list[Any]:
        return []  # process_* names: none of ours can clash with them

    def collect(self) -> Any:
        return self._inner.collect()


class Metrics:
    """Every metric of one daemon, in its own registry."""

    def __init__(self, cache_dir: str = "", max_size: int = 0) -> None:
        # No ``*_created`` series: they double the scrape and no alert or panel uses them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.cache_dir = cache_dir
        info = Gauge("cached_build_info", "Version of cached", ["version"], registry=r)
        info.labels(__version__).set(1)
        # --- downloads (GET /v2/images/{id}/file) by Cache-Status outcome
        self.requests = Counter(
            "cached_requests", "Image downloads answered, by outcome", ["outcome"], registry=r
        )
        self.served = Counter(
            "cached_served_bytes",
            "Image bytes sent to clients (sendfile included), by outcome",
            ["outcome"],
            registry=r,
        )
        self.download_seconds = Histogram(
            "cached_download_duration_seconds",
            "Time to answer an image download, by outcome",
            ["outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self._req = {o: self.requests.labels(o) for o in OUTCOMES}
        self.bypasses = Counter(
            "cached_bypass",
            "Downloads that bypassed the cache (counted in cached_requests_total "
            '{outcome="bypass"} too), by reason',
            ["reason"],
            registry=r,
        )
        self._bypass = {reason: self.bypasses.labels(reason) for reason in BYPASS_REASONS}
        self._served = {o: self.served.labels(o) for o in OUTCOMES}
        self._dl = {o: self.download_seconds.labels(o) for o in OUTCOMES}
        self.responses = Counter(
            "cached_http_responses",
            "HTTP responses by route class and status class",
            ["route", "code"],
            registry=r,
        )
        self._responses: dict[tuple[str, int], Any] = {}
        self.joins = Counter(
            "cached_singleflight_joins", "Downloads that joined a running fill", registry=r
        )
        # --- upstream
        self.upstream_requests = Counter(
            "cached_upstream_requests", "Requests to the upstream, by kind", ["kind"], registry=r
        )
        self.upstream_errors = Counter(
            "cached_upstream_errors",
            "Upstream requests that failed (unreachable, error status, broken off), by kind",
            ["kind"],
            registry=r,
        )
        self.upstream_bytes = Counter(
            "cached_upstream_bytes",
            "Image bytes read from the upstream, by kind (forward: downloads passed through)",
            ["kind"],
            registry=r,
        )  # fmt: skip
        self.upstream_latency = Histogram(
            "cached_upstream_latency_seconds",
            "Time until the upstream's response headers, by kind",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Children resolved once: ``labels()`` on every request costs more than the update.
        self.up_requests = {k: self.upstream_requests.labels(k) for k in UPSTREAM_KINDS}
        self.up_errors = {k: self.upstream_errors.labels(k) for k in UPSTREAM_KINDS}
        self.up_latency = {k: self.upstream_latency.labels(k) for k in UPSTREAM_KINDS}
        self.up_bytes = {k: self.upstream_bytes.labels(k) for k in ("data", "range", "forward")}
        self.auth_probes = Counter(
            "cached_auth_probes",
            "Download authorisation probes sent to the upstream, by result",
            ["result"],
            registry=r,
        )
        self.probes = {r: self.auth_probes.labels(r) for r in ("allow", "deny", "no-data", "error")}
        self.auth_reused = Counter(
            "cached_auth_reused", "Downloads authorised by a remembered answer", registry=r
        )
        # --- fills
        self.fills_started = Counter("cached_fills_started", "Fills started", registry=r)
        self.fills_finished = Counter(
            "cached_fills_finished",
            "Fills ended: verified (cached), invalid (verification failed), failed "
            "(transfer broke off), cancelled (deleted or stopping), idle (range fill let go)",
            ["result"],
            registry=r,
        )
        self.fill_seconds = Histogram(
            "cached_fill_duration_seconds",
            "Time from a fill's start to its end, by result",
            ["result"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        for result in FILL_RESULTS:
            self.fills_finished.labels(result)
            self.fill_seconds.labels(result)
        self._fill_started: weakref.WeakKeyDictionary[Hashable, float] = weakref.WeakKeyDictionary()
        self.verdicts = Counter(
            "cached_image_verdicts",
            "Content verdicts of images cached (image_safety_mode audit, enforce), by verdict",
            ["verdict"],
            registry=r,
        )
        for verdict in VERDICTS:
            self.verdicts.labels(verdict)
        self.reinspections = Counter(
            "cached_image_reinspections",
            "Cached images inspected again from their file (no verdict of this oslo.utils "
            "version and policy: first hit, audit job, admin recheck), by new verdict",
            ["verdict"],
            registry=r,
        )
        for verdict in VERDICTS:
            self.reinspections.labels(verdict)
        self.reinspection_seconds = Histogram(
            "cached_image_reinspection_duration_seconds",
            "Time one re-inspection took in its I/O thread (reads, inspection, xattr write)",
            buckets=(0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.25, 1, 4),
            registry=r,
        )
        self.entries_by_verdict = Gauge(
            "cached_image_entries_by_verdict",
            "Complete entries by their current content verdict (unknown: none of this "
            "oslo.utils version and policy known to the daemon yet)",
            ["verdict"],
            registry=r,
        )
        for verdict in (*VERDICTS, "unknown"):
            self.entries_by_verdict.labels(verdict)
        self.safety_audits = Counter(
            "cached_image_safety_audits", "Passes of the safety audit job", registry=r
        )
        self.safety_audit_seconds = Histogram(
            "cached_image_safety_audit_duration_seconds",
            "Time a pass of the safety audit job took",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.signatures = Counter(
            "cached_image_signatures",
            "Image signature checks (image_signature_verify), by result",
            ["result"],
            registry=r,
        )
        for result in SIGNATURE_RESULTS:
            self.signatures.labels(result)
        # --- the cache
        self.cache_bytes = Gauge(
            "cached_cache_bytes", "Bytes held by the cache (complete + partial)", registry=r
        )
        self.cache_max = Gauge("cached_cache_max_bytes", "image_cache_max_size", registry=r)
        self.cache_max.set(max_size)
        self.cache_entries = Gauge(
            "cached_cache_entries", "Cache entries by state", ["state"], registry=r
        )
        self.partial_bytes = Gauge(
            "cached_cache_partial_bytes", "Bytes present in partial entries", registry=r
        )
        self.evictions = Counter(
            "cached_evictions", "Entries removed by prune or clean, by reason", ["reason"],
            registry=r,
        )  # fmt: skip
        self.evicted_bytes = Counter(
            "cached_evicted_bytes", "Bytes freed by prune or clean, by reason", ["reason"],
            registry=r,
        )  # fmt: skip
        for reason in ("prune", "stalled", "invalid"):
            self.evictions.labels(reason)
        for reason in ("prune", "stalled"):
            self.evicted_bytes.labels(reason)
        self.passthrough = Gauge(
            "cached_passthrough",
            "1 while downloads bypass the cache directory because it refused a write",
            ["directory"],
            registry=r,
        )
        self._refused_at = -float("inf")
        self.refused_reason = ""
        # --- jobs
        self.queue_length = Gauge(
            "cached_prefetch_queue_length", "Images queued for prefetch", registry=r
        )
        self.prefetch_runs = Counter("cached_prefetch_runs", "Prefetch runs", registry=r)
        self.prefetch_failures = Counter(
            "cached_prefetch_failures", "Queued images whose prefetch failed", registry=r
        )
        # --- the process
        # process_open_fds / process_max_fds (the unit raises LimitNOFILE), CPU, memory.
        r.register(_ProcessSeries())
        self.reload_ok = Gauge(
            "cached_config_last_reload_successful",
            "1 when the last reload (or the start) put the whole file in force, else 0",
            registry=r,
        )
        self.reload_ok.set(1)
        self.reload_time = Gauge(
            "cached_config_last_reload_success_timestamp_seconds",
            "When the configuration was last put in force (the start, or a reload)",
            registry=r,
        )
        self.reload_time.set_to_current_time()
        self.directory_state = Gauge(
            "cached_directory_state",
            "1 for the state a declared directory is in (ok, read_only, vanished, hung, "
            "failing), 0 for the others",
            ["directory", "state"],
            registry=r,
        )
        self.connections = Gauge("cached_open_connections", "Client connections open", registry=r)
        self.loop_lag = Gauge(
            "cached_event_loop_lag_seconds",
            "How late the event loop ran the last periodic tick",
            registry=r,
        )
        self.last_lag = 0.0
        # --- fleet (cached/fleet/): peer fill
        self.fleet_sources = Counter(
            "cached_fleet_transfers",
            "Fill transfers by the source they took: a sibling's complete copy, a sibling's "
            "upstream-fed fill, or the upstream",
            ["source"],
            registry=r,
        )
        self.fleet_requests = Counter(
            "cached_fleet_peer_requests",
            "Peer requests answered, by outcome (served, state, suspect, refused, busy, "
            "unavailable, absent, bad, deleted, forgotten)",
            ["outcome"],
            registry=r,
        )
        self.fleet_bytes = Counter(
            "cached_fleet_peer_bytes",
            "Image bytes between siblings: received by fills, sent to siblings",
            ["direction"],
            registry=r,
        )
        self.fleet_list_mismatch = Counter(
            "cached_fleet_list_mismatches",
            "Peer requests from a sibling whose fleet_members list differs from ours",
            registry=r,
        )
        self.fleet_sibling_failures = Counter(
            "cached_fleet_sibling_failures",
            "Lookups and transfers to a sibling that failed (refused connection or TLS "
            "certificate, timeout, bad answer); the sibling is then down for a while",
            registry=r,
        )
        self.fleet_notices_pending = Gauge(
            "cached_fleet_notices_pending",
            "Image deletes and forgets this member still has to tell a sibling (retried "
            "for up to 10 min), per sibling and image",
            ["action"],
            registry=r,
        )
        self.fleet_notices = Counter(
            "cached_fleet_notices",
            "Notices to siblings (image deleted, allowances to forget) by result: done, "
            "retried (one more attempt), given-up (10 min passed), dropped (too many pending)",
            ["action", "result"],
            registry=r,
        )
        for action in FLEET_NOTICES:
            self.fleet_notices_pending.labels(action)
            for result in FLEET_NOTICE_RESULTS:
                self.fleet_notices.labels(action, result)
        for source in FLEET_SOURCES:
            self.fleet_sources.labels(source)
        for outcome in FLEET_OUTCOMES:
            self.fleet_requests.labels(outcome)
        for direction in ("received", "sent"):
            self.fleet_bytes.labels(direction)
        self.count_connections: Callable[[], int] = lambda: 0

    def loop_late(self, seconds: float) -> None:
        self.last_lag = seconds
        self.loop_lag.set(seconds)

    # ------------------------------------------------------------------ requests
    def request_done(
        self, route: str, status: int, cache_status: str | None, nbytes: int, seconds: float
    ) -> None:
        """One HTTP request ended (called by the access logger for every request)."""
        key = (route, status // 100)
        child = self._responses.get(key)
        if child is None:
            child = self._responses[key] = self.responses.labels(route, f"{key[1]}xx")
        child.inc()
        outcome = outcome_of(cache_status)
        if outcome is None:
            return
        self._req[outcome].inc()
        self._served[outcome].inc(nbytes)
        self._dl[outcome].observe(seconds)
        if outcome == "collapsed":
            self.joins.inc()
        elif outcome == "bypass":  # every byte sent was read from the upstream
            self.up_bytes["forward"].inc(nbytes)
            self._bypass[bypass_reason(cache_status) or "other"].inc()

    # ------------------------------------------------------------------ store state
    def store_refused(self, reason: str) -> None:
        self._refused_at = time.monotonic()
        self.refused_reason = reason

    @property
    def passing_through(self) -> bool:
        return time.monotonic() - self._refused_at < PASS_THROUGH_SECONDS

    def set_cache(self, gauges: CacheGauges, max_size: int) -> None:
        """Set the gauges read at scrape time from what the scrape found (cached/ops/health.py
        gathers them: this module knows no entry, fill or store)."""
        self.cache_bytes.set(gauges.total_bytes)
        self.partial_bytes.set(gauges.present_bytes)
        self.cache_max.set(max_size)
        self.cache_entries.labels("complete").set(gauges.complete)
        self.cache_entries.labels("partial").set(gauges.partial)
        self.cache_entries.labels("invalid").set(gauges.invalid)
        passing = self.passing_through or gauges.passing_through
        self.passthrough.labels(self.cache_dir).set(1 if passing else 0)
        self.connections.set(self.count_connections())
        if gauges.queue_length is not None:  # None: not listed (the queue keeps its value)
            self.queue_length.set(gauges.queue_length)

    def set_verdicts(self, counts: dict[str, int]) -> None:
        """Complete entries by current verdict, counted at a scrape by their owner
        (cached/safety/audit.py ``Safety.counts``); other labels are ignored."""
        for verdict in (*VERDICTS, "unknown"):
            self.entries_by_verdict.labels(verdict).set(counts.get(verdict, 0))

    def reloaded(self, in_force: bool, at: float | None) -> None:
        """The last reload's outcome (``cached reload``'s: refused, partly applied, or with
        options waiting for a restart count as not successful) and the last success's time."""
        self.reload_ok.set(1 if in_force else 0)
        if at is not None:
            self.reload_time.set(at)

    def directory(self, path: str, state: str, states: tuple[str, ...]) -> None:
        """A declared directory's state (cached/cachedir/guard.py), one series per state."""
        for name in states:
            self.directory_state.labels(path, name).set(1 if name == state else 0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# ---------------------------------------------------------------------- the active one
_active: Metrics | None = None


def install(metrics: Metrics | None) -> None:
    """Make ``metrics`` the one the module-level hooks record into (None: none)."""
    global _active
    _active = metrics


def active() -> Metrics | None:
    return _active


# ---------------------------------------------------------------------- per request
def begin_request() -> RequestStats:
    """Start counting for the request handled in the current context."""
    stats = RequestStats()
    _REQUEST.set(stats)
    return stats


def sent(nbytes: int) -> None:
    """``nbytes`` of the current request went out by sendfile (reader.py)."""
    stats = _REQUEST.get()
    if stats is not None:
        stats.sent += nbytes


# ---------------------------------------------------------------------- hooks
def fill_started(fill: Hashable) -> None:
    m = _active
    if m is not None:
        m.fills_started.inc()
        m._fill_started[fill] = time.monotonic()


def fill_ended(fill: Hashable, result: str) -> None:
    """A fill reached ``result`` (a FillState value other than running)."""
    m = _active
    if m is not None and result in FILL_RESULTS:
        m.fills_finished.labels(result).inc()
        started = m._fill_started.pop(fill, None)
        if started is not None:
            m.fill_seconds.labels(result).observe(time.monotonic() - started)


def image_judged(verdict: str) -> None:
    """A fill's content verdict was stored with its committed entry (cached/safety/audit.py)."""
    m = _active
    if m is not None and verdict in VERDICTS:
        m.verdicts.labels(verdict).inc()


def image_reinspected(verdict: str, seconds: float) -> None:
    """A cached image was inspected again from its file (cached/safety/audit.py)."""
    m = _active
    if m is not None and verdict in VERDICTS:
        m.reinspections.labels(verdict).inc()
        m.reinspection_seconds.observe(seconds)


def safety_audited(seconds: float) -> None:
    """A pass of the safety audit job ended (cached/safety/audit.py)."""
    m = _active
    if m is not None:
        m.safety_audits.inc()
        m.safety_audit_seconds.observe(seconds)


def image_signature_checked(result: str) -> None:
    """An image's signature was checked, as it was cached or again on a hit
    (cached/safety/signatures.py)."""
    m = _active
    if m is not None and result in SIGNATURE_RESULTS:
        m.signatures.labels(result).inc()


def auth_reused() -> None:
    if _active is not None:
        _active.auth_reused.inc()


def evicted(reason: str, nbytes: int) -> None:
    """An entry was removed: ``prune`` or ``stalled`` (clean)."""
    if _active is not None:
        _active.evictions.labels(reason).inc()
        _active.evicted_bytes.labels(reason).inc(nbytes)


def evicted_invalid(count: int) -> None:
    """``count`` entries of ``invalid/`` were removed by clean."""
    if _active is not None and count:
        _active.evictions.labels("invalid").inc(count)


def prefetch_run(failed: int) -> None:
    if _active is not None:
        _active.prefetch_runs.inc()
        _active.prefetch_failures.inc(failed)


def store_refused(exc: BaseException) -> None:
    """The cache directory refused a write: downloads pass through for a while."""
    if _active is not None:
        code = getattr(exc, "errno", None)
        _active.store_refused(os.strerror(code) if isinstance(code, int) else str(exc))


def upstream_bytes(n: int) -> None:
    """``n`` image bytes came from the upstream for the current request (its access log)."""
    stats = _REQUEST.get()
    if stats is not None:
        stats.upstream += n


# --- fleet (cached/fleet/) ------------------------------------------------------------------
def fleet_transfer(source: str) -> None:
    """A fill transfer took ``source``: copy, fill (a sibling's) or upstream."""
    if _active is not None and source in FLEET_SOURCES:
        _active.fleet_sources.labels(source).inc()


def fleet_request(outcome: str) -> None:
    """A peer request was answered with ``outcome`` (FLEET_OUTCOMES)."""
    if _active is not None and outcome in FLEET_OUTCOMES:
        _active.fleet_requests.labels(outcome).inc()


def fleet_bytes(direction: str, n: int) -> None:
    """``n`` image bytes ``received`` from a sibling or ``sent`` to one."""
    if _active is not None and n:
        _active.fleet_bytes.labels(direction).inc(n)


def fleet_list_mismatch() -> None:
    if _active is not None:
        _active.fleet_list_mismatch.inc()


def fleet_sibling_failed() -> None:
    """A lookup or transfer to a sibling failed (cached/fleet/peers.py PeerHealth.failed)."""
    if _active is not None:
        _active.fleet_sibling_failures.inc()


def fleet_notice_pending(action: str, change: int) -> None:
    """A notice to a sibling (``delete``, ``forget``) became pending (+1) or ended (-1)."""
    if _active is not None and action in FLEET_NOTICES:
        _active.fleet_notices_pending.labels(action).inc(change)


def fleet_notice(action: str, result: str) -> None:
    """A notice attempt's ``result`` (FLEET_NOTICE_RESULTS)."""
    if _active is not None and action in FLEET_NOTICES and result in FLEET_NOTICE_RESULTS:
        _active.fleet_notices.labels(action, result).inc()
