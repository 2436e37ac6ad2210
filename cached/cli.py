"""``cached serve`` and ``cached check-config``: the daemon's command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from cached import __version__
from cached import config as configuration
from cached.app import FILLER, make_app, prepare_dirs
from cached.config import Config
from cached.connguard import GuardedRunner, Limits
from cached.errors import ConfigError
from cached.loopback import is_loopback

log = logging.getLogger("cached")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cached", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cached {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("serve", "run the caching proxy"),
        ("check-config", "validate the configuration and print the effective values"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("-c", "--config", type=Path, help="YAML configuration file")
        p.add_argument("--listen", metavar="HOST:PORT", help="address to listen on")
        p.add_argument("--upstream", metavar="URL", help="http(s)://glance:9292 or file:///dir")
        p.add_argument("--cache-dir", metavar="DIR", dest="image_cache_dir")
        p.add_argument("--max-size", metavar="SIZE", dest="image_cache_max_size")
        p.add_argument("--log-level", metavar="LEVEL", dest="log_level")
    return parser


def load_config(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {
        key: getattr(args, key)
        for key in ("listen", "upstream", "image_cache_dir", "image_cache_max_size", "log_level")
        if getattr(args, key) is not None
    }
    config = configuration.load(args.config, overrides)
    if config.upstream_kind == "file" and not config.access_tokens:
        host = config.listen_address[0]
        if not is_loopback(host):
            raise ConfigError(
                f"{args.config or 'command line'}: option 'listen': a file upstream has no "
                f"identity service; listen on loopback or set 'access_tokens' (got {host})"
            )
    return config


async def _serve(config: Config) -> None:
    app = make_app(config)

    async def stop_fills(app: web.Application) -> None:
        await app[FILLER].close()

    app.on_shutdown.append(stop_fills)
    host, port = config.listen_address
    runner = GuardedRunner(
        app,
        Limits.of(config),
        access_log=logging.getLogger("cached.access"),
        max_line_size=config.max_header_size,
        max_field_size=config.max_header_size,
        handle_signals=False,
        # Readers following a fill end when the fills stop (on_shutdown); don't wait long.
        shutdown_timeout=5,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    for addr in runner.addresses:
        shown = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
        log.info(
            "listening on http://%s:%d (upstream %s, cache %s)",
            shown,
            addr[1],
            configuration.shown("upstream", config.upstream),
            config.image_cache_dir,
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args)
    except ConfigError as exc:
        print(f"cached: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "check-config":
        for key, value in vars(config).items():
            print(f"{key}: {configuration.shown(key, value)}")
        return 0
    try:
        prepare_dirs(config, embedded=args.config is None and args.upstream is None)
    except ConfigError as exc:
        print(f"cached: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(config))
    except OSError as exc:
        print(f"cached: cannot serve on {config.listen}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
