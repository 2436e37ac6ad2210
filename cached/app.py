"""The composition root: the one place where the daemon's parts are built and wired."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from cached.auth import Authorizer
from cached.config import Config
from cached.fill import Filler, FillSettings
from cached.proxy import Proxy
from cached.store import Store
from cached.upstream import Backend
from cached.upstream.filestore import FileBackend
from cached.upstream.glance import GlanceBackend

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", Config)
STORE = web.AppKey("store", Store)
FILLER = web.AppKey("filler", Filler)
PROXY = web.AppKey("proxy", Proxy)


def make_backend(config: Config) -> Backend:
    if config.upstream_kind == "file":
        return FileBackend(config.upstream_dir, config.access_tokens)
    return GlanceBackend(
        config.upstream,
        connect_timeout=config.upstream_connect_timeout,
        read_timeout=config.upstream_read_timeout,
    )


def make_app(config: Config, *, backend: Backend | None = None) -> web.Application:
    """Build the daemon's application. ``backend`` lets a caller supply its own upstream."""
    app = web.Application()
    app[CONFIG] = config

    async def resources(app: web.Application) -> AsyncIterator[None]:
        upstream = backend or make_backend(config)
        store = Store(config.image_cache_dir)
        await asyncio.to_thread(store.open)
        settings = FillSettings(config.fsync_interval_bytes, config.fsync_interval_seconds)
        filler = Filler(store, upstream, settings)
        proxy = Proxy(store, filler, upstream, Authorizer(upstream, config.auth_cache_ttl))
        app[STORE], app[FILLER], app[PROXY] = store, filler, proxy
        yield
        await filler.close()
        await upstream.close()

    app.cleanup_ctx.append(resources)

    async def image_data(request: web.Request) -> web.StreamResponse:
        return await request.app[PROXY].image_data(request)

    async def forward(request: web.Request) -> web.StreamResponse:
        return await request.app[PROXY].forward(request)

    app.router.add_get("/v2/images/{image_id}/file", image_data, allow_head=False)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app
