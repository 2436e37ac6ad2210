"""Issue 7's "done when": a real ``cached serve`` under 20 s of concurrent downloads, deletes,
prunes and queueing of the same few images, in front of the fake Glance.

What runs at once (each worker loops until the load ends):

- downloaders: whole images and single ranges (bounded, suffix, open-ended) of the same 4
  images (8-32 MiB), every completed body compared byte for byte with the image;
- a dropper: ``DELETE /v2/cache/{id}`` and the legacy ``DELETE /v2/cached_images/{id}``;
- an image deleter: ``DELETE /v2/images/{id}`` through the proxy (the daemon drops its copy),
  after which the test puts the same image back upstream under the same id, so the load on
  it goes on (Glance never reuses an id; here it only stands for "dropped, fetched anew");
- a pruner: ``POST /v2/cache/prune`` while the images (80 MiB) do not fit the cache
  (``--max-size 64M``), so prune and the prune-on-fill of new entries evict all the time;
- a queuer: ``PUT /v2/cache/{id}`` (queue and prefetch at once).

Asserted: no ``RuntimeError``, no traceback and no ERROR line in the daemon's log (the cache
disk is healthy and the upstream sends correct data: a verification failure or a cache that
switches itself off, "cache directory refused a write", is a bug); no completed body that
differs from the image (a connection cut short is allowed: the client knows from
Content-Length); only the statuses a client may see here (200, 206; 404 while an image is
deleted); no request that stalls; the bound on upstream transfers below; the daemon alive at
the end and every image still served exactly.

The bound on upstream transfers. A *full transfer* is an upstream data request without a
``Range`` header: what a fill of an image with nothing cached sends (a fill that finds chunks
on disk asks for the missing runs with ranges; the authorisation probe is ``bytes=0-0``; a
client's range on a miss fetches its chunks with a range). With single flight, one image
needs one full transfer until its copy is dropped; every drop may cost one more (the next
miss starts from nothing, and a fill still running for readers of the dropped copy may go on
beside the new one). A download the cache does not take part in (``Cache-Status:
cached; fwd=bypass``, e.g. an image the cache does not admit) is passed through and may cost
one full transfer of its own when it asked for the whole image. So, per image::

    full transfers <= 1 + drops + whole-image bypasses

where drops counts every drop request answered with success (``DELETE /v2/cache/{id}`` 204,
``DELETE /v2/cached_images/{id}`` 200, ``DELETE /v2/images/{id}`` 204, whether or not a copy
was there: an upper bound) and every eviction the daemon logged (``pruned <id>``). Two fills
of one image at once without a drop in between (single flight broken) exceed it.

Numbers (requests, bytes, cuts, evictions) are printed: run with ``-s`` to see them.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from daemonproc import CachedProcess
from fakeglance import FakeGlance, FakeImage

pytestmark = pytest.mark.stress

MiB = 1 << 20
LOAD_SECONDS = 20.0
SIZES = (8 * MiB, 16 * MiB, 24 * MiB, 32 * MiB)
MAX_SIZE = "64M"  # all four admitted (max_image_fraction 0.5), not all at once
RATE = 96 * MiB  # per upstream transfer: fills last long enough to be deleted under
DOWNLOADERS = 6
READ_TIMEOUT = 15.0  # seconds without a byte: a reader waiting on a fill that never comes
ADMIN = {"X-Auth-Token": "token-admin"}
PRUNED_RE = re.compile(r"cached\.jobs: pruned ([0-9a-f-]{36}) ")


@dataclass
class Tally:
    """What the clients saw, per image where it matters."""

    statuses: Counter[int] = field(default_factory=Counter)
    complete: int = 0
    cut: int = 0
    stalled: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    bytes_ok: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    drops: Counter[str] = field(default_factory=Counter)
    whole_bypasses: Counter[str] = field(default_factory=Counter)
    admin: Counter[str] = field(default_factory=Counter)


def _pick_range(size: int, rng: random.Random) -> tuple[str | None, int, int]:
    """A ``Range`` header value (None: the whole image) and the bytes it selects."""
    kind = rng.choice(("whole", "whole", "bounded", "suffix", "open"))
    if kind == "whole":
        return None, 0, size
    if kind == "bounded":
        start = rng.randrange(size)
        end = min(size, start + rng.randrange(1, 6 * MiB))
        return f"bytes={start}-{end - 1}", start, end
    if kind == "suffix":
        n = rng.randrange(1, 6 * MiB)
        return f"bytes=-{n}", size - n, size
    start = rng.randrange(size - MiB, size) if rng.random() < 0.5 else rng.randrange(size)
    return f"bytes={start}-", start, size


async def _download(
    session: aiohttp.ClientSession, url: str, image: FakeImage, rng: random.Random, t: Tally
) -> None:
    assert image.data is not None
    header, start, end = _pick_range(len(image.data), rng)
    headers = {"X-Auth-Token": "token-p1", **({"Range": header} if header else {})}
    what = f"{image.id} {header or 'whole'}"
    try:
        async with session.get(f"{url}/v2/images/{image.id}/file", headers=headers) as resp:
            t.statuses[resp.status] += 1
            status = resp.headers.get("Cache-Status", "")
            t.outcomes[status] += 1
            if "fwd=bypass" in status and header is None:
                t.whole_bypasses[image.id] += 1
            body = await resp.read()
    except aiohttp.ClientPayloadError:
        t.cut += 1
        return
    except (aiohttp.ClientConnectionError, TimeoutError) as exc:
        if isinstance(exc, TimeoutError):
            t.stalled.append(what)
        else:
            t.cut += 1
        return
    if resp.status not in (200, 206):
        return
    expected = image.data[start:end]
    wanted_status = 200 if header is None else 206
    if resp.status != wanted_status or body != expected:
        t.wrong.append(f"{what}: {resp.status}, {len(body)} bytes, expected {len(expected)}")
        return
    if header is not None:
        content_range = f"bytes {start}-{end - 1}/{len(image.data)}"
        if resp.headers.get("Content-Range") != content_range:
            t.wrong.append(f"{what}: Content-Range {resp.headers.get('Content-Range')}")
            return
    t.complete += 1
    t.bytes_ok += len(body)


async def _downloader(
    session: aiohttp.ClientSession,
    url: str,
    images: list[FakeImage],
    seed: int,
    until: float,
    t: Tally,
) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        await _download(session, url, rng.choice(images), rng, t)


async def _admin(session: aiohttp.ClientSession, method: str, url: str, t: Tally, name: str) -> int:
    async with session.request(method, url, headers=ADMIN) as resp:
        await resp.read()
        t.admin[f"{name} {resp.status}"] += 1
        return resp.status


async def _dropper(
    session: aiohttp.ClientSession, url: str, ids: list[str], until: float, t: Tally
) -> None:
    rng = random.Random(1)
    while await _pause(rng.uniform(0.2, 0.6), until):
        image_id = rng.choice(ids)
        if rng.random() < 0.5:
            status = await _admin(session, "DELETE", f"{url}/v2/cache/{image_id}", t, "cache")
            ok = status == 204
        else:
            path = f"{url}/v2/cached_images/{image_id}"
            ok = await _admin(session, "DELETE", path, t, "legacy") == 200
        if ok:
            t.drops[image_id] += 1


async def _image_deleter(
    session: aiohttp.ClientSession, url: str, glance: FakeGlance, until: float, t: Tally
) -> None:
    rng = random.Random(2)
    while await _pause(rng.uniform(1.0, 2.5), until):
        image = rng.choice(list(glance.images.values()))
        status = await _admin(session, "DELETE", f"{url}/v2/images/{image.id}", t, "image")
        if status == 204:
            t.drops[image.id] += 1
        glance.images[image.id] = image  # back upstream, same id and data


async def _periodic(
    session: aiohttp.ClientSession,
    method: str,
    urls: list[str],
    gap: float,
    until: float,
    t: Tally,
    name: str,
) -> None:
    rng = random.Random(name)
    while await _pause(rng.uniform(gap / 2, gap * 1.5), until):
        await _admin(session, method, rng.choice(urls), t, name)


async def _pause(seconds: float, until: float) -> bool:
    """Sleep ``seconds`` but not past ``until``; whether the load is still on."""
    await asyncio.sleep(max(0.0, min(seconds, until - time.monotonic())))
    return time.monotonic() < until


def _full_transfers(glance: FakeGlance, image_id: str) -> int:
    return sum(1 for r in glance.data_requests(image_id) if r.range is None)


async def test_concurrent_downloads_deletes_prunes_and_queueing(
    glance: FakeGlance, tmp_path: Path
) -> None:
    images = [glance.add_image(os.urandom(size), rate=RATE) for size in SIZES]
    ids = [i.id for i in images]
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    conf = tmp_path / "cached.yaml"  # management with the admin token (loopback is no credential)
    conf.write_text(f"admin_tokens: [sha256:{hashlib.sha256(b'token-admin').hexdigest()}]\n")
    daemon = CachedProcess(
        glance.url, cache_dir, tmp_path / "cached.log", "--max-size", MAX_SIZE, "-c", str(conf)
    )
    began = time.monotonic()
    url = await asyncio.to_thread(daemon.start)
    print(f"\nstarted in {time.monotonic() - began:.1f}s")
    tally = Tally()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=READ_TIMEOUT)
    try:
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            until = time.monotonic() + LOAD_SECONDS
            workers = [
                _downloader(session, url, images, seed, until, tally) for seed in range(DOWNLOADERS)
            ]
            workers += [
                _dropper(session, url, ids, until, tally),
                _image_deleter(session, url, glance, until, tally),
                _periodic(session, "POST", [f"{url}/v2/cache/prune"], 0.7, until, tally, "prune"),
                _periodic(
                    session, "PUT", [f"{url}/v2/cache/{i}" for i in ids], 0.7, until, tally, "queue"
                ),
            ]
            await asyncio.gather(*workers)
            print(f"load ended {time.monotonic() - until:.1f}s after its deadline")

            # After the storm: the daemon answers, and serves every image exactly.
            assert daemon.proc is not None and daemon.proc.poll() is None, "the daemon died"
            for image in images:
                async with session.get(
                    f"{url}/v2/images/{image.id}/file", headers={"X-Auth-Token": "token-p1"}
                ) as resp:
                    assert resp.status == 200 and await resp.read() == image.data
    finally:
        log = daemon.output()
        stopping = time.monotonic()
        code = await asyncio.to_thread(daemon.stop)
        print(f"stopped in {time.monotonic() - stopping:.1f}s")

    evicted = Counter(PRUNED_RE.findall(log))
    transfers = {i: _full_transfers(glance, i) for i in ids}
    upstream_bytes = sum(glance.bytes_sent.get(i, 0) for i in ids)
    print(
        f"\nstress: {sum(tally.statuses.values())} downloads, {tally.complete} complete and exact "
        f"({tally.bytes_ok / MiB:.0f} MiB), {tally.cut} cut, {len(tally.stalled)} stalled, "
        f"{len(tally.wrong)} wrong; statuses {dict(tally.statuses)}\n"
        f"  Cache-Status {dict(tally.outcomes)}\n"
        f"  management {dict(tally.admin)}\n"
        f"  upstream: {len(glance.requests)} requests, {upstream_bytes / MiB:.0f} MiB of data; "
        f"full transfers {list(transfers.values())}, drops "
        f"{[tally.drops[i] for i in ids]}, evictions {[evicted[i] for i in ids]}, "
        f"whole bypasses {[tally.whole_bypasses[i] for i in ids]}; exit code {code}"
    )

    kinds = Counter(
        re.sub(r"[0-9a-f-]{36}|\d+", "#", line.split(": ", 1)[-1])[:90]
        for line in log.splitlines()
        if " WARNING " in line or " ERROR " in line
    )
    print("  daemon warnings and errors:", *kinds.most_common(), sep="\n    ")

    problems = [
        line
        for line in log.splitlines()
        if "Traceback" in line or "RuntimeError" in line or " ERROR " in line
    ]
    assert not problems, "the daemon logged:\n" + "\n".join(problems[:20])
    assert not tally.wrong, f"{len(tally.wrong)} complete but wrong bodies: {tally.wrong[:5]}"
    assert not tally.stalled, f"{len(tally.stalled)} downloads stalled: {tally.stalled[:5]}"
    assert set(tally.statuses) <= {200, 206, 404}, dict(tally.statuses)
    assert tally.complete > 0
    over = {
        i: (transfers[i], tally.drops[i], evicted[i], tally.whole_bypasses[i])
        for i in ids
        if transfers[i] > 1 + tally.drops[i] + evicted[i] + tally.whole_bypasses[i]
    }
    assert not over, f"full transfers above 1 + drops + evictions + bypasses: {over}"
