"""A real OpenStack Glance (from PyPI) as the upstream of ``cached``, for the glance tier.

What is here, bottom-up:

* :func:`ensure_venv` - the virtualenv holding glance, python-glanceclient and uWSGI,
  created by ``.ci/glance-venv.sh`` (a fast no-op when it is already complete). The path
  is ``$CACHED_GLANCE_VENV`` or ``~/.cache/cached-glance-venv``.
* :class:`GlanceServer` - glance-api 33 under uWSGI on a free loopback port, with the
  ``keystone`` paste flavor whose ``[keystone_authtoken]`` points at a
  :class:`fakekeystone.FakeKeystone`; default (new RBAC) policies, sqlite, file store.
  Glance 33 has no standalone server any more: ``glance.wsgi.api:application`` reads
  ``$OS_GLANCE_CONFIG_DIR/glance-api.conf``, the database must be ``db_sync``-ed first.
* :class:`GlanceCLI` - the real ``glance`` client of the venv, run as a subprocess with
  its own ``HOME`` (it caches schemas in ``~/.glanceclient``) and a clean environment.
* :class:`CachedDaemon` - ``cached serve`` as a subprocess; the URL is taken from the
  ``listening on http://HOST:PORT`` line on its stderr.
* :class:`FailureLogs` - a pytest plugin that appends the tails of all these logs to
  the report of a failing glance test.

Every process is started in its own session and stopped by its pid (TERM, then KILL of
its process group). Logs stay in the pytest tmp dir.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from daemonproc import CachedProcess
from fakekeystone import FakeKeystone

REPO = Path(__file__).resolve().parent.parent
VENV_SCRIPT = REPO / ".ci" / "glance-venv.sh"
GLANCE_VERSION = "33.0.0"

# Identities the glance tier uses: token -> (project, roles). Glance's default policies
# (enforce_new_defaults, project scope): member may upload and download its project's
# images, reader may see them but not download them (403), admin sees everything.
TOKENS: dict[str, tuple[str, tuple[str, ...]]] = {
    "admin-token": ("admin", ("admin", "member", "reader")),
    "token-p1": ("p1", ("member", "reader")),
    "token-p2": ("p2", ("member", "reader")),
    "token-reader-p1": ("p1", ("reader",)),
}


def default_venv() -> Path:
    """``$CACHED_GLANCE_VENV`` or ``~/.cache/cached-glance-venv``."""
    env = os.environ.get("CACHED_GLANCE_VENV")
    return Path(env) if env else Path.home() / ".cache" / "cached-glance-venv"


def add_standard_tokens(keystone: FakeKeystone) -> None:
    """Register :data:`TOKENS` with ``keystone``."""
    for token, (project, roles) in TOKENS.items():
        keystone.add_token(token, project, roles)


def http(
    method: str,
    url: str,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request; returns status, headers (lower-cased names) and the whole body."""
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["X-Auth-Token"] = token
    req = urllib.request.Request(url, data=body, headers=hdrs, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a text file ('' if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pypi_reachable(timeout: float = 5.0) -> bool:
    try:
        with socket.create_connection(("pypi.org", 443), timeout=timeout):
            return True
    except OSError:
        return False


class VenvUnavailable(Exception):
    """The glance virtualenv could not be built because there is no network."""


def ensure_venv(venv: Path, log: Path, timeout: float = 1200.0) -> Path:
    """Make sure ``venv`` holds glance, glanceclient and uWSGI (runs ``.ci/glance-venv.sh``).

    Raises:
        VenvUnavailable: the install failed and PyPI cannot be reached (callers skip).
        RuntimeError: the install failed for another reason (with the log's tail).
    """
    with log.open("wb") as out:
        rc = subprocess.run(
            [str(VENV_SCRIPT), str(venv)],
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        ).returncode
    if rc == 0:
        return venv
    if not _pypi_reachable():
        raise VenvUnavailable(f"cannot build the glance venv {venv}: PyPI is unreachable")
    raise RuntimeError(f"{VENV_SCRIPT} {venv} failed (rc={rc}):\n{tail(log)}")


def venv_or_skip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The glance virtualenv (:func:`ensure_venv`, its log in a new tmp dir); without a
    network the test is skipped, except in CI (``CACHED_GLANCE_REQUIRED``): never silently."""
    log = tmp_path_factory.mktemp("glance-venv") / "install.log"
    try:
        return ensure_venv(default_venv(), log)
    except VenvUnavailable as exc:
        if os.environ.get("CACHED_GLANCE_REQUIRED"):
            raise
        pytest.skip(str(exc))


def _stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """TERM the process; if it is still there after ``grace`` s, KILL its process group.

    The group is the one created for this very process (``start_new_session=True``), so
    uWSGI workers or children of cached left behind by a killed parent go too.
    """
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def _http_status(url: str, headers: dict[str, str], timeout: float = 5.0) -> int | None:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


@dataclass(frozen=True)
class GlanceRequest:
    """One request line from uWSGI's request log."""

    method: str
    uri: str
    status: int
    body_bytes: int
    range: str


_REQ_RE = re.compile(r"^glance-request method=(\S+) uri=(\S+) status=(\d+) rsize=(\d+) range=(.*)$")


class GlanceServer:
    """glance-api (from the venv) under uWSGI on 127.0.0.1, authenticating with Keystone.

    Args:
        venv: the virtualenv (see :func:`ensure_venv`).
        workdir: an empty directory for config, sqlite, image store and logs.
        keystone: the fake Keystone whose URL goes into ``[keystone_authtoken]``.
        cache_middleware: use the ``keystone+cachemanagement`` flavor (Glance's own
            image cache; its cache misses are close-delimited, without Content-Length).
        threads: uWSGI threads of the single worker process.
        debug: glance-api's debug logging.
        image_format: options of glance-api.conf's ``[image_format]`` section (e.g.
            ``require_image_format_match``).
    """

    def __init__(
        self,
        venv: Path,
        workdir: Path,
        keystone: FakeKeystone,
        *,
        cache_middleware: bool = False,
        threads: int = 8,
        debug: bool = False,
        image_format: dict[str, str] | None = None,
    ) -> None:
        self.venv = venv
        self.dir = workdir
        self.keystone = keystone
        self.flavor = "keystone+cachemanagement" if cache_middleware else "keystone"
        self.threads = threads
        self.debug = debug
        self.image_format = dict(image_format or {})
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.etc = workdir / "etc"
        self.logs = workdir / "logs"
        self.images = workdir / "images"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_files(self) -> dict[str, Path]:
        return {
            "glance uwsgi": self.logs / "uwsgi.log",
            "glance-api.log": self.logs / "glance-api.log",
            "glance requests": self.logs / "requests.log",
        }

    def _configure(self) -> None:
        for sub in ("etc", "images", "cache", "staging", "locks", "logs"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        # The glance wheel installs its sample configs as data_files under <venv>/etc.
        shutil.copy(self.venv / "etc/glance/glance-api-paste.ini", self.etc)
        d = self.dir
        image_format = "".join(f"{k} = {v}\n" for k, v in self.image_format.items())
        (self.etc / "glance-api.conf").write_text(
            f"""\
[DEFAULT]
debug = {str(self.debug).lower()}
log_file = {d}/logs/glance-api.log
node_staging_uri = file://{d}/staging
image_cache_dir = {d}/cache
# needed by the centralized_db image cache driver when the cache is enabled
worker_self_reference_url = http://127.0.0.1:{self.port}

[database]
connection = sqlite:///{d}/glance.sqlite

[glance_store]
stores = file
default_store = file
filesystem_store_datadir = {d}/images

[paste_deploy]
flavor = {self.flavor}

[keystone_authtoken]
www_authenticate_uri = {self.keystone.url}
auth_url = {self.keystone.url}
auth_type = password
username = {self.keystone.service_user}
password = {self.keystone.service_password}
project_name = {self.keystone.service_project}
user_domain_name = Default
project_domain_name = Default
service_token_roles_required = true
http_connect_timeout = 10

[oslo_concurrency]
lock_path = {d}/locks

[image_format]
{image_format}"""
        )

    def _write_uwsgi_ini(self) -> Path:
        ini = self.etc / "glance-uwsgi.ini"
        ini.write_text(
            f"""\
[uwsgi]
http-socket = 127.0.0.1:{self.port}
module = glance.wsgi.api:application
virtualenv = {self.venv}
env = OS_GLANCE_CONFIG_DIR={self.etc}
master = true
need-app = true
processes = 1
threads = {self.threads}
enable-threads = true
lazy-apps = true
http-auto-chunked = true
http-chunked-input = true
http-raw-body = true
chunked-input-limit = 10485760
buffer-size = 65535
socket-timeout = 60
add-header = Connection: close
die-on-term = true
exit-on-reload = true
req-logger = file:{self.logs}/requests.log
log-format = glance-request method=%(method) uri=%(uri) status=%(status) rsize=%(rsize) \
range=%(var.HTTP_RANGE)
"""
        )
        return ini

    def _db_sync(self) -> None:
        log = self.logs / "db_sync.log"
        with log.open("wb") as out:
            rc = subprocess.run(
                [
                    str(self.venv / "bin/glance-manage"),
                    "--config-file",
                    str(self.etc / "glance-api.conf"),
                    "db_sync",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=120,
                check=False,
            ).returncode
        if rc != 0:
            raise RuntimeError(f"glance-manage db_sync failed:\n{tail(log)}")

    def start(self, probe_token: str, timeout: float = 60.0) -> str:
        """Configure, db_sync and start; wait until ``GET /v2/images`` answers 200.

        Args:
            probe_token: a token Glance accepts, for the readiness check.
            timeout: seconds to wait for the first 200.
        """
        for attempt in range(3):
            self.port = free_port()
            self._configure()
            if attempt == 0:
                self._db_sync()
            ini = self._write_uwsgi_ini()
            env = {**os.environ, "OS_GLANCE_CONFIG_DIR": str(self.etc)}
            with (self.logs / "uwsgi.log").open("ab") as out:
                self.proc = subprocess.Popen(
                    [str(self.venv / "bin/uwsgi"), "--ini", str(ini)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                )
            if self._wait_ready(probe_token, timeout):
                return self.url
            self.stop()
            if "Address already in use" not in tail(self.logs / "uwsgi.log", 20):
                break
            # someone took the port between free_port() and uWSGI's bind(): retry
        raise RuntimeError(f"glance-api did not come up on {self.url}:\n{self.diagnostics()}")

    def _wait_ready(self, token: str, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if _http_status(self.url + "/v2/images", {"X-Auth-Token": token}) == 200:
                return True
            time.sleep(0.25)
        return False

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)

    def diagnostics(self) -> str:
        return "\n".join(f"--- {name} ---\n{tail(p)}" for name, p in self.log_files().items())

    def _logged(self) -> list[GlanceRequest]:
        path = self.logs / "requests.log"
        if not path.exists():
            return []
        return [
            GlanceRequest(m[1], m[2], int(m[3]), int(m[4]), m[5].strip())
            for m in map(_REQ_RE.match, path.read_text(errors="replace").splitlines())
            if m
        ]

    def requests(self, timeout: float = 10.0) -> list[GlanceRequest]:
        """The requests Glance answered so far (from uWSGI's request log).

        uWSGI logs a request after its response is sent, so a request the caller has
        just seen answered may not be logged yet: first send a marker request and wait
        until it is logged.
        """
        marker = f"/healthcheck?settle={uuid.uuid4().hex}"
        _http_status(self.url + marker, {})
        deadline = time.monotonic() + timeout
        while True:
            logged = self._logged()
            if any(r.uri == marker for r in logged) or time.monotonic() > deadline:
                return [r for r in logged if not r.uri.startswith("/healthcheck?settle=")]
            time.sleep(0.02)

    def file_gets(self, image_id: str) -> list[GlanceRequest]:
        """The ``GET /v2/images/{image_id}/file`` requests Glance served so far."""
        path = f"/v2/images/{image_id}/file"
        return [r for r in self.requests() if r.method == "GET" and r.uri == path]


class GlanceCLI:
    """The real ``glance`` command line client of the venv.

    Args:
        venv: the virtualenv.
        home: a private ``HOME`` (glanceclient writes ``~/.glanceclient``).
    """

    def __init__(self, venv: Path, home: Path) -> None:
        self.exe = venv / "bin" / "glance"
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        # No OS_* from the developer's shell may leak into the client.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
        self.env["HOME"] = str(home)
        self.env["PYTHONWARNINGS"] = "ignore"

    def command(self, url: str, token: str | None, *args: str) -> list[str]:
        """``glance --os-image-url URL --os-auth-token TOKEN ARGS...`` as an argv."""
        cmd = [str(self.exe), "--os-image-url", url]
        if token is not None:
            cmd += ["--os-auth-token", token]
        return [*cmd, *args]

    def run(
        self, url: str, token: str | None, *args: str, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the client to completion (never raises on its exit status)."""
        return subprocess.run(
            self.command(url, token, *args),
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )

    def popen(self, url: str, token: str | None, *args: str) -> subprocess.Popen[str]:
        """Start the client in the background (stdout and stderr piped)."""
        return subprocess.Popen(
            self.command(url, token, *args),
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def ok(self, url: str, token: str, *args: str, timeout: float = 60.0) -> str:
        """Like :meth:`run`, but fails the test unless rc is 0; returns stdout."""
        res = self.run(url, token, *args, timeout=timeout)
        if res.returncode != 0:
            pytest.fail(
                f"glance {' '.join(args)} -> rc {res.returncode}\n"
                f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}"
            )
        return res.stdout

    def create_image(self, url: str, token: str, path: Path, name: str, *extra: str) -> str:
        """``image-create --file`` (raw/bare); returns the new image's id."""
        out = self.ok(
            url,
            token,
            "image-create",
            "--name",
            name,
            "--disk-format",
            "raw",
            "--container-format",
            "bare",
            "--file",
            str(path),
            *extra,
            timeout=120,
        )
        return parse_table(out)["id"]


def parse_table(out: str) -> dict[str, str]:
    """The ``| Property | Value |`` table glanceclient prints, as a dict."""
    rows: dict[str, str] = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 2 and cells[0] != "Property":
            rows[cells[0]] = cells[1]
    return rows


class CachedDaemon(CachedProcess):
    """``cached serve`` as a subprocess in front of a real Glance, logging to
    ``workdir/cached.log`` (the tier's failure reports show its tail)."""

    def __init__(
        self, workdir: Path, upstream: str, cache_dir: Path, extra_args: Sequence[str] = ()
    ) -> None:
        super().__init__(upstream, cache_dir, workdir / "cached.log", *extra_args)
        self.dir = workdir

    def start(self, timeout: float = 30.0) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return super().start(timeout)


class FailureLogs:
    """pytest plugin: append the tails of registered logs to failing glance-tier reports."""

    def __init__(self) -> None:
        self.files: dict[str, Path] = {}

    def add(self, files: dict[str, Path]) -> None:
        self.files.update(files)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report = yield
        if report.failed and item.get_closest_marker("glance") is not None:
            for name, path in self.files.items():
                text = tail(path, 40)
                if text:
                    report.sections.append((f"{name}: last lines of {path}", text))
        return report


def image_json(glance_url: str, token: str, image_id: str) -> dict[str, Any]:
    """``GET /v2/images/{id}`` straight from Glance."""
    req = urllib.request.Request(
        f"{glance_url}/v2/images/{image_id}", headers={"X-Auth-Token": token}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return dict(json.load(resp))
