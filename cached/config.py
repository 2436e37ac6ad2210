"""Configuration: one YAML file, validated once into a frozen dataclass.

Option names follow Glance where Glance has one (``image_cache_dir``,
``image_cache_max_size``, ``image_cache_stall_time``, ``cache_prefetcher_interval``), so an
operator can carry values over from ``glance-api.conf``.  Unknown keys and bad values raise
:class:`ConfigError` naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cached.errors import ConfigError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(value: object) -> int:
    """Parse ``10G``, ``500M``, ``1.5T`` or a plain byte count (binary units, like Glance)."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative: {value}")
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(f"not a size: {value!r} (use bytes or a suffix: 500M, 10G, 1T)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def parse_listen(value: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` or ``[v6]:PORT``."""
    host, sep, port = str(value).rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"listen must be HOST:PORT or [v6]:PORT, got {value!r}")
    if host.startswith("["):
        if not host.endswith("]") or "]" in host[1:-1] or ":" not in host:
            raise ValueError(f"listen must be HOST:PORT or [v6]:PORT, got {value!r}")
        host = host[1:-1]
    elif ":" in host or "]" in host:
        raise ValueError(f"listen must be HOST:PORT, IPv6 in brackets ([::1]:9292): {value!r}")
    return host or "0.0.0.0", int(port)


def parse_listen_list(value: object) -> tuple[tuple[str, int], ...]:
    """Parse one address, a comma-separated list of them, or a YAML list of them."""
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    if not isinstance(value, list | tuple | str) or not items:
        raise ValueError(f"listen must be HOST:PORT or a list of them, got {value!r}")
    return tuple(parse_listen(str(item).strip()) for item in items)


def parse_admin_listen(value: str) -> tuple[str, int] | Path:
    """Parse ``unix:/path/to.sock`` (a Path) or ``HOST:PORT`` / ``[v6]:PORT``."""
    if value.startswith("unix:"):
        path = value.removeprefix("unix:")
        if not path:
            raise ValueError(f"needs a path (unix:/run/cached/admin.sock), got {value!r}")
        return Path(path)
    return parse_listen(value)


