"""``cached reload --pid PID``: reload a running daemon and wait for its verdict.

``ExecReload=kill -HUP $MAINPID`` returns before the daemon has read its file, so
``systemctl reload`` cannot report a refused configuration (systemd 252, Debian 12;
``Type=notify-reload`` needs 253). This command reads the daemon's reload counters on
``/healthz``, sends ``SIGHUP``, waits until the reload it caused has finished and reports.

Exit status (what ``systemctl reload`` sees; every non-zero one fails the reload job):

- ``0``: the file was read and every change in it is in force.
- ``1``: refused (the daemon runs on what it had), partly applied (a part failed), or no
  verdict (no such process, no answer in time).
- ``2``: usage (a bad ``--url``).
- ``3``: the changes that apply live are in force, but options that need a restart changed
  (named in the message): the running daemon is not what the file says until
  ``systemctl restart cached``.

Where to ask: the daemon's own listening sockets, found from ``/proc/PID`` (so a file whose
``listen`` or ``admin_listen`` changed, which takes effect only after a restart, does not
send us elsewhere). Every one is asked and the management listener (``admin_listen``: a
socket or a TCP address; it answers with its process id) is preferred, since only it tells
the reason of a refusal; a public listener is used when there is no management listener
this command can reach (the reason is then in the daemon's log). ``--url`` overrides it.

A command-line program: synchronous, no event loop, no shared state.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import signal
import socket
import ssl
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp
_ACCEPTING = 0x10000  # __SO_ACCEPTCON in /proc/net/unix
POLL_INTERVAL = 0.1


class ReloadError(Exception):
    """Why the reload cannot be reported as done (the message is for the operator)."""


@dataclass(frozen=True)
class Address:
    """Where the daemon answers: a Unix socket path, or host, port and scheme."""

    socket: str = ""
    host: str = ""
    port: int = 0
    scheme: str = "http"

    def __str__(self) -> str:
        if self.socket:
            return f"unix:{self.socket}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def parse_url(value: str) -> Address:
    """``unix:/path`` or ``http(s)://host:port``; ValueError otherwise."""
    if value.startswith("unix:") and value.removeprefix("unix:"):
        return Address(socket=value.removeprefix("unix:"))
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--url: not unix:/path nor an http(s) URL: {value!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return Address(host=parts.hostname, port=port, scheme=parts.scheme)


# ------------------------------------------------------------------ the daemon's sockets
def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def _tcp_host(hex_address: str) -> str:
    raw = bytes.fromhex(hex_address)
    if sys.byteorder == "little":  # /proc/net/tcp{,6} print 32-bit words in host order
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(raw)
    if address.is_unspecified:  # listening on every address: ask on loopback
        return "127.0.0.1" if address.version == 4 else "::1"
    return str(address)


def daemon_addresses(pid: int) -> list[Address]:
    """The listening sockets of process ``pid``: Unix sockets first, then TCP, in the order
    the kernel lists them. Raises ReloadError when /proc cannot tell."""
    try:
        inodes = _socket_inodes(pid)
    except FileNotFoundError:
        raise ReloadError(f"no process {pid}") from None
    except PermissionError:
        raise ReloadError(f"cannot see the sockets of process {pid} (run as its user)") from None
    found: list[Address] = []
    try:
        for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[6] in inodes and int(fields[3], 16) & _ACCEPTING:
                if fields[7].startswith("/"):
                    found.append(Address(socket=fields[7]))
        for table in ("tcp", "tcp6"):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) >= 10 and fields[3] == _LISTEN and fields[9] in inodes:
                    host, port = fields[1].split(":")
                    found.append(Address(host=_tcp_host(host), port=int(port, 16)))
    except OSError as exc:
        raise ReloadError(f"cannot read the sockets of process {pid}: {exc}") from None
    return found


# ------------------------------------------------------------------------- /healthz
def _get_health(address: Address, timeout: float) -> dict[str, Any]:
    connection: http.client.HTTPConnection
    if address.socket:
        connection = _UnixConnection(address.socket, timeout)
    elif address.scheme == "https":
        # Only the daemon's public reload counters are read and no credential is sent;
        # its certificate names the host clients use, not this loopback address.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        connection = http.client.HTTPSConnection(
            address.host, address.port, timeout=timeout, context=context
        )
    else:
        connection = http.client.HTTPConnection(address.host, address.port, timeout=timeout)
    try:
        connection.request("GET", "/healthz", headers={"Accept": "application/json"})
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    if response.status != 200:
        raise ReloadError(f"{address}/healthz answered {response.status}")
    try:
        reload = json.loads(body)["reload"]
        return {
            "started": int(reload["started"]),
            "finished": int(reload["finished"]),
            "result": str(reload["result"]),
            # Only on the management listener (a refusal may quote the file's values).
            "pid": reload.get("pid"),
            "message": reload.get("message"),
            "restart_needed": list(reload.get("restart_needed", [])),
        }
    except (ValueError, KeyError, TypeError):
        raise ReloadError(f"{address}/healthz has no reload status (an older cached?)") from None


