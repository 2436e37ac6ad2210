"""The composition root: the one place where the daemon's parts are built and wired."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from cached import config as configuration
from cached import metrics as metrics_module
from cached.cachedir import mounts
from cached.cachedir.adoption import Adopter
from cached.cachedir.directories import Directories
from cached.cachedir.reverify import Integrity
from cached.config import Config
from cached.download import reader
from cached.download.proxy import Proxy
from cached.edge import policy as request_policy
from cached.edge import replies, routes, tls, versions
from cached.edge.clients import Clients
from cached.edge.fileapi import FileApi
from cached.edge.listeners import LISTENERS, Listeners, is_fleet, is_management
from cached.edge.passthrough import GlancePassThrough, PassThrough
from cached.errors import ConfigError
from cached.fill.machine import Fill, FillSettings
from cached.fill.registry import Filler
from cached.fleet import notices as fleet_notices
from cached.fleet import peers, serve, trust
from cached.fleet.state import member_view
from cached.identity import keystone as identity
from cached.identity.authorizer import Authorizer
from cached.jobs import schedule as jobs
from cached.jobs.prefetch import Prefetcher
from cached.manage import access as admin
from cached.manage import api as manage
from cached.metrics import Metrics
from cached.ops import health, logs
from cached.ops.health import OPS, Ops
from cached.ops.lifecycle import RELOADABLES, Reloadables
from cached.safety.audit import Safety
from cached.safety.signature import Anchors
from cached.safety.signatures import Signatures
from cached.safety.verdict import Policy as SafetyPolicy
from cached.store import Store, xattrs
from cached.upstream import Backend, ImageRecord
from cached.upstream.filestore import FileBackend
from cached.upstream.glance import GlanceBackend, Pools
from cached.upstream.metered import MeteredBackend, MeteredPassThrough

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
FILLER = web.AppKey("filler", Filler)
PROXY = web.AppKey("proxy", Proxy)
MANAGER = manage.MANAGER
SCHEDULER = web.AppKey("scheduler", AsyncIOScheduler)
INTEGRITY = web.AppKey("integrity", Integrity)
POLICY = web.AppKey("policy", request_policy.ActivePolicy)
DIRECTORIES = web.AppKey("directories", Directories)
UPSTREAM_VERSIONS = web.AppKey("upstream_versions", routes.UpstreamVersions)
PEERS = web.AppKey("peers", serve.PeerService)  # with a fleet only


def make_backend(
    config: Config,
    ssl_context: ssl.SSLContext | bool = True,
    directories: Directories | None = None,
) -> Backend:
    if config.upstream_kind == "file":
        guard = directories.store if directories is not None else None
        return FileBackend(config.upstream_dir, config.access_tokens, guard=guard)
    return GlanceBackend(
        config.upstream,
        connect_timeout=config.upstream_connect_timeout,
        read_timeout=config.upstream_read_timeout,
        ssl_context=ssl_context,
        pools=Pools(
            config.upstream_relay_connections,
            config.upstream_fetch_connections,
            config.upstream_probe_connections,
        ),
    )


def make_passthrough(backend: Backend, config: Config) -> PassThrough:
    """What answers the requests the cache does not, by the kind of upstream: a Glance is
    relayed to, a file store's image API is emulated."""
    if isinstance(backend, FileBackend):
        return FileApi(backend)
    if isinstance(backend, GlanceBackend):
        return GlancePassThrough(
            backend,
            buffer_size=config.client_body_buffer_size,
            per_client=config.max_upstream_requests_per_client,
            client_key=Clients.of(config).key_of,
        )
    raise TypeError(f"no pass-through for a {type(backend).__name__} upstream")


