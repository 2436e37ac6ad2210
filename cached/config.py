"""Configuration: one YAML file, validated once into a frozen dataclass.

Option names follow Glance where Glance has one (``image_cache_dir``,
``image_cache_max_size``, ``image_cache_stall_time``, ``cache_prefetcher_interval``), so an
operator can carry values over from ``glance-api.conf``.  Unknown keys and bad values raise
:class:`ConfigError` naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
import stat
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cached.errors import ConfigError
from cached.safety.verdict import DEFAULT_ALLOWED, INSPECTED_FORMATS

log = logging.getLogger(__name__)

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[object]) -> tuple[Network, ...]:
    """``10.0.0.5``, ``10.0.0.0/24``, ``fd00::/64`` as networks; ValueError naming a bad one."""
    networks = []
    for value in values:
        if not isinstance(value, str):
            raise ValueError(f"must be a list of addresses or networks, got {value!r}")
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an address or network: {value!r}") from None
    return tuple(networks)


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
    # Cache only: where a hit's sendfile runs (cached/download/reader.py). ``loop``: on the
    # event loop (fastest; a read that hangs freezes the daemon); ``thread``: on the cache's
    # I/O threads; ``auto``: threads on network and FUSE filesystems (SHARE_FSTYPES), the
    # loop elsewhere.
    sendfile: str = "auto"


SENDFILE_MODES = ("auto", "loop", "thread")

_MOUNT_KEYS = {f.name for f in dataclasses.fields(MountSpec)}


# --- the daemon's Keystone credentials (cached/identity/keystone.py) ------------------------
# Named as in the ``[keystone_authtoken]`` / ``[service_user]`` sections of every OpenStack
# service, and handed to keystoneauth1's plugin of the same ``auth_type`` unchanged.

KEYSTONE_AUTH_TYPES = ("password", "v3password", "v3applicationcredential", "admin_token")
KEYSTONE_SECRET_KEYS = frozenset({"password", "application_credential_secret", "token"})


@dataclass(frozen=True)
class KeystoneAuth:
    """The ``keystone_authtoken:`` mapping: where Keystone is and the daemon's credentials.

    ``auth_type`` is a keystoneauth1 plugin name: ``password``/``v3password`` (a service
    user), ``v3applicationcredential`` (what services are told to use), or ``admin_token``
    (a static ``token``, sent as it is and never renewed). Empty: inferred from the options.
    """

    auth_url: str = ""
    auth_type: str = ""
    username: str = ""
    user_id: str = ""
    password: str = ""
    user_domain_name: str = ""
    user_domain_id: str = ""
    project_name: str = ""
    project_id: str = ""
    project_domain_name: str = ""
    project_domain_id: str = ""
    application_credential_id: str = ""
    application_credential_name: str = ""
    application_credential_secret: str = ""
    token: str = ""
    # CA bundle verifying an https auth_url (empty: the system store).
    cafile: str = ""
    # Where the identity endpoint for token checks comes from: empty (both), the auth_url;
    # else the catalog's identity endpoint of this interface (public/internal/admin) and region.
    region_name: str = ""
    interface: str = ""

    @property
    def configured(self) -> bool:
        """Whether the daemon has credentials (a token or a Keystone to get one from)."""
        return bool(self.auth_type)

    def secrets(self) -> list[str]:
        """The values never logged."""
        return [getattr(self, k) for k in sorted(KEYSTONE_SECRET_KEYS) if getattr(self, k)]


_KEYSTONE_KEYS = {f.name for f in dataclasses.fields(KeystoneAuth)}
# Options of a [keystone_authtoken] section that only keystonemiddleware reads (how Glance
# checks tokens): accepted so that a section can be copied whole, and ignored with a warning.
_KEYSTONEMIDDLEWARE_ONLY = frozenset(
    {
        "www_authenticate_uri",
        "auth_uri",
        "auth_version",
        "delay_auth_decision",
        "http_connect_timeout",
        "http_request_max_retries",
        "include_service_catalog",
        "memcached_servers",
        "memcache_security_strategy",
        "memcache_secret_key",
        "memcache_use_advanced_pool",
        "service_token_roles",
        "service_token_roles_required",
        "service_type",
        "token_cache_time",
    }
)
# The options of before keystone_authtoken: still read (a deprecation warning), mapped here.
_LEGACY_KEYSTONE = {
    "keystone_url": "auth_url",
    "keystone_username": "username",
    "keystone_password": "password",
    "keystone_project_name": "project_name",
    "keystone_user_domain_id": "user_domain_id",
    "keystone_project_domain_id": "project_domain_id",
    "keystone_ca_file": "cafile",
    "service_token": "token",
}

# Their defaults, which the shipped file lists: not a use of a deprecated option.
_LEGACY_DEFAULTS = {"keystone_user_domain_id": "default", "keystone_project_domain_id": "default"}


def _keystone_authtoken(value: Any) -> KeystoneAuth:
    if not isinstance(value, Mapping):
        raise ValueError(
            "must be a mapping of [keystone_authtoken] options "
            f"({', '.join(sorted(_KEYSTONE_KEYS))})"
        )
    for key in sorted(set(value) & _KEYSTONEMIDDLEWARE_ONLY):
        log.warning(
            "keystone_authtoken: %r ignored: it configures keystonemiddleware in Glance, "
            "not the daemon's credentials",
            key,
        )
    unknown = sorted(set(value) - _KEYSTONE_KEYS - _KEYSTONEMIDDLEWARE_ONLY)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(_KEYSTONE_KEYS))})")
    opts: dict[str, str] = {}
    for key, item in value.items():
        if item is None or key in _KEYSTONEMIDDLEWARE_ONLY:
            continue
        if not isinstance(item, str | int) or isinstance(item, bool):
            raise ValueError(f"{key}: must be a string, got {type(item).__name__}")
        opts[key] = str(item)
    if opts.get("auth_url"):
        try:
            opts["auth_url"] = _url(opts["auth_url"])
        except ValueError as exc:
            raise ValueError(f"auth_url: {exc}") from None
    if opts.get("interface", "") not in ("", "public", "internal", "admin"):
        raise ValueError(f"interface: must be public, internal or admin, got {opts['interface']!r}")
    auth_type = opts.get("auth_type", "")
    if auth_type and auth_type not in KEYSTONE_AUTH_TYPES:
        raise ValueError(
            f"auth_type: must be one of {', '.join(KEYSTONE_AUTH_TYPES)}, got {auth_type!r}"
        )
    if not auth_type:
        if opts.get("application_credential_id") or opts.get("application_credential_name"):
            auth_type = "v3applicationcredential"
        elif opts.get("token"):
            auth_type = "admin_token"
        elif opts.get("username") or opts.get("user_id"):
            auth_type = "password"
    if auth_type in ("password", "v3password"):
        opts.setdefault("user_domain_id", "" if opts.get("user_domain_name") else "default")
        opts.setdefault("project_domain_id", "" if opts.get("project_domain_name") else "default")
    opts["auth_type"] = auth_type
    return KeystoneAuth(**opts)


def _fold_legacy_keystone(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``values`` with the deprecated ``keystone_*``/``service_token`` options moved into
    ``keystone_authtoken`` (each named in a warning); ConfigError if both name one value."""
    for key in _LEGACY_KEYSTONE.keys() & values.keys():
        if not isinstance(values[key], str):
            raise ConfigError(
                f"{source}: option {key!r}: must be a string, got {type(values[key]).__name__}"
            )
        if key == "keystone_url" and values[key]:
            try:
                _url(values[key])
            except ValueError as exc:
                raise ConfigError(f"{source}: option {key!r}: {exc}") from None
    legacy = {
        k: v
        for k, v in values.items()
        if k in _LEGACY_KEYSTONE and v not in ("", None, _LEGACY_DEFAULTS.get(k))
    }
    out = {k: v for k, v in values.items() if k not in _LEGACY_KEYSTONE}
    if not legacy:
        return out
    section = dict(out.get("keystone_authtoken") or {})
    if not isinstance(out.get("keystone_authtoken") or {}, Mapping):
        return dict(values)  # _convert reports the bad section
    if legacy.get("service_token"):
        # Before: a static token was used as it is, even with password options set.
        section.setdefault("auth_type", "admin_token")
    elif legacy.get("keystone_username"):
        section.setdefault("auth_type", "password")
    for old, value in legacy.items():
        new = _LEGACY_KEYSTONE[old]
        if new in section and section[new] != value:
            raise ConfigError(
                f"{source}: option {old!r}: also given as keystone_authtoken.{new}; "
                f"keep only keystone_authtoken.{new}"
            )
        section[new] = value
        log.warning(
            "%s: option %r is deprecated: write it as keystone_authtoken: {%s: ...}",
            source,
            old,
            new,
        )
    out["keystone_authtoken"] = section
    return out