def parse_admin_listen_list(value: object) -> tuple[tuple[str, int] | Path, ...]:
    """Parse one management address, a comma-separated list or a YAML list of them (e.g. a
    socket for the tools and a TCP address for Prometheus); each at most once."""
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    if not isinstance(value, list | tuple | str) or not items:
        raise ValueError(f"must be unix:/path, HOST:PORT or a list of them, got {value!r}")
    parsed: list[tuple[str, int] | Path] = []
    for item in items:
        address = parse_admin_listen(str(item).strip())
        if address in parsed:
            raise ValueError(f"{str(item).strip()} is listed twice")
        parsed.append(address)
    return tuple(parsed)


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """Seconds from a number or a string with a unit, as sizes take one: ``90``, ``2.5``,
    ``500ms``, ``30s``, ``5m``, ``1h``, ``1d``. Raises ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"not a duration: {value!r}")
        return float(value)
    match = _DURATION_RE.match(str(value)) if isinstance(value, str) else None
    if not match:
        raise ValueError(f"not a duration: {value!r} (use seconds or a unit: 30s, 5m, 1h, 1d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


@dataclass(frozen=True)
class FreeSpace:
    """A free-space watermark: a byte count, or a percentage of the filesystem."""

    amount: float = 5.0
    percent: bool = True
    cap: int | None = None  # at most this many bytes (the default: 5%, at most 1 GiB)

    @classmethod
    def parse(cls, value: object) -> FreeSpace:
        text = str(value).strip()
        if isinstance(value, str) and " max " in text:  # "5% max 1G"
            share, _, most = text.partition(" max ")
            parsed = cls.parse(share.strip())
            if not parsed.percent:
                raise ValueError(f"only a percentage takes a 'max': {value!r}")
            return cls(parsed.amount, True, parse_size(most.strip()))
        if isinstance(value, str) and text.endswith("%"):
            try:
                amount = float(text[:-1])
            except ValueError:
                raise ValueError(f"not a percentage: {value!r}") from None
            if not 0 <= amount < 100:
                raise ValueError(f"must be 0% to 99%, got {value!r}")
            return cls(amount, True)
        return cls(float(parse_size(value)), False)

    def bytes_of(self, total: int) -> int:
        wanted = int(total * self.amount / 100) if self.percent else int(self.amount)
        return wanted if self.cap is None else min(wanted, self.cap)

    def __str__(self) -> str:
        shown = f"{self.amount:g}%" if self.percent else str(int(self.amount))
        return shown if self.cap is None else f"{shown} max {self.cap}"


@dataclass(frozen=True)
class MountSpec:
    """What a declared directory must be (``image_cache_mount``, ``upstream_mount``)."""

    # The directory must itself be a mount point: while it is not, nothing is created in it.
    require_mount: bool = False
    # The filesystem type it must have (as /proc/self/mountinfo names it: nfs4, xfs); "": any.
    fstype: str = ""
    # A read-only mount is a fault (state read_only); the cache must be writable.
    writable: bool = True
    # Seconds between probes, and a probe's time limit before the directory counts as hung.
    probe_interval: float = 5.0
    probe_timeout: float = 10.0
    # Cache only: where a hit's sendfile runs (cached/reader.py). ``loop``: on the event loop
    # (fastest; a read that hangs freezes the daemon); ``thread``: on the cache's I/O threads;
    # ``auto``: threads on network and FUSE filesystems (SHARE_FSTYPES), the loop elsewhere.
    sendfile: str = "auto"


SENDFILE_MODES = ("auto", "loop", "thread")
_MOUNT_KEYS = {f.name for f in dataclasses.fields(MountSpec)}


@dataclass(frozen=True)
class Config:
    """Everything the daemon reads from its configuration file and flags."""

    # One address or several, comma-separated (a YAML list is joined the same way).
    listen: str = "127.0.0.1:9292"
    # http(s)://glance-api:9292 for Glance, file:///dir for a filesystem (NFS) store.
    upstream: str = "file://./var/images"
    image_cache_dir: Path = Path("./var/cache")
    image_cache_max_size: int = 10 << 30
    image_cache_stall_time: int = 86400
    cache_prefetcher_interval: int = 300
    cache_prune_interval: int = 600
    # Seconds a positive download authorisation is reused per (credential, image); 0 = ask
    # the upstream before every download (a change made elsewhere is seen at once).
    auth_cache_ttl: float = 0.0
    # Seconds an upstream's "allowed" still counts for a complete cached image while the
    # upstream is unreachable or answers 5xx (RFC 5861's stale-if-error); 0 = never.
    auth_stale_if_error: float = 0.0
    # Tokens accepted by the file backend; empty = no check, loopback only.
    access_tokens: tuple[str, ...] = ()
    upstream_connect_timeout: float = 10.0
    # Seconds without a byte from the upstream before a transfer counts as broken.
    upstream_read_timeout: float = 60.0
    # Flush written image data and publish it in the presence bitmap this often.
    fsync_interval_bytes: int = 64 << 20
    fsync_interval_seconds: float = 1.0
    # Hit counts and access stamps are kept in memory at once and written to the entries'
    # xattrs this often (and at a clean shutdown): a crash loses at most this many seconds
    # of access history. 0 = after every hit.
    access_record_interval: float = 10.0
    # Largest request line/header field accepted from clients (longer: 400/431).
    max_header_size: int = 16384
    # --- client connections (cached/connguard.py); 0 turns a limit off ---
    # Seconds from a connection's opening, or a request's first byte, to the end of its
    # headers (then 408 and close).
    client_header_timeout: float = 30.0
    # Seconds an idle kept-alive connection stays open between requests.
    client_keepalive_timeout: float = 75.0
    # Seconds without a byte of a request body a handler waits for (then the connection is
    # cut); time in which cached itself paused reading does not count.
    client_body_timeout: float = 60.0
    # Open connections allowed from one client address (the next gets 503).
    max_connections_per_address: int = 128
    log_level: str = "INFO"
    # --- cache management API and periodic jobs (cached/manage.py, cached/jobs.py) ---
    # Seconds between clean runs (stalled partial entries and invalid/ entries).
    cache_clean_interval: int = 3600
    # Images fetched at once by the prefetcher.
    prefetch_concurrency: int = 2
    # A failed prefetch is retried after this many seconds, doubling per failure up to the max.
    prefetch_retry_initial: float = 300.0
    prefetch_retry_max: float = 3600.0
    # Legacy ``PUT /v2/queued_images/{id}`` starts the fetch at once instead of at the next run.
    legacy_queue_immediate: bool = False
    # Prune at once when a new entry would take the cache past image_cache_max_size, instead
    # of waiting for the next scheduled run.
    prune_on_fill: bool = True
    # Admission: an image larger than this fraction of image_cache_max_size is never cached
    # (streamed through with Cache-Status "fwd=bypass; detail=too-large").
    max_image_fraction: float = 0.5
    # Free space kept on the cache's filesystem (bytes, e.g. 2G, or a percentage, e.g. 5%;
    # default: 5%, at most 1 GiB, so a large shared disk does not hold back 5% of itself):
    # a new fill that would go below it passes through (detail=no-space) instead of
    # filling the disk; shares the filesystem with other data, ENOSPC comes first otherwise.
    min_free_space: FreeSpace = FreeSpace(5.0, True, 1 << 30)
    # Management callers presenting one of these tokens are admin: "sha256:<hex digest>".
    admin_tokens: tuple[str, ...] = ()
    # Seconds a positive admin answer from Keystone is reused for the same token.
    admin_cache_ttl: float = 60.0
    # Keystone (identity v3) used to check management callers' roles, and the daemon's own
    # service credentials there (also used by the prefetcher).
    keystone_url: str = ""
    keystone_username: str = ""
    keystone_password: str = ""
    keystone_project_name: str = ""
    keystone_user_domain_id: str = "default"
    keystone_project_domain_id: str = "default"
    # A static token the daemon uses instead of Keystone password credentials.
    service_token: str = ""
    # This node's URL in GET /v2/cache/nodes/{id} (Glance's name); empty: from the request.
    worker_self_reference_url: str = ""
    # Other cached nodes asked by GET /v2/cache/nodes/{id} whether they hold the image.
    peers: tuple[str, ...] = ()
    # --- integrity (cached/scrub.py) ---
    # Seconds between scrub passes: each re-reads every complete entry and checks its digest.
    scrub_interval: int = 86400
    # MiB/s a scrub pass reads at most (it also pauses while fills run).
    scrub_rate: float = 16.0
    # --- operations (cached/health.py, cached/lifecycle.py) ---
    # Apply the management API's admin rules to GET /metrics too.
    metrics_auth: bool = False
    # Seconds running downloads may take to finish after SIGTERM (keep below TimeoutStopSec).
    shutdown_grace: float = 30.0
    # --- TLS, listeners, management access, request policy (cached/tls.py, listeners.py,
    # policy.py) ---
    # PEM certificate chain and key served on every TCP listener (both or neither).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # CA bundle that verifies an https upstream (empty: the system store).
    upstream_ca_file: str = ""
    # Do not verify the upstream's certificate (a warning is logged at every start).
    upstream_insecure: bool = False
    # CA bundle that verifies an https keystone_url (empty: the system store).
    keystone_ca_file: str = ""
    # The management listener(s): "unix:/run/cached/admin.sock", HOST:PORT, or several of
    # them (a list, or comma-separated: a socket for the tools and a TCP address for
    # Prometheus); empty: none. It serves the management API without a token, /metrics,
    # /healthz and /readyz; with it set, /metrics is only served there.
    admin_listen: str = ""
    # The management socket's group (mode 0660 then; empty: 0600, only its owner and root).
    admin_socket_group: str = ""
    # CA bundle whose client certificates the TCP management listener requires.
    admin_tls_client_ca: str = ""
    # Start even though a world-reachable listener would answer management without auth.
    allow_unauthenticated_management: bool = False
    # YAML file of request rules checked before anything is proxied (cached/policy.py).
    policy: str = ""

    @property
    def max_entry_size(self) -> int:
        """The largest image the cache admits."""
        return int(self.image_cache_max_size * self.max_image_fraction)

    # --- declared directories (cached/guard.py) ---
    image_cache_mount: MountSpec = MountSpec()
    # Only for a file:// upstream: its directory (e.g. an NFS share of Glance's images).
    upstream_mount: MountSpec = MountSpec(writable=False)

    @property
    def listen_address(self) -> tuple[str, int]:
        """The first listen address."""
        return self.listen_addresses[0]

    @property
    def listen_addresses(self) -> tuple[tuple[str, int], ...]:
        return parse_listen_list(self.listen)

    @property
    def admin_address(self) -> tuple[str, int] | Path | None:
        """The first management listener: (host, port), a Unix socket path, or None."""
        addresses = self.admin_addresses
        return addresses[0] if addresses else None

    @property
    def admin_addresses(self) -> tuple[tuple[str, int] | Path, ...]:
        """Every management listener ((host, port) or a Unix socket path), in order."""
        return parse_admin_listen_list(self.admin_listen) if self.admin_listen else ()

    @property
    def upstream_kind(self) -> str:
        """``glance`` for an HTTP upstream, ``file`` for a directory store."""
        scheme = urllib.parse.urlsplit(self.upstream).scheme
        return "file" if scheme == "file" else "glance"

    @property
    def upstream_dir(self) -> Path:
        """The directory of a ``file://`` upstream (``file://./x`` is relative to the cwd)."""
        parts = urllib.parse.urlsplit(self.upstream)
        return Path(urllib.parse.unquote(parts.netloc + parts.path))


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_ADMIN_TOKEN_RE = re.compile(r"^sha256:[0-9a-fA-F]{64}$")
# An upstream path ending in an API version (/v1, /v2, /v2.18): the root was meant.
_API_VERSION_RE = re.compile(r"/v[12](?:\.[0-9]+)?$")
# Values never shown (``cached check-config``) or logged: credentials, and the admin token
# digests (a digest of a weak token can be brute-forced offline).
SECRETS = frozenset({"keystone_password", "service_token", "access_tokens", "admin_tokens"})
_LOG_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}


