"""The daemon's own identity: its Keystone credentials (through keystoneauth1) and the check
of callers' tokens against Keystone.

Used by management and the request policy's admin rule (``admin.py``: validating a caller's
token) and by fills and prefetch (``fill.py``, ``prefetch.py``: image data fetched with the
daemon's credentials). The credentials are the
``keystone_authtoken:`` options (cached/config.py :class:`KeystoneAuth`), named as in every
OpenStack service's ``[keystone_authtoken]`` section and handed unchanged to keystoneauth1's
plugin of that ``auth_type``: ``password``/``v3password``, ``v3applicationcredential``, or
``admin_token`` (a static token, never renewed). keystoneauth1 renews the daemon's token before
it expires (when less than two minutes of it are left) and, when Keystone answers a token
check with 401 (the daemon's own token was revoked), fetches a new one and asks once more.
Tokens are never logged.

keystoneauth1 is synchronous (requests): every call into it runs in a worker thread
(``asyncio.to_thread``), so a slow Keystone holds a thread, never the event loop.

Shared state: :class:`Keystone` owns the keystoneauth1 session and plugin; the plugin holds
the current service token and changes it only in the worker threads, under keystoneauth1's own
lock (its identity plugins serialise fetching a token), so concurrent checks and fills get one
new token between them. Coroutines on the event loop never touch either directly.
:class:`ServiceAuth` holds nothing that changes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import Any

from keystoneauth1 import exceptions as ksa_exc
from keystoneauth1 import plugin, session, token_endpoint
from keystoneauth1.identity import generic, v3

from cached.config import Config, KeystoneAuth
from cached.errors import CachedError
from cached.upstream import Credentials

log = logging.getLogger("cached.identity")

_TIMEOUT = 30.0  # seconds for one call to Keystone


class IdentityUnavailable(CachedError):
    """Keystone could not be reached or refused the daemon's own credentials."""


@dataclass(frozen=True)
class TokenInfo:
    """What Keystone says about a valid token."""

    roles: frozenset[str]
    expires_at: float  # epoch seconds
    project_id: str = ""


def _epoch(value: Any) -> float:
    try:
        return dt.datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return time.time() + 120.0


