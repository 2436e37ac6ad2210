"""A real OpenStack Keystone (from PyPI) on loopback, for the keystone tier.

What is here:

* :func:`ensure_venv` - the virtualenv holding keystone 30 and gunicorn, created by
  ``.ci/keystone-venv.sh`` (a fast no-op when it is already complete). The path is
  ``$CACHED_KEYSTONE_VENV`` or ``~/.cache/cached-keystone-venv``.
* :class:`KeystoneGlance` - the Glance 33 of tests/realglance.py against it, with
  keystonemiddleware's token cache off.
* :class:`KeystoneServer` - keystone 30 with SQLite and fernet tokens: ``keystone-manage
  db_sync``, ``fernet_setup``, ``credential_setup`` and ``bootstrap`` (admin user, the
  ``admin``/``member``/``reader`` roles, one identity endpoint for every interface), then
  gunicorn serving ``keystone.server.wsgi.initialize_public_application()`` through a
  two-line module that empties ``sys.argv`` first (oslo.config would read gunicorn's own
  arguments as its own otherwise). Its methods drive the Identity v3 API as an admin:
  projects, users, role assignments, application credentials, token issue and revocation.

The server runs in its own session and is stopped by its pid (TERM, then KILL of its process
group). Config, database, keys and logs stay in the directory given (pytest's tmp dir). The
admin token this module holds is its own: only the test thread uses it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from realglance import GlanceServer, http

REPO = Path(__file__).resolve().parent.parent
VENV_SCRIPT = REPO / ".ci" / "keystone-venv.sh"
KEYSTONE_VERSION = "30.0.0"
ADMIN_PASSWORD = "keystone-admin-pw"  # a loopback-only test Keystone's bootstrap admin

# The WSGI entry point: oslo.config parses sys.argv when the application is initialised, and
# under gunicorn that holds gunicorn's own arguments.
_WSGI_MODULE = """\
import sys

sys.argv = sys.argv[:1]
from keystone.server import wsgi  # noqa: E402

application = wsgi.initialize_public_application()
"""


class VenvUnavailable(Exception):
    """The keystone virtualenv could not be built because there is no network."""


def default_venv() -> Path:
    """``$CACHED_KEYSTONE_VENV`` or ``~/.cache/cached-keystone-venv``."""
    env = os.environ.get("CACHED_KEYSTONE_VENV")
    return Path(env) if env else Path.home() / ".cache" / "cached-keystone-venv"


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def _pypi_reachable(timeout: float = 5.0) -> bool:
    try:
        with socket.create_connection(("pypi.org", 443), timeout=timeout):
            return True
    except OSError:
        return False


def ensure_venv(venv: Path, log: Path, timeout: float = 1200.0) -> Path:
    """Make sure ``venv`` holds keystone and gunicorn (runs ``.ci/keystone-venv.sh``).

    Raises:
        VenvUnavailable: the install failed and PyPI cannot be reached (callers skip).
        RuntimeError: the install failed for another reason (with the log's tail).
    """
    with log.open("wb") as out:
        rc = subprocess.run(
            ["bash", str(VENV_SCRIPT), str(venv)],
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        ).returncode
    if rc == 0:
        return venv
    if not _pypi_reachable():
        raise VenvUnavailable(f"cannot build the keystone venv {venv}: PyPI is unreachable")
    raise RuntimeError(f"{VENV_SCRIPT} {venv} failed (rc={rc}):\n{_tail(log)}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class KeystoneError(Exception):
    """Keystone answered an API call with an unexpected status."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path} -> {status}: {body[:500]}")
        self.status = status


@dataclass(frozen=True)
class User:
    """A user made in the test Keystone, with its password."""

    id: str
    name: str
    password: str


