"""The bench's image origin: test data, Glance image records, and a small fake Glance server.

Data files are random bytes made once per work dir; their md5/sha512 are kept in a sidecar
JSON (``data/digests.json``) so a 1 GiB file is hashed only when it is written.  Every
measurement that needs a cold cache gets a fresh image id (an *alias*): a hard link to the data
file under ``www/images/<id>`` plus its record in ``www/records/<id>.json``.  Both the nginx
origin (see ``bench.nginx``) and the fake Glance below serve that tree:

- ``GET /v2/images/{id}``       the image record (JSON: size, checksum, os_hash_value, status)
- ``GET /v2/images/{id}/file``  the data, with Range (206 + Content-Range) and sendfile

Run the fake Glance alone with ``python -m bench.origin --root WWW [--port N] [--rate B/s]``.
``--shared-rate B/s`` caps the data responses of all connections together (one token bucket
over every data response, as a backend's link would), where ``--rate`` paces each response on
its own. With either cap, the access log's byte count is what was really sent (a transfer
the caller cut counts only its bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

_NS = uuid.UUID("6f0c63a4-1a53-4d6e-9a35-6d0b1c1f0b3e")
_BLOCK = 4 << 20


@dataclass(frozen=True)
class DataFile:
    name: str
    path: Path
    size: int
    md5: str
    sha512: str


def make_data(data_dir: Path, name: str, size: int) -> DataFile:
    """Return random data file ``name`` of ``size`` bytes, creating it (and its digests) once."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / f"{name}.bin"
    sidecar = data_dir / "digests.json"
    known = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    rec = known.get(name)
    if path.exists() and rec:
        st = path.stat()
        if st.st_size == size == rec["size"] and st.st_mtime_ns == rec["mtime_ns"]:
            return DataFile(name, path, size, rec["md5"], rec["sha512"])
    md5, sha = hashlib.md5(), hashlib.sha512()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(_BLOCK, left))
            md5.update(chunk)
            sha.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    os.replace(tmp, path)
    rec = {
        "size": size,
        "mtime_ns": path.stat().st_mtime_ns,
        "md5": md5.hexdigest(),
        "sha512": sha.hexdigest(),
    }
    known[name] = rec
    sidecar.write_text(json.dumps(known, indent=1))
    return DataFile(name, path, size, rec["md5"], rec["sha512"])


def image_record(image_id: str, data: DataFile, tag: str) -> dict[str, object]:
    """A Glance v2 image record for ``data`` (the fields cached reads, plus the usual rest)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "id": image_id,
        "name": f"bench-{tag}",
        "status": "active",
        "visibility": "public",
        "protected": False,
        "os_hidden": False,
        "size": data.size,
        "virtual_size": None,
        "checksum": data.md5,
        "os_hash_algo": "sha512",
        "os_hash_value": data.sha512,
        "disk_format": "raw",
        "container_format": "bare",
        "min_disk": 0,
        "min_ram": 0,
        "owner": "bench",
        "tags": [],
        "created_at": now,
        "updated_at": now,
        "file": f"/v2/images/{image_id}/file",
        "self": f"/v2/images/{image_id}",
        "schema": "/v2/schemas/image",
    }


class Images:
    """The ``www`` tree both origins serve; hands out fresh image ids for cold runs."""

    def __init__(self, www: Path, run_tag: str) -> None:
        self.www = www
        self.run_tag = run_tag
        (www / "images").mkdir(parents=True, exist_ok=True)
        (www / "records").mkdir(parents=True, exist_ok=True)

    def alias(self, data: DataFile, tag: str, properties: dict[str, object] | None = None) -> str:
        """A new image id serving ``data``; ids differ between runs so caches start cold.
        ``properties``: more fields of its record (``img_signature``, ...)."""
        image_id = str(uuid.uuid5(_NS, f"{self.run_tag}/{tag}"))
        target = self.www / "images" / image_id
        if not target.exists():
            os.link(data.path, target)
        record = json.dumps({**image_record(image_id, data, tag), **(properties or {})})
        (self.www / "records" / f"{image_id}.json").write_text(record)
        return image_id


# --- the fake Glance server ----------------------------------------------------------------


class _Log(AbstractAccessLogger):
    """One line per request, in the same format as the nginx origin's access log."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        sent = request.get(SENT)
        if sent is None:
            sent = (response.content_length or 0) if response.status < 300 else 0
        rng = request.headers.get("Range", "")
        self.logger.info(
            '%.3f "%s %s HTTP/1.1" %d %d range="%s"',
            _now(),
            request.method,
            request.path_qs,
            response.status,
            sent,
            rng,
        )


def _now() -> float:
    return time.time()


def _file_for(request: web.Request) -> Path:
    image_id = request.match_info["id"]
    path: Path = request.app[ROOT] / "images" / image_id
    if "/" in image_id or not path.is_file():
        raise web.HTTPNotFound()
    return path


