"""``cached serve``, ``cached check-config`` and ``cached reload``: the daemon's command
line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from cached import __version__
from cached import config as configuration
from cached.app import FILLER, SCHEDULER, load_anchors, make_app, prepare_dirs
from cached.config import Config
from cached.edge import listeners, policy, tls
from cached.edge.connguard import GuardedRunner, Limits
from cached.edge.loopback import is_loopback
from cached.errors import ConfigError
from cached.fleet import ring
from cached.ops import logs, reloadcmd
from cached.ops.health import OPS, Ops
from cached.ops.lifecycle import (
    RELOADABLES,
    Progress,
    Reloader,
    install_freeze_hook,
    status_text,
    tick,
)
from cached.ops.logs import AccessLogger
from cached.ops.sdnotify import Notifier

log = logging.getLogger("cached")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cached", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cached {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "reload",
        help="reload a running daemon (SIGHUP) and wait for the result",
        description="Send SIGHUP to a running cached and wait until it has reloaded. Exit "
        "status: 0 every change is in force; 1 refused, partly applied or no verdict (with "
        "the reason); 2 usage; 3 the live changes are in force but options that need a "
        "restart changed (named).",
    )
    p.add_argument("--pid", type=int, required=True, help="the daemon's process id ($MAINPID)")
    p.add_argument(
        "--url",
        metavar="URL",
        help="where the daemon answers /healthz (unix:/path or http(s)://host:port); "
        "default: found from the process's listening sockets",
    )
    p.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the verdict (60)"
    )
    for name, help_text in (
        ("serve", "run the caching proxy (in the foreground)"),
        (
            "check-config",
            "run every check serve runs short of binding its sockets (configuration, "
            "directories, TLS files, policy, the management socket's directory) and print "
            "the effective values; exit 0 when serve would start, 2 otherwise",
        ),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "check-config":
            p.add_argument(
                "--user",
                metavar="USER",
                help="run the checks as this user (e.g. the service's: cached); needs root",
            )
            p.add_argument(
                "-q",
                "--quiet",
                action="store_true",
                help="print only errors (the unit's ExecStartPre)",
            )
        p.add_argument("-c", "--config", type=Path, help="YAML configuration file")
        p.add_argument(
            "--listen", metavar="HOST:PORT", help="address(es) to listen on, comma-separated"
        )
        p.add_argument("--upstream", metavar="URL", help="http(s)://glance:9292 or file:///dir")
        p.add_argument("--cache-dir", metavar="DIR", dest="image_cache_dir")
        p.add_argument("--max-size", metavar="SIZE", dest="image_cache_max_size")
        p.add_argument("--log-level", metavar="LEVEL", dest="log_level")
        if name == "check-config":
            p.add_argument(
                "--owner",
                metavar="IMAGE_ID",
                help="print the fleet member owning the image and the fallback order, only",
            )
    return parser


def load_config(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {
        key: getattr(args, key)
        for key in ("listen", "upstream", "image_cache_dir", "image_cache_max_size", "log_level")
        if getattr(args, key) is not None
    }
    config = configuration.load(args.config, overrides)
    source = str(args.config or "command line")
    if config.upstream_kind == "file" and not config.access_tokens:
        for host, _ in config.listen_addresses:
            if not is_loopback(host):
                raise ConfigError(
                    f"{source}: option 'listen': a file upstream has no identity service; "
                    f"listen on loopback or set 'access_tokens' (got {host})"
                )
    listeners.check_exposure(config, source)
    if config.policy:
        policy.load(config.policy)
    return config


def _print_owner(config: Config, image_id: str) -> int:
    """``check-config --owner``: the image's owner and fallback order (cached/fleet/ring.py)."""
    if not config.fleet_members:
        print("cached: configuration error: option 'fleet_members': no fleet", file=sys.stderr)
        return 2
    ranked = ring.order([m.id for m in config.fleet_members], image_id)
    print(f"owner: {ranked[0]}")
    print(f"order: {', '.join(ranked)}")
    return 0