def health(address: Address, timeout: float) -> dict[str, Any]:
    """The daemon's reload status; ReloadError when it cannot be read."""
    try:
        return _get_health(address, timeout)
    except (OSError, http.client.HTTPException) as exc:
        raise ReloadError(f"cannot ask {address}: {exc}") from None


def find(pid: int, timeout: float) -> tuple[Address, dict[str, Any]]:
    """The daemon's management listener and its ``/healthz`` answer, else the first of its
    public listeners that answers (a TCP listener is tried with plain HTTP, then TLS).
    The management listener is the one whose answer carries the process id."""
    problems = []
    public: tuple[Address, dict[str, Any]] | None = None
    for address in daemon_addresses(pid):
        candidates = [address]
        if not address.socket:
            candidates.append(Address(host=address.host, port=address.port, scheme="https"))
        for candidate in candidates:
            try:
                answer = health(candidate, timeout)
            except ReloadError as exc:
                problems.append(str(exc))
                continue
            if answer["pid"] is not None:
                return candidate, answer
            public = public or (candidate, answer)
            break
    if public is not None:
        return public
    if not problems:
        raise ReloadError(f"process {pid} listens on no socket")
    raise ReloadError("; ".join(problems))


# --------------------------------------------------------------------------- reload
def reload(pid: int, url: str | None, timeout: float) -> tuple[int, str]:
    """SIGHUP to ``pid``; wait for the verdict of the reload it caused. Returns the exit
    status and what to tell the operator (:func:`verdict`); raises ReloadError when there is
    no verdict."""
    deadline = time.monotonic() + timeout
    request_timeout = min(5.0, timeout)
    if url:
        address = parse_url(url)
        before = health(address, request_timeout)
    else:
        address, before = find(pid, request_timeout)
    if before["pid"] is not None and before["pid"] != pid:
        raise ReloadError(f"{address} is process {before['pid']}, not {pid}")
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise ReloadError(f"no process {pid}") from None
    except PermissionError:
        raise ReloadError(f"not allowed to signal process {pid}") from None
    # A reload running now may have read the file before it changed: ours is the next one.
    wanted = before["started"] + 1
    while True:
        status = health(address, request_timeout)
        if status["finished"] >= wanted:
            break
        if time.monotonic() > deadline:
            raise ReloadError(f"process {pid} did not finish its reload within {timeout:g} s")
        time.sleep(POLL_INTERVAL)
    return verdict(status)


APPLIED, FAILED, USAGE, RESTART_NEEDED = 0, 1, 2, 3


def verdict(status: dict[str, Any]) -> tuple[int, str]:
    """The exit status and the line for the operator, from the daemon's reload status.
    Never "applied" while an option that changed waits for a restart."""
    result = status["result"]
    text = status["message"]  # None: not the management listener
    restart = status["restart_needed"]
    if result == "applied" and not restart:
        return APPLIED, f"reload applied: {text}" if text else "reload applied"
    if result == "applied":
        done = f"{text}; " if text else ""
        names = ", ".join(restart)
        return RESTART_NEEDED, (
            f"reload incomplete: {done}not in force until a restart (systemctl restart "
            f"cached): {names}"
        )
    if text is None:
        return FAILED, (
            f"reload {result} (the reason is in the daemon's log; only a management "
            "listener, admin_listen, reports it here)"
        )
    if restart:
        text += "; not in force until a restart: " + ", ".join(restart)
    return FAILED, f"reload {result}: {text}"


def main(pid: int, url: str | None, timeout: float) -> int:
    """Exit status: see the module's docstring (0 in force, 1 refused or no verdict, 2 usage,
    3 in force except options that need a restart)."""
    if url is not None:
        try:
            parse_url(url)
        except ValueError as exc:
            print(f"cached: reload: {exc}", file=sys.stderr)
            return USAGE
    try:
        status, text = reload(pid, url, timeout)
    except ReloadError as exc:
        print(f"cached: reload: {exc}", file=sys.stderr)
        return FAILED
    print(f"cached: {text}", file=sys.stdout if status == APPLIED else sys.stderr)
    return status
