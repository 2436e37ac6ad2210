"""``cached-manage``: manage the caches of one or several cached daemons over HTTP.

The verbs, options, prompts, tables and error messages are those of Glance's
``glance-cache-manage`` (``glance/cmd/cache_manage.py``), so operators and their scripts can
switch; on top: ``--json``, human sizes, fetch progress in ``list-queued`` and ``--all-hosts``
(one table for every controller, queried at once), and cached's own ``safety`` command (the
content verdicts, :mod:`cached.ctl.safety`).

In a fleet (``fleet_members`` in the ``-c`` configuration, cached/fleet/): ``--all-hosts``
asks this node and every sibling at its ``fleet_members`` url (their management API must
answer there: with ``fleet_listen`` or a management-only ``admin_listen``, name them with
``-H``); ``list-cached --all-hosts --by-image`` prints one row per image and the hosts
holding it; ``queue-image --all-hosts`` queues the image on its owner only (the first of
its rendezvous order, cached/fleet/ring.py, a pure module): the owner fetches it from the
upstream, and every other member takes the owner's verified copy the first time it is
asked for the image (peer fill): one upstream copy per fleet, where queueing on every
member would start as many fetches at once (collapsed into one upstream copy only when
they find each other in time); ``fleet-status`` asks every member for its view of the
fleet (``GET /v2/cache/fleet``, with the operator's token; never the fleet key) and prints
which members answer, whether their member lists agree, how each sees its siblings (up or
down, last error) and the image bytes each exchanged with each sibling.
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
from cached.fleet import ring

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
        Verb("fleet-status", "Show each fleet member's view of the fleet", "GET",
             "cache/fleet", "show the fleet's state"),
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
    p.add_argument(
        "--by-image",
        action="store_true",
        help="list-cached: one row per image, with the hosts holding it",
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
      ``peers`` and the urls of its siblings in ``fleet_members``.
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
            names += [here, *config.peers, *(m.url for m in siblings(config))]
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


def siblings(config: configuration.Config) -> list[configuration.FleetMember]:
    """The other members of ``config``'s fleet (none without a fleet)."""
    if not config.fleet:
        return []
    return [m for m in config.fleet_members if m.id != config.fleet_self]


