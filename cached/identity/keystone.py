"""The daemon's own identity: a Keystone (Identity v3) client and the service credentials.

Used by management (``admin.py``: validating a caller's token) and prefetch (``prefetch.py``:
downloading queued images with the daemon's credentials). The service token comes from the
static ``service_token`` option, or from Keystone password authentication, renewed
``_RENEW_BEFORE`` seconds before it expires. Tokens are never logged.

Shared state: :class:`Keystone` keeps the current service token; only coroutines on the event
loop change it, under its ``asyncio.Lock``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from cached.config import Config
from cached.errors import CachedError
from cached.upstream import Credentials

log = logging.getLogger("cached.identity")

_RENEW_BEFORE = 60.0  # seconds before its expiry a service token is replaced


class IdentityUnavailable(CachedError):
    """Keystone could not be reached or refused the daemon's own credentials."""


@dataclass(frozen=True)
class TokenInfo:
    """What Keystone says about a valid token."""

    roles: frozenset[str]
    expires_at: float  # epoch seconds


def _epoch(value: Any) -> float:
    try:
        return dt.datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return time.time() + _RENEW_BEFORE * 2


class Keystone:
    """A client of the Identity v3 API holding the daemon's own (service) token."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        config: Config,
        ssl_context: ssl.SSLContext | bool = True,
    ):
        self._session = session
        self._ssl = ssl_context  # keystone_ca_file (cached/edge/tls.py)
        url = config.keystone_url.rstrip("/")
        self._base = url[: -len("/v3")] if url.endswith("/v3") else url
        self._config = config
        self._token: str | None = config.service_token or None
        self._expires = float("inf")
        self._lock = asyncio.Lock()

    async def service_token(self, *, renew: bool = False) -> str:
        """The daemon's token: the static ``service_token``, or one from password auth."""
        if self._config.service_token:
            return self._config.service_token
        async with self._lock:
            if renew or self._token is None or self._expires - time.time() < _RENEW_BEFORE:
                self._token, self._expires = await self._authenticate()
            return self._token

    async def _authenticate(self) -> tuple[str, float]:
        c = self._config
        body = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {
                            "name": c.keystone_username,
                            "domain": {"id": c.keystone_user_domain_id},
                            "password": c.keystone_password,
                        }
                    },
                },
                "scope": {
                    "project": {
                        "name": c.keystone_project_name,
                        "domain": {"id": c.keystone_project_domain_id},
                    }
                },
            }
        }
        try:
            async with self._session.post(
                f"{self._base}/v3/auth/tokens?nocatalog", json=body, ssl=self._ssl
            ) as resp:
                if resp.status != 201 or "X-Subject-Token" not in resp.headers:
                    raise IdentityUnavailable(
                        f"Keystone refused the service credentials of {c.keystone_username!r}: "
                        f"{resp.status}"
                    )
                doc = await resp.json(content_type=None)
                token = resp.headers["X-Subject-Token"]
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise IdentityUnavailable(f"Keystone unreachable: {exc!r}") from exc
        expires = _epoch(doc.get("token", {}).get("expires_at"))
        log.info("got a service token from Keystone for %s", c.keystone_username)
        return token, expires

    async def validate(self, token: str) -> TokenInfo | None:
        """What Keystone says about ``token``; None if it does not know it (or it expired)."""
        for attempt in (1, 2):
            service = await self.service_token(renew=attempt == 2)
            headers = {"X-Auth-Token": service, "X-Subject-Token": token}
            try:
                async with self._session.get(
                    f"{self._base}/v3/auth/tokens?nocatalog", headers=headers, ssl=self._ssl
                ) as resp:
                    if resp.status == 200:
                        doc = (await resp.json(content_type=None)).get("token", {})
                        roles = frozenset(
                            str(r.get("name"))
                            for r in doc.get("roles") or []
                            if isinstance(r, dict)
                        )
                        return TokenInfo(roles, _epoch(doc.get("expires_at")))
                    if resp.status == 404:
                        return None
                    if resp.status == 401 and attempt == 1 and not self._config.service_token:
                        continue  # our own token expired or was revoked: get a new one
                    raise IdentityUnavailable(f"Keystone answered {resp.status} to a token check")
            except (TimeoutError, aiohttp.ClientError, ValueError, AttributeError) as exc:
                raise IdentityUnavailable(f"Keystone unreachable: {exc!r}") from exc
        raise IdentityUnavailable("Keystone refused the daemon's service token")


class ServiceAuth:
    """The daemon's own credentials for the upstream (prefetch), if any are configured."""

    def __init__(self, keystone: Keystone | None, static_token: str):
        self._keystone = keystone
        self._static = static_token

    @property
    def configured(self) -> bool:
        return bool(self._static) or self._keystone is not None

    async def credentials(self) -> Credentials | None:
        """Credentials to send upstream; None when none are configured."""
        if self._static:
            return Credentials.token(self._static)
        if self._keystone is not None:
            return Credentials.token(await self._keystone.service_token())
        return None


def build(
    config: Config, session: aiohttp.ClientSession, keystone_ssl: ssl.SSLContext | bool = True
) -> tuple[Keystone | None, ServiceAuth]:
    """The Keystone client (None without ``keystone_url``) and the service credentials;
    ``keystone_ssl`` verifies an https Keystone (cached/edge/tls.py)."""
    keystone = Keystone(session, config, keystone_ssl) if config.keystone_url else None
    return keystone, ServiceAuth(keystone, config.service_token)
