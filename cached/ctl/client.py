"""The HTTP side of ``cached-manage``: which hosts to ask, and the legacy cache-manage API
(``/v2/cached_images``, ``/v2/queued_images``; ``/v1/`` before Rocky) spoken to each of them.

HTTP statuses become :class:`HostError` subclasses here, with the message Glance's
``glance-cache-manage`` prints for them (``glance/cmd/cache_manage.py`` ``catch_error``).
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.parse
from dataclasses import dataclass
from typing import Any

import aiohttp

from cached import __version__

# Glance 33 serves the legacy API under /v2; up to Queens it was /v1 (REFERENCE.md §1.1).
_PREFIXES = ("/v2", "/v1")


@dataclass(frozen=True)
class Target:
    """One daemon to manage."""

    host: str
    port: int
    scheme: str = "http"
    socket: str = ""  # a Unix socket path (the daemon's admin_listen): host/port unused

    @property
    def label(self) -> str:
        """``host:port`` (``[v6]:port``) or ``unix:/path``, how the host is named in output."""
        if self.socket:
            return f"unix:{self.socket}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        if self.socket:
            return "http://localhost"
        return f"{self.scheme}://{self.label}"


def unix_target(path: str) -> Target:
    """The management socket at ``path``."""
    return Target("localhost", 0, "http", path)


def parse_target(value: str, default_port: int) -> Target:
    """Parse ``HOST``, ``HOST:PORT``, ``[V6]:PORT``, a bare IPv6 address, an http(s) URL or
    ``unix:/path/to/admin.sock``.

    Raises:
        ValueError: with a message for the operator.
    """
    text = value.strip()
    if text.startswith("unix:"):
        if not text.removeprefix("unix:"):
            raise ValueError(f"no socket path in {value!r}")
        return unix_target(text.removeprefix("unix:"))
    if "://" in text:
        parts = urllib.parse.urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {value!r}")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"bad port in {value!r}") from None
        if port is None:
            port = 443 if parts.scheme == "https" else 80
        return Target(parts.hostname, port, parts.scheme)
    host, port_text = text, ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"not HOST[:PORT]: {value!r}")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"no host in {value!r}")
    if not port_text:
        return Target(host, default_port)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in {value!r}")
    return Target(host, int(port_text))


class HostError(Exception):
    """A host did not do what was asked.

    Args:
        target: the host.
        message: what to tell the operator (without the host).
        status: the HTTP status, if there was an answer.
    """

    def __init__(self, target: Target, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.target = target
        self.message = message
        self.status = status


class NotEnabled(HostError):
    """404 on both ``/v2`` and ``/v1``: no cache management there."""


class Forbidden(HostError):
    """403: the token is not an admin's."""


class Unreachable(HostError):
    """No HTTP answer: refused, unknown name, timeout."""


def _reason(exc: BaseException) -> str:
    """``Connection refused`` rather than aiohttp's ``Cannot connect to host ...``."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        err = exc.os_error
        if isinstance(err, OSError) and err.errno is not None and err.errno > 0:
            return os.strerror(err.errno)
        return err.strerror or str(err) or type(err).__name__
    return str(exc) or type(exc).__name__


class Client:
    """The legacy cache-manage API of one host.

    Args:
        session: shared by all hosts of a run.
        target: the host.
        token: sent as ``x-auth-token`` (none: the daemon's loopback rule decides).
        timeout: seconds for each request, connecting included.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        target: Target,
        token: str | None,
        timeout: float,
    ) -> None:
        self.session = session
        self.target = target
        self.timeout = timeout
        self.headers = {"User-Agent": f"cached-manage/{__version__}"}
        if token:
            self.headers["x-auth-token"] = token
        self._prefix: str | None = None

    async def call(self, method: str, path: str) -> Any:
        """``METHOD /v2/<path>``, again under ``/v1`` if ``/v2`` answers 404; the JSON answer.

        Raises:
            HostError: a refusal or failure, already worded for the operator.
        """
        prefixes = (self._prefix,) if self._prefix else _PREFIXES
        for prefix in prefixes:
            status, body = await self._send(method, f"{prefix}/{path}")
            if status == 404:
                continue
            self._prefix = prefix
            if status == 403:
                raise Forbidden(self.target, "Not authorized to make this request.", status)
            if not 200 <= status < 300:
                detail = " ".join(body.decode("utf-8", "replace").split())[:200]
                raise HostError(self.target, f"HTTP {status}: {detail}".rstrip(": "), status)
            return self._json(body)
        raise NotEnabled(
            self.target,
            f"Cache management middleware not enabled on host {self.target.host}",
            404,
        )

    async def get_json(self, path: str) -> tuple[int, Any]:
        """``GET path`` (absolute); the status and the JSON answer (None if it is not JSON)."""
        status, body = await self._send("GET", path)
        try:
            return status, json.loads(body)
        except ValueError:
            return status, None

    async def request_json(self, method: str, path: str, body: Any = None) -> Any:
        """``METHOD path`` (absolute, one prefix: cached's own endpoints such as
        ``/v2/cache/safety``) with an optional JSON body; the JSON answer (None if empty).

        Raises:
            HostError: a refusal or failure, worded for the operator (a 404 names what the
                daemon said: an image not cached there, safety off).
        """
        status, answer = await self._send(method, path, body)
        if status == 403:
            raise Forbidden(self.target, "Not authorized to make this request.", status)
        if not 200 <= status < 300:
            detail = " ".join(answer.decode("utf-8", "replace").split())[:200]
            raise HostError(self.target, f"HTTP {status}: {detail}".rstrip(": "), status)
        return self._json(answer)

    async def _send(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with self.session.request(
                method,
                self.target.url + path,
                headers=self.headers,
                timeout=timeout,
                json=body,
            ) as resp:
                return resp.status, await resp.read()
        except TimeoutError:
            raise Unreachable(
                self.target, f"unreachable (no answer within {self.timeout:g} s)"
            ) from None
        except aiohttp.ClientError as exc:
            raise Unreachable(self.target, f"unreachable ({_reason(exc)})") from None

    def _json(self, body: bytes) -> Any:
        if not body:
            return None
        try:
            return json.loads(body)
        except ValueError:
            raise HostError(self.target, "the answer is not JSON") from None


async def gather_hosts(
    clients: list[Client], method: str, path: str
) -> list[tuple[Client, Any | HostError]]:
    """Send the same call to every host at once; each host's answer or error, in order."""

    async def one(client: Client) -> Any | HostError:
        try:
            return await client.call(method, path)
        except HostError as exc:
            return exc

    answers = await asyncio.gather(*(one(c) for c in clients))
    return list(zip(clients, answers, strict=True))


async def gather_json(
    clients: list[Client], method: str, path: str, body: Any = None
) -> list[tuple[Client, Any | HostError]]:
    """:meth:`Client.request_json` on every host at once; each answer or error, in order."""

    async def one(client: Client) -> Any | HostError:
        try:
            return await client.request_json(method, path, body)
        except HostError as exc:
            return exc

    answers = await asyncio.gather(*(one(c) for c in clients))
    return list(zip(clients, answers, strict=True))