def shown(key: str, value: Any) -> Any:
    """``value`` of option ``key`` as ``cached check-config`` prints it: secrets masked, and
    the password of a URL's ``user:password@`` part too."""
    if key in SECRETS:
        if not value:
            return value
        return f"({len(value)} set)" if isinstance(value, tuple) else "(set)"
    if isinstance(value, tuple):
        return tuple(shown(key, v) for v in value)
    if isinstance(value, str) and "@" in value:
        parts = urllib.parse.urlsplit(value)
        if parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            netloc = f"{parts.username}:***@{host}"
            return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return value


def as_yaml(config: Config) -> str:
    """``config`` as a YAML file that loads back into the same values (``cached
    check-config``): every option, in the dataclass's order. Secrets that are set are
    written as comments (never their values); URL passwords are masked."""
    lines = []
    for item in dataclasses.fields(config):
        key = item.name
        value = getattr(config, key)
        if key in SECRETS and value:
            lines.append(f"# {key}: {shown(key, value)} (not shown)")
            continue
        plain = _plain(shown(key, value))
        if key == "upstream_mount":
            plain.pop("sendfile")  # only the cache's directory takes one
        lines.append(yaml.safe_dump({key: plain}, width=1 << 16).rstrip())
    return "\n".join(lines) + "\n"