def _mirror_legacy_keystone(config: Config) -> Config:
    """The deprecated fields, kept as read-only mirrors of ``keystone_authtoken`` for the
    code that still reads them (the listeners' exposure check, TLS contexts, log redaction)."""
    auth = config.keystone_authtoken
    return dataclasses.replace(
        config,
        keystone_url=auth.auth_url,
        keystone_username=auth.username,
        keystone_password=auth.password,
        keystone_project_name=auth.project_name,
        keystone_user_domain_id=auth.user_domain_id or "default",
        keystone_project_domain_id=auth.project_domain_id or "default",
        keystone_ca_file=auth.cafile,
        service_token=auth.token if auth.auth_type == "admin_token" else "",
    )


def _check_keystone(config: Config, source: str) -> None:
    """The options each ``auth_type`` needs; the message names the one to set."""
    auth = config.keystone_authtoken
    where = f"{source}: option 'keystone_authtoken'"
    if not auth.auth_type:
        if auth.auth_url:
            raise ConfigError(
                f"{where}: auth_url needs credentials to check tokens with: username/password/"
                "project_name, application_credential_id/application_credential_secret, or token"
            )
        return
    needed: list[tuple[str, ...]] = []
    if auth.auth_type in ("password", "v3password"):
        needed = [("username", "user_id"), ("password",), ("project_name", "project_id")]
    elif auth.auth_type == "v3applicationcredential":
        needed = [
            ("application_credential_id", "application_credential_name"),
            ("application_credential_secret",),
        ]
        if auth.application_credential_name and not auth.application_credential_id:
            needed.append(("username", "user_id"))
    else:
        needed = [("token",)]
    for choice in needed:
        if not any(getattr(auth, k) for k in choice):
            raise ConfigError(f"{where}: auth_type {auth.auth_type} needs {' or '.join(choice)}")
    if auth.auth_type != "admin_token" and not auth.auth_url:
        raise ConfigError(f"{where}: auth_type {auth.auth_type} needs auth_url")
    if (
        auth.auth_type in ("password", "v3password")
        and auth.project_name
        and not (auth.project_domain_name or auth.project_domain_id)
    ):
        raise ConfigError(f"{where}: project_name needs project_domain_name or project_domain_id")


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
    # --- client connections (cached/edge/connguard.py); 0 turns a limit off ---
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
    # --- shielding the upstream from clients (issue 13; cached/edge/connguard.py, passthrough.py,
    # upstream/glance.py, auth.py); 0 turns a limit off ---
    # Request bodies up to this size are read completely before the upstream is contacted
    # (nginx's proxy_request_buffering): a slow client holds no upstream worker. Larger
    # bodies (image uploads) are streamed.
    client_body_buffer_size: int = 256 << 10
    # Bytes per second a request body must average: after client_body_timeout's grace, each
    # of these bytes buys one more second (time cached paused reading does not count).
    client_body_min_rate: int = 32 << 10
    # Pass-through requests one client (address, IPv6 /64) may have at the upstream at once;
    # the next gets 503 and Retry-After.
    max_upstream_requests_per_client: int = 16
    # Connections to the upstream, per use (a request waits up to upstream_connect_timeout
    # for a free one): pass-through requests (uploads, API calls, bypassed downloads), image
    # transfers (fills, prefetch), and authorisation probes and records (never queued
    # behind the others).
    upstream_relay_connections: int = 32
    upstream_fetch_connections: int = 64
    upstream_probe_connections: int = 32
    # Authorisation probes failed in a row, across requests, before the upstream counts as
    # down for auth_stale_if_error (a single failed probe is never an outage).
    auth_stale_after_failures: int = 3
    # Open client connections in all (the next gets 503); with the per-address cap it bounds
    # what many addresses together can hold (e.g. client_body_buffer_size each).
    max_connections: int = 4096
    # IPv6 clients are counted (per-address and per-client caps) by this prefix: a host
    # normally has a whole /64 to pick addresses from. 128: every address on its own.
    client_ipv6_prefix: int = 64
    # Load balancers / TLS terminators in front of cached (addresses or networks): their
    # connections are not held to max_connections_per_address, and their requests count
    # as the client X-Forwarded-For names (cached/edge/clients.py). Empty: nobody is trusted.
    trusted_proxies: tuple[str, ...] = ()
    log_level: str = "INFO"
    # --- cache management API and periodic jobs (cached/manage/api.py, cached/jobs/schedule.py) ---
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
    # service credentials there (also used by the prefetcher): the options of the
    # [keystone_authtoken] section of glance-api.conf, as a mapping (see KeystoneAuth).
    keystone_authtoken: KeystoneAuth = KeystoneAuth()
    # Deprecated (read into keystone_authtoken with a warning; kept as mirrors of it):
    keystone_url: str = ""
    keystone_username: str = ""
    keystone_password: str = ""
    keystone_project_name: str = ""
    keystone_user_domain_id: str = "default"
    keystone_project_domain_id: str = "default"
    # Deprecated: keystone_authtoken: {auth_type: admin_token, token: ...}.
    service_token: str = ""
    # This node's URL in GET /v2/cache/nodes/{id} (Glance's name); empty: from the request.
    worker_self_reference_url: str = ""
    # Other cached nodes asked by GET /v2/cache/nodes/{id} whether they hold the image.
    peers: tuple[str, ...] = ()
    # --- integrity (cached/cachedir/reverify.py) ---
    # Seconds between scrub passes: each re-reads every complete entry and checks its digest.
    scrub_interval: int = 86400
    # MiB/s a scrub pass reads at most (it also pauses while fills run).
    scrub_rate: float = 16.0
    # --- operations (cached/ops/health.py, cached/ops/lifecycle.py) ---
    # Apply the management API's admin rules to GET /metrics too.
    metrics_auth: bool = False
    # Seconds running downloads may take to finish after SIGTERM (keep below TimeoutStopSec).
    shutdown_grace: float = 30.0
    # --- TLS, listeners, management access, request policy (cached/edge/tls.py, listeners.py,
    # policy.py) ---
    # PEM certificate chain and key served on every TCP listener (both or neither).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # CA bundle that verifies an https upstream (empty: the system store).
    upstream_ca_file: str = ""
    # Do not verify the upstream's certificate (a warning is logged at every start).
    upstream_insecure: bool = False
    # Deprecated: keystone_authtoken: {cafile: ...}.
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
    # YAML file of request rules checked before anything is proxied (cached/edge/policy.py).
    policy: str = ""
    # --- image content safety (cached/safety/) ---
    # off: no inspection. audit: every image's content is inspected as it is cached (format
    # detected against the declared disk_format, qemu-img hazards such as backing files,
    # data files, VMDK extents naming host files); the verdict is stored with the entry,
    # logged and sent in Cached-Image-Verdict on hits; nothing is refused. enforce: the same,
    # and an image whose verdict is unsafe, mismatch or error is never a hit (see
    # image_safety_on_violation) unless an admin override for its os_hash_value lets it be;
    # safe and not-inspectable images are served as in audit.
    image_safety_mode: str = "audit"
    # enforce only: what a download of a violating image gets. pass-through: the upstream's
    # data, never from the cache (Cache-Status: cached; fwd=bypass; detail=unsafe-format, or
    # detail=bad-signature for a signature). refuse: 403 naming the verdict (or the
    # signature's result), after the caller's authorisation.
    image_safety_on_violation: str = "pass-through"
    # Formats an image may be detected as (oslo.utils' names); others are "unsafe".
    image_safety_allowed_formats: tuple[str, ...] = tuple(sorted(DEFAULT_ALLOWED))
    # Failed checks not counted against a gpt image (Glance's gpt_safety_checks_nonfatal).
    image_safety_nonfatal_checks: tuple[str, ...] = ()
    # Seconds (or 30m, 1h, 1d) between passes of the audit job: complete entries without a
    # verdict of the running oslo.utils version and policy are inspected again from their
    # file (1-6 ms each; the first hit of such an entry does it too).
    image_safety_audit_interval: int = 3600
    # Glance image signatures (img_signature, ... as cursive checks them; cached/safety/
    # signature.py), verified as each image is cached: the result is stored with the entry,
    # logged and sent in Cached-Image-Signature on hits. Audit refuses nothing; enforce keeps
    # an image whose result is not allowed (a signed image must verify; an unsigned one
    # passes unless image_signature_required) out of the cache like a content violation
    # (detail=bad-signature, or 403 naming the result). Needs both anchors below; restart to
    # change.
    image_signature_verify: bool = False
    # Unsigned images count as failures (require_signed): only enforce mode refuses them.
    image_signature_required: bool = False
    # Directory of the signers' X.509 certificates, <img_signature_certificate_uuid>.pem.
    image_signature_certificate_dir: str = ""
    # PEM bundle of the CAs the signers' certificates must chain to.
    image_signature_ca_file: str = ""

    # --- fleet: peer fill between the caches of one control plane (cached/fleet/) ---
    # This member's id in fleet_members; the fleet is on with two members or more. Fleet
    # keys take effect after a restart (they are not in cached/ops/lifecycle.py LIVE).
    fleet_self: str = ""
    # Every member, this one too: [{id: ctl-1, url: "https://192.0.2.11:9292"}, ...]; the url
    # is what siblings call. A fleet replaces peers and worker_self_reference_url.
    fleet_members: tuple[FleetMember, ...] = ()
    # The key peer requests are signed with: >= 32 random bytes, mode 0600.
    fleet_secret_file: str = ""
    # A key also accepted (during a key change); "" for none.
    fleet_previous_secret_file: str = ""
    # Seconds a fill waits for siblings to say whether they hold the image.
    fleet_lookup_timeout: float = 0.2
    # Streams to siblings served at once (the next gets 503 and Retry-After).
    fleet_max_peer_streams: int = 16
    # Per sibling: seconds to connect, to its response headers, and without a byte.
    fleet_connect_timeout: float = 1.0
    fleet_headers_timeout: float = 5.0
    fleet_stall_timeout: float = 10.0
    # MiB/s below which a sibling's complete copy (over 5 s) is left for the next source;
    # 0: never (a sibling's running fill is never judged by its rate, only by stalls).
    fleet_min_copy_rate: float = 50.0
    # HOST:PORT of a listener of its own for siblings' requests (TLS like the public
    # listeners when tls_cert_file is set): the /cached-peer/v1/ routes are answered there
    # only (404 on the public listeners), and nothing else is answered there. "" : the
    # peer routes are on the public listeners. Members' urls then name this address.
    fleet_listen: str = ""

    @property
    def fleet_address(self) -> tuple[str, int] | None:
        """The fleet listener's address (``fleet_listen``), or None."""
        return parse_listen(self.fleet_listen) if self.fleet_listen else None

    @property
    def fleet(self) -> bool:
        """Whether peer fill is on: a fleet of two members or more."""
        return len(self.fleet_members) >= 2

    @property
    def max_entry_size(self) -> int:
        """The largest image the cache admits."""
        return int(self.image_cache_max_size * self.max_image_fraction)

    # --- declared directories (cached/cachedir/guard.py) ---
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
    if isinstance(value, KeystoneAuth):
        return {
            k: ("(set)" if k in KEYSTONE_SECRET_KEYS else v)
            for k, v in dataclasses.asdict(value).items()
            if v
        }
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


