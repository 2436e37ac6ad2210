"""Request bodies through cached (issue 13 item 2): what buffering small bodies costs.

cached reads a request body of at most ``client_body_buffer_size`` bytes completely before it
contacts the upstream (a slow client then holds no upstream worker); larger bodies are
streamed. This measures, on loopback, in front of an upload sink (an aiohttp server in this
process that reads every body and answers 204):

- **upload MB/s**, one client on one kept-alive connection, for bodies of several sizes:
  straight to the sink, through cached with buffering (the default, 256 KiB), and through
  cached with ``client_body_buffer_size: 0`` (every body streamed, the behaviour before);
- **memory per buffered connection**: the daemon's RSS before and after ``--connections``
  clients each sent the headers of a ``POST`` with ``Content-Length`` = the buffer size and
  all of its body but one byte (the worst a buffering connection holds), the same with a
  1 MiB buffer, and with 100-byte bodies (a trickle: what issue 13's attack costs now).

    python -m bench.uploads [--rounds 3] [--connections 200] [--large 256M]

Every daemon runs as ``cached serve`` from this tree (``PYTHONPATH``); stopped by its pid.
Numbers: a table on stdout and ``bench/results/uploads-DATE.json`` (gitignored).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from bench import measure
from bench.procs import Proc, stop_all

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent
_MAIN = "import sys; from cached.cli import main; sys.exit(main())"


class Sink:
    """An upstream that reads every request body whole and answers 204 (in a thread)."""

    def __init__(self) -> None:
        self.port = 0
        self.bodies = 0
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(10)

    async def _handle(self, request: web.Request) -> web.Response:
        while await request.content.readany():
            pass
        self.bodies += 1
        return web.Response(status=204)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=1 << 40)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = runner.addresses[0][1]
        self._ready.set()
        self._loop.run_forever()


def start_cached(work: Path, name: str, upstream: str, options: dict[str, Any]) -> Proc:
    (work / name / "cache").mkdir(parents=True, exist_ok=True)
    config = work / name / "cached.yaml"
    config.write_text(json.dumps(options))
    argv = [sys.executable, "-c", _MAIN, "serve", "--listen", "127.0.0.1:0"]
    argv += ["--upstream", upstream, "--cache-dir", str(work / name / "cache")]
    argv += ["-c", str(config)]
    proc = Proc(name, argv, work / f"{name}.log", env={"PYTHONPATH": str(REPO)})
    proc.wait_listening()
    return proc


def upload_rate(port: int, size: int, seconds: float) -> tuple[float, int]:
    """MB/s of ``PUT`` bodies of ``size`` bytes sent back to back on one connection for
    about ``seconds`` (at least 3 requests), and how many were sent."""
    body = os.urandom(min(size, 4 * MiB))
    head = (
        f"PUT /v2/images/00000000-0000-0000-0000-000000000000/file HTTP/1.1\r\n"
        f"Host: bench\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {size}\r\n\r\n"
    ).encode()
    sent = count = 0
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = time.perf_counter()
        while count < 3 or time.perf_counter() - start < seconds:
            sock.sendall(head)
            left = size
            while left:
                piece = body[: min(left, len(body))]
                sock.sendall(piece)
                left -= len(piece)
            reply = _read_head(sock)
            if not reply.startswith(b"HTTP/1.1 204"):
                raise RuntimeError(f"upload answered {reply[:100]!r}")
            sent += size
            count += 1
        elapsed = time.perf_counter() - start
    return sent / elapsed / 1e6, count


def _read_head(sock: socket.socket) -> bytes:
    got = b""
    while b"\r\n\r\n" not in got:
        piece = sock.recv(65536)
        if not piece:
            raise RuntimeError(f"closed: {got[:200]!r}")
        got += piece
    return got


def _settled_rss(pid: int, within: float = 60.0) -> float:
    """The daemon's RSS (MiB) once it stopped growing for a second (it has read what the
    clients sent), or after ``within`` seconds."""
    deadline = time.monotonic() + within
    last = measure.rss_mib([pid])
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = measure.rss_mib([pid])
        if now <= last:
            return now
        last = now
    return last


def buffered_memory(proc: Proc, port: int, connections: int, length: int) -> float:
    """KiB of daemon RSS per connection holding a ``length``-byte body all but its last
    byte (read into cached's buffer, not yet sent upstream)."""
    before = measure.rss_mib([proc.pid])
    socks = []
    try:
        for _ in range(connections):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(
                b"POST /v2/images HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % length + b"x" * (length - 1)
            )
            socks.append(sock)
        after = _settled_rss(proc.pid)
    finally:
        for sock in socks:
            sock.close()
    return (after - before) * 1024 / connections


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--large", default="256M", help="the largest body (streamed)")
    args = parser.parse_args(argv)
    from cached.config import Config, parse_size

    large = parse_size(args.large)
    sink = Sink()
    upstream = f"http://127.0.0.1:{sink.port}"
    work = Path(tempfile.mkdtemp(prefix="cached-bench-uploads-"))
    sizes = [4 << 10, 64 << 10, 256 << 10, MiB, 4 * MiB, large]
    results: dict[str, Any] = {"sizes": sizes, "rates": {}, "memory_kib": {}}
    try:
        limits = {"max_connections_per_address": 0, "max_upstream_requests_per_client": 0}
        buffered = start_cached(work, "buffered", upstream, limits)
        buffered_1m = start_cached(
            work, "buffered-1M", upstream, {**limits, "client_body_buffer_size": MiB}
        )
        streamed = start_cached(
            work, "streamed", upstream, {**limits, "client_body_buffer_size": 0}
        )
        targets = {
            "direct": sink.port,
            "buffered 256K": buffered.wait_listening(),
            "buffered 1M": buffered_1m.wait_listening(),
            "streamed": streamed.wait_listening(),
        }
        for name in targets:
            results["rates"][name] = {str(s): [] for s in sizes}
        for _ in range(args.rounds):
            for size in sizes:
                for name, port in targets.items():  # interleaved, same conditions
                    rate, _count = upload_rate(port, size, args.seconds)
                    results["rates"][name][str(size)].append(rate)
        full = Config().client_body_buffer_size
        for label, proc, length in (  # the smallest first: the others grow the heap
            ("100-byte body", buffered, 100),
            (f"{full >> 10} KiB body (the default buffer, full)", buffered, full),
            ("1 MiB body (client_body_buffer_size: 1M, full)", buffered_1m, MiB),
        ):
            port = proc.wait_listening()
            results["memory_kib"][label] = buffered_memory(proc, port, args.connections, length)
    finally:
        stop_all()
    print(f"\nupload MB/s, one connection, median of {args.rounds} rounds of ~{args.seconds}s")
    names = list(results["rates"])
    print(f"{'body':>10} | " + " | ".join(f"{n:>14}" for n in names))
    for size in sizes:
        cells = [statistics.median(results["rates"][n][str(size)]) for n in names]
        label = f"{size // MiB} MiB" if size >= MiB else f"{size >> 10} KiB"
        print(f"{label:>10} | " + " | ".join(f"{c:14.1f}" for c in cells))
    print(f"\ndaemon RSS per connection holding a body ({args.connections} connections):")
    for label, kib in results["memory_kib"].items():
        print(f"  {label}: {kib:.0f} KiB")
    out = REPO / "bench" / "results"
    out.mkdir(exist_ok=True)
    path = out / f"uploads-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"\n{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