@web.middleware
async def route_request(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Read how the upstream routes the request (cached/edge/routes.py), once, before anything
    else judges it; refuse a versioned media type that cannot be read exactly."""
    if request.app[CONFIG].fleet_listen:
        # The fleet listener answers siblings' requests only, and only it answers them.
        if _is_peer(request) != is_fleet(request):
            return web.Response(status=404)
    if _is_peer(request):
        return await handler(request)  # a sibling's request (cached/fleet/serve.py)
    known = request.app[UPSTREAM_VERSIONS]
    accept = request.headers.getall("Accept", [])
    found = routes.route(request.raw_path, accept, known.known)
    if not found.certain:
        await known.learn()
        found = routes.route(request.raw_path, accept, known.known)
    if found.kind is routes.Kind.UNREAD:
        log.info("refused a versioned media type cached does not read: %r", accept)
        return replies.error(
            request,
            400,
            "The Accept header names the API version in a form cached does not route: use "
            "a versioned path (/v2/...) or exactly 'Accept: application/vnd.openstack.images-v2'.",
        )
    request[routes.ROUTED] = found
    return await handler(request)


def _is_peer(request: web.Request) -> bool:
    """Whether the request is a sibling's, to a ``/cached-peer/v1/`` route."""
    name = request.match_info.route.name
    return name is not None and name.startswith(serve.ROUTE_PREFIX)


# The routes whose paths are relayed to the upstream: the policy judges them as routed there.
_RELAYED = frozenset({"relayed", "download"})


@web.middleware
async def enforce_policy(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The ``policy`` file's rules, before a request is handled or forwarded. Installed
    always, so that a reload can add a policy; without one it only passes the request on.
    Siblings' requests (cached/fleet/serve.py) are exempt: their signature decides."""
    policy = request.app[POLICY].policy
    if policy is not None and not _is_peer(request):
        guard = request.app[MANAGER].guard

        async def is_admin(r: web.Request) -> bool:
            return await guard.check(r) is admin.Access.ADMIN

        if request.match_info.route.name in _RELAYED:
            found = routes.routed(request)
            path = found.path if found.may_route else None
        else:
            path = request.path  # a route cached answers itself
        rule = None if path is None else await policy.denied(request, is_admin, path)
        if rule is not None:
            log.info("policy: %s %s refused by rule %s", request.method, request.path, rule)
            return request_policy.forbidden(request, rule)
    return await handler(request)


def prepare_dirs(config: Config, embedded: bool, create: bool = True) -> None:
    """Check (and where it is ours to do, create) the upstream and cache directories before
    the daemon starts; raises ConfigError naming the option. Blocks: call before the loop.

    ``embedded``: the built-in default configuration runs, which makes its own ./var dirs.
    ``create=False`` (``cached check-config``): the same checks, nothing created; a missing
    cache directory passes when its parent would let ``serve`` create it.
    """
    if embedded and create:
        # The built-in default runs out of the box: it makes its own ./var directories.
        config.upstream_dir.mkdir(parents=True, exist_ok=True)
    if config.upstream_kind == "file" and not config.upstream_mount.require_mount:
        # (A required mount that is missing is the store guard's 503, not a refusal to start.)
        if not config.upstream_dir.is_dir():
            raise ConfigError(f"option 'upstream': {config.upstream_dir} is not a directory")
    cache_dir = config.image_cache_dir
    if config.image_cache_mount.require_mount:
        # Nothing is created in (or probed with a write to) a directory that is not mounted;
        # the cache guard watches it from the start and tells why downloads pass through.
        if not mounts.is_mount_point(cache_dir):
            log.warning(
                "image_cache_dir %s is not mounted (image_cache_mount: require_mount): "
                "starting anyway, every download passes through until it is",
                cache_dir,
            )
        return
    if not cache_dir.is_dir():
        if not cache_dir.parent.is_dir():
            raise ConfigError(f"option 'image_cache_dir': {cache_dir.parent} does not exist")
        if not create:
            if not os.access(cache_dir.parent, os.W_OK | os.X_OK):
                raise ConfigError(
                    f"option 'image_cache_dir': {cache_dir} does not exist and cannot be "
                    f"created in {cache_dir.parent}: permission denied"
                )
            return
        cache_dir.mkdir()
    try:
        has_xattrs = xattrs.supported(cache_dir)
    except OSError as exc:
        raise ConfigError(
            f"option 'image_cache_dir': {cache_dir}: cannot write there: {exc.strerror or exc}"
        ) from None
    if not has_xattrs:
        raise ConfigError(
            f"option 'image_cache_dir': {cache_dir} does not support user.* xattrs "
            "(use ext4/xfs/tmpfs, or mount with user_xattr)"
        )


def load_anchors(config: Config) -> Anchors:
    """The signature anchors of ``image_signature_certificate_dir`` and
    ``image_signature_ca_file``; ConfigError naming the option. Blocks: call from a thread."""
    try:
        return Anchors.load(config.image_signature_certificate_dir, config.image_signature_ca_file)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def make_app(config: Config, *, backend: Backend | None = None) -> web.Application:
    """Build the daemon's application. ``backend`` lets a caller supply its own upstream."""
    app = web.Application(middlewares=[logs.observe, route_request, enforce_policy])
    app[UPSTREAM_VERSIONS] = upstream_versions = routes.UpstreamVersions()
    app[CONFIG] = config
    app[LISTENERS] = Listeners(loopback_trusted=config.allow_unauthenticated_management)
    metrics = Metrics(str(config.image_cache_dir), config.image_cache_max_size)
    ops = app[OPS] = Ops(metrics, config)
    reloadables = app[RELOADABLES] = Reloadables()
    active_policy = app[POLICY] = request_policy.ActivePolicy()

    async def resources(app: web.Application) -> AsyncIterator[None]:
        metrics_module.install(metrics)
        client_tls = await asyncio.to_thread(tls.client_tls, config)
        # Before anything is opened: no anchors, no start (the error names the option).
        anchors = None
        if config.image_signature_verify:
            anchors = await asyncio.to_thread(load_anchors, config)
        if config.policy:
            policy = await asyncio.to_thread(request_policy.load, config.policy)
            active_policy.replace(policy, config.policy)
        directories = app[DIRECTORIES] = Directories.from_config(config)
        app[reader.CACHE_GUARD] = directories.cache  # where hits are read (reader.py)
        raw_upstream = backend or make_backend(config, client_tls.upstream, directories)
        if isinstance(raw_upstream, GlanceBackend):
            glance = raw_upstream

            async def fetch_versions() -> list[str] | None:
                return await versions.upstream_ids(glance)

            upstream_versions.fetch = fetch_versions
        elif isinstance(raw_upstream, FileBackend):
            upstream_versions.read(versions.OWN_IDS)  # cached answers the image API itself
        upstream: Backend = MeteredBackend(raw_upstream, metrics)
        # Keystone and peers (not the upstream).
        session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=30, sock_connect=config.upstream_connect_timeout),
            connector=aiohttp.TCPConnector(ssl=client_tls.upstream),
        )
        # Cache-file I/O runs on the cache guard's bounded threads: a hung share holds those.
        store = Store(
            config.image_cache_dir,
            io=directories.cache.executor,
            access_interval=config.access_record_interval,
        )
        await directories.start(store)  # opens the index only in a directory that is ok
        settings = FillSettings(config.fsync_interval_bytes, config.fsync_interval_seconds)
        keystone, service = identity.build(config)
        guard = admin.build(config, session, keystone)
        # Data transfers use the daemon's own credentials when it has some: a caller's token
        # that expires mid-fill then cuts nobody (callers are still authorised one by one).
        filler = Filler(
            store,
            upstream,
            settings,
            service.credentials if service.configured else None,
            # A service token the upstream refuses (401) is renewed once (keystoneauth1).
            service.renew if service.configured else None,
        )
        proxy = Proxy(
            store,
            filler,
            upstream,
            Authorizer(
                upstream,
                config.auth_cache_ttl,
                config.auth_stale_if_error,
                config.auth_stale_after_failures,
            ),
            MeteredPassThrough(make_passthrough(raw_upstream, config), metrics),
            max_entry_size=config.max_entry_size,
            directories=directories,
        )
        signatures: Signatures | None = None
        if anchors is not None:
            signatures = Signatures(
                anchors, required=config.image_signature_required, run=store.run
            )
            filler.signatures = proxy.signatures = signatures
        safety: Safety | None = None
        if config.image_safety_mode in ("audit", "enforce"):
            checks = SafetyPolicy(
                frozenset(config.image_safety_allowed_formats),
                frozenset(config.image_safety_nonfatal_checks),
            )

            async def lookup(image_id: str) -> ImageRecord | None:
                """An image's record with the daemon's own credentials (re-inspection of an
                entry that kept no declaration); None without credentials."""
                creds = await service.credentials() if service.configured else None
                return None if creds is None else await upstream.record(image_id, creds)

            safety = Safety(
                checks,
                file_backend=config.upstream_kind == "file",
                run=store.run,
                enforce=config.image_safety_mode == "enforce",
                refuse=config.image_safety_on_violation == "refuse",
                root=store.root,
                lookup=lookup,
            )
            filler.safety = proxy.safety = safety
            safety.drop = filler.remove  # a violating image's entry goes
            safety.signatures = signatures  # enforce: a hit needs an allowed signature too
            proxy.on_deleted.append(safety.forget)  # a deleted image's verdict record too
            # Overrides and violation records are read from a directory that is ok and
            # indexed (nothing is created in a bare mount point), now and whenever it is
            # indexed again.
            if directories.opened:
                await safety.load()
            directories.on_indexed.append(safety.reload)
        if config.upstream_kind == "glance" and not service.configured:
            log.warning(
                "no service credentials (keystone_authtoken): queued images "
                "cannot be prefetched on schedule; PUT /v2/cache/{id} uses the caller's token"
            )
        prefetcher = Prefetcher(store, filler, upstream, service, config)
        proxy.on_deleted.append(prefetcher.forget)  # a deleted image leaves the queue
        maintenance = jobs.Maintenance(store, filler, config)
        # New fills, for clients and prefetch: room in the cache and on the disk.
        proxy.admission = prefetcher.admission = maintenance.admission
        if config.prune_on_fill:
            filler.on_reserve = maintenance.make_room
        app[STORE], app[FILLER], app[PROXY] = store, filler, proxy
        app[MANAGER] = manage.Manager(
            _as_managed(config),
            store,
            filler,
            upstream,
            guard,
            prefetcher,
            maintenance,
            session,
            service,
            directories,
            filler.safety,
        )
        integrity = Integrity(
            store,
            filling=filler.fills.keys,
            invalidate=store.invalidate,
            rate=config.scrub_rate * (1 << 20),
            interval=config.scrub_interval,
        )
        proxy.integrity = integrity
        reloadables.register(
            "scrub",
            lambda old, new: integrity.configure(
                rate=new.scrub_rate * (1 << 20), interval=new.scrub_interval
            ),
        )
        app[INTEGRITY] = integrity
        integrity.start()
        peer_session: aiohttp.ClientSession | None = None
        fleet: peers.Fleet | None = None
        notices: fleet_notices.Notices | None = None
        if config.fleet:  # peer fill (cached/fleet/): siblings serve and feed fills
            keys = await asyncio.to_thread(_fleet_keys, config)
            signer = trust.Trust(config.fleet_self, config.fleet_members, *keys)
            timeouts = peers.Timeouts(
                config.fleet_connect_timeout,
                config.fleet_headers_timeout,
                config.fleet_stall_timeout,
                config.fleet_lookup_timeout,
                config.fleet_min_copy_rate * (1 << 20),
            )
            peer_session = peers.Fleet.session_for(timeouts, client_tls.upstream)
            fleet = peers.Fleet(signer, peer_session, timeouts, forwarding=service.configured)
            filler.sources = fleet.sources_for

            async def open_for_sibling(
                image_id: str, span: tuple[int, int] | None = None
            ) -> Fill | None:
                """A fill of ``image_id`` from the upstream, for a sibling that found no copy
                (cached/fleet/serve.py): the record and bytes with the service credentials,
                admitted like a prefetch; None without credentials or room. ``span``: only
                the chunks covering bytes ``[start, end)`` (a sibling's range miss), added
                to this member's running fill if it has one."""
                creds = await service.credentials() if service.configured else None
                if creds is None:
                    return None
                record = await upstream.record(image_id, creds)
                if record.status != "active" or record.size is None:
                    return None
                if record.size > config.max_entry_size:
                    return None
                if safety is not None and safety.known(image_id, record.os_hash_value, record):
                    return None  # never cached here (enforce): the sibling asks the upstream
                entry = store.get(image_id)
                have = entry.present_bytes() if entry and entry.size == record.size else 0
                if span is not None and span == (0, max(span[1], record.size)):
                    span = None  # the whole image, as a driver fetches it
                start, end = span if span is not None else (0, record.size)
                end = min(end, record.size)
                if start >= end and record.size:
                    return None
                need = record.size - have if span is None else end - start
                async with maintenance.admission(need) as refused:
                    if refused is not None:
                        log.info("no room to fetch %s for a sibling: %s", image_id, refused)
                        return None
                    fill, _ = await filler.open(record, creds)
                    if isinstance(fill.sources, peers.FleetSources):
                        fill.sources.forward = False  # never forwards what it was asked
                    fill.demand(start, end, whole=span is None)
                return fill

            async def deleted_by_sibling(image_id: str) -> None:
                await proxy.apply_change(image_id, deleted=True)

            # A change the upstream accepted through this member: every sibling is told
            # (a delete drops every copy, any other change makes them re-check callers).
            notices = fleet_notices.Notices(fleet)
            told = notices

            def tell(image_id: str, deleted: bool) -> None:
                told.tell(image_id, fleet_notices.DELETE if deleted else fleet_notices.FORGET)

            proxy.on_changed.append(tell)
            # Cache-Status (RFC 9211) names this member, and a sibling feeding a fill first.
            proxy.cache_name = peers.cache_name(config.fleet_self)
            if isinstance(proxy.passthrough, MeteredPassThrough):
                relayed = proxy.passthrough.inner
                if isinstance(relayed, GlancePassThrough):
                    relayed.last_versions.cache_name = proxy.cache_name

            async def upstream_side(fill: Fill) -> str | None:
                return await peers.upstream_side(fill, config.fleet_lookup_timeout + 0.1)

            proxy.upstream_side = upstream_side
            service_ = app[PEERS] = serve.PeerService(
                signer,
                store,
                filler,
                directories,
                integrity,
                config.fleet_max_peer_streams,
                peers.fill_source,
                open_for_sibling,
                lambda fill: peers.settled_source(fill, config.fleet_lookup_timeout + 1.0),
                deleted=deleted_by_sibling,
                changed=proxy.authorizer.forget,
                head_wait=config.fleet_lookup_timeout / 2,
                fill_feeder=peers.fill_feeder,
            )
            member = fleet

            def view() -> dict[str, object]:
                return member_view(member, told, service_, store, filler, directories)

            service_.view = view
            app[MANAGER].fleet = fleet
            app[MANAGER].fleet_view = view
            log.info(
                "fleet member %s of %s", config.fleet_self, ", ".join(fleet.siblings) or "none"
            )
        # Glance's own cached files found in the directory (cached/cachedir/adoption.py).
        adopter = proxy.adopter = Adopter(
            store, upstream, integrity, service.credentials if service.configured else None
        )
        adopter.start()
        filler.disk_guard = directories.cache  # fills run while the cache directory is ok
        directories.on_detached.append(filler.detach)  # and stop when its index is forgotten
        scheduler = app[SCHEDULER] = jobs.start_scheduler(
            config, prefetcher, maintenance, integrity, filler.safety
        )
        # The jobs leave a cache directory that is not ok alone; the prefetch queue resumes
        # at once when it is ok (and indexed) again.
        for job in scheduler.get_jobs():
            scheduler.modify_job(job.id, func=directories.while_usable(job.func, job.id))

        def resume_prefetch() -> None:
            scheduler.modify_job("prefetch", next_run_time=dt.datetime.now(dt.UTC))

        directories.on_indexed.append(resume_prefetch)
        ops.store, ops.filler, ops.guard, ops.session = store, filler, guard, session
        ops.store_guard = directories.store
        _register_live(reloadables, app, ops, raw_upstream, proxy.authorizer, guard)
        _register_policy(reloadables, active_policy)
        _register_live_jobs(reloadables, scheduler, prefetcher, maintenance, proxy)
        yield
        ops.store = None
        app[SCHEDULER].shutdown(wait=False)
        await asyncio.sleep(0)  # the scheduler shuts down (and cancels its runs) on the loop
        await adopter.close()
        await integrity.close()
        await prefetcher.close()
        await maintenance.close()  # fills that end while they stop make no more room
        await filler.close()
        if safety is not None:
            await safety.settled()  # verdict records being written
        await session.close()
        if notices is not None:
            await notices.close()
        if fleet is not None:
            await fleet.close()
            await app[PEERS].close()
        if peer_session is not None:
            await peer_session.close()
        await upstream.close()
        await store.aclose()  # writes the pending access records
        await directories.close()
        if metrics_module.active() is metrics:
            metrics_module.install(None)

    app.cleanup_ctx.append(resources)

    async def image_data(request: web.Request) -> web.StreamResponse:
        if routes.routed(request).by_media_type:
            # /v2/images/ID/file with a versioned media type is /v2/v2/... (or the version
            # choices): not a download.
            return await request.app[PROXY].forward(request)
        return await request.app[PROXY].image_data(request)  # (a malformed id: 400 here)

    async def forward(request: web.Request) -> web.StreamResponse:
        route = routes.routed(request).download
        if route is not None and request.method == "GET":
            # /v2.N/..., dot segments, double slashes, %-encoding, the versioned media type
            # on an unversioned path: still a download.
            return await request.app[PROXY].image_data(routes.as_download(request, route))
        return await request.app[PROXY].forward(request)

    async def version_document(request: web.Request) -> web.StreamResponse:
        return await request.app[PROXY].versions(request)

    app.router.add_get("/v2/images/{image_id}/file", image_data, allow_head=False, name="download")
    app.router.add_get("/versions", version_document, allow_head=False)
    app.router.add_get("/", version_document, allow_head=False)
    manage.add_routes(app)  # before the catch-all: management is never proxied
    if config.fleet:  # siblings' requests, before the catch-all: never relayed
        serve.add_routes(app, lambda: app[PEERS])
    # With admin_listen, /metrics is served on the management listener only.
    health.add_routes(
        app, with_metrics=True, only_on=is_management if config.admin_listen else None
    )
    app.router.add_route("*", "/{tail:.*}", forward, name="relayed")
    return app