def _secrets(config: Config) -> list[str]:
    return [*config.keystone_authtoken.secrets(), config.service_token, *config.access_tokens]


async def start_listeners(
    config: Config, runner: web.AppRunner, server_tls: tls.ServerTLS | None
) -> list[web.BaseSite]:
    """Bind every address the daemon serves on (cached/edge/listeners.py): the ``listen``
    addresses and, when set, the management listener ``admin_listen``; log them. Returns the
    started sites."""
    sockets = await listeners.start(runner, config, server_tls)
    for url in sockets.management_urls:  # first: "listening on" tells tools the daemon is up
        log.info("management API on %s (no token needed there; metrics and health too)", url)
    if sockets.fleet_url:
        log.info("fleet listener on %s (siblings' requests only)", sockets.fleet_url)
    for url in sockets.urls:
        log.info(
            "listening on %s (upstream %s, cache %s)",
            url,
            configuration.shown("upstream", config.upstream),
            config.image_cache_dir,
        )
    return sockets.sites


def reload_with_tls(
    load: Callable[[], Config], server_tls: tls.ServerTLS | None
) -> Callable[[], Config]:
    """SIGHUP's loader (run in a thread by the Reloader): the configuration, then the
    listeners' certificate and key again. A pair that does not load refuses the reload and
    leaves the running certificate in place; new connections get a new one, established
    ones (running downloads) keep theirs."""

    def reload() -> Config:
        config = load()
        if server_tls is not None:
            try:
                server_tls.reload()
            except ConfigError as exc:
                raise ConfigError(f"TLS certificate not reloaded: {exc}") from None
            log.info("reloaded the TLS certificate %s", server_tls.cert_file)
        return config

    return reload


async def _serve(
    config: Config, reload_config: Callable[[], Config], server_tls: tls.ServerTLS | None
) -> None:
    notifier = Notifier()
    app = make_app(config)
    ops = app[OPS]
    runner = GuardedRunner(
        app,
        Limits.of(config),
        access_log_class=AccessLogger,
        access_log=logging.getLogger("cached.access"),
        max_line_size=config.max_header_size,
        max_field_size=config.max_header_size,
        handle_signals=False,
        # The drain below waits for running downloads; what is left after it is cut.
        shutdown_timeout=1,
    )
    notifier.status("loading the cache index")
    await runner.setup()  # runs the app's start-up: the index is loaded here
    try:
        sites = await start_listeners(config, runner, server_tls)
        server = runner.server
        assert server is not None
        ops.metrics.count_connections = lambda: len(server.connections)
        reloader = Reloader(
            reload_with_tls(reload_config, server_tls),
            config,
            app[RELOADABLES],
            notifier,
            lambda: status_text(ops),
            ops.reloads,
        )
        stop = asyncio.Event()
        hard_stop = asyncio.Event()

        def on_term() -> None:
            (hard_stop if stop.is_set() else stop).set()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_term)
        loop.add_signal_handler(signal.SIGHUP, reloader.request)
        install_freeze_hook(loop, signal.SIGUSR2)
        ticker = loop.create_task(tick(ops, notifier, Progress(app[FILLER])))
        notifier.ready(status_text(ops))
        checked = loop.create_task(_check_upstream_at_start(ops))
        await stop.wait()
        ops.draining = True
        for site in sites:  # first: once STOPPING is out, new connections are refused
            await site.stop()
        grace = reloader.current.shutdown_grace
        log.info(
            "stopping: no new connections; running downloads have %.0f s to finish "
            "(SIGTERM again to stop at once)",
            grace,
        )
        notifier.stopping(f"draining: {len(server.connections)} connections open")
        app[SCHEDULER].pause()
        await _drain(server, grace, hard_stop)
        ticker.cancel()
        checked.cancel()
    finally:
        await runner.cleanup()  # closes fills (partial data stays for a resume), jobs, sessions
        await asyncio.to_thread(listeners.remove_unix_socket, config)
        notifier.close()
    log.info("stopped")