def fleet_members(args: argparse.Namespace) -> dict[Target, str]:
    """The fleet's members by the target they are asked at (``--all-hosts`` with a fleet in
    the configuration): this node, and each sibling at its url."""
    config_file = args.config
    if config_file is None and not args.host and DEFAULT_CONFIG.is_file():
        config_file = DEFAULT_CONFIG
    if not args.all_hosts or config_file is None:
        return {}
    config = configuration.load(config_file)
    if not config.fleet:
        return {}
    port = args.port if args.port is not None else DEFAULT_PORT
    members = {parse_target(this_node(config), port): config.fleet_self}
    for member in siblings(config):
        members.setdefault(parse_target(member.url, port), member.id)
    return members


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
        members: dict[Target, str] | None = None,
    ) -> None:
        self.args = args
        self.verb = verb
        self.action = action  # cached-manage safety ACTION
        self.targets = targets
        self.multi = args.all_hosts or len(targets) > 1
        self.members = members or {}  # target -> its fleet member id

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
        if self.verb.name == "fleet-status":
            return await self.fleet_status(clients)
        if self.verb.name == "queue-image" and self.members:
            clients = self.owner_only(clients)
        return await self.change(clients)

    def owner_only(self, clients: list[Client]) -> list[Client]:
        """``queue-image --all-hosts`` in a fleet: the image's owner (and hosts outside the
        fleet), not its other members: they take the owner's copy when asked for it."""
        owner = ring.order(sorted(set(self.members.values())), self.args.image_id or "")[0]
        kept = [c for c in clients if self.members.get(c.target, owner) == owner]
        if not any(self.members.get(c.target) == owner for c in kept):
            print(f"fleet: the image's owner {owner} is not among the hosts", file=sys.stderr)
        if not self.args.json:
            print(
                f"fleet: queued on the image's owner {owner} only; the other members take "
                "its copy when first asked for the image (one upstream copy)",
                file=sys.stderr,
            )
        self.targets = [c.target for c in kept]
        return kept

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
        if self.args.by_image:
            return self.by_image(rows, errors, len(clients))
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

    def by_image(self, rows: list[dict[str, Any]], errors: list[HostError], asked: int) -> int:
        """``list-cached --by-image``: one row per image, the hosts holding it."""
        images: dict[str, dict[str, Any]] = {}
        for row in rows:
            image = images.setdefault(
                str(row.get("image_id")),
                {"image_id": row.get("image_id"), "size": row.get("size"), "hits": 0, "hosts": []},
            )
            image["hosts"].append(row["host"])
            image["hits"] += row.get("hits") or 0
        found = sorted(images.values(), key=lambda i: str(i["image_id"]))
        if self.args.json:
            self.dump("images", found, errors)
        elif found:
            answered = asked - len(errors)
            print(f"Found {len(found)} cached images on {answered} host{'s' * (answered != 1)}...")
            header = ["ID", "Size", "Hits", "Copies", "Hosts"]
            cells = [
                [
                    i["image_id"],
                    self.size(i["size"]),
                    i["hits"],
                    f"{len(i['hosts'])}/{answered}",
                    ", ".join(i["hosts"]),
                ]
                for i in found
            ]
            align: dict[str, render.Align] = {"Size": "r", "Hits": "r", "Hosts": "l"}
            print(render.table(header, cells, align))
        elif len(errors) < asked:
            print("No cached images.")
        return self.report(errors)

    async def fleet_status(self, clients: list[Client]) -> int:
        """``fleet-status``: every member's view of the fleet (``GET /v2/cache/fleet``)."""
        views: list[dict[str, Any]] = []
        errors: list[HostError] = []

        async def ask(client: Client) -> dict[str, Any] | HostError:
            try:
                status, doc = await client.get_json("/v2/cache/fleet")
            except HostError as exc:
                return exc
            if status == 404:
                return HostError(client.target, "not a member of a fleet", status)
            if status == 403:
                return Forbidden(client.target, "Not authorized to make this request.", status)
            if status != 200 or not isinstance(doc, dict):
                return HostError(client.target, f"HTTP {status}", status)
            return {"host": client.target.label, **doc}

        for answer in await asyncio.gather(*(ask(c) for c in clients)):
            if isinstance(answer, HostError):
                errors.append(answer)
            else:
                views.append(answer)
        digests = {v.get("list") for v in views}
        agree = len(digests) <= 1
        if self.args.json:
            print(
                json.dumps(
                    {
                        "members": views,
                        "lists_agree": agree,
                        "errors": [
                            {"host": e.target.label, "status": e.status, "error": e.message}
                            for e in errors
                        ],
                    },
                    indent=2,
                )
            )
            return self.report(errors)
        for exc in errors:
            member = self.members.get(exc.target)
            print(f"{member or exc.target.label}: down ({exc.message})")
        if views:
            header = ["Member", "Host", "List", "Cache", "Images", "Bytes", "Fills", "Notices"]
            cells = [
                [
                    v.get("id"),
                    v["host"],
                    str(v.get("list", ""))[:8] + ("" if agree else " (differs)"),
                    v.get("cache"),
                    v.get("counts", {}).get("complete"),
                    self.size(v.get("counts", {}).get("bytes")),
                    v.get("counts", {}).get("fills"),
                    sum(
                        sum(s.get("notices_pending", {}).values())
                        for s in v.get("siblings", {}).values()
                    ),
                ]
                for v in views
            ]
            print(render.table(header, cells, {"Images": "r", "Bytes": "r"}))
            header = ["Member", "Sibling", "Seen", "Received", "Sent", "Last error"]
            cells = [
                [
                    v.get("id"),
                    sibling,
                    "up" if seen.get("up") else f"down ({seen.get('down_for', 0):.0f}s)",
                    self.size(seen.get("bytes_received")),
                    self.size(seen.get("bytes_sent")),
                    str(seen.get("last_error") or "-")[:60],
                ]
                for v in views
                for sibling, seen in sorted(v.get("siblings", {}).items())
            ]
            print(render.table(header, cells, {"Received": "r", "Sent": "r", "Last error": "l"}))
            print("member lists agree" if agree else "member lists DIFFER (fleet_members)")
        code = self.report(errors)
        return code if agree else FAILED

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
    if args.by_image and verb.name != "list-cached":
        parser.error("--by-image goes with list-cached")
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
        members = fleet_members(args)
    except ValueError as exc:
        parser.error(str(exc))
    except ConfigError as exc:
        print(f"cached-manage: configuration error: {exc}", file=sys.stderr)
        return USAGE
    start = time.monotonic()
    action = safety.ACTIONS[args.extra_action] if verb.name == "safety" else None
    try:
        status = asyncio.run(_run(Run(args, verb, targets, action, members)))
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
