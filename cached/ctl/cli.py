"""``cached-manage``: manage the caches of one or several cached daemons over HTTP.

The verbs, options, prompts, tables and error messages are those of Glance's
``glance-cache-manage`` (``glance/cmd/cache_manage.py``), so operators and their scripts can
switch; on top: ``--json``, human sizes, fetch progress in ``list-queued`` and ``--all-hosts``
(one table for every controller, queried at once), and cached's own ``safety`` command (the
content verdicts, :mod:`cached.ctl.safety`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import stat
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from cached import __version__
from cached import config as configuration
from cached.ctl import render, safety
from cached.ctl.client import (
    Client,
    Forbidden,
    HostError,
    NotEnabled,
    Target,
    gather_hosts,
    parse_target,
)
from cached.ctl.progress import Progress, fetch_status
from cached.errors import ConfigError

OK, FAILED, USAGE = 0, 1, 2
DEFAULT_PORT = 9292
# Where cached-manage looks when neither -H, -c nor -p says where the daemon is: the node's
# configuration file (its management address), else this management socket. Module
# constants so the tests point them into a temporary directory (never the host's own).
DEFAULT_CONFIG = Path("/etc/cached/cached.yaml")
DEFAULT_SOCKET = "/run/cached/admin.sock"


def is_socket(path: str) -> bool:
    """Whether a Unix socket exists at ``path``."""
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


@dataclass(frozen=True)
class Verb:
    """One command: its request, and the words Glance prints around it."""

    name: str
    help: str
    method: str
    path: str  # under /v2/ (or /v1/); {id} is the image ID
    failure: str  # "Failed to <failure>. Got error:"
    prompt: str = ""  # confirmation question, for verbs that change something
    done: str = ""  # printed with -v after success; {id} and {num_deleted}

    @property
    def takes_id(self) -> bool:
        return "{id}" in self.path


VERBS = {
    v.name: v
    for v in (
        Verb("list-cached", "List all images currently cached", "GET", "cached_images",
             "show cached images"),
        Verb("list-queued", "List all images currently queued for caching", "GET",
             "queued_images", "show queued images"),
        Verb("queue-image", "Queue an image for caching", "PUT", "queued_images/{id}",
             "queue the specified image for caching", "Queue image {id} for caching?",
             "Queued image {id} for caching"),
        Verb("delete-cached-image", "Purges an image from the cache", "DELETE",
             "cached_images/{id}", "delete the specified cached image",
             "Delete cached image {id}?", "Deleted cached image {id}"),
        Verb("delete-all-cached-images", "Removes all images from the cache", "DELETE",
             "cached_images", "Delete all cached images", "Delete all cached images?",
             "Deleted {num_deleted} cached images"),
        Verb("delete-queued-image", "Deletes an image from the cache queue", "DELETE",
             "queued_images/{id}", "delete the specified queued image",
             "Delete queued image {id}?", "Deleted queued image {id}"),
        Verb("delete-all-queued-images", "Deletes all images from the cache queue", "DELETE",
             "queued_images", "Delete all queued images", "Delete all queued images?",
             "Deleted {num_deleted} queued images"),
    )
}  # fmt: skip


def _commands_help() -> str:
    lines = ["commands:"]
    lines += [f"  {'help [<command>]':<26}Output help for one of the commands below"]
    lines += [f"  {v.name + (' <ID>' if v.takes_id else ''):<26}{v.help}" for v in VERBS.values()]
    lines += [f"  {'safety <ACTION> [<ID>]':<26}Content verdicts (cached's own):"]
    for action in safety.ACTIONS.values():
        name = action.name + (" <ID>" if action.takes_id else "")
        lines += [f"    {name:<24}{action.help}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    env_token = os.environ.get("OS_AUTH_TOKEN") or os.environ.get("OS_TOKEN")
    p = argparse.ArgumentParser(
        prog="cached-manage",
        description="Manage the image caches of cached daemons (the glance-cache-manage verbs).",
        epilog=_commands_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "command", choices=["help", *VERBS, "safety"], metavar="COMMAND", help="see below"
    )
    p.add_argument("image_id", nargs="?", metavar="ID", help="image ID (a UUID)")
    p.add_argument("extra", nargs="?", help=argparse.SUPPRESS)  # safety ACTION ID
    p.add_argument(
        "-H",
        "--host",
        action="append",
        metavar="HOST[:PORT]|URL",
        help=(
            "daemon to manage: HOST[:PORT], URL or unix:/PATH (default: the management "
            f"address in {DEFAULT_CONFIG} if it exists, else the socket {DEFAULT_SOCKET} if "
            "it exists, else 127.0.0.1); repeat for several"
        ),
    )
    p.add_argument(
        "-p",
        "--port",
        type=int,
        metavar="PORT",
        help=(
            f"port of hosts given without one (default {DEFAULT_PORT}); alone, without -H "
            "or -c, the daemon on 127.0.0.1:PORT (as glance-cache-manage)"
        ),
    )
    p.add_argument(
        "--all-hosts",
        action="store_true",
        help="this node and its peers (from -c), and each -H: one table",
    )
    p.add_argument(
        "-c",
        "--config",
        type=Path,
        metavar="FILE",
        help="the daemon's configuration file (its listen address and peers)",
    )
    p.add_argument(
        "--os-auth-token",
        default=env_token,
        metavar="TOKEN",
        help="admin token, sent as x-auth-token (default env[OS_AUTH_TOKEN])",
    )
    p.add_argument(
        "-A", "--os_auth_token", "--auth_token", dest="os_auth_token", help=argparse.SUPPRESS
    )
    p.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")
    p.add_argument("-v", "--verbose", action="store_true", help="print more verbose output")
    p.add_argument("-d", "--debug", action="store_true", help="show tracebacks")
    p.add_argument(
        "-k",
        "--insecure",
        action="store_true",
        help="do not verify TLS certificates of https:// hosts",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument(
        "--bytes",
        action="store_true",
        help="sizes as byte counts, exactly as glance-cache-manage prints them",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="per request and host (default %(default)s)",
    )
    safety.add_options(p)
    p.add_argument("--version", action="version", version=f"cached-manage {__version__}")
    return p


def _wildcard_to_loopback(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def this_node(config: configuration.Config) -> str:
    """Where ``config``'s daemon answers management on this node: its management socket,
    else its TCP management listener, else ``worker_self_reference_url``, else its first
    ``listen`` address (a wildcard meaning loopback)."""
    addresses = config.admin_addresses
    for address in addresses:
        if isinstance(address, Path):
            return f"unix:{address}"
    for address in addresses:
        if isinstance(address, tuple):
            host, port = address
            scheme = "https" if config.tls_cert_file else "http"
            return Target(_wildcard_to_loopback(host), port, scheme).url
    if config.worker_self_reference_url:
        return config.worker_self_reference_url
    host, port = config.listen_address
    return Target(_wildcard_to_loopback(host), port).label


def resolve_targets(args: argparse.Namespace) -> list[Target]:
    """The hosts to ask, from ``-H``, ``-p``, ``--all-hosts`` and ``-c``.

    - ``-H`` names hosts (``-p`` is the port of those given without one).
    - ``-c FILE``: this node is :func:`this_node` of that file; ``--all-hosts`` adds its
      ``peers``.
    - ``-p PORT`` alone (no ``-H``, no ``-c``): ``127.0.0.1:PORT``, as glance-cache-manage
      reads it; nothing else is consulted.
    - Nothing at all: the node's configuration file :data:`DEFAULT_CONFIG` if it exists (a
      file that does not load is an error, never silently skipped), else the management
      socket :data:`DEFAULT_SOCKET` if it exists, else ``127.0.0.1:9292``.

    Raises:
        ValueError: a bad host or no host for ``--all-hosts`` (usage).
        ConfigError: the config file is unreadable or invalid.
    """
    names: list[str] = list(args.host or [])
    port = args.port if args.port is not None else DEFAULT_PORT
    config_file = args.config
    port_alone = args.port is not None and not names and config_file is None
    if config_file is None and not names and not port_alone and DEFAULT_CONFIG.is_file():
        config_file = DEFAULT_CONFIG
    if config_file is not None:
        config = configuration.load(config_file)
        here = this_node(config)
        if args.all_hosts:
            names += [here, *config.peers]
        elif not names:
            names = [here]
    if not names:
        if port_alone:
            names = [f"127.0.0.1:{port}"]
        elif args.all_hosts:
            raise ValueError("--all-hosts: no hosts (give -c CONFIG, or -H once per host)")
        else:
            names = [f"unix:{DEFAULT_SOCKET}" if is_socket(DEFAULT_SOCKET) else "127.0.0.1"]
    targets = [parse_target(name, port) for name in names]
    return list(dict.fromkeys(targets))  # once each, in order


def confirm(question: str, to_stderr: bool) -> bool:
    """Glance's ``user_confirm``: ``[y/N]``, only ``y``/``yes`` say yes; EOF says no."""
    stream = sys.stderr if to_stderr else sys.stdout
    print(f"{question} [y/N] ", end="", file=stream, flush=True)
    try:
        answer = sys.stdin.readline()
    except KeyboardInterrupt:
        answer = ""
    if not answer.endswith("\n"):
        print(file=stream)
    return answer.strip().lower() in ("y", "yes")


