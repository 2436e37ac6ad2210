"""A small, programmable fake of the OpenStack Identity v3 API (Keystone).

It speaks exactly the part of the protocol that keystonemiddleware's ``auth_token``
(13.x, with keystoneauth1 5.x and python-keystoneclient) and a token-checking
service need:

* version discovery: ``GET /`` (300, ``{"versions": {"values": [...]}}``) and
  ``GET /v3`` (200, ``{"version": {...}}``);
* ``POST /v3/auth/tokens``: password (or token) authentication, project-scoped
  or unscoped; 201 with the token id in ``X-Subject-Token`` and the token body;
* ``GET /v3/auth/tokens`` (and ``HEAD``): validation of the ``X-Subject-Token``
  by a caller holding a valid ``X-Auth-Token``; 200 with the token body,
  404 for an unknown or expired subject token, 401 for a bad caller token.
  The query flags ``nocatalog`` and ``allow_expired=1`` are honoured.

Token bodies carry ``project`` {id, name, domain}, ``user``, ``roles`` [{id, name}],
``expires_at``, ``issued_at``, ``methods``, ``audit_ids``, ``is_admin_project`` and
``catalog`` (the identity endpoints for every interface plus any service added
with :meth:`FakeKeystone.add_service`), like the real server.

Usage inside an event loop::

    ks = FakeKeystone()
    ks.add_token("token-p1", project="p1", roles=["member", "reader"])
    url = await ks.start()
    ...
    await ks.close()

or from synchronous code (the server runs on its own loop in a thread)::

    with FakeKeystone().serve_in_thread() as ks:
        ks.url ...

Every request is recorded in :attr:`FakeKeystone.requests` (tokens masked).

The programmable interface may be called from another thread than the server's: it
only does single dict/list operations (atomic in CPython), and the handlers take no
locks, so nothing blocks the server's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

DEFAULT_DOMAIN = {"id": "default", "name": "Default"}
_ROLE_NS = uuid.UUID("6f6c1f43-5f3a-4c55-9d59-2f0c1d1a7f10")
_ISO = "%Y-%m-%dT%H:%M:%S.%fZ"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _iso(t: dt.datetime) -> str:
    return t.strftime(_ISO)


def mask(token: str | None) -> str | None:
    """Return a loggable form of a token: its first 4 characters and its length."""
    if token is None:
        return None
    return f"{token[:4]}...({len(token)})"


@dataclass(frozen=True)
class Token:
    """One issued token and the identity it stands for."""

    token: str
    project: str | None
    project_id: str | None
    roles: tuple[str, ...]
    user: str
    user_id: str
    expires_at: dt.datetime
    issued_at: dt.datetime
    methods: tuple[str, ...] = ("password",)
    audit_id: str = field(default_factory=lambda: uuid.uuid4().hex[:22])

    @property
    def expired(self) -> bool:
        return self.expires_at <= _now()


@dataclass(frozen=True)
class User:
    """A user who may authenticate with a password."""

    name: str
    password: str
    user_id: str
    roles: dict[str, tuple[str, ...]]  # project name -> role names


@dataclass(frozen=True)
class RecordedRequest:
    """One request seen by the fake, with tokens masked."""

    method: str
    path: str
    query: str
    auth_token: str | None
    subject_token: str | None
    status: int


def _error(status: int, title: str, message: str) -> web.Response:
    return web.json_response(
        {"error": {"code": status, "title": title, "message": message}}, status=status
    )


class FakeKeystone:
    """A programmable fake Keystone (Identity v3) server.

    Args:
        service_user: name of the service user that middleware authenticates as.
        service_password: its password.
        service_project: the project the service user is scoped to.
        service_roles: its roles in that project.
        region: region name in the catalog.
    """

    def __init__(
        self,
        *,
        service_user: str = "glance",
        service_password: str = "glance-secret",
        service_project: str = "service",
        service_roles: tuple[str, ...] = ("service", "admin"),
        region: str = "RegionOne",
    ) -> None:
        self.service_user = service_user
        self.service_password = service_password
        self.service_project = service_project
        self.region = region
        self.requests: list[RecordedRequest] = []
        self._tokens: dict[str, Token] = {}
        self._users: dict[str, User] = {}
        self._services: list[tuple[str, str, str]] = []  # (type, name, url)
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self.add_user(service_user, service_password, {service_project: service_roles})

    # ---- programmable interface ---------------------------------------------

    def add_token(
        self,
        token: str,
        project: str | None,
        roles: list[str] | tuple[str, ...],
        *,
        project_id: str | None = None,
        user: str | None = None,
        expires_in: float = 3600.0,
        methods: tuple[str, ...] = ("password",),
    ) -> Token:
        """Register a token for ``project`` (None: unscoped) with ``roles``.

        The project id defaults to the project name, so that Glance's ``owner``
        of an image is the readable project name. A negative ``expires_in`` makes
        an already expired token.
        """
        now = _now()
        user = user or f"user-{project or 'unscoped'}-{'-'.join(roles) or 'none'}"
        tok = Token(
            token=token,
            project=project,
            project_id=(project_id or project) if project is not None else None,
            roles=tuple(roles),
            user=user,
            user_id=uuid.uuid5(_ROLE_NS, "user:" + user).hex,
            expires_at=now + dt.timedelta(seconds=expires_in),
            issued_at=now,
            methods=methods,
        )
        self._tokens[token] = tok
        return tok

    def revoke(self, token: str) -> None:
        """Forget a token: it validates as 404 from now on."""
        self._tokens.pop(token, None)

    def add_user(self, name: str, password: str, roles: dict[str, tuple[str, ...]]) -> None:
        """Register a user for password authentication; ``roles`` maps project -> roles."""
        self._users[name] = User(
            name, password, uuid.uuid5(_ROLE_NS, "user:" + name).hex, dict(roles)
        )

    def add_service(self, service_type: str, url: str, name: str | None = None) -> None:
        """Add a service with this URL for every interface to the catalog of tokens."""
        self._services.append((service_type, name or service_type, url))

    def recorded(self, method: str | None = None, path: str | None = None) -> list[RecordedRequest]:
        """A copy of the recorded requests, optionally filtered by method and path."""
        return [
            r
            for r in list(self.requests)
            if (method is None or r.method == method) and (path is None or r.path == path)
        ]

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:35357`` (after start)."""
        if self._url is None:
            raise RuntimeError("FakeKeystone is not started")
        return self._url

    # ---- lifecycle -------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/", self._versions)
        app.router.add_get("/v3", self._version_v3)
        app.router.add_get("/v3/", self._version_v3)
        app.router.add_post("/v3/auth/tokens", self._issue)
        # add_get also answers HEAD (same checks, no body)
        app.router.add_get("/v3/auth/tokens", self._validate)
        app.router.add_delete("/v3/auth/tokens", self._delete)
        return app

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None
    ) -> str:
        """Start serving on ``host:port`` (0: a free port); returns the base URL."""
        self._runner = web.AppRunner(self.make_app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, ssl_context=ssl_context).start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        scheme = "https" if ssl_context else "http"
        self._url = f"{scheme}://{bound_host}:{bound_port}"
        return self._url

    async def close(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @contextlib.contextmanager
    def serve_in_thread(self, host: str = "127.0.0.1", port: int = 0) -> Iterator[FakeKeystone]:
        """Run the server on its own event loop in a daemon thread (for sync code)."""
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.start(host, port))
            except BaseException as exc:  # reported to the starting thread
                failure.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self.close())
            loop.close()

        thread = threading.Thread(target=run, name="fake-keystone", daemon=True)
        thread.start()
        started.wait(30)
        if failure:
            raise failure[0]
        try:
            yield self
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)

    # ---- handlers ----------------------------------------------------------------

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        status = 500
        try:
            response: web.StreamResponse = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            record = RecordedRequest(
                request.method,
                request.path,
                request.query_string,
                mask(request.headers.get("X-Auth-Token")),
                mask(request.headers.get("X-Subject-Token")),
                status,
            )
            self.requests.append(record)

    def _version_doc(self, request: web.Request) -> dict[str, Any]:
        base = f"{request.scheme}://{request.host}"
        return {
            "id": "v3.14",
            "status": "stable",
            "updated": "2020-04-07T00:00:00Z",
            "links": [{"rel": "self", "href": f"{base}/v3/"}],
            "media-types": [
                {"base": "application/json", "type": "application/vnd.openstack.identity-v3+json"}
            ],
        }

    async def _versions(self, request: web.Request) -> web.Response:
        # Keystone answers its root with 300 Multiple Choices.
        return web.json_response({"versions": {"values": [self._version_doc(request)]}}, status=300)

    async def _version_v3(self, request: web.Request) -> web.Response:
        return web.json_response({"version": self._version_doc(request)})

    def _catalog(self) -> list[dict[str, Any]]:
        services = [("identity", "keystone", self.url), *list(self._services)]
        catalog = []
        for stype, name, url in services:
            catalog.append(
                {
                    "id": uuid.uuid5(_ROLE_NS, "svc:" + stype).hex,
                    "type": stype,
                    "name": name,
                    "endpoints": [
                        {
                            "id": uuid.uuid5(_ROLE_NS, f"ep:{stype}:{iface}").hex,
                            "interface": iface,
                            "region": self.region,
                            "region_id": self.region,
                            "url": url,
                        }
                        for iface in ("public", "internal", "admin")
                    ],
                }
            )
        return catalog

    def _body(self, tok: Token, *, catalog: bool = True) -> dict[str, Any]:
        body: dict[str, Any] = {
            "methods": list(tok.methods),
            "user": {
                "id": tok.user_id,
                "name": tok.user,
                "domain": DEFAULT_DOMAIN,
                "password_expires_at": None,
            },
            "audit_ids": [tok.audit_id],
            "expires_at": _iso(tok.expires_at),
            "issued_at": _iso(tok.issued_at),
            "roles": [{"id": uuid.uuid5(_ROLE_NS, "role:" + r).hex, "name": r} for r in tok.roles],
            "is_admin_project": "admin" in tok.roles,
        }
        if tok.project is not None:
            body["project"] = {
                "id": tok.project_id,
                "name": tok.project,
                "domain": DEFAULT_DOMAIN,
            }
            body["is_domain"] = False
        if catalog:
            body["catalog"] = self._catalog()
        return {"token": body}

    def _lookup(self, token: str | None, *, allow_expired: bool = False) -> Token | None:
        if not token:
            return None
        tok = self._tokens.get(token.strip())
        if tok is None or (tok.expired and not allow_expired):
            return None
        return tok

    async def _issue(self, request: web.Request) -> web.Response:
        try:
            auth = (await request.json())["auth"]
            methods = auth["identity"]["methods"]
        except (ValueError, KeyError, TypeError):
            return _error(400, "Bad Request", "Expecting to find auth.identity.methods")
        scope = auth.get("scope") or {}
        project = None
        if "project" in scope:
            project = scope["project"].get("name") or scope["project"].get("id")
        elif scope:
            return _error(401, "Unauthorized", "Only project scope is supported")

        if "password" in methods:
            pw_user = auth["identity"]["password"]["user"]
            name = pw_user.get("name") or pw_user.get("id")
            user = self._users.get(name) or next(
                (u for u in list(self._users.values()) if u.user_id == name), None
            )
            if user is None or user.password != pw_user.get("password"):
                return _error(
                    401, "Unauthorized", "The request you have made requires authentication."
                )
            if project is not None and project not in user.roles:
                return _error(401, "Unauthorized", "User has no access to project")
            roles = user.roles.get(project, ()) if project is not None else ()
            user_name = user.name
        elif "token" in methods:
            old = self._lookup(auth["identity"]["token"].get("id"))
            if old is None:
                return _error(404, "Not Found", "Could not find token")
            if project is not None and project != old.project:
                return _error(401, "Unauthorized", "Cannot rescope to another project")
            roles = old.roles if project is not None else ()
            user_name = old.user
        else:
            return _error(401, "Unauthorized", f"Unsupported methods {methods}")

        token_id = "gAAAA" + uuid.uuid4().hex + uuid.uuid4().hex
        tok = self.add_token(token_id, project, roles, user=user_name, methods=tuple(methods))
        return web.json_response(
            self._body(tok, catalog="nocatalog" not in request.query),
            status=201,
            headers={"X-Subject-Token": token_id},
        )

    async def _validate(self, request: web.Request) -> web.Response:
        if self._lookup(request.headers.get("X-Auth-Token")) is None:
            return _error(401, "Unauthorized", "The request you have made requires authentication.")
        subject = request.headers.get("X-Subject-Token")
        if not subject:
            return _error(400, "Bad Request", "Missing X-Subject-Token")
        allow_expired = request.query.get("allow_expired") in ("1", "true", "True")
        tok = self._lookup(subject, allow_expired=allow_expired)
        if tok is None:
            return _error(404, "Not Found", "Could not find token: " + (mask(subject) or ""))
        return web.json_response(
            self._body(tok, catalog="nocatalog" not in request.query),
            headers={"X-Subject-Token": subject},
        )

    async def _delete(self, request: web.Request) -> web.Response:
        if self._lookup(request.headers.get("X-Auth-Token")) is None:
            return _error(401, "Unauthorized", "Invalid caller token")
        subject = request.headers.get("X-Subject-Token", "")
        if self._lookup(subject) is None:
            return _error(404, "Not Found", "Could not find token")
        self.revoke(subject)
        return web.Response(status=204)