def _plain(value: Any) -> Any:
    """A value YAML can write and :func:`build` reads back to the same thing."""
    if isinstance(value, Path | FreeSpace):
        return str(value)
    if isinstance(value, MountSpec):
        return dataclasses.asdict(value)  # (as_yaml drops upstream_mount's sendfile)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _url(value: Any) -> str:
    parts = urllib.parse.urlsplit(str(value))
    if not isinstance(value, str) or parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"must be an http(s)://host:port URL, got {value!r}")
    return value.rstrip("/")


def _convert(name: str, value: Any) -> Any:
    """Turn one raw value into the type of the field ``name``; raise ValueError if it is bad."""
    if name in ("image_cache_max_size", "fsync_interval_bytes", "max_header_size"):
        return parse_size(value)
    if name in (
        "image_cache_stall_time",
        "cache_prefetcher_interval",
        "cache_prune_interval",
        "cache_clean_interval",
        "scrub_interval",
    ):
        seconds = parse_duration(value)
        if seconds <= 0 or seconds != int(seconds):
            raise ValueError(f"must be a positive whole number of seconds, got {value!r}")
        return int(seconds)
    if name in (
        "auth_cache_ttl",
        "auth_stale_if_error",
        "upstream_connect_timeout",
        "upstream_read_timeout",
        "fsync_interval_seconds",
        "access_record_interval",
        "prefetch_retry_initial",
        "prefetch_retry_max",
        "admin_cache_ttl",
        "client_header_timeout",
        "client_body_timeout",
        "shutdown_grace",
    ):
        seconds = parse_duration(value)
        if seconds < 0:
            raise ValueError(f"must be a number of seconds >= 0, got {value!r}")
        return seconds
    if name == "scrub_rate":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e6:
            raise ValueError(f"must be a number of MiB/s > 0, got {value!r}")
        return float(value)
    if name == "image_cache_dir":
        if not isinstance(value, str | Path) or not str(value):
            raise ValueError(f"must be a directory path, got {value!r}")
        return Path(value)
    if name == "min_free_space":
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"must be a size (2G) or a percentage (5%), got {value!r}")
        return FreeSpace.parse(value)
    if name == "max_image_fraction":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise ValueError(f"must be a number > 0 and <= 1, got {value!r}")
        return float(value)
    if name == "client_keepalive_timeout":
        seconds = parse_duration(value)
        if seconds <= 0:
            raise ValueError(f"must be a number of seconds > 0, got {value!r}")
        return seconds
    if name == "max_connections_per_address":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"must be a whole number >= 0 (0: no cap), got {value!r}")
        return value
    if name == "prefetch_concurrency":
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"must be a positive whole number, got {value!r}")
        return value
    if name in (
        "legacy_queue_immediate",
        "prune_on_fill",
        "metrics_auth",
        "upstream_insecure",
        "allow_unauthenticated_management",
    ):
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {value!r}")
        return value
    if name == "admin_tokens":
        if not isinstance(value, list | tuple) or not all(
            isinstance(t, str) and _ADMIN_TOKEN_RE.match(t) for t in value
        ):
            raise ValueError('must be a list of "sha256:<64 hex digits>" (sha256 of the token)')
        return tuple(t.lower() for t in value)
    if name in ("keystone_url", "worker_self_reference_url"):
        return _url(value) if value else ""
    if name == "peers":
        if not isinstance(value, list | tuple):
            raise ValueError("must be a list of http(s)://host:port URLs")
        return tuple(_url(v) for v in value)
    if name == "admin_socket_group":
        if not isinstance(value, str) or any(c.isspace() or c in ":/" for c in value):
            raise ValueError(f"must be a group name, got {value!r}")
        return value
    if name in (
        "keystone_username",
        "keystone_password",
        "keystone_project_name",
        "keystone_user_domain_id",
        "keystone_project_domain_id",
        "service_token",
    ):
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {type(value).__name__}")
        return value
    if name == "access_tokens":
        if not isinstance(value, list | tuple) or not all(isinstance(t, str) and t for t in value):
            raise ValueError("must be a list of non-empty strings")
        return tuple(value)
    if name == "listen":
        parse_listen_list(value)
        if isinstance(value, list | tuple):
            return ",".join(str(v).strip() for v in value)
        return str(value)
    if name == "admin_listen":
        if isinstance(value, list | tuple):
            parse_admin_listen_list(value)
            return ",".join(str(v).strip() for v in value)
        if not isinstance(value, str):
            raise ValueError(f"must be unix:/path, HOST:PORT or a list of them, got {value!r}")
        if value:
            parse_admin_listen_list(value)
        return value
    if name in (
        "tls_cert_file",
        "tls_key_file",
        "upstream_ca_file",
        "keystone_ca_file",
        "admin_tls_client_ca",
        "policy",
    ):
        if not isinstance(value, str | Path):
            raise ValueError(f"must be a file path, got {value!r}")
        return str(value)
    if name == "upstream":
        parts = urllib.parse.urlsplit(str(value))
        if parts.scheme not in ("http", "https", "file") or not (parts.netloc or parts.path):
            raise ValueError(f"must be http(s)://host:port or file:///dir, got {value!r}")
        if parts.scheme != "file" and _API_VERSION_RE.search(parts.path.rstrip("/")):
            root = urllib.parse.urlunsplit(parts._replace(path=_API_VERSION_RE.sub(
                "", parts.path.rstrip("/")), query="", fragment=""))  # fmt: skip
            raise ValueError(
                f"must be the image API's root URL, not a version's: {value!r} (every path "
                f"cached sends starts with /v2 already; use {root!r})"
            )
        return str(value).rstrip("/")
    if name in ("image_cache_mount", "upstream_mount"):
        return _mount_spec(name, value)
    if name == "log_level":
        if str(value).upper() not in _LOG_LEVELS:
            raise ValueError(f"must be one of {sorted(_LOG_LEVELS)}, got {value!r}")
        return str(value).upper()
    return value