class Run:
    """One invocation: the parsed arguments, the hosts, and what went to stdout/stderr."""

    def __init__(
        self,
        args: argparse.Namespace,
        verb: Verb,
        targets: list[Target],
        action: safety.Action | None = None,
    ) -> None:
        self.args = args
        self.verb = verb
        self.action = action  # cached-manage safety ACTION
        self.targets = targets
        self.multi = args.all_hosts or len(targets) > 1

    def size(self, value: Any) -> str:
        if self.args.bytes:
            return str(value)
        return render.human_size(value if isinstance(value, int) else None)

    def report(self, errors: list[HostError]) -> int:
        """Print the hosts that failed (stderr, or in the JSON); FAILED if there were any."""
        for exc in errors:
            if self.args.json:
                continue
            if self.multi:
                print(f"{exc.target.label}: {exc.message}", file=sys.stderr)
            elif isinstance(exc, NotEnabled | Forbidden):
                print(exc.message, file=sys.stderr)
            else:
                print(f"Failed to {self.verb.failure}. Got error:", file=sys.stderr)
                print(f"{exc.target.label}: {exc.message}", file=sys.stderr)
        return FAILED if errors else OK

    def dump(self, key: str, items: list[dict[str, Any]], errors: list[HostError]) -> None:
        failed = [{"host": e.target.label, "status": e.status, "error": e.message} for e in errors]
        print(json.dumps({key: items, "errors": failed}, indent=2))

    async def execute(self, session: aiohttp.ClientSession) -> int:
        token = self.args.os_auth_token
        async with contextlib.AsyncExitStack() as stack:
            clients = []
            for target in self.targets:
                via = session
                if target.socket:  # one session per management socket
                    via = await stack.enter_async_context(
                        aiohttp.ClientSession(connector=aiohttp.UnixConnector(target.socket))
                    )
                clients.append(Client(via, target, token, self.args.timeout))
            return await self._execute(clients)

    async def _execute(self, clients: list[Client]) -> int:
        if self.action is not None:
            return await safety.execute(self.action, self.args, clients, confirm)
        if self.verb.name == "list-cached":
            return await self.list_cached(clients)
        if self.verb.name == "list-queued":
            return await self.list_queued(clients)
        return await self.change(clients)

    def warn_directories(self, clients: list[Client], statuses: list[list[str]]) -> None:
        """On stderr (stdout stays glance-cache-manage's): directories a daemon cannot use."""
        for client, problems in zip(clients, statuses, strict=True):
            for line in problems:
                print(f"warning: {client.target.label}: {line}", file=sys.stderr)

    async def list_cached(self, clients: list[Client]) -> int:
        rows: list[dict[str, Any]] = []
        errors: list[HostError] = []
        answers, statuses = await asyncio.gather(
            gather_hosts(clients, "GET", self.verb.path),
            asyncio.gather(*(fetch_status(c) for c in clients)),
        )
        self.warn_directories(clients, [problems for _, problems in statuses])
        for client, answer in answers:
            if isinstance(answer, HostError):
                errors.append(answer)
                continue
            images = answer.get("cached_images") if isinstance(answer, dict) else None
            if not isinstance(images, list):
                errors.append(HostError(client.target, "the answer has no cached_images list"))
                continue
            rows += [{"host": client.target.label, **image} for image in images]
        if self.args.json:
            self.dump("cached_images", rows, errors)
        elif rows:
            self.found(len(rows), "cached", len(clients) - len(errors))
            header = ["ID", "Last Accessed (UTC)", "Last Modified (UTC)", "Size", "Hits"]
            cells = [
                [
                    row.get("image_id"),
                    render.iso_time(row.get("last_accessed")),
                    render.iso_time(row.get("last_modified")),
                    self.size(row.get("size")),
                    row.get("hits"),
                ]
                for row in rows
            ]
            self.print_table(header, cells, rows, {"Size": "r", "Hits": "r"})
        elif len(errors) < len(clients):
            print("No cached images.")
        return self.report(errors)

    async def list_queued(self, clients: list[Client]) -> int:
        rows: list[dict[str, Any]] = []
        errors: list[HostError] = []
        answers, statuses = await asyncio.gather(
            gather_hosts(clients, "GET", self.verb.path),
            asyncio.gather(*(fetch_status(c) for c in clients)),
        )
        self.warn_directories(clients, [problems for _, problems in statuses])
        progress = [fills for fills, _ in statuses]
        for (client, answer), fills in zip(answers, progress, strict=True):
            if isinstance(answer, HostError):
                errors.append(answer)
                continue
            queued = answer.get("queued_images") if isinstance(answer, dict) else None
            if not isinstance(queued, list):
                errors.append(HostError(client.target, "the answer has no queued_images list"))
                continue
            for image_id in queued:
                p = fills.get(str(image_id), Progress())
                rows.append({"host": client.target.label, "image_id": image_id, **p.as_json()})
        if self.args.json:
            self.dump("queued_images", rows, errors)
        elif rows:
            self.found(len(rows), "queued", len(clients) - len(errors))
            header = ["ID", "State", "Progress", "Size", "Rate"]
            cells = [
                [
                    row["image_id"],
                    row["state"] or "-",
                    render.percent(row["bytes_done"], row["size"]),
                    self.size(row["size"]) if row["size"] is not None else "-",
                    render.rate(row["rate"]),
                ]
                for row in rows
            ]
            self.print_table(header, cells, rows, {"Progress": "r", "Size": "r", "Rate": "r"})
        elif len(errors) < len(clients):
            print("No queued images.")
        return self.report(errors)

    def found(self, count: int, what: str, answered: int) -> None:
        hosts = f" on {answered} host{'s' if answered != 1 else ''}" if self.multi else ""
        print(f"Found {count} {what} images{hosts}...")

    def print_table(
        self,
        header: list[str],
        cells: list[list[Any]],
        rows: list[dict[str, Any]],
        align: dict[str, render.Align],
    ) -> None:
        if self.multi:
            header = ["Host", *header]
            cells = [[row["host"], *c] for row, c in zip(rows, cells, strict=True)]
        print(render.table(header, cells, align))

    async def change(self, clients: list[Client]) -> int:
        image_id = self.args.image_id or ""
        question = self.verb.prompt.format(id=image_id)
        if self.multi:
            question = f"{question[:-1]} on {', '.join(t.label for t in self.targets)}?"
        if not self.args.force and not confirm(question, to_stderr=self.args.json):
            return OK
        path = self.verb.path.format(id=image_id)
        results: list[dict[str, Any]] = []
        errors: list[HostError] = []
        for client, answer in await gather_hosts(clients, self.verb.method, path):
            if isinstance(answer, HostError):
                errors.append(answer)
                continue
            # Glance answers null, or {"num_deleted": N} to the delete-all verbs.
            count = answer.get("num_deleted") if isinstance(answer, dict) else None
            result: dict[str, Any] = {"host": client.target.label}
            result |= {"image_id": image_id} if image_id else {"num_deleted": count}
            results.append(result)
            if self.args.verbose and not self.args.json:
                done = self.verb.done.format(id=image_id, num_deleted=count)
                print(f"{client.target.label}: {done}" if self.multi else done)
        if self.args.json:
            self.dump("results", results, errors)
        return self.report(errors)


