"""The daemon's sockets, and which one a request came in on.

- Public listeners: every address of ``listen`` (``HOST:PORT``, ``[v6]:PORT``; an IPv6
  wildcard is bound v6-only so ``0.0.0.0:P`` and ``[::]:P`` can both be listed), with TLS
  when a certificate is configured.
- The management listener (``admin_listen``): a Unix socket (``unix:/run/cached/admin.sock``,
  mode 0600: the file's permissions are the credential) or ``HOST:PORT`` (TLS like the public
  ones, and with ``admin_tls_client_ca`` only for clients presenting a certificate of that CA).
  A TLS listener answers plain HTTP with ``400`` as nginx does (``cached/edge/tlsport.py``).
  Requests on it are trusted without a token (:func:`is_management`); the same application
  serves it.

Which listener a request came in on is decided by the listening socket that accepted its
connection, never by comparing addresses (issue 13: ``listen: '[::1]:P'`` with
``admin_listen: 0.0.0.0:P`` made every public caller an operator, since the wildcard's port
matched). The management site's protocol factory marks each connection it accepts
(:class:`ManagementConnection`); nothing else is. ``cached/config.py`` also refuses a
management port shared with a public listener, so the operator cannot be confused either.

The fleet listener (``fleet_listen``, cached/fleet/): siblings' requests, TLS like the public
listeners. Its connections are marked (:class:`FleetConnection`, :func:`is_fleet`); the
composition root answers the peer routes only there, and only those.

Loopback is not a credential (issue 9): a local TLS terminator or port forwarder makes every
remote caller "loopback". :func:`check_exposure` refuses to start when a world-reachable
listener would leave management without authentication.

State: :class:`Listeners` is filled by :func:`start` on the event loop before the first
request is served, and only read afterwards. The mark of a connection is set by the
management site's protocol factory (on the loop, as the connection is accepted) and never
changed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from cached.config import Config
from cached.edge.loopback import is_loopback
from cached.edge.tls import ServerTLS
from cached.edge.tlsport import TLSPort
from cached.errors import ConfigError

log = logging.getLogger("cached.listeners")

_BACKLOG = 1024


class ManagementConnection:
    """Mixed into the class of every connection (aiohttp's ``RequestHandler``) accepted by
    the management listener: the mark :func:`is_management` looks for."""

    __slots__ = ()


class OperatorConnection(ManagementConnection):
    """The mark of a management connection that is a credential by itself: accepted on the
    Unix socket, on a loopback address, or with a client certificate of
    ``admin_tls_client_ca``. A routable TCP management address without client certificates
    is not one: there, with management authentication configured, a token is needed."""

    __slots__ = ()


class FleetConnection:
    """The mark of a connection accepted by the fleet listener (``fleet_listen``)."""

    __slots__ = ()


_MARKED: dict[tuple[type, type], type] = {}


def _marked_class(cls: type, mark: type) -> type:
    """``cls`` with ``mark`` mixed in (same layout: no new slots)."""
    marked = _MARKED.get((cls, mark))
    if marked is None:
        marked = _MARKED[(cls, mark)] = type(
            f"{mark.__name__.removesuffix('Connection')}{cls.__name__}",
            (cls, mark),
            {"__slots__": ()},
        )
    return marked


class _Site(web.SockSite):
    """A listening socket served by the runner; with TLS, plain HTTP gets nginx's ``400``
    (cached/edge/tlsport.py) where asyncio's TLS layer would close without a word."""

    __slots__ = ("_port",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._port: TLSPort | None = None

    def _protocol(self) -> asyncio.BaseProtocol:
        server = self._runner.server
        assert server is not None
        return server()

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner
        factory: Callable[[], asyncio.BaseProtocol] = self._protocol
        if self._ssl_context is not None:
            factory = self._port = TLSPort(self._protocol, self._ssl_context)
        self._server = await asyncio.get_running_loop().create_server(
            factory, sock=self._sock, backlog=self._backlog
        )

    async def stop(self) -> None:
        if self._port is not None:
            self._port.close()
        await super().stop()


class _ManagementSite(_Site):
    """A site whose every accepted connection is marked as the management listener's
    (as an operator's when ``operator``: see :class:`OperatorConnection`)."""

    __slots__ = ("_mark",)

    def __init__(self, *args: Any, operator: bool, mark: type | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._mark = mark or (OperatorConnection if operator else ManagementConnection)

    def _protocol(self) -> asyncio.BaseProtocol:
        connection = super()._protocol()
        # The connection class the server builds (aiohttp's, or connguard's) is kept,
        # with the mark mixed in: the same object layout, so the class can be swapped.
        connection.__class__ = _marked_class(type(connection), self._mark)
        return connection


@dataclass
class Listeners:
    """The sockets a daemon serves on.

    Args:
        loopback_trusted: ``allow_unauthenticated_management``: loopback callers on the
            public listeners are operators too (the rule before issue 9).
    """

    loopback_trusted: bool = False
    urls: list[str] = field(default_factory=list)  # the public listeners
    sites: list[web.BaseSite] = field(default_factory=list)  # all, started
    management_url: str = ""  # the first of management_urls
    management_urls: list[str] = field(default_factory=list)
    fleet_url: str = ""  # the fleet listener (fleet_listen), if any
    _unix_paths: set[str] = field(default_factory=set)
    _management_tcp: set[tuple[str, int]] = field(default_factory=set)

    @staticmethod
    def is_management(request: web.BaseRequest) -> bool:
        """Whether ``request`` came in on the management listener: its connection was
        accepted by that listener's socket (whatever address it was addressed to)."""
        return isinstance(request.protocol, ManagementConnection)


LISTENERS = web.AppKey("listeners", Listeners)


def is_management(request: web.Request) -> bool:
    """Whether ``request`` came in on the management listener (a Unix socket, or
    ``admin_listen``): there, a caller without a token is an operator."""
    listeners = request.config_dict.get(LISTENERS)
    return listeners is not None and listeners.is_management(request)


def is_fleet(request: web.BaseRequest) -> bool:
    """Whether ``request`` came in on the fleet listener (``fleet_listen``)."""
    return isinstance(request.protocol, FleetConnection)


def operator_connection(request: web.Request) -> bool:
    """Whether ``request``'s connection is a credential by itself (:class:`OperatorConnection`)."""
    return isinstance(request.protocol, OperatorConnection)


def trusted_operator(request: web.Request) -> bool:
    """Whether ``request`` may manage without a token: it came in on the management listener,
    or (``allow_unauthenticated_management`` only) from loopback."""
    listeners = request.config_dict.get(LISTENERS)
    if listeners is None:
        return False
    if listeners.loopback_trusted and is_loopback(request.remote):
        return True
    return listeners.is_management(request)


def _url(scheme: str, host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}"


def bind_tcp(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (blocking: call from a thread)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_unix(path: Path, group: str = "") -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600, or 0660 owned by ``group`` (the
    operators' group, ``admin_socket_group``) (blocking: call from a thread).

    A stale socket file (nobody accepting on it) is replaced; any other file is an error.
    """
    if path.is_symlink() or path.exists():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ConfigError(f"option 'admin_listen': {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale: left by a daemon that did not stop cleanly
        else:
            raise ConfigError(f"option 'admin_listen': another process listens on {path}")
        finally:
            probe.close()
    if not path.parent.is_dir():
        raise ConfigError(f"option 'admin_listen': directory {path.parent} does not exist")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        if group:
            os.chown(path, -1, socket_group_id(group))
            os.chmod(path, 0o660)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def socket_group_id(group: str) -> int:
    """The id of ``admin_socket_group``; ConfigError naming the option if there is none."""
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"option 'admin_socket_group': no group {group!r}") from None


async def start(runner: web.AppRunner, config: Config, server_tls: ServerTLS | None) -> Listeners:
    """Bind every configured socket and start serving ``runner``'s app on them.

    Raises:
        OSError: an address cannot be bound (in use, not local).
        ConfigError: the Unix socket path is unusable.
    """
    listeners = runner.app[LISTENERS]
    scheme = "https" if server_tls else "http"
    for host, port in config.listen_addresses:
        sock = await asyncio.to_thread(bind_tcp, host, port)
        bound = sock.getsockname()
        site = _Site(runner, sock, ssl_context=server_tls.public if server_tls else None)
        await site.start()
        listeners.sites.append(site)
        listeners.urls.append(_url(scheme, bound[0], bound[1]))
    for address in config.admin_addresses:  # a socket and/or TCP addresses
        if isinstance(address, Path):
            sock = await asyncio.to_thread(bind_unix, address, config.admin_socket_group)
            listeners._unix_paths.add(sock.getsockname())
            site = _ManagementSite(runner, sock, operator=True)
            url = f"unix:{address}"
        else:
            sock = await asyncio.to_thread(bind_tcp, *address)
            bound = sock.getsockname()
            listeners._management_tcp.add((bound[0], bound[1]))
            tls_context = server_tls.management if server_tls else None
            # A routable address is a credential only with client certificates required.
            operator = is_loopback(bound[0]) or (
                tls_context is not None and tls_context.verify_mode == ssl.CERT_REQUIRED
            )
            site = _ManagementSite(runner, sock, ssl_context=tls_context, operator=operator)
            url = _url(scheme, bound[0], bound[1])
        await site.start()
        listeners.sites.append(site)
        listeners.management_urls.append(url)
        listeners.management_url = listeners.management_url or url
    if config.fleet_address is not None:
        sock = await asyncio.to_thread(bind_tcp, *config.fleet_address)
        bound = sock.getsockname()
        site = _ManagementSite(
            runner,
            sock,
            ssl_context=server_tls.public if server_tls else None,
            operator=False,
            mark=FleetConnection,
        )
        await site.start()
        listeners.sites.append(site)
        listeners.fleet_url = _url(scheme, bound[0], bound[1])
    return listeners


def remove_unix_socket(config: Config) -> None:
    """Remove the management socket file after the daemon stopped (call from a thread)."""
    for address in config.admin_addresses:
        if isinstance(address, Path):
            try:
                if stat.S_ISSOCK(address.lstat().st_mode):
                    address.unlink()
            except FileNotFoundError:
                pass


def management_authenticated(config: Config) -> bool:
    """Whether management has authentication of its own (``admin_tokens`` or Keystone)."""
    return bool(config.admin_tokens or config.keystone_url)


def check_exposure(config: Config, source: str) -> None:
    """Refuse a configuration in which a world-reachable listener leaves the management API
    without authentication (unless ``allow_unauthenticated_management``).

    Unauthenticated management is safe on a Unix socket, a loopback management listener, or
    one that requires client certificates; the public listeners then refuse it (403). A
    public listener on a routable address with no management home at all is the set-up the
    loopback rule used to "protect": refused too, since a forwarder makes anyone loopback.
    """
    if management_authenticated(config) or config.allow_unauthenticated_management:
        return
    addresses = config.admin_addresses
    for address in addresses:
        if isinstance(address, tuple) and not is_loopback(address[0]):
            if not config.admin_tls_client_ca:
                shown = f"[{address[0]}]" if ":" in address[0] else address[0]
                raise ConfigError(
                    f"{source}: option 'admin_listen': {shown}:{address[1]} is reachable "
                    "from other hosts and the management API has no authentication; set "
                    "admin_tokens or keystone_authtoken, admin_tls_client_ca, a unix: "
                    "admin_listen, or allow_unauthenticated_management: true"
                )
    if not addresses:
        exposed = [h for h, _ in config.listen_addresses if not is_loopback(h)]
        if exposed:
            raise ConfigError(
                f"{source}: option 'listen': {exposed[0] or '0.0.0.0'} is reachable from "
                "other hosts and the management API has no authentication; set admin_tokens "
                "or keystone_authtoken, an admin_listen (e.g. unix:/run/cached/admin.sock), or "
                "allow_unauthenticated_management: true"
            )


__all__ = [
    "LISTENERS",
    "Listeners",
    "FleetConnection",
    "ManagementConnection",
    "bind_tcp",
    "bind_unix",
    "check_exposure",
    "is_fleet",
    "is_management",
    "remove_unix_socket",
    "start",
    "trusted_operator",
]