def _base(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/v3")] if url.endswith("/v3") else url


_USER: tuple[str, ...] = ("username", "user_id", "user_domain_name", "user_domain_id")
_PROJECT: tuple[str, ...] = ("project_name", "project_id", "project_domain_name")
_PASSWORD = ("auth_url", *_USER, "password", *_PROJECT, "project_domain_id")
_APP_CREDENTIAL = ("auth_url", *_USER, "application_credential_id")
_APP_CREDENTIAL += ("application_credential_name", "application_credential_secret")


def auth_plugin(auth: KeystoneAuth) -> plugin.BaseAuthPlugin:
    """keystoneauth1's plugin for ``auth_type``, given the options of the same names.

    The classes are named here rather than looked up by entry point (keystoneauth1's
    loaders scan the installed packages, blocking the event loop at start-up and reload).
    """
    if auth.auth_type == "admin_token":
        return token_endpoint.Token(auth.auth_url or None, auth.token)
    if auth.auth_type == "v3applicationcredential":
        return v3.ApplicationCredential(**_given(auth, _APP_CREDENTIAL))
    if auth.auth_type == "v3password":
        return v3.Password(**_given(auth, _PASSWORD))
    return generic.Password(**_given(auth, _PASSWORD))


def _given(auth: KeystoneAuth, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(auth, name) for name in names if getattr(auth, name)}


class Keystone:
    """The daemon's keystoneauth1 session: its own token, and checks of callers' tokens."""

    def __init__(self, auth: KeystoneAuth, *, timeout: float = _TIMEOUT):
        self._auth = auth
        self._plugin = auth_plugin(auth)
        self._session = session.Session(
            auth=self._plugin, verify=auth.cafile or True, timeout=timeout
        )

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except ksa_exc.ClientException as exc:
            raise IdentityUnavailable(f"Keystone: {type(exc).__name__}: {exc}") from exc

    async def invalidate(self) -> bool:
        """Forget the daemon's token (the upstream refused it: revoked); the next
        :meth:`service_token` fetches a new one. False when the plugin cannot."""
        return bool(await self._call(self._session.invalidate))

    async def service_token(self) -> str:
        """The daemon's token: the current one, or a new one when it nears its expiry."""
        token = await self._call(self._session.get_token)
        if not token:
            raise IdentityUnavailable(
                f"Keystone gave no token for the daemon's {self._auth.auth_type} credentials"
            )
        return str(token)

    def _tokens_url(self) -> str:
        """``/v3/auth/tokens`` at the auth_url, or at the catalog's identity endpoint of
        ``interface``/``region_name`` (blocking: runs in the worker thread)."""
        if self._auth.interface or self._auth.region_name:
            endpoint = self._session.get_endpoint(
                service_type="identity",
                interface=self._auth.interface or "public",
                region_name=self._auth.region_name or None,
            )
            if not endpoint:
                raise ksa_exc.EndpointNotFound(
                    f"no identity endpoint for interface {self._auth.interface or 'public'!r} "
                    f"region {self._auth.region_name!r} in the catalog"
                )
            return f"{_base(endpoint)}/v3/auth/tokens?nocatalog"
        return f"{_base(self._auth.auth_url)}/v3/auth/tokens?nocatalog"

    def _validate_blocking(self, token: str) -> tuple[int, Any]:
        resp = self._session.get(
            self._tokens_url(),
            headers={"X-Subject-Token": token},
            authenticated=True,  # the daemon's token; on a 401 a new one, once (allow_reauth)
            raise_exc=False,
            log=False,  # never log tokens
        )
        if resp.status_code != 200:
            return resp.status_code, None
        return 200, resp.json()

    async def validate(self, token: str) -> TokenInfo | None:
        """What Keystone says about ``token``; None if it does not know it (or it expired)."""
        try:
            status, doc = await self._call(self._validate_blocking, token)
        except ValueError as exc:
            raise IdentityUnavailable(f"Keystone answered a token check: {exc}") from exc
        if status == 404:
            return None
        if status != 200 or not isinstance(doc, dict):
            raise IdentityUnavailable(f"Keystone answered {status} to a token check")
        body = doc.get("token") or {}
        roles = frozenset(
            str(r.get("name")) for r in body.get("roles") or [] if isinstance(r, dict)
        )
        project = body.get("project") or {}
        return TokenInfo(roles, _epoch(body.get("expires_at")), str(project.get("id") or ""))


class ServiceAuth:
    """The daemon's own credentials for the upstream (prefetch), if any are configured."""

    def __init__(self, keystone: Keystone | None, static_token: str):
        self._keystone = keystone
        self._static = static_token

    @property
    def configured(self) -> bool:
        return bool(self._static) or self._keystone is not None

    async def renew(self) -> bool:
        """The upstream refused the daemon's token (401): forget it so that the next
        :meth:`credentials` are fresh. False when there is nothing to renew (a static token,
        or none configured)."""
        if self._keystone is None:
            return False
        return await self._keystone.invalidate()

    async def credentials(self) -> Credentials | None:
        """Credentials to send upstream; None when none are configured."""
        if self._keystone is not None:
            return Credentials.token(await self._keystone.service_token())
        if self._static:
            return Credentials.token(self._static)
        return None


def build(config: Config) -> tuple[Keystone | None, ServiceAuth]:
    """The Keystone client (None without ``keystone_authtoken.auth_url``) and the service
    credentials; an https Keystone is verified with ``keystone_authtoken.cafile``."""
    auth = config.keystone_authtoken
    keystone = Keystone(auth) if auth.auth_url and auth.configured else None
    static = auth.token if auth.auth_type == "admin_token" else ""
    return keystone, ServiceAuth(keystone, static)