_SHIELDING_SIZES = ("client_body_buffer_size", "client_body_min_rate")
_SHIELDING_COUNTS = (
    "max_upstream_requests_per_client",
    "upstream_relay_connections",
    "upstream_fetch_connections",
    "upstream_probe_connections",
    "max_connections",
)
_SHIELDING = (
    *_SHIELDING_SIZES,
    *_SHIELDING_COUNTS,
    "auth_stale_after_failures",
    "client_ipv6_prefix",
    "trusted_proxies",
)


def _convert_shielding(name: str, value: Any) -> Any:
    """The options of the block "shielding the upstream from clients" (issue 13)."""
    if name in _SHIELDING_SIZES:
        return parse_size(value)  # client_body_min_rate: bytes per second (32K)
    if name in _SHIELDING_COUNTS:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"must be a whole number >= 0 (0: no limit), got {value!r}")
        return value
    if name == "auth_stale_after_failures":
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(
                f"must be a whole number >= 2 (one failed probe is not an outage), got {value!r}"
            )
        return value
    if name == "client_ipv6_prefix":
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 128:
            raise ValueError(f"must be a prefix length from 1 to 128, got {value!r}")
        return value
    if name == "trusted_proxies":
        if not isinstance(value, list | tuple):
            raise ValueError("must be a list of addresses or networks (10.0.0.5, 10.0.0.0/24)")
        parse_networks(value)
        return tuple(str(v).strip() for v in value)
    raise KeyError(name)