def _mount_spec(name: str, value: Any) -> MountSpec:
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a mapping of {', '.join(sorted(_MOUNT_KEYS))}")
    unknown = sorted(set(value) - _MOUNT_KEYS)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(_MOUNT_KEYS))})")
    spec: dict[str, Any] = {} if name == "image_cache_mount" else {"writable": False}
    for key, item in value.items():
        if key in ("require_mount", "writable"):
            if not isinstance(item, bool):
                raise ValueError(f"{key}: must be true or false, got {item!r}")
        elif key == "fstype":
            if not isinstance(item, str) or any(c.isspace() for c in item):
                raise ValueError(f"fstype: must be a filesystem type such as nfs4, got {item!r}")
        elif key == "sendfile":
            if name != "image_cache_mount":
                raise ValueError("sendfile: only for image_cache_mount (hits are sent from it)")
            if item not in SENDFILE_MODES:
                raise ValueError(
                    f"sendfile: must be one of {', '.join(SENDFILE_MODES)}, got {item!r}"
                )
        else:
            try:
                item = parse_duration(item)
            except ValueError:
                item = -1.0
            if item <= 0:
                raise ValueError(f"{key}: must be a number of seconds > 0, got {value[key]!r}")
        spec[key] = item
    if name == "image_cache_mount" and spec.get("writable") is False:
        raise ValueError("writable: the cache directory is always written to; leave it true")
    return MountSpec(**spec)