async def _check_upstream_at_start(ops: Ops) -> None:
    """Say at start, not only in /readyz, when the upstream does not answer as the image API
    (a URL that is not the API's root answers 404 to everything) or cannot be reached."""
    await ops.check_space()  # warns when no image could ever be cached
    problem = await ops.upstream_problem()
    if problem is not None:
        log.warning(
            "upstream %s: %s (/readyz says not ready until it answers as the image API)",
            configuration.shown("upstream", ops.config.upstream),
            problem,
        )


async def _drain(server: web.Server, grace: float, hard_stop: asyncio.Event) -> None:
    """Let requests in progress finish for up to ``grace`` seconds (or until ``hard_stop``);
    whatever still runs then is cut. The sites have stopped accepting already."""
    server.pre_shutdown()  # idle keep-alive connections close now
    drain = asyncio.ensure_future(server.shutdown(grace))
    interrupt = asyncio.ensure_future(hard_stop.wait())
    await asyncio.wait([drain, interrupt], return_when=asyncio.FIRST_COMPLETED)
    interrupt.cancel()
    if not drain.done():
        log.warning(
            "second signal: stopping at once, cutting %d connections", len(server.connections)
        )
        drain.cancel()
        for conn in server.connections:
            conn.force_close()
        with contextlib.suppress(asyncio.CancelledError):
            await drain
    elif server.connections:
        log.warning("shutdown_grace over: cut %d connections", len(server.connections))


def preflight(config: Config, embedded: bool) -> None:
    """``cached check-config``: what ``serve`` checks before it binds, creating nothing (as
    ``nginx -t``): the directories (a cache directory that does not exist must be creatable;
    one that exists gets the same xattr write probe), the listeners' certificate and key,
    the CA bundles, and that each management socket's directory exists (the unit's
    ``RuntimeDirectory=`` makes ``/run/cached``). The policy file was loaded with the
    configuration. Raises ConfigError naming the option."""
    prepare_dirs(config, embedded=embedded, create=False)
    tls.server_tls(config)
    tls.client_tls(config)
    if config.image_signature_verify:
        load_anchors(config)
    if config.admin_socket_group:
        listeners.socket_group_id(config.admin_socket_group)
    for address in config.admin_addresses:
        if isinstance(address, Path) and not address.parent.is_dir():
            raise ConfigError(f"option 'admin_listen': directory {address.parent} does not exist")


def become(user: str) -> None:
    """Take the identity (uid, gid, supplementary groups) of ``user`` for the rest of this
    process; ConfigError when that is not possible."""
    import grp
    import pwd

    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"--user: no user {user!r}") from None
    if os.geteuid() == entry.pw_uid:
        return
    if os.geteuid() != 0:
        raise ConfigError(f"--user {user}: only root can check as another user")
    groups = [g.gr_gid for g in grp.getgrall() if user in g.gr_mem]
    os.setgroups(sorted({entry.pw_gid, *groups}))
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "reload":
        return reloadcmd.main(args.pid, args.url, args.timeout)
    if args.command == "check-config" and args.user:
        try:
            become(args.user)
        except ConfigError as exc:
            print(f"cached: {exc}", file=sys.stderr)
            return 2
    try:
        config = load_config(args)
    except ConfigError as exc:
        print(f"cached: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log_level, _secrets(config))
    if args.command == "check-config" and args.owner is not None:
        return _print_owner(config, args.owner)
    if args.command == "check-config":
        try:
            preflight(config, embedded=args.config is None and args.upstream is None)
        except ConfigError as exc:
            print(f"cached: configuration error: {exc}", file=sys.stderr)
            return 2
        if not args.quiet:
            print(configuration.as_yaml(config), end="")
        return 0
    try:
        prepare_dirs(config, embedded=args.config is None and args.upstream is None)
        server_tls = tls.server_tls(config)
    except ConfigError as exc:
        print(f"cached: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(config, lambda: load_config(args), server_tls))
    except ConfigError as exc:
        print(f"cached: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cached: cannot serve on {config.listen}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