def _convert(name: str, value: Any) -> Any:
    """Turn one raw value into the type of the field ``name``; raise ValueError if it is bad."""
    if name in _SHIELDING:
        return _convert_shielding(name, value)
    if name.startswith("fleet_"):
        return _fleet_convert(name, value)
    if name in ("image_cache_max_size", "fsync_interval_bytes", "max_header_size"):
        return parse_size(value)
    if name in (
        "image_cache_stall_time",
        "cache_prefetcher_interval",
        "cache_prune_interval",
        "cache_clean_interval",
        "scrub_interval",
        "image_safety_audit_interval",
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
        "image_signature_verify",
        "image_signature_required",
    ):
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {value!r}")
        return value
    if name == "keystone_authtoken":
        return _keystone_authtoken(value)
    if name == "admin_tokens":
        if not isinstance(value, list | tuple) or not all(
            isinstance(t, str) and _ADMIN_TOKEN_RE.match(t) for t in value
        ):
            raise ValueError('must be a list of "sha256:<64 hex digits>" (sha256 of the token)')
        return tuple(t.lower() for t in value)
    if name == "worker_self_reference_url":
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
        "admin_tls_client_ca",
        "policy",
        "image_signature_certificate_dir",
        "image_signature_ca_file",
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
    if name == "image_safety_mode":
        if value is False:
            return "off"  # YAML 1.1 (PyYAML) reads the documented, unquoted `off` as false
        if value not in ("off", "audit", "enforce"):
            raise ValueError(f"must be off, audit or enforce, got {value!r}")
        return value
    if name == "image_safety_on_violation":
        if value not in ("pass-through", "refuse"):
            raise ValueError(f"must be pass-through or refuse, got {value!r}")
        return value
    if name == "image_safety_allowed_formats":
        if not isinstance(value, list | tuple) or not all(v in INSPECTED_FORMATS for v in value):
            raise ValueError(f"must be a list of {', '.join(sorted(INSPECTED_FORMATS))}")
        return tuple(sorted(set(value)))
    if name == "image_safety_nonfatal_checks":
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, str) and re.fullmatch(r"[a-z_]{1,32}", v) for v in value
        ):
            raise ValueError("must be a list of check names (mbr, gptmbr, ...)")
        return tuple(sorted(set(value)))
    if name == "log_level":
        if str(value).upper() not in _LOG_LEVELS:
            raise ValueError(f"must be one of {sorted(_LOG_LEVELS)}, got {value!r}")
        return str(value).upper()
    return value