async def record(request: web.Request) -> web.Response:
    path = request.app[ROOT] / "records" / f"{request.match_info['id']}.json"
    try:
        body = await asyncio.to_thread(path.read_bytes)
    except OSError:
        raise web.HTTPNotFound() from None
    return web.Response(body=body, content_type="application/json")


class SharedRate:
    """One token bucket for every data response of the server: together they send at most
    ``rate`` bytes/s (after a burst of ``burst`` bytes). Takers are served in the order they
    ask (a virtual clock: each piece books the next ``n / rate`` seconds of the link), so
    concurrent responses share the link evenly. Only the event loop's task touches it."""

    def __init__(self, rate: int, burst: int = 1 << 20) -> None:
        self.rate = rate
        self.burst = burst
        self.booked_until = 0.0  # time.monotonic() at which the link's booked time ends

    async def take(self, n: int) -> None:
        now = time.monotonic()
        self.booked_until = max(self.booked_until, now) + n / self.rate
        wait = self.booked_until - self.burst / self.rate - now
        if wait > 0:
            await asyncio.sleep(wait)


async def image_file(request: web.Request) -> web.StreamResponse:
    path = _file_for(request)
    rate = request.app[RATE]
    shared = request.app[SHARED] if request.app[SHARED].rate else None
    if not rate and shared is None:
        # sendfile, Range/206/416 handled by aiohttp
        return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})
    return await _throttled(request, path, rate, shared)


async def _throttled(
    request: web.Request, path: Path, rate: int, shared: SharedRate | None
) -> web.StreamResponse:
    """Serve ``path`` at ``rate`` bytes/s (per connection) or within the ``shared`` cap with
    ``sendfile`` in steps (1 MiB per connection, 256 KiB under the shared cap), with
    single-range support; what was sent is left in ``request[SENT]`` for the access log."""
    size = (await asyncio.to_thread(path.stat)).st_size
    start, end, status = 0, size, 200
    if "Range" in request.headers:
        try:
            rng = request.http_range
        except ValueError:
            raise web.HTTPRequestRangeNotSatisfiable() from None
        if rng.start is not None and rng.start < 0:  # suffix: bytes=-N
            start = max(0, size + rng.start)
        else:
            start = rng.start or 0
            end = min(size, rng.stop) if rng.stop is not None else size
        if start >= end:
            raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
        status = 206
    headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
    resp = web.StreamResponse(status=status, headers=headers)
    if status == 206:
        resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    resp.content_length = end - start
    await resp.prepare(request)  # sends the headers
    loop, transport = asyncio.get_running_loop(), request.transport
    t0, sent, step = time.monotonic(), 0, (256 << 10) if shared else 1 << 20
    request[SENT] = 0
    fobj = await asyncio.to_thread(open, path, "rb")
    try:
        while start + sent < end and transport is not None:
            n = min(step, end - start - sent)
            if shared is not None:
                await shared.take(n)
            sent += await loop.sendfile(transport, fobj, start + sent, n)
            request[SENT] = sent
            ahead = t0 + sent / rate - time.monotonic() if rate else 0
            if ahead > 0:
                await asyncio.sleep(ahead)
    finally:
        await asyncio.to_thread(fobj.close)
    await resp.write_eof()
    return resp


ROOT = web.AppKey("root", Path)
RATE = web.AppKey("rate", int)
SHARED = web.AppKey("shared", SharedRate)  # rate 0: no shared cap
SENT = "bench_sent"  # request key: body bytes a throttled response really sent


def make_app(root: Path, rate: int = 0, shared_rate: int = 0) -> web.Application:
    app = web.Application()
    app[ROOT] = root
    app[RATE] = rate
    app[SHARED] = SharedRate(shared_rate)
    app.router.add_get("/v2/images/{id}", record)
    app.router.add_get("/v2/images/{id}/file", image_file)
    return app


async def _serve(
    root: Path, port: int, rate: int, shared_rate: int, log: str | None, host: str = "127.0.0.1"
) -> None:
    import logging

    logger = logging.getLogger("bench.origin.access")
    logger.propagate = False
    handler = logging.FileHandler(log) if log else logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    runner = web.AppRunner(
        make_app(root, rate, shared_rate), access_log_class=_Log, access_log=logger
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"fake glance: listening on http://{host}:{bound}", file=sys.stderr, flush=True)
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser(description="fake Glance origin for the cached bench")
    p.add_argument("--root", type=Path, required=True, help="the www dir (images/, records/)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--rate", type=int, default=0, help="bytes/s per connection; 0 = sendfile")
    p.add_argument(
        "--shared-rate", type=int, default=0, help="bytes/s for all data responses together"
    )
    p.add_argument("--log", help="access log file (default stdout)")
    a = p.parse_args()
    try:
        asyncio.run(_serve(a.root, a.port, a.rate, a.shared_rate, a.log, a.host))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
