"""Raw HTTP/1.1 over a loopback socket, for requests no HTTP client library would send.

Blocking calls: from async tests run them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def connect(url: str, timeout: float = 20.0) -> socket.socket:
    sock = socket.create_connection(address(url), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def read_reply(sock: socket.socket, *, head: bool = False) -> Reply:
    """One response: headers, then the body by Content-Length (or to the close)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        got = sock.recv(65536)
        if not got:
            raise ConnectionError(f"closed before a complete response head: {buf[:200]!r}")
        buf += got
    head_bytes, _, rest = buf.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if head or status in (204, 304) or 100 <= status < 200:
        return Reply(status, headers, b"")
    if "content-length" in headers:
        want = int(headers["content-length"])
        while len(rest) < want:
            got = sock.recv(min(1 << 20, want - len(rest)))
            if not got:
                break
            rest += got
        return Reply(status, headers, rest)
    while got := sock.recv(65536):
        rest += got
    return Reply(status, headers, rest)


def request(url: str, raw: bytes, timeout: float = 20.0) -> Reply:
    """Send ``raw`` as it is on a new connection and read one response."""
    with connect(url, timeout) as sock:
        sock.sendall(raw)
        return read_reply(sock)


def closed_by_peer(sock: socket.socket) -> bool:
    """Read until the server closes (True) or the socket's timeout passes (False); any
    response bytes it sends first are skipped."""
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


def rss(pid: int) -> int:
    """A process's resident set size in bytes (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")