# --- fleet (cached/fleet/): conversion and the rules between its keys -------------------
FLEET_ID_RE = re.compile(r"^[a-z0-9-]{1,63}$")
FLEET_SECRET_MIN = 32  # bytes of a fleet key


@dataclass(frozen=True)
class FleetMember:
    """One cache of the fleet (``fleet_members``): its id and the URL siblings call."""

    id: str
    url: str

    def __str__(self) -> str:
        return f"{self.id}={self.url}"


def _fleet_id(value: Any) -> str:
    if not isinstance(value, str) or not FLEET_ID_RE.match(value):
        raise ValueError(f"a member id is 1 to 63 of a-z, 0-9 and '-', got {value!r}")
    return value


def _fleet_convert(name: str, value: Any) -> Any:
    if name == "fleet_self":
        return _fleet_id(value) if value else ""
    if name == "fleet_members":
        if not isinstance(value, list | tuple):
            raise ValueError("must be a list of {id: ..., url: http(s)://host:port}")
        members: list[FleetMember] = []
        for item in value:
            if not isinstance(item, Mapping) or set(item) != {"id", "url"}:
                raise ValueError(f"each member is {{id: ..., url: ...}}, got {item!r}")
            member = FleetMember(_fleet_id(item["id"]), _url(item["url"]))
            for seen in members:
                if seen.id == member.id:
                    raise ValueError(f"member id {member.id!r} is listed twice")
                if seen.url == member.url:
                    raise ValueError(f"url {member.url!r} is listed twice")
            members.append(member)
        return tuple(members)
    if name in ("fleet_secret_file", "fleet_previous_secret_file"):
        if not isinstance(value, str | Path):
            raise ValueError(f"must be a file path, got {value!r}")
        return str(value)
    if name in (
        "fleet_lookup_timeout",
        "fleet_connect_timeout",
        "fleet_headers_timeout",
        "fleet_stall_timeout",
    ):
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"must be a number of seconds > 0, got {value!r}")
        return float(value)
    if name == "fleet_min_copy_rate":
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"must be a number of MiB/s >= 0 (0: off), got {value!r}")
        return float(value)
    if name == "fleet_listen":
        if not isinstance(value, str):
            raise ValueError(f"must be HOST:PORT, got {value!r}")
        if value:
            parse_listen(value)
        return value
    if name == "fleet_max_peer_streams":
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"must be a positive whole number, got {value!r}")
        return value
    raise ValueError("unknown fleet option")  # (every fleet field is handled above)