class KeystoneServer:
    """keystone 30 (from the venv) under gunicorn on 127.0.0.1.

    Args:
        venv: the virtualenv (see :func:`ensure_venv`).
        workdir: an empty directory for config, sqlite, keys and logs.
        token_expiration: ``[token] expiration``, seconds a token is valid.
    """

    service_user = "glance"
    service_password = "glance-service-pw"
    service_project = "service"

    def __init__(self, venv: Path, workdir: Path, *, token_expiration: int = 3600) -> None:
        self.venv = venv
        self.dir = workdir
        self.token_expiration = token_expiration
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs = workdir / "logs"
        self.conf = workdir / "keystone.conf"
        self._admin_token = ""
        self._admin_token_at = 0.0
        self.role_ids: dict[str, str] = {}

    @property
    def url(self) -> str:
        """The identity endpoint without version (what ``auth_url`` takes)."""
        return f"http://127.0.0.1:{self.port}"

    def log_files(self) -> dict[str, Path]:
        return {
            "keystone gunicorn": self.logs / "gunicorn.log",
            "keystone.log": self.logs / "keystone.log",
        }

    # ---- lifecycle ---------------------------------------------------------------------

    def _configure(self) -> None:
        d = self.dir
        for sub in ("logs", "fernet-keys", "credential-keys"):
            (d / sub).mkdir(parents=True, exist_ok=True)
            (d / sub).chmod(0o700)
        self.conf.write_text(
            f"""\
[DEFAULT]
log_file = {d}/logs/keystone.log

[database]
connection = sqlite:///{d}/keystone.sqlite

[identity]
# bcrypt's cheapest cost: every token issue hashes a password (production: 12)
password_hash_rounds = 4

[token]
provider = fernet
expiration = {self.token_expiration}

[fernet_tokens]
key_repository = {d}/fernet-keys

[fernet_receipts]
key_repository = {d}/fernet-keys

[credential]
key_repository = {d}/credential-keys
"""
        )
        (d / "keystone_wsgi_app.py").write_text(_WSGI_MODULE)

    def _manage(self, *commands: tuple[str, ...]) -> None:
        """Run ``keystone-manage`` for each of ``commands`` at once (independent steps)."""
        log = self.logs / "keystone-manage.log"
        with log.open("ab") as out:
            procs = [
                (
                    args[0],
                    subprocess.Popen(
                        [
                            str(self.venv / "bin/keystone-manage"),
                            "--config-file",
                            str(self.conf),
                            *args,
                        ],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    ),
                )
                for args in commands
            ]
            failed = [name for name, proc in procs if proc.wait(300) != 0]
        if failed:
            raise RuntimeError(f"keystone-manage {', '.join(failed)} failed:\n{_tail(log)}")

    def _bootstrap(self) -> None:
        user = ("--keystone-user", "root", "--keystone-group", "root")
        if os.geteuid() != 0:
            import grp
            import pwd

            user = (
                "--keystone-user",
                pwd.getpwuid(os.geteuid()).pw_name,
                "--keystone-group",
                grp.getgrgid(os.getegid()).gr_name,
            )
        # The key repositories and the schema are independent: made side by side.
        self._manage(("db_sync",), ("fernet_setup", *user), ("credential_setup", *user))
        endpoint = f"{self.url}/v3"
        bootstrap = (
            "bootstrap",
            "--bootstrap-password",
            ADMIN_PASSWORD,
            "--bootstrap-admin-url",
            endpoint,
            "--bootstrap-internal-url",
            endpoint,
            "--bootstrap-public-url",
            endpoint,
            "--bootstrap-region-id",
            "RegionOne",
        )
        self._manage(bootstrap)

    def start(self, timeout: float = 90.0) -> str:
        """Configure, bootstrap and start; wait until ``GET /v3`` answers 200.

        The endpoint URLs in the catalog carry the port, so a port taken between choosing
        and binding it means a new bootstrap in a fresh directory layout (once more).
        """
        for attempt in range(3):
            self.port = _free_port()
            self._configure()
            if attempt > 0:
                (self.dir / "keystone.sqlite").unlink(missing_ok=True)
            self._bootstrap()
            env = {k: v for k, v in os.environ.items() if not k.startswith(("OS_", "PYTHONPATH"))}
            env["OS_KEYSTONE_CONFIG_FILES"] = str(self.conf)
            with (self.logs / "gunicorn.log").open("ab") as out:
                self.proc = subprocess.Popen(
                    [
                        str(self.venv / "bin/gunicorn"),
                        "--chdir",
                        str(self.dir),
                        "--bind",
                        f"127.0.0.1:{self.port}",
                        "--workers",
                        "1",
                        "--threads",
                        "8",
                        "--timeout",
                        "120",
                        "--no-control-socket",  # else it makes ~/.gunicorn/gunicorn.ctl
                        "keystone_wsgi_app:application",
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                )
            if self._wait_ready(timeout):
                self._setup()
                return self.url
            self.stop()
            if "Address already in use" not in _tail(self.logs / "gunicorn.log", 20):
                break
        raise RuntimeError(f"keystone did not come up on {self.url}:\n{self.diagnostics()}")

    def _wait_ready(self, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/v3", timeout=5) as resp:
                    if resp.status == 200:
                        return True
            except (OSError, urllib.error.HTTPError):
                pass
            time.sleep(0.25)
        return False

    def _setup(self) -> None:
        """The roles by name, the ``service`` role and the Glance service user."""
        roles = self.api("GET", "/v3/roles")["roles"]
        self.role_ids = {r["name"]: r["id"] for r in roles}
        if "service" not in self.role_ids:
            self.role_ids["service"] = self.api("POST", "/v3/roles", {"role": {"name": "service"}})[
                "role"
            ]["id"]
        service = self.create_project(self.service_project)
        glance = self.create_user(self.service_user, self.service_password, service)
        self.grant(glance.id, service, "admin")
        self.grant(glance.id, service, "service")

    def add_service(self, service_type: str, url: str) -> None:
        """A catalog entry (public and internal endpoints): keystonemiddleware checks an
        application credential's access rules only for a service type in the catalog."""
        service = self.api("POST", "/v3/services", {"service": {"type": service_type}})
        for interface in ("public", "internal"):
            endpoint = {
                "service_id": service["service"]["id"],
                "interface": interface,
                "url": url,
                "region_id": "RegionOne",
            }
            self.api("POST", "/v3/endpoints", {"endpoint": endpoint})

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            proc.wait(10)

    def diagnostics(self) -> str:
        return "\n".join(f"--- {name} ---\n{_tail(p)}" for name, p in self.log_files().items())

    # ---- the Identity v3 API -----------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw = resp.read()
                status, hdrs = resp.status, dict(resp.headers)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            status, hdrs = exc.code, dict(exc.headers)
        return status, hdrs, (json.loads(raw) if raw.strip() else None)

    def admin_token(self) -> str:
        """A project-scoped token of the bootstrap admin (renewed well before it expires)."""
        fresh = time.monotonic() - self._admin_token_at < self.token_expiration / 3
        if not self._admin_token or not fresh:
            self._admin_token = self.password_token("admin", ADMIN_PASSWORD, "admin")
            self._admin_token_at = time.monotonic()
        return self._admin_token

    def api(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        """One admin call; the JSON answer (KeystoneError unless 2xx)."""
        status, _, doc = self._request(
            method, path, body, {"X-Auth-Token": token or self.admin_token()}
        )
        if not 200 <= status < 300:
            raise KeystoneError(method, path, status, json.dumps(doc))
        return doc

    def authenticate(self, auth: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """``POST /v3/auth/tokens`` with ``auth``; (token, token document)."""
        status, headers, doc = self._request("POST", "/v3/auth/tokens?nocatalog", {"auth": auth})
        if status != 201:
            raise KeystoneError("POST", "/v3/auth/tokens", status, json.dumps(doc))
        return headers["X-Subject-Token"], doc["token"]

    def password_token(self, user: str, password: str, project: str) -> str:
        """A token of ``user`` scoped to ``project`` (both in the Default domain)."""
        token, _ = self.authenticate(
            {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {"name": user, "domain": {"id": "default"}, "password": password}
                    },
                },
                "scope": {"project": {"name": project, "domain": {"id": "default"}}},
            }
        )
        return token

    def token_of(self, user: User, project: str) -> str:
        return self.password_token(user.name, user.password, project)

    def app_credential_token(self, cred_id: str, secret: str) -> str:
        token, _ = self.authenticate(
            {
                "identity": {
                    "methods": ["application_credential"],
                    "application_credential": {"id": cred_id, "secret": secret},
                }
            }
        )
        return token

    def token_status(self, token: str) -> int:
        """What ``GET /v3/auth/tokens`` says about ``token`` (200 valid, 404 not)."""
        status, _, _ = self._request(
            "GET",
            "/v3/auth/tokens?nocatalog",
            headers={"X-Auth-Token": self.admin_token(), "X-Subject-Token": token},
        )
        return status

    def revoke(self, token: str) -> None:
        status, _, doc = self._request(
            "DELETE",
            "/v3/auth/tokens",
            headers={"X-Auth-Token": self.admin_token(), "X-Subject-Token": token},
        )
        if status != 204:
            raise KeystoneError("DELETE", "/v3/auth/tokens", status, json.dumps(doc))

    def create_project(self, name: str) -> str:
        doc = self.api("POST", "/v3/projects", {"project": {"name": name, "domain_id": "default"}})
        return str(doc["project"]["id"])

    def set_project_enabled(self, project_id: str, enabled: bool) -> None:
        self.api("PATCH", f"/v3/projects/{project_id}", {"project": {"enabled": enabled}})

    def create_user(self, name: str, password: str, project_id: str | None = None) -> User:
        user: dict[str, Any] = {"name": name, "password": password, "domain_id": "default"}
        if project_id:
            user["default_project_id"] = project_id
        doc = self.api("POST", "/v3/users", {"user": user})
        return User(str(doc["user"]["id"]), name, password)

    def grant(self, user_id: str, project_id: str, role: str) -> None:
        self.api("PUT", f"/v3/projects/{project_id}/users/{user_id}/roles/{self.role_ids[role]}")

    def create_app_credential(
        self,
        user: User,
        project: str,
        name: str,
        *,
        roles: list[str] | None = None,
        access_rules: list[dict[str, str]] | None = None,
    ) -> tuple[str, str]:
        """An application credential of ``user`` (made with its own token, as users do);
        returns (id, secret)."""
        body: dict[str, Any] = {"name": name}
        if roles is not None:
            body["roles"] = [{"name": r} for r in roles]
        if access_rules is not None:
            body["access_rules"] = access_rules
        doc = self.api(
            "POST",
            f"/v3/users/{user.id}/application_credentials",
            {"application_credential": body},
            token=self.token_of(user, project),
        )
        cred = doc["application_credential"]
        return str(cred["id"]), str(cred["secret"])


class KeystoneGlance(GlanceServer):
    """The tier's Glance, with keystonemiddleware's token cache off (``token_cache_time =
    -1``): by default it reuses a token's validation for 300 s, so a revoked token or one of
    a disabled project would keep working there (and so through cached, which asks Glance)
    for up to five minutes. ``service_type = image`` lets it enforce application
    credentials' access rules (without it, it refuses every token that has some)."""

    def _configure(self) -> None:
        super()._configure()
        conf = self.etc / "glance-api.conf"
        text = conf.read_text()
        assert "[keystone_authtoken]\n" in text
        conf.write_text(
            text.replace(
                "[keystone_authtoken]\n",
                "[keystone_authtoken]\ntoken_cache_time = -1\nservice_type = image\n",
            )
        )

    def _wait_ready(self, token: str, timeout: float) -> bool:
        """Like GlanceServer's, but each probe with a current admin token (tokens may live
        shorter than Glance takes to start)."""
        keystone: KeystoneServer = self.keystone  # type: ignore[assignment]
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if http("GET", self.url + "/v2/images", keystone.admin_token())[0] == 200:
                    return True
            except OSError:
                pass  # not listening yet
            time.sleep(0.25)
        return False


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


class Relay:
    """A TCP relay on 127.0.0.1 in front of a local port, that a test can cut (an outage of
    the network path: new connections refused, open ones closed) and restore.

    Its threads (one acceptor, two pumps per connection) own its sockets; ``cut`` and
    ``restore`` are called from the test thread and take the lock.
    """

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = _free_port()
        self._lock = threading.Lock()
        self._server: socket.socket | None = None
        self._open: set[socket.socket] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        with self._lock:
            self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            server, self._server = self._server, None
            conns, self._open = self._open, set()
        for sock in (server, *conns):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._server is not server:
                    client.close()
                    upstream.close()
                    return
                self._open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def create_image(url: str, token: str, name: str, data: bytes) -> str:
    """``POST /v2/images`` and ``PUT .../file`` at ``url`` (Glance or cached); the id."""
    body = json.dumps({"name": name, "disk_format": "raw", "container_format": "bare"})
    hdrs = {"Content-Type": "application/json"}
    status, _, raw = http("POST", f"{url}/v2/images", token, hdrs, body.encode())
    assert status == 201, raw
    image_id = str(json.loads(raw)["id"])
    hdrs = {"Content-Type": "application/octet-stream"}
    put = http("PUT", f"{url}/v2/images/{image_id}/file", token, hdrs, data)
    assert put[0] == 204, put
    return image_id


def file_url(base: str, image_id: str) -> str:
    return f"{base}/v2/images/{image_id}/file"


__all__ = [
    "Relay",
    "create_image",
    "KeystoneGlance",
    "file_url",
    "http",
    "wait_for",
    "KeystoneError",
    "KeystoneServer",
    "User",
    "VenvUnavailable",
    "default_venv",
    "ensure_venv",
]