def build(values: Mapping[str, Any], source: str = "<flags>") -> Config:
    """Validate ``values`` (already parsed YAML or flags) into a :class:`Config`."""
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in _FIELDS:
            raise ConfigError(f"{source}: unknown option {key!r}")
        try:
            kwargs[key] = _convert(key, value)
        except ValueError as exc:
            raise ConfigError(f"{source}: option {key!r}: {exc}") from None
    return _check(Config(**kwargs), source)


def _check(config: Config, source: str) -> Config:
    """Rules between options; the message names the option to set."""
    password = (config.keystone_username, config.keystone_password, config.keystone_project_name)
    if any(password) and not all(password):
        missing = [
            k
            for k, v in zip(
                ("keystone_username", "keystone_password", "keystone_project_name"),
                password,
                strict=True,
            )
            if not v
        ]
        raise ConfigError(f"{source}: option {missing[0]!r}: needed with Keystone credentials")
    if config.keystone_username and not config.keystone_url:
        raise ConfigError(f"{source}: option 'keystone_url': needed with Keystone credentials")
    if config.keystone_url and not (config.keystone_username or config.service_token):
        raise ConfigError(
            f"{source}: option 'keystone_url': needs keystone_username/keystone_password/"
            "keystone_project_name or service_token to check tokens with"
        )
    if bool(config.tls_cert_file) != bool(config.tls_key_file):
        absent = "tls_key_file" if config.tls_cert_file else "tls_cert_file"
        raise ConfigError(
            f"{source}: option {absent!r}: tls_cert_file and tls_key_file go together"
        )
    if config.admin_tls_client_ca and not (
        config.tls_cert_file and any(isinstance(a, tuple) for a in config.admin_addresses)
    ):
        raise ConfigError(
            f"{source}: option 'admin_tls_client_ca': needs a HOST:PORT admin_listen and "
            "tls_cert_file/tls_key_file (client certificates are checked in the TLS handshake)"
        )
    if config.upstream_insecure and config.upstream_ca_file:
        raise ConfigError(
            f"{source}: option 'upstream_insecure': contradicts upstream_ca_file (set one)"
        )
    if config.prefetch_retry_max < config.prefetch_retry_initial:
        raise ConfigError(
            f"{source}: option 'prefetch_retry_max': must be >= prefetch_retry_initial"
        )
    return config


def read_yaml(path: str | Path) -> Any:
    """The YAML document in the file at ``path``; ConfigError naming the file otherwise.
    Blocks: call at start-up or from a thread."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


class _DuplicateKey(yaml.YAMLError):  # type: ignore[misc]
    pass


class _UniqueKeyLoader(yaml.SafeLoader):  # type: ignore[misc]
    """YAML's safe loader, refusing a key given twice in one mapping (YAML 1.2 says keys are
    unique; PyYAML keeps the last silently, so a second ``listen:`` would win unseen)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        assert isinstance(node, yaml.MappingNode)
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if first is not None:
                raise _DuplicateKey(
                    f"line {line}: option {key!r} given twice (first on line {first})"
                )
            seen[key] = line
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def load(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read the YAML file at ``path`` (None: built-in defaults) and apply ``overrides``.

    Overrides are the command-line flags; they win over the file.
    """
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        loaded = read_yaml(path)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: must be a mapping of option: value")
        raw.update(loaded)
    config = build(raw, source)
    if overrides:
        flags = build(overrides, "command line")
        changed = {k: getattr(flags, k) for k in overrides}
        config = _check(dataclasses.replace(config, **changed), "command line")
    return config


__all__ = [
    "Config",
    "MountSpec",
    "build",
    "load",
    "parse_admin_listen",
    "parse_admin_listen_list",
    "parse_duration",
    "parse_listen",
    "parse_listen_list",
    "parse_size",
    "as_yaml",
    "shown",
]
