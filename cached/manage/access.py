"""Who may manage the cache: the guard of the management API.

Glance allows its cache APIs to ``context_is_admin`` callers only. cached decides the same
with, in this order:

1. ``admin_tokens``: the caller's ``X-Auth-Token`` hashes (sha256) to one of the configured
   digests (compared with :func:`hmac.compare_digest`; the tokens are never stored).
2. Keystone: the daemon validates the caller's token with its own service token
   (``GET /v3/auth/tokens``, ``X-Subject-Token``); the caller is admin when the token carries
   the role ``admin``. Positive answers are reused for ``admin_cache_ttl`` seconds (never past
   the token's expiry), for a bounded number of tokens.
3. Nothing configured: callers on the management listener are admin (a token they present
   is judged by Glance's own cache policy), everyone else is refused.

On the management listener (cached/edge/listeners.py) a caller without a token is admin anyway.

The Keystone client and the daemon's service credentials live in ``identity.py``. Tokens are
never logged.

Shared state: :class:`AdminGuard` remembers admin answers per token digest; only coroutines on
the event loop read and change that memory.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import time

import aiohttp
from aiohttp import web

from cached.config import Config
from cached.edge.listeners import is_management, operator_connection, trusted_operator
from cached.identity.keystone import IdentityUnavailable, Keystone

log = logging.getLogger("cached.admin")

_MAX_REMEMBERED = 1024


class Access(enum.Enum):
    """The answer to "may this caller manage the cache?", with its HTTP status."""

    ADMIN = 200
    UNAUTHENTICATED = 401  # no token, or a token the identity service does not know
    FORBIDDEN = 403  # a valid caller without the admin role, or not on loopback
    UNAVAILABLE = 503  # the identity service could not be asked


class UpstreamPolicy:
    """Asks a Glance upstream whether the caller may manage its cache (``GET /v2/cache``).

    Used when cached has no management authentication of its own: Glance's 401/403 stand,
    and where Glance has no cache API (404, or no answer) the loopback rule alone decides.
    """

    def __init__(self, session: aiohttp.ClientSession, upstream: str):
        self._session = session
        self._url = upstream.rstrip("/") + "/v2/cache"

    async def check(self, request: web.Request) -> Access:
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower().startswith("x-") and not k.lower().startswith("x-forwarded")
        }
        try:
            async with self._session.get(self._url, headers=headers) as resp:
                status = resp.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            log.warning("cannot ask the upstream about a management caller: %r", exc)
            return Access.ADMIN
        if status == 401:
            return Access.UNAUTHENTICATED
        if status == 403:
            return Access.FORBIDDEN
        return Access.ADMIN


class AdminGuard:
    """Decides whether a management request comes from an admin."""

    def __init__(
        self,
        admin_tokens: tuple[str, ...],
        keystone: Keystone | None,
        ttl: float,
        upstream_policy: UpstreamPolicy | None = None,
    ) -> None:
        self._keystone = keystone
        self._upstream_policy = upstream_policy
        self._ttl = ttl
        self._admins: dict[str, float] = {}  # sha256(token) -> monotonic expiry
        self.keystone_checks = 0
        self.configure(admin_tokens, ttl)

    def configure(self, admin_tokens: tuple[str, ...], ttl: float) -> None:
        """New ``admin_tokens`` and ``admin_cache_ttl`` (reload): a token taken out is no
        longer admin from the next request; Keystone answers remembered under a longer TTL
        are asked again."""
        self._digests = tuple(t.split(":", 1)[1].lower() for t in admin_tokens)
        if ttl < self._ttl:
            self._admins.clear()
        self._ttl = ttl

    @property
    def configured(self) -> bool:
        """Whether any management authentication is configured (else: loopback only)."""
        return bool(self._digests) or self._keystone is not None

    async def check(self, request: web.Request) -> Access:
        """The caller's access to the management API."""
        # The management listener (a Unix socket, admin_listen) is the operator's own door:
        # no token needed there. Loopback is not a credential (cached/edge/listeners.py).
        operator = trusted_operator(request)
        if operator and not request.headers.get("X-Auth-Token"):
            # With tokens or Keystone configured, a routable TCP management address without
            # client certificates is not a credential: anyone reaching it would be admin.
            if not self.configured or operator_connection(request) or not is_management(request):
                return Access.ADMIN
        if not self.configured:
            if not operator:
                return Access.FORBIDDEN
            if self._upstream_policy is not None:
                # Nothing of our own configured, but the caller shows an identity: let
                # Glance's own cache policy (context_is_admin) judge it, as Glance would for
                # its /v2/cache.
                return await self._upstream_policy.check(request)
            return Access.ADMIN
        token = request.headers.get("X-Auth-Token", "").strip()
        if not token:
            return Access.UNAUTHENTICATED
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
        matched = False
        for known in self._digests:  # no early exit: the time taken says nothing
            matched |= hmac.compare_digest(digest, known)
        if matched:
            return Access.ADMIN
        if self._keystone is None:
            return Access.FORBIDDEN
        now = time.monotonic()
        until = self._admins.get(digest)
        if until is not None and until > now:
            return Access.ADMIN
        self.keystone_checks += 1
        try:
            info = await self._keystone.validate(token)
        except IdentityUnavailable as exc:
            log.warning("cannot check a management caller's token: %s", exc)
            return Access.UNAVAILABLE
        if info is None:
            self._admins.pop(digest, None)
            return Access.UNAUTHENTICATED
        if "admin" not in info.roles:
            self._admins.pop(digest, None)
            return Access.FORBIDDEN
        if self._ttl > 0:
            self._remember(digest, now, min(self._ttl, info.expires_at - time.time()))
        return Access.ADMIN

    def _remember(self, digest: str, now: float, ttl: float) -> None:
        if ttl <= 0:
            return
        if len(self._admins) >= _MAX_REMEMBERED:
            for key in [k for k, until in self._admins.items() if until <= now]:
                del self._admins[key]
            while len(self._admins) >= _MAX_REMEMBERED:
                del self._admins[next(iter(self._admins))]  # the oldest
        self._admins[digest] = now + ttl


def build(config: Config, session: aiohttp.ClientSession, keystone: Keystone | None) -> AdminGuard:
    """The guard of the management API, from the config and the daemon's Keystone client."""
    policy = UpstreamPolicy(session, config.upstream) if config.upstream_kind == "glance" else None
    return AdminGuard(config.admin_tokens, keystone, config.admin_cache_ttl, policy)