def _as_managed(config: Config) -> Config:
    """The configuration the management API reads: with a fleet, the members' urls are its
    ``peers`` and this member's url its ``worker_self_reference_url`` (GET
    /v2/cache/nodes/{id} lists the members holding an image)."""
    if not config.fleet:
        return config
    return dataclasses.replace(
        config,
        peers=tuple(m.url for m in config.fleet_members if m.id != config.fleet_self),
        worker_self_reference_url=next(
            m.url for m in config.fleet_members if m.id == config.fleet_self
        ),
    )


def _fleet_keys(config: Config) -> tuple[bytes, bytes | None]:
    """The fleet key and the previous one (if set). Blocks: call from a thread."""
    key = configuration.read_fleet_secret(config.fleet_secret_file, "fleet_secret_file")
    previous = None
    if config.fleet_previous_secret_file:
        previous = configuration.read_fleet_secret(
            config.fleet_previous_secret_file, "fleet_previous_secret_file"
        )
    return key, previous


# ------------------------------------------------------------------------------ reload
# What a SIGHUP changes in the running parts (cached/ops/lifecycle.py lists the live options).
def _register_live(
    parts: Reloadables,
    app: web.Application,
    ops: Ops,
    upstream: Backend,
    authorizer: Authorizer,
    guard: admin.AdminGuard,
) -> None:
    def configs(old: Config, new: Config) -> None:
        ops.config = new
        # peers, worker_self_reference_url, legacy_queue_immediate
        app[MANAGER].config = _as_managed(new)

    def log_level(old: Config, new: Config) -> None:
        if new.log_level != old.log_level:
            logs.set_level(new.log_level)

    def timeouts(old: Config, new: Config) -> None:
        if isinstance(upstream, GlanceBackend):
            upstream.set_timeouts(new.upstream_connect_timeout, new.upstream_read_timeout)
        authorizer.configure(new.auth_cache_ttl, new.auth_stale_if_error)

    def admin_tokens(old: Config, new: Config) -> None:
        guard.configure(new.admin_tokens, new.admin_cache_ttl)

    parts.register("configuration", configs)
    parts.register("log level", log_level)
    parts.register("upstream timeouts", timeouts)
    parts.register("admin tokens", admin_tokens)