def read_fleet_secret(path: str, key: str) -> bytes:
    """The fleet key in the file at ``path`` (option ``key``); ConfigError naming the option
    when it is missing, shorter than FLEET_SECRET_MIN bytes or readable by group or others.
    Blocks: call at start-up or from a thread."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            secret = f.read()
    except OSError as exc:
        raise ConfigError(f"option {key!r}: cannot read {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise ConfigError(
            f"option {key!r}: {path} is readable by group or others "
            f"(mode {stat.S_IMODE(mode):04o}): chmod 0600 it"
        )
    if len(secret.strip()) < FLEET_SECRET_MIN:
        raise ConfigError(
            f"option {key!r}: {path} holds {len(secret.strip())} bytes, "
            f"a fleet key needs at least {FLEET_SECRET_MIN}"
        )
    return secret.strip()


def _check_fleet(config: Config, source: str) -> None:
    """The fleet keys against each other and the options a fleet replaces."""
    if not config.fleet_members and not config.fleet_self:
        return
    if not config.fleet_self:
        raise ConfigError(f"{source}: option 'fleet_self': needed with fleet_members")
    ids = [m.id for m in config.fleet_members]
    if config.fleet_self not in ids:
        raise ConfigError(
            f"{source}: option 'fleet_self': {config.fleet_self!r} is not in fleet_members "
            f"({', '.join(ids) or 'none'})"
        )
    if not config.fleet:
        if config.fleet_listen:
            raise ConfigError(
                f"{source}: option 'fleet_listen': needs a fleet (two fleet_members or more)"
            )
        return  # one member: nothing to share, behaviour unchanged
    fleet = config.fleet_address
    if fleet is not None and fleet[1] != 0:
        admin = config.admin_address
        others = [*config.listen_addresses, *([admin] if isinstance(admin, tuple) else [])]
        for other in others:
            if other[1] == fleet[1]:
                raise ConfigError(
                    f"{source}: option 'fleet_listen': {_shown(fleet)} shares port {fleet[1]} "
                    f"with the listener {_shown(other)}; give the fleet a port of its own"
                )
    for replaced in ("peers", "worker_self_reference_url"):
        if getattr(config, replaced):
            raise ConfigError(
                f"{source}: option {replaced!r}: a fleet replaces it (the members' urls "
                "are the peers); remove it"
            )
    if not config.fleet_secret_file:
        raise ConfigError(f"{source}: option 'fleet_secret_file': needed with a fleet")
    read_fleet_secret(config.fleet_secret_file, "fleet_secret_file")
    if config.fleet_previous_secret_file:
        read_fleet_secret(config.fleet_previous_secret_file, "fleet_previous_secret_file")


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
    values = _fold_legacy_keystone(values, source)
    for key, value in values.items():
        if key not in _FIELDS:
            raise ConfigError(f"{source}: unknown option {key!r}")
        try:
            kwargs[key] = _convert(key, value)
        except ValueError as exc:
            raise ConfigError(f"{source}: option {key!r}: {exc}") from None
    return _check(_mirror_legacy_keystone(Config(**kwargs)), source)


def _check(config: Config, source: str) -> Config:
    """Rules between options; the message names the option to set."""
    _check_keystone(config, source)
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
    _check_ports(config, source)
    if config.prefetch_retry_max < config.prefetch_retry_initial:
        raise ConfigError(
            f"{source}: option 'prefetch_retry_max': must be >= prefetch_retry_initial"
        )
    _check_fleet(config, source)
    _check_signatures(config, source)
    return config


def _check_signatures(config: Config, source: str) -> None:
    """Signature verification needs its anchors (issue 18: none configured, no start)."""
    if config.image_signature_verify:
        for key in ("image_signature_certificate_dir", "image_signature_ca_file"):
            if not getattr(config, key):
                raise ConfigError(
                    f"{source}: option {key!r}: image_signature_verify needs it (the "
                    "certificates signatures are checked against)"
                )
    elif config.image_signature_required:
        raise ConfigError(
            f"{source}: option 'image_signature_required': needs image_signature_verify: true"
        )


def _overlap(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Whether two TCP listen addresses would take the same connections: the same port, in
    the same address family, the same host or one of them that family's wildcard."""
    if a[1] != b[1] or a[1] == 0:  # port 0: the kernel picks a free port for each
        return False
    v6a, v6b = ":" in a[0], ":" in b[0]
    if v6a != v6b:
        return False  # an IPv6 wildcard is bound v6-only (cached/edge/listeners.py)
    wildcard = "::" if v6a else "0.0.0.0"
    return a[0] == b[0] or wildcard in (a[0], b[0])


def _check_ports(config: Config, source: str) -> None:
    """Refuse listeners that share a port ambiguously (issue 13): two public addresses that
    would take the same connections, and a TCP ``admin_listen`` on any public port (one port
    that answers as management on one address and publicly on another is a trap)."""
    public = config.listen_addresses
    for i, a in enumerate(public):
        for b in public[i + 1 :]:
            if _overlap(a, b):
                raise ConfigError(
                    f"{source}: option 'listen': {_shown(a)} and {_shown(b)} overlap (the same "
                    "port on the same address, or on that address family's wildcard)"
                )
    admin = config.admin_address
    if isinstance(admin, tuple) and admin[1] != 0:
        for a in public:
            if a[1] == admin[1]:
                raise ConfigError(
                    f"{source}: option 'admin_listen': {_shown(admin)} shares port {admin[1]} "
                    f"with the public listener {_shown(a)}; give management a port of its own"
                )


def _shown(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
    "KeystoneAuth",
    "FleetMember",
    "MountSpec",
    "build",
    "load",
    "parse_admin_listen",
    "parse_admin_listen_list",
    "parse_duration",
    "parse_listen",
    "parse_listen_list",
    "parse_size",
    "read_fleet_secret",
    "as_yaml",
    "shown",
]