def _check_usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Verb | None:
    """The verb to run (None for ``help``); exits with 2 on a usage error."""
    if args.command == "help":
        if args.image_id is None:
            parser.print_help()
        elif args.image_id in VERBS:
            verb = VERBS[args.image_id]
            print(f"cached-manage {verb.name}{' <ID>' if verb.takes_id else ''} [options]")
            print(f"\n    {verb.help}.")
        elif args.image_id == "safety":
            print(f"cached-manage {safety.HELP} [options]")
            for action in safety.ACTIONS.values():
                print(f"\n    {action.name}: {action.help}.")
        else:
            parser.error(f"{args.image_id!r} is not a valid command")
        return None
    if args.command == "safety":
        action = safety.check_usage(parser, args)
        if args.timeout <= 0:
            parser.error("--timeout must be positive")
        return Verb("safety", action.help, "", "", action.failure)
    if args.extra is not None:
        parser.error(f"unrecognized arguments: {args.extra}")
    verb = VERBS[args.command]
    if verb.takes_id:
        if args.image_id is None:
            parser.error(f"please specify the ID of the image for command '{verb.name}'")
        try:
            uuid.UUID(args.image_id)
        except ValueError:
            parser.error(f"Image ID '{args.image_id}' is not a valid UUID.")
    elif args.image_id is not None:
        parser.error(f"command '{verb.name}' takes no image ID (got {args.image_id!r})")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    return verb


async def _run(run: Run) -> int:
    connector = aiohttp.TCPConnector(limit_per_host=4, ssl=False if run.args.insecure else True)
    async with aiohttp.ClientSession(connector=connector) as session:
        return await run.execute(session)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``cached-manage`` console script; returns the exit status (0, 1, or 2 = usage)."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    verb = _check_usage(parser, args)
    if verb is None:
        return OK
    try:
        targets = resolve_targets(args)
    except ValueError as exc:
        parser.error(str(exc))
    except ConfigError as exc:
        print(f"cached-manage: configuration error: {exc}", file=sys.stderr)
        return USAGE
    start = time.monotonic()
    action = safety.ACTIONS[args.extra_action] if verb.name == "safety" else None
    try:
        status = asyncio.run(_run(Run(args, verb, targets, action)))
    except KeyboardInterrupt:
        return FAILED
    except Exception as exc:
        if args.debug:
            raise
        print(f"Failed to {verb.failure}. Got error:\n{exc}", file=sys.stderr)
        return FAILED
    if args.verbose and not args.json:
        print(f"Completed in {time.monotonic() - start:-0.4f} sec.")
    return status