def _register_policy(parts: Reloadables, active: request_policy.ActivePolicy) -> None:
    """The policy file is read again at every reload, changed path or not: a good file is in
    force at once, one that does not validate refuses the reload (the old rules stay)."""

    def stage(new: Config) -> Callable[[], None]:
        policy = request_policy.load(new.policy) if new.policy else None  # in a thread

        def apply() -> None:
            if policy is None and active.policy is None:
                return
            active.replace(policy, new.policy)
            log.info("reload: %s", active.describe())

        return apply

    parts.register_stage("request policy", stage)


def _register_live_jobs(
    parts: Reloadables,
    scheduler: AsyncIOScheduler,
    prefetcher: Prefetcher,
    maintenance: jobs.Maintenance,
    proxy: Proxy,
) -> None:
    def limits(old: Config, new: Config) -> None:
        maintenance.configure(new)
        if new.image_cache_max_size < old.image_cache_max_size:
            maintenance.make_room()  # prune at once, not at the next scheduled run
        proxy.max_entry_size = new.max_entry_size  # admission follows the max size
        prefetcher.configure(
            new.prefetch_concurrency, new.prefetch_retry_initial, new.prefetch_retry_max
        )

    def intervals(old: Config, new: Config) -> None:
        for name, key in (
            ("prefetch", "cache_prefetcher_interval"),
            ("prune", "cache_prune_interval"),
            ("clean", "cache_clean_interval"),
            ("scrub", "scrub_interval"),
            ("audit", "image_safety_audit_interval"),  # (none with image_safety_mode off)
        ):
            seconds = getattr(new, key)
            if seconds != getattr(old, key) and scheduler.get_job(name) is not None:
                scheduler.reschedule_job(
                    name, trigger=IntervalTrigger(seconds=seconds, timezone=dt.UTC)
                )
                log.info("%s runs every %d s", name, seconds)

    parts.register("limits", limits)
    parts.register("job intervals", intervals)
